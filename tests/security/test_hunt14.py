"""Bypass hunt 14: what a pipeline of one cursor's FETCHes counts against max_rows.

* A cursor's FETCHes bound to the unnamed portal and pipelined before one Sync each started
  from zero: the rule that a re-Bind of the unnamed portal starts a new count (the pipelined
  Bind/Execute pairs of one statement are separate runs) was applied to the cursor's own count
  too, so twenty ``FETCH 40`` brought all 666 SZ01 customers through one cursor (masked and
  audited, but past the cap of 50). The re-Bind rule now applies only to the unnamed portal's
  count; a cursor's rows add up however its FETCHes are sent.
"""
from __future__ import annotations

import uuid

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


def test_a_pipeline_of_slow_statements_leaves_other_sessions_served(
        leak: LeakChecker) -> None:
    """Statements on customer data that take long to analyse (long IN lists), pipelined in
    one write: pgveil analyses them in turns of the event loop, not all at once, so another
    session's lookups keep being answered meanwhile (each statement once stopped every
    session for its whole analysis, and a pipeline for the sum)."""
    import threading
    import time

    ids = ", ".join(str(i) for i in range(1, 2000) if i % 3)  # none of them in SZ01
    texts = [f"SELECT id, phone AS p{n} FROM customers WHERE id IN ({ids})".encode()
             for n in range(24)]  # shapes of their own: no cache hits
    waits: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with leak.connect() as other:
            while not done.is_set():
                t0 = time.perf_counter()
                other.execute("SELECT phone FROM customers WHERE id = 3").fetchone()
                waits.append(time.perf_counter() - t0)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    with leak.connect() as conn:
        w = Wire(conn)
        prober.start()
        time.sleep(0.3)
        t0 = time.perf_counter()
        got = w.batch(*[m for t in texts for m in (parse(b"", t), bind(b""), execute())], SYNC)
        took = time.perf_counter() - t0
        done.set()
        prober.join(30)
        w.sock.detach()
    assert not got.sqlstates and got.rows == 0, got.sqlstates
    assert took > 1.0, took  # slow enough to matter (else the test shows nothing)
    assert max(waits) < took / 3, (max(waits), took)


def test_queries_held_behind_pgveils_sync_all_run_after_a_slow_one(leak: LeakChecker) -> None:
    """Queries held behind pgveil's own Sync (an extended batch left open, as asyncpg's
    prepare does) run when that Sync is answered; the first took more than the analysis
    slice, and the rest stayed in the session's buffer until the client sent something else."""
    from tests.harness.wire import msg

    ids = ", ".join(str(i) for i in range(1, 2000) if i % 3)
    slow = f"SELECT id, phone AS held_{uuid.uuid4().hex[:8]} FROM customers WHERE id IN ({ids})"
    with leak.connect() as conn:
        w = Wire(conn)
        w.sock.sendall(parse(b"", b"SELECT 1") + msg(b"D", b"S\x00") + msg(b"H", b"")
                       + query(slow) + query("SELECT 'second'") + query("SELECT 'third'"))
        got = w.messages(syncs=3)  # pgveil's Sync's, and the three Queries' ReadyForQuery
        assert [k for k, _ in got].count("Z") == 3
        assert [body for k, body in got if k == "D"][-2:] == [
            b"\x00\x01\x00\x00\x00\x06second", b"\x00\x01\x00\x00\x00\x05third"]
        w.sock.detach()
