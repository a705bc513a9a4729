"""Mask at the source: replace every protected table a query reads by a masked, filtered
derived table, by splicing text at the positions sqlglot reports.

For one statement (a query or DML; EXPLAIN/PREPARE/DECLARE/COPY wrappers are peeled off by the
caller) this module:

1. parses it with sqlglot and walks every scope, minding CTE visibility (``WITH customers AS
   (...)`` shadows the table in the main query but not inside its own non-recursive body), and
   gives every ``exp.Table`` a role: a *source* (FROM/JOIN/USING, anywhere, any depth), a DML
   *target*, a lock target (``FOR UPDATE OF``), a ``SELECT INTO`` target, or a CTE reference;
2. replaces each source that is a masked protected table by ``(SELECT "id", <mask> AS "name",
   ... FROM customers WHERE <row filter> [AND <moved>] OFFSET 0) AS c`` — the alias (or the bare
   table name) and any column alias list kept, so ``*``, ``c.*``, ``row_to_json(c)``,
   ``(c).phone``, USING/NATURAL joins and correlated subqueries all see masked values;
3. moves exact lookups (``id_number = '...'``) and leakproof comparisons of unmasked columns
   (``id = $1``) from the outer WHERE into the derived table, replacing them by TRUE, so lookups
   compare raw values and indexes still apply behind the ``OFFSET 0`` fence;
4. finds unbounded reads (SPEC §4 ``unbounded: deny``).

DML rules for the statement's own target live in :mod:`rewriters.dml`. Every span cut is checked
against :mod:`rewriters.lexer` tokens; when anything does not line up the statement is denied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from sqlglot import exp

from rewriters.compiled import POSTGRES, CompiledTable, CompiledView, quote_ident
from rewriters.lexer import Tok, Token, fold, nesting_depth
from rewriters.textspan import Edit, TokenIndex

# Statements on customer data from masked roles longer than this are denied, not analysed: the
# analysis is linear but not cheap (about 25 µs per character for a long IN list), and it runs
# on the proxy's event loop.
MAX_STATEMENT_CHARS = 128 * 1024
# References to protected tables in one statement from a masked role beyond this are denied:
# each becomes a derived table with every mask, about a kilobyte of text to verify.
MAX_PROTECTED_REFERENCES = 100
# sqlglot's parser takes about twice as long for each ``ARRAY[`` nested in another (20 levels:
# 16 s, with the event loop stopped for every session); PostgreSQL allows 6 array dimensions.
# Counted over the raw text, brackets inside string literals included: a literal nesting this
# deep is denied with the rest, never read wrongly.
MAX_BRACKET_DEPTH = 8
_BRACKET = re.compile(r"[\[\]]")


class Denied(Exception):
    """The statement cannot be allowed; ``str(e)`` is the reason shown to the client.

    ``kind`` is filled in by the analyzer once it knows the statement's kind, and so are the
    names a denied PREPARE / EXECUTE (``prepared``) or DECLARE / FETCH (``cursor``) carries.
    """

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.prepared: str | None = None
        self.cursor: str | None = None


# --- parsing ---------------------------------------------------------------------------------


def parse_one(sql: str) -> exp.Expression:
    """sqlglot parse of one statement, every failure turned into :class:`Denied`."""
    if len(sql) > MAX_STATEMENT_CHARS:
        raise Denied(f"statement too large to analyse ({len(sql)} characters)")
    if sql.count("[") > MAX_BRACKET_DEPTH and nesting_depth(sql, _BRACKET, "[") > MAX_BRACKET_DEPTH:
        raise Denied(f"statement nests brackets more than {MAX_BRACKET_DEPTH} deep (PostgreSQL "
                     "allows arrays of 6 dimensions)")
    try:
        trees = POSTGRES.parse(sql)
    except RecursionError:
        raise Denied("statement nested too deeply to analyse") from None
    except Exception as e:  # noqa: BLE001 - sqlglot raises many types; all mean "cannot read"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Denied(f"{type(e).__name__}: {first[:200]}") from None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        raise Denied(f"expected one statement, sqlglot read {len(trees)}")
    tree = trees[0]
    if isinstance(tree, exp.Command):
        raise Denied(f"sqlglot cannot read {str(tree.this).upper()} statements")
    return tree


def ident_value(node: exp.Expression | None) -> str | None:
    """The name an sqlglot Identifier denotes, folded like PostgreSQL folds unquoted names."""
    if isinstance(node, exp.Identifier):
        return node.this if node.quoted else fold(node.this)
    return None


# --- table references ------------------------------------------------------------------------


@dataclass
class Ref:
    """One ``exp.Table`` node and what it is in its statement."""

    node: exp.Table
    role: str  # source | target | lock | into | cte | other
    table: CompiledTable | None  # the protected table it denotes (None: not protected)
    top: bool = False  # the top-level DML statement's own target

    @property
    def ref_name(self) -> str:
        """The name the rest of the query uses for this relation (alias or bare name)."""
        alias = self.node.args.get("alias")
        if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier):
            return ident_value(alias.this) or ""
        return ident_value(self.node.this) or ""

    def alias_columns(self) -> list[str]:
        alias = self.node.args.get("alias")
        if isinstance(alias, exp.TableAlias):
            return [ident_value(c) or "" for c in alias.columns]
        return []

    def outer_to_inner(self, name: str) -> str | None:
        """The table column an outer column name denotes, through a column alias list."""
        assert self.table is not None
        renamed = self.alias_columns()
        if name in renamed:
            i = renamed.index(name)
            return self.table.columns[i] if i < len(self.table.columns) else None
        cols = self.table.columns
        if name in cols and cols.index(name) >= len(renamed):
            return name
        return None


def _with_scopes(
    node: exp.Expression, ctes: frozenset[str]
) -> list[tuple[exp.Expression, frozenset[str]]]:
    """Children of ``node`` with the CTE names visible in each (PostgreSQL's rules)."""
    with_ = node.args.get("with_")
    if not isinstance(with_, exp.With):
        return [(c, ctes) for c in node.iter_expressions()]
    names: list[str] = []
    for cte in with_.expressions:
        alias = cte.args.get("alias")
        names.append((ident_value(alias.this) or "") if isinstance(alias, exp.TableAlias) else "")
    recursive = bool(with_.args.get("recursive"))
    out: list[tuple[exp.Expression, frozenset[str]]] = []
    for i, cte in enumerate(with_.expressions):
        visible = ctes | frozenset(names if recursive else names[:i])
        out.extend((c, visible) for c in cte.iter_expressions())
    inner = ctes | frozenset(n for n in names if n)
    for c in node.iter_expressions():
        if c is not with_:
            out.append((c, inner))
    return out


def _table_role(t: exp.Table) -> str:
    parent = t.parent
    key = t.arg_key
    if isinstance(parent, exp.Lock):
        return "lock"
    if isinstance(parent, exp.Into):
        return "into"
    if isinstance(parent, exp.Schema):
        grand = parent.parent
        if isinstance(grand, exp.Insert) and parent.arg_key == "this":
            return "target"
        return "other"
    if isinstance(parent, (exp.Update, exp.Delete, exp.Merge, exp.Insert)) and key == "this":
        return "target"
    if isinstance(parent, (exp.Create, exp.Copy, exp.Drop, exp.Alter)):
        return "other"
    return "source"


def collect_refs(tree: exp.Expression, cv: CompiledView) -> list[Ref]:
    """Every table reference of the statement with its role (iterative: deep trees are fine)."""
    refs: list[Ref] = []
    stack: list[tuple[exp.Expression, frozenset[str]]] = [(tree, frozenset())]
    while stack:
        node, ctes = stack.pop()
        if isinstance(node, exp.Table) and isinstance(node.this, exp.Identifier):
            role = _table_role(node)
            name = ident_value(node.this) or ""
            db = ident_value(node.args.get("db"))
            if role == "source" and db is None and name in ctes:
                role = "cte"
            table = cv.resolve(db, name) if role != "cte" else None
            top = role == "target" and (
                node.parent is tree or (node.parent is not None and node.parent.parent is tree)
            )
            refs.append(Ref(node, role, table, top))
        stack.extend(reversed(_with_scopes(node, ctes)))
    return refs


# --- spans -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lit:
    """A literal or parameter operand, as text: ``'abc'``, ``-5``, ``$1``."""

    start: int
    end: int
    kind: str  # string | number | param
    value: str


def _meta_span(node: exp.Expression) -> tuple[int, int] | None:
    m = node.meta
    if "start" in m and "end" in m:
        return int(m["start"]), int(m["end"]) + 1
    return None


def literal_operand(node: exp.Expression, idx: TokenIndex) -> Lit | None:
    """The exact text of a plain literal / ``-number`` / ``$n`` operand, checked on tokens."""
    if isinstance(node, exp.Literal):
        span = _meta_span(node)
        if span is None:
            return None
        i = idx.at(span[0])
        if i is None:
            return None
        tok = idx.sig[i]
        if tok.end != span[1]:
            return None
        if node.is_string and tok.kind is Tok.STRING and tok.text[:1] not in "nN":
            return Lit(tok.start, tok.end, "string", str(node.this))
        if not node.is_string and tok.kind is Tok.NUMBER:
            return Lit(tok.start, tok.end, "number", tok.text)
        return None
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
        inner = literal_operand(node.this, idx)
        if inner is None or inner.kind != "number":
            return None
        i = idx.at(inner.start)
        if i is None or i == 0:
            return None
        minus = idx.sig[i - 1]
        if minus.kind is not Tok.OP or minus.text != "-":
            return None
        return Lit(minus.start, inner.end, "number", "-" + inner.value)
    if isinstance(node, exp.Parameter) and isinstance(node.this, exp.Literal):
        span = _meta_span(node.this)
        if span is None:
            return None
        i = idx.containing(span[0])
        if i is None:
            return None
        tok = idx.sig[i]
        if tok.kind is not Tok.PARAM or tok.start != span[0] - 1 or tok.end != span[1]:
            return None
        return Lit(tok.start, tok.end, "param", tok.text)
    return None


def column_tokens(col: exp.Column, idx: TokenIndex) -> tuple[int, int] | None:
    """(first, last) significant-token indices of a column reference ``[db.][table.]name``."""
    parts = [p for p in (col.args.get("db"), col.args.get("table"), col.this) if p is not None]
    if not all(isinstance(p, exp.Identifier) for p in parts):
        return None
    first_span = _meta_span(parts[0])
    last_span = _meta_span(parts[-1])
    if first_span is None or last_span is None:
        return None
    first = idx.at(first_span[0])
    last = idx.at(last_span[0])
    if first is None or last is None or idx.sig[last].end != last_span[1]:
        return None
    values = [ident_value(p) or "" for p in parts]
    if not idx.name_tokens(first, last, values):
        return None
    return first, last


_CMP: dict[type, str] = {exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=",
                         exp.GT: ">", exp.GTE: ">="}
_FLIP = {"=": "=", "<>": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_OP_TEXT = {"=": ("=",), "<>": ("<>", "!="), "<": ("<",), "<=": ("<=",), ">": (">",),
            ">=": (">=",)}


@dataclass
class Simple:
    """A conjunct ``col <op> literal`` / ``literal <op> col`` / ``col IN (literals)``."""

    column: exp.Column
    op: str  # from the column's side
    values: list[Lit]
    start: int  # text span of the whole conjunct
    end: int
    is_in: bool = False


def conjuncts(expr: exp.Expression | None) -> list[exp.Expression]:
    """Top-level AND operands (through parentheses), left to right."""
    out: list[exp.Expression] = []
    if expr is None:
        return out
    pending = [expr]
    while pending:
        n = pending.pop()
        inner = n
        while isinstance(inner, exp.Paren):
            inner = inner.this
        if isinstance(inner, exp.And):
            pending.append(inner.expression)
            pending.append(inner.this)
        else:
            out.append(inner)
    return out


def match_simple(conj: exp.Expression, idx: TokenIndex) -> Simple | None:
    """Recognise a movable conjunct and verify its exact token span."""
    sig = idx.sig
    if type(conj) in _CMP:
        op = _CMP[type(conj)]
        left, right = conj.this, conj.expression
        if isinstance(left, exp.Column) and not isinstance(left.this, exp.Star):
            col, other, col_first = left, right, True
        elif isinstance(right, exp.Column) and not isinstance(right.this, exp.Star):
            col, other, col_first = right, left, False
            op = _FLIP[op]
        else:
            return None
        lit = literal_operand(other, idx)
        ct = column_tokens(col, idx)
        if lit is None or ct is None:
            return None
        first, last = ct
        if col_first:
            j = idx.at(lit.start)
            if j is None or j != last + 2:
                return None
            optok = sig[last + 1]
            start, end = sig[first].start, lit.end
        else:
            k = idx.containing(lit.end - 1)
            if k is None or first != k + 2:
                return None
            optok = sig[k + 1]
            start, end = lit.start, sig[last].end
        allowed = _OP_TEXT[_CMP[type(conj)]]
        if optok.kind is not Tok.OP or optok.text not in allowed:
            return None
        return Simple(col, op, [lit], start, end)
    if isinstance(conj, exp.In) and isinstance(conj.this, exp.Column):
        if conj.args.get("query") or conj.args.get("unnest") or conj.args.get("field"):
            return None
        items = conj.expressions
        if not items:
            return None
        lits = [literal_operand(x, idx) for x in items]
        ct = column_tokens(conj.this, idx)
        if ct is None or any(v is None for v in lits):
            return None
        first, last = ct
        values = [v for v in lits if v is not None]
        # col IN ( v1 , v2 ... )
        expect = last + 1
        if expect >= len(sig) or sig[expect].keyword != "in":
            return None
        if expect + 1 >= len(sig) or sig[expect + 1].text != "(":
            return None
        pos = expect + 2
        for n, v in enumerate(values):
            if n:
                if sig[pos].text != ",":
                    return None
                pos += 1
            j = idx.at(v.start)
            if j is None:
                return None
            if v.kind == "number" and v.value.startswith("-"):
                if j != pos:
                    return None
                pos = j + 2
            else:
                if j != pos:
                    return None
                pos = j + 1
        if pos >= len(sig) or sig[pos].text != ")":
            return None
        return Simple(conj.this, "=", values, sig[first].start, sig[pos].end, is_in=True)
    return None


def literal_fits(ct: CompiledTable, col: str, values: list[Lit]) -> bool:
    """Would comparing ``col`` with these operands use the column type's own (leakproof)
    operator? Integer columns take integer numbers, strings or parameters; the other leakproof
    types take strings or parameters (a string literal is coerced to the column's type)."""
    for v in values:
        if v.kind == "param" or v.kind == "string":
            continue
        if v.kind == "number" and col in ct.integer_cols:
            digits = v.value.lstrip("-")
            if digits.isdigit():
                continue
        return False
    return True


def condition_text(
    sql: str, qualifier: str | None, col: str, simple: Simple
) -> str:
    """A moved condition, with the comparison operator pinned to pg_catalog (a user-defined
    ``=`` earlier on the search_path must not see raw values)."""
    colref = (quote_ident(qualifier) + "." if qualifier else "") + quote_ident(col)
    op = "<>" if simple.op == "<>" else simple.op
    parts = [f"{colref} OPERATOR(pg_catalog.{op}) {sql[v.start:v.end]}" for v in simple.values]
    if len(parts) == 1:
        return parts[0]
    return "(" + " OR ".join(parts) + ")"


# --- blocks ----------------------------------------------------------------------------------


def enclosing_block(t: exp.Expression) -> exp.Expression | None:
    """The query block (Select / Update / Delete / ...) whose FROM list holds table ``t``."""
    node: exp.Expression | None = t.parent
    prev: exp.Expression = t
    while node is not None:
        if isinstance(node, (exp.Select, exp.Update, exp.Delete, exp.Insert, exp.Merge)):
            return node
        if isinstance(node, exp.Subquery):
            # Only a parenthesised join ``(a JOIN b)`` is transparent; a derived table is not.
            if not isinstance(node.this, exp.Table) or node.this is not prev:
                return None
        elif not isinstance(node, (exp.From, exp.Join, exp.Table)):
            return None
        prev = node
        node = node.parent
    return None


def block_sources(block: exp.Expression) -> tuple[int, bool]:
    """(number of FROM items, any outer join) for one query block (its own level only)."""
    count = 0
    outer = False
    pending: list[exp.Expression] = []
    frm = block.args.get("from_")
    if isinstance(frm, exp.From):
        pending.append(frm.this)
    for j in block.args.get("joins") or []:
        pending.append(j)
    while pending:
        n = pending.pop()
        if isinstance(n, exp.Join):
            if n.side:
                outer = True
            pending.append(n.this)
            continue
        if isinstance(n, exp.Subquery) and isinstance(n.this, exp.Table):
            pending.append(n.this)
            continue
        count += 1
        if isinstance(n, exp.Table):
            for j in n.args.get("joins") or []:
                pending.append(j)
    return count, outer


def resolve_column(col: exp.Column, ref: Ref, single_source: bool) -> str | None:
    """The column of ``ref``'s table that ``col`` denotes, or None."""
    if ref.table is None or isinstance(col.this, exp.Star):
        return None
    name = ident_value(col.this)
    if name is None:
        return None
    qual = ident_value(col.args.get("table"))
    db = ident_value(col.args.get("db"))
    if qual is None:
        if not single_source:
            return None
    else:
        if qual != ref.ref_name:
            return None
        if db is not None and (ref.node.args.get("alias") is not None or db != ref.table.schema):
            return None
    return ref.outer_to_inner(name)


# --- the substitution ------------------------------------------------------------------------


@dataclass
class SourceEdit:
    edit: Edit
    ref: Ref


@dataclass
class Substitution:
    edits: list[Edit] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    lookup_values: int = 0  # values the lookups present (metered against the quota)
    substituted: list[Ref] = field(default_factory=list)


def source_edit(ref: Ref, idx: TokenIndex, extra: list[str]) -> Edit:
    """The edit that replaces one protected source reference by its derived table."""
    t = ref.node
    ct = ref.table
    assert ct is not None
    parts = [p for p in (t.args.get("catalog"), t.args.get("db"), t.this) if p is not None]
    spans = [_meta_span(p) for p in parts]
    if any(s is None for s in spans):
        raise Denied(f"cannot locate the reference to {ct.name}")
    first = idx.at(spans[0][0])  # type: ignore[index]
    last = idx.at(spans[-1][0])  # type: ignore[index]
    values = [ident_value(p) or "" for p in parts]
    if first is None or last is None or not idx.name_tokens(first, last, values):
        raise Denied(f"cannot locate the reference to {ct.name}")
    sig = idx.sig
    name_start = sig[first].start
    end = sig[last].end
    before = first - 1
    if before >= 0 and sig[before].keyword == "only":
        name_start = sig[before].start
        before -= 1
    elif (
        before >= 1
        and sig[before].text == "("
        and sig[before - 1].keyword == "only"
        and last + 1 < len(sig)
        and sig[last + 1].text == ")"
    ):
        name_start = sig[before - 1].start
        end = sig[last + 1].end
        before -= 2
    if last + 1 < len(sig) and sig[last + 1].kind is Tok.OP and sig[last + 1].text == "*":
        end = sig[last + 1].end  # ``customers *``: include descendant tables (the default)
    if t.args.get("sample") is not None:
        return _sampled_edit(ref, idx, name_start, end, extra)
    derived = ct.derived(idx.sql[name_start:end], extra)
    if before >= 0 and sig[before].keyword == "table":
        # ``TABLE customers`` is ``SELECT * FROM customers``.
        head = "SELECT * FROM "
        text = f"{head}{derived} AS {quote_ident(ct.bare if not t.args.get('alias') else ref.ref_name)}"
        return Edit(sig[before].start, end, text, ((len(head), len(head) + len(derived)),))
    if t.args.get("alias") is not None:
        return Edit(name_start, end, derived, ((0, len(derived)),))
    text = f"{derived} AS {quote_ident(ref.ref_name)}"
    return Edit(name_start, end, text, ((0, len(derived)),))


# what a TABLESAMPLE clause moved into a derived table may hold: its keywords, the method's
# name, numbers, parameters and arithmetic -- no name that could read a table
_SAMPLE_TOKENS = (Tok.NUMBER, Tok.PARAM)
_SAMPLE_TEXT = frozenset({"(", ")", ",", "+", "-", "*", "/"})


def _sampled_edit(ref: Ref, idx: TokenIndex, name_start: int, name_end: int,
                  extra: list[str]) -> Edit:
    """``customers [AS] c TABLESAMPLE m (args) [REPEATABLE (seed)]``: PostgreSQL samples only
    a table, so the clause moves into the derived table, onto the table it sampled (rows are
    sampled before the row filter, as they were before the WHERE), and the alias stays
    outside: ``(SELECT ... FROM customers TABLESAMPLE m (args) WHERE <filter> ...) c``."""
    ct = ref.table
    assert ct is not None
    sig = idx.sig
    named = idx.containing(name_end - 1)
    assert named is not None
    i, depth = named + 1, 0  # past the alias and its column list, to the clause
    while i < len(sig) and not (depth == 0 and sig[i].keyword == "tablesample"):
        tok = sig[i]
        if tok.kind is Tok.PUNCT:
            if tok.text == "(":
                depth += 1
            elif tok.text == ")":
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and tok.text in (",", ";"):
                break
        i += 1
    if i >= len(sig) or sig[i].keyword != "tablesample":
        raise Denied(f"cannot locate the TABLESAMPLE clause of {ct.name}")
    start = i
    i += 1
    while i < len(sig) and (sig[i].kind in (Tok.IDENT, Tok.QIDENT) or sig[i].text == "."):
        i += 1  # the method's name, perhaps schema-qualified
    end_i = None
    for clause in range(2):
        if i >= len(sig) or sig[i].text != "(":
            break
        depth = 0
        while i < len(sig):
            tok = sig[i]
            if tok.text == "(":
                depth += 1
            elif tok.text == ")":
                depth -= 1
            elif tok.kind not in _SAMPLE_TOKENS and tok.text not in _SAMPLE_TEXT:
                raise Denied(f"TABLESAMPLE arguments of {ct.name} may only be numbers and "
                             "parameters")
            i += 1
            if depth == 0:
                break
        end_i = i - 1
        if clause == 0 and i < len(sig) and sig[i].keyword == "repeatable":
            i += 1
        else:
            break
    if end_i is None or sig[end_i].text != ")":
        raise Denied(f"cannot locate the TABLESAMPLE clause of {ct.name}")
    clause_text = idx.sql[sig[start].start:sig[end_i].end]
    alias_text = idx.sql[name_end:sig[start].start].rstrip()
    derived = ct.derived(f"{idx.sql[name_start:name_end]} {clause_text}", extra)
    if ref.node.args.get("alias") is None:
        alias_text = f" AS {quote_ident(ref.ref_name)}"
    return Edit(name_start, sig[end_i].end, derived + alias_text, ((0, len(derived)),))


def lookup_values(qn: str, simple: Simple, cv: CompiledView) -> int:
    """How many values an exact lookup on ``qn`` presents; more than the role allows is
    denied: a list of candidates for the digits a mask hides would recover them."""
    n = len(simple.values)
    cap = cv.view.limits.lookup_max_values
    if n > cap:
        raise Denied(f"a lookup on {qn} may present at most {cap} values at once for role "
                     f"{cv.view.role} (lookup_max_values); this one has {n}")
    return n


def substitute(
    tree: exp.Expression, refs: list[Ref], idx: TokenIndex, cv: CompiledView
) -> Substitution:
    """Replace masked protected sources; move lookups / leakproof conjuncts into them."""
    out = Substitution()
    moved_spans: set[tuple[int, int]] = set()
    block_info: dict[int, tuple[int, bool]] = {}
    for ref in refs:
        if ref.role != "source" or ref.table is None or not ref.table.masked:
            continue
        ct = ref.table
        extra: list[str] = []
        block = enclosing_block(ref.node)
        if isinstance(block, exp.Select) and (ct.row_filter is not None or ct.lookup_cols):
            info = block_info.get(id(block))
            if info is None:
                info = block_sources(block)
                block_info[id(block)] = info
            count, outer = info
            where = block.args.get("where")
            if not outer and isinstance(where, exp.Where):
                for conj in conjuncts(where.this):
                    simple = match_simple(conj, idx)
                    if simple is None or (simple.start, simple.end) in moved_spans:
                        continue
                    col = resolve_column(simple.column, ref, single_source=count == 1)
                    if col is None:
                        continue
                    lookup = col in ct.lookup_cols and simple.op == "=" and all(
                        v.kind in ("string", "param") for v in simple.values)
                    leak = (
                        ct.row_filter is not None
                        and col in ct.leakproof_cols
                        and literal_fits(ct, col, simple.values)
                    )
                    if not (lookup or leak):
                        continue
                    extra.append(condition_text(idx.sql, None, col, simple))
                    moved_spans.add((simple.start, simple.end))
                    out.edits.append(Edit(simple.start, simple.end, "TRUE"))
                    if lookup and col in ct.masked_cols:
                        qn = f"{ct.name}.{col}"
                        out.lookup_values += lookup_values(qn, simple, cv)
                        if qn not in out.lookups:
                            out.lookups.append(qn)
        out.edits.append(source_edit(ref, idx, extra))
        out.substituted.append(ref)
    return out


# --- unbounded reads -------------------------------------------------------------------------


def _has_limit(q: exp.Expression) -> bool:
    """A LIMIT / FETCH FIRST of a number or a parameter (not ALL, NULL or an expression):
    with one, the read is bounded, and max_rows on the wire stops it at the role's cap
    whatever the number (SPEC: unbounded is "neither a filter nor a LIMIT")."""
    lim = q.args.get("limit")
    value: exp.Expression | None = None
    if isinstance(lim, exp.Limit):
        value = lim.expression
    elif isinstance(lim, exp.Fetch):
        value = lim.args.get("count")
    while isinstance(value, exp.Paren):
        value = value.this
    if isinstance(value, exp.Parameter):
        return True
    if not isinstance(value, exp.Literal) or value.is_string:
        return False
    try:
        return Decimal(str(value.this)) >= 0
    except InvalidOperation:
        return False


def _single_row_aggregate(q: exp.Select) -> bool:
    if q.args.get("group"):
        return False
    for e in q.expressions:
        for agg in e.find_all(exp.AggFunc):
            if agg.find_ancestor(exp.Window) is None:
                return True
    return False


def _has_predicate(q: exp.Select) -> bool:
    where = q.args.get("where")
    return isinstance(where, exp.Where) and where.find(exp.Column) is not None


def unbounded_read(tree: exp.Expression, refs: list[Ref]) -> CompiledTable | None:
    """The protected table a top-level query reads with neither a WHERE predicate nor a
    LIMIT (and not as a single-row aggregate), following derived tables and CTEs of the top
    level; None when bounded."""
    by_node = {id(r.node): r for r in refs}
    ctes: dict[str, exp.Expression] = {}
    for cte in tree.find_all(exp.CTE):
        alias = cte.args.get("alias")
        if isinstance(alias, exp.TableAlias):
            name = ident_value(alias.this)
            if name:
                ctes.setdefault(name, cte.this)
    seen: set[int] = set()

    def check(q: exp.Expression | None) -> CompiledTable | None:
        if q is None or id(q) in seen:
            return None
        seen.add(id(q))
        while isinstance(q, exp.Subquery):
            if _has_limit(q):
                return None
            q = q.this
        if isinstance(q, exp.SetOperation):
            if _has_limit(q):
                return None
            return check(q.this) or check(q.expression)
        if not isinstance(q, exp.Select):
            return None
        if _has_limit(q) or _single_row_aggregate(q) or _has_predicate(q):
            return None
        pending: list[exp.Expression] = []
        frm = q.args.get("from_")
        if isinstance(frm, exp.From):
            pending.append(frm.this)
        pending.extend(q.args.get("joins") or [])
        while pending:
            n = pending.pop()
            if isinstance(n, (exp.Join, exp.Lateral)):
                pending.append(n.this)
                continue
            if isinstance(n, exp.Table):
                pending.extend(n.args.get("joins") or [])
                ref = by_node.get(id(n))
                if ref is None:
                    continue
                if ref.role == "cte":
                    hit = check(ctes.get(ident_value(n.this) or ""))
                    if hit:
                        return hit
                elif ref.table is not None:
                    return ref.table
                continue
            if isinstance(n, exp.Subquery):
                hit = check(n)
                if hit:
                    return hit
        return None

    return check(tree)


def significant_before(idx: TokenIndex, pos: int) -> Token | None:
    i = idx.containing(pos)
    if i is None or i == 0:
        return None
    return idx.sig[i - 1]
