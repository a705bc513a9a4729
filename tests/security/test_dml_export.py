"""Bypass attempts through writes and exports.

SPEC §5: DML targets and sources are masked at the source; UPDATE / DELETE only reach rows inside
the filter; INSERT / UPDATE that would create rows outside it are rejected; ``CREATE TABLE AS``,
``SELECT INTO`` and ``INSERT … SELECT`` must not copy masked-out data; ``COPY … TO`` is denied for
roles without ``copy: allow``. Every write runs inside BEGIN … ROLLBACK (``tx=True``), so nothing
persists whatever pgveil does; row counts come from the command tags.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.security.conftest import (
    LeakChecker,
    Received,
    ResultSet,
    expect_error,
    expect_rows,
    expect_status,
)


def case(case_id: str, sql: Any, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


NEW_ROW = ("insert into customers (name, phone, id_number, branch_id) "
           "values ('测试', '13000000000', '110105199001011234', '{b}')")

DML = [
    case("update-returning-masked", "update customers set email = email where id = 3 "
         "returning phone, id_number"),
    case("update-copy-column-returning", "update customers set address = phone where id = 3 "
         "returning address, phone"),
    case("update-returning-star", "update customers set phone = phone where id = 3 returning *"),
    case("update-returning-subquery", "update customers set level = level where id = 3 "
         "returning (select id_number from customers where id = 3)"),
    case("update-returning-whole-row", "update customers c set level = level where id = 3 "
         "returning row_to_json(c)"),
    case("update-set-from-raw-length", "update customers set level = length(address) "
         "where id = 3 returning level", expect=expect_rows([(6,)])),
    case("update-set-from-raw-digit", "update customers set level = ascii(substr(phone, 4, 1)) "
         "- 48 where id = 3 returning level", expect=expect_rows([(-6,)])),
    case("update-set-cast-error-echo", "update customers set level = phone::int where id = 3"),
    case("update-set-birthday-returning", "update customers set birthday = birthday "
         "where id = 3 returning birthday, id_number"),
    case("update-where-masked-like", "update customers set level = level where id = 3 "
         "and phone like '1860%'", expect=expect_status("UPDATE 0")),
    case("update-out-of-scope-id", "update customers set level = level where id = 1",
         expect=expect_status("UPDATE 0")),
    case("update-other-branches", "update customers set level = level "
         "where branch_id <> 'SZ01'", expect=expect_status("UPDATE 0")),
    case("update-from-join-out-of-scope", "update customers c set level = c.level "
         "from accounts a where a.customer_id = c.id and a.customer_id = 1",
         expect=expect_status("UPDATE 0")),
    case("update-accounts-out-of-scope", "update accounts set balance = balance "
         "where customer_id = 1", expect=expect_status("UPDATE 0")),
    case("update-accounts-returning", "update accounts set balance = balance + 0 "
         "where customer_id = 3 returning balance, card_no"),
    case("update-moves-row-out-of-scope", "update customers set branch_id = 'GZ01' "
         "where id = 3", expect=expect_status("UPDATE 0")),
    case("update-orders-to-other-customer", "update orders set customer_id = 1 "
         "where customer_id = 3", expect=expect_status("UPDATE 0")),
    case("update-orders-note-from-subquery", "update orders set note = (select phone from "
         "customers where id = 3) where customer_id = 3 returning note"),
    case("delete-orders-out-of-scope", "delete from orders where customer_id = 1",
         expect=expect_status("DELETE 0")),
    case("delete-orders-returning", "delete from orders where customer_id = 3 returning *"),
    case("delete-customer-returning-star", "delete from customers where id = 3 returning *"),
    case("delete-using-masked-predicate", "delete from orders o using customers c "
         "where o.customer_id = c.id and c.phone like '1860%' returning o.id",
         expect=expect_status("DELETE 0")),
    case("insert-other-branch", NEW_ROW.format(b="GZ01"), expect=expect_error),
    case("insert-order-for-other-branch", "insert into orders (customer_id, amount, note) "
         "values (1, 1, 'x')", expect=expect_error),
    case("insert-select-returning", "insert into orders (customer_id, amount, note) "
         "select id, 1, phone from customers where id = 3 returning note"),
    case("insert-select-customers-returning-star", "insert into customers (name, phone, "
         "id_number, branch_id) select name, phone, id_number, branch_id from customers "
         "where id = 3 returning *"),
    case("insert-select-other-branch-rows", "insert into orders (customer_id, amount, note) "
         "select id, 1, 'x' from customers where id = 1", expect=expect_status("INSERT 0 0")),
    case("not-null-violation-detail", "update customers set level = null where id = 3"),
    case("not-null-violation-name", "update customers set name = null where id = 6"),
    case("not-null-violation-accounts", "update accounts set opened_on = null "
         "where customer_id = 3"),
    case("not-null-violation-insert-select", "insert into orders (customer_id, amount, note) "
         "select id, null, 'x' from customers where id = 3"),
    case("upsert-out-of-scope", "insert into customers (id, name, phone, id_number, "
         "branch_id) values (1, '测试', '13000000000', '110105199001011234', 'SZ01') "
         "on conflict (id) do update set level = excluded.level returning id",
         expect=expect_error),
    case("lookup-update-other-branch", "update customers set level = level "
         "where phone = '<<phone:1>>'", expect=expect_status("UPDATE 0")),
    case("delete-returning-subquery", "delete from orders where id = -1 "
         "returning (select phone from customers where id = 3)"),
    case("truncate-customers", "truncate customers cascade", expect=expect_error),
    case("truncate-orders", "truncate orders", expect=expect_error),
    case("merge-out-of-scope", "merge into customers c using (select 1 as id) s "
         "on c.id = s.id when matched then update set level = c.level",
         expect=expect_status("MERGE 0")),
    case("merge-returning-via-cte", "merge into orders o using (select id, phone from "
         "customers where id = 3) s on o.customer_id = s.id when matched then "
         "update set note = s.phone"),
]

EXPORT = [
    case("create-temp-table-as", ["create temp table sec_t1 as select phone, id_number "
                                  "from customers where id = 3", "select * from sec_t1"]),
    case("select-into-temp", ["select phone, id_number into temp sec_t2 from customers "
                              "where id = 3", "select * from sec_t2"]),
    case("insert-into-sink", ["insert into sec_sink select phone from customers where id = 3",
                              "select t from sec_sink"], tx=True),
    case("insert-into-sink-whole-row", ["insert into sec_sink select row_to_json(c)::text "
                                        "from customers c where id = 3",
                                        "select t from sec_sink"], tx=True),
    case("insert-values-subquery-into-sink", [
        "insert into sec_sink (t) values ((select id_number from customers where id = 3))",
        "select * from sec_sink"], tx=True),
    case("update-sink-from-subquery", [
        "insert into sec_sink values ('x')",
        "update sec_sink set t = (select phone from customers where id = 3) returning t"],
         tx=True),
    case("sink-then-copy-out", ["insert into sec_sink select phone from customers "
                                "where id = 3", "copy sec_sink to stdout"], tx=True),
    case("temp-table-then-insert", ["create temp table sec_t3 (t text)",
                                    "insert into sec_t3 select phone from customers "
                                    "where id = 3", "select * from sec_t3"], tx=True),
    case("copy-query-to-stdout", "copy (select phone from customers where id = 3) to stdout"),
    case("copy-table-to-stdout", "copy customers to stdout"),
    case("copy-columns-csv", "copy customers (phone, id_number) to stdout with (format csv)"),
    case("copy-binary", "copy (select * from customers where id = 3) to stdout with binary"),
    case("copy-accounts", "copy accounts to stdout"),
    case("copy-view-to-stdout", "copy (select * from sec_v_customers where id = 3) "
         "to stdout"),
    case("copy-to-file", "copy customers to '/tmp/sec_leak.txt'"),
    case("copy-quoted-name", 'copy "public"."customers" to stdout'),
    case("large-object-from-masked", [
        "select lo_from_bytea(424242, convert_to((select phone from customers where id = 3), "
        "'UTF8'))", "select convert_from(lo_get(424242), 'UTF8')"], tx=True),
    case("lo_import-server-file", "select lo_import('/etc/hostname')"),
    case("pg_read_file", "select pg_read_file('/etc/hostname')"),
    case("dblink", "select * from dblink('dbname=bank', 'select phone from customers') "
         "as t(p text)"),
]


@pytest.mark.parametrize(("sql", "opts"), DML)
def test_dml(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, tx=True, **opts)


@pytest.mark.parametrize(("sql", "opts"), EXPORT)
def test_copy_and_export(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


# ------------------------------------------------------------------ existence oracles


def _outcome(received: Received) -> tuple[str, ...]:
    """What an attacker can tell apart: the SQLSTATEs, else the command tags with counts."""
    return tuple(received.sqlstates) or tuple(received.statuses)


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("insert into customers (id, name, phone, id_number, branch_id) values "
                     "({x}, '测试', '13000000000', '110105199001011234', 'SZ01')",
                     id="insert-primary-key"),
        pytest.param("update customers set id = {x} where id = 3", id="update-primary-key"),
        pytest.param("insert into orders (customer_id, amount, note) values ({x}, 1, 'x')",
                     id="insert-foreign-key"),
        pytest.param("insert into customers (id, name, phone, id_number, branch_id) values "
                     "({x}, '测试', '13000000000', '110105199001011234', 'SZ01') "
                     "on conflict do nothing", id="insert-on-conflict-do-nothing"),
        pytest.param("insert into accounts (customer_id, card_no, balance, branch_id, "
                     "opened_on) values ({x}, '6222020000000000', 0, 'SZ01', '2024-01-01')",
                     id="insert-accounts-foreign-key"),
    ],
)
def test_constraint_errors_do_not_reveal_out_of_scope_ids(leak: LeakChecker,
                                                          template: str) -> None:
    """Customer 1 (GZ01) must look exactly like customer 999999 (absent) to a SZ01 teller."""
    hidden = leak.run(template.format(x=1), tx=True)
    absent = leak.run(template.format(x=999999), tx=True)
    leak.check(hidden, template.format(x=1))
    leak.check(absent, template.format(x=999999))
    assert _outcome(hidden) == _outcome(absent), (
        f"out-of-scope customer 1 is distinguishable from an absent id: "
        f"{hidden.describe()}  VS  {absent.describe()}"
    )


@pytest.mark.parametrize(
    ("table", "line"),
    [
        pytest.param("customers (name, phone, id_number, branch_id)",
                     "测试\t13000000000\t110105199001011234\tGZ01\n", id="customers-other-branch"),
        pytest.param("orders (customer_id, amount, note)", "1\t1\tx\n",
                     id="orders-other-customer"),
    ],
)
def test_copy_from_stdin_cannot_write_outside_the_filter(leak: LeakChecker, table: str,
                                                         line: str) -> None:
    """COPY FROM is a write too: it must not create rows outside the teller's filter."""
    conn = leak.connect()
    received = Received()
    try:
        conn.execute("begin")
        try:
            with conn.cursor().copy(f"copy {table} from stdin") as copy:
                copy.write(line)
            received.results.append(ResultSet([], [], "COPY"))
        except psycopg.Error as exc:
            received.errors.append({"sqlstate": exc.sqlstate or "", "text": str(exc)})
        conn.execute("rollback")
        received.alive = conn.execute("select 1").fetchone() == (1,)
    finally:
        conn.close()
    leak.check(received, f"copy {table} from stdin")
    assert received.errors, f"COPY FROM wrote a row outside the row filter: {line!r}"
