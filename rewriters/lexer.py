"""A PostgreSQL-faithful SQL lexer: tokens with character offsets, and statement splitting.

Everything in the rewriter that needs to know where a token starts and ends uses this module:
splitting a simple-Query text into statements, reading the leading keyword before sqlglot ever
sees the text, checking that a span sqlglot pointed at really is a table name or a literal, and
redacting literals for the audit log. sqlglot's own tokenizer is not used for these because it is
not PostgreSQL's: it does not nest ``/* */`` comments, reads ``E'..'`` as a byte string, has no
``U&`` identifiers, and ignores ``standard_conforming_strings``.

The rules follow PostgreSQL 15's ``scan.l``:

* whitespace ``[ \\t\\n\\r\\f\\v]``; ``--`` comments to end of line; ``/* */`` comments nest;
* identifiers ``[A-Za-z\\200-\\377_][A-Za-z\\200-\\377_0-9$]*`` (any non-ASCII character is an
  identifier character); ``"quoted"`` identifiers with ``""``; ``U&"..."`` unicode identifiers;
* strings ``'...'`` with ``''`` (and backslash escapes when ``standard_conforming_strings`` is
  off), ``E'...'`` with backslash escapes, ``B'..'``/``X'..'`` bit strings, ``N'..'``, ``U&'..'``;
  ``$tag$...$tag$`` dollar quotes; ``$n`` parameters;
* numbers ``1``, ``1.5``, ``.5``, ``1e10`` (a number directly followed by an identifier character
  is lexed as PostgreSQL 15 does — number then identifier — and flagged ``junk``);
* operators are runs of ``+-*/<>=~!@#%^&|`?`` cut before ``--`` and ``/*``.

Unterminated strings, identifiers and comments produce one ``ERROR`` token running to the end of
the text: callers treat that as "cannot read this the way the server will".

Data flow: ``tokenize(sql) -> list[Token]``; ``split_statements(sql) -> list[Span]``.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple


class Tok(enum.Enum):
    WS = "ws"
    COMMENT = "comment"
    IDENT = "ident"  # unquoted identifier or keyword
    QIDENT = "qident"  # "quoted identifier"
    UIDENT = "uident"  # U&"unicode identifier"
    STRING = "string"  # 'standard string' (also N'...')
    ESTRING = "estring"  # E'escape string'
    BITSTRING = "bitstring"  # B'0101' / X'1F'
    USTRING = "ustring"  # U&'unicode string'
    DOLLAR = "dollar"  # $tag$ ... $tag$
    PARAM = "param"  # $1
    NUMBER = "number"
    OP = "op"
    PUNCT = "punct"  # ( ) [ ] , ; : :: .
    OTHER = "other"  # a character PostgreSQL does not accept outside strings (e.g. backslash)
    ERROR = "error"  # unterminated string / identifier / comment / dollar quote


class Token(NamedTuple):
    kind: Tok
    start: int  # offset of the first character
    end: int  # offset after the last character
    text: str

    @property
    def significant(self) -> bool:
        return self.kind is not Tok.WS and self.kind is not Tok.COMMENT

    @property
    def keyword(self) -> str:
        """Lower-cased text of an unquoted identifier (keywords included), else ''."""
        return fold(self.text) if self.kind is Tok.IDENT else ""


class Span(NamedTuple):
    """One statement of a multi-statement text: ``sql[start:end]`` (the ``;`` excluded)."""

    start: int
    end: int


_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(name: str) -> str:
    """PostgreSQL's case folding of an unquoted identifier in a UTF8 database: ASCII only."""
    return name.translate(_ASCII_FOLD)


_IDENT_START = r"A-Za-z\x80-\U0010ffff_"
_IDENT_CONT = r"A-Za-z\x80-\U0010ffff_0-9$"

_COMMON = (
    r"(?P<ws>[ \t\n\r\f\v]+)"
    r"|(?P<lc>--[^\n\r]*)"
    r"|(?P<bc>/\*)"
    r"|(?P<estr>[eE]'(?:[^'\\]|\\.|'')*')"
    r"|(?P<bstr>[bBxX]'[^']*')"
    r"|(?P<nstr>[nN]'(?:[^']|'')*')"
    r"|(?P<ustr>[uU]&'(?:[^']|'')*')"
    r"|(?P<uid>[uU]&\"(?:[^\"]|\"\")*\")"
    r"|(?P<str>{string})"
    r"|(?P<qid>\"(?:[^\"]|\"\")*\")"
    rf"|(?P<dollar>\$(?:[{_IDENT_START}][A-Za-z\x80-\U0010ffff_0-9]*)?\$)"
    r"|(?P<param>\$[0-9]+)"
    r"|(?P<num>(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    rf"|(?P<ident>[{_IDENT_START}][{_IDENT_CONT}]*)"
    r"|(?P<punct>::|[(),;\[\]:.])"
    r"|(?P<op>(?:[+*<>=~!@#%^&|`?]|-(?!-)|/(?!\*))+)"
    r"|(?P<other>.)"
)

_MASTER_SCS = re.compile(_COMMON.replace("{string}", r"'(?:[^']|'')*'"), re.DOTALL)
_MASTER_NOSCS = re.compile(_COMMON.replace("{string}", r"'(?:[^'\\]|\\.|'')*'"), re.DOTALL)

_GROUP_KIND = {
    "ws": Tok.WS,
    "lc": Tok.COMMENT,
    "estr": Tok.ESTRING,
    "bstr": Tok.BITSTRING,
    "nstr": Tok.STRING,
    "ustr": Tok.USTRING,
    "uid": Tok.UIDENT,
    "str": Tok.STRING,
    "qid": Tok.QIDENT,
    "param": Tok.PARAM,
    "num": Tok.NUMBER,
    "ident": Tok.IDENT,
    "punct": Tok.PUNCT,
    "op": Tok.OP,
    "other": Tok.OTHER,
}

_COMMENT_EDGE = re.compile(r"/\*|\*/")


def nesting_depth(sql: str, edges: re.Pattern[str], opener: str) -> int:
    """How deep ``opener`` nests in ``sql``: ``edges`` finds the opener and its closer (string
    literals and comments not set apart -- a cheap bound taken before a parser that is slow
    on deep nesting; a closer without an opener is ignored)."""
    depth = deepest = 0
    for m in edges.finditer(sql):
        if m.group() == opener:
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


def block_comment_end(sql: str, start: int) -> int:
    """Offset after the ``*/`` closing the (nested) comment opened at ``start``; -1 if none."""
    depth = 0
    pos = start
    while True:
        m = _COMMENT_EDGE.search(sql, pos)
        if m is None:
            return -1
        if m.group() == "/*":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return m.end()
        pos = m.end()


def tokenize(sql: str, standard_conforming_strings: bool = True) -> list[Token]:
    """Lex ``sql`` completely; the tokens' texts concatenate back to ``sql``.

    >>> [t.text for t in tokenize("SELECT 'a''b' -- x")]
    ['SELECT', ' ', "'a''b'", ' ', '-- x']
    """
    master = _MASTER_SCS if standard_conforming_strings else _MASTER_NOSCS
    tokens: list[Token] = []
    append = tokens.append
    pos = 0
    n = len(sql)
    match = master.match
    while pos < n:
        m = match(sql, pos)
        assert m is not None  # the ``other`` alternative matches any character
        group = m.lastgroup
        end = m.end()
        if group == "bc":
            close = block_comment_end(sql, pos)
            if close < 0:
                append(Token(Tok.ERROR, pos, n, sql[pos:]))
                return tokens
            append(Token(Tok.COMMENT, pos, close, sql[pos:close]))
            pos = close
            continue
        if group == "dollar":
            tag = m.group()
            close = sql.find(tag, end)
            if close < 0:
                append(Token(Tok.ERROR, pos, n, sql[pos:]))
                return tokens
            close += len(tag)
            append(Token(Tok.DOLLAR, pos, close, sql[pos:close]))
            pos = close
            continue
        assert group is not None
        if group == "other" and sql[pos] in "'\"":
            # An opening quote the regex could not close: unterminated literal / identifier.
            append(Token(Tok.ERROR, pos, n, sql[pos:]))
            return tokens
        append(Token(_GROUP_KIND[group], pos, end, m.group()))
        pos = end
    return tokens


def significant(tokens: list[Token]) -> list[Token]:
    """The tokens without whitespace and comments."""
    return [t for t in tokens if t.kind is not Tok.WS and t.kind is not Tok.COMMENT]


def identifier_value(token: Token) -> str | None:
    """The name an identifier token denotes (folded or unquoted); None for other tokens.

    ``U&"..."`` identifiers return None: decoding them is PostgreSQL's business, and callers
    that meet one fail closed.
    """
    if token.kind is Tok.IDENT:
        return fold(token.text)
    if token.kind is Tok.QIDENT:
        return token.text[1:-1].replace('""', '"')
    return None


def has_string_continuation(tokens: list[Token]) -> bool:
    """True when two string literals are separated only by whitespace holding a newline.

    PostgreSQL glues ``'a'\\n'b'`` into one literal ``'ab'``; a literal-by-literal view of such
    text would see two.
    """
    sig_prev: Token | None = None
    gap_newline = False
    for t in tokens:
        if t.kind is Tok.WS:
            if "\n" in t.text or "\r" in t.text:
                gap_newline = True
            continue
        if t.kind is Tok.COMMENT:
            # PostgreSQL's quotecontinue allows only whitespace (comments included only via
            # newlines in -- comments); be conservative and treat any comment as a newline.
            gap_newline = True
            continue
        if (
            sig_prev is not None
            and gap_newline
            and sig_prev.kind in _STRINGISH
            and t.kind in _STRINGISH
        ):
            return True
        sig_prev = t
        gap_newline = False
    return False


_STRINGISH = frozenset({Tok.STRING, Tok.ESTRING, Tok.BITSTRING, Tok.USTRING})


def split_statements(sql: str, tokens: list[Token] | None = None) -> list[Span]:
    """Split a simple-Query text into statements at top-level ``;``.

    Empty statements (only whitespace/comments) are dropped. A ``CREATE ... BEGIN ATOMIC ...
    END`` body (SQL-standard function bodies hold ``;``) is kept in one piece, as psql does.
    An unterminated literal or comment ends the last statement at the end of the text.

    >>> [sql[s:e] for s, e in split_statements(sql := "SELECT 1; SELECT ';' ;")]
    ['SELECT 1', " SELECT ';' "]
    """
    if tokens is None:
        tokens = tokenize(sql)
    spans: list[Span] = []
    start = 0
    has_content = False
    first_kw = ""
    prev_kw = ""
    atomic_depth = 0
    for t in tokens:
        if t.kind is Tok.WS or t.kind is Tok.COMMENT:
            continue
        if t.kind is Tok.PUNCT and t.text == ";" and atomic_depth == 0:
            if has_content:
                spans.append(Span(start, t.start))
            start = t.end
            has_content = False
            first_kw = ""
            prev_kw = ""
            continue
        kw = t.keyword
        if not has_content:
            first_kw = kw
        has_content = True
        if first_kw == "create" and kw:
            if kw == "atomic" and prev_kw == "begin":
                atomic_depth += 1
            elif atomic_depth and kw == "case":
                atomic_depth += 1
            elif atomic_depth and kw == "end":
                atomic_depth -= 1
        prev_kw = kw
    if has_content:
        spans.append(Span(start, len(sql)))
    return spans
