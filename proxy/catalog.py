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
from collections.abc import Iterable

import asyncpg

from rewriters.model import Catalog, CatalogColumn

_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")

_COLUMNS_SQL = """
SELECT n.nspname, c.relname, c.oid::int8 AS relid, a.attname,
       pg_catalog.format_type(a.atttypid, a.atttypmod) AS type_sql, a.atttypid::int8 AS type_oid,
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i
               WHERE i.indrelid = c.oid AND i.indisunique AND i.indnatts = 1
                 AND i.indkey[0] = a.attnum) AS is_unique,
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
ORDER BY n.nspname, c.relname, a.attnum
"""

# Edges "dependent -> referenced" from rewrite rules and functions to relations and functions.
# A view is its _RETURN rule; any other rule is a node of its own.
_DEPEND_SQL = """
SELECT CASE WHEN r.rulename = '_RETURN' THEN 'rel' ELSE 'rule' END AS kind,
       CASE WHEN r.rulename = '_RETURN' THEN r.ev_class::int8 ELSE r.oid::int8 END AS id,
       n.nspname AS nsp,
       CASE WHEN r.rulename = '_RETURN' THEN c.relname ELSE r.rulename END AS name,
       CASE WHEN d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
            THEN 'rel' ELSE 'proc' END AS ref_kind,
       d.refobjid::int8 AS ref_id
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
     AND r.oid = d.objid
JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE d.deptype = 'n'
  AND d.refclassid IN ('pg_catalog.pg_class'::pg_catalog.regclass,
                       'pg_catalog.pg_proc'::pg_catalog.regclass)
  AND n.nspname <> ALL ($1::text[])
UNION ALL
SELECT 'proc', p.oid::int8, n.nspname, p.proname,
       CASE WHEN d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
            THEN 'rel' ELSE 'proc' END,
       d.refobjid::int8
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_proc p ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
     AND p.oid = d.objid
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE d.deptype = 'n'
  AND d.refclassid IN ('pg_catalog.pg_class'::pg_catalog.regclass,
                       'pg_catalog.pg_proc'::pg_catalog.regclass)
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

# What runs when a table is written or a value is cast, as edges "relation or domain -> what it
# calls or reads": triggers, column defaults and generated columns, CHECK constraints of tables
# and domains, non-view rules on the table, and columns of a domain type. A teller's INSERT
# into an unprotected table whose trigger, default or rule copies customers' phones into it (or
# whose CHECK calls a function comparing with them) reads protected data as surely as a view
# does. Foreign keys are left out on purpose: a table of notes or tickets referencing customers
# is the ordinary shape of a CRM, and denying it whole would break the application for a signal
# no stronger than the customer counts the catalog already shows (an INSERT succeeds iff that
# customer id exists, in some branch).
_WRITE_PATHS_SQL = """
SELECT 'rel' AS kind, t.tgrelid::int8 AS id, 'proc' AS ref_kind, t.tgfoid::int8 AS ref_id
FROM pg_catalog.pg_trigger t
WHERE NOT t.tgisinternal
UNION ALL
SELECT 'rel', ad.adrelid::int8,
       CASE WHEN d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
            THEN 'rel' ELSE 'proc' END,
       d.refobjid::int8
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_attrdef ad ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass
     AND ad.oid = d.objid
WHERE d.refclassid IN ('pg_catalog.pg_class'::pg_catalog.regclass,
                       'pg_catalog.pg_proc'::pg_catalog.regclass)
  AND d.refobjid <> ad.adrelid
UNION ALL
SELECT CASE WHEN con.contypid <> 0 THEN 'type' ELSE 'rel' END,
       CASE WHEN con.contypid <> 0 THEN con.contypid::int8 ELSE con.conrelid::int8 END,
       CASE WHEN d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
            THEN 'rel' ELSE 'proc' END,
       d.refobjid::int8
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_constraint con
     ON d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND con.oid = d.objid
WHERE con.contype = 'c'
  AND d.refclassid IN ('pg_catalog.pg_class'::pg_catalog.regclass,
                       'pg_catalog.pg_proc'::pg_catalog.regclass)
  AND d.refobjid <> con.conrelid
UNION ALL
SELECT 'rel', r.ev_class::int8, 'rule', r.oid::int8
FROM pg_catalog.pg_rewrite r
WHERE r.rulename <> '_RETURN'
UNION ALL
SELECT 'rel', a.attrelid::int8, 'type', a.atttypid::int8
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid AND ty.typtype = 'd'
WHERE a.attnum > 0 AND NOT a.attisdropped
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

Node = tuple[str, int]  # ("rel" | "proc" | "rule", oid)

_DYNAMIC_SQL = re.compile(
    r"\bexecute\b(?!\s+(procedure|function)\b)|\bdblink|_to_xml|\bts_stat\b|\bts_rewrite\b|\blo_import\b"
    r"|\bpg_read_file\b|\bcopy\b", re.I)


def _split(name: str) -> tuple[str, str]:
    schema, _, table = name.partition(".")
    return (schema, table) if table else ("public", schema)


async def load_catalog(conn: asyncpg.Connection,
                       protected: Iterable[str]) -> tuple[Catalog, list[str]]:
    """The protected tables' columns and their dependents; also the protected tables not found.

    ``protected`` holds normalised ``schema.table`` names (``rewriters.policy`` lower-cases
    them), matched exactly against the catalog.
    """
    wanted = sorted(set(protected))
    pairs = [_split(n) for n in wanted]
    rows = await conn.fetch(_COLUMNS_SQL, [p[0] for p in pairs], [p[1] for p in pairs])
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
    dependents = await _dependents(conn, oids)
    catalog = Catalog(tables={k: tuple(v) for k, v in tables.items()}, dependents=dependents)
    return catalog, missing


async def _dependents(conn: asyncpg.Connection,
                      protected_oids: dict[int, str]) -> dict[str, tuple[str, ...]]:
    system = list(_SYSTEM_SCHEMAS)
    names: dict[Node, str] = {}
    edges: list[tuple[Node, Node]] = []
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
    rows = await conn.fetch(_FUNCTIONS_SQL, system)
    functions = [(("proc", int(r["id"])), f"{r['nsp']}.{r['name']}", r["src"] or "")
                 for r in rows]
    for node, name, _ in functions:
        names[node] = name

    for oid, name in protected_oids.items():
        names[("rel", oid)] = name
    reads: dict[Node, set[str]] = {("rel", oid): {name} for oid, name in protected_oids.items()}
    # A function that builds SQL at run time (plpgsql EXECUTE, dblink, query_to_xml…) or is
    # written in a general-purpose language can read any table, whatever its text names:
    # count it as reading every protected table, so masked roles are denied it unless the
    # policy lists it (allow_dependents).
    everything = set(protected_oids.values())
    for r in rows:
        if everything and (r["lang"] not in ("sql", "plpgsql") or
                           _DYNAMIC_SQL.search(r["src"] or "")):
            reads[("proc", int(r["id"]))] = set(everything)
    _close(reads, edges, functions, names)

    out: dict[str, set[str]] = {}
    for node, tables in reads.items():
        if node[0] == "rel" and node[1] in protected_oids:
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
