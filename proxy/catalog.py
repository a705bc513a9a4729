"""Read what the database says about the protected tables (asyncpg, one control connection).

Data flow: the proxy calls :func:`load_catalog` with the policy's protected table names on a
control connection to the client's database; the resulting :class:`~rewriters.model.Catalog`
feeds ``rewriters.policy.build_operator_view`` (columns in attnum order with exact types, so
masks return the right type and the rewriter projects every column) and the rewriter's
dependent check (which views, functions and rules read protected data, so a masked role cannot
read ``customers`` through ``v_customers``).

Dependents are found three ways and closed transitively (a view over a view over customers, a
function that calls a function that reads customers):

* ``pg_depend`` from rewrite rules: views, materialized views, and rules on other tables whose
  actions read a protected table or a dependent; plus every non-view rule *on* a protected
  table.
* ``pg_depend`` from functions (SQL-standard ``BEGIN ATOMIC`` bodies are tracked there) and
  ``pg_inherits`` (a partition or inheritance child holds the parent's rows, and a parent's scan
  returns the child's).
* Function bodies (``prosrc`` of SQL, plpgsql and any other non-C language) that mention a
  protected table or a dependent by name: a conservative, case-insensitive, word-boundary text
  match, because PostgreSQL records no dependency for a plpgsql body.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import asyncpg

from rewriters.model import Catalog, CatalogColumn
from rewriters.verify import OTHER_SESSIONS_TEXT, STATS_RELATIONS

_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")

# What a pg_depend row may point at that can carry protected data: a relation, a function, or
# an operator (CREATE OPERATOR ... FUNCTION f: a view or default using the operator depends on
# the operator, not on f).
_REF_KIND = """CASE d.refclassid WHEN 'pg_catalog.pg_class'::pg_catalog.regclass THEN 'rel'
            WHEN 'pg_catalog.pg_operator'::pg_catalog.regclass THEN 'op' ELSE 'proc' END"""
_REF_CLASSES = """d.refclassid IN ('pg_catalog.pg_class'::pg_catalog.regclass,
                       'pg_catalog.pg_proc'::pg_catalog.regclass,
                       'pg_catalog.pg_operator'::pg_catalog.regclass)"""

_COLUMNS_SQL = """
SELECT n.nspname, c.relname, c.oid::int8 AS relid, a.attname,
       pg_catalog.format_type(base.oid, base.typmod) AS type_sql, a.atttypid::int8 AS type_oid,
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i
               WHERE i.indrelid = c.oid AND (i.indisunique OR i.indisexclusion)
                 AND (a.attnum = ANY (i.indkey::int2[])
                      OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                                 WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                   AND d.objid = i.indexrelid AND d.refobjid = c.oid
                                   AND d.refobjsubid = a.attnum))) AS is_unique,
       (SELECT fn.nspname || '.' || fc.relname || '.' || fa.attname
          FROM pg_catalog.pg_constraint k
          JOIN pg_catalog.pg_class fc ON fc.oid = k.confrelid
          JOIN pg_catalog.pg_namespace fn ON fn.oid = fc.relnamespace
          JOIN pg_catalog.pg_attribute fa ON fa.attrelid = k.confrelid
               AND fa.attnum = k.confkey[1]
         WHERE k.conrelid = c.oid AND k.contype = 'f' AND k.conkey = ARRAY[a.attnum]
         LIMIT 1) AS refs
FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[])) AS want(nsp, rel)
JOIN pg_catalog.pg_namespace n ON n.nspname = want.nsp
JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = want.rel
     AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN LATERAL (
    WITH RECURSIVE d(oid, typmod, depth) AS (
        SELECT a.atttypid, a.atttypmod, 0
        UNION ALL
        SELECT t.typbasetype, t.typtypmod, d.depth + 1
          FROM d JOIN pg_catalog.pg_type t ON t.oid = d.oid
         WHERE t.typtype = 'd' AND d.depth < 32)
    SELECT d.oid, d.typmod FROM d ORDER BY d.depth DESC LIMIT 1) AS base ON true
ORDER BY n.nspname, c.relname, a.attnum
"""
# A column's type as masks must produce it: a domain's base type (PostgreSQL describes a domain
# column by its base type on the wire, and a mask's value need not pass the domain's NOT NULL
# or CHECK), formatted under search_path = pg_catalog so that any type outside pg_catalog comes
# schema-qualified and a cast to it cannot be redirected by the session's search_path.

def _table_depends(catalog: str, key: str, table: str, *, classid: str | None = None,
                   also: str = "") -> str:
    """Edges "table -> what an object of ``catalog`` (a default, an index, a trigger, a row
    security policy, the table itself for its partition key) calls or reads", from pg_depend:
    ``key`` is the object's id column, ``table`` the column naming its table (the table's own
    columns and the table itself are left out)."""
    return f"""SELECT 'rel', o.{table}::int8, {_REF_KIND}, d.refobjid::int8
FROM pg_catalog.pg_depend d
JOIN pg_catalog.{catalog} o ON d.classid = 'pg_catalog.{classid or catalog}'::pg_catalog.regclass
     AND o.{key} = d.objid {also}
WHERE {_REF_CLASSES} AND d.refobjid <> o.{table}"""


# Edges "dependent -> referenced" from rewrite rules and functions to relations and functions.
# A view is its _RETURN rule; any other rule is a node of its own.
_DEPEND_SQL = f"""
SELECT CASE WHEN r.rulename = '_RETURN' THEN 'rel' ELSE 'rule' END AS kind,
       CASE WHEN r.rulename = '_RETURN' THEN r.ev_class::int8 ELSE r.oid::int8 END AS id,
       n.nspname AS nsp,
       CASE WHEN r.rulename = '_RETURN' THEN c.relname ELSE r.rulename END AS name,
       {_REF_KIND} AS ref_kind,
       d.refobjid::int8 AS ref_id
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
     AND r.oid = d.objid
JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE d.deptype = 'n'
  AND {_REF_CLASSES}
  AND n.nspname <> ALL ($1::text[])
UNION ALL
SELECT 'proc', p.oid::int8, n.nspname, p.proname,
       {_REF_KIND},
       d.refobjid::int8
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_proc p ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
     AND p.oid = d.objid
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE d.deptype = 'n'
  AND {_REF_CLASSES}
  AND n.nspname <> ALL ($1::text[])
"""

# Non-view rules on the protected tables themselves (e.g. ON INSERT DO ALSO copy elsewhere).
_RULES_ON_SQL = """
SELECT r.oid::int8 AS id, n.nspname AS nsp, r.rulename AS name, r.ev_class::int8 AS rel
FROM pg_catalog.pg_rewrite r
JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE r.ev_class = ANY ($1::int8[]::oid[]) AND r.rulename <> '_RETURN'
"""

# Foreign keys from other tables onto columns of a protected table: the referencing column
# holds copies of the referenced values (a raw phone, of any branch), and writing it answers
# "does this value exist" for every branch. With the referenced column names, so that only keys
# onto the policy's sensitive columns count (``customer_id -> customers(id)`` does not).
_FK_COPIES_SQL = """
SELECT k.conrelid::int8 AS id, n.nspname AS nsp, c.relname AS name, k.confrelid::int8 AS rel,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = k.confrelid AND a.attnum = ANY (k.confkey)) AS cols
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class c ON c.oid = k.conrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE k.contype = 'f' AND k.confrelid = ANY ($1::int8[]::oid[])
  AND k.conrelid <> ALL ($1::int8[]::oid[])
"""

# What runs when a table is written or a value is cast, as edges "relation or domain -> what it
# calls or reads": triggers, column defaults and generated columns, CHECK constraints of tables
# and domains, non-view rules on the table, columns of a domain type, a domain's DEFAULT,
# expressions PostgreSQL evaluates on a table's rows by itself (index expressions and
# predicates, a user-defined operator class's support functions and operators, exclusion
# constraints, partition keys, trigger WHEN conditions, row-level security
# policies: an error such as "value "13900104729" is out of range" carries the value back), and
# user-defined casts (the cast function runs on ``1::t``, and implicitly on an argument of a
# function taking ``t`` or a value stored into a column of type ``t``, hence the edges from those
# functions and tables to their user-defined types), and a table that a protected table
# references with ON UPDATE / ON DELETE actions (writing it writes the protected rows, of every
# branch, and runs their triggers). A teller's INSERT
# into an unprotected table whose trigger, default or rule copies customers' phones into it (or
# whose CHECK calls a function comparing with them) reads protected data as surely as a view
# does. Foreign keys are left out on purpose: a table of notes or tickets referencing customers
# is the ordinary shape of a CRM, and denying it whole would break the application for a signal
# no stronger than the customer counts the catalog already shows (an INSERT succeeds iff that
# customer id exists, in some branch).
_WRITE_PATHS_SQL = f"""
SELECT 'rel' AS kind, t.tgrelid::int8 AS id, 'proc' AS ref_kind, t.tgfoid::int8 AS ref_id
FROM pg_catalog.pg_trigger t
WHERE NOT t.tgisinternal
UNION ALL
{_table_depends('pg_attrdef', 'oid', 'adrelid')}
UNION ALL
SELECT CASE WHEN con.contypid <> 0 THEN 'type' ELSE 'rel' END,
       CASE WHEN con.contypid <> 0 THEN con.contypid::int8 ELSE con.conrelid::int8 END,
       {_REF_KIND},
       d.refobjid::int8
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_constraint con
     ON d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND con.oid = d.objid
WHERE con.contype = 'c'
  AND {_REF_CLASSES}
  AND d.refobjid <> con.conrelid
UNION ALL
SELECT 'rel', r.ev_class::int8, 'rule', r.oid::int8
FROM pg_catalog.pg_rewrite r
WHERE r.rulename <> '_RETURN'
UNION ALL
SELECT 'rel', a.attrelid::int8, 'type', a.atttypid::int8
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid AND (ty.typtype = 'd' OR ty.oid >= 16384)
WHERE a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'proc', p.oid::int8, 'type', t.oid::int8
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_type t ON t.oid >= 16384
     AND (t.oid = ANY (p.proargtypes::oid[]) OR t.oid = p.prorettype)
WHERE p.oid >= 16384
UNION ALL
SELECT 'rel', i.indrelid::int8, 'proc', ap.amproc::oid::int8
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_opclass oc ON oc.oid = ANY (i.indclass::oid[]) AND oc.oid >= 16384
JOIN pg_catalog.pg_amproc ap ON ap.amprocfamily = oc.opcfamily
UNION ALL
SELECT 'rel', i.indrelid::int8, 'op', ao.amopopr::int8
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_opclass oc ON oc.oid = ANY (i.indclass::oid[]) AND oc.oid >= 16384
JOIN pg_catalog.pg_amop ao ON ao.amopfamily = oc.opcfamily
UNION ALL
SELECT 'rel', con.confrelid::int8, 'rel', con.conrelid::int8
FROM pg_catalog.pg_constraint con
WHERE con.contype = 'f'
  AND (con.confupdtype NOT IN ('a', 'r') OR con.confdeltype NOT IN ('a', 'r'))
UNION ALL
SELECT 'type', d.objid::int8, {_REF_KIND}, d.refobjid::int8
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_type ty ON d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass
     AND ty.oid = d.objid AND ty.typtype = 'd'
WHERE {_REF_CLASSES}
UNION ALL
{_table_depends('pg_index', 'indexrelid', 'indrelid', classid='pg_class')}
UNION ALL
{_table_depends('pg_class', 'oid', 'oid', also="AND o.relkind IN ('r', 'p', 'f')")}
UNION ALL
{_table_depends('pg_trigger', 'oid', 'tgrelid', also='AND NOT o.tgisinternal')}
UNION ALL
{_table_depends('pg_policy', 'oid', 'polrelid')}
UNION ALL
SELECT 'type', c.casttarget::int8, 'proc', c.castfunc::int8
FROM pg_catalog.pg_cast c WHERE c.castfunc::oid <> 0 AND c.oid >= 16384
UNION ALL
SELECT 'type', c.castsource::int8, 'proc', c.castfunc::int8
FROM pg_catalog.pg_cast c WHERE c.castfunc::oid <> 0 AND c.oid >= 16384
"""

# Operators and the functions they run (a statement, view or default using ``#@`` reads what
# the operator's function reads).
_OPERATORS_SQL = """
SELECT o.oid::int8 AS id, n.nspname AS nsp, o.oprname AS name, o.oprcode::oid::int8 AS code
FROM pg_catalog.pg_operator o
JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
WHERE n.nspname <> ALL ($1::text[]) AND o.oprcode::oid <> 0
"""

# PostgreSQL's planner statistics hold sample values of every column (most common values,
# histogram bounds): a view or function over them reads every protected table.
_STATS_SQL = """
SELECT c.oid::int8 AS id, c.relname AS name
FROM pg_catalog.pg_class c
WHERE c.relnamespace = 'pg_catalog'::pg_catalog.regnamespace AND c.relname = ANY ($1::text[])
"""

# Pinned catalog relations that count as reading every protected table: planner statistics
# (sample values) and other sessions' statement text (the literals other operators typed).
_NAMED_ONLY = STATS_RELATIONS | OTHER_SESSIONS_TEXT

# Views over them (and over pg_stat_activity): PostgreSQL records no dependency on a pinned
# catalog such as pg_statistic, so the definition is matched by name ($2: a regular expression
# of the names).
_STATS_VIEWS_SQL = """
SELECT c.oid::int8 AS id, n.nspname AS nsp, c.relname AS name
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND n.nspname <> ALL ($1::text[])
  AND pg_catalog.pg_get_viewdef(c.oid) ~* $2
"""

# What pgveil cannot see into, so it counts as reading every protected table: foreign tables
# (postgres_fdw can point at customers, here or in another database) and C functions of the
# dblink family (a view over dblink('select ... from customers') records no dependency on it).
_OPAQUE_SQL = """
SELECT 'rel' AS kind, c.oid::int8 AS id, n.nspname AS nsp, c.relname AS name
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'f' AND n.nspname <> ALL ($1::text[])
UNION ALL
SELECT 'proc', p.oid::int8, n.nspname, p.proname
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname LIKE 'dblink%' AND n.nspname <> ALL ($1::text[])
"""

# Catalog.write_hooks: triggers' functions and non-view rules on each protected table and on
# its partitions and inheritance children (a row written through the parent lands there).
_WRITE_HOOKS_SQL = """
WITH RECURSIVE tree(rel, top) AS (
    SELECT c.oid, c.oid FROM pg_catalog.pg_class c WHERE c.oid = ANY ($1::int8[]::oid[])
  UNION
    SELECT i.inhrelid, t.top FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.rel
)
SELECT t.top::int8 AS rel, n.nspname AS nsp, p.proname AS name
FROM tree t
JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = t.rel AND NOT tg.tgisinternal
JOIN pg_catalog.pg_proc p ON p.oid = tg.tgfoid
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
UNION
SELECT t.top::int8, n.nspname, r.rulename
FROM tree t
JOIN pg_catalog.pg_rewrite r ON r.ev_class = t.rel AND r.rulename <> '_RETURN'
JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
"""

# Names of the relations and domains in those edges.
_WRITE_PATH_NAMES_SQL = """
SELECT 'rel' AS kind, c.oid::int8 AS id, n.nspname AS nsp, c.relname AS name
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = ANY ($1::int8[]::oid[])
UNION ALL
SELECT 'type', t.oid::int8, n.nspname, t.typname
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE t.oid = ANY ($2::int8[]::oid[])
"""

# Partitions / inheritance children, with names (both directions become edges).
_INHERITS_SQL = """
SELECT i.inhrelid::int8 AS child, cn.nspname AS child_nsp, c.relname AS child_name,
       i.inhparent::int8 AS parent, pn.nspname AS parent_nsp, p.relname AS parent_name
FROM pg_catalog.pg_inherits i
JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE cn.nspname <> ALL ($1::text[])
"""

# Function bodies for the text match; C and internal functions' prosrc is a symbol name.
_FUNCTIONS_SQL = """
SELECT p.oid::int8 AS id, n.nspname AS nsp, p.proname AS name, p.prosrc AS src,
       l.lanname AS lang
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname <> ALL ($1::text[]) AND l.lanname NOT IN ('c', 'internal')
  AND p.prosrc IS NOT NULL
"""

Node = tuple[str, int]  # ("rel" | "proc" | "rule" | "type" | "op", oid)

# U&"d\0061ta" identifiers (optionally with UESCAPE '!'): a body naming a table this way names
# it as surely as a plain identifier does.
_UNICODE_IDENT = re.compile(r"""U&"((?:[^"]|"")*)"(?:\s*UESCAPE\s*'([^'])')?""", re.I)


def decode_unicode_identifiers(text: str) -> str:
    """``U&"cust\\006Fmers"`` -> ``customers`` (an escape that does not decode is kept)."""
    if "&" not in text:
        return text

    def decode(m: re.Match[str]) -> str:
        body, esc = m.group(1).replace('""', '"'), m.group(2) or "\\"
        out, i = [], 0
        while i < len(body):
            ch = body[i]
            if ch == esc:
                if body[i + 1:i + 2] == esc:
                    out.append(esc)
                    i += 2
                    continue
                digits = 6 if body[i + 1:i + 2] == "+" else 4
                start = i + 2 if digits == 6 else i + 1
                code = body[start:start + digits]
                if len(code) == digits and all(c in "0123456789abcdefABCDEF" for c in code):
                    try:
                        out.append(chr(int(code, 16)))
                    except ValueError:
                        out.append(body[i:start + digits])
                    i = start + digits
                    continue
            out.append(ch)
            i += 1
        return "".join(out)

    return _UNICODE_IDENT.sub(decode, text)

_DYNAMIC_SQL = re.compile(
    r"\bexecute\b(?!\s+(procedure|function)\b)|\bdblink|_to_xml|\bts_stat\b|\bts_rewrite\b|\blo_import\b"
    r"|\bpg_read_file\b|\bcopy\b", re.I)


def _split(name: str) -> tuple[str, str]:
    schema, _, table = name.partition(".")
    return (schema, table) if table else ("public", schema)


async def _fetch_in_pg_catalog(conn: asyncpg.Connection, sql: str, *args: Any) -> list[Any]:
    """``conn.fetch`` with ``search_path`` = pg_catalog (``format_type`` then qualifies every
    other schema's type), restored afterwards."""
    if not conn.is_in_transaction():
        async with conn.transaction(readonly=True):
            await conn.execute("SET LOCAL search_path = pg_catalog")
            return list(await conn.fetch(sql, *args))
    old = await conn.fetchval("SELECT pg_catalog.current_setting('search_path')")
    await conn.execute("SET LOCAL search_path = pg_catalog")
    rows = list(await conn.fetch(sql, *args))  # an error aborts the transaction: no restore
    await conn.execute("SELECT pg_catalog.set_config('search_path', $1, true)", old)
    return rows


async def load_catalog(conn: asyncpg.Connection, protected: Iterable[str],
                       sensitive: Mapping[str, Collection[str]] | None = None
                       ) -> tuple[Catalog, list[str]]:
    """The protected tables' columns and their dependents; also the protected tables not found.

    ``protected`` holds normalised ``schema.table`` names (``rewriters.policy`` lower-cases
    them), matched exactly against the catalog. ``sensitive`` maps a protected table to the
    columns the policy masks: a table with a foreign key onto one of them holds copies of its
    values, so it counts as reading the protected table.
    """
    wanted = sorted(set(protected))
    pairs = [_split(n) for n in wanted]
    rows = await _fetch_in_pg_catalog(conn, _COLUMNS_SQL, [p[0] for p in pairs],
                                      [p[1] for p in pairs])
    tables: dict[str, list[CatalogColumn]] = {}
    oids: dict[int, str] = {}
    for r in rows:
        name = f"{r['nspname']}.{r['relname']}"
        cols = tables.setdefault(name, [])
        oids[int(r["relid"])] = name
        if r["attname"] is not None:
            cols.append(CatalogColumn(r["attname"], r["type_sql"], int(r["type_oid"]),
                                      unique=bool(r["is_unique"]), references=r["refs"]))
    missing = [n for n in wanted if n not in tables]
    dependents = await _dependents(conn, oids, sensitive or {})
    hooks: dict[str, list[str]] = {}
    if oids:
        for r in await conn.fetch(_WRITE_HOOKS_SQL, list(oids)):
            found = hooks.setdefault(oids[int(r["rel"])], [])
            name = f"{r['nsp']}.{r['name']}"
            if name not in found:
                found.append(name)
    catalog = Catalog(tables={k: tuple(v) for k, v in tables.items()}, dependents=dependents,
                      write_hooks={k: tuple(sorted(v)) for k, v in sorted(hooks.items())})
    return catalog, missing


async def _dependents(conn: asyncpg.Connection, protected_oids: dict[int, str],
                      sensitive: Mapping[str, Collection[str]]) -> dict[str, tuple[str, ...]]:
    system = list(_SYSTEM_SCHEMAS)
    names: dict[Node, str] = {}
    edges: list[tuple[Node, Node]] = []
    for r in await conn.fetch(_FK_COPIES_SQL, list(protected_oids)):
        table = protected_oids[int(r["rel"])]
        if set(r["cols"]) & set(sensitive.get(table, ())):
            src = ("rel", int(r["id"]))
            names[src] = f"{r['nsp']}.{r['name']}"
            edges.append((src, ("rel", int(r["rel"]))))
    for r in await conn.fetch(_DEPEND_SQL, system):
        src: Node = (r["kind"], int(r["id"]))
        names[src] = f"{r['nsp']}.{r['name']}"
        edges.append((src, (r["ref_kind"], int(r["ref_id"]))))
    for r in await conn.fetch(_RULES_ON_SQL, list(protected_oids)):
        src = ("rule", int(r["id"]))
        names[src] = f"{r['nsp']}.{r['name']}"
        edges.append((src, ("rel", int(r["rel"]))))
    for r in await conn.fetch(_INHERITS_SQL, system):
        child: Node = ("rel", int(r["child"]))
        parent: Node = ("rel", int(r["parent"]))
        names[child] = f"{r['child_nsp']}.{r['child_name']}"
        names[parent] = f"{r['parent_nsp']}.{r['parent_name']}"
        edges += [(child, parent), (parent, child)]
    path_edges = [((r["kind"], int(r["id"])), (r["ref_kind"], int(r["ref_id"])))
                  for r in await conn.fetch(_WRITE_PATHS_SQL)]
    edges += path_edges
    rel_ids = sorted({n[1] for e in path_edges for n in e if n[0] == "rel"})
    type_ids = sorted({n[1] for e in path_edges for n in e if n[0] == "type"})
    if rel_ids or type_ids:
        for r in await conn.fetch(_WRITE_PATH_NAMES_SQL, rel_ids, type_ids):
            if r["nsp"] in _SYSTEM_SCHEMAS:
                continue
            names.setdefault((r["kind"], int(r["id"])), f"{r['nsp']}.{r['name']}")
    for r in await conn.fetch(_OPERATORS_SQL, system):
        op: Node = ("op", int(r["id"]))
        names[op] = f"{r['nsp']}.{r['name']}"
        edges.append((op, ("proc", int(r["code"]))))
    rows = await conn.fetch(_FUNCTIONS_SQL, system)
    functions = [(("proc", int(r["id"])), f"{r['nsp']}.{r['name']}",
                  decode_unicode_identifiers(r["src"] or "")) for r in rows]
    for node, name, _ in functions:
        names[node] = name

    for oid, name in protected_oids.items():
        names[("rel", oid)] = name
    reads: dict[Node, set[str]] = {("rel", oid): {name} for oid, name in protected_oids.items()}
    everything = set(protected_oids.values())
    sources: set[Node] = set()  # statistics, others' statement text: read all, no dependents
    if everything:
        for r in await conn.fetch(_STATS_SQL, sorted(_NAMED_ONLY)):
            node: Node = ("rel", int(r["id"]))
            names[node] = f"pg_catalog.{r['name']}"
            reads[node] = set(everything)
            sources.add(node)
        # (and views over other sessions' statement text: the literals other operators typed)
        stats_words = r"\m(" + "|".join(sorted(_NAMED_ONLY)) + r")\M"
        for r in await conn.fetch(_STATS_VIEWS_SQL, system, stats_words):
            node = ("rel", int(r["id"]))
            names[node] = f"{r['nsp']}.{r['name']}"
            reads[node] = set(everything)
    # A function that builds SQL at run time (plpgsql EXECUTE, dblink, query_to_xml…) or is
    # written in a general-purpose language can read any table, whatever its text names:
    # count it as reading every protected table, so masked roles are denied it unless the
    # policy lists it (allow_dependents).
    if everything:
        for r in await conn.fetch(_OPAQUE_SQL, system):
            node = (r["kind"], int(r["id"]))
            names[node] = f"{r['nsp']}.{r['name']}"
            reads[node] = set(everything)
    for r in rows:
        if everything and (r["lang"] not in ("sql", "plpgsql") or
                           _DYNAMIC_SQL.search(r["src"] or "")):
            reads[("proc", int(r["id"]))] = set(everything)
    _close(reads, edges, functions, names)

    out: dict[str, set[str]] = {}
    for node, tables in reads.items():
        if (node[0] == "rel" and node[1] in protected_oids) or node in sources:
            continue  # a protected table is not its own dependent
        if tables and node in names:
            out.setdefault(names[node], set()).update(tables)
    return {k: tuple(sorted(v)) for k, v in sorted(out.items())}


def _close(reads: dict[Node, set[str]], edges: list[tuple[Node, Node]],
           functions: list[tuple[Node, str, str]], names: dict[Node, str]) -> None:
    """Propagate "reads protected table T" along edges and body mentions to a fixpoint.

    Each round either adds a table to some node's set or stops, so it ends after at most
    (nodes x tables) rounds; in practice two or three.
    """
    changed = True
    while changed:
        changed = False
        for src, ref in edges:
            got = reads.get(ref)
            if got and not got <= reads.setdefault(src, set()):
                reads[src] |= got
                changed = True
        # Names that carry protected data, as a function body would write them (unqualified;
        # a qualified "public.customers" still contains the word "customers").
        carriers: dict[str, set[str]] = {}
        for node, tables in reads.items():
            if tables and node[0] != "rule" and node in names:
                short = names[node].rpartition(".")[2].lower()
                carriers.setdefault(short, set()).update(tables)
        if not carriers:
            return
        alternatives = "|".join(re.escape(n) for n in sorted(carriers, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w$])({alternatives})(?![\w$])", re.IGNORECASE)
        for node, _, body in functions:
            found: set[str] = set()
            for m in pattern.finditer(body):
                found |= carriers[m.group(1).lower()]
            if found and not found <= reads.setdefault(node, set()):
                reads[node] |= found
                changed = True
