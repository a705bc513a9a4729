"""The statement-shape cache and literal redaction.

A *shape* is the statement text with its replaceable literals taken out; statements of one shape
(from one operator view, under one set of lexing settings) get one decision, with the literals
spliced back into a cached template of the rewritten SQL. That is what makes a teller's
``SELECT * FROM customers WHERE id = 123`` cost microseconds instead of a parse.

A cache keyed by shape is only safe if every statement of a shape really gets the same decision,
so the normalizer is deliberately narrow (NOTES "the statement-shape cache must be conservative"):

* it gives up — no caching, full analysis — on anything it does not fully understand: dollar
  quotes, ``E''``/``B''``/``X''``/``N''``/``U&`` literals, nested or unterminated comments,
  backslashes (``standard_conforming_strings`` off reads them), NUL, string continuation across
  newlines, numbers glued to identifiers, non-UTF8 client encodings with non-ASCII text, and
  literals whose value holds a sensitive word (``table_to_xml('customers', ..)``);
* only literals in value positions are replaced (after an operator, ``(``, ``,`` or a keyword
  such as AND/WHERE/VALUES/THEN); literals after LIMIT/OFFSET/FETCH, typed literals
  (``DATE '..'``) and anything else stay part of the shape;
* the template is made by analysing the statement with each literal replaced by a fresh ``$k``
  parameter and finding each ``$k`` exactly once in the output; a shape whose placeholder
  analysis is denied, or whose template does not reproduce a fresh analysis of the very
  statement that filled it, is remembered as uncacheable.

Data flow::

    sql --normalize--> Normalized(shape, literals) --key--> Template | UNCACHEABLE | miss
    miss: analyse placeholder text -> Template -> instantiate -> compare with fresh analysis

``redact_literals`` (for the audit log) lives here too: it shares the lexer.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from rewriters.lexer import Tok, tokenize
from rewriters.model import Action, Analysis, LexSettings, ServerForm, StatementDecision

if TYPE_CHECKING:
    from rewriters.compiled import CompiledView

_IDENT = r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*"
# One match = a run of tokens that never hold a literal (whitespace, identifiers not glued to a
# quote or ``&``, quoted identifiers, operators and punctuation, ``$n``), then one token that
# needs a look: a comment, a string, a number, an identifier glued to a quote, or something
# the normalizer refuses. Matching runs in bulk keeps the per-statement cost at one Python step
# per literal (the hot path of every cached statement). The alternatives are possessive / atomic
# (Python 3.11), so a run never backtracks into the middle of a token.
_T = TypeVar("_T")

_NORM = re.compile(
    r"(?P<run>(?:[ \t\n\r\f\v]++"
    rf"|(?>{_IDENT})(?!['&])"
    r"|\"(?:[^\"]|\"\")*+\""
    r"|(?:[+*<>=~!@#%^&|`?(),;\[\]:.]|-(?!-)|/(?!\*))++"
    r"|\$[0-9]++)*+)"
    r"(?:(?P<lc>--[^\n\r]*+)"
    r"|(?P<bc>/\*(?:[^*/]|\*(?!/)|/(?!\*))*+\*/)"
    r"|(?P<bad>/\*|[eEbBxXnN](?=')|[uU](?=&)|\$|\\|\x00)"
    r"|(?P<str>'(?:[^']|'')*+')"
    r"|(?P<num>(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    rf"|(?P<ident>{_IDENT})"
    r"|(?P<end>\Z)"
    r"|(?P<other>.))",
    re.DOTALL,
)
_WS = frozenset(" \t\n\r\f\v")
_PARAM = re.compile(r"\$([0-9]+)")
# Keywords after which a literal is a plain value.
_VALUE_KEYWORDS = frozenset({"and", "or", "not", "in", "like", "ilike", "between", "then",
                             "else", "when", "select", "where", "values", "is", "distinct",
                             "from", "on", "having", "returning", "set", "case"})
_OP_END = frozenset("=<>+-*/%|(,~!^&")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$\x80-\U0010ffff.]")
# Longer texts are not cached (bulk INSERTs): normalizing them costs more than it saves.
MAX_SHAPE_CHARS = 16 * 1024
_CACHE_KINDS = frozenset({"select", "insert", "update", "delete"})
_SAFE_ENCODINGS = frozenset({"UTF8", "UNICODE", "SQLASCII"})


@dataclass(frozen=True)
class Normalized:
    shape: str
    literals: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]


def normalize(sql: str, lex: LexSettings, sensitive: Callable[[str], bool] | None = None
              ) -> Normalized | None:
    """The shape of ``sql`` and its literals, or None when the text is not fully understood.

    >>> normalize("SELECT * FROM t WHERE id = 5 LIMIT 10", LexSettings()).shape
    'SELECT * FROM t WHERE id = \\x00i LIMIT 10'
    """
    if "\\" in sql or "\x00" in sql:
        # Backslashes: read differently with standard_conforming_strings off (and in E'').
        # NUL: never valid in a query, and the shape's own slot markers start with it.
        return None
    enc = lex.client_encoding.replace("_", "").replace("-", "").upper()
    if enc not in _SAFE_ENCODINGS and not sql.isascii():
        return None
    parts: list[str] = []
    literals: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0  # end of the text already copied into ``parts``
    at = 0  # where the next match starts
    prev_kind = ""  # the previous significant token: op | word | str | num | qid | ident
    prev_text = ""
    match = _NORM.match
    n = len(sql)
    while True:
        m = match(sql, at)
        if m is None:
            return None
        j = m.end("run")
        while j > at and sql[j - 1] in _WS:
            j -= 1
        if j > at:
            # The run's last significant token: an identifier or $n (word characters), a
            # quoted identifier, or an operator / punctuation character.
            last = sql[j - 1]
            if last == '"':
                prev_kind, prev_text = "qid", last
            elif _IDENT_CHAR.match(last) is not None and last != ".":
                k = j - 1
                while k > at and _IDENT_CHAR.match(sql[k - 1]) is not None and sql[k - 1] != ".":
                    k -= 1
                prev_kind, prev_text = "word", sql[k:j]
            else:
                prev_kind, prev_text = "op", last
        kind = m.lastgroup
        if kind == "end":
            break
        if kind == "lc" or kind == "bc":
            at = m.end()
            continue
        if kind == "bad" or kind == "other" or kind is None:
            return None
        text = m.group(kind)
        start, end = m.start(kind), m.end()
        if kind == "num":
            if end < n and _IDENT_CHAR.match(sql, end):
                return None  # 1e / 123abc / 1..2: PostgreSQL versions disagree
        if kind == "str" or kind == "num":
            if kind == "str" and prev_kind == "str":
                return None  # possible continuation 'a'\n'b'
            replaceable = (
                (prev_kind == "op" and prev_text in _OP_END)
                or (prev_kind == "word" and prev_text.lower() in _VALUE_KEYWORDS)
            )
            if replaceable:
                if kind == "str" and sensitive is not None and sensitive(text.lower()):
                    return None
                parts.append(sql[pos:start])
                # The kind of literal is part of the shape: the analysis treats strings,
                # integers and other numbers differently (lookups take strings, a leakproof
                # int4 comparison takes integers only).
                if kind == "str":
                    parts.append("\x00s")
                else:
                    parts.append("\x00i" if text.isdigit() else "\x00n")
                literals.append(text)
                spans.append((start, end))
                pos = end
        prev_kind = "word" if kind == "ident" else kind
        prev_text = text
        at = end
        if at >= n:
            break
    parts.append(sql[pos:])
    return Normalized("".join(parts), tuple(literals), tuple(spans))


def max_param(sql: str) -> int:
    """An upper bound of the ``$n`` parameters in ``sql`` (also counts any inside strings or
    comments: over-counting only shifts the placeholder numbers)."""
    return max((int(d) for d in _PARAM.findall(sql)), default=0)


def _placeholder_text(sql: str, norm: Normalized, base: int) -> str:
    out: list[str] = []
    pos = 0
    for i, (s, e) in enumerate(norm.spans):
        out.append(sql[pos:s])
        out.append(f"${base + i}")
        pos = e
    out.append(sql[pos:])
    return "".join(out)


@dataclass(frozen=True)
class _Text:
    """A text with literal slots: parts[0] lit[slots[0]] parts[1] ... parts[-1]."""

    parts: tuple[str, ...]
    slots: tuple[int, ...]

    def fill(self, literals: tuple[str, ...]) -> str:
        if len(self.slots) == 1:  # the common lookup: one literal
            return self.parts[0] + literals[self.slots[0]] + self.parts[1]
        out = [self.parts[0]]
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            out.append(literals[slot])
            out.append(part)
        return "".join(out)


def _template_text(text: str, base: int, count: int) -> _Text | None:
    """Split ``text`` at its ``$k`` placeholders (k in [base, base+count)); each at most once."""
    parts: list[str] = []
    slots: list[int] = []
    pos = 0
    seen: set[int] = set()
    for t in tokenize(text):
        if t.kind is Tok.ERROR:
            return None
        if t.kind is not Tok.PARAM:
            continue
        k = int(t.text[1:]) - base
        if k < 0:
            continue
        if k >= count or k in seen:
            return None
        seen.add(k)
        parts.append(text[pos : t.start])
        slots.append(k)
        pos = t.end
    parts.append(text[pos:])
    return _Text(tuple(parts), tuple(slots))


_INT4_MAX = 2**31 - 1
_INT8_MAX = 2**63 - 1
_INT4, _INT8, _NUMERIC, _UNKNOWN = 23, 20, 1700, 0
_WORD_BY = re.compile(r"(?<![A-Za-z0-9_$\x80-\U0010ffff])(?:by|distinct)(?![A-Za-z0-9_$\x80-\U0010ffff])",
                      re.IGNORECASE)


def literal_parameter(text: str) -> tuple[int, str]:
    """(type OID, text-format value) of a literal the normalizer replaced, typed the way
    PostgreSQL types the literal itself: an integer is int4 when it fits, else int8, else
    numeric; a number with a point or an exponent is numeric; a quoted string is unknown
    (resolved from its context, as the literal would be). Strings never hold a backslash here
    (the normalizer refuses them), so undoubling quotes is all the decoding there is."""
    if text[0] == "'":
        return _UNKNOWN, text[1:-1].replace("''", "'")
    if text.isdigit():
        value = int(text)
        return (_INT4 if value <= _INT4_MAX else _INT8 if value <= _INT8_MAX else _NUMERIC), text
    return _NUMERIC, text


def _server_sql(sql_t: _Text, sql: str, norm: Normalized) -> str | None:
    """The template's text with ``$1..$n`` in the literals' places, or None when a parameter
    could mean something else than the literal it replaces: an integer after a comma or an
    opening parenthesis in a statement with ORDER/GROUP/PARTITION BY or DISTINCT (``GROUP BY
    a, 2``, ``DISTINCT ON (2)`` and ``ORDER BY (2)`` name the second output column; ``$1``
    there is a constant, one group or no order at all)."""
    if _WORD_BY.search(sql) is not None:
        for text, (start, _end) in zip(norm.literals, norm.spans, strict=True):
            if text[0] == "'":
                continue
            j = start - 1
            while j >= 0 and sql[j] in _WS:
                j -= 1
            if j >= 0 and sql[j] in ",(":
                return None
    out = [sql_t.parts[0]]
    for slot, part in zip(sql_t.slots, sql_t.parts[1:], strict=True):
        out.append(f"${slot + 1}")
        out.append(part)
    return "".join(out)


@dataclass(frozen=True)
class Template:
    sql: _Text
    statements: tuple[tuple[StatementDecision, _Text], ...]
    # the parameterised form of a single rewritten SELECT (see ServerForm), else None
    server_sql: str | None = None

    def instantiate(self, literals: tuple[str, ...], started: float | None = None,
                    spans: tuple[tuple[int, int], ...] = ()) -> Analysis:
        """The cached decision with these literals spliced back in; ``started`` (a
        ``perf_counter`` value) sets ``rewrite_seconds``; ``spans`` (where the literals are in
        the statement's text) go into the server form."""
        if len(self.statements) == 1:
            d, t = self.statements[0]
            decisions: tuple[StatementDecision, ...] = (fast_copy(d, sql=t.fill(literals)),)
        else:
            decisions = tuple(fast_copy(d, sql=t.fill(literals)) for d, t in self.statements)
        sql = self.sql.fill(literals)
        took = time.perf_counter() - started if started is not None else 0.0
        if self.server_sql is None:
            return fast_copy(_CACHED, sql=sql, statements=decisions, rewrite_seconds=took)
        params = [literal_parameter(text) for text in literals]
        form = ServerForm(self.server_sql, tuple(p[0] for p in params),
                          tuple(p[1] for p in params), spans)
        return fast_copy(_CACHED, sql=sql, statements=decisions, rewrite_seconds=took,
                         server_form=form)


def fast_copy(obj: _T, **changes: object) -> _T:
    """``dataclasses.replace(obj, **changes)`` for the hot path, without re-running the frozen
    ``__init__`` (one ``object.__setattr__`` per field: several µs for a StatementDecision, a
    quarter of a cache hit). Only for the model's plain frozen dataclasses, which have no
    ``__post_init__`` and no derived fields."""
    fields = obj.__dict__.copy()
    fields.update(changes)
    new = object.__new__(type(obj))
    object.__setattr__(new, "__dict__", fields)
    return new


_UNCACHEABLE = object()
_CACHED = Analysis("", (), cached=True)


@dataclass(frozen=True)
class Miss:
    key: tuple[object, ...]
    norm: Normalized


def _same(a: Analysis, b: Analysis) -> bool:
    return a.sql == b.sql and a.statements == b.statements


class ShapeCache:
    """LRU of shape -> Template (or the UNCACHEABLE marker), with hit/miss counters."""

    def __init__(self, size: int = 20000) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[object, ...], object] = OrderedDict()
        self._view_ids: dict[tuple[object, ...], int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _view_id(self, cv: CompiledView) -> int:
        vid = getattr(cv, "cache_id", None)
        if vid is None:
            vid = self._view_ids.setdefault(cv.key, len(self._view_ids))
            cv.cache_id = vid  # type: ignore[attr-defined]
        return vid

    def lookup(self, sql: str, cv: CompiledView, lex: LexSettings,
               started: float | None = None) -> Analysis | Miss | None:
        """A hit (the Analysis), a miss to fill, or None (not cacheable: analyse in full)."""
        if len(sql) > MAX_SHAPE_CHARS:
            return None
        norm = normalize(sql, lex, cv.sensitive)
        if norm is None:
            return None
        key = (self._view_id(cv), lex.standard_conforming_strings, lex.client_encoding,
               norm.shape)
        entry = self._entries.get(key)
        if entry is _UNCACHEABLE:
            return None
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            assert isinstance(entry, Template)
            return entry.instantiate(norm.literals, started, norm.spans)
        self.misses += 1
        return Miss(key, norm)

    def _store(self, key: tuple[object, ...], value: object) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def fill(self, miss: Miss, sql: str, analyse: Callable[[str], Analysis]) -> Analysis:
        """Analyse a missed statement, store its template when it proves reusable."""
        norm = miss.norm
        base = max_param(sql) + 1
        count = len(norm.literals)
        fresh = analyse(sql)
        if not all(d.kind in _CACHE_KINDS and d.action is not Action.DENY
                   for d in fresh.statements) or not fresh.statements:
            self._store(miss.key, _UNCACHEABLE)
            return fresh
        if count == 0:
            template = self._build(fresh, base, 0)
        else:
            placeholder = analyse(_placeholder_text(sql, norm, base))
            if any(d.action is Action.DENY or d.kind not in _CACHE_KINDS
                   for d in placeholder.statements):
                self._store(miss.key, _UNCACHEABLE)
                return fresh
            template = self._build(placeholder, base, count)
        if template is None or not _same(template.instantiate(norm.literals), fresh):
            self._store(miss.key, _UNCACHEABLE)
            return fresh
        if len(template.statements) == 1 and template.statements[0][0].kind == "select" \
                and template.statements[0][0].action is Action.REWRITE \
                and "$" not in sql:  # a client's own $n would bind to our parameters
            server_sql = _server_sql(template.sql, sql, norm)
            if server_sql is not None:
                template = Template(template.sql, template.statements, server_sql)
        self._store(miss.key, template)
        return fresh

    @staticmethod
    def _build(analysis: Analysis, base: int, count: int) -> Template | None:
        sql_t = _template_text(analysis.sql, base, count)
        if sql_t is None or (count and sorted(sql_t.slots) != list(range(count))):
            return None
        stmts: list[tuple[StatementDecision, _Text]] = []
        for d in analysis.statements:
            t = _template_text(d.sql, base, count)
            if t is None:
                return None
            for field_text in (*d.reasons, d.message, *d.columns, *d.lookups):
                if "$" in field_text:
                    return None
            stmts.append((d, t))
        return Template(sql_t, tuple(stmts))



def redact_literals(sql: str, standard_conforming_strings: bool = True) -> str:
    """The statement with every literal replaced by ``?`` (``$n`` kept) and comments emptied,
    for the audit log. Never raises. One compiled-regex pass (``rewriters.redact``), because it
    runs once per audited statement.

    >>> redact_literals("SELECT * FROM t WHERE phone = '138' AND id = $1 LIMIT 5")
    'SELECT * FROM t WHERE phone = ? AND id = $1 LIMIT ?'
    """
    from rewriters.redact import redact

    return redact(sql, standard_conforming_strings)
