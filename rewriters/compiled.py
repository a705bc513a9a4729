"""Everything the rewriter derives from one OperatorView, computed once and cached by identity.

An :class:`~rewriters.model.OperatorView` is resolved once per connection; the analyzer sees the
same object for every statement of that connection. From it this module precomputes:

* the fast-path regex — protected table names, catalog dependents and risky tokens — so that a
  statement that cannot touch customer data is forwarded after one ``re.search``;
* per protected table: the projection of the derived table that replaces it (masked columns
  wrapped, catalog order), the row filter, the columns the filter reads and — when the filter is
  a plain conjunction of ``col = literal`` — those equalities, used to prove that an INSERT or
  UPDATE keeps rows inside the filter;
* the cache identity of the view (everything a decision depends on).

Data flow: ``compile_view(view) -> CompiledView`` (memoised in :class:`ViewCompiler`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.dialects.postgres import Postgres

from rewriters.lexer import fold
from rewriters.model import ColumnView, OperatorView, TableView


class _Postgres(Postgres):
    """sqlglot's PostgreSQL dialect without its array index offset. sqlglot turns PostgreSQL's
    1-based subscripts into its own 0-based ones as it parses, re-inferring the types of the
    whole subscript chain at each ``[``: quadratic in the chain (``x[1][1]...``, 1024
    subscripts: 3 s on the proxy's event loop). pgveil edits the client's text and never
    generates SQL from these trees, so the subscripts may stay as written."""

    INDEX_OFFSET = 0


POSTGRES = _Postgres()

# Substrings that make a statement worth a full analysis even when it names no protected table.
# Each is a way to reach table data without writing the table's name in the statement:
#   u&            U&"..." identifiers spell any name with escapes (\0063ustomers)
#   xml           query_to_xml / table_to_xml / cursor_to_xml / schema_to_xml / database_to_xml
#                 run SQL or read relations given as strings or OIDs
#   ts_stat, ts_rewrite   run a query given as text (ts_rewrite(tsquery, text))
#   dblink        runs SQL over a (loopback) connection
#   crosstab, connectby   tablefunc: SQL text / relation names as strings
#   regclass      turns strings or OIDs into relations (::regclass, to_regclass)
#   pg_stat, mcv  pg_stats / pg_statistic / pg_stats_ext* / pg_mcv_list_items hold column values
#   pg_read, lo_import, lo_export   server files, i.e. the table's data files
#   raw_page, page_items           pageinspect reads raw heap pages
#   set_config, authorization      role switching (set_config('role', ..), SET SESSION AUTHORIZATION)
#   xpath_table   contrib xml2: runs SELECT ... FROM <relation given as a string>
#   pgrowlocks    contrib: the row locks of a relation given as a string
#   setval        moves a sequence for every session, past ROLLBACK (an existence oracle)
#   pg_settings   UPDATE pg_settings is set_config() by another name
_RISKY_SUBSTRINGS = (
    "u&", "xml", "ts_stat", "ts_rewrite", "dblink", "crosstab", "connectby", "regclass", "pg_stat", "mcv",
    "pg_read", "lo_import", "lo_export", "raw_page", "page_items", "set_config", "authorization",
    "xpath_table", "pgrowlocks", "setval", "pg_settings",
)
# Settings a masked role may not change (rewriters.verify refuses SET / set_config of them,
# proxy.server a startup parameter or option): switching the database role, and the settings
# that send the parse, rewritten and plan trees of every statement to the client (with
# client_min_messages = log): the rewritten statement's masks, filters and a hash mask's key
# material. PostgreSQL lets any user set the latter.
ROLE_SETTINGS = frozenset({"role", "session_authorization"})
DEBUG_SETTINGS = frozenset({"debug_print_parse", "debug_print_rewritten", "debug_print_plan"})
# Whole words (identifier boundaries): SET ROLE / RESET ROLE / ALTER ROLE ... SET role, LISTEN
# (rewriters.verify: channels the policy lists), SET debug_print_*.
_RISKY_WORDS = ("role", "listen", *sorted(DEBUG_SETTINGS))
# Where the text of the rewritten statement can be read back. The ``hash`` mask embeds the HMAC
# pad bytes (derived from the key) in the rewritten SQL, so for a view with a hash mask these
# are worth a full analysis (and are denied by ``rewriters.verify``).
_STATEMENT_TEXT_SUBSTRINGS = ("current_query", "pg_prepared_statements", "pg_cursors")

# Identifier boundaries as PostgreSQL draws them: a name is not part of a longer identifier.
# Before: letters, underscore and non-ASCII continue an identifier (digits and $ may end a
# number or parameter, so they do not count: ``1customers`` still matches - conservative).
_BEFORE = r"(?<![A-Za-z_\x80-\U0010ffff])"
_AFTER = r"(?![A-Za-z0-9_$\x80-\U0010ffff])"

# Column types whose built-in comparison operators are LEAKPROOF in PostgreSQL 15 (checked with
# pg_proc.proleakproof): comparisons on them may run below the row-filter fence.
_LEAKPROOF_TYPES = ("integer", "bigint", "smallint", "text", "character varying", "varchar",
                    "date", "timestamp with time zone", "timestamp without time zone", "uuid")
_INTEGER_TYPES = ("integer", "bigint", "smallint")


def _continues_before(ch: str) -> bool:
    """May ``ch`` be the character before an identifier's start inside that identifier?"""
    return ch == "_" or "a" <= ch <= "z" or "A" <= ch <= "Z" or ch >= "\x80"


def _continues_after(ch: str) -> bool:
    """May ``ch`` continue an identifier?"""
    return ch in "_$" or "a" <= ch <= "z" or "A" <= ch <= "Z" or "0" <= ch <= "9" or ch >= "\x80"


def quote_ident(name: str) -> str:
    """``phone`` -> ``"phone"`` (always quoted: exact, and immune to keywords)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class FilterLiteral:
    """The literal side of a ``col = literal`` row-filter conjunct."""

    value: str
    is_string: bool


@dataclass
class CompiledTable:
    """One protected table as this operator sees it, ready for substitution."""

    name: str  # schema.table
    schema: str
    bare: str
    view: TableView
    masked: bool
    columns: tuple[str, ...]
    colview: dict[str, ColumnView]
    masked_cols: frozenset[str]
    lookup_cols: frozenset[str]
    leakproof_cols: frozenset[str]
    integer_cols: frozenset[str]
    projection: str
    row_filter: str | None
    filter_cols: frozenset[str] = frozenset()
    filter_eq: dict[str, FilterLiteral] | None = None
    filter_false: bool = False
    # (start, end, column) of every outer-level column reference in ``row_filter`` (not inside
    # its subqueries); None when one is qualified or the filter could not be parsed.
    filter_outer: tuple[tuple[int, int, str], ...] | None = None
    _filter_tree: exp.Expression | None = field(default=None, repr=False)

    def derived(self, name_text: str, extra: list[str]) -> str:
        """The derived table replacing a reference: ``(SELECT ... FROM <name> WHERE ...)``.

        With a row filter the subquery ends in ``OFFSET 0``: PostgreSQL neither flattens it nor
        pushes outer predicates into it, so a user predicate that can fail (``1/(id-13)``) only
        ever sees rows inside the filter. ``extra`` are conditions moved in from the outer
        WHERE (exact lookups, leakproof comparisons) so that indexes still apply.
        """
        conds = []
        if self.row_filter is not None:
            conds.append(f"({self.row_filter})")
        conds.extend(extra)
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        fence = " OFFSET 0" if self.row_filter is not None else ""
        return f"(SELECT {self.projection} FROM {name_text}{where}{fence})"

    @property
    def filter_outer_cols(self) -> list[str]:
        """The columns the row filter reads at its outer level, in order, without repeats."""
        return list(dict.fromkeys(c for _s, _e, c in self.filter_outer or ()))

    def filter_with(self, values: dict[str, str]) -> str | None:
        """The row filter with each outer-level column replaced by ``(value text)``.

        ``customer_id IN (SELECT id FROM public.customers WHERE branch_id = 'SZ01')`` with
        ``{"customer_id": "$1"}`` -> ``($1) IN (SELECT id FROM ...)``: whether a row about to
        be inserted lies inside the filter. None when a column has no value.
        """
        if self.row_filter is None or self.filter_outer is None:
            return None
        text = self.row_filter
        for start, end, col in sorted(self.filter_outer, reverse=True):
            if col not in values:
                return None
            text = text[:start] + "(" + values[col] + ")" + text[end:]
        return text

    def qualified_filter(self, ref: str) -> str | None:
        """The row filter with its outer-level column references qualified by ``ref``.

        ``branch_id = 'SZ01'`` -> ``"c".branch_id = 'SZ01'`` for ``UPDATE customers c ...
        FROM accounts a`` (where a bare ``branch_id`` would be ambiguous). Columns inside the
        filter's own subqueries are left alone. None when the filter could not be parsed.
        """
        if self.row_filter is None:
            return None
        tree = self._filter_tree
        if tree is None:
            return None
        inserts: list[int] = []
        stack: list[exp.Expression] = [tree]
        while stack:
            node = stack.pop()
            if isinstance(node, (exp.Select, exp.Subquery, exp.SetOperation)):
                continue
            if isinstance(node, exp.Column) and not node.table:
                ident = node.this
                if isinstance(ident, exp.Identifier) and "start" in ident.meta:
                    name = ident.this if ident.quoted else fold(ident.this)
                    if name in self.colview:
                        inserts.append(ident.meta["start"])
                continue
            stack.extend(node.iter_expressions())
        text = self.row_filter
        prefix = quote_ident(ref) + "."
        for pos in sorted(inserts, reverse=True):
            text = text[:pos] + prefix + text[pos:]
        return text


@dataclass(frozen=True)
class FkParent:
    """An unprotected table a row-filtered protected table references (CompiledView)."""

    name: str  # schema.table
    columns: frozenset[str]  # the referenced columns
    children: tuple[str, ...]  # the referencing protected tables


def _fk_parents(view: OperatorView, tables: dict[str, CompiledTable]) -> dict[str, FkParent]:
    if view.unrestricted:
        return {}
    found: dict[str, tuple[set[str], list[str]]] = {}
    for t in tables.values():
        if t.row_filter is None:
            continue
        for c in t.view.columns:
            if c.references is None:
                continue
            parent, _, column = c.references.rpartition(".")
            if not parent or parent in tables:
                continue  # a protected parent: its own filter bounds what may be deleted
            cols, children = found.setdefault(parent, (set(), []))
            cols.add(column)
            if t.name not in children:
                children.append(t.name)
    return {name.rpartition(".")[2]: FkParent(name, frozenset(cols), tuple(children))
            for name, (cols, children) in found.items()}


@dataclass
class CompiledView:
    """All per-operator data the analyzer needs (see module docstring)."""

    view: OperatorView
    tables: dict[str, CompiledTable]  # schema.table -> table (masked or not)
    by_bare: dict[str, list[CompiledTable]]
    dependents: dict[str, tuple[str, ...]]  # schema.name -> protected tables it reads
    dependents_by_bare: dict[str, list[str]]
    fast_re: re.Pattern[str]
    risky_substrings: tuple[str, ...]  # fast_re's parts, for ``sensitive``
    bounded_words: tuple[str, ...]
    names_re: re.Pattern[str] | None  # protected tables + dependents, bare names
    risky_re: re.Pattern[str]
    key: tuple[object, ...]
    # A restricted view with a ``hash`` mask: the rewritten SQL holds key material, so every way
    # of reading statement text back (current_query(), pg_stat_activity, EXPLAIN VERBOSE ...)
    # is denied.
    hash_secret: bool = False
    # plain_kind answers by the text with every digit turned into 0 (see
    # rewriters.analyze.plain_kind); None when a sensitive word holds a digit, where that
    # would not be the same answer
    plain_memo: dict[str, str | None] | None = None
    # Unprotected tables that a row-filtered protected table references by a foreign key
    # (branches, for customers.branch_id), by bare name: schema.table, the referenced columns
    # and the referencing tables. Deleting such a row, or changing its key, fails with a
    # foreign-key error exactly when a row references it -- rows outside the filter included.
    fk_parents: dict[str, FkParent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not any(ch.isdigit() for w in self.bounded_words + self.risky_substrings
                   for ch in w):
            self.plain_memo = {}

    def sensitive(self, lowered: str) -> bool:
        """Does lower-cased text mention a protected or dependent name or a risky token?

        Same answer as ``fast_re.search(lowered)``, about five times faster on the common
        statement that mentions nothing (a regex with look-behind tries every position; ``in``
        is a C substring search): the risky substrings are tested with ``in``, the names with
        ``find`` plus the identifier-boundary test of ``_BEFORE``/``_AFTER`` done by hand.
        """
        for sub in self.risky_substrings:
            if sub in lowered:
                return True
        n = len(lowered)
        for word in self.bounded_words:
            i = lowered.find(word)
            while i >= 0:
                j = i + len(word)
                if (i == 0 or not _continues_before(lowered[i - 1])) and (
                    j >= n or not _continues_after(lowered[j])
                ):
                    return True
                i = lowered.find(word, i + 1)
        return False

    def resolve(self, schema: str | None, name: str) -> CompiledTable | None:
        """The protected table a (folded) reference denotes, if any.

        Unqualified names are protected when any protected table has that bare name (the
        session's search_path decides which one PostgreSQL opens; ``public`` wins ties here).
        """
        if schema:
            return self.tables.get(f"{schema}.{name}")
        cands = self.by_bare.get(name)
        if not cands:
            return None
        for c in cands:
            if c.schema == "public":
                return c
        return cands[0]

    def resolve_dependent(self, schema: str | None, name: str) -> str | None:
        """The qualified name of the catalog dependent a reference may denote."""
        if schema:
            qn = f"{schema}.{name}"
            return qn if qn in self.dependents else None
        cands = self.dependents_by_bare.get(name)
        if not cands:
            return None
        return sorted(cands)[0]

    def mentioned_tables(self, lowered: str) -> list[CompiledTable]:
        """Protected tables whose bare name appears (as an identifier) in lower-cased text."""
        if self.names_re is None:
            return []
        found: list[CompiledTable] = []
        seen: set[str] = set()
        for m in self.names_re.finditer(lowered):
            for t in self.by_bare.get(m.group(), ()):
                if t.name not in seen:
                    seen.add(t.name)
                    found.append(t)
        return found

    def mentioned_dependents(self, lowered: str) -> list[str]:
        if self.names_re is None:
            return []
        found: list[str] = []
        for m in self.names_re.finditer(lowered):
            for d in self.dependents_by_bare.get(m.group(), ()):
                if d not in found:
                    found.append(d)
        return found


def _parse_filter(text: str) -> exp.Expression | None:
    try:
        return sqlglot.parse_one(text, read=POSTGRES)
    except Exception:  # noqa: BLE001 - a filter we cannot read only disables the proofs
        return None


def _filter_facts(
    tree: exp.Expression | None, columns: dict[str, ColumnView]
) -> tuple[frozenset[str], dict[str, FilterLiteral] | None, bool]:
    """(outer-level columns read, exact ``col = literal`` conjunction or None, is FALSE)."""
    if tree is None:
        return frozenset(columns), None, False
    if isinstance(tree, exp.Boolean) and not tree.this:
        return frozenset(), None, True
    cols: set[str] = set()
    stack: list[exp.Expression] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier):
            ident = node.this
            cols.add(ident.this if ident.quoted else fold(ident.this))
        stack.extend(node.iter_expressions())
    # Columns of the filter's own subqueries are collected too: conservative (more columns
    # count as "filter columns", so more UPDATEs are refused, never fewer).
    eq: dict[str, FilterLiteral] | None = {}
    node = tree
    conjuncts: list[exp.Expression] = []
    pending = [node]
    while pending:
        n = pending.pop()
        while isinstance(n, exp.Paren):
            n = n.this
        if isinstance(n, exp.And):
            pending.extend([n.this, n.expression])
        else:
            conjuncts.append(n)
    for c in conjuncts:
        if (
            isinstance(c, exp.EQ)
            and isinstance(c.this, exp.Column)
            and not c.this.table
            and isinstance(c.expression, exp.Literal)
        ):
            ident = c.this.this
            name = ident.this if ident.quoted else fold(ident.this)
            lit = c.expression
            assert eq is not None
            eq[name] = FilterLiteral(str(lit.this), bool(lit.is_string))
        else:
            eq = None
            break
    return frozenset(cols), eq, False


def _outer_columns(tree: exp.Expression | None, columns: dict[str, ColumnView]
                   ) -> tuple[tuple[int, int, str], ...] | None:
    """Spans of the filter's outer-level column references (see CompiledTable.filter_outer)."""
    if tree is None:
        return None
    out: list[tuple[int, int, str]] = []
    stack: list[exp.Expression] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (exp.Select, exp.Subquery, exp.SetOperation)):
            continue
        if isinstance(node, exp.Column):
            ident = node.this
            if node.table or not isinstance(ident, exp.Identifier) or "start" not in ident.meta:
                return None
            name = ident.this if ident.quoted else fold(ident.this)
            if name not in columns:
                return None
            out.append((int(ident.meta["start"]), int(ident.meta["end"]) + 1, name))
            continue
        stack.extend(node.iter_expressions())
    return tuple(sorted(out))


def compile_table(view: OperatorView, tv: TableView) -> CompiledTable:
    schema, _, bare = tv.name.partition(".")
    colview = {c.name: c for c in tv.columns}
    parts = []
    for c in tv.columns:
        if c.expr is None:
            parts.append(quote_ident(c.name))
        else:
            parts.append(f"{c.expr} AS {quote_ident(c.name)}")
    leakproof = frozenset(
        c.name for c in tv.columns
        if c.expr is None and c.type_sql.lower().startswith(_LEAKPROOF_TYPES)
    )
    integer = frozenset(c.name for c in tv.columns if c.type_sql.lower() in _INTEGER_TYPES)
    tree = _parse_filter(tv.row_filter) if tv.row_filter is not None else None
    fcols, feq, ffalse = _filter_facts(tree, colview) if tv.row_filter is not None else (
        frozenset(), None, False)
    return CompiledTable(
        name=tv.name,
        schema=schema,
        bare=bare,
        view=tv,
        masked=tv.masked,
        columns=tuple(c.name for c in tv.columns),
        colview=colview,
        masked_cols=frozenset(c.name for c in tv.columns if c.expr is not None),
        lookup_cols=frozenset(c.name for c in tv.columns if c.lookup),
        leakproof_cols=leakproof,
        integer_cols=integer,
        projection=", ".join(parts),
        row_filter=tv.row_filter,
        filter_cols=fcols,
        filter_eq=feq,
        filter_false=ffalse,
        filter_outer=_outer_columns(tree, colview),
        _filter_tree=tree,
    )


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def view_key(view: OperatorView) -> tuple[object, ...]:
    """Everything a decision depends on (the login is not: two tellers of one branch share)."""
    return (
        view.policy_version,
        view.role,
        tuple(sorted(view.attributes.items())),
        view.unrestricted,
        repr(sorted(view.tables.items())),
        repr(view.limits),
        tuple(sorted(view.allowed_dependents)),
        repr(sorted(view.dependents.items())),
        repr(sorted(view.write_hooks.items())),
    )


def compile_view(view: OperatorView) -> CompiledView:
    tables = {name: compile_table(view, tv) for name, tv in view.tables.items()}
    by_bare: dict[str, list[CompiledTable]] = {}
    for t in tables.values():
        by_bare.setdefault(t.bare, []).append(t)
    dependents = dict(view.dependents)
    dep_bare: dict[str, list[str]] = {}
    for qn in dependents:
        dep_bare.setdefault(qn.rpartition(".")[2], []).append(qn)
    names = list(by_bare) + list(dep_bare)
    names_re = re.compile(f"{_BEFORE}(?:{_alternation(names)}){_AFTER}") if names else None
    fk_parents = _fk_parents(view, tables)
    risky_words = list(_RISKY_WORDS) + sorted(fk_parents)  # analysed, never fast-forwarded
    hash_secret = not view.unrestricted and any(
        c.mask_name == "hash" and c.expr is not None
        for tv in view.tables.values() for c in tv.columns
    )
    substrings = list(_RISKY_SUBSTRINGS)
    if hash_secret:
        substrings += list(_STATEMENT_TEXT_SUBSTRINGS)
    alternatives = [f"{_BEFORE}(?:{_alternation(names + risky_words)}){_AFTER}"]
    alternatives.append(_alternation(substrings))
    fast_re = re.compile("|".join(alternatives))
    risky_re = re.compile(
        f"{_BEFORE}(?:{_alternation(risky_words)}){_AFTER}|" + _alternation(substrings)
    )
    return CompiledView(
        view=view,
        tables=tables,
        by_bare=by_bare,
        dependents=dependents,
        dependents_by_bare=dep_bare,
        fast_re=fast_re,
        risky_substrings=tuple(substrings),
        bounded_words=tuple(names + risky_words),
        names_re=names_re,
        risky_re=risky_re,
        key=view_key(view),
        hash_secret=hash_secret,
        fk_parents=fk_parents,
    )


class ViewCompiler:
    """Memoises :func:`compile_view` by the identity of the OperatorView object.

    OperatorView holds dicts, so it is not hashable; the proxy keeps one object per connection,
    so identity is the right key. The entry keeps a reference to the view, so an ``id`` is never
    reused for a different live object while cached.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._by_id: dict[int, CompiledView] = {}

    def get(self, view: OperatorView) -> CompiledView:
        cv = self._by_id.get(id(view))
        if cv is not None and cv.view is view:
            return cv
        cv = compile_view(view)
        if len(self._by_id) >= self._size:
            self._by_id.pop(next(iter(self._by_id)))
        self._by_id[id(view)] = cv
        return cv
