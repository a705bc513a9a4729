"""Statement classification: the leading keyword, PostgreSQL's own statement type, and the
offsets of the statement wrapped inside EXPLAIN / PREPARE / DECLARE / COPY (query).

Why not sqlglot: sqlglot turns utility statements into ``exp.Command`` or silently misparses them
(``LISTEN ch`` becomes ``LISTEN AS ch``), so the kind of a statement is decided here, first by the
leading keyword (cheap, used by the fast path) and then — on the analysis path — by PostgreSQL's
own grammar through pglast (``libpg_query``), which also gives the names that matter (prepared
statement, cursor, GUC, COPY target) exactly as the server will resolve them.

Data flow::

    tokens --leading_kind--> kind            (fast path and fallback)
    statement text --pg_statement--> PgStatement(node type, node JSON, kind)
    tokens --explain_prefix / prepare_prefix / declare_prefix / copy_query_span--> offsets
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pglast import parser as pg_parser

from rewriters.lexer import Tok, Token, nesting_depth

# Leading keyword -> kind (StatementDecision.kind).
KEYWORD_KIND: dict[str, str] = {
    "select": "select",
    "values": "select",
    "table": "select",
    "with": "select",  # refined by with_main_kind
    "insert": "insert",
    "update": "update",
    "delete": "delete",
    "merge": "merge",
    "truncate": "delete",
    "copy": "copy",
    "explain": "explain",
    "prepare": "prepare",
    "execute": "execute",
    "declare": "declare",
    "fetch": "fetch",
    "move": "fetch",
    "set": "set",
    "reset": "set",
    "begin": "transaction",
    "start": "transaction",
    "commit": "transaction",
    "end": "transaction",
    "rollback": "transaction",
    "abort": "transaction",
    "savepoint": "transaction",
    "release": "transaction",
    "create": "ddl",
    "alter": "ddl",
    "drop": "ddl",
    "grant": "ddl",
    "revoke": "ddl",
    "comment": "ddl",
    "security": "ddl",
    "reassign": "ddl",
    "import": "ddl",
    "refresh": "ddl",
    "do": "ddl",
    "vacuum": "utility",
    "analyze": "utility",
    "analyse": "utility",
    "cluster": "utility",
    "reindex": "utility",
    "checkpoint": "utility",
    "lock": "utility",
    "listen": "utility",
    "notify": "utility",
    "unlisten": "utility",
    "discard": "utility",
    "load": "utility",
    "call": "utility",
    "show": "utility",
    "close": "utility",
    "deallocate": "utility",
}

_WITH_MAIN = {"select": "select", "values": "select", "table": "select", "insert": "insert",
              "update": "update", "delete": "delete", "merge": "merge"}


def leading_kind(sig: list[Token]) -> str:
    """The statement kind from its leading keyword (``sig``: significant tokens).

    ``(SELECT 1) UNION (SELECT 2)`` is a select; ``WITH d AS (...) DELETE ...`` is a delete;
    ``PREPARE TRANSACTION 'x'`` is a transaction. Unknown keywords give ``other``.
    """
    i = 0
    while i < len(sig) and sig[i].kind is Tok.PUNCT and sig[i].text == "(":
        i += 1
    if i >= len(sig):
        return "other"
    kw = sig[i].keyword
    kind = KEYWORD_KIND.get(kw, "other")
    if kw == "with":
        return with_main_kind(sig, i)
    if kw == "prepare" and i + 1 < len(sig) and sig[i + 1].keyword == "transaction":
        return "transaction"
    if kw in ("commit", "rollback") and i + 1 < len(sig) and sig[i + 1].keyword == "prepared":
        return "transaction"
    if kind == "other" and kw == "" and sig[i].kind is Tok.PUNCT:
        return "other"
    return kind


def with_main_kind(sig: list[Token], start: int) -> str:
    """Kind of the main statement of ``WITH ...``: the first depth-0 SELECT/INSERT/... keyword."""
    depth = 0
    for t in sig[start + 1 :]:
        if t.kind is Tok.PUNCT:
            if t.text in "([":
                depth += 1
            elif t.text in ")]":
                depth -= 1
            continue
        if depth == 0:
            kind = _WITH_MAIN.get(t.keyword)
            if kind:
                return kind
    return "select"


# --- PostgreSQL's own view of a statement (pglast) -------------------------------------------

_NODE_KIND: dict[str, str] = {
    "SelectStmt": "select",
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
    "TruncateStmt": "delete",
    "CopyStmt": "copy",
    "ExplainStmt": "explain",
    "PrepareStmt": "prepare",
    "ExecuteStmt": "execute",
    "DeallocateStmt": "utility",
    "DeclareCursorStmt": "declare",
    "FetchStmt": "fetch",
    "ClosePortalStmt": "utility",
    "TransactionStmt": "transaction",
    "VariableSetStmt": "set",
    "VariableShowStmt": "utility",
    "VacuumStmt": "utility",
    "ClusterStmt": "utility",
    "ReindexStmt": "utility",
    "CheckPointStmt": "utility",
    "LockStmt": "utility",
    "ListenStmt": "utility",
    "NotifyStmt": "utility",
    "UnlistenStmt": "utility",
    "DiscardStmt": "utility",
    "LoadStmt": "utility",
    "CallStmt": "utility",
    "ConstraintsSetStmt": "transaction",
}

_DDL_PREFIXES = ("Create", "Alter", "Drop", "Define", "Rename", "Grant", "Comment", "Reassign",
                 "Import", "SecLabel", "Do", "Rule", "Index", "View", "Refresh",
                 "CompositeType", "Reassign")


def node_kind(node_type: str, node: dict[str, Any]) -> str:
    """StatementDecision.kind for a pglast statement node; ``SELECT ... INTO`` is ddl."""
    if node_type == "SelectStmt" and node.get("intoClause"):
        return "ddl"
    kind = _NODE_KIND.get(node_type)
    if kind:
        return kind
    if node_type.startswith(_DDL_PREFIXES):
        return "ddl"
    return "other"


@dataclass(frozen=True)
class PgStatement:
    """One statement as PostgreSQL's grammar (libpg_query, via pglast) reads it."""

    node_type: str
    node: dict[str, Any] = field(repr=False)
    kind: str


class PgParseError(Exception):
    """libpg_query rejected the text (so would the server)."""


class PgTooComplex(PgParseError):
    """pgveil would not read the text (it bounds what parsing may cost on its event loop),
    though the server might: never a reason to forward a restricted role's statement."""


def pg_parse(sql: str) -> list[dict[str, Any]]:
    """Parse with PostgreSQL's grammar; returns the RawStmt dicts. Raises PgParseError.

    Memoised for the last few texts: classification and verification parse the same statement
    when nothing was rewritten. Callers must not modify the result. Long texts are not kept:
    a parse tree is ~150 times its text in Python objects (a 2.5 MB rewritten statement held
    400 MB), and their parse is not the cost that matters then.
    """
    if sql.count("/*") > MAX_COMMENT_DEPTH and nesting_depth(sql, _COMMENT_EDGE, "/*") > MAX_COMMENT_DEPTH:
        raise PgTooComplex(f"comments nested more than {MAX_COMMENT_DEPTH} deep")
    if _MULTI_ASSIGN.search(sql) is not None and _widest_multi_assign(sql) > MAX_MULTI_ASSIGN:
        raise PgTooComplex(f"SET (column, ...) of more than {MAX_MULTI_ASSIGN} columns")
    if len(sql) > PARSE_MEMO_CHARS:
        return _pg_parse(sql)
    return _pg_parse_cached(sql)


PARSE_MEMO_CHARS = 16 * 1024
# libpg_query's scanner takes quadratic time in the nesting of /* comments */ (20000 levels:
# 5 s, on the proxy's event loop); counted over the raw text, string literals included
MAX_COMMENT_DEPTH = 256
_COMMENT_EDGE = re.compile(r"/\*|\*/")


# libpg_query's JSON repeats the whole value list of ``SET (a, b, ...) = (x, y, ...)`` once per
# column: quadratic (1024 columns: 9 KB of SQL, 53 MB of JSON, 17 s and 2.3 GB to read)
MAX_MULTI_ASSIGN = 100
_MULTI_ASSIGN = re.compile(r"\bset\s*\(", re.IGNORECASE)


def _widest_multi_assign(sql: str) -> int:
    """The most columns in any ``SET ( ... )`` list of ``sql`` (top-level commas + 1, counted
    over the raw text: a comma in a string there counts too)."""
    widest = scanned = 0
    for m in _MULTI_ASSIGN.finditer(sql):
        if m.start() < scanned:
            continue  # inside a list already scanned (where no SET list can be): stays linear
        depth, columns, pos = 1, 1, m.end()
        for pos in range(m.end(), len(sql)):
            ch = sql[pos]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
            elif ch == "," and depth == 1:
                columns += 1
        scanned = pos + 1
        widest = max(widest, columns)
    return widest




@functools.lru_cache(maxsize=16)
def _pg_parse_cached(sql: str) -> list[dict[str, Any]]:
    return _pg_parse(sql)


def _pg_parse(sql: str) -> list[dict[str, Any]]:
    try:
        return list(json.loads(pg_parser.parse_sql_json(sql)).get("stmts", []))
    except pg_parser.ParseError as e:  # type: ignore[attr-defined]
        raise PgParseError(str(e)) from e
    except (RecursionError, MemoryError, ValueError) as e:
        raise PgTooComplex(f"{type(e).__name__}: {e}") from e


def pg_statement(sql: str) -> PgStatement:
    """The single statement in ``sql`` as PostgreSQL reads it. Raises PgParseError."""
    stmts = pg_parse(sql)
    if len(stmts) != 1:
        raise PgParseError(f"expected one statement, found {len(stmts)}")
    stmt = stmts[0].get("stmt") or {}
    if len(stmt) != 1:
        raise PgParseError("empty statement")
    (node_type, node), = stmt.items()
    return PgStatement(node_type, node, node_kind(node_type, node))


# --- wrapped statements ----------------------------------------------------------------------


def _skip_parens(sig: list[Token], i: int) -> int:
    """Index after the ``)`` matching the ``(`` at ``sig[i]``; -1 when unbalanced."""
    depth = 0
    for j in range(i, len(sig)):
        t = sig[j]
        if t.kind is Tok.PUNCT:
            if t.text == "(":
                depth += 1
            elif t.text == ")":
                depth -= 1
                if depth == 0:
                    return j + 1
    return -1


_STATEMENT_STARTS = frozenset({"select", "with", "values", "table", "insert", "update", "delete",
                               "merge", "execute", "declare", "create"})


def _inner_start(sig: list[Token], i: int) -> int | None:
    """Offset of the wrapped statement starting at ``sig[i]`` if it starts like one."""
    if i >= len(sig):
        return None
    t = sig[i]
    if t.kind is Tok.PUNCT and t.text == "(":
        return t.start
    if t.keyword in _STATEMENT_STARTS:
        return t.start
    return None


def explain_prefix(sig: list[Token]) -> int | None:
    """Offset where the statement under ``EXPLAIN [ANALYZE] [VERBOSE] | EXPLAIN (opts)`` starts."""
    if not sig or sig[0].keyword != "explain":
        return None
    i = 1
    if i < len(sig) and sig[i].kind is Tok.PUNCT and sig[i].text == "(":
        # ``EXPLAIN (`` is an option list unless it is a parenthesised SELECT: options start with
        # an option name, never with SELECT/WITH/VALUES/TABLE/(.
        nxt = sig[i + 1] if i + 1 < len(sig) else None
        if nxt is not None and nxt.keyword not in ("select", "with", "values", "table") and not (
            nxt.kind is Tok.PUNCT and nxt.text == "("
        ):
            i = _skip_parens(sig, i)
            if i < 0:
                return None
            return _inner_start(sig, i)
    while i < len(sig) and sig[i].keyword in ("analyze", "analyse", "verbose"):
        i += 1
    return _inner_start(sig, i)


def prepare_prefix(sig: list[Token]) -> int | None:
    """Offset of the statement in ``PREPARE name [(types)] AS statement``."""
    if len(sig) < 3 or sig[0].keyword != "prepare":
        return None
    i = 2
    if sig[i].kind is Tok.PUNCT and sig[i].text == "(":
        i = _skip_parens(sig, i)
        if i < 0:
            return None
    if i >= len(sig) or sig[i].keyword != "as":
        return None
    return _inner_start(sig, i + 1)


def declare_prefix(sig: list[Token]) -> int | None:
    """Offset of the query in ``DECLARE name [options] CURSOR [WITH[OUT] HOLD] FOR query``."""
    if len(sig) < 4 or sig[0].keyword != "declare":
        return None
    i = 2
    while i < len(sig) and sig[i].keyword in (
        "binary", "asensitive", "insensitive", "no", "scroll", "cursor", "with", "without", "hold"
    ):
        i += 1
    if i >= len(sig) or sig[i].keyword != "for":
        return None
    return _inner_start(sig, i + 1)


def copy_query_span(sig: list[Token]) -> tuple[int, int] | None:
    """``(start, end)`` offsets of the query inside ``COPY ( query ) TO ...`` (parens excluded)."""
    if len(sig) < 3 or sig[0].keyword != "copy" or not (
        sig[1].kind is Tok.PUNCT and sig[1].text == "("
    ):
        return None
    close = _skip_parens(sig, 1)
    if close < 0:
        return None
    return sig[2].start, sig[close - 1].start


def copy_table_span(sig: list[Token]) -> tuple[int, int, int] | None:
    """For ``COPY [BINARY] name [(cols)] TO|FROM``: (name start, name end, end of the column
    list or name) — the region to replace when table-form COPY TO becomes query form."""
    if len(sig) < 3 or sig[0].keyword != "copy":
        return None
    i = 1
    if sig[i].keyword == "binary":
        i += 1
    start = i
    while i < len(sig) and sig[i].kind in (Tok.IDENT, Tok.QIDENT):
        i += 1
        if i < len(sig) and sig[i].kind is Tok.PUNCT and sig[i].text == ".":
            i += 1
            continue
        break
    if i == start:
        return None
    name_end = sig[i - 1].end
    region_end = name_end
    if i < len(sig) and sig[i].kind is Tok.PUNCT and sig[i].text == "(":
        close = _skip_parens(sig, i)
        if close < 0:
            return None
        region_end = sig[close - 1].end
    return sig[start].start, name_end, region_end
