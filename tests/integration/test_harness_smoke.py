"""The live-test harness itself: the throwaway PostgreSQL and one pgveil in front of it.

Why: every live test trusts these fixtures; if logins, SCRAM, the bank data or restart were
subtly wrong, failures elsewhere would be misread as proxy bugs.
"""

from __future__ import annotations

import psycopg
import pytest
from pg8000 import native as pg8000_native
from pg8000.exceptions import DatabaseError as Pg8000DatabaseError

from proxy.localpg import (
    LOGINS,
    PORT_RANGE,
    ClusterState,
    PostgresCluster,
    PsqlError,
    password_for,
)
from tests.harness.pgveil_proc import PgveilProcess

ALL_LOGINS = ("postgres", *LOGINS)


def test_server_listens_on_a_low_port_with_its_own_binaries(pg: PostgresCluster) -> None:
    assert pg.host == "127.0.0.1"
    assert PORT_RANGE[0] <= pg.port < 32768 or not pg.owned
    assert pg.bin_dir is not None and (pg.bin_dir / "psql").is_file()
    if pg.owned:
        assert pg.socket_dir is not None and (pg.socket_dir / f".s.PGSQL.{pg.port}").exists()
    version = int(pg.psql("SHOW server_version_num").strip())
    assert version >= 130000


def test_tcp_logins_use_scram(pg: PostgresCluster) -> None:
    methods = pg.psql(
        "SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type LIKE 'host%'",
        db="postgres",
    ).split()
    assert methods == ["scram-sha-256"] or not pg.owned
    verifiers = pg.psql(
        "SELECT rolname || ' ' || left(rolpassword, 14) FROM pg_authid "
        f"WHERE rolname IN ({', '.join(repr(x) for x in LOGINS)}) ORDER BY rolname",
        db="postgres",
    ).splitlines()
    assert sorted(verifiers) == sorted(f"{login} SCRAM-SHA-256$" for login in LOGINS)


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_each_login_connects_over_tcp_with_its_password(pg: PostgresCluster, login: str) -> None:
    # "postgres" stands for the superuser: on a PGVEIL_TEST_DSN server that is the URL's user,
    # whose password the harness knows only from that URL
    login = pg.admin_user if login == "postgres" else login
    with psycopg.connect(pg.dsn(login), connect_timeout=10) as conn:
        user, db, addr = conn.execute(
            "SELECT current_user, current_database(), inet_server_addr()::text"
        ).fetchone()  # type: ignore[misc]
        assert (user, db) == (login, "bank")
        assert addr.startswith("127.0.0.1")  # TCP, not the unix socket
        # GRANT ALL ... TO PUBLIC: every login reads the bank tables directly.
        assert conn.execute("SELECT count(*) FROM branches").fetchone() == (3,)


def test_bank_is_loaded_at_scale_2000(pg: PostgresCluster) -> None:
    with psycopg.connect(pg.dsn("dba")) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2000,)
        assert conn.execute("SELECT count(DISTINCT branch_id) FROM customers").fetchone() == (3,)
        (accounts,) = conn.execute("SELECT count(*) FROM accounts").fetchone()  # type: ignore[misc]
        assert accounts >= 2000
        row = conn.execute("SELECT name, phone FROM customers WHERE id = 1").fetchone()
        assert row is not None
        name, phone = row
        assert len(name) >= 2 and not name.isascii()  # UTF8 round trip of Chinese names
        assert len(phone) == 11 and phone.isdigit()


def test_wrong_password_is_28P01(pg: PostgresCluster) -> None:
    with pytest.raises(Pg8000DatabaseError) as info:
        pg8000_native.Connection(
            "teller_sz01", password="wrong", host=pg.host, port=pg.port, database="bank"
        )
    assert info.value.args[0]["C"] == "28P01"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn("dba").replace(password_for("dba"), "nope"))


def test_tcp_without_password_is_refused(pg: PostgresCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(host=pg.host, port=pg.port, user="stranger", dbname="bank", password="")


def test_psql_returns_rows_and_raises_on_error(pg: PostgresCluster) -> None:
    assert pg.psql("SELECT 1; SELECT 'a', 'b'") == "1\na|b\n"
    assert pg.psql("SELECT current_user", login="teller_gz01").strip() == "teller_gz01"
    with pytest.raises(PsqlError, match="does not exist") as info:
        pg.psql("SELECT * FROM no_such_table")
    assert info.value.returncode != 0


def test_dsn_can_point_at_another_port(pg: PostgresCluster) -> None:
    assert pg.dsn("auditor1", db="postgres", port=21234) == (
        "postgresql://auditor1:pw_auditor1@127.0.0.1:21234/postgres"
    )


def test_private_cluster_restart_stop_start_and_cleanup() -> None:
    """On a second, unprovisioned cluster so the session's server is never disturbed."""
    cluster = PostgresCluster.create(provision=False)
    try:
        assert cluster.state is ClusterState.RUNNING
        port, pid = cluster.port, cluster.postmaster_pid()
        assert pid is not None
        cluster.psql(
            "SET synchronous_commit = on; CREATE TABLE t (x int); INSERT INTO t VALUES (42);",
            db="postgres",
        )

        cluster.restart()  # immediate: a crash, then recovery
        assert cluster.port == port
        assert cluster.postmaster_pid() not in (None, pid)
        assert cluster.psql("SELECT x FROM t", db="postgres") == "42\n"
        with psycopg.connect(cluster.dsn("postgres", db="postgres")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        cluster.stop()
        assert cluster.state is ClusterState.STOPPED and cluster.postmaster_pid() is None
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(cluster.dsn("postgres", db="postgres"), connect_timeout=3)
        cluster.start()
        assert cluster.psql("SELECT count(*) FROM t", db="postgres") == "1\n"
    finally:
        cluster.cleanup()
    assert cluster.base_dir is not None and not cluster.base_dir.exists()
    assert cluster.postmaster_pid() is None


def test_query_through_pgveil_as_dba(pgveil: PgveilProcess) -> None:
    with psycopg.connect(pgveil.dsn("dba"), connect_timeout=10) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2000,)
