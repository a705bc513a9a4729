"""Bypass hunt 2: paths a DBA built that read customer data when a teller writes or casts.

* Write paths on unprotected tables: a trigger, a column DEFAULT, a generated column or a
  ``DO ALSO`` rule that copies customers' phones / ID numbers into the row, a CHECK constraint
  or a domain CHECK that calls a function comparing with them (an oracle by success/failure).
  A table with a foreign key to ``customers`` stays usable (see proxy/catalog.py: only the
  existence of an id shows, as counts do), and its rows never carry customer values. pgveil's catalog knew views, rules *on* protected tables and functions, not what a
  table runs when it is written: the teller's INSERT ... RETURNING and the following SELECT
  returned every raw phone the trigger copied. These tables (and domains) are catalog
  dependents now: denied to masked roles unless the policy lists them.
* Error and notice channels, and write paths on the protected tables (controls: these held).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.security.conftest import (
    LeakChecker,
    Protocol,
    Received,
    dba_objects,
    expect_rows,
    expect_status,
)


def case(case_id: str, sql: Any, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


def denied(received: Received) -> None:
    assert received.denied, f"expected a 42501 denial, got {received.describe()}"


SETUP = """
CREATE TABLE public.h2_log (id serial PRIMARY KEY, note text, cid int);
CREATE FUNCTION public.h2_trg() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN new.note := (SELECT phone FROM public.customers WHERE id = new.cid); RETURN new; END $$;
CREATE TRIGGER h2_t BEFORE INSERT OR UPDATE ON public.h2_log
    FOR EACH ROW EXECUTE FUNCTION public.h2_trg();
CREATE FUNCTION public.h2_defv() RETURNS text LANGUAGE sql
    AS $$ SELECT string_agg(phone, ',') FROM public.customers WHERE id < 3 $$;
CREATE TABLE public.h2_def (id int, p text DEFAULT public.h2_defv());
CREATE FUNCTION public.h2_genf(int) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT id_number FROM public.customers WHERE id = $1 $$;
CREATE TABLE public.h2_gen (cid int, p text GENERATED ALWAYS AS (public.h2_genf(cid)) STORED);
CREATE TABLE public.h2_rule (id int, x text);
CREATE TABLE public.h2_rule_sink (x text);
CREATE RULE h2_r AS ON INSERT TO public.h2_rule DO ALSO
    INSERT INTO public.h2_rule_sink SELECT id_number FROM public.customers WHERE id = new.id;
CREATE FUNCTION public.h2_is_phone(text) RETURNS boolean LANGUAGE sql
    AS $$ SELECT NOT EXISTS (SELECT 1 FROM public.customers WHERE phone = $1) $$;
CREATE TABLE public.h2_chk (p text CHECK (public.h2_is_phone(p)));
CREATE DOMAIN public.h2_dom AS text CHECK (public.h2_is_phone(VALUE));
CREATE TABLE public.h2_domtab (p public.h2_dom);
CREATE TABLE public.h2_fk (cid int REFERENCES public.customers (id));
CREATE TABLE public.h2_plain (id int, x text);
GRANT ALL ON public.h2_log, public.h2_def, public.h2_gen, public.h2_rule, public.h2_rule_sink,
    public.h2_chk, public.h2_domtab, public.h2_fk, public.h2_plain TO PUBLIC;
GRANT ALL ON SEQUENCE public.h2_log_id_seq TO PUBLIC;
"""

TEARDOWN = """
DROP TABLE IF EXISTS public.h2_log, public.h2_def, public.h2_gen, public.h2_rule,
    public.h2_rule_sink, public.h2_chk, public.h2_domtab, public.h2_fk, public.h2_plain;
DROP DOMAIN IF EXISTS public.h2_dom;
DROP FUNCTION IF EXISTS public.h2_trg(), public.h2_defv(), public.h2_genf(int),
    public.h2_is_phone(text);
"""


@pytest.fixture(scope="module")
def paths(leak: LeakChecker) -> Iterator[LeakChecker]:
    with dba_objects(leak, [SETUP], TEARDOWN, "select public.h2_defv()") as checker:
        yield checker


DBA_PATHS = [
    case("trigger-copies-phone-returning", "insert into h2_log (cid) values (1), (2), (3) "
         "returning note", tx=True, expect=denied),
    case("trigger-copies-phone-then-select", ["insert into h2_log (cid) values (1), (2)",
                                              "select note from h2_log"], tx=True),
    case("trigger-on-update", "update h2_log set cid = 1 returning note", tx=True,
         expect=denied),
    case("trigger-extended-protocol", "insert into h2_log (cid) values (%s) returning note",
         params=(1,), protocol=Protocol.EXTENDED, tx=True, expect=denied),
    case("trigger-insert-select-from-values", "insert into h2_log (cid) select g from "
         "generate_series(1, 5) g returning *", tx=True, expect=denied),
    case("default-reads-customers", "insert into h2_def (id) values (1) returning p", tx=True,
         expect=denied),
    case("default-keyword", "insert into h2_def values (1, default) returning *", tx=True,
         expect=denied),
    case("generated-column", "insert into h2_gen (cid) values (1), (2) returning p", tx=True,
         expect=denied),
    case("rule-do-also-then-select-sink", ["insert into h2_rule values (1, 'a'), (2, 'b')",
                                           "select x from h2_rule_sink"], tx=True),
    case("rule-do-also", "insert into h2_rule values (1, 'a')", tx=True, expect=denied),
    case("check-constraint-oracle", "insert into h2_chk values ('<<phone:1>>')", tx=True,
         expect=denied),
    case("domain-check-oracle-cast", "select '<<phone:1>>'::h2_dom", expect=denied),
    case("domain-check-oracle-cast-qualified", "select cast('<<phone:2>>' as public.h2_dom)",
         expect=denied),
    case("domain-check-oracle-column", "insert into h2_domtab values ('<<phone:1>>')",
         tx=True, expect=denied),
    # control: a table referencing customers (notes, tickets) stays readable and writable
    case("foreign-key-table-usable", ["insert into h2_fk values (3)", "select cid from h2_fk"],
         tx=True),
    case("trigger-table-in-cte", "with x as (insert into h2_log (cid) values (1) returning "
         "note) select * from x", tx=True, expect=denied),
    case("trigger-table-prepared", ["prepare sec_h2_p(int) as insert into h2_log (cid) "
                                    "values ($1) returning note", "execute sec_h2_p(1)"],
         tx=True, expect=denied),
    case("plain-table-still-writable", "insert into h2_plain values (1, 'a') returning *",
         tx=True, expect=expect_rows([(1, "a")])),
]


@pytest.mark.parametrize(("sql", "opts"), DBA_PATHS)
def test_dba_write_paths(paths: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    paths.assert_no_leak(sql, **opts)


# ------------------------------------------------------------------ error / notice channels

ERRORS = [
    case("cast-phone-to-int", "select phone::int from customers where id = 3"),
    case("cast-id-number-to-bigint", "select id_number::bigint from customers where id = 3"),
    case("to-date-id-number", "select to_date(substr(id_number, 7, 8), 'YYYYMMDD') "
         "from customers where id = 3"),
    case("division-by-zero-on-masked", "select 1 / (substr(phone, 4, 1) = '*')::int "
         "from customers where id = 3", masked_equiv=False),
    case("set-config-from-subquery", ["select set_config('h2.x', (select phone from customers "
                                      "where id = 3), false)", "show h2.x"]),
    case("current-setting-after-set-config", ["select set_config('h2.y', (select id_number "
                                              "from customers where id = 3), false)",
                                              "select current_setting('h2.y')"]),
    case("pg-notify-masked", "select pg_notify('h2c', phone) from customers where id = 3",
         listen="h2c"),
    case("unique-violation-on-phone", "update customers set phone = (select phone from "
         "customers where id = 6) where id = 3", tx=True),
    case("enum-like-cast-out-of-scope", "select id::text::int from customers where id = 1",
         expect=expect_rows([])),
    case("json-cast-error", "select (phone)::json from customers where id = 3"),
    case("xml-parse-error", "select xmlparse(content phone) from customers where id = 3"),
    case("raise-via-assert", "select ('x' || phone)::numeric from customers where id = 3"),
]


@pytest.mark.parametrize(("sql", "opts"), ERRORS)
def test_error_channels(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


# ------------------------------------------------------------------ write paths (protected)

WRITES = [
    case("update-from-customers-returning", "update orders o set note = c.phone from customers "
         "c where c.id = o.customer_id and c.id = 3 returning o.note", tx=True),
    case("delete-using-out-of-scope", "delete from orders o using customers c where "
         "c.id = o.customer_id and c.id = 1", tx=True, expect=expect_status("DELETE 0")),
    case("update-from-out-of-scope-count", "update orders o set note = note from customers c "
         "where c.id = o.customer_id and c.branch_id = 'GZ01'", tx=True,
         expect=expect_status("UPDATE 0")),
    case("insert-select-masked-into-sink", ["insert into sec_sink select phone from customers "
                                            "where id = 3", "select t from sec_sink"], tx=True),
    case("merge-matched-returning-count", "merge into orders o using customers c on "
         "c.id = o.customer_id and c.id = 1 when matched then update set note = 'x'",
         tx=True, expect=expect_status("MERGE 0")),
    case("on-conflict-excluded-phone", "insert into customers (id, name, phone, id_number, "
         "branch_id) values (3, 'x', '13000000000', '110105199001011234', 'SZ01') on conflict "
         "(id) do update set name = excluded.name returning phone", tx=True),
    case("insert-other-branch-rejected", "insert into customers (id, name, phone, id_number, "
         "branch_id) values (900001, '测试', '13000000001', '110105199001011235', 'GZ01')",
         tx=True, expect=lambda r: assert_refused(r)),
    case("update-into-other-branch-rejected", "update customers set branch_id = 'GZ01' "
         "where id = 3", tx=True, expect=lambda r: assert_refused(r)),
]


def assert_refused(received: Received) -> None:
    assert received.errors, f"a row outside the filter was written: {received.describe()}"


@pytest.mark.parametrize(("sql", "opts"), WRITES)
def test_write_paths(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)
