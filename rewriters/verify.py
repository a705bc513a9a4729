"""The independent check: read the *rewritten* statement with PostgreSQL's own grammar and
refuse anything that still reaches customer data outside the generated derived tables.

The substitution (:mod:`rewriters.substitute`) works on sqlglot's reading of the statement; this
module does not trust it. It parses the final SQL with libpg_query (pglast) — the same parser
the server runs — and walks every node:

* every ``RangeVar`` naming a masked protected table must lie inside a span the rewriter
  generated, be the DML target the DML rules approved, be a CTE reference (CTE visibility
  computed here again, PostgreSQL's way), or a lock target. Anything else — a data-modifying
  CTE, ``DELETE ... USING``, ``TRUNCATE``, ``COPY customers``, an ``U&"\\0063ustomers"`` sqlglot
  never saw, a gap nobody thought of — is a violation;
* functions that take SQL or relation names as strings (``query_to_xml``, ``ts_stat``,
  ``dblink``, ``crosstab`` ...), statistics relations (``pg_stats``), role
  switching (``SET ROLE``, ``SET SESSION AUTHORIZATION``, ``set_config('role', ..)``, ``ALTER
  ROLE .. SET role``), and catalog dependents (views / functions reading protected tables) the
  policy does not list are violations for restricted roles;
* the protected tables and columns the statement references are collected for the audit record.

Nodes located inside the generated spans are not walked (policy text; also most of the cost:
a derived table projects every column through its mask).

Offsets: libpg_query reports byte offsets into the UTF-8 text; they are converted to character
offsets before comparing with the rewriter's spans.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from rewriters.classify import PgParseError, node_kind, pg_parse
from rewriters.compiled import DEBUG_SETTINGS, ROLE_SETTINGS, CompiledTable, CompiledView

# pglast's LockStmt.mode of LOCK TABLE ... IN ACCESS EXCLUSIVE MODE (lockdefs.h)
_ACCESS_EXCLUSIVE = 8
# planner statistics that hold column values (histograms, most common values). Not
# pg_statistic_ext: it holds only the statistics objects' definitions (psql's \d reads it).
STATS_RELATIONS = frozenset({"pg_stats", "pg_statistic", "pg_stats_ext", "pg_stats_ext_exprs",
                             "pg_statistic_ext_data"})
DENIED_FUNCTIONS = frozenset({
    "ts_stat", "pg_mcv_list_items", "xpath_table", "pgrowlocks", "connectby", "pg_read_file",
    "pg_read_binary_file", "lo_import", "lo_export", "get_raw_page", "heap_page_items",
    "tuple_data_split", "heap_tuple_infomask_flags", "bt_page_items", "brin_page_items",
    "gin_leafpage_items", "hash_page_items",
})
DENIED_FUNCTION_PREFIXES = ("dblink", "crosstab")
# Functions that run SQL given as text in some of their forms: allowed only in the harmless form,
# with exactly this many positional arguments. ``ts_rewrite(query, select text)`` runs its second
# argument as a query (any text, e.g. ``concat('... from cust', 'omers')``, or a parameter).
SQL_TEXT_OVERLOADS = {"ts_rewrite": 3}
DENIED_FUNCTION_SUFFIXES = ("_to_xml", "_to_xmlschema", "_to_xml_and_xmlschema")
_DEBUG_REASON = "would send the rewritten statements' internals to the client"
# Where statement text can be read back; denied for a view with a ``hash`` mask (the rewritten
# SQL holds the HMAC pad bytes derived from the key).
STATEMENT_TEXT_RELATIONS = frozenset({"pg_stat_activity", "pg_prepared_statements", "pg_cursors",
                                      "pg_stat_statements", "pg_stat_statements_info"})
STATEMENT_TEXT_FUNCTIONS = frozenset({"current_query", "pg_stat_get_activity",
                                      "pg_stat_get_backend_activity", "pg_stat_statements"})
_KEY_REASON = "would reveal statement text that holds the hash mask's key material"
# Other sessions' statement text: the literals other operators typed (a lookup's raw phone of
# another branch) and the DBA's. PostgreSQL shows it for sessions of the same database role,
# which several logins share in auth.mode userlist, and to members of pg_read_all_stats.
OTHER_SESSIONS_TEXT = frozenset({"pg_stat_activity", "pg_stat_get_activity",
                                 "pg_stat_get_backend_activity"})
_OTHERS_REASON = ("would show other sessions' statement text (the values other operators "
                  "typed); not allowed for masked roles")
# Per-table row and block counters: read before and after a statement of one's own, they count
# the rows it touched below the row filter (an index fetch of a hidden id: whether it exists).
ROW_COUNTER_PREFIXES = ("pg_stat_xact_", "pg_stat_user_tables", "pg_stat_all_tables",
                        "pg_stat_sys_tables", "pg_statio_", "pg_stat_user_indexes",
                        "pg_stat_all_indexes", "pg_stat_sys_indexes", "pg_stat_database")
ROW_COUNTER_FUNCTIONS = ("pg_stat_get_xact_", "pg_stat_get_tuples_", "pg_stat_get_blocks_",
                         "pg_stat_get_numscans", "pg_stat_get_live_tuples",
                         "pg_stat_get_dead_tuples", "pg_stat_get_ins_since_vacuum",
                         "pg_stat_get_mod_since_analyze", "pg_stat_get_lastscan",
                         "pg_stat_get_db_tuples_", "pg_stat_get_db_blocks_")
_COUNTERS_REASON = ("counts rows a statement touched below the row filter; not allowed for "
                    "masked roles")
# Aggregates that pack many rows into one value: max_rows counts DataRows, so one row of
# json_agg(c) would carry a whole branch. Denied on customer data for roles with a row cap.
PACKING_AGGREGATES = frozenset({
    "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_agg_strict", "jsonb_agg_strict",
    "json_object_agg", "jsonb_object_agg", "json_object_agg_strict", "jsonb_object_agg_strict",
    "json_object_agg_unique", "jsonb_object_agg_unique", "json_object_agg_unique_strict",
    "jsonb_object_agg_unique_strict", "json_arrayagg", "json_objectagg", "xmlagg", "range_agg",
    "multirange_agg", "int_array_aggregate", "array_accum",
})


# Aggregates whose result can be one row's value (``max(phone) FILTER (WHERE id = 3)``,
# ``sum(CASE WHEN id = 3 THEN balance END)``): each call in a row can carry another customer.
VALUE_AGGREGATES = frozenset({
    "min", "max", "sum", "avg", "any_value", "mode", "percentile_disc", "percentile_cont",
    "bit_and", "bit_or", "bit_xor", "bool_and", "bool_or", "every",
})
# Window functions that carry no other row's value.
RANKING_WINDOWS = frozenset({"row_number", "rank", "dense_rank", "percent_rank", "cume_dist",
                             "ntile", "count"})


# Aggregates that add their arguments up with the precision of numeric (131072 digits) or of a
# bit string: ``sum(x * 10::numeric ^ (7 * id))`` puts every row's value in its own digits, so
# one result row carries a whole branch. On customer data, a role with a row cap may give them
# only a bounded summand (see _bounded_summand): a column, a constant, a little arithmetic.
ACCUMULATING_AGGREGATES = frozenset({
    "sum", "avg", "bit_and", "bit_or", "bit_xor", "stddev", "stddev_pop", "stddev_samp",
    "variance", "var_pop", "var_samp", "covar_pop", "covar_samp", "corr", "regr_avgx",
    "regr_avgy", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy",
})
# Functions of a bounded summand: none of them scales a value by something a row chooses.
_SUMMAND_FUNCTIONS = frozenset({
    "abs", "round", "trunc", "floor", "ceil", "ceiling", "sign", "mod", "date_part", "extract",
    "length", "char_length", "character_length", "octet_length", "int2", "int4", "int8",
    "numeric", "float4", "float8",
})
_SUMMAND_OPERATORS = frozenset({"+", "-", "*", "/", "%"})
_BOUNDED_AGGREGATES = ACCUMULATING_AGGREGATES | {"count", "min", "max"}
_SUMMAND_MAX_OPERATORS = 4  # sum(qty * price * (1 - discount)) needs three
_SUMMAND_MAX_BRANCHES = 3  # CASE WHEN level = 'vip' THEN balance ELSE 0 END needs one


def _bounded_summand(args: list[Any]) -> bool:
    """Whether an accumulating aggregate's arguments cannot give each row digits of its own.

    Allowed: columns, constants, parameters, casts, ``+ - * / %`` (at most four operators in
    all: a chain of multiplications builds the large factors a positional code needs), CASE
    with at most three branches whose results are themselves bounded (its conditions may be
    anything: they only choose), COALESCE, NULLIF, GREATEST/LEAST and a few functions that
    scale nothing (:data:`_SUMMAND_FUNCTIONS`). Anything else -- ``^``, ``power()``,
    ``<<``, ``||`` then a cast, ``repeat()``, a subquery -- is treated as packing."""
    budget = [_SUMMAND_MAX_OPERATORS, _SUMMAND_MAX_BRANCHES]

    def bounded(value: Any) -> bool:
        if value is None:
            return True
        n = _node(value)
        if n is None:
            return False
        kind, body = n
        if kind in ("ColumnRef", "A_Const", "ParamRef"):
            return True
        if kind == "TypeCast":
            return bounded(body.get("arg"))
        if kind == "A_Expr":
            op = _strings(body.get("name"))
            if body.get("kind") == "AEXPR_OP" and len(op) == 1 and op[0] in _SUMMAND_OPERATORS:
                budget[0] -= 1
            elif body.get("kind") != "AEXPR_NULLIF":
                return False
            return budget[0] >= 0 and bounded(body.get("lexpr")) and bounded(body.get("rexpr"))
        if kind == "CaseExpr":
            branches = body.get("args") or []
            budget[1] -= len(branches)
            return budget[1] >= 0 and all(
                bounded((_node(w) or ("", {}))[1].get("result")) for w in branches
            ) and bounded(body.get("defresult"))
        if kind in ("CoalesceExpr", "MinMaxExpr"):
            return all(bounded(a) for a in body.get("args") or [])
        if kind == "FuncCall":
            names = _strings(body.get("funcname"))
            # (count/min/max/sum/... of a bounded value: a derived table's column traced by
            # _SourceTrace; the aggregate's own scope checks what it reads)
            return (bool(names) and (names[-1] in _SUMMAND_FUNCTIONS
                                     or names[-1] in _BOUNDED_AGGREGATES)
                    and names[:-1] in ([], ["pg_catalog"]) and body.get("over") is None
                    and all(bounded(a) for a in body.get("args") or []))
        return False

    return all(bounded(a) for a in args)


# Ordered-set aggregates that return an array when given an array of fractions.
PERCENTILE_AGGREGATES = frozenset({"percentile_disc", "percentile_cont"})


def _scalar_number(value: Any) -> bool:
    """A numeric constant (``0.5``, ``1``, ``0.5::float8``): one fraction, not an array."""
    n = _node(value)
    if n is None:
        return False
    kind, body = n
    if kind == "A_Const":
        return "ival" in body or "fval" in body
    if kind == "TypeCast":
        type_name = body.get("typeName") or {}
        return not type_name.get("arrayBounds") and _scalar_number(body.get("arg"))
    return False


@dataclass
class Verdict:
    """What the final statement does, as PostgreSQL reads it."""

    node_type: str = ""
    kind: str = "other"
    node: dict[str, Any] = field(default_factory=dict, repr=False)
    violations: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    dependents: list[str] = field(default_factory=list)
    # how many customers one result row can carry beyond its own: window calls that read
    # other rows (lag, nth_value, a windowed max), and value aggregates after the first
    extra_carriers: int = 0


def _char_offsets(sql: str) -> list[int] | None:
    """byte offset -> char offset table for non-ASCII text (None: identical)."""
    if sql.isascii():
        return None
    table: list[int] = []
    for i, ch in enumerate(sql):
        table.extend([i] * len(ch.encode("utf-8")))
    table.append(len(sql))
    return table


def _node(value: Any) -> tuple[str, dict[str, Any]] | None:
    """``{"RangeVar": {...}}`` -> ("RangeVar", {...})."""
    if isinstance(value, dict) and len(value) == 1:
        (k, v), = value.items()
        if k[:1].isupper() and isinstance(v, dict):
            return k, v
    return None


_SQL_WORDS = re.compile(r"\b(?:select|table|from|copy|execute|with|join|into|returning|"
                        r"update|delete|insert)\b")


def _const_text(value: Any, depth: int = 0) -> str | None:
    """The text of a string constant argument: ``'...'``, ``'...'::text``, ``'a' || 'b'``."""
    n = _node(value)
    if n is None or depth > 50:
        return None
    kind, body = n
    if kind == "A_Const":
        sval = body.get("sval")
        return str(sval.get("sval", "")) if isinstance(sval, dict) else None
    if kind == "TypeCast":
        return _const_text(body.get("arg"), depth + 1)
    if kind == "A_Expr" and _strings(body.get("name")) == ["||"]:
        left = _const_text(body.get("lexpr"), depth + 1)
        right = _const_text(body.get("rexpr"), depth + 1)
        if left is not None and right is not None:
            return left + right
    return None


def _looks_like_sql(text: str, cv: CompiledView) -> bool:
    """A constant that reads like a query over a protected table or dependent: a function
    that runs it (``EXECUTE q`` in plpgsql) is beyond what the rewriter can follow."""
    lowered = text.lower()
    return (cv.names_re is not None and cv.names_re.search(lowered) is not None
            and _SQL_WORDS.search(lowered) is not None)


def listen_allowed(cv: CompiledView, channel: str) -> bool:
    """May this operator LISTEN to ``channel`` (policy ``listen_channels``: names or globs)?"""
    return any(fnmatchcase(channel, pattern) for pattern in cv.view.limits.listen)


def write_hooks_not_allowed(cv: CompiledView, table: str) -> list[str]:
    """The triggers' functions and rules on ``table`` the operator's policy does not list."""
    view = cv.view
    if view.limits.functions:
        return []
    return [h for h in view.write_hooks.get(table, ()) if h not in view.allowed_dependents]


def _strings(items: Any) -> list[str]:
    out: list[str] = []
    for it in items or []:
        n = _node(it)
        if n and n[0] == "String":
            out.append(str(n[1].get("sval", "")))
        elif n and n[0] == "A_Star":
            out.append("*")
    return out


_Source = tuple[str, Any, list[str]]  # (kind, SelectStmt body or None, column alias list)


class _SourceTrace:
    """Where the columns an accumulating aggregate adds up come from.

    ``sum(v)`` is a bounded summand by itself, but ``v`` may be ``x * 10::numeric ^ (7 * id)``
    computed in a derived table, a CTE or a LATERAL subquery, or a factor joined from
    ``generate_series`` or ``VALUES``: the positional code then lives outside the aggregate.
    A column an accumulating aggregate reads must come from a table (a protected table's
    generated derived table counts as one), or from a derived table / CTE whose select list
    defines it as a bounded summand of such columns (traced a few levels deep).

    Names resolve as PostgreSQL resolves them: innermost FROM first, then the enclosing
    queries' (an aggregate of an outer column, ``(SELECT sum(v))``, reads the outer query's
    rows); a column alias list renames by position (``s(v, w)``). A function's or VALUES'
    column, a qualifier that names nothing, ``*``, a CTE name defined twice in the statement:
    all count as packing."""

    MAX_DEPTH = 4

    def __init__(self, generated: Callable[[Any], bool]) -> None:
        self.generated = generated  # is this SELECT pgveil's text (a protected table)?
        self.ctes: dict[str, tuple[dict[str, Any], list[str]]] = {}
        self.ambiguous: set[str] = set()

    def find(self, tree: dict[str, Any]) -> str | None:
        """The first accumulating aggregate (name) whose sources are not bounded."""
        for kind, body in _nodes(tree):
            if kind != "CommonTableExpr":
                continue
            name = str(body.get("ctename", ""))
            q = _node(body.get("ctequery"))
            if name in self.ctes or q is None or q[0] != "SelectStmt":
                self.ambiguous.add(name)
            else:
                self.ctes[name] = (q[1], _strings(body.get("aliascolnames")))
        for kind, body in _nodes(tree, ("SelectStmt",)):
            if kind == "SelectStmt":
                found = self.check(body, [])
                if found is not None:
                    return found
        return None

    def check(self, sel: dict[str, Any], parents: list[dict[str, _Source]]) -> str | None:
        scopes = [*parents, self.scope(sel)]
        for clause in ("targetList", "havingClause", "sortClause", "valuesLists"):
            for kind, body in _own_nodes(sel.get(clause)):
                if kind != "FuncCall":
                    continue
                names = _strings(body.get("funcname"))
                if not names or names[-1] not in ACCUMULATING_AGGREGATES:
                    continue
                for ckind, cbody in _own_nodes(body.get("args")):
                    if ckind == "ColumnRef" and not self.column_ok(
                            _strings(cbody.get("fields")), scopes, 0):
                        return names[-1]
        for value in sel.values():  # subqueries, CTE bodies, set-operation branches
            for kind, body in _nodes(value, ("SelectStmt",)):
                if kind == "SelectStmt":
                    found = self.check(body, scopes)
                    if found is not None:
                        return found
        return None

    def scope(self, sel: dict[str, Any]) -> dict[str, _Source]:
        """FROM items by name: ("table" | "sub" | "other", SelectStmt body, column aliases)."""
        out: dict[str, _Source] = {}

        def add(item: Any) -> None:
            n = _node(item)
            if n is None:
                return
            kind, b = n
            alias = b.get("alias") or {}
            name = str(alias.get("aliasname", "") or "")
            colnames = _strings(alias.get("colnames"))
            if kind == "RangeVar":
                rel = str(b.get("relname", ""))
                if not b.get("schemaname") and rel in self.ambiguous:
                    out[name or rel] = ("other", None, [])
                elif not b.get("schemaname") and rel in self.ctes:
                    query, cte_cols = self.ctes[rel]
                    out[name or rel] = ("sub", query, colnames or cte_cols)
                else:
                    out[name or rel] = ("table", None, [])
            elif kind == "RangeSubselect":
                q = _node(b.get("subquery"))
                if q is not None and q[0] == "SelectStmt" and self.generated(q[1]):
                    out[name] = ("gen", q[1], colnames)  # a protected table, substituted
                elif q is not None and q[0] == "SelectStmt":
                    out[name] = ("sub", q[1], colnames)
                else:
                    out[name] = ("other", None, [])
            elif kind == "JoinExpr":
                add(b.get("larg"))
                add(b.get("rarg"))
                if name:
                    out[name] = ("other", None, [])
            else:  # RangeFunction, RangeTableFunc, ...
                out[name or f"#{len(out)}"] = ("other", None, [])

        for item in sel.get("fromClause") or []:
            add(item)
        return out

    def column_ok(self, fields: list[str], scopes: list[dict[str, _Source]],
                  depth: int) -> bool:
        if not fields or fields[-1] == "*" or depth > self.MAX_DEPTH:
            return False
        column = fields[-1]
        if len(fields) >= 2:
            for scope in reversed(scopes):
                source = scope.get(fields[-2])
                if source is not None:
                    return self.source_ok(source, column, scopes, depth)
            return len(fields) >= 3  # schema.table.column: a table's
        for level, scope in enumerate(reversed(scopes)):
            found = False
            for source in scope.values():
                kind, sel, colnames = source
                if kind not in ("sub", "gen"):
                    continue
                expr = self.defining(sel, column, colnames)
                if expr is _UNKNOWN:
                    return False  # SELECT *, a set operation, VALUES: it may define this one
                if expr is not _MISSING:
                    found = True
                    if not self.source_ok(source, column, scopes[:len(scopes) - level], depth):
                        return False
            if found:
                return True
            if any(kind == "other" for kind, _, _ in scope.values()):
                return False  # a function's or VALUES' columns are unknown: it may be one
        return True  # a plain table's column (pgveil does not know those tables' columns)

    def source_ok(self, source: _Source, column: str, scopes: list[dict[str, _Source]],
                  depth: int) -> bool:
        kind, sel, colnames = source
        if kind in ("table", "gen"):
            return True
        if kind != "sub":
            return False
        expr = self.defining(sel, column, colnames)
        if expr is _MISSING or expr is _UNKNOWN or not _bounded_summand([expr]):
            return False
        inner = [*scopes, self.scope(sel)]  # LATERAL: the sub may read the outer FROM
        return all(self.column_ok(_strings(b.get("fields")), inner, depth + 1)
                   for k, b in _own_nodes(expr) if k == "ColumnRef")

    @staticmethod
    def defining(sel: dict[str, Any], column: str, colnames: list[str]) -> Any:
        """The select-list expression that defines ``column`` in ``sel``, with the column
        alias list applied by position; _MISSING when none does, _UNKNOWN when the select
        list cannot say (a set operation, VALUES, ``*``): then any column may come from it."""
        if sel.get("op") not in (None, "SETOP_NONE") or sel.get("valuesLists"):
            return _UNKNOWN
        for i, item in enumerate(sel.get("targetList") or []):
            n = _node(item)
            if n is None:
                continue
            val = n[1].get("val")
            name = n[1].get("name")
            if name is None:
                ref = _node(val)
                if ref is not None and ref[0] == "ColumnRef":
                    name = (_strings(ref[1].get("fields")) or [None])[-1]
                    if name == "*":
                        return _UNKNOWN
            if i < len(colnames):
                name = colnames[i]
            if name == column:
                return val
        return _MISSING


_MISSING = object()
_UNKNOWN = object()


def _nodes(value: Any, stop: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every node under ``value``, depth first; not below nodes of the ``stop`` types."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            n = _node(v)
            if n is None:
                stack.extend(v.values())
                continue
            yield n
            if n[0] not in stop:
                stack.extend(n[1].values())


def _own_nodes(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """The nodes of an expression, not descending into subqueries (they have scopes of their
    own, which _SourceTrace.find visits as SELECTs)."""
    yield from _nodes(value, ("SubLink", "SelectStmt", "RangeSubselect"))


# What pg_dump (15.8 and later) sends to set a setting only where it exists: a computed name,
# but one the WHERE clause pins to a constant (that constant is then checked like any other)
_PG_DUMP_SET_CONFIG = re.compile(
    r"\s*SELECT\s+(?:pg_catalog\.)?set_config\(\s*name\s*,\s*'[^']*'\s*,\s*false\s*\)\s+"
    r"FROM\s+(?:pg_catalog\.)?pg_settings\s+WHERE\s+name\s*=\s*'([a-z_]+)'\s*;?\s*\Z",
    re.IGNORECASE)


class _Spans:
    """Text spans (start, end) asked whether they hold an offset, in log time: the walk asks
    for every node, and a statement may have thousands of generated spans (a linear scan was
    quadratic: 18 s for a 128 KB statement of subqueries on customers). Overlapping or nested
    spans are merged; membership is the same as ``any(s <= pos < e for s, e in spans)``."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if start >= end:
                continue  # holds nothing
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [m[0] for m in merged]
        self._ends = [m[1] for m in merged]

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __contains__(self, pos: int) -> bool:
        i = bisect.bisect_right(self._starts, pos) - 1
        return i >= 0 and pos < self._ends[i]


class _Walker:
    def __init__(
        self,
        sql: str,
        cv: CompiledView,
        generated: list[tuple[int, int]],
        allowed: list[tuple[int, int]],
        aliases: dict[str, str],
        restricted: bool,
    ) -> None:
        self.cv = cv
        self.generated = _Spans(generated)
        self.allowed = _Spans(allowed)
        self.restricted = restricted
        self.sql = sql
        self.b2c = _char_offsets(sql)
        self.v = Verdict()
        self.aliases: dict[str, CompiledTable] = {}
        for ref_name, table in aliases.items():
            ct = cv.tables.get(table)
            if ct is not None:
                self.aliases[ref_name] = ct
        self.colrefs: list[list[str]] = []
        self.substituted = bool(self.aliases)
        self.packing: list[str] = []  # row-packing constructs seen (aggregates, ARRAY(), ...)
        self.scalar_subqueries = 0  # the client's (SELECT ...) used as a value
        self.window_carriers = 0  # window calls that bring another row's value
        self.value_aggregates = 0  # aggregate calls that can be one row's value
        self.accumulating = 0  # sum/avg/bit_or/... calls (see _SourceTrace)

    # -- helpers --
    def pos(self, location: Any) -> int | None:
        if not isinstance(location, int) or location < 0:
            return None
        if self.b2c is None:
            return location
        return self.b2c[location] if location < len(self.b2c) else None

    def inside(self, pos: int | None, spans: _Spans) -> bool:
        return pos is not None and pos in spans

    def generated_select(self, sel: dict[str, Any]) -> bool:
        """Is this SELECT pgveil's own text (a protected table's derived table)?"""
        for item in sel.get("targetList") or []:
            n = _node(item)
            if n is not None:
                return self.inside(self.pos(n[1].get("location")), self.generated)
        return False

    def deny(self, message: str) -> None:
        if message not in self.v.violations:
            self.v.violations.append(message)

    def add_table(self, name: str) -> None:
        if name not in self.v.tables:
            self.v.tables.append(name)

    # -- the walk --
    def run(self, node_type: str, node: dict[str, Any]) -> Verdict:
        self.v.node_type = node_type
        self.v.node = node
        self.v.kind = node_kind(node_type, node)
        stack: list[tuple[str, dict[str, Any], frozenset[str], str]] = [
            (node_type, node, frozenset(), node_type)
        ]
        while stack:
            ntype, body, ctes, stmt = stack.pop()
            self.visit(ntype, body, ctes, stmt, stack)
        self.finish_columns()
        self.check_packing()
        return self.v

    def check_packing(self) -> None:
        """Row packing on customer data by a role with a row cap: denied (SPEC §5 "bulk
        export is blocked": max_rows counts DataRows, one row may not carry a branch)."""
        limits = self.cv.view.limits
        if limits.max_rows is not None and self.scalar_subqueries > limits.max_rows:
            # each (SELECT ...) brings one row's value: more of them than max_rows in one
            # statement is a row cap spread over columns
            self.packing.append(f"{self.scalar_subqueries} scalar subqueries")
        touches = self.substituted or self.v.tables or self.v.dependents
        if self.restricted and touches and self.accumulating and not self.packing and \
                limits.max_rows is not None:
            name = _SourceTrace(self.generated_select).find({self.v.node_type: self.v.node})
            if name is not None:
                self.packing.append(f"{name}() of a value computed outside it")
        if self.restricted and touches:
            self.v.extra_carriers = self.window_carriers + max(0, self.value_aggregates - 1)
        if not (self.restricted and self.packing and touches and limits.max_rows is not None):
            return
        self.deny(f"{self.packing[0]} over customer data would pack more than max_rows "
                  f"({limits.max_rows}) rows into one; not allowed for role {self.cv.view.role}")

    def visit(
        self,
        ntype: str,
        body: dict[str, Any],
        ctes: frozenset[str],
        stmt: str,
        stack: list[tuple[str, dict[str, Any], frozenset[str], str]],
    ) -> None:
        if self.generated and self.inside(self.pos(body.get("location")), self.generated):
            # Policy text (a derived table, a row filter): every generated span is a complete
            # parenthesised expression or derived table, so a node located inside one lies
            # wholly inside it, and nothing of the client's is below it but copied literals.
            return
        if ntype.endswith("Stmt"):
            stmt = ntype
        if ntype == "RangeVar":
            self.range_var(body, ctes, stmt, target=False)
            return
        if ntype == "LockingClause":
            return  # FOR UPDATE OF <alias>: a name, not a read
        if ntype == "LockStmt":
            # LOCK TABLE takes a lock and reads nothing: audited, allowed -- but not ACCESS
            # EXCLUSIVE (also the default mode) for a masked role: until its transaction ends
            # it would stall every reader of the table, every branch's included
            for rel in body.get("relations") or []:
                n = _node(rel)
                rv = n[1] if n else rel
                if isinstance(rv, dict):
                    ct = self.cv.resolve(rv.get("schemaname") or None, str(rv.get("relname", "")))
                    if ct is not None:
                        self.add_table(ct.name)
                        if self.restricted and body.get("mode", _ACCESS_EXCLUSIVE) >= \
                                _ACCESS_EXCLUSIVE:
                            self.deny(f"LOCK TABLE {ct.name} IN ACCESS EXCLUSIVE MODE would stall "
                                      "every session reading it, other branches' included; "
                                      "not allowed for masked roles")
            return
        if ntype == "FuncCall":
            self.func_call(body)
        elif ntype == "SubLink" and body.get("subLinkType") == "ARRAY_SUBLINK":
            self.packing.append("ARRAY(subquery)")
        elif ntype == "SubLink" and body.get("subLinkType") == "EXPR_SUBLINK":
            self.scalar_subqueries += 1
        elif ntype == "TypeCast":
            # libpg_query's JSON gives typeName as a bare field dict (no "TypeName" key)
            type_name = body.get("typeName")
            wrapped = _node(type_name)
            fields = wrapped[1] if wrapped else type_name if isinstance(type_name, dict) else {}
            names = _strings(fields.get("names"))
            if names and not self.inside(self.pos(body.get("location")), self.generated):
                # a domain whose CHECK calls a function reading protected data
                dep = self.cv.resolve_dependent(names[-2] if len(names) >= 2 else None,
                                                names[-1])
                if dep is not None:
                    self.dependent(dep)
        elif ntype == "ListenStmt":
            channel = str(body.get("conditionname", ""))
            if self.restricted and not listen_allowed(self.cv, channel):
                self.deny(f"LISTEN {channel}: another session's NOTIFY payload on a channel is "
                          f"not masked; not allowed for role {self.cv.view.role} unless the "
                          "policy lists the channel in listen_channels")
        elif ntype == "VariableSetStmt":
            setting = str(body.get("name", "")).lower()
            if self.restricted and setting in ROLE_SETTINGS:
                self.deny("role switching would escape the policy")
            elif self.restricted and setting in DEBUG_SETTINGS and body.get("kind") in (
                    "VAR_SET_VALUE", "VAR_SET_CURRENT"):
                self.deny(f"{setting} {_DEBUG_REASON}")
        elif ntype == "ColumnRef":
            if not self.inside(self.pos(body.get("location")), self.generated):
                fields = _strings(body.get("fields"))
                self.colrefs.append(fields)
                if len(fields) >= 2:
                    # c.fn is fn(c) when c has no column fn (PostgreSQL's attribute notation)
                    self.attribute_call(fields[-1])
            return
        elif ntype == "A_Indirection":
            for name in _strings(body.get("indirection")):
                self.attribute_call(name)  # (c).fn, (row(..)::t).fn
        elif ntype == "A_Expr":
            op = _strings(body.get("name"))
            if op:
                # an operator whose function reads protected data (CREATE OPERATOR ... FUNCTION)
                dep = self.cv.resolve_dependent(op[-2] if len(op) >= 2 else None, op[-1])
                if dep is not None:
                    self.dependent(dep)
        # CTE scoping. Children are pushed in reverse text order so that they are visited in
        # text order (the audit record lists tables as the statement names them).
        children: list[tuple[Any, frozenset[str]]] = []
        with_clause = body.get("withClause")
        inner_ctes = ctes
        if isinstance(with_clause, dict):
            if with_clause.get("recursive"):
                # each round can append a row's values to an accumulator column
                self.packing.append("WITH RECURSIVE")
            ctes_list = with_clause.get("ctes") or []
            names: list[str] = []
            for c in ctes_list:
                n = _node(c)
                names.append(str(n[1].get("ctename", "")) if n else "")
            recursive = bool(with_clause.get("recursive"))
            for i, c in enumerate(ctes_list):
                n = _node(c)
                if not n:
                    continue
                visible = ctes | frozenset(names if recursive else names[:i])
                children.append((n[1].get("ctequery"), visible))
            inner_ctes = ctes | frozenset(n for n in names if n)
        target = None
        if ntype in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            target = body.get("relation")
            if isinstance(target, dict):
                self.range_var(target, inner_ctes, ntype, target=True)
        for key, value in body.items():
            if key == "withClause" or (target is not None and key == "relation"):
                continue
            if key == "intoClause":
                continue  # SELECT INTO / CREATE TABLE AS target: a new table, not a read
            children.append((value, inner_ctes))
        for value, scope in reversed(children):
            self.push(value, scope, stmt, stack)

    def push(
        self,
        value: Any,
        ctes: frozenset[str],
        stmt: str,
        stack: list[tuple[str, dict[str, Any], frozenset[str], str]],
    ) -> None:
        if isinstance(value, list):
            for item in reversed(value):
                self.push(item, ctes, stmt, stack)
            return
        if not isinstance(value, dict):
            return
        n = _node(value)
        if n is not None:
            stack.append((n[0], n[1], ctes, stmt))
            return
        # a bare field dict (e.g. RangeVar inside CopyStmt.relation, Alias)
        if "relname" in value:
            stack.append(("RangeVar", value, ctes, stmt))
            return
        if "funcname" in value:
            stack.append(("FuncCall", value, ctes, stmt))  # CallStmt.funccall
            return
        if str(value.get("kind", "")).startswith("VAR_"):
            # ALTER ROLE/DATABASE ... SET x: a bare VariableSetStmt
            stack.append(("VariableSetStmt", value, ctes, stmt))
            return
        for v in reversed(list(value.values())):
            self.push(v, ctes, stmt, stack)

    def range_var(self, rv: dict[str, Any], ctes: frozenset[str], stmt: str, target: bool) -> None:
        relname = str(rv.get("relname", ""))
        schema = rv.get("schemaname")
        schema = str(schema) if schema else None
        if schema is None and not target and relname in ctes:
            return
        pos = self.pos(rv.get("location"))
        in_generated = self.inside(pos, self.generated)
        ct = self.cv.resolve(schema, relname)
        if ct is not None:
            if in_generated:
                return
            self.add_table(ct.name)
            if target and self.restricted and ct.masked:
                self.write_hooks(ct.name)
            alias = rv.get("alias")
            ref_name = str(alias.get("aliasname")) if isinstance(alias, dict) and alias.get(
                "aliasname") else relname
            self.aliases.setdefault(ref_name, ct)
            if self.restricted and ct.masked and not self.inside(pos, self.allowed):
                where = stmt.removesuffix("Stmt")
                self.deny(
                    f"{ct.name} is referenced where it cannot be masked ({where} statement)"
                )
            return
        if in_generated:
            return
        dep = self.cv.resolve_dependent(schema, relname)
        if dep is not None:
            self.dependent(dep)
        if self.restricted and relname in STATS_RELATIONS and schema in (None, "pg_catalog"):
            self.deny(f"catalog statistics ({relname}) are not allowed for masked roles")
        if self.restricted and target and relname == "pg_settings" and \
                schema in (None, "pg_catalog"):
            # its rule calls set_config() with the new value: SET by another name, past the
            # checks of role switching and debug_print_* (use SET, which is checked)
            self.deny("UPDATE of pg_settings is not allowed for masked roles; use SET")
        if self.restricted and relname.startswith(ROW_COUNTER_PREFIXES) and \
                schema in (None, "pg_catalog"):
            self.deny(f"{relname} {_COUNTERS_REASON}")
        if self.restricted and relname in OTHER_SESSIONS_TEXT and schema in (None, "pg_catalog"):
            self.deny(f"{relname} {_OTHERS_REASON}")
        elif self.restricted and self.cv.hash_secret and relname in STATEMENT_TEXT_RELATIONS:
            self.deny(f"{relname} {_KEY_REASON}")

    def attribute_call(self, name: str) -> None:
        """A field name that may call a function reading protected data (``c.fn``)."""
        if name != "*":
            dep = self.cv.resolve_dependent(None, name)
            if dep is not None:
                self.dependent(dep)

    def write_hooks(self, table: str) -> None:
        """Writing ``table`` runs its triggers and rules on raw rows: each must be listed."""
        for hook in write_hooks_not_allowed(self.cv, table):
            self.deny(f"writing {table} runs {hook} (a trigger or rule) with the raw rows; "
                      f"not allowed for role {self.cv.view.role} unless the policy lists "
                      f"{hook} in allow_dependents")

    def dependent(self, dep: str) -> None:
        if dep not in self.v.dependents:
            self.v.dependents.append(dep)
        for t in self.cv.dependents.get(dep, ()):
            self.add_table(t)
        view = self.cv.view
        if self.restricted and dep not in view.allowed_dependents and not view.limits.functions:
            tables = ", ".join(self.cv.dependents.get(dep, ()))
            self.deny(f"{dep} reads protected tables ({tables}) and is not allowed for role "
                      f"{view.role}")

    def func_call(self, body: dict[str, Any]) -> None:
        names = _strings(body.get("funcname"))
        if not names:
            return
        name = names[-1].lower()
        schema = names[-2] if len(names) >= 2 else None
        if not self.inside(self.pos(body.get("location")), self.generated):
            dep = self.cv.resolve_dependent(schema, name)
            if dep is not None:
                self.dependent(dep)
        if not self.restricted:
            return
        if self.inside(self.pos(body.get("location")), self.generated):
            return
        if (
            name in DENIED_FUNCTIONS
            or name.startswith(DENIED_FUNCTION_PREFIXES)
            or name.endswith(DENIED_FUNCTION_SUFFIXES)
        ):
            self.deny(f"function {name}() reads data named in strings and is not allowed for "
                      "masked roles")
        harmless = SQL_TEXT_OVERLOADS.get(name)
        if harmless is not None:
            args = body.get("args") or []
            named = any((_node(a) or ("", {}))[0] == "NamedArgExpr" for a in args)
            if len(args) != harmless or named or body.get("func_variadic"):
                self.deny(f"function {name}() with these arguments runs SQL given as text and "
                          "is not allowed for masked roles")
        if name in OTHER_SESSIONS_TEXT:
            self.deny(f"{name}() {_OTHERS_REASON}")
        elif name.startswith(ROW_COUNTER_FUNCTIONS):
            self.deny(f"{name}() {_COUNTERS_REASON}")
        elif self.cv.hash_secret and name in STATEMENT_TEXT_FUNCTIONS:
            self.deny(f"{name}() {_KEY_REASON}")
        if body.get("over") is not None:
            if name not in RANKING_WINDOWS:
                self.window_carriers += 1
        elif name in VALUE_AGGREGATES:
            self.value_aggregates += 1
        if name in PACKING_AGGREGATES:
            self.packing.append(f"{name}()")
        elif name in ACCUMULATING_AGGREGATES:
            self.accumulating += 1
            if not _bounded_summand(body.get("args") or []):
                self.packing.append(f"{name}() of a computed value")
        elif name in PERCENTILE_AGGREGATES and not _scalar_number(
                (body.get("args") or [None])[0]):
            # percentile_disc(ARRAY[0, 0.01, ...]) WITHIN GROUP (ORDER BY col) returns one
            # value per fraction: a whole column in one row
            self.packing.append(f"{name}() of several fractions")
        if name == "setval":
            # a sequence change is seen by every session and survives ROLLBACK: setting a
            # protected table's id sequence turns the next INSERT's duplicate-key error into a
            # test of whether a hidden row exists, and breaks every branch's inserts
            self.deny("setval() is not allowed for masked roles: a sequence change is shared "
                      "by every session and not undone by ROLLBACK")
        if name == "set_config":
            args = body.get("args") or []
            first = _node(args[0]) if args else None
            setting = None
            if first and first[0] == "A_Const":
                sval = first[1].get("sval")
                if isinstance(sval, dict):
                    setting = str(sval.get("sval", ""))
            if setting is None:
                dumped = _PG_DUMP_SET_CONFIG.match(self.sql)
                setting = dumped.group(1) if dumped is not None else None
            if setting is None:
                self.deny("set_config() with a computed setting name is not allowed for masked "
                          "roles")
            elif setting.strip().lower() in ROLE_SETTINGS:
                self.deny("role switching would escape the policy")
            elif setting.strip().lower() in DEBUG_SETTINGS:
                self.deny(f"{setting.strip().lower()} {_DEBUG_REASON}")
        if self.cv.names_re is not None:
            for arg in body.get("args") or []:
                text = _const_text(arg)
                if text is not None and _looks_like_sql(text, self.cv):
                    self.deny(f"function {name}() is given SQL text that names protected data; "
                              "dynamic SQL is not followed for masked roles")
                    break

    def finish_columns(self) -> None:
        tables = list({ct.name: ct for ct in self.aliases.values()}.values())
        cols: list[str] = []

        def add(ct: CompiledTable, col: str) -> None:
            if col == "*":
                for c in ct.columns:
                    add(ct, c)
                return
            if col in ct.colview:
                qn = f"{ct.name}.{col}"
                if qn not in cols:
                    cols.append(qn)

        for fields in self.colrefs:
            if not fields:
                continue
            last = fields[-1]
            if len(fields) == 1:
                if last == "*":
                    for ct in tables:
                        add(ct, "*")
                    continue
                whole = self.aliases.get(last)
                if whole is not None:
                    add(whole, "*")
                    continue
                for ct in tables:
                    add(ct, last)
                continue
            qual = fields[-2]
            ct = self.aliases.get(qual)
            if ct is not None:
                add(ct, last)
        self.v.columns = cols


def verify(
    sql: str,
    cv: CompiledView,
    *,
    generated: list[tuple[int, int]] | None = None,
    allowed: list[tuple[int, int]] | None = None,
    aliases: dict[str, str] | None = None,
    restricted: bool = True,
) -> Verdict:
    """Check one (rewritten) statement; raises :class:`PgParseError` when PostgreSQL's grammar
    rejects it."""
    stmts = pg_parse(sql)
    if len(stmts) != 1:
        raise PgParseError(f"expected one statement, found {len(stmts)}")
    stmt = stmts[0].get("stmt") or {}
    n = _node(stmt)
    if n is None:
        raise PgParseError("empty statement")
    walker = _Walker(sql, cv, generated or [], allowed or [], aliases or {}, restricted)
    return walker.run(n[0], n[1])
