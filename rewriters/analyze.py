"""The analyzer: one SQL text + one operator's view -> an :class:`Analysis`.

Pipeline (pure; no I/O, no asyncio)::

    sql --fast path?--------------------------------------------> Analysis (all FORWARD)
     |   (no protected / dependent name, no risky token, a harmless leading keyword)
     +--shape cache hit?-----------------------------------------> Analysis (template + literals)
     +--split (lexer) --> per statement:
           lexer-differential / U& guards (restricted roles)
           PostgreSQL's reading (pglast): the authoritative statement type and names
           dispatch on kind:
             select/insert/update/delete  sqlglot substitution + DML rules + lookups + unbounded
             explain/prepare/declare/copy  peel the wrapper, analyse the inner statement
             execute/fetch                inherit the decision made at PREPARE / DECLARE
             ddl / set / utility / other  limits and deny-lists
           independent verification of the final text (pglast; rewriters.verify)
       --> StatementDecision per statement, Analysis.sql re-joined byte-for-byte

Restricted ("masked") roles are every role that is not ``unrestricted``; unrestricted roles are
never rewritten, only classified and audited (and held to their ``copy``/``ddl`` limits).
Everything that cannot be read the way PostgreSQL will read it is denied for restricted roles
when it mentions customer data (fail closed).
"""

from __future__ import annotations

import bisect
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from sqlglot import exp

from rewriters.classify import (
    KEYWORD_KIND,
    PgParseError,
    PgStatement,
    PgTooComplex,
    copy_query_span,
    copy_table_span,
    declare_prefix,
    explain_prefix,
    leading_kind,
    pg_statement,
    prepare_prefix,
)
from rewriters.compiled import CompiledTable, CompiledView, FkParent, ViewCompiler, quote_ident
from rewriters.dml import dml_rules, failing, filtered_references
from rewriters.lexer import Tok, Token, fold, significant, split_statements, tokenize
from rewriters.model import (
    ROW_LIMIT_CHECK_REASON,
    Action,
    Analysis,
    LexSettings,
    OperatorView,
    StatementDecision,
    Unbounded,
)
from rewriters.shape import ShapeCache
from rewriters.substitute import (
    MAX_PROTECTED_REFERENCES,
    MAX_STATEMENT_CHARS,
    Denied,
    collect_refs,
    parse_one,
    substitute,
    unbounded_read,
)
from rewriters.textspan import Edit, EditConflict, TokenIndex, apply_edits
from rewriters.verify import Verdict, verify

log = logging.getLogger(__name__)

# Client encodings in which the second byte of a multibyte character can be an ASCII byte such
# as a backslash or a quote: text in them may not lex as it looks (NOTES: GBK 0xBF 0x5C).
UNSAFE_ENCODINGS = frozenset({"SJIS", "SHIFTJIS2004", "BIG5", "GBK", "UHC", "GB18030", "JOHAB",
                              "WIN932", "WIN936", "WIN949", "WIN950", "CP932", "CP936",
                              "CP949", "CP950"})

# Kinds the fast path may forward unparsed when no sensitive name or token appears.
FAST_KINDS = frozenset({"select", "insert", "update", "delete", "merge", "transaction", "set",
                        "utility"})

_ZERO_DIGITS = str.maketrans("123456789", "000000000")
# Names of the statements the proxy prepares upstream itself (proxy.session).
PROXY_STATEMENT_PREFIX = "pgveil_"
_UNKNOWN = object()
PLAIN_MEMO_SIZE = 4096  # texts per view; cleared when full (literals of new shapes churn it)

_LEAD_RE = re.compile(
    r"(?:[ \t\n\r\f\v]+|--[^\n\r]*|/\*(?:[^*/]|\*(?!/)|/(?!\*))*\*/|\()*([A-Za-z_]+)"
)
_INTO_RE = re.compile(r"(?<![A-Za-z0-9_$\x80-\U0010ffff])into(?![A-Za-z0-9_$\x80-\U0010ffff])")


def normalized_encoding(name: str) -> str:
    return re.sub(r"[-_ ]", "", name).upper()


@dataclass
class Core:
    """The analysis of one (possibly inner) statement before final verification."""

    kind: str
    deny: str | None = None
    sql: str | None = None  # rewritten text; None = unchanged
    generated: list[tuple[int, int]] = field(default_factory=list)
    allowed: list[tuple[int, int]] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    lookup_values: int = 0
    repeats: int = 0  # the most references to one protected table (a self-join: 2)
    reasons: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # messages of the checks written in
    tables: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    prepared: str | None = None
    cursor: str | None = None
    copy_out: bool = False
    copy_in: bool = False
    inherited: StatementDecision | None = None
    # a data change whose RETURNING reads masked columns of its target (table, the name the
    # statement uses for it): see masked_returning
    mask_returning: tuple[CompiledTable, str] | None = None

    def shifted(self, text: str, start: int, end: int) -> Core:
        """This inner result placed at ``text[start:end]`` of an enclosing statement."""
        inner = self.sql if self.sql is not None else text[start:end]
        new = replace(self)
        new.sql = text[:start] + inner + text[end:] if self.sql is not None else None
        new.generated = [(s + start, e + start) for s, e in self.generated]
        new.allowed = [(s + start, e + start) for s, e in self.allowed]
        return new


@dataclass
class _Ctx:
    cv: CompiledView
    lex: LexSettings
    prepared: dict[str, StatementDecision]
    cursors: dict[str, StatementDecision]

    @property
    def view(self) -> OperatorView:
        return self.cv.view

    @property
    def restricted(self) -> bool:
        return not self.cv.view.unrestricted


@dataclass
class _Mentions:
    tables: list[CompiledTable]
    dependents: list[str]
    risky: bool

    @property
    def sensitive(self) -> bool:
        return bool(self.tables or self.dependents or self.risky)

    @property
    def names(self) -> str:
        names = [t.name for t in self.tables] + self.dependents
        return ", ".join(names) if names else "customer data"


def _mentions(cv: CompiledView, text: str) -> _Mentions:
    lowered = text.lower()
    return _Mentions(cv.mentioned_tables(lowered), cv.mentioned_dependents(lowered),
                     cv.risky_re.search(lowered) is not None)


class Analyzer:
    """Analyses SQL for one proxy process: memoises compiled views and the shape cache."""

    def __init__(self, cache_size: int = 20000) -> None:
        self._views = ViewCompiler()
        self._cache = ShapeCache(cache_size)

    @property
    def cache_hits(self) -> int:
        return self._cache.hits

    @property
    def cache_misses(self) -> int:
        return self._cache.misses

    def analyze(
        self,
        sql: str,
        view: OperatorView,
        lex: LexSettings = LexSettings(),  # noqa: B008 - frozen dataclass, safe default
        *,
        prepared: dict[str, StatementDecision] | None = None,
        cursors: dict[str, StatementDecision] | None = None,
        sensitive: bool = False,
    ) -> Analysis:
        """Decide what to do with ``sql`` (one simple-Query text or one Parse text).
        ``sensitive``: :func:`plain_kind` already found a sensitive name (skip the fast path,
        which would find it again)."""
        t0 = time.perf_counter()
        cv = self._views.get(view)
        if not sensitive:
            fast = fast_path(sql, cv, t0)
            if fast is not None:
                return fast
        if (len(sql) > MAX_STATEMENT_CHARS and not view.unrestricted
                and cv.sensitive(sql.lower())):
            # Refused before lexing: analysing a megabyte on the event loop is a denial of
            # service of its own. The whole text is one denial (nothing of it runs).
            deny = _deny(_text_kind(sql), f"statement too large to analyse ({len(sql)} "
                         "characters; the limit for statements on customer data is "
                         f"{MAX_STATEMENT_CHARS})", sql,
                         [t.name for t in cv.mentioned_tables(sql.lower())],
                         view.limits.max_rows)
            return Analysis(sql, (deny,), rewrite_seconds=time.perf_counter() - t0)
        cached = self._cache.lookup(sql, cv, lex, t0)
        if isinstance(cached, Analysis):
            return cached
        ctx = _Ctx(cv, lex, dict(prepared or {}), dict(cursors or {}))
        if cached is not None:
            analysis = self._cache.fill(cached, sql, lambda text: full_analysis(text, ctx))
        else:
            analysis = full_analysis(sql, ctx)
        return replace(analysis, rewrite_seconds=time.perf_counter() - t0)

    def plain_memoizable(self, view: OperatorView) -> bool:
        """May ``plain_kind`` answers for ``view`` be memoised by digit-zeroed text?"""
        return self._views.get(view).plain_memo is not None

    def plain_kind(self, sql: str, view: OperatorView) -> str | None:
        """See :func:`plain_kind` (module level), memoised per view by the text with its
        digits zeroed: ``aid = 12345`` and ``aid = 67890`` get one answer. That is the same
        answer for every text of a key: the names and tokens it looks for hold no digit
        (else there is no memo), and a digit for a digit keeps every identifier boundary."""
        cv = self._views.get(view)
        memo = cv.plain_memo
        if memo is None:
            return plain_kind(sql, cv)
        key = sql.translate(_ZERO_DIGITS)
        kind = memo.get(key, _UNKNOWN)
        if kind is _UNKNOWN:
            kind = plain_kind(sql, cv)
            if len(memo) >= PLAIN_MEMO_SIZE:
                memo.clear()
            memo[key] = kind
        return kind  # type: ignore[return-value]

    def analyze_uncached(
        self,
        sql: str,
        view: OperatorView,
        lex: LexSettings = LexSettings(),  # noqa: B008
        *,
        prepared: dict[str, StatementDecision] | None = None,
        cursors: dict[str, StatementDecision] | None = None,
    ) -> Analysis:
        """Full analysis without the fast path or the shape cache (tests, ``pgveil explain``)."""
        cv = self._views.get(view)
        return full_analysis(sql, _Ctx(cv, lex, dict(prepared or {}), dict(cursors or {})))


# --- fast path -------------------------------------------------------------------------------


_FORWARD_FIELDS = dict(StatementDecision(Action.FORWARD, "", "other").__dict__)
_ANALYSIS_FIELDS = dict(Analysis("", ()).__dict__)


def fast_path(sql: str, cv: CompiledView, started: float | None = None) -> Analysis | None:
    """All-FORWARD analysis without parsing, or None when the text needs a closer look.

    The text is forwarded untouched when, lower-cased, it contains no protected table name, no
    catalog-dependent name and no risky token (``CompiledView.sensitive``), and every
    statement's leading keyword is a plain query, DML, transaction, SET or harmless utility (no
    DDL, COPY, EXPLAIN, PREPARE/EXECUTE, DECLARE/FETCH, ``SELECT ... INTO``). The name test is
    textual, so it does not depend on how strings or comments lex. ``started`` (a
    ``perf_counter`` value) sets ``rewrite_seconds``.
    """
    lowered = sql.lower()
    if cv.sensitive(lowered):
        return None
    body = sql.rstrip()
    if body.endswith(";"):
        body = body.rstrip(";").rstrip()
    if ";" not in body:
        kind = _single_plain_kind(sql, lowered)
        if kind is None:
            return None
        text = body if len(body) < len(sql.rstrip()) else sql
        # Built like shape.fast_copy, inlined: this is the pgbench hot path.
        fields = _FORWARD_FIELDS.copy()
        fields["sql"] = text
        fields["kind"] = kind
        decision = object.__new__(StatementDecision)
        object.__setattr__(decision, "__dict__", fields)
        fields = _ANALYSIS_FIELDS.copy()
        fields["sql"] = sql
        fields["statements"] = (decision,)
        fields["rewrite_seconds"] = time.perf_counter() - started if started is not None else 0.0
        analysis = object.__new__(Analysis)
        object.__setattr__(analysis, "__dict__", fields)
        return analysis
    tokens = tokenize(sql)
    if any(t.kind is Tok.ERROR for t in tokens):
        return None
    decisions = []
    for span in split_statements(sql, tokens):
        text = sql[span.start : span.end]
        sig = significant(tokenize(text))
        kind = leading_kind(sig)
        if kind not in FAST_KINDS or (sig and sig[0].keyword in ("prepare", "truncate",
                                                                 "deallocate")):
            return None
        if kind == "select" and _INTO_RE.search(text.lower()):
            return None
        decisions.append(StatementDecision(Action.FORWARD, text, kind))
    took = time.perf_counter() - started if started is not None else 0.0
    return Analysis(sql, tuple(decisions), rewrite_seconds=took)


def _single_plain_kind(sql: str, lowered: str) -> str | None:
    """The kind of a single statement (no ``;`` inside) that the fast path forwards unparsed,
    or None: its leading keyword must be a plain query, DML, transaction, SET or harmless
    utility (no WITH, PREPARE, TRUNCATE, DDL, COPY, ...) and a SELECT must not be
    ``SELECT ... INTO``. The caller has already found no sensitive name or token."""
    m = _LEAD_RE.match(sql)
    if m is None:
        return None
    kw = m.group(1).lower()
    if kw == "with" or kw == "prepare" or kw == "truncate" or kw == "deallocate":
        # TRUNCATE ... CASCADE reaches tables it does not name; PREPARE / DEALLOCATE change
        # which decision an EXECUTE inherits (the session settles them on the server's answer)
        return None
    kind = KEYWORD_KIND.get(kw, "other")
    if kind not in FAST_KINDS:
        return None
    if kind == "select" and "into" in lowered and _INTO_RE.search(lowered):
        return None
    return kind


def plain_kind(sql: str, cv: CompiledView) -> str | None:
    """The statement kind when ``sql`` is one statement that :func:`fast_path` forwards
    untouched, else ``""`` when it mentions a sensitive name or token (``fast_path`` cannot
    forward it either: call :meth:`Analyzer.analyze` with ``sensitive=True``), else None
    (call :meth:`Analyzer.analyze`).

    The proxy's hot path for pass-through traffic: same answer as ``fast_path`` returning a
    single FORWARD decision, without building the Analysis objects.
    """
    lowered = sql.lower()
    if cv.sensitive(lowered):
        return ""
    semi = sql.find(";")
    if semi >= 0 and sql[semi:].strip(" \t\n\r\f\v;"):
        return None  # several statements (or text after the ``;``): the general path
    return _single_plain_kind(sql, lowered)


# --- full analysis ---------------------------------------------------------------------------


def full_analysis(sql: str, ctx: _Ctx) -> Analysis:
    """Split ``sql`` and decide each statement; later statements see earlier PREPARE/DECLARE."""
    tokens = tokenize(sql, ctx.lex.standard_conforming_strings)
    spans = split_statements(sql, tokens)
    decisions: list[StatementDecision] = []
    out: list[str] = []
    pos = 0
    starts = [t.start for t in tokens]
    several = len(spans) > 1
    loud: list[bool] = []  # per statement: may it change or commit data (_lone_capped_runs)
    for span in spans:
        text = sql[span.start : span.end]
        own = _slice_tokens(tokens, starts, span.start, span.end)
        d = decide_statement(text, ctx, own)
        if several:
            loud.append(_loud(d, own))
        if several and d.kind == "select" and d.action is not Action.DENY:
            d = cap_inside(d, ctx)
        if d.kind == "prepare" and d.prepared and d.action is not Action.DENY:
            ctx.prepared[d.prepared] = d
        if d.kind == "declare" and d.cursor and d.action is not Action.DENY:
            ctx.cursors[d.cursor] = d
        decisions.append(d)
        out.append(sql[pos : span.start])
        out.append(d.sql if d.action is Action.REWRITE else text)
        pos = span.end
    out.append(sql[pos:])
    if several and ctx.restricted:
        decisions = _lone_capped_runs(decisions, loud)
        if any(d.action is Action.DENY for d in decisions):
            return Analysis(sql, tuple(decisions))
    return Analysis("".join(out), tuple(decisions))


# statements that may share a request with an EXECUTE or FETCH max_rows stops on the wire:
# none of them changes data (a read is wrapped by cap_inside and fails inside PostgreSQL)
_QUIET_COMPANIONS = frozenset({"prepare", "declare", "transaction", "set", "select", "fetch"})
_QUIET_UTILITY = frozenset({"close", "deallocate"})
# words that make a quiet kind loud: a SELECT with a data-modifying WITH, a COMMIT (it would
# keep what the transaction wrote while the client, told the request failed, believes it gone)
_LOUD_WORDS = {"select": frozenset({"insert", "update", "delete", "merge"}),
               "transaction": frozenset({"commit", "end", "prepare"})}


def _loud(d: StatementDecision, tokens: list[Token]) -> bool:
    words = _LOUD_WORDS.get(d.kind)
    return words is not None and any(t.keyword in words for t in tokens)


def _lead_word(sql: str) -> str:
    m = _LEAD_RE.match(sql)
    return m.group(1).lower() if m is not None else ""


def _quiet(d: StatementDecision, loud: bool) -> bool:
    if d.kind in _QUIET_COMPANIONS:
        return not loud
    return d.kind == "utility" and _lead_word(d.sql) in _QUIET_UTILITY


def _lone_capped_runs(decisions: list[StatementDecision],
                      loud: list[bool]) -> list[StatementDecision]:
    """Refuse an EXECUTE or FETCH of protected rows that shares its request with a statement
    that changes data or commits: max_rows stops it on the wire (its text cannot be wrapped),
    when PostgreSQL has already run -- and will commit -- the rest of the request."""
    out = list(decisions)
    for i, d in enumerate(decisions):
        if d.kind not in ("execute", "fetch") or not d.tables or d.row_limit is None or \
                d.action is Action.DENY:
            continue
        # a COMMIT ends a transaction this request began (so one that wrote nothing: every
        # other statement here is quiet) -- BEGIN; DECLARE; FETCH; CLOSE; COMMIT stays allowed
        began = any(o.kind == "transaction" and _lead_word(o.sql) in ("begin", "start")
                    for o in decisions[:i])
        other = next((o for j, o in enumerate(decisions)
                      if j != i and not _quiet(o, loud[j] and not (
                          began and j > i and o.kind == "transaction"))), None)
        if other is not None:
            what = "EXECUTE" if d.kind == "execute" else "FETCH"
            out[i] = replace(d, action=Action.DENY, message=(
                f"{what} of protected rows must be sent on its own, not with {other.kind} "
                "statements in one query: max_rows stops it as its rows arrive, after "
                "PostgreSQL has run the rest"), reasons=(*d.reasons, "capped run with writes"))
    return out


def _deny(kind: str, message: str, text: str, tables: list[str] | None = None,
          row_limit: int | None = None, **kw: object) -> StatementDecision:
    return StatementDecision(Action.DENY, text, kind, tables=tuple(tables or ()),
                             message=message, reasons=(message,), row_limit=row_limit,
                             **kw)  # type: ignore[arg-type]


def _sqlglot_parameters(text: str, tokens: list[Token]) -> str:
    """``text`` with each parameter ``$n`` written ``@n``, for sqlglot only: it reads ``$1,$2``
    (pgJDBC's ``IN (?,?)``) as the start of a string dollar-quoted with the tag ``1,`` (in
    PostgreSQL a tag cannot start with a digit) and gives up. ``@n`` is the same Parameter
    node to sqlglot, rendered back as ``$n``, at the same offsets."""
    out: list[str] = []
    pos = 0
    for t in tokens:
        if t.kind is Tok.PARAM:
            out.append(text[pos:t.start])
            out.append("@" + t.text[1:])
            pos = t.end
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def _slice_tokens(tokens: list[Token], starts: list[int], start: int, end: int
                  ) -> list[Token]:
    """The tokens of ``sql[start:end]`` (a statement span: it starts and ends on token
    boundaries), with offsets relative to ``start`` — the text is tokenized once, not once
    per pass. ``starts`` are the tokens' start offsets (for the binary search)."""
    lo = bisect.bisect_left(starts, start)
    hi = bisect.bisect_left(starts, end, lo)
    if start == 0:
        return tokens[lo:hi]
    return [Token(t.kind, t.start - start, t.end - start, t.text) for t in tokens[lo:hi]]


def _text_kind(text: str) -> str:
    """The kind by the leading keyword alone (for denials made before lexing)."""
    m = _LEAD_RE.match(text)
    return KEYWORD_KIND.get(m.group(1).lower(), "other") if m else "other"


def decide_statement(text: str, ctx: _Ctx, tokens: list[Token] | None = None
                     ) -> StatementDecision:
    """One statement -> its decision (verification of the final text included).

    An unexpected exception (a bug of ours) denies the statement for a restricted role — it is
    never forwarded unexamined — and forwards an unrestricted role's statement unchanged, as
    it would have been anyway.
    """
    try:
        return _decide(text, ctx, tokens)
    except Exception as e:  # noqa: BLE001 - see the docstring: fail closed, never fail open
        log.exception("analysis of a statement failed")
        kind = _text_kind(text)
        mentioned = [t.name for t in ctx.cv.mentioned_tables(text.lower())]
        if ctx.restricted:
            return _deny(kind, f"cannot analyse statement: internal error ({type(e).__name__})",
                         text, mentioned, _row_limit(ctx, mentioned))
        return StatementDecision(Action.FORWARD, text, kind, tables=tuple(mentioned),
                                 row_limit=_row_limit(ctx, mentioned))


def _decide(text: str, ctx: _Ctx, tokens: list[Token] | None) -> StatementDecision:
    cv = ctx.cv
    m = _mentions(cv, text)
    mentioned = [t.name for t in m.tables]
    restricted = ctx.restricted
    if restricted and m.sensitive and len(text) > MAX_STATEMENT_CHARS:
        return _deny(_text_kind(text),
                     f"statement too large to analyse ({len(text)} characters; the limit for "
                     f"statements on customer data is {MAX_STATEMENT_CHARS})", text, mentioned)
    if tokens is None:
        tokens = tokenize(text, ctx.lex.standard_conforming_strings)
    sig = significant(tokens)
    lead = leading_kind(sig)
    if restricted and m.sensitive:
        for t in m.tables:
            if t.view.refused is not None:
                return _deny(lead, t.view.refused, text, mentioned)
        guard = _lexical_guard(text, tokens, m, ctx)
        if guard is not None:
            return _deny(lead, guard, text, mentioned)
    if any(t.kind is Tok.ERROR for t in tokens):
        if restricted and m.sensitive:
            return _deny(lead, f"cannot analyse statement that references {m.names}: "
                         "unterminated literal, identifier or comment", text, mentioned)
        return StatementDecision(Action.FORWARD, text, lead, tables=tuple(mentioned))
    try:
        core = analyse_core(text, ctx, m, tokens=tokens)
    except Denied as e:
        return _deny(e.kind or lead, str(e), text, mentioned, _row_limit(ctx, mentioned),
                     prepared=e.prepared, cursor=e.cursor)
    if core.deny is not None:
        tables = list(dict.fromkeys(core.tables + mentioned))
        return _deny(core.kind, core.deny, text, tables, _row_limit(ctx, tables),
                     prepared=core.prepared, cursor=core.cursor)
    final = core.sql if core.sql is not None else text
    verdict: Verdict | None = None
    if (restricted and (m.sensitive or core.sql is not None)) or (not restricted and m.sensitive):
        try:
            verdict = verify(final, cv, generated=core.generated, allowed=core.allowed,
                             aliases=core.aliases, restricted=restricted)
        except PgParseError as e:
            if restricted:
                return _deny(core.kind, f"cannot analyse statement that references {m.names}: "
                             f"{e}", text, mentioned, _row_limit(ctx, mentioned))
        if verdict is not None and verdict.violations:
            tables = list(dict.fromkeys(core.tables + verdict.tables + mentioned))
            return _deny(core.kind, verdict.violations[0], text, tables,
                         _row_limit(ctx, tables), prepared=core.prepared, cursor=core.cursor)
    if core.inherited is not None:
        base = core.inherited
        return replace(base, action=Action.FORWARD, sql=text, kind=core.kind,
                       prepared=core.prepared or base.prepared,
                       cursor=core.cursor or base.cursor, message="")
    tables = list(core.tables)
    columns = list(core.columns)
    if verdict is not None:
        tables += verdict.tables
        columns += verdict.columns
    elif not restricted:
        tables += mentioned
    tables = list(dict.fromkeys(tables))
    for qn in core.lookups:
        if qn not in columns:
            columns.append(qn)
    columns = list(dict.fromkeys(columns))
    reasons = _reasons(ctx, core, columns)
    row_limit = _row_limit(ctx, tables)
    weight = max(1, core.repeats) + (verdict.extra_carriers if verdict is not None else 0)
    if weight > 1 and row_limit:
        # one row carries ``weight`` customers (a self-join, lag(phone, k), pivots): the cap
        # and the quota count customers, not rows
        if row_limit < weight:
            return _deny(core.kind, f"each row of this statement can carry {weight} rows of "
                         f"customer data (self-joins, window functions, pivots): more than "
                         f"max_rows ({row_limit}) for role {ctx.view.role}", text, tables,
                         row_limit, prepared=core.prepared, cursor=core.cursor)
        reasons.append(f"row weight {weight}: max_rows {row_limit} allows {row_limit // weight} "
                       "rows")
        row_limit //= weight
    action = Action.REWRITE if core.sql is not None and core.sql != text else Action.FORWARD
    decision = StatementDecision(
        action,
        final if action is Action.REWRITE else text,
        core.kind,
        tables=tuple(tables),
        columns=tuple(columns),
        reasons=tuple(reasons),
        row_limit=row_limit,
        row_weight=weight,
        cursor=core.cursor,
        prepared=core.prepared,
        lookups=tuple(core.lookups),
        lookup_values=core.lookup_values,
        copy_out=core.copy_out,
        copy_in=core.copy_in,
        checks=tuple(core.checks),
    )
    if core.mask_returning is not None and core.kind in _TAGS:
        try:
            decision = masked_returning(decision, core.mask_returning, ctx)
        except Denied as e:
            return _deny(core.kind, str(e), text, list(decision.tables), decision.row_limit)
    elif core.kind in _TAGS and _returns_rows(sig):
        decision = cap_inside(decision, ctx)
    elif core.kind == "prepare" and decision.tables and ctx.restricted and \
            decision.row_limit is not None:
        # PREPARE q AS UPDATE ... RETURNING: what EXECUTE q runs is wrapped the same way
        start = prepare_prefix(sig)
        inner = [t for t in sig if start is not None and t.start >= start]
        kind = leading_kind(inner)
        if start is not None and kind in _TAGS and _returns_rows(inner):
            message = _cap_message(decision.row_limit, ctx.view.role, decision.tables)
            wrapped = _capped_sql(decision.sql[start:], kind, decision.row_limit, message)
            decision = replace(decision, action=Action.REWRITE,
                               sql=decision.sql[:start] + wrapped,
                               command_tag=_TAGS[kind],
                               reasons=(*decision.reasons, ROW_LIMIT_CHECK_REASON),
                               checks=(*decision.checks, message))
    return decision


# the command tag of each data change cap_inside wraps into a SELECT
_TAGS = {"insert": "INSERT 0", "update": "UPDATE", "delete": "DELETE"}


def _returns_rows(sig: list[Token]) -> bool:
    """A top-level RETURNING clause (not one inside parentheses)."""
    return _returning_at(sig) is not None


def masked_returning(d: StatementDecision, target: tuple[CompiledTable, str],
                     ctx: _Ctx) -> StatementDecision:
    """A data change whose RETURNING reads masked columns, run so that RETURNING sees the
    masked row::

        WITH "pgveil_dml" AS (<the change> RETURNING <target>.*),
             "pgveil_rows" AS (SELECT <the client's RETURNING list>
                               FROM (SELECT <masked projection> FROM "pgveil_dml") AS <target>)
        SELECT * FROM "pgveil_rows" WHERE <one row per changed row> [AND <at most max_rows>]

    (a data-modifying WITH must stay at the top level). Moved out of the change, the list
    must mean what it meant there: not with a WITH of the change's own (its names would then
    reach the real tables: ``WITH accounts AS (...) UPDATE ... RETURNING (SELECT card_no FROM
    accounts)``), not with names of pgveil's, and one row per changed row (an aggregate or a
    set-returning function, which PostgreSQL refuses in RETURNING, would run here). The
    session writes the command tag back."""
    ct, ref_name = target
    sig = significant(tokenize(d.sql, ctx.lex.standard_conforming_strings))
    if sig and sig[-1].kind is Tok.PUNCT and sig[-1].text == ";":
        sig = sig[:-1]
    at = _returning_at(sig)
    if at is None or at is sig[-1]:
        raise Denied(f"cannot rewrite the RETURNING clause of this statement on {ct.name}")
    if sig[0].keyword == "with":
        raise Denied(f"RETURNING of masked columns of {ct.name} is not supported in a data "
                     "change with a WITH clause of its own")
    for t in sig[sig.index(at) + 1:]:
        name = fold(t.text) if t.kind is Tok.IDENT else \
            t.text[1:-1].replace('""', '"') if t.kind is Tok.QIDENT else ""
        if name.startswith(PROXY_STATEMENT_PREFIX) or t.kind is Tok.UIDENT:
            # moved next to "pgveil_dml" (the raw rows), such a name would read them
            raise Denied(f"names beginning with pgveil_ are pgveil's own; RETURNING of "
                         f"{ct.name} may not use them")
    alias = quote_ident(ref_name)
    body = f"{d.sql[:at.start]}RETURNING {alias}.*"
    listing = d.sql[at.end:sig[-1].end].strip()
    rows = f'SELECT {listing} FROM (SELECT {ct.projection} FROM "pgveil_dml") AS {alias}'
    one_each = (f"RETURNING of {ct.name} must give one row per changed row (no aggregates or "
                "set-returning functions)")
    guards = [_count_guard('OPERATOR(pg_catalog.=) (SELECT pg_catalog.count(*) FROM '
                           '"pgveil_dml")', one_each)]
    reasons = (*d.reasons, f"RETURNING over the masked row of {ct.name}")
    checks = (*d.checks, one_each)
    limit = d.row_limit
    if limit is not None:
        message = _cap_message(limit, ctx.view.role, d.tables)
        guards.append(_count_guard(f"OPERATOR(pg_catalog.<=) {int(limit)}", message))
        reasons = (*reasons, ROW_LIMIT_CHECK_REASON)
        checks = (*checks, message)
    sql = (f'WITH "pgveil_dml" AS (\n{body}\n), "pgveil_rows" AS (\n{rows}\n) SELECT * FROM '
           f'"pgveil_rows" WHERE {" AND ".join(guards)}')
    return replace(d, action=Action.REWRITE, sql=sql, command_tag=_TAGS[d.kind],
                   reasons=reasons, checks=checks)


def _returning_at(sig: list[Token]) -> Token | None:
    """The top-level RETURNING keyword (not one inside parentheses, nor a column label: the
    word is reserved, so as a label it follows AS: ``SELECT card_no AS returning``)."""
    depth = 0
    before: Token | None = None
    for t in sig:
        if t.kind is Tok.PUNCT:
            if t.text == "(":
                depth += 1
            elif t.text == ")":
                depth -= 1
        elif depth == 0 and t.keyword == "returning" and (
                before is None or before.keyword != "as"):
            return t
        before = t
    return None


def cap_inside(d: StatementDecision, ctx: _Ctx) -> StatementDecision:
    """``d`` wrapped so that PostgreSQL fails it when it returns more than max_rows rows.

    pgveil stops an over-long result on the wire, which withholds the rows but not what the
    statement did: a data change with RETURNING is committed all the same, and in a request of
    several statements PostgreSQL runs the rest and commits them (the client, told of an
    error, believes none of it happened; the rest would not even be audited). Inside
    PostgreSQL the limit is an error like any other: the statement, its transaction and the
    rest of the request fail as PostgreSQL's own rules say. Only for those cases: a single
    read keeps the cheaper check on the wire (its rows are all it does). The rows are counted
    before the first is returned (a MATERIALIZED CTE and one count), so none is sent."""
    limit = d.row_limit
    if not ctx.restricted or limit is None or not d.tables or d.cursor or d.prepared or \
            d.action is Action.DENY or d.kind not in ("select", *_TAGS):
        return d
    message = _cap_message(limit, ctx.view.role, d.tables)
    sql = _capped_sql(d.sql, d.kind, limit, message)
    return replace(d, action=Action.REWRITE, sql=sql, command_tag=_TAGS.get(d.kind),
                   reasons=(*d.reasons, ROW_LIMIT_CHECK_REASON), checks=(*d.checks, message))


def _cap_message(limit: int, role: str, tables: tuple[str, ...]) -> str:
    return (f"row limit of {limit} exceeded for role {role}: the statement returned more than "
            f"{limit} rows of {', '.join(tables)}, so PostgreSQL stopped it and nothing it did "
            "was kept")


def _capped_sql(body: str, kind: str, limit: int, message: str) -> str:
    """``body`` (a statement of ``kind``) wrapped as :func:`cap_inside` describes."""
    materialized = "MATERIALIZED " if kind == "select" else ""
    return (f'WITH "pgveil_rows" AS {materialized}(\n{body.rstrip()}\n) SELECT * FROM '
            f'"pgveil_rows" WHERE {_count_guard(f"OPERATOR(pg_catalog.<=) {int(limit)}", message)}')


def _count_guard(test: str, message: str) -> str:
    """A condition on the number of rows of "pgveil_rows" (``count(*) <test>``) that fails the
    whole statement inside PostgreSQL with ``message`` when it does not hold."""
    return (f'(SELECT CASE WHEN pg_catalog.count(*) {test} THEN true ELSE '
            f'{failing(message, "boolean")} END FROM "pgveil_rows")')


def _row_limit(ctx: _Ctx, tables: list[str]) -> int | None:
    return ctx.view.limits.max_rows if tables else None


def _reasons(ctx: _Ctx, core: Core, columns: list[str]) -> list[str]:
    reasons = list(core.reasons)
    substituted = set(core.aliases.values())
    for qn in columns:
        table, _, col = qn.rpartition(".")
        ct = ctx.cv.tables.get(table)
        if ct is None or table not in substituted:
            continue
        cview = ct.colview.get(col)
        if cview is not None and cview.expr is not None:
            r = f"mask {qn}: {cview.mask_name or 'masked'}"
            if r not in reasons:
                reasons.append(r)
    for table in dict.fromkeys(core.aliases.values()):
        ct = ctx.cv.tables.get(table)
        if ct is not None and ct.row_filter is not None:
            r = f"row filter {ctx.view.role}: {table}"
            if r not in reasons:
                reasons.append(r)
    for qn in core.lookups:
        r = f"lookup {qn}"
        if r not in reasons:
            reasons.append(r)
    return reasons


def _refused_since(base: StatementDecision, ctx: _Ctx) -> None:
    """A cursor or prepared statement decided under an earlier view reads a table the current
    view refuses (the login left the policy, a masked column left the table): so does it."""
    for name in base.tables:
        ct = ctx.cv.tables.get(name)
        if ct is not None and ct.view.refused is not None:
            raise Denied(ct.view.refused)


def _lexical_guard(text: str, tokens: list, m: _Mentions, ctx: _Ctx) -> str | None:
    """Refuse what PostgreSQL may read differently from us (restricted roles, sensitive text)."""
    if not ctx.lex.standard_conforming_strings and "\\" in text:
        return (f"cannot analyse statement that references {m.names}: backslashes with "
                "standard_conforming_strings off")
    if ctx.lex.unsettled and "\\" in text:
        # An earlier statement still in flight may have turned standard_conforming_strings off
        # or switched to a client encoding whose multibyte characters swallow a backslash
        # (GBK 0xAD 0x5C): only a backslash can make such text lex differently.
        return (f"cannot analyse statement that references {m.names}: backslashes in a "
                "statement sent before the server answered the previous one (it may change "
                "standard_conforming_strings or client_encoding)")
    if normalized_encoding(ctx.lex.client_encoding) in UNSAFE_ENCODINGS and not text.isascii():
        return (f"cannot analyse statement that references {m.names}: non-ASCII text in client "
                f"encoding {ctx.lex.client_encoding}")
    if (m.tables or m.dependents) and any(t.kind in (Tok.UIDENT, Tok.USTRING) for t in tokens):
        return (f"cannot analyse statement that references {m.names}: unicode escapes (U&) "
                "are not allowed for masked roles")
    return None


def analyse_core(
    text: str, ctx: _Ctx, m: _Mentions | None = None, *, explain: bool = False,
    tokens: list[Token] | None = None,
) -> Core:
    """Dispatch one statement (or the inner statement of a wrapper) on its kind."""
    if m is None:
        m = _mentions(ctx.cv, text)
    if tokens is None:
        tokens = tokenize(text, ctx.lex.standard_conforming_strings)
    sig = significant(tokens)
    lead = leading_kind(sig)
    try:
        pst: PgStatement | None = pg_statement(text)
    except PgParseError as e:
        if ctx.restricted and m.sensitive:
            raise Denied(f"cannot analyse statement that references {m.names}: {e}") from None
        if ctx.restricted and isinstance(e, PgTooComplex):
            # PostgreSQL may well run it (a DO block, say): unread, it is not forwarded
            raise Denied(f"cannot analyse statement: {e}") from None
        return Core(lead)
    try:
        return _dispatch(text, sig, tokens, pst, ctx, m, explain)
    except Denied as e:
        e.kind = pst.kind  # the outermost statement's kind wins (EXPLAIN of an UPDATE)
        if pst.node_type in ("PrepareStmt", "ExecuteStmt"):
            e.prepared = str(pst.node.get("name", "")) or None
        elif pst.node_type in ("DeclareCursorStmt", "FetchStmt"):
            e.cursor = str(pst.node.get("portalname", "")) or None
        raise


def _dispatch(text: str, sig: list, tokens: list, pst: PgStatement, ctx: _Ctx, m: _Mentions,
              explain: bool) -> Core:
    kind = pst.kind
    restricted = ctx.restricted
    if kind == "ddl":
        return _ddl(text, pst, ctx, m)
    if kind == "copy":
        return _copy(text, sig, pst, ctx, m)
    if kind == "explain":
        return _explain(text, sig, pst, ctx, m)
    if pst.node_type in ("PrepareStmt", "DeallocateStmt") and \
            str(pst.node.get("name", "")).startswith(PROXY_STATEMENT_PREFIX):
        # pgveil's own statements (upstream.prepare_rewritten) run by its hot path: one the
        # client dropped and prepared again would run the client's text in their place
        raise Denied(f"prepared statement names beginning with {PROXY_STATEMENT_PREFIX} "
                     "belong to pgveil")
    if restricted and ctx.cv.fk_parents:
        _fk_parent_write(pst, ctx)
    if kind == "prepare":
        start = prepare_prefix(sig)
        name = str(pst.node.get("name", ""))
        if start is None:
            if restricted and m.sensitive:
                raise Denied(f"cannot analyse PREPARE that references {m.names}")
            return Core("prepare", prepared=name)
        inner = analyse_core(text[start:], ctx, explain=explain)
        if inner.mask_returning is not None:
            raise Denied("PREPARE of a data change whose RETURNING reads masked columns is not "
                         "supported (send it directly, or with the protocol's Parse)")
        out = inner.shifted(text, start, len(text))
        out.kind = "prepare"
        out.prepared = name
        out.inherited = None
        if inner.inherited is not None:
            raise Denied("PREPARE of EXECUTE/FETCH is not supported")
        return out
    if kind == "declare":
        start = declare_prefix(sig)
        name = str(pst.node.get("portalname", ""))
        if start is None:
            if restricted and m.sensitive:
                raise Denied(f"cannot analyse DECLARE that references {m.names}")
            return Core("declare", cursor=name)
        inner = analyse_core(text[start:], ctx, explain=explain)
        out = inner.shifted(text, start, len(text))
        out.kind = "declare"
        out.cursor = name
        return out
    if kind == "execute":
        name = str(pst.node.get("name", ""))
        base = ctx.prepared.get(name)
        if base is None and name.startswith(PROXY_STATEMENT_PREFIX):
            # pgveil's own statements (proxy.session, upstream.prepare_rewritten) are rewritten
            # texts: run by name they would skip the row cap and the audit record
            raise Denied(f"prepared statement {name} belongs to pgveil; clients cannot "
                         "execute it")
        if base is None and ctx.restricted:
            # what it runs is unknown, so it could be read past the row cap and the audit
            # record; PostgreSQL would most likely answer "does not exist" anyway
            raise Denied(f"EXECUTE of prepared statement {name}, which pgveil did not see "
                         "prepared in this session, is not allowed for masked roles")
        core = Core("execute", prepared=name)
        if base is not None:
            if base.action is Action.DENY:
                raise Denied(base.message or f"prepared statement {name} was denied")
            _refused_since(base, ctx)
            core.inherited = base
            core.tables = list(base.tables)
        return core
    if kind == "fetch":
        name = str(pst.node.get("portalname", ""))
        base = ctx.cursors.get(name)
        core = Core("fetch", cursor=name)
        if base is not None:
            if base.action is Action.DENY:
                raise Denied(base.message or f"cursor {name} was denied")
            _refused_since(base, ctx)
            core.inherited = base
            core.tables = list(base.tables)
        return core
    if pst.node_type == "TruncateStmt" and restricted and pst.node.get("behavior") == \
            "DROP_CASCADE":
        raise Denied("TRUNCATE ... CASCADE is not allowed for masked roles: it empties the "
                     "tables that reference these, customer tables included")
    if kind in ("select", "insert", "update", "delete", "merge") and pst.node_type != \
            "TruncateStmt":
        if not restricted:
            return Core(kind)
        _current_of(pst, ctx)
        return _query(text, tokens, ctx, m, kind, explain)
    if kind == "set" and restricted and str(pst.node.get("name", "")).lower() in (
        "role", "session_authorization"
    ):
        raise Denied("role switching would escape the policy")
    return Core(kind)


_WRITES = ("DeleteStmt", "UpdateStmt", "MergeStmt", "InsertStmt")


def _fk_parent_write(pst: PgStatement, ctx: _Ctx) -> None:
    """Refuse a DELETE of, or a key change in, an unprotected table that a row-filtered
    protected table references (CompiledView.fk_parents): PostgreSQL answers it with a
    foreign-key error exactly when a row references the key, rows outside the filter included
    (``DELETE FROM branches WHERE id = 'BJ01'`` tells a teller of SZ01 whether BJ01 has
    customers). Found anywhere in the statement: WITH, PREPARE, EXPLAIN."""
    stack: list[Any] = [{pst.node_type: pst.node}]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            if key in _WRITES and isinstance(value, dict):
                hit = _parent_written(key, value, ctx.cv.fk_parents)
                if hit is not None:
                    verb, parent = hit
                    raise Denied(
                        f"{verb} on {parent.name} is not allowed for role {ctx.view.role}: "
                        f"{', '.join(parent.children)} "
                        f"{'references' if len(parent.children) == 1 else 'reference'} it, and "
                        "the foreign-key error would tell whether rows outside the row filter do")
            if isinstance(value, (dict, list)):
                stack.append(value)


def _parent_written(key: str, node: dict[str, Any],
                    parents: dict[str, FkParent]) -> tuple[str, FkParent] | None:
    rel = node.get("relation")
    rel = rel.get("RangeVar", rel) if isinstance(rel, dict) else None
    if not isinstance(rel, dict):
        return None
    parent = parents.get(str(rel.get("relname", "")))
    if parent is None or rel.get("schemaname") not in (None, parent.name.partition(".")[0]):
        return None

    def sets_key(targets: Any) -> bool:
        return any(isinstance(t, dict) and t.get("ResTarget", {}).get("name") in parent.columns
                   for t in targets or ())

    if key == "DeleteStmt":
        return "DELETE", parent
    if key == "UpdateStmt" and sets_key(node.get("targetList")):
        return "UPDATE of the key", parent
    if key == "InsertStmt":
        conflict = (node.get("onConflictClause") or {}).get("OnConflictClause", node.get(
            "onConflictClause") or {})
        if isinstance(conflict, dict) and sets_key(conflict.get("targetList")):
            return "INSERT ... ON CONFLICT DO UPDATE of the key", parent
        return None
    if key == "MergeStmt":
        for clause in node.get("mergeWhenClauses") or ():
            when = clause.get("MergeWhenClause", {}) if isinstance(clause, dict) else {}
            if when.get("commandType") == "CMD_DELETE" or (
                    when.get("commandType") == "CMD_UPDATE" and sets_key(when.get("targetList"))):
                return "MERGE", parent
    return None


def _current_of(pst: PgStatement, ctx: _Ctx) -> None:
    """``UPDATE/DELETE ... WHERE CURRENT OF c`` on a protected table: denied. On a masked
    one the row filter cannot be added to it, and the cursor itself reads the masked derived
    table (PostgreSQL would call it not updatable anyway); on one the role sees whole, the
    checks of its writes (foreign keys into hidden rows, caps) need a statement sqlglot reads,
    and it reads no ``CURRENT OF``: say so rather than fail on a parse error."""
    where = pst.node.get("whereClause")
    if not (isinstance(where, dict) and "CurrentOfExpr" in where):
        return
    rel = pst.node.get("relation")
    if not isinstance(rel, dict):
        return
    ct = ctx.cv.resolve(rel.get("schemaname") or None, str(rel.get("relname", "")))
    if ct is None:
        return
    verb = "UPDATE" if pst.node_type == "UpdateStmt" else "DELETE"
    if ct.masked:
        raise Denied(f"{verb} ... WHERE CURRENT OF on {ct.name} is not supported for masked "
                     "roles")
    raise Denied(f"{verb} ... WHERE CURRENT OF on {ct.name} is not supported for role "
                 f"{ctx.view.role}: name the row by its key instead (WHERE id = ...)")


def _ddl(text: str, pst: PgStatement, ctx: _Ctx, m: _Mentions) -> Core:
    view = ctx.view
    if not view.limits.ddl:
        raise Denied(f"DDL is not allowed for role {view.role}")
    if ctx.restricted and (m.tables or m.dependents):
        if pst.node_type in ("CreateTableAsStmt", "ViewStmt", "SelectStmt"):
            raise Denied(f"copying customer data ({m.names}) into a new table or view is not "
                         f"allowed for role {view.role}")
        raise Denied(f"DDL referencing protected data ({m.names}) is not allowed for role "
                     f"{view.role}")
    return Core("ddl", tables=[t.name for t in m.tables] if not ctx.restricted else [])


def _external_copy(node: dict) -> bool:
    return bool(node.get("is_program")) or node.get("filename") is not None


def _copy(text: str, sig: list, pst: PgStatement, ctx: _Ctx, m: _Mentions) -> Core:
    node = pst.node
    view = ctx.view
    is_from = bool(node.get("is_from"))
    if _external_copy(node) and not (view.limits.copy and view.unrestricted):
        raise Denied("COPY to or from a server file or program is not allowed")
    rel = node.get("relation")
    if is_from:
        core = Core("copy", copy_in=True)
        if isinstance(rel, dict):
            ct = ctx.cv.resolve(rel.get("schemaname"), str(rel.get("relname", "")))
            if ct is not None:
                core.tables = [ct.name]
                if ctx.restricted and ct.masked:
                    raise Denied(f"COPY into {ct.name} is not allowed for role {view.role} "
                                 "(row filter or masked columns)")
                keys = filtered_references(ct, ctx.cv) if ctx.restricted else []
                listed = _attnames(node)  # none: every column
                keys = [k for k in keys if not listed or k in listed]
                if keys:
                    # an INSERT's foreign keys are checked against the row filter of the table
                    # they point into; COPY data cannot be, so its errors would tell which
                    # hidden rows exist, and its rows could point at them
                    raise Denied(f"COPY into {ct.name} is not allowed for role {view.role}: "
                                 f"{ct.name}.{keys[0]} refers to rows this role cannot all see "
                                 "(send the rows as INSERT)")
        return core
    core = Core("copy", copy_out=True)
    if isinstance(rel, dict):
        ct = ctx.cv.resolve(rel.get("schemaname"), str(rel.get("relname", "")))
        if ct is None:
            return core
        core.tables = [ct.name]
        if not view.limits.copy:
            raise Denied(f"COPY of protected table {ct.name} is not allowed for role {view.role}")
        if ctx.restricted and ct.masked:
            span = copy_table_span(sig)
            if span is None:
                raise Denied(f"cannot analyse COPY of {ct.name}")
            name_start, name_end, region_end = span
            cols = [fold(str(a)) for a in _attnames(node)]
            select_list = ", ".join(quote_ident(c) for c in cols) if cols else "*"
            derived = ct.derived(text[name_start:name_end], [])
            head = f"(SELECT {select_list} FROM "
            repl = f"{head}{derived} AS {quote_ident(ct.bare)})"
            spliced = apply_edits(
                text, [Edit(name_start, region_end, repl, ((len(head), len(head) +
                                                              len(derived)),))])
            core.sql = spliced.sql
            core.generated = spliced.generated
            core.aliases = {ct.bare: ct.name}
        return core
    span = copy_query_span(sig)
    if span is None:
        if ctx.restricted and m.sensitive:
            raise Denied(f"cannot analyse COPY that references {m.names}")
        return core
    start, end = span
    inner_m = _mentions(ctx.cv, text[start:end])
    if (inner_m.tables or inner_m.dependents) and not view.limits.copy:
        raise Denied(f"COPY of protected data ({inner_m.names}) is not allowed for role "
                     f"{view.role}")
    inner = analyse_core(text[start:end], ctx, inner_m)
    if inner.mask_returning is not None:
        raise Denied("COPY of a data change whose RETURNING reads masked columns is not "
                     "supported")
    out = inner.shifted(text, start, end)
    out.kind = "copy"
    out.copy_out = True
    return out


def _attnames(node: dict) -> list[str]:
    out = []
    for a in node.get("attlist") or []:
        if isinstance(a, dict) and "String" in a:
            out.append(str(a["String"].get("sval", "")))
    return out


_EXPLAIN_WORD = re.compile(r"[A-Za-z0-9_]+\Z")


def _explain_options(pst: PgStatement) -> list[tuple[str, str | None]]:
    """EXPLAIN's options as (name, value) pairs, ``EXPLAIN VERBOSE`` spelled as an option."""
    out: list[tuple[str, str | None]] = []
    for opt in pst.node.get("options") or []:
        de = opt.get("DefElem") if isinstance(opt, dict) else None
        if not isinstance(de, dict):
            raise Denied("cannot read the options of this EXPLAIN")
        arg = de.get("arg")
        value: str | None = None
        if isinstance(arg, dict) and arg:
            node, inner = next(iter(arg.items()))
            inner = inner if isinstance(inner, dict) else {}
            if node == "Boolean":  # protobuf leaves a false boolean out
                value = "true" if inner.get("boolval") else "false"
            elif node == "Integer":
                value = str(inner.get("ival", 0))
            else:
                value = str(inner.get("sval", "")).lower()
        out.append((str(de.get("defname", "")).lower(), value))
    return out


def _costs_off_prefix(options: list[tuple[str, str | None]]) -> str:
    """``EXPLAIN (options, COSTS OFF)`` for a masked role: the row estimates come from
    statistics PostgreSQL gathered over every row of the table (every branch, raw values), and
    a probe value that lands on a histogram bound prints an exact round number -- a binary
    search on it reads raw values of hidden rows. Plan shapes stay (documented)."""
    kept = []
    for name, value in options:
        if name == "costs":
            continue
        if not _EXPLAIN_WORD.match(name) or (value is not None and not _EXPLAIN_WORD.match(value)):
            raise Denied(f"cannot rewrite EXPLAIN option {name!r} for a masked role")
        kept.append(name if value is None else f"{name} {value}")
    return "EXPLAIN (" + ", ".join([*kept, "COSTS OFF"]) + ") "


def _explain(text: str, sig: list, pst: PgStatement, ctx: _Ctx, m: _Mentions) -> Core:
    options = _explain_options(pst)
    analyze = any(name == "analyze" and value not in ("false", "off", "0", "no")
                  for name, value in options)
    tables = list(m.tables)
    query = pst.node.get("query")
    if ctx.restricted and isinstance(query, dict) and "ExecuteStmt" in query:
        # EXPLAIN EXECUTE p: what it reads is what PREPARE p read (its text is not here).
        name = str(query["ExecuteStmt"].get("name", ""))
        base = ctx.prepared.get(name)
        if base is None:
            if analyze:
                raise Denied(f"EXPLAIN ANALYZE EXECUTE of prepared statement {name}, which "
                             "pgveil did not see prepared, is not allowed for masked roles")
        elif base.action is Action.DENY:
            raise Denied(base.message or f"prepared statement {name} was denied")
        else:
            tables += [ctx.cv.tables[t] for t in base.tables if t in ctx.cv.tables]
    names = ", ".join(dict.fromkeys([t.name for t in tables] + m.dependents))
    if analyze and ctx.restricted and (tables or m.dependents):
        raise Denied(f"EXPLAIN ANALYZE of a statement on protected data ({names}) is not "
                     f"allowed for role {ctx.view.role}")
    if ctx.restricted and ctx.cv.hash_secret:
        hashed = [t.name for t in tables
                  if any(c.mask_name == "hash" and c.expr is not None for c in t.view.columns)]
        if hashed:
            # EXPLAIN (VERBOSE) prints the mask expressions, constants (the HMAC pads) included.
            raise Denied(f"EXPLAIN of a statement on {', '.join(hashed)} would reveal the hash "
                         f"mask's key material; not allowed for role {ctx.view.role}")
    start = explain_prefix(sig)
    if start is None:
        if ctx.restricted and m.sensitive:
            raise Denied(f"cannot analyse EXPLAIN that references {m.names}")
        return Core("explain")
    inner = analyse_core(text[start:], ctx, explain=True)
    out = inner.shifted(text, start, len(text))
    out.kind = "explain"
    out.inherited = None
    if ctx.restricted and (tables or m.dependents) and out.deny is None:
        prefix = _costs_off_prefix(options)
        body = out.sql if out.sql is not None else text
        lead = sig[0].start  # the EXPLAIN keyword (a statement of a request may start blank)
        out.sql = body[:lead] + prefix + body[start:]
        delta = lead + len(prefix) - start
        out.generated = [(s + delta, e + delta) for s, e in out.generated]
        out.allowed = [(s + delta, e + delta) for s, e in out.allowed]
        out.reasons.append("EXPLAIN without cost estimates: they come from statistics over "
                           "every row of the table")
    return out


def _query(text: str, tokens: list, ctx: _Ctx, m: _Mentions, kind: str,
           explain: bool) -> Core:
    """Substitution + DML rules + unbounded check for a restricted role."""
    cv = ctx.cv
    view = ctx.view
    core = Core(kind)
    if not m.tables:
        return core  # no protected table can be read without being named; verify() covers U&
    try:
        tree = parse_one(_sqlglot_parameters(text, tokens))
    except Denied as e:
        raise Denied(f"cannot analyse statement that references {m.names}: {e}") from None
    idx = TokenIndex(text, tokens)
    refs = collect_refs(tree, cv)
    if isinstance(tree, exp.Merge) and any(r.table is not None for r in refs):
        raise Denied("MERGE on protected tables is not supported for masked roles")
    if isinstance(tree, exp.Select) and tree.args.get("into") is not None:
        raise Denied(f"DDL is not allowed for role {view.role}")
    nested = next((r for r in refs if r.role == "target" and not r.top), None)
    if nested is not None:
        # a data change in WITH escapes what a top-level one meets: the row filter and
        # foreign-key checks of rewriters.dml, the rule against copying customer data out, and
        # the row cap (the statement is a SELECT, capped on the wire after the change is made)
        target = nested.table.name if nested.table is not None else nested.ref_name
        raise Denied(f"data-modifying WITH on {target} is not supported for masked roles "
                     f"in a statement on protected data ({m.names})")
    protected_refs = sum(1 for r in refs if r.table is not None)
    if protected_refs > MAX_PROTECTED_REFERENCES:
        # each becomes a derived table with every mask: the rewritten text (and its
        # verification) grows by a kilobyte or so per reference, on the event loop
        raise Denied(f"statement names protected tables {protected_refs} times; at most "
                     f"{MAX_PROTECTED_REFERENCES} are analysed for masked roles")
    sub = substitute(tree, refs, idx, cv)
    edits = list(sub.edits)
    lookups = list(sub.lookups)
    lookup_count = sub.lookup_values
    reasons: list[str] = []
    allowed: list[tuple[int, int]] = []
    top = next((r for r in refs if r.top), None)
    reads_protected = [r.table.name for r in refs if r.role == "source" and r.table is not None]
    if isinstance(tree, (exp.Insert, exp.Update)) and (top is None or top.table is None) and \
            reads_protected:
        raise Denied(f"copying customer data ({', '.join(dict.fromkeys(reads_protected))}) "
                     "into an unprotected table is not allowed for masked roles")
    if top is not None and top.table is not None:
        dml = dml_rules(tree, top, idx, cv)
        edits.extend(dml.edits)
        allowed.append(dml.target_span)  # type: ignore[arg-type]
        lookup_count += dml.lookup_values
        for qn in dml.lookups:
            if qn not in lookups:
                lookups.append(qn)
        reasons.extend(dml.reasons)
        core.checks.extend(dml.checks)
        if dml.mask_returning:
            core.mask_returning = (top.table, top.ref_name)
        if top.table.row_filter is not None:
            reasons.append(f"row filter {view.role}: {top.table.name}")
    cap = view.limits.lookup_max_values
    if lookup_count > cap:
        # per statement, not per list: 37 UNION ALL branches of 10 candidates each would
        # test every ID number a mask leaves possible in one round trip
        raise Denied(f"a statement may present at most {cap} lookup values at once for role "
                     f"{view.role} (lookup_max_values); this one presents {lookup_count} "
                     f"across its lookups on {', '.join(lookups)}")
    if kind == "select" and view.limits.unbounded is Unbounded.DENY  and not explain:
        hit = unbounded_read(tree, refs)
        if hit is not None:
            limit = view.limits.max_rows
            hint = f"LIMIT <= {limit}" if limit is not None else "LIMIT"
            raise Denied(f"unbounded read of {hit.name}: add a WHERE clause or {hint}")
    try:
        spliced = apply_edits(text, edits)
    except EditConflict as e:
        raise Denied(f"cannot rewrite statement that references {m.names}: {e}") from None
    core.sql = spliced.sql if edits else None
    core.generated = spliced.generated
    core.allowed = [(spliced.map_offset(s), spliced.map_offset(s) + (e - s)) for s, e in allowed]
    core.aliases = {r.ref_name: r.table.name for r in sub.substituted if r.table is not None}
    core.lookups = lookups
    core.lookup_values = lookup_count
    core.repeats = max(Counter(r.table.name for r in sub.substituted
                               if r.table is not None).values(), default=0)
    core.reasons = reasons
    core.tables = list(dict.fromkeys(
        [r.table.name for r in refs if r.table is not None and r.role in ("source", "target")]))
    return core
