"""Portals and cursors share one namespace on the server, and the row cap must hold across it.

Why: PostgreSQL lets an Execute message run a cursor made by SQL ``DECLARE`` and a SQL
``FETCH`` read a portal made by a Bind message; a DECLARE or Bind of a name in use fails
(42P03) and keeps the old portal; a Bind or Close skipped after an error keeps it too. pgveil
attributed rows by the message kind only, and recorded a DECLARE / Bind / Close when it
forwarded it, so each of these ran a protected query's portal with no row cap and no audit
record: a teller of SZ01 (max_rows 50) read all 666 of the branch's customers.

Each test reads as a teller of its own (the quota is per login) over raw protocol messages.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.wire import (
    ROW_CAP,
    SYNC,
    Wire,
    bind,
    close_portal,
    execute,
    open_wire,
    parse,
    query,
)

MANY = b"select id, phone from customers where level >= $1"  # 666 rows of SZ01 for $1 = 1


def named_bind(portal: bytes, stmt: bytes = b"", *params: bytes) -> bytes:
    return bind(stmt, *params, portal=portal)


@pytest.fixture
def wire(pgveil, logins) -> Iterator[Wire]:  # noqa: F811 - the fixture imported above
    with open_wire(pgveil.dsn(logins("sz"))) as w:
        yield w


def q(wire: Wire, sql: str):
    return wire.batch(query(sql))


def test_fetch_of_a_bound_portal_is_capped(wire: Wire) -> None:
    q(wire, "begin")
    assert wire.batch(parse(b"", MANY), named_bind(b"p1", b"", b"1"), SYNC).types == \
        ["1", "2", "Z"]
    got = q(wire, "fetch all from p1")
    assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got


def test_execute_of_a_declared_cursor_is_capped(wire: Wire) -> None:
    q(wire, "begin")
    q(wire, "declare c1 cursor for select id, phone from customers where level >= 1")
    got = wire.batch(execute(b"c1"), SYNC)
    assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got


def test_execute_and_fetch_of_one_portal_count_together(wire: Wire) -> None:
    q(wire, "begin")
    first = wire.batch(parse(b"", MANY), named_bind(b"p2", b"", b"1"), execute(b"p2", 30), SYNC)
    assert first.rows == 30 and "s" in first.types
    second = q(wire, "fetch 30 from p2")
    third = wire.batch(execute(b"p2", 30), SYNC)
    assert first.rows + second.rows + third.rows <= ROW_CAP, (second, third)
    assert "42501" in second.sqlstates + third.sqlstates


def test_execute_of_a_declared_cursor_then_fetch_backward(wire: Wire) -> None:
    q(wire, "begin")
    q(wire, "declare c2 scroll cursor for select id, phone from customers where level >= 1")
    first = wire.batch(execute(b"c2", 30), SYNC)
    second = q(wire, "fetch 30 from c2")
    third = q(wire, "fetch backward all from c2")
    assert first.rows + second.rows + third.rows <= ROW_CAP


def test_failed_redeclare_with_hold_keeps_the_cap(wire: Wire) -> None:
    q(wire, "declare c3 cursor with hold for select id, phone from customers where level >= 1")
    assert q(wire, "declare c3 cursor with hold for select 1").sqlstates == ["42P03"]
    got = q(wire, "fetch all from c3")
    assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got
    q(wire, "close c3")


def test_redeclare_rolled_back_to_savepoint_keeps_the_cap(wire: Wire) -> None:
    q(wire, "begin")
    q(wire, "declare c4 cursor for select id, phone from customers where level >= 1")
    q(wire, "savepoint s")
    assert q(wire, "declare c4 cursor for select 1").sqlstates == ["42P03"]
    q(wire, "rollback to s")
    got = q(wire, "fetch all from c4")
    assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got


def test_skipped_redeclare_in_a_multi_statement_query_keeps_the_cap(wire: Wire) -> None:
    q(wire, "declare c5 cursor with hold for select id, phone from customers where level >= 1")
    assert q(wire, "select 1/0; declare c5 cursor with hold for select 2").sqlstates == \
        ["22012"]
    got = q(wire, "fetch all from c5")
    assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got
    q(wire, "close c5")


def test_failed_redeclare_does_not_restart_the_count(wire: Wire) -> None:
    q(wire, "declare c6 cursor with hold for select id, phone from customers where level >= 1")
    total = q(wire, "fetch 40 from c6").rows
    assert q(wire, "declare c6 cursor with hold for select id, phone from customers "
                   "where level >= 1").sqlstates == ["42P03"]
    total += q(wire, "fetch 40 from c6").rows
    assert total <= ROW_CAP
    q(wire, "close c6")


def test_redeclare_after_close_is_a_new_cursor(wire: Wire) -> None:
    """Control: once closed, the name is free and a harmless cursor reads without a cap."""
    q(wire, "declare c7 cursor with hold for select id, phone from customers where level >= 1")
    q(wire, "fetch 10 from c7")
    q(wire, "close c7")
    assert q(wire, "declare c7 cursor with hold for select generate_series(1, 200)").sqlstates \
        == []
    got = q(wire, "fetch all from c7")
    assert got.rows == 200 and not got.sqlstates, got
    q(wire, "close c7")


def test_bind_over_a_portal_in_use_keeps_the_cap(wire: Wire) -> None:
    q(wire, "begin")
    wire.batch(parse(b"", MANY), named_bind(b"p3", b"", b"1"), execute(b"p3", 30), SYNC)
    q(wire, "savepoint s")
    refused = wire.batch(parse(b"", b"select 1"), named_bind(b"p3"), SYNC)
    assert refused.sqlstates == ["42P03"]
    q(wire, "rollback to s")
    got = wire.batch(execute(b"p3"), SYNC)
    assert got.rows <= ROW_CAP - 30 and "42501" in got.sqlstates, got


def test_skipped_close_portal_keeps_the_cap(wire: Wire) -> None:
    q(wire, "begin")
    wire.batch(parse(b"", MANY), named_bind(b"p4", b"", b"1"), execute(b"p4", 30), SYNC)
    q(wire, "savepoint s")
    skipped = wire.batch(bind(b"no_such_statement"), close_portal(b"p4"), SYNC)
    assert skipped.sqlstates == ["26000"] and "3" not in skipped.types
    q(wire, "rollback to s")
    got = wire.batch(execute(b"p4"), SYNC)
    assert got.rows <= ROW_CAP - 30 and "42501" in got.sqlstates, got


def test_skipped_bind_pipelined_with_the_execute_keeps_the_cap(wire: Wire) -> None:
    """The Execute is sent before the server answered the batch that re-bound the portal."""
    q(wire, "begin")
    wire.batch(parse(b"", MANY), named_bind(b"p5", b"", b"1"), execute(b"p5", 30), SYNC)
    q(wire, "savepoint s")
    wire.sock.sendall(bind(b"no_such_statement") + parse(b"", b"select 1") + named_bind(b"p5")
                      + SYNC + query("rollback to s") + execute(b"p5") + SYNC)
    rows = 0
    for _ in range(3):
        rows += wire.batch().rows
    assert rows <= ROW_CAP - 30


def test_portal_suspended_executes_count_together(wire: Wire) -> None:
    q(wire, "begin")
    rows = wire.batch(parse(b"", MANY), bind(b"", b"1"), execute(b"", 20), SYNC).rows
    for _ in range(3):
        rows += wire.batch(execute(b"", 20), SYNC).rows
    assert rows <= ROW_CAP


def test_unprotected_portal_after_a_protected_one_is_not_capped(wire: Wire) -> None:
    """Control: in a transaction block, the unnamed portal re-bound to a harmless statement
    reads without the cap once the server accepted the Bind."""
    q(wire, "begin")
    wire.batch(parse(b"", MANY), bind(b"", b"1"), execute(b"", 10), SYNC)
    got = wire.batch(parse(b"", b"select generate_series(1, 200)"), bind(b""), execute(b""),
                     SYNC)
    assert got.rows == 200 and not got.sqlstates, got
    named = wire.batch(parse(b"", MANY), named_bind(b"p6", b"", b"1"), execute(b"p6", 10),
                       close_portal(b"p6"), SYNC)
    assert named.rows == 10
    again = wire.batch(parse(b"", b"select generate_series(1, 200)"), named_bind(b"p6"),
                       execute(b"p6"), SYNC)
    assert again.rows == 200 and not again.sqlstates, again
