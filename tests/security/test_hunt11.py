"""Bypass hunt 11 (protocol and session level) and this session's own fixes.

* a portal bound with the extended protocol, closed by SQL ``CLOSE`` and its name re-used by a
  ``DECLARE``: the next Execute of the name runs the new cursor, which pgveil had capped and
  audited as the old protected SELECT (a false denial and a wrong audit record);
* the ``replication`` startup parameter is refused for masked roles (test_hunt6.py);
* psql's ``\\d customers`` was refused for masked roles: its query reads
  ``pg_statistic_ext``, which holds statistics objects' definitions, not values (those are in
  ``pg_statistic_ext_data``, still refused);
* ``TABLESAMPLE`` on a protected table was refused (PostgreSQL samples only tables, not the
  derived table): the clause now moves onto the table inside it. Rows stay masked and filtered.
"""
from __future__ import annotations

import json
import subprocess
import uuid

import psycopg
import pytest

from proxy.localpg import clean_env, client_binary
from tests.harness.wire import SYNC, Wire, bind, execute, msg, parse, query
from tests.security.conftest import LeakChecker, Protocol, Received

FLUSH = msg(b"H", b"")


def test_declare_over_a_closed_portal_name_runs_as_the_new_cursor(leak: LeakChecker) -> None:
    app = f"h11-{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(leak.pgveil.dsn("teller_sz01"), autocommit=True, application_name=app)
    w = Wire(conn)
    try:
        w.batch(query("begin"))
        w.sock.sendall(parse(b"", b"select id, phone from customers where id > 0 order by id")
                       + bind(b"", portal=b"p") + execute(b"p", 30) + FLUSH)
        first = w.batch(query("close p; declare p cursor for select 1 from "
                              "generate_series(1, 100)"))
        assert first.rows == 30 and not first.sqlstates, first
        got = w.batch(execute(b"p"), SYNC)
        assert got.rows == 100 and not got.sqlstates, got
        w.batch(query("rollback"))
    finally:
        w.sock.detach()
        conn.close()
    # strict durability: every record is written before the result it belongs to is sent
    records = [json.loads(line) for line in leak.pgveil.audit_path.read_text().splitlines()
               if app in line]
    assert records and not [r for r in records if r.get("decision") == "blocked"], records


def test_a_portal_bound_after_such_a_declare_keeps_its_row_cap(leak: LeakChecker) -> None:
    """The same, with the cursor closed again and the name bound to a protected SELECT in the
    same pipeline, before the DECLARE's answer: that portal is still capped at max_rows."""
    conn = psycopg.connect(leak.pgveil.dsn("teller_sz01"), autocommit=True)
    w = Wire(conn)
    protected = b"select id, phone from customers where id > 0 order by id"
    try:
        w.batch(query("begin"))
        w.sock.sendall(parse(b"", protected) + bind(b"", portal=b"p") + execute(b"p", 30) + FLUSH)
        w.sock.sendall(query("close p; declare p cursor for select 1 from "
                             "generate_series(1, 100); close p")
                       + parse(b"", protected) + bind(b"", portal=b"p") + FLUSH)
        first = w.batch()  # the flushed 30 rows and the Query, up to its ReadyForQuery
        assert first.rows == 30 and not first.sqlstates, first
        got = w.batch(execute(b"p"), SYNC)  # after the DECLARE's answer
        assert got.rows <= 50 and got.sqlstates == ["42501"], got
        w.batch(query("rollback"))
    finally:
        w.sock.detach()
        conn.close()


@pytest.mark.parametrize(("sql", "protocol"), [
    ("select id, phone, id_number from customers tablesample bernoulli (100) "
     "where id < 300 order by id limit 20", Protocol.SIMPLE),
    ("select c.id, c.phone from customers as c tablesample system (100) repeatable (7) "
     "order by c.id limit 20", Protocol.SIMPLE),
    ("select id, phone from customers tablesample bernoulli (%s) order by id limit 20",
     Protocol.EXTENDED),
])
def test_tablesample_reads_masked_rows_of_the_branch(leak: LeakChecker, sql: str,
                                                     protocol: Protocol) -> None:
    params = (100,) if "%s" in sql else None

    def twenty_masked_rows(received: Received) -> None:
        assert not received.errors, received.describe()
        rows = received.rows
        assert len(rows) == 20 and all("*" in row[1] for row in rows), rows

    leak.assert_no_leak(sql, params, protocol=protocol, expect=twenty_masked_rows)


@pytest.mark.parametrize("login", ["teller_sz01", "auditor1"])
def test_psql_describe_matches_a_direct_connection(leak: LeakChecker, login: str) -> None:
    def describe(dsn: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [client_binary(leak.pg.bin_dir, "psql"), "-X", "-d", dsn, "-c", "\\d customers",
             "-c", "\\d+ accounts", "-c", "\\dt"],
            capture_output=True, text=True, env=clean_env(), timeout=60, check=False)

    direct, proxied = describe(leak.pg.dsn(login)), describe(leak.pgveil.dsn(login))
    assert proxied.returncode == 0 and not proxied.stderr, proxied.stderr
    assert proxied.stdout == direct.stdout


@pytest.mark.parametrize(("sql", "params", "message"), [
    # orders' row filter reads customers: checked when the statement runs
    ("insert into orders (customer_id, amount) values (1, 5)", None,
     "the row is outside the row filter of public.orders"),
    ("insert into orders (customer_id, amount) values (%s, 5)", (1,),
     "the row is outside the row filter of public.orders"),
    # the row filter on a parameter, checked when the statement runs
    ("insert into customers (name, phone, id_number, branch_id) values (%s, %s, %s, %s)",
     ("h11", "13000000011", "110101199001010011", "GZ01"),
     "the row is outside the row filter of public.customers"),
])
def test_checks_at_execution_are_policy_denials(leak: LeakChecker, sql: str,
                                                params: tuple[object, ...] | None,
                                                message: str) -> None:
    """They fail inside PostgreSQL as a cast of their message (22P02, "invalid input syntax
    for type integer"); the client gets the 42501 denial every other refusal is."""
    with psycopg.connect(leak.pgveil.dsn("teller_sz01")) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(sql, params)
        assert info.value.diag.message_primary is not None
        assert info.value.diag.message_primary.startswith(message), info.value
        conn.rollback()


@pytest.mark.parametrize("sql", [
    "update customers set phone = c2.phone from customers c2 where c2.id = 6 and customers.id = 3",
    "update orders set note = c.name from customers c where c.id = orders.customer_id "
    "and orders.customer_id = 3",
])
def test_update_may_not_store_another_relations_masked_value(leak: LeakChecker,
                                                             sql: str) -> None:
    with psycopg.connect(leak.pgveil.dsn("teller_sz01")) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(sql)
        assert "may not write the masked value" in str(info.value)
        conn.rollback()


def test_updates_that_keep_the_row_in_the_filter_run(leak: LeakChecker) -> None:
    """An ORM writes every column back with parameters (branch_id = $n, unchanged); an order
    moves to another customer of the branch. Both stay inside the filter and run; the same
    statements leaving it are refused (42501) as each row is written."""
    with psycopg.connect(leak.pgveil.dsn("teller_sz01")) as conn:
        order = conn.execute("select id from orders where customer_id = 3 order by id "
                             "limit 1").fetchone()
        assert order is not None
        cur = conn.execute("update customers set branch_id = %s, level = level where id = 3",
                           ("SZ01",))
        assert cur.rowcount == 1
        cur = conn.execute("update orders set customer_id = %s where id = %s", (6, order[0]))
        assert cur.rowcount == 1
        conn.rollback()
        for sql, params in (("update customers set branch_id = %s where id = 3", ("GZ01",)),
                            ("update orders set customer_id = %s where id = %s", (1, order[0])),
                            ("update orders set customer_id = 1 where id = %s", (order[0],))):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute(sql, params)
            assert "row filter" in str(info.value)
            conn.rollback()
    with psycopg.connect(leak.pg.dsn("dba")) as dba:  # nothing moved
        assert dba.execute("select branch_id from customers where id = 3").fetchone() == ("SZ01",)
        assert dba.execute("select customer_id from orders where id = %s",
                           (order[0],)).fetchone() == (3,)


def test_a_clients_own_bad_cast_is_not_a_policy_denial(leak: LeakChecker) -> None:
    """pgveil's checks fail as a cast of their message, which the session reports as the
    42501 denial it is; a client's own cast of text that looks like one stays a 22P02."""
    with psycopg.connect(leak.pgveil.dsn("teller_sz01"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("select 'pgveil: the row is outside the row filter'::int")


def test_a_check_at_execution_is_audited_as_a_denial(leak: LeakChecker) -> None:
    app = f"h11-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(leak.pgveil.dsn("teller_sz01"), application_name=app) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("update customers set branch_id = %s where id = 3", ("GZ01",))
        conn.rollback()
    records = [json.loads(line) for line in leak.pgveil.audit_path.read_text().splitlines()
               if app in line]
    assert [r["decision"] for r in records] == ["blocked"], records
    assert records[0]["error"] == "the row would leave the row filter of public.customers"


def test_a_learnt_nonce_does_not_turn_a_clients_own_error_into_a_denial(
        leak: LeakChecker) -> None:
    """The nonce of pgveil's checks shows in the rewritten text (pg_prepared_statements);
    a client that copies it into its own cast still gets its own 22P02, audited as failed."""
    import re

    app = f"h11-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(leak.pgveil.dsn("teller_sz01"), autocommit=True,
                         application_name=app) as conn:
        conn.execute("prepare h11_chk as update orders set customer_id = $1 where id = $2")
        text = conn.execute("select statement from pg_prepared_statements "
                            "where name = 'h11_chk'").fetchone()
        assert text is not None
        nonce = re.search(r"concat\('(pgveil [0-9a-f]+: )", text[0])
        assert nonce is not None, text[0]
        forged = nonce.group(1) + "the row would leave the row filter of public.orders"
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute(f"select id, cast(pg_catalog.concat('{forged}') as int) as h11_forged "
                         "from customers where id = 3")
    records = [json.loads(line) for line in leak.pgveil.audit_path.read_text().splitlines()
               if app in line and "h11_forged" in line]
    assert [r["decision"] for r in records] == ["failed"], records
