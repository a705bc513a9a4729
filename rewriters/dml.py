"""INSERT / UPDATE / DELETE / MERGE on a protected table by a masked role.

A DML target cannot be replaced by a derived table, so its rows are read raw by WHERE, SET and
RETURNING. The rules (SPEC §5 "rows out of scope are invisible and untouchable"):

* UPDATE and DELETE reach only rows inside the row filter. The WHERE becomes
  ``<moved> AND (<filter>) AND CASE WHEN (<filter>) THEN (<user WHERE>) ELSE false END``: the
  CASE makes PostgreSQL evaluate the user's predicate only on rows inside the filter (a plain AND
  may run ``1/(id-13)`` first and leak that row 13 exists through the error), while exact lookups
  and leakproof comparisons of unmasked columns are moved in front so indexes still apply.
* WHERE and SET expressions may not read masked columns (that would filter on, or copy, raw
  values) — except top-level ``lookup`` conjuncts and ``SET col = col``; ``RETURNING`` of a
  masked column (or ``*`` / the whole row) is denied rather than rewritten, because ``*`` there
  spans every FROM/USING item and a rewrite that misses one leaks.
* UPDATE may not SET a column the row filter reads, unless to the very literal the filter
  requires; INSERT into a filtered table is allowed only when VALUES provably satisfy the filter
  (a plain conjunction of ``col = literal``); ``ON CONFLICT DO UPDATE`` on a masked table is
  denied; ``WHERE CURRENT OF`` is denied (the cursor reads the masked derived table).
* Keys (existence oracles): a duplicate-key or foreign-key error names the key, so writing an
  explicit value to a unique column of a filtered table (or a masked unique column) is denied,
  and a foreign-key value into a table filtered for the operator is wrapped so that a parent the
  operator cannot see fails exactly like an absent one (:func:`_key_value`). These rules apply
  to every protected target, masked or not (a manager's unfiltered ``orders`` still point into
  the filtered ``customers``).
* MERGE involving a protected table is denied; INSERT/UPDATE of an unprotected table reading
  protected tables is denied (it copies customer data out of the audited, capped path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from sqlglot import exp

from rewriters.compiled import CompiledTable, CompiledView, FilterLiteral, quote_ident
from rewriters.model import EXECUTION_CHECK_REASON, FAILING_PREFIX
from rewriters.substitute import (
    Denied,
    Ref,
    Simple,
    collect_refs,
    condition_text,
    conjuncts,
    ident_value,
    literal_fits,
    literal_operand,
    lookup_values,
    match_simple,
    resolve_column,
)
from rewriters.textspan import Edit, TokenIndex


@dataclass
class DmlResult:
    edits: list[Edit] = field(default_factory=list)
    target_span: tuple[int, int] | None = None
    lookups: list[str] = field(default_factory=list)
    lookup_values: int = 0
    reasons: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # messages of the checks written in
    # RETURNING reads masked columns of the target: rewriters.analyze.masked_returning runs it
    # over the masked row instead
    mask_returning: bool = False


def reads_masked(expr: exp.Expression | None, ct: CompiledTable, ref_name: str) -> str | None:
    """Name of a masked column of the target that ``expr`` may read (``*``: the whole row),
    or None: :func:`reads_masked_source` with the target as the only source."""
    if expr is None:
        return None
    hit = reads_masked_source(expr, {ref_name: ct} if ct.masked_cols else {})
    return hit[1] if hit is not None else None


def _masked_sources(tree: exp.Expression, target: Ref,
                    cv: CompiledView) -> dict[str, CompiledTable]:
    """The other protected relations of the statement (FROM/USING items, subqueries) that have
    masked columns, by the name the statement uses for them."""
    return {r.ref_name: r.table for r in collect_refs(tree, cv)
            if r.node is not target.node and r.table is not None and r.table.masked_cols}


def reads_masked_source(expr: exp.Expression, sources: dict[str, CompiledTable]
                        ) -> tuple[CompiledTable, str] | None:
    """(table, column) of a masked column of one of ``sources`` (by the name the statement
    uses for them) that ``expr`` may read, column ``*`` for a whole row; or None.

    Conservative: an unqualified name any of them masks counts, also in subqueries, where it
    may be a correlated reference; so does a whole row (``customers``, ``(c).phone``,
    ``c.*``)."""
    if not sources:
        return None
    for col in expr.find_all(exp.Column):
        qual = ident_value(col.args.get("table"))
        if isinstance(col.this, exp.Star):
            if qual in sources:
                return sources[qual], "*"
            continue
        name = ident_value(col.this)
        if name is None:
            continue
        if qual is not None:
            t = sources.get(qual)
            if t is not None and name in t.masked_cols:
                return t, name
            continue
        if name in sources:
            return sources[name], "*"
        for t in sources.values():
            if name in t.masked_cols:
                return t, name
    return None


def _what(ct: CompiledTable, col: str) -> str:
    if col == "*":
        return f"the whole row of {ct.name} (it has masked columns)"
    return f"of masked column {ct.name}.{col}"


def _returning_check(tree: exp.Expression, ct: CompiledTable, ref_name: str,
                     res: DmlResult) -> None:
    """RETURNING that reads masked columns of the target (``*`` included, which pgjdbc adds
    for getGeneratedKeys) is evaluated over the masked row: ``res.mask_returning``. Not when
    other relations join in (UPDATE ... FROM, DELETE ... USING): their ``*`` would be lost."""
    ret = tree.args.get("returning")
    if not isinstance(ret, exp.Returning) or not ct.masked_cols:
        return
    for c in ret.find_all(exp.Column):
        if c.table and c.table.lower() in ("old", "new"):
            # PostgreSQL 18's RETURNING old.col / new.col: the target's rows by other names
            raise Denied(f"RETURNING old.* / new.* of {ct.name} is not supported for masked "
                         "roles")
    star = any(isinstance(e, exp.Star) for e in ret.expressions)
    col = "*" if star else reads_masked(ret, ct, ref_name)
    if col is None:
        return
    if tree.args.get("from_") or tree.args.get("using"):  # (sqlglot: False when absent)
        if star:
            raise Denied(f"RETURNING * of {ct.name} would return masked columns")
        raise Denied(f"RETURNING {_what(ct, col)} is not allowed with FROM or USING")
    res.mask_returning = True


def target_name_span(ref: Ref, idx: TokenIndex) -> tuple[int, int]:
    """Text span of the target's name (with ``ONLY``), checked on tokens."""
    t = ref.node
    parts = [p for p in (t.args.get("catalog"), t.args.get("db"), t.this) if p is not None]
    metas = [p.meta for p in parts]
    if not all("start" in m for m in metas):
        raise Denied("cannot locate the DML target")
    first = idx.at(int(metas[0]["start"]))
    last = idx.at(int(metas[-1]["start"]))
    values = [ident_value(p) or "" for p in parts]
    if first is None or last is None or not idx.name_tokens(first, last, values):
        raise Denied("cannot locate the DML target")
    start = idx.sig[first].start
    if first > 0 and idx.sig[first - 1].keyword == "only":
        start = idx.sig[first - 1].start
    return start, idx.sig[last].end


def _where_region(idx: TokenIndex, after: int) -> tuple[int | None, int, int]:
    """(index of the depth-0 WHERE keyword or None, offset where the WHERE body ends,
    offset where a new WHERE clause would go) for the statement's top level."""
    depths = idx.depths()
    sig = idx.sig
    where_i = None
    end_i = len(sig)
    for i in range(len(sig)):
        t = sig[i]
        if t.start < after or depths[i] != 0:
            continue
        kw = t.keyword
        if kw == "where" and where_i is None:
            where_i = i
        elif kw == "returning":
            end_i = i
            break
    body_end = sig[end_i - 1].end if end_i > 0 else 0
    return where_i, body_end, body_end


def _same_literal(node: exp.Expression, want: FilterLiteral) -> bool:
    if not isinstance(node, exp.Literal):
        return False
    if bool(node.is_string) != want.is_string:
        return False
    if want.is_string:
        return str(node.this) == want.value
    try:
        return Decimal(str(node.this)) == Decimal(want.value)
    except InvalidOperation:
        return False


def _stays_inside(ct: CompiledTable, col: str, value: exp.Expression, idx: TokenIndex
                  ) -> tuple[tuple[int, int], str]:
    """An UPDATE that sets a column the row filter reads to a literal or parameter (an ORM
    writing every column back, an order moved to another customer of the branch): the span of
    that value and the filter with it in place of the column, for a check as each row is
    written (:func:`failing`). Anything else, or a filter reading other columns too, is
    refused: the new row could not be shown to stay inside."""
    lit = literal_operand(value, idx)
    cond = None
    if lit is not None and ct.filter_outer_cols == [col]:
        cond = ct.filter_with({col: idx.sql[lit.start:lit.end]})
    if lit is None or cond is None:
        raise Denied(f"UPDATE of {ct.name}.{col} could move rows out of the row filter")
    return (lit.start, lit.end), cond


def _assignments(tree: exp.Expression,
                 ct: CompiledTable) -> list[tuple[exp.Column, exp.Expression]]:
    """An UPDATE's SET as (column, value) pairs: ``col = v`` and ``(a, b) = (v, w)`` (which
    some query builders send); a row value from a subquery or ROW() is not followed."""
    pairs: list[tuple[exp.Column, exp.Expression]] = []
    for item in tree.expressions:
        if isinstance(item, exp.EQ) and isinstance(item.this, exp.Column):
            pairs.append((item.this, item.expression))
            continue
        cols = item.this.expressions if isinstance(item, exp.EQ) and \
            isinstance(item.this, exp.Tuple) else None
        vals = item.expression.expressions if cols is not None and \
            isinstance(item.expression, exp.Tuple) else None
        if cols is None or vals is None or len(cols) != len(vals) or \
                not all(isinstance(c, exp.Column) for c in cols):
            raise Denied(f"UPDATE of {ct.name}: only SET column = value and "
                         "(column, ...) = (value, ...) are supported")
        pairs.extend(zip(cols, vals, strict=True))
    return pairs


def _update_or_delete(
    tree: exp.Expression, ref: Ref, ct: CompiledTable, idx: TokenIndex, res: DmlResult,
    cv: CompiledView,
) -> None:
    ref_name = ref.ref_name
    verb = "UPDATE" if isinstance(tree, exp.Update) else "DELETE"
    if isinstance(tree, exp.Update):
        sources = _masked_sources(tree, ref, cv)
        for target, value in _assignments(tree, ct):
            col = ident_value(target.this)
            if col is None:
                raise Denied(f"{verb} of {ct.name}: cannot read the SET target")
            same = (
                isinstance(value, exp.Column)
                and ident_value(value.this) == col
                and ident_value(value.args.get("table")) in (None, ref_name)
            )
            if not same:
                read = reads_masked(value, ct, ref_name)
                if read is not None:
                    raise Denied(f"UPDATE may not read {_what(ct, read).removeprefix('of ')}")
                other = reads_masked_source(value, sources)
                if other is not None:  # it would store the masked text as the real value
                    raise Denied(f"UPDATE may not write the masked value of "
                                 f"{other[0].name}.{other[1]}")
            check: tuple[tuple[int, int], str] | None = None
            if col in ct.filter_cols and not same:
                want = (ct.filter_eq or {}).get(col)
                if want is not None and isinstance(value, exp.Literal) and \
                        not _same_literal(value, want):  # known to leave it
                    raise Denied(
                        f"UPDATE of {ct.name}.{col} could move rows out of the row filter")
                if want is None or not _same_literal(value, want):
                    check = _stays_inside(ct, col, value, idx)
            if not same:
                wrapped = _key_value(ct, col, value, idx, cv, res, "UPDATE")
                if check is not None:
                    (start, end), cond = check
                    inner = wrapped[1] if wrapped is not None else idx.sql[start:end]
                    message = f"the row would leave the row filter of {ct.name}"
                    text = (f"CASE WHEN ({cond}) THEN {inner} ELSE "
                            f"{failing(message, ct.colview[col].type_sql)} END")
                    res.edits.append(Edit(start, end, text, ((0, len(text)),)))
                    _checked(res, message)
                elif wrapped is not None:
                    (start, end), text = wrapped
                    res.edits.append(Edit(start, end, text, ((0, len(text)),)))
    where = tree.args.get("where")
    where_expr = where.this if isinstance(where, exp.Where) else None
    # With FROM/USING items an unqualified column may belong to another relation, so only a
    # qualified one is taken as the target's (PostgreSQL would otherwise resolve it or call it
    # ambiguous; moving it could turn an error into a different statement).
    single = not (tree.args.get("from_") or tree.args.get("using"))
    moved: list[tuple[Simple, str]] = []
    conjs = conjuncts(where_expr)
    for conj in conjs:
        simple = match_simple(conj, idx)
        col = resolve_column(simple.column, ref, single_source=single) if simple else None
        if simple is not None and col is not None:
            lookup = col in ct.lookup_cols and simple.op == "=" and all(
                v.kind in ("string", "param") for v in simple.values)
            leak = col not in ct.masked_cols and col in ct.leakproof_cols and literal_fits(
                ct, col, simple.values)
            if lookup or leak:
                moved.append((simple, col))
                if lookup and col in ct.masked_cols:
                    qn = f"{ct.name}.{col}"
                    res.lookup_values += lookup_values(qn, simple, cv)
                    if qn not in res.lookups:
                        res.lookups.append(qn)
                continue
        read = reads_masked(conj, ct, ref_name)
        if read is not None:
            raise Denied(f"{verb} may not filter on {_what(ct, read).removeprefix('of ')}")
    _returning_check(tree, ct, ref_name, res)
    if ct.row_filter is None:
        return
    qf = ct.qualified_filter(ref_name)
    if qf is None:
        raise Denied(f"{verb} of {ct.name}: cannot apply the row filter")
    target_end = res.target_span[1] if res.target_span else 0
    where_i, body_end, insert_at = _where_region(idx, target_end)
    if where_i is None:
        if where_expr is not None:
            raise Denied(f"{verb} of {ct.name}: cannot locate the WHERE clause")
        text = f" WHERE ({qf})"
        res.edits.append(Edit(insert_at, insert_at, text, ((8, 8 + len(qf)),), order=1))
        return
    sig = idx.sig
    if where_i + 1 < len(sig) and sig[where_i + 1].keyword == "current":
        raise Denied(f"{verb} ... WHERE CURRENT OF on {ct.name} is not supported")
    if where_i + 1 >= len(sig) or sig[where_i + 1].start >= body_end:
        raise Denied(f"{verb} of {ct.name}: empty WHERE clause")
    body_start = sig[where_i + 1].start
    head_parts = [condition_text(idx.sql, ref_name, col, s) for s, col in moved]
    if moved and len(moved) == len(conjs):
        # Every conjunct is a leakproof comparison or an exact lookup: nothing of the user's
        # can fail on a row outside the filter, so the body becomes ``<moved> AND (<filter>)``.
        text = " AND ".join(head_parts) + " AND ("
        res.edits.append(Edit(body_start, body_end, text + qf + ")",
                              ((len(text), len(text) + len(qf)),)))
        return
    # ``<moved> AND (<filter>) AND CASE WHEN (<filter>) THEN (<user WHERE>) ELSE false END``:
    # the moved conjuncts (index-usable) and the filter in front, the user's predicate only
    # evaluated on rows inside the filter (a plain AND may run ``1/(id-13)`` first).
    head = " AND ".join([*head_parts, ""]) if head_parts else ""
    gen: list[tuple[int, int]] = []
    text = head + "("
    gen.append((len(text), len(text) + len(qf)))
    text += qf + ") AND CASE WHEN ("
    gen.append((len(text), len(text) + len(qf)))
    text += qf + ") THEN ("
    res.edits.append(Edit(body_start, body_start, text, tuple(gen)))
    for s, _col in moved:
        res.edits.append(Edit(s.start, s.end, "TRUE"))
    res.edits.append(Edit(body_end, body_end, ") ELSE false END", order=2))


def _insert(tree: exp.Insert, ref: Ref, ct: CompiledTable, idx: TokenIndex, res: DmlResult,
            cv: CompiledView) -> None:
    conflict = tree.args.get("conflict")
    if conflict is not None and ct.row_filter is not None:
        # Even DO NOTHING answers "INSERT 0 0" for a key held by a row outside the filter.
        raise Denied(f"INSERT ... ON CONFLICT on {ct.name} is not allowed: its outcome would "
                     "reveal rows outside the row filter")
    if isinstance(conflict, exp.OnConflict) and ct.masked:
        action = conflict.args.get("action")
        if action is not None and "update" in str(action.this if hasattr(action, "this")
                                                  else action).lower():
            raise Denied(f"INSERT ... ON CONFLICT DO UPDATE on {ct.name} is not allowed")
        if conflict.expressions:
            raise Denied(f"INSERT ... ON CONFLICT DO UPDATE on {ct.name} is not allowed")
    if isinstance(conflict, exp.OnConflict):
        # its SET is an UPDATE whose values are not checked like an UPDATE's: a key there
        # would answer whether a hidden row exists (and point at one)
        for assignment in conflict.expressions:
            target_col = assignment.this if isinstance(assignment, exp.EQ) else None
            col = ident_value(target_col.this) if isinstance(target_col, exp.Column) else None
            if col is None or _is_key(ct, col, cv):
                raise Denied(f"INSERT ... ON CONFLICT DO UPDATE of {ct.name} may not set "
                             f"{col or 'this column'}: it is a key into rows this operator "
                             "cannot all see (use UPDATE)")
    _returning_check(tree, ct, ref.ref_name, res)
    target = tree.this
    if isinstance(target, exp.Schema):
        cols = [ident_value(c) or "" for c in target.expressions]
    else:
        cols = list(ct.columns)
    values = tree.expression
    rows: list[list[exp.Expression]] = []
    if isinstance(values, exp.Values):
        for row in values.expressions:
            rows.append(list(row.expressions) if isinstance(row, exp.Tuple) else [row])
    keys = [c for c in cols if _is_key(ct, c, cv)]
    if keys and not isinstance(values, exp.Values) and values is not None:
        raise Denied(f"INSERT into {ct.name} from a query may not set {keys[0]}: a key "
                     "conflict would reveal rows outside the row filter")
    # Replacement text per literal span: a foreign-key wrapper and a filter guard may both
    # apply to one value (orders.customer_id), so they compose here instead of as two edits.
    wraps: dict[tuple[int, int], str] = {}
    for items in rows:
        for col, item in zip(cols, items, strict=False):
            wrapped = _key_value(ct, col, item, idx, cv, res, "INSERT")
            if wrapped is not None:
                wraps[wrapped[0]] = wrapped[1]
    if ct.row_filter is not None:
        _insert_filter(ct, cols, rows, values, idx, wraps, res)
    for (start, end), text in sorted(wraps.items()):
        res.edits.append(Edit(start, end, text, ((0, len(text)),)))


def _insert_filter(ct: CompiledTable, cols: list[str], rows: list[list[exp.Expression]],
                   values: exp.Expression | None, idx: TokenIndex,
                   wraps: dict[tuple[int, int], str], res: DmlResult) -> None:
    """INSERT may only create rows inside the row filter.

    Proven statically when the filter is a conjunction of ``col = literal`` and every row
    carries those literals; otherwise, when the filter's outer-level columns all get literals or
    parameters, each row's first filter column becomes ``CASE WHEN (<filter on the row's
    values>) THEN value ELSE <failing cast> END``: a row outside the filter fails, with the same
    error whether or not a hidden row it might refer to exists.
    """
    outside = f"INSERT would write rows outside the row filter of {ct.name}"
    if ct.filter_false or not isinstance(values, exp.Values):
        raise Denied(outside)
    if ct.filter_eq:
        if any(fcol not in cols for fcol in ct.filter_eq):
            raise Denied(outside)  # the column's default is not known to satisfy the filter
        proven = True
        for fcol, want in ct.filter_eq.items():
            k = cols.index(fcol)
            for items in rows:
                item = items[k] if k < len(items) else None
                if item is not None and _same_literal(item, want):
                    continue
                if item is None or not isinstance(item, exp.Parameter):
                    raise Denied(outside)  # a literal (or expression) known not to match
                proven = False
        if proven:
            return
    outer = ct.filter_outer_cols
    if not outer or any(c not in cols for c in outer):
        raise Denied(outside)
    message = f"the row is outside the row filter of {ct.name}"
    _checked(res, message)
    for items in rows:
        texts: dict[str, str] = {}
        spans: dict[str, tuple[int, int]] = {}
        for col in outer:
            k = cols.index(col)
            lit = literal_operand(items[k], idx) if k < len(items) else None
            if lit is None:
                raise Denied(f"{outside}: {col} must be a literal or parameter")
            texts[col] = idx.sql[lit.start:lit.end]
            spans[col] = (lit.start, lit.end)
        cond = ct.filter_with(texts)
        if cond is None:
            raise Denied(outside)
        first = outer[0]
        span = spans[first]
        value = wraps.get(span, texts[first])
        wraps[span] = (f"CASE WHEN ({cond}) THEN {value} ELSE "
                       f"{failing(message, ct.colview[first].type_sql)} END")


# --- keys: existence oracles ------------------------------------------------------------------


def _checked(res: DmlResult, message: str) -> None:
    """The statement carries a check made as its rows are written (:func:`failing`), failing
    with ``message``: only that error of it is a policy denial (proxy.session)."""
    if EXECUTION_CHECK_REASON not in res.reasons:
        res.reasons.append(EXECUTION_CHECK_REASON)
    if message not in res.checks:
        res.checks.append(message)


_INTEGER_TYPES = frozenset({exp.DataType.Type.SMALLINT, exp.DataType.Type.INT,
                            exp.DataType.Type.BIGINT})


def failing(message: str, type_sql: str) -> str:
    """An expression of type ``type_sql`` that raises ``invalid input syntax for type integer:
    "<FAILING_PREFIX><message>"`` when evaluated — and only then: ``concat`` is STABLE, so the
    planner does not fold it, and the detour through int4 and text makes it raise whatever the
    target type (a plain cast to text would quietly succeed)."""
    msg = (FAILING_PREFIX + message).replace("'", "''")
    return (f"CAST(CAST(CAST(pg_catalog.concat('{msg}') AS pg_catalog.int4) AS pg_catalog.text) "
            f"AS {type_sql})")


def _referenced(col: str, ct: CompiledTable, cv: CompiledView
                ) -> tuple[CompiledTable, str] | None:
    """The filtered protected table (and its column) a foreign key column points into."""
    cview = ct.colview.get(col)
    if cview is None or not cview.references:
        return None
    table, _, rcol = cview.references.rpartition(".")
    rt = cv.tables.get(table)
    if rt is None or rt.row_filter is None or rcol not in rt.colview:
        return None
    return rt, rcol


def filtered_references(ct: CompiledTable, cv: CompiledView) -> list[str]:
    """The columns of ``ct`` that are foreign keys into a table filtered for this operator."""
    return [col for col in ct.columns if _referenced(col, ct, cv) is not None]


def _unique_guarded(ct: CompiledTable, col: str) -> bool:
    """Writing this unique column explicitly could collide with a row the operator cannot see
    (outside the filter) or with a value it sees masked."""
    cview = ct.colview.get(col)
    return bool(cview is not None and cview.unique
                and (ct.row_filter is not None or col in ct.masked_cols))


def _is_key(ct: CompiledTable, col: str, cv: CompiledView) -> bool:
    return _unique_guarded(ct, col) or _referenced(col, ct, cv) is not None


def _is_default(value: exp.Expression) -> bool:
    return (isinstance(value, exp.Var) and str(value.this).upper() == "DEFAULT") or (
        isinstance(value, exp.Column) and not value.table
        and isinstance(value.this, exp.Identifier) and not value.this.quoted
        and value.this.this.upper() == "DEFAULT")


def _key_value(ct: CompiledTable, col: str, value: exp.Expression, idx: TokenIndex,
               cv: CompiledView, res: DmlResult, verb: str
               ) -> tuple[tuple[int, int], str] | None:
    """Close the existence oracles of one written value (PostgreSQL answers a duplicate key or
    a missing foreign key with an error naming the key, and a success otherwise):

    * an explicit value for a unique column of a filtered table (or a masked unique column) is
      denied — a duplicate-key error would tell that a hidden row holds it;
    * a value for a foreign key into a table filtered for this operator must be a literal or
      parameter and is replaced by ``COALESCE((SELECT key FROM <table> WHERE (<filter>) AND
      key = value OFFSET 0), <failing cast>)`` (:func:`failing`): a row the operator cannot
      see then fails exactly like a row that does not exist.

    Returns the replacement ``((start, end), text)`` of the value, or None.
    """
    if isinstance(value, exp.Null) or _is_default(value):
        return None
    if _unique_guarded(ct, col):
        raise Denied(f"{verb} of {ct.name} may not set the unique column {col}: a key conflict "
                     "would reveal rows outside the row filter (leave it to its default)")
    found = _referenced(col, ct, cv)
    if found is None:
        return None
    rt, rcol = found
    # a literal typed as an integer (``3::int4``, ``CAST($1 AS integer)``, as ORMs write
    # them): the check goes around the literal, inside the cast. Only integer types: a cast
    # to them never maps a key the check passed to another (``varchar(2)`` would truncate)
    inner = value
    if isinstance(value, exp.Cast) and value.to.this in _INTEGER_TYPES and \
            not value.to.expressions:
        inner = value.this
    lit = literal_operand(inner, idx)
    if lit is None:
        raise Denied(f"{verb} of {ct.name}.{col} must use a literal or parameter: it references "
                     f"{rt.name}, of which this operator sees only some rows")
    cview = ct.colview[col]
    qref = ".".join(quote_ident(p) for p in rt.name.split("."))
    message = (f"no {rt.name} row visible to this operator has {rcol} = the value given for "
               f"{ct.name}.{col}")
    text = (f"COALESCE((SELECT {quote_ident(rcol)} FROM {qref} WHERE ({rt.row_filter}) AND "
            f"{quote_ident(rcol)} OPERATOR(pg_catalog.=) {idx.sql[lit.start:lit.end]} "
            f"OFFSET 0), {failing(message, cview.type_sql)})")
    reason = f"foreign key {ct.name}.{col} checked against the row filter of {rt.name}"
    if reason not in res.reasons:
        res.reasons.append(reason)
    _checked(res, message)
    return (lit.start, lit.end), text


def dml_rules(tree: exp.Expression, ref: Ref, idx: TokenIndex, cv: CompiledView) -> DmlResult:
    """Apply the rules above to the top-level DML target ``ref`` (a protected table; the rules
    about masks and filters only bite when it is masked for this operator)."""
    ct = ref.table
    assert ct is not None
    res = DmlResult()
    res.target_span = target_name_span(ref, idx)
    if isinstance(tree, exp.Merge):
        raise Denied(f"MERGE into {ct.name} is not supported for masked roles")
    if isinstance(tree, (exp.Update, exp.Delete)):
        _update_or_delete(tree, ref, ct, idx, res, cv)
    elif isinstance(tree, exp.Insert):
        _insert(tree, ref, ct, idx, res, cv)
    else:
        raise Denied(f"unsupported statement on {ct.name}")
    return res
