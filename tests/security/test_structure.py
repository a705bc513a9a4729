"""Bypass attempts through statement structure and server-side objects.

Categories: subqueries / CTEs / set operations / LATERAL / EXISTS, views and functions (a view,
a materialized view, SQL / security-definer / dynamic-SQL functions created by dba in the
``sec_db`` fixture, and objects the teller tries to create), prepared statements (SQL PREPARE /
EXECUTE, extended-protocol Parse/Bind with parameters, pipelining), cursors (DECLARE / FETCH /
MOVE / scroll back / WITH HOLD / cursor_to_xml) and the per-statement row cap (max_rows 50 for
a teller: row 51 must never reach the client, also in single-row streaming mode).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.security.conftest import (
    LeakChecker,
    Protocol,
    Received,
    ResultSet,
    expect_at_most_rows,
    expect_error,
    expect_rows,
)


def case(case_id: str, sql: Any, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


def _total_rows_at_most(limit: int) -> Any:
    def check(received: Received) -> None:
        total = sum(len(rs.rows) for rs in received.results)
        assert total <= limit, f"the cursor delivered {total} rows in all, over {limit}"

    return check


SUBQUERIES = [
    case("cte-shadowing-table", "with customers as (select * from public.customers "
         "where id = 3) select phone, id_number from customers"),
    case("cte-plain", "with x as (select phone, id_number from customers where id = 3) "
         "select * from x"),
    case("recursive-cte-carrying-value", "with recursive r(n, p) as (select 1, "
         "(select phone from customers where id = 3) union all select n + 1, p from r "
         "where n < 2) select * from r"),
    case("recursive-cte-walking-rows", "with recursive r as (select id, phone from customers "
         "where id = 3 union all select c.id, c.phone from customers c join r "
         "on c.id = r.id + 1 where c.id < 12) select * from r"),
    case("union-with-branches", "select phone from customers where id = 3 union "
         "select name from branches"),
    case("union-all-unprotected-first", "select name from branches union all "
         "select id_number from customers where id = 3"),
    case("intersect", "select phone from customers where id = 3 intersect "
         "select phone from customers where id = 3"),
    case("except", "select phone from customers where id in (3, 6) except select 'x'"),
    case("lateral-per-branch", "select b.id, x.phone from branches b cross join lateral "
         "(select phone from customers c where c.branch_id = b.id limit 1) x"),
    case("exists-out-of-scope", "select id from customers c where exists (select 1 from "
         "customers c2 where c2.id = c.id and c2.id = 1)"),
    case("scalar-subqueries", "select (select phone from customers where id = 3), "
         "(select id_number from public.customers where id = 3)"),
    case("nested-derived-tables", "select * from (select * from (select * from customers) a "
         "where id = 3) b"),
    case("subquery-in-order-by", "select id from customers where id in (3, 6) "
         "order by (select phone from customers where id = 3)"),
    case("orders-of-other-branch", "select * from orders where customer_id = 1"),
    case("orders-join-customers", "select o.id, c.phone from orders o join customers c "
         "on c.id = o.customer_id where o.customer_id in (1, 3) limit 5"),
    case("data-modifying-cte", "with u as (update customers set level = level where id = 3 "
         "returning *) select * from u", tx=True),
    case("data-modifying-cte-out-of-scope", "with u as (update customers set level = level "
         "where id = 1 returning id) select count(*) from u", tx=True,
         expect=expect_rows([(0,)])),
    case("delete-cte-then-read", "with d as (delete from orders where id = -1 returning *) "
         "select phone from customers where id = 3", tx=True),
    case("union-view-and-table", "select phone from customers where id = 3 union all "
         "select phone from sec_v_customers where id = 3"),
]

VIEWS_FUNCTIONS = [
    case("dba-view", "select phone, id_number from sec_v_customers where id = 3"),
    case("dba-view-out-of-scope", "select * from sec_v_customers where id = 1"),
    case("dba-view-unqualified-star", "select * from public.sec_v_customers where id in (1, 3)"),
    case("dba-materialized-view", "select phone, id_number from sec_mv_customers where id = 3"),
    case("dba-sql-function", "select sec_f_phone(3)"),
    case("dba-sql-function-out-of-scope", "select sec_f_phone(1)"),
    case("dba-security-definer", "select sec_f_secdef(3)"),
    case("dba-setof-function", "select * from sec_f_rows() where id = 3"),
    case("dba-setof-function-out-of-scope", "select id, phone from sec_f_rows() where id = 1"),
    case("dba-dynamic-sql", "select * from sec_f_dyn('select phone from customers "
         "where id = 3')"),
    case("dba-dynamic-sql-concat", "select * from sec_f_dyn('select phone from cust' || "
         "'omers where id = 3')"),
    case("dba-dynamic-sql-param", "select * from sec_f_dyn(%s)",
         params=("select id_number from public.customers where id = 3",)),
    case("dba-dynamic-sql-reversed", "select * from sec_f_dyn(reverse("
         "'3 = di erehw sremotsuc morf enohp tceles'))"),
    case("dba-dynamic-sql-hex", "select * from sec_f_dyn(convert_from(decode("
         "'73656c6563742070686f6e652066726f6d20637573746f6d657273207768657265206964203d2033',"
         " 'hex'), 'UTF8'))"),
    case("dba-dynamic-sql-from-values", "select x from (values ('select phone from customers "
         "where id = 3')) v(q), lateral sec_f_dyn(q) x"),
    case("dba-dynamic-sql-format", "select * from sec_f_dyn(format('select id_number from %I "
         "where id = 3', 'cust' || 'omers'))"),
    case("dba-dynamic-sql-prepared", ["prepare sec_pd(text) as select * from sec_f_dyn($1)",
                                      "execute sec_pd('select phone from customers "
                                      "where id = 3')"]),
    case("dba-dynamic-sql-no-literal-name", "select * from sec_f_dyn('select phone from ' || "
         "(select relname from pg_class where relname like 'custo%' limit 1) || "
         "' where id = 3')"),
    case("dba-function-calling-function", "select sec_f_wrap(3)"),
    case("dba-function-obfuscated-dynamic-sql", "select sec_f_obf(3)"),
    case("dba-nested-view", "select phone, id_number from sec_v_nested where id = 3"),
    case("table_to_xml-of-view", "select table_to_xml('sec_v_customers', true, true, '')"),
    case("create-view", ["create view sec_teller_v as select * from customers",
                         "select phone from sec_teller_v where id = 3"],
         expect=expect_error),
    case("create-temp-view", ["create temp view sec_tv as select phone from customers "
                              "where id = 3", "select * from sec_tv"]),
    case("create-temp-function", ["create function pg_temp.sec_f() returns text language sql "
                                  "as $$select phone from customers where id = 3$$",
                                  "select pg_temp.sec_f()"]),
    case("create-function-returning-rows", [
        "create function pg_temp.sec_g() returns setof text language sql as "
        "'select id_number from customers'", "select * from pg_temp.sec_g() limit 3"]),
    case("create-rule-on-sink", ["create rule sec_r as on insert to sec_sink do also "
                                 "select phone from customers where id = 3",
                                 "insert into sec_sink values ('x')"], tx=True),
]

PREPARED = [
    case("sql-prepare-execute", ["prepare sec_p1 as select phone, id_number from customers "
                                 "where id = $1", "execute sec_p1(3)"]),
    case("sql-prepare-out-of-scope", ["prepare sec_p2(int) as select * from customers "
                                      "where id = $1", "execute sec_p2(1)"]),
    case("sql-prepare-lookup-other-branch", [
        "prepare sec_p3(text) as select id, phone from customers where phone = $1",
        "execute sec_p3('<<phone:1>>')"]),
    case("sql-prepare-explain-analyze", [
        "prepare sec_p4 as select phone from customers where id = $1",
        "explain (analyze, verbose) execute sec_p4(3)"]),
    case("sql-prepare-whole-row", ["prepare sec_p5 as select row_to_json(c) from customers c "
                                   "where id = $1", "execute sec_p5(3)"]),
    case("sql-prepare-unbounded", ["prepare sec_p6 as select phone from customers",
                                   "execute sec_p6"]),
    case("extended-params", "select phone, id_number from customers where id = %s",
         params=(3,), protocol=Protocol.PREPARED),
    case("extended-params-out-of-scope", "select * from customers where id = %s", params=(1,),
         protocol=Protocol.PREPARED),
    case("extended-binary", "select c from customers c where id = %s", params=(3,),
         protocol=Protocol.EXTENDED),
    case("extended-sql-in-param", "select query_to_xml(%s, true, true, '')",
         params=("select phone from customers where id = 3",), protocol=Protocol.PREPARED),
    case("extended-regclass-param", "select table_to_xml(%s::regclass, true, true, '')",
         params=("customers",), protocol=Protocol.PREPARED),
    case("client-side-binding", "select phone, id_number from customers where id = %s",
         params=(3,), protocol=Protocol.CLIENT),
    case("pipeline-mixed", ["select 1", "select phone from customers where id = 3",
                            "select row_to_json(c) from customers c where id = 3"],
         protocol=Protocol.PIPELINE),
    case("pipeline-after-denial", ["select phone from customers",
                                   "select id_number from customers where id = 3"],
         protocol=Protocol.PIPELINE),
]

CURSORS = [
    case("declare-fetch-all", ["declare sec_c1 cursor for select phone, id_number "
                               "from customers where id = 3", "fetch all from sec_c1"],
         tx=True),
    case("scroll-fetch-60", ["declare sec_c2 scroll cursor for select id, phone from customers "
                             "where branch_id = 'SZ01'", "fetch 60 from sec_c2"], tx=True,
         expect=expect_at_most_rows(50)),
    case("move-all-fetch-backward", [
        "declare sec_c3 scroll cursor for select id, phone from customers "
        "where branch_id = 'SZ01'", "move forward all in sec_c3",
        "fetch backward 60 from sec_c3"], tx=True, expect=expect_at_most_rows(50)),
    case("fetch-prior-absolute", [
        "declare sec_c4 scroll cursor for select phone from customers where id in (3, 6, 9)",
        "fetch all sec_c4", "fetch prior sec_c4", "fetch absolute 1 sec_c4"], tx=True),
    case("with-hold", ["declare sec_c5 cursor with hold for select phone, id_number "
                       "from customers where id = 3", "commit", "fetch all sec_c5",
                       "close sec_c5"], tx=True),
    case("cursor_to_xml", ["declare sec_c6 cursor for select phone from customers "
                           "where id = 3", "select cursor_to_xml('sec_c6', 10, false, true, '')"],
         tx=True),
    case("cursor-drain-in-chunks", [
        "declare sec_c7 cursor for select id from customers where id > 0",
        "fetch 40 sec_c7", "fetch 40 sec_c7"], tx=True, expect=_total_rows_at_most(50)),
    case("cursor-out-of-scope", ["declare sec_c8 cursor for select * from customers "
                                 "where id = 1", "fetch all sec_c8"], tx=True),
    case("cursor-binary", ["declare sec_c9 binary cursor for select phone from customers "
                           "where id = 3", "fetch all sec_c9"], tx=True),
]

# Run as teller_gz01 (same role, own quota) so that the row-heavy attempts do not eat
# teller_sz01's 2000-rows-per-hour quota that every other attempt depends on.
ROW_LIMITS = [
    case("limit-100", "select id from customers where branch_id = 'GZ01' limit 100"),
    case("generate_series-fanout", "select generate_series(1, 100), id from customers "
         "where id = 1"),
    case("union-all-fanout", "select id from customers where id > 0 union all "
         "select id from customers where id > 0 limit 60"),
    case("cross-join-fanout", "select c.id from customers c, generate_series(1, 60) g "
         "where c.id = 1"),
    case("limit-51", "select id, phone from customers where id > 0 limit 51"),
    case("accounts-limit-100", "select id from accounts where id > 0 limit 100"),
    case("orders-limit-100", "select id from orders where id > 0 limit 100"),
    case("param-limit", "select id from customers where id > %s limit 100", params=(0,)),
    case("multi-statement-each-under-cap", "select id from customers where id > 0 limit 30; "
         "select id from customers where id > 100 limit 30"),
]


@pytest.mark.parametrize(("sql", "opts"), SUBQUERIES)
def test_subqueries_ctes_setops(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), VIEWS_FUNCTIONS)
def test_views_and_functions(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), PREPARED)
def test_prepared_statements(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), CURSORS)
def test_cursors(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), ROW_LIMITS)
def test_row_limit(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    """Row 51 never reaches the client: single-row mode sees rows before the error arrives."""
    protocol = Protocol.SIMPLE if ";" in sql else Protocol.STREAM
    leak.assert_no_leak(sql, login="teller_gz01", protocol=protocol,
                        expect=expect_at_most_rows(50), **opts)


# ------------------------------------------------------------------ row cap circumventions


def test_prepared_statement_name_swap_keeps_the_row_cap(leak: LeakChecker) -> None:
    """Parse 'sec_s1' as 'select 1' on the wire, then DEALLOCATE + SQL PREPARE the same name
    with a protected query: a Bind/Execute of 'sec_s1' must still be capped, masked, audited."""
    received = Received()
    conn = leak.connect()
    try:
        pgconn = conn.pgconn
        pgconn.prepare(b"sec_s1", b"select 1")
        leak.run(["deallocate sec_s1",
                  "prepare sec_s1 as select id, phone from customers where id > 0 limit 100"],
                 conn=conn)
        res = pgconn.exec_prepared(b"sec_s1", [])
        if res.error_message:
            received.errors.append({"sqlstate": (res.error_field(ord("C")) or b"").decode(),
                                    "text": res.error_message.decode("utf-8", "replace")})
        names = [(res.fname(j) or b"").decode() for j in range(res.nfields)]
        rows = [tuple((res.get_value(i, j) or b"").decode("utf-8", "replace")
                      for j in range(res.nfields)) for i in range(res.ntuples)]
        received.results.append(ResultSet(names, rows))
        received.alive = conn.execute("select 1").fetchone() == (1,)
    finally:
        conn.close()
    leak.check(received, "select id, phone from customers where id > 0 limit 100")
    assert len(received.rows) <= 50, (
        f"{len(received.rows)} customer rows through a re-prepared statement name: the row cap "
        f"(and the audit of what ran) follow the wire Parse, not the server's statement"
    )


def _records_in(received: Received) -> int:
    """How many customer records came back, counting JSON objects / array items in a value."""
    count = 0
    for row in received.rows:
        for value in row:
            if isinstance(value, list):
                count += len(value)
            elif isinstance(value, str):
                count += value.count(",") + 1 if value else 0
            else:
                count += 1
    return count


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("select json_agg(c) from customers c where id > 0", id="json_agg"),
        pytest.param("select string_agg(id::text || ':' || phone, ',') from customers "
                     "where id > 0", id="string_agg"),
        pytest.param("select array_agg(id) from customers where branch_id = 'SZ01'",
                     id="array_agg"),
    ],
)
def test_aggregates_do_not_pack_more_than_max_rows(leak: LeakChecker, sql: str) -> None:
    """max_rows counts DataRows; one aggregate row can carry every customer of the branch.
    SPEC §5 "bulk export is blocked": at most 50 customer records per statement."""
    received = leak.assert_no_leak(sql)
    assert _records_in(received) <= 50, (
        f"{_records_in(received)} customer records in {len(received.rows)} row(s)"
    )
