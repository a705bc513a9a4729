"""The bench's floor target (bench/relay.py) relays a real session, and the report shows it.

Why: the relay is the reference that separates what any Python proxy costs from what pgveil
adds; a relay that silently broke would make that comparison meaningless.
"""

from __future__ import annotations

import hashlib
import json
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


def test_audit_relay_holds_each_result_for_a_chained_record(
    pg: PostgresCluster, tmp_path: Path
) -> None:
    trail = tmp_path / "relay-audit.jsonl"
    port = pick_free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "relay.py"), "--audit",
                             str(trail), str(port), str(pg.port)])
    try:
        assert wait_for_port("127.0.0.1", port, 15), "relay did not listen"
        with psycopg.connect(pg.dsn("dba", port=port), autocommit=True) as conn:
            assert len(conn.execute("select id from customers where id <= 5").fetchall()) == 5
            assert conn.execute("select count(*) from customers").fetchone()[0] == 2000
    finally:
        proc.terminate()
        proc.wait(10)
    lines = trail.read_bytes().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["rows"] for r in records][-2:] == [5, 1]  # after the session's own set-up
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    for before, line, rec in zip(lines, lines[1:], records[1:], strict=False):
        assert rec["prev"] == hashlib.sha256(before).hexdigest(), line


def test_audit_relay_runs_the_statement_pgveil_sends(pg: PostgresCluster, tmp_path: Path) -> None:
    workload = bench.rewritten_workloads(pg, tmp_path)["masked-lookup"]
    script = Path(workload.args[-1]).read_text(encoding="utf-8")
    sql = script.splitlines()[-1]
    assert "OFFSET 0" in sql and "branch_id = 'SZ01'" in sql and sql.count(":id") == 1
    assert "\\set id random(1, 2000)" in script
    done = subprocess.run(
        [bench.client_binary(pg.bin_dir, "pgbench"), "-n", "-t", "20", "-M", "prepared",
         "-h", "127.0.0.1", "-p", str(pg.port), "-U", workload.login, *workload.args,
         workload.db],
        capture_output=True, text=True, timeout=120, check=False,
        env=bench.clean_env({"PGPASSWORD": bench.password_for(workload.login)}),
    )
    assert done.returncode == 0, done.stderr
    assert "number of transactions actually processed: 20/20" in done.stdout
