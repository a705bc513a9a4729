"""Bypass hunt 4: DBA-made objects that carry customer data along paths the catalog did not follow.

Found by a hunt over shapes the earlier hunts had not tried; every ``DBA_PATHS`` case leaked raw
phones or ID numbers (of out-of-scope customers too) before the fixes named here, and each is
now a denial:

* ``CALL`` of a procedure that reads customers: libpg_query gives ``CallStmt.funccall`` as a
  bare FuncCall, which the verifier walked past (rewriters/verify.py ``push``);
* attribute notation, ``c.fn`` / ``(c).fn`` / ``(row(..)::t).fn``: PostgreSQL calls ``fn(c)``,
  the parse tree holds a column reference (verify ``attribute_call``);
* an operator or a cast whose function reads customers, and views, defaults, generated columns
  and function bodies that use the operator (proxy/catalog.py: operator and cast edges);
* a domain's DEFAULT; index expressions, partition keys, trigger WHEN conditions, row-level
  security policies and exclusion constraints that call such a function (their errors carry the
  value: "value "13900104729" is out of range for type smallint");
* DBA views and functions over the planner statistics (``pg_stats``, and ``pg_statistic``,
  on which PostgreSQL records no dependency because the catalog is pinned);
* triggers and rules on ``customers`` itself: they see NEW and OLD raw (a NOTICE, a NOTIFY
  payload, a history table); writing the table is denied to masked roles unless the policy
  lists the trigger's function (Catalog.write_hooks);
* a function body naming the table as ``U&"cust\\006Fmers"``.

The ``SHAPES`` held before and after; they stay as regression cases.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.security.conftest import LeakChecker, Protocol, Received, dba_objects


def case(case_id: str, sql: Any, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


def denied(received: Received) -> None:
    assert received.denied, f"expected a 42501 denial, got {received.describe()}"


SETUP = r"""
CREATE FUNCTION public.h4_imm(int) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT phone FROM public.customers WHERE id = $1 $$;
CREATE FUNCTION public.h4_idn(int) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT id_number FROM public.customers WHERE id = $1 $$;
-- operator / cast over a function that reads customers
CREATE OPERATOR public.#@ (RIGHTARG = int, FUNCTION = public.h4_imm);
CREATE OPERATOR public.#% (LEFTARG = int, RIGHTARG = int, FUNCTION = public.h4_opfn2);
CREATE TYPE public.h4_t AS (v text);
CREATE FUNCTION public.h4_castf(int) RETURNS public.h4_t LANGUAGE sql IMMUTABLE
    AS $$ SELECT ROW(id_number)::public.h4_t FROM public.customers WHERE id = $1 $$;
CREATE CAST (int AS public.h4_t) WITH FUNCTION public.h4_castf(int) AS ASSIGNMENT;
-- objects that use the operator (their pg_depend edge points at pg_operator)
CREATE VIEW public.h4_opview AS SELECT g AS cid, #@ g AS p FROM generate_series(1, 6) g;
CREATE TABLE public.h4_opdef (id int, p text DEFAULT (#@ 1));
CREATE TABLE public.h4_opgen (cid int, p text GENERATED ALWAYS AS (#@ cid) STORED);
CREATE FUNCTION public.h4_opbody(int) RETURNS text LANGUAGE sql STABLE AS $$ SELECT #@ $1 $$;
-- expressions evaluated on write / read whose casts fail with the raw value in the message
CREATE TABLE public.h4_ix (cid int);
CREATE INDEX h4_ix_e ON public.h4_ix ((public.h4_imm(cid)::int2));
CREATE TABLE public.h4_pt (cid int) PARTITION BY RANGE ((public.h4_imm(cid)::int2));
CREATE TABLE public.h4_pt_d PARTITION OF public.h4_pt DEFAULT;
CREATE FUNCTION public.h4_noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN new; END $$;
CREATE TABLE public.h4_tw (cid int);
CREATE TRIGGER h4_tw_t BEFORE INSERT ON public.h4_tw FOR EACH ROW
    WHEN (public.h4_imm(new.cid)::int2 > 0) EXECUTE FUNCTION public.h4_noop();
CREATE TABLE public.h4_rls (cid int);
INSERT INTO public.h4_rls VALUES (1);
ALTER TABLE public.h4_rls ENABLE ROW LEVEL SECURITY;
CREATE POLICY h4_pol ON public.h4_rls USING (public.h4_imm(cid)::int2 > 0);
CREATE TABLE public.h4_ex (cid int, EXCLUDE USING btree ((public.h4_imm(cid)::int2) WITH =));
-- domain default
CREATE FUNCTION public.h4_vol(int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT phone FROM public.customers WHERE id = $1 $$;
CREATE DOMAIN public.h4_dd AS text DEFAULT public.h4_vol(1);
CREATE TABLE public.h4_ddt (id int, p public.h4_dd);
-- DBA monitoring objects over the planner statistics
CREATE VIEW public.h4_colstats AS SELECT tablename, attname, histogram_bounds::text AS hb,
    most_common_vals::text AS mcv FROM pg_catalog.pg_stats WHERE schemaname = 'public';
CREATE VIEW public.h4_rawstat AS SELECT starelid AS rel, staattnum AS att,
    stavalues1::text AS v1, stavalues2::text AS v2 FROM pg_catalog.pg_statistic;
CREATE FUNCTION public.h4_stats(tbl text, col text) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT histogram_bounds::text FROM pg_catalog.pg_stats
          WHERE tablename = tbl AND attname = col $$;
-- function whose body names the table only through a U& identifier
CREATE FUNCTION public.h4_uesc(int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT phone FROM public.U&"cust\006Fmers" WHERE id = $1 $$;
-- procedure (control: its body names customers)
CREATE PROCEDURE public.h4_proc(cid int, INOUT p text) LANGUAGE plpgsql
    AS $$ BEGIN SELECT phone INTO p FROM public.customers WHERE id = cid; END $$;
-- change-notification / debug trigger on the protected table itself
CREATE FUNCTION public.h4_cust_trg() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE NOTICE 'customer % changed: phone %', new.id, new.phone;
  PERFORM pg_notify('h4_cust', row_to_json(new)::text);
  RETURN new;
END $$;
CREATE TRIGGER h4_cust_t AFTER UPDATE ON public.customers FOR EACH ROW
    EXECUTE FUNCTION public.h4_cust_trg();
CREATE FUNCTION public.h4_order_phone(o public.orders) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT phone FROM public.customers WHERE id = o.customer_id $$;
CREATE FUNCTION public.h4_sink_phone(s public.sec_sink) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT phone FROM public.customers WHERE id = s.t::int $$;
CREATE TABLE public.h4_hist (cid int, phone text);
CREATE FUNCTION public.h4_hist_trg() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.h4_hist VALUES (new.id, new.phone); RETURN new; END $$;
CREATE TRIGGER h4_hist_t AFTER UPDATE ON public.customers FOR EACH ROW
    EXECUTE FUNCTION public.h4_hist_trg();
GRANT ALL ON public.h4_hist TO PUBLIC;
CREATE FUNCTION public.h4_cust_phone(c public.customers) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT phone FROM public.customers WHERE id = c.id $$;
CREATE TABLE public.h4_def2 (id int, p text DEFAULT public.h4_vol(1));
GRANT ALL ON public.h4_def2 TO PUBLIC;
GRANT ALL ON public.h4_opdef, public.h4_opgen, public.h4_ix, public.h4_pt, public.h4_tw,
    public.h4_rls, public.h4_ex, public.h4_ddt, public.h4_opview, public.h4_colstats,
    public.h4_rawstat TO PUBLIC;
"""

PRE = r"""
CREATE FUNCTION public.h4_opfn2(int, int) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT id_number FROM public.customers WHERE id = $1 + $2 $$;
"""

TEARDOWN = r"""
DROP TRIGGER IF EXISTS h4_cust_t ON public.customers;
DROP TRIGGER IF EXISTS h4_hist_t ON public.customers;
DROP FUNCTION IF EXISTS public.h4_hist_trg();
DROP TABLE IF EXISTS public.h4_hist;
DROP FUNCTION IF EXISTS public.h4_cust_trg();
DROP PROCEDURE IF EXISTS public.h4_proc(int, text);
DROP VIEW IF EXISTS public.h4_opview, public.h4_colstats, public.h4_rawstat;
DROP TABLE IF EXISTS public.h4_opdef, public.h4_opgen, public.h4_ix, public.h4_pt,
    public.h4_tw, public.h4_rls, public.h4_ex, public.h4_ddt;
DROP DOMAIN IF EXISTS public.h4_dd;
DROP CAST IF EXISTS (int AS public.h4_t);
DROP FUNCTION IF EXISTS public.h4_castf(int);
DROP TYPE IF EXISTS public.h4_t;
DROP OPERATOR IF EXISTS public.#@ (NONE, int);
DROP OPERATOR IF EXISTS public.#% (int, int);
DROP FUNCTION IF EXISTS public.h4_cust_phone(public.customers);
DROP TABLE IF EXISTS public.h4_def2;
DROP FUNCTION IF EXISTS public.h4_order_phone(public.orders), public.h4_sink_phone(public.sec_sink);
DROP FUNCTION IF EXISTS public.h4_opbody(int), public.h4_noop(), public.h4_vol(int),
    public.h4_stats(text, text), public.h4_uesc(int), public.h4_imm(int), public.h4_idn(int),
    public.h4_opfn2(int, int);
"""


@pytest.fixture(scope="module")
def paths(leak: LeakChecker) -> Iterator[LeakChecker]:
    with dba_objects(leak, [PRE, SETUP, "ANALYZE public.customers"], TEARDOWN, "select public.h4_imm(1)") as checker:
        yield checker


DBA_PATHS = [
    case("operator-prefix", "select #@ 1"),
    case("operator-prefix-in-scope", "select #@ 3"),
    case("operator-binary", "select 1 #% 0"),
    case("operator-qualified", "select operator(public.#@) 1"),
    case("cast-to-composite", "select (1::h4_t).v"),
    case("cast-function-style", "select cast(1 as h4_t)"),
    case("view-using-operator", "select p from h4_opview where cid = 1"),
    case("default-using-operator", "insert into h4_opdef (id) values (1) returning p", tx=True),
    case("generated-using-operator", "insert into h4_opgen (cid) values (1) returning p",
         tx=True),
    case("function-body-using-operator", "select h4_opbody(1)"),
    case("index-expression-cast-error", "insert into h4_ix values (1)", tx=True),
    case("partition-key-cast-error", "insert into h4_pt values (1)", tx=True),
    case("trigger-when-cast-error", "insert into h4_tw values (1)", tx=True),
    case("rls-policy-cast-error", "select * from h4_rls"),
    case("exclusion-constraint-cast-error", "insert into h4_ex values (1)", tx=True),
    case("domain-default", "insert into h4_ddt (id) values (1) returning p", tx=True),
    case("domain-default-then-select", ["insert into h4_ddt (id) values (1)",
                                        "select p from h4_ddt"], tx=True),
    case("stats-view-histogram", "select attname, hb from h4_colstats where tablename = "
         "'cust' || 'omers' and attname = 'phone'"),
    case("stats-view-plain", "select attname, hb from h4_colstats where attname = 'id_number'"),
    case("stats-view-pg_statistic", "select v1 from h4_rawstat where v1 like '%@example.com%'"),
    case("stats-function", "select h4_stats('cust' || 'omers', 'phone')"),
    case("function-body-uescape-name", "select h4_uesc(1)"),
    case("call-procedure", "call h4_proc(1, null)"),
    case("call-procedure-in-scope", "call h4_proc(3, null)"),
    case("trigger-on-customers-history-table", ["update customers set level = level "
                                                 "where id = 3", "select * from h4_hist"],
         tx=True),
    case("manager-call-procedure", "call h4_proc(1, null)", login="manager_sz01"),
    case("manager-attribute-notation", "select (row('1')::sec_sink).h4_sink_phone",
         login="manager_sz01"),
    case("auditor-stats-view", "select hb from h4_colstats where attname = 'phone'",
         login="auditor1"),
    case("auditor-operator", "select #@ 1", login="auditor1"),
    case("attribute-notation-customers-alias", "select c.h4_cust_phone from customers c "
         "where id = 3"),
    case("attribute-notation-customers-parenthesised", "select (c).h4_cust_phone from "
         "customers c where id = 3"),
    case("functional-notation-customers-control", "select h4_cust_phone(c) from customers c "
         "where id = 3"),
    case("control-dependent-default-table", "insert into h4_def2 (id) values (1) returning p",
         tx=True),
    case("call-procedure-extended", "call h4_proc(%s, null)", params=(1,),
         protocol=Protocol.EXTENDED),
    case("call-procedure-prepared", "call h4_proc(%s, null)", params=(1,),
         protocol=Protocol.PREPARED),
    case("attribute-notation-extended", "select c.h4_cust_phone from customers c where id = %s",
         params=(3,), protocol=Protocol.EXTENDED),
    case("control-dependent-function-denied", "select h4_vol(1)"),
    case("attribute-notation-row-cast", "select (row(1, 1, 0, null)::orders).h4_order_phone"),
    case("attribute-notation-derived-orders", "select o.h4_order_phone from orders o "
         "where o.customer_id = 3 limit 1"),
    case("attribute-notation-sink", "select (row('1')::sec_sink).h4_sink_phone"),
    case("attribute-notation-sink-table", ["insert into sec_sink values ('1')",
                                           "select s.h4_sink_phone from sec_sink s"], tx=True),
    case("functional-notation-control", "select h4_sink_phone(row('1')::sec_sink)"),
    case("trigger-on-customers-notice-notify", "update customers set level = level where id = 3",
         tx=False, listen="h4_cust"),
    case("trigger-on-customers-notify-extended", "update customers set level = level "
         "where id = %s", params=(3,), protocol=Protocol.EXTENDED, listen="h4_cust"),
]



@pytest.mark.parametrize(("sql", "opts"), DBA_PATHS)
def test_dba_paths_are_denied(paths: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    paths.assert_no_leak(sql, expect=denied, **opts)


@pytest.mark.parametrize("table", ["h4_ddt (id)", "h4_opdef (id)", "h4_def2 (id)"])
def test_copy_from_into_a_table_whose_default_reads_customers(paths: LeakChecker,
                                                              table: str) -> None:
    with paths.connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        with conn.transaction(), conn.cursor().copy(f"copy {table} from stdin") as cp:
            cp.write_row((1,))


SHAPES = [
    case("explain-analyse-british", "explain (analyse) select * from customers where id = 1"),
    case("explain-analyze-string-on", "explain (analyze 'on', timing off, summary off) "
         "select count(*) from customers where id = 1"),
    case("explain-analyze-1", "explain (analyze 1, costs off) select * from customers "
         "where id = 1"),
    case("system-columns", "select tableoid, xmin, phone from customers where id = 3"),
    case("for-no-key-update-skip-locked", "select phone from customers where id = 3 "
         "for no key update skip locked", tx=True),
    case("sleep-in-where", "select phone from customers where id = 3 and "
         "pg_sleep(0) is not null"),
    case("comment-hides-second-stmt", "select phone from customers where id = 3 "
         "/* ; select phone from public.customers */"),
    case("whole-row-is-not-null", "select id from customers c where id = 1 and c is not null"),
    case("lateral-row_to_json-fn", "select j from customers c, lateral row_to_json(c) j "
         "where id = 3"),
    case("pg_typeof-row", "select pg_typeof(c)::text, c::text from customers c where id = 3"),
    case("null-composite-cast", "select (null::customers).*"),
    case("json-populate-from-row", "select * from json_populate_record(null::customers, "
         "(select row_to_json(c) from customers c where id = 3))"),
    case("values-lateral-customers", "select * from (values (1)) v(x), lateral (select phone "
         "from customers where id = 3) y"),
    case("cte-name-customers-shadow-with-raw-values", "with customers as (select 1 as id) "
         "select * from public.customers where id = 3"),
    case("any-array-leakproof", "select id, phone from customers where id = any('{1,3}')"),
    case("id-in-subquery-out-of-scope", "select id from customers where id in "
         "(select customer_id from orders where customer_id = 1)"),
    case("exists-no-from", "select exists(select 1 from customers where id = 1)"),
    case("count-out-of-scope", "select count(*) from customers where id = 1"),
    case("insert-returning-from-subquery-out-of-scope", "insert into sec_sink select "
         "(select phone from customers where id = 1) returning t", tx=True),
    case("sql-prepare-typed-name-lookup", ["prepare h4p(name) as select id, phone from "
                                           "customers where phone = $1",
                                           "execute h4p('<<phone:1>>')"]),
    case("sql-prepare-typed-bpchar-lookup", ["prepare h4q(bpchar) as select id, phone from "
                                             "customers where phone = $1",
                                             "execute h4q('<<phone:1>>')"]),
    case("lookup-typed-literal", "select id, phone from customers where phone = "
         "text '<<phone:1>>'"),
    case("lookup-cast-literal", "select id, phone from customers where phone = "
         "'<<phone:1>>'::text"),
    case("lookup-string-continuation", "select id, phone from customers where phone = "
         "'<<phone:1>>'\n''"),
    case("set-search-path-then-filter-operator", ["set search_path = public, pg_catalog",
                                                  "select id, phone from customers "
                                                  "where id = 1"]),
    case("lock-table", "lock table customers in access share mode", tx=True),
    case("listen-notify-self", ["listen h4x", "notify h4x, 'hello'"]),
    case("prepare-transaction", ["begin", "update customers set level = level where id = 3",
                                 "prepare transaction 'h4gid'"]),
    case("declare-with-hold-then-rollback", ["begin", "declare h4c cursor with hold for "
                                             "select id, phone from customers where id = 3",
                                             "commit", "fetch all from h4c"]),
    case("derived-alias-rename-lookup", "select count(*) from (select * from customers) "
         "as c(id, nm, ph) where ph = '<<phone:3>>'"),
    case("cte-values-join-lookup", "with x(p) as (values ('<<phone:3>>')) select id from "
         "customers, x where phone = p"),
    case("returning-subquery-on-sink", "update sec_sink set t = t where false returning "
         "(select phone from customers where id = 3)", tx=True),
    case("on-conflict-nothing-returning-subquery", "insert into sec_sink values ('x') on "
         "conflict do nothing returning (select phone from customers where id = 3)", tx=True),
    case("scalar-subquery-for-update", "select (select phone from customers where id = 3 "
         "for update)", tx=True),
    case("explain-verbose-lookup", "explain (verbose, costs off) select id from customers "
         "where phone = '<<phone:3>>'"),
    case("offset-fetch-next", "select phone from customers where id = 3 offset 0 rows "
         "fetch next 1 row only"),
    case("sequence-last-value", "select last_value from customers_id_seq"),
    case("manager-cards", "select card_no from accounts where customer_id = 3",
         login="manager_sz01"),
    case("auditor-balance-residual", "select balance - round(balance, -3) from accounts "
         "where customer_id = 3", login="auditor1"),
]



@pytest.mark.parametrize(("sql", "opts"), SHAPES)
def test_shapes(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)
