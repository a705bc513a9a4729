"""The bench's floor target (bench/relay.py) relays a real session, and the report shows it.

Why: the relay is the reference that separates what any Python proxy costs from what pgveil
adds; a relay that silently broke would make that comparison meaningless.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from proxy.localpg import PostgresCluster, pick_free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import run as bench  # noqa: E402


@pytest.fixture
def relay(pg: PostgresCluster):
    port = pick_free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "relay.py"), str(port),
                             str(pg.port)])
    try:
        assert wait_for_port("127.0.0.1", port, 15), "relay did not listen"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_relay_carries_a_whole_session(pg: PostgresCluster, relay: int) -> None:
    with psycopg.connect(pg.dsn("dba", port=relay)) as conn:
        assert conn.execute("select count(*) from customers").fetchone()[0] == 2000
        # the extended protocol with a parameter, and an error, go through untouched
        assert conn.execute("select name from customers where id = %s", (1,)).fetchone()[0]
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table")


def test_report_has_relay_ratio_and_cpu_columns() -> None:
    case = bench.Case(bench.WORKLOADS[0], bench.Protocol.SIMPLE)
    samples = [
        bench.Sample(case.name, "pgbouncer", 1, 1000.0, 1.0),
        bench.Sample(case.name, "relay", 1, 800.0, 1.2, cpu_us=30.0),
        bench.Sample(case.name, "pgveil", 1, 600.0, 1.5, cpu_us=90.0),
    ]
    targets = [bench.Target.PGBOUNCER, bench.Target.RELAY, bench.Target.PGVEIL]
    header, _rule, row = bench.render_table([case], samples, targets).splitlines()
    assert "relay/pgbouncer" in header and "pgveil/pgbouncer" in header
    assert "relay cpu µs/txn" in header and "pgveil cpu µs/txn" in header
    values = row.split()
    assert values[-2:] == ["30", "90"]  # relay cpu, pgveil cpu
    assert "0.80" in values and "0.60" in values
