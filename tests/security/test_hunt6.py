"""Bypass hunt 6: ways around the fixes of hunts four and five, each now closed and asserted.

* startup ``options`` spelled as PostgreSQL also reads them (``-c debug-print-plan=on``,
  ``--debug-print-plan=on``, ``debug_print_pl\\an``): proxy/server.py normalises them;
* ``LISTEN "SEC_CH"`` is another channel than the listed ``sec_ch``: channels compare as stored;
* an implicit or assignment cast whose function reads customers, reached without naming the
  type (``h6_show(g)`` of a function taking the type, an INSERT into a column of it);
* a user-defined operator class whose hash support function reads customers (index writes);
* a foreign-key ``ON UPDATE CASCADE`` from customers: writing the referenced table rewrote
  customers rows of every branch and ran their trigger;
* renaming a function or view, moving a function to another schema, ``ALTER POLICY`` and
  ``CREATE OR REPLACE`` of a ``BEGIN ATOMIC`` body changed nothing pgveil's catalog fingerprint
  counted, so the old catalog stayed for up to 300 s;
* a foreign table (postgres_fdw) or a view over ``dblink(...)`` pointing at customers.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.security.conftest import LeakChecker, Protocol, Received, dba_objects

LISTED_CHANNELS = frozenset({"sec_ch", "h2c", "h4_cust"})  # the suite's policy (conftest)


def verdict(leak: LeakChecker, name: str, received: Received, sql: Any) -> None:
    """No raw value and no out-of-scope customer reached the client (``name``: the case)."""
    leak.check(received, leak._fill(sql) if isinstance(sql, str) else sql, login="teller_sz01")


# ------------------------------------------------------------------ startup options / debug

@pytest.mark.parametrize("options", [
    "-c debug_print_plan=on",            # control: refused
    "-c debug-print-plan=on",            # PostgreSQL maps '-' to '_' in -c names
    "--debug-print-plan=on",
    "-c debug_print_pl\\an=on",          # pg_split_opts removes backslashes
    "-c Debug-Print-Rewritten=on",
    "-c\tdebug_print_plan=on",
])
def test_startup_options_debug(leak: LeakChecker, options: str) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        leak.connect(options=options).close()
    assert "escaping the policy for role teller" in str(info.value)


@pytest.mark.parametrize("sql", [
    "ALTER ROLE CURRENT_USER SET debug_print_plan = on",
    "ALTER ROLE teller_sz01 SET debug_print_plan TO on",
    "SET debug_print_plan = default",
    'SET U&"debug\\005Fprint_plan" = on',
    "SET U&\"debug!005Fprint!005Fplan\" UESCAPE '!' = on",
    "SET debug_pretty_print = on",
    "SET trace_notify = on",
    'set "debug_print_plan" = on',
    'set "DEBUG_PRINT_PLAN" = on',
    "select set_config(lower('DEBUG_PRINT_PLAN'), 'on', false)",
    "select set_config('debug_print_plan'::text, 'on', false)",
    "select set_config(E'debug_print_plan', 'on', false)",
    "select set_config(U&'debug\\005Fprint_plan', 'on', false)",
    "select set_config($$debug_print_plan$$, 'on', false)",
    "select pg_catalog.set_config('debug_print_rewritten', 'true', false)",
    "select set_config(n, 'on', false) from (values ('debug_print_plan')) v(n)",
    "select current_setting('debug_print_plan')",
])
def test_debug_set_spellings(leak: LeakChecker, sql: str) -> None:
    with leak.connect() as conn:
        try:
            cur = conn.execute(sql)
            out = cur.fetchall() if cur.description else "ok"
            res = f"ACCEPTED {out}"
        except psycopg.Error as exc:
            res = f"{type(exc).__name__} {exc.sqlstate}: {str(exc)[:150]}"
        try:
            shown = conn.execute("show debug_print_plan").fetchone()
            shown2 = conn.execute("show debug_print_rewritten").fetchone()
        except psycopg.Error as exc:
            shown = shown2 = str(exc)[:100]
    try:
        assert (shown, shown2) == (("off",), ("off",)), res
        with leak.connect() as fresh:  # ALTER ROLE ... SET would show in a new session
            assert fresh.execute("show debug_print_plan").fetchone() == ("off",), res
    finally:
        with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
            dba.execute("ALTER ROLE teller_sz01 RESET ALL")


# ------------------------------------------------------------------ LISTEN


def _notifs(conn: psycopg.Connection[Any]) -> list[str]:
    conn.execute("select 1")
    return [f"{n.channel}:{n.payload}" for n in conn.notifies(timeout=1, stop_after=1)]


@pytest.mark.parametrize("listen,channel", [
    ('LISTEN "SEC_CH"', "SEC_CH"),
    ('LISTEN "Sec_Ch"', "Sec_Ch"),
    ('LiStEn/**/h5_events', "h5_events"),
    ('LISTEN U&"h5\\005Fevents"', "h5_events"),
    ('LISTEN U&"\\0073ec_ch"', "sec_ch"),
    ("select 1\\; listen h5_events", "h5_events"),
    ("listen sec_ch; listen h5_events", "h5_events"),
    ("begin; listen h5_events; commit", "h5_events"),
    ("PREPARE h6p AS LISTEN h5_events", "h5_events"),
    ("select public.h6_listen('h5_events')", "h5_events"),
])
def test_listen_spellings(leak: LeakChecker, listen: str, channel: str) -> None:
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute("""CREATE OR REPLACE FUNCTION public.h6_listen(ch text) RETURNS void
            LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'LISTEN ' || quote_ident(ch); END $$""")
        dba.execute("GRANT EXECUTE ON FUNCTION public.h6_listen(text) TO PUBLIC")
    with leak.connect() as teller:
        try:
            teller.execute(listen.replace("\\;", ";"))
            res = "ACCEPTED"
        except psycopg.Error as exc:
            res = f"{type(exc).__name__} {exc.sqlstate}: {str(exc)[:150]}"
            # "begin; <refused>; commit": BEGIN ran, the block failed (as in PostgreSQL)
            teller.execute("rollback")
        chans = teller.execute("select pg_listening_channels()").fetchall()
        with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
            dba.execute("select pg_notify(%s, row_to_json(c)::text) from customers c "
                        "where id = 1", (channel,))
        time.sleep(0.3)
        got = _notifs(teller)
    if channel not in LISTED_CHANNELS:  # a listed channel is the DBA's choice
        assert got == [], (res, chans, got)
        assert chans == [], (res, chans)


def test_listen_extended(leak: LeakChecker) -> None:
    for proto in (Protocol.EXTENDED, Protocol.PREPARED):
        r = leak.run("LISTEN h5_events", protocol=proto)
        assert r.denied, r.describe()


# ------------------------------------------------------------------ DBA objects

SETUP = [r"""
CREATE FUNCTION public.h6_rowfn(public.customers) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT $1.phone $$;
CREATE FUNCTION public.h6_fn(int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT phone FROM public.customers WHERE id = $1 $$;
CREATE FUNCTION public.h6_fn3(int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT id_number FROM public.customers WHERE id = $1 $$;
CREATE VIEW public.h6_v AS SELECT id, phone, id_number, branch_id FROM public.customers;
GRANT SELECT ON public.h6_v TO PUBLIC;
CREATE SCHEMA h6s;
GRANT USAGE ON SCHEMA h6s TO PUBLIC;
CREATE FUNCTION public.h6_safe(int) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'x1'::text $$;
CREATE FUNCTION public.h6_imm(int) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT phone FROM public.customers WHERE id = $1 $$;
CREATE TABLE public.h6_rls (cid int);
INSERT INTO public.h6_rls SELECT g FROM generate_series(1, 5) g;
GRANT SELECT ON public.h6_rls TO PUBLIC;
ALTER TABLE public.h6_rls ENABLE ROW LEVEL SECURITY;
CREATE POLICY h6_pol ON public.h6_rls USING (public.h6_safe(cid) IS NOT NULL);
-- assignment / implicit casts whose function reads customers
CREATE TYPE public.h6_t AS (v text);
CREATE FUNCTION public.h6_castf(int) RETURNS public.h6_t LANGUAGE sql STABLE
    AS $$ SELECT ROW(id_number)::public.h6_t FROM public.customers WHERE id = $1 $$;
CREATE CAST (int AS public.h6_t) WITH FUNCTION public.h6_castf(int) AS IMPLICIT;
CREATE TABLE public.h6_ct (id int, t public.h6_t);
GRANT ALL ON public.h6_ct TO PUBLIC;
CREATE FUNCTION public.h6_show(public.h6_t) RETURNS text LANGUAGE sql STABLE AS $$ SELECT ($1).v $$;
-- aggregate whose state function reads customers
CREATE FUNCTION public.h6_sfn(text, int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT coalesce($1, '') || (SELECT phone FROM public.customers WHERE id = $2) $$;
CREATE AGGREGATE public.h6_agg(int) (SFUNC = public.h6_sfn, STYPE = text);
CREATE PROCEDURE public.h6_proc(cid int, INOUT p text) LANGUAGE plpgsql
    AS $$ BEGIN SELECT phone INTO p FROM public.customers WHERE id = cid; END $$;
"""]
TEARDOWN = r"""
DROP TABLE IF EXISTS public.h6_ct, public.h6_rls;
DROP CAST IF EXISTS (int AS public.h6_t);
DROP FUNCTION IF EXISTS public.h6_show(public.h6_t);
DROP FUNCTION IF EXISTS public.h6_castf(int);
DROP TYPE IF EXISTS public.h6_t;
DROP AGGREGATE IF EXISTS public.h6_agg(int);
DROP FUNCTION IF EXISTS public.h6_sfn(text, int);
DROP PROCEDURE IF EXISTS public.h6_proc(int, text);
DROP SCHEMA IF EXISTS h6s CASCADE;
DROP VIEW IF EXISTS public.h6_v, public.h6_v2;
DROP FUNCTION IF EXISTS public.h6_rowfn(public.customers);
DROP FUNCTION IF EXISTS public.h6_fn(int);
DROP FUNCTION IF EXISTS public.h6_fn2(int);
DROP FUNCTION IF EXISTS public.h6_fn3(int);
DROP FUNCTION IF EXISTS public.h6_safe(int);
DROP FUNCTION IF EXISTS public.h6_imm(int);
"""


@pytest.fixture(scope="module")
def objs(leak: LeakChecker) -> Iterator[LeakChecker]:
    with dba_objects(leak, SETUP, TEARDOWN, "select public.h6_agg(1)") as checker:
        yield checker


@pytest.mark.parametrize("sql,proto", [
    ("select (c).h6_rowfn from customers c where id in (3, 9, 12000)", Protocol.SIMPLE),
    ("select (c.*).h6_rowfn from customers c where id = 3", Protocol.SIMPLE),
    ('select c."h6_rowfn" from customers c where id = 3', Protocol.SIMPLE),
    ("select ((c)).h6_rowfn from customers c where id = 3", Protocol.SIMPLE),
    ("select (select c from customers c where id = 3).h6_rowfn", Protocol.SIMPLE),
    ("select ((array_agg(c))[1]).h6_rowfn from customers c where id = 3", Protocol.SIMPLE),
    ("select h6_fn(5)", Protocol.EXTENDED),
    ("select public.h6_agg(g) from generate_series(1, 3) g", Protocol.SIMPLE),
    ("select h6_agg(g order by g) from generate_series(1, 3) g", Protocol.SIMPLE),
    ("select h6_show(5)", Protocol.SIMPLE),
    ("select h6_show(id) from customers where id in (1, 2, 3)", Protocol.SIMPLE),
    ("select (5::h6_t).v", Protocol.SIMPLE),
    ("select (cast(5 as public.h6_t)).v", Protocol.SIMPLE),
    ("select h6_show(g) from generate_series(1, 3) g", Protocol.PREPARED),
    ("select h6_show(5::int)", Protocol.EXTENDED),
    ("CALL public.\"h6_proc\"(3, null)", Protocol.SIMPLE),
    ("CALL h6_proc(p => null, cid => 3)", Protocol.EXTENDED),
    ("CALL h6_proc(3, null)", Protocol.PREPARED),
    ("call H6_PROC(3, null)", Protocol.SIMPLE),
])
def test_shapes(objs: LeakChecker, sql: str, proto: Protocol) -> None:
    r = objs.run(sql, protocol=proto)
    verdict(objs, f"{sql} [{proto.name}]", r, sql)


def test_assignment_cast_into_table(objs: LeakChecker) -> None:
    with psycopg.connect(objs.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute("delete from public.h6_ct")
    for sql in ["insert into h6_ct(id, t) values (1, 5)",
                "insert into h6_ct select 2, 12000",
                "update h6_ct set t = 7 where id = 1",
                "select * from h6_ct"]:
        r = objs.run(sql)
        verdict(objs, f"cast: {sql}", r, sql)


def _wait_polls() -> None:
    time.sleep(4)  # several catalog_poll_seconds: a reload would have happened by now


@pytest.mark.parametrize(("change", "sql", "undo"), [
    ("ALTER FUNCTION public.h6_fn(int) RENAME TO h6_fn2",
     "select h6_fn2(id) from generate_series(1, 3) id",
     "ALTER FUNCTION public.h6_fn2(int) RENAME TO h6_fn"),
    ("ALTER FUNCTION public.h6_fn3(int) SET SCHEMA h6s",
     "select h6s.h6_fn3(g) from generate_series(1, 3) g",
     "ALTER FUNCTION h6s.h6_fn3(int) SET SCHEMA public"),
    ("ALTER VIEW public.h6_v RENAME TO h6_v2",
     "select * from h6_v2 where id in (1, 2, 3, 12000) limit 5",
     "ALTER VIEW public.h6_v2 RENAME TO h6_v"),
], ids=["rename-function", "move-function", "rename-view"])
def test_renamed_dependent_is_still_known(objs: LeakChecker, change: str, sql: str,
                                          undo: str) -> None:
    with psycopg.connect(objs.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute(change)
    try:
        _wait_polls()
        verdict(objs, change, objs.run(sql), sql)
    finally:
        with psycopg.connect(objs.pg.dsn("dba"), autocommit=True) as dba:
            dba.execute(undo)


def test_alter_policy_swap(objs: LeakChecker) -> None:
    sql = "select count(*) from h6_rls"
    verdict(objs, "rls before swap " + sql, objs.run(sql), sql)
    with psycopg.connect(objs.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute("ALTER POLICY h6_pol ON public.h6_rls "
                    "USING (public.h6_imm(cid)::int2 > 0)")
    try:
        _wait_polls()
        verdict(objs, "rls after ALTER POLICY swap " + sql, objs.run(sql), sql)
    finally:
        with psycopg.connect(objs.pg.dsn("dba"), autocommit=True) as dba:
            dba.execute("ALTER POLICY h6_pol ON public.h6_rls "
                        "USING (public.h6_safe(cid) IS NOT NULL)")


# ------------------------------------------------------------------ FK cascade into customers

CASCADE_SETUP = [r"""
CREATE TABLE public.h6_seg (id int PRIMARY KEY);
INSERT INTO public.h6_seg VALUES (1);
GRANT ALL ON public.h6_seg TO PUBLIC;
ALTER TABLE public.customers ADD COLUMN h6_seg int
    REFERENCES public.h6_seg(id) ON UPDATE CASCADE ON DELETE SET NULL;
UPDATE public.customers SET h6_seg = 1
    WHERE id IN (1, 2, 3) OR id IN (SELECT id FROM public.customers WHERE branch_id = 'GZ01'
                                    ORDER BY id LIMIT 2);
CREATE FUNCTION public.h6_trg() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE NOTICE 'customer % (%) changed: phone %', new.id, new.branch_id, new.phone;
      RETURN new; END $$;
CREATE TRIGGER h6_t AFTER UPDATE ON public.customers FOR EACH ROW
    EXECUTE FUNCTION public.h6_trg();
"""]
CASCADE_TEARDOWN = r"""
DROP TRIGGER IF EXISTS h6_t ON public.customers;
DROP FUNCTION IF EXISTS public.h6_trg();
ALTER TABLE public.customers DROP COLUMN IF EXISTS h6_seg;
DROP TABLE IF EXISTS public.h6_seg;
"""


def test_fk_cascade_fires_customers_trigger(leak: LeakChecker) -> None:
    with dba_objects(leak, CASCADE_SETUP, CASCADE_TEARDOWN,
                     "update customers set level = level where id = 1") as checker:
        for sql in ["update h6_seg set id = 2 where id = 1",
                    "insert into customers (id, name, phone, id_number, branch_id) values "
                    "(3, 'x', '1', '1', 'SZ01') on conflict (id) do update set level = 1",
                    "merge into customers c using (values (3)) v(i) on c.id = v.i "
                    "when matched then update set level = c.level",
                    "delete from h6_seg where id = 2"]:
            r = checker.run(sql)
            verdict(checker, "cascade " + sql, r, sql)


# ------------------------------------------------------------------ operator class support function

OPC_SETUP = [r"""
CREATE FUNCTION public.h6_hash(int) RETURNS int LANGUAGE sql IMMUTABLE
    AS $$ SELECT (SELECT phone FROM public.customers WHERE id = $1)::int2::int $$;
CREATE OPERATOR CLASS public.h6_hops FOR TYPE int USING hash AS
    OPERATOR 1 = , FUNCTION 1 public.h6_hash(int);
CREATE TABLE public.h6_hx (cid int);
GRANT ALL ON public.h6_hx TO PUBLIC;
CREATE INDEX h6_hx_i ON public.h6_hx USING hash (cid public.h6_hops);
"""]
OPC_TEARDOWN = r"""
DROP TABLE IF EXISTS public.h6_hx;
DROP OPERATOR CLASS IF EXISTS public.h6_hops USING hash;
DROP OPERATOR FAMILY IF EXISTS public.h6_hops USING hash;
DROP FUNCTION IF EXISTS public.h6_hash(int);
"""


def test_opclass_support_function(leak: LeakChecker) -> None:
    with dba_objects(leak, OPC_SETUP, OPC_TEARDOWN, "select public.h6_hash(1)") as checker:
        for sql in ["insert into h6_hx values (1)",
                    "insert into h6_hx select g from generate_series(1, 3) g",
                    "set enable_seqscan = off; select * from h6_hx where cid = 2"]:
            r = checker.run(sql)
            verdict(checker, "opclass " + sql, r, sql)


# ------------------------------------------------------------------ remote reads of customers

def _remote_setup(leak: LeakChecker) -> list[str]:
    from urllib.parse import urlsplit
    u = urlsplit(leak.pg.dsn("dba"))
    conn = f"host={u.hostname} port={u.port} dbname=bank user=dba password=pw_dba"
    return [f"""
CREATE EXTENSION IF NOT EXISTS dblink;
CREATE EXTENSION IF NOT EXISTS postgres_fdw;
CREATE VIEW public.h6_dbl AS SELECT * FROM public.dblink('{conn}',
    'select id, phone, id_number, branch_id from public.customers')
    AS t(id int, phone text, id_number text, branch_id text);
GRANT SELECT ON public.h6_dbl TO PUBLIC;
CREATE SERVER h6_lo FOREIGN DATA WRAPPER postgres_fdw
    OPTIONS (host '{u.hostname}', port '{u.port}', dbname 'bank');
CREATE USER MAPPING FOR PUBLIC SERVER h6_lo OPTIONS (user 'dba', password 'pw_dba');
CREATE FOREIGN TABLE public.h6_ft (id int, phone text, id_number text, branch_id text)
    SERVER h6_lo OPTIONS (schema_name 'public', table_name 'customers');
GRANT SELECT ON public.h6_ft TO PUBLIC;
CREATE FUNCTION public.h6_probe_r(int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT phone FROM public.customers WHERE id = $1 $$;
"""]


REMOTE_TEARDOWN = r"""
DROP VIEW IF EXISTS public.h6_dbl;
DROP FOREIGN TABLE IF EXISTS public.h6_ft;
DROP USER MAPPING IF EXISTS FOR PUBLIC SERVER h6_lo;
DROP SERVER IF EXISTS h6_lo;
DROP FUNCTION IF EXISTS public.h6_probe_r(int);
"""


def test_remote_reads(leak: LeakChecker) -> None:
    with dba_objects(leak, _remote_setup(leak), REMOTE_TEARDOWN,
                     "select public.h6_probe_r(1)") as checker:
        for sql in ["select * from h6_ft where id in (1, 2, 3)",
                    "select * from h6_dbl where id in (1, 2, 3)"]:
            r = checker.run(sql)
            verdict(checker, "remote " + sql, r, sql)


# ------------------------------------------------------------------ BEGIN ATOMIC body replaced

ATOMIC_SETUP = [r"""
CREATE TABLE public.h6_decoy (id int, phone text);
INSERT INTO public.h6_decoy SELECT g, 'n/a' FROM generate_series(1, 5) g;
CREATE FUNCTION public.h6_at(cid int) RETURNS text LANGUAGE sql STABLE
    BEGIN ATOMIC SELECT phone FROM public.h6_decoy WHERE id = cid; END;
CREATE FUNCTION public.h6_at_probe(cid int) RETURNS text LANGUAGE sql STABLE
    BEGIN ATOMIC SELECT phone FROM public.customers WHERE id = cid; END;
"""]
ATOMIC_TEARDOWN = r"""
DROP FUNCTION IF EXISTS public.h6_at(int);
DROP FUNCTION IF EXISTS public.h6_at_probe(int);
DROP TABLE IF EXISTS public.h6_decoy;
"""


def test_atomic_body_replaced(leak: LeakChecker) -> None:
    with dba_objects(leak, ATOMIC_SETUP, ATOMIC_TEARDOWN,
                     "select public.h6_at_probe(1)") as checker:
        sql = "select h6_at(g) from generate_series(1, 3) g"
        verdict(checker, "atomic before " + sql, checker.run(sql), sql)
        with psycopg.connect(checker.pg.dsn("dba"), autocommit=True) as dba:
            before = dba.execute("select count(*) from pg_depend").fetchone()
            dba.execute("""CREATE OR REPLACE FUNCTION public.h6_at(cid int) RETURNS text
                LANGUAGE sql STABLE
                BEGIN ATOMIC SELECT phone FROM public.customers WHERE id = cid; END""")
            after = dba.execute("select count(*) from pg_depend").fetchone()
        _wait_polls()
        r = checker.run(sql)
        verdict(checker, f"atomic after replace (pg_depend {before}->{after}) " + sql, r, sql)


@pytest.mark.parametrize("replication", ["database", "true", "on", "1", "yes", "TRUE"])
def test_replication_connections_are_refused(leak: LeakChecker, replication: str) -> None:
    """A WAL sender streams rows by commands that are not SQL (START_REPLICATION, BASE_BACKUP,
    an exported snapshot): a masked role may not open one, whatever its role attributes."""
    with pytest.raises(psycopg.OperationalError) as info:
        leak.connect(replication=replication).close()
    assert "replication sender" in str(info.value)
    assert "escaping the policy for role teller" in str(info.value)


def test_replication_off_is_a_normal_session(leak: LeakChecker) -> None:
    with leak.connect(replication="false") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
