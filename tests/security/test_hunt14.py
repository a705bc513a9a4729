"""Bypass hunt 14: what a pipeline of one cursor's FETCHes counts against max_rows.

* A cursor's FETCHes bound to the unnamed portal and pipelined before one Sync each started
  from zero: the rule that a re-Bind of the unnamed portal starts a new count (the pipelined
  Bind/Execute pairs of one statement are separate runs) was applied to the cursor's own count
  too, so twenty ``FETCH 40`` brought all 666 SZ01 customers through one cursor (masked and
  audited, but past the cap of 50). The re-Bind rule now applies only to the unnamed portal's
  count; a cursor's rows add up however its FETCHes are sent.
"""
from __future__ import annotations

import psycopg

from tests.harness.wire import SYNC, Wire, bind, execute, parse, query
from tests.security.conftest import LeakChecker

ROW_CAP = 50


def test_pipelined_fetches_of_one_cursor_share_its_row_count(leak: LeakChecker) -> None:
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(query("BEGIN")).sqlstates
        assert not w.batch(query(
            "DECLARE c CURSOR FOR SELECT id, phone FROM customers WHERE branch_id = 'SZ01' "
            "ORDER BY id")).sqlstates
        got = w.batch(parse(b"f", b"FETCH 40 FROM c"), *[bind(b"f"), execute()] * 20, SYNC)
        assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got
        assert not w.batch(query("ROLLBACK")).sqlstates
        assert w.batch(query("SELECT 7")).rows == 1
        w.sock.detach()


def test_pipelined_fetches_of_a_bound_portal_share_its_row_count(leak: LeakChecker) -> None:
    """A protocol portal is a cursor to SQL: FETCHes of it on the unnamed portal count too."""
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(query("BEGIN")).sqlstates
        got = w.batch(parse(b"s", b"SELECT id, phone FROM customers WHERE branch_id = 'SZ01'"),
                      bind(b"s", portal=b"cc"), SYNC)
        assert not got.sqlstates, got
        got = w.batch(parse(b"f", b"FETCH 40 FROM cc"), *[bind(b"f"), execute()] * 3, SYNC)
        assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got
        assert not w.batch(query("ROLLBACK")).sqlstates
        w.sock.detach()


def test_pipelined_lookups_each_start_from_zero(leak: LeakChecker) -> None:
    """The rule that stays: separate Bind/Execute pairs of one statement are separate runs."""
    with leak.connect() as conn:
        w = Wire(conn)
        got = w.batch(parse(b"q", b"SELECT id FROM customers WHERE id > $1 AND id < $1 + 100"),
                      *[m for i in range(3) for m in (bind(b"q", b"%d" % (i * 100)), execute())],
                      SYNC)
        assert not got.sqlstates and got.rows == 3 * 33, got
        w.sock.detach()
    assert psycopg  # the wire helpers ride on psycopg's authenticated socket
