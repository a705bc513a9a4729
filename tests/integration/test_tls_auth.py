"""TLS on both legs and the three auth modes, against a PostgreSQL that has TLS switched on.

A private cluster (not the session one) gets a self-signed certificate and ``ssl = on``, so the
upstream leg can be TLS; pgveil gets its own certificate for the client leg.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.demo import make_self_signed
from proxy.localpg import PostgresCluster, password_for
from proxy.scram import make_verifier


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster.create(provision=True, scale=60)
    try:
        assert cluster.data_dir is not None
        crt, key = cluster.data_dir / "server.crt", cluster.data_dir / "server.key"
        make_self_signed(crt, key, "127.0.0.1")
        owner = cluster.data_dir.stat()
        for f in (crt, key):
            shutil.chown(f, owner.st_uid, owner.st_gid)
        cluster.psql("ALTER SYSTEM SET ssl = on", db="postgres")
        cluster.psql("SELECT pg_reload_conf()", db="postgres")
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pgveil-certs")
    make_self_signed(d / "server.crt", d / "server.key", "127.0.0.1")
    return d / "server.crt", d / "server.key"


def _proxy(factory, tls_pg: PostgresCluster, certs: tuple[Path, Path], mode: str,
           upstream_tls: str = "require", **extra: object):
    overrides: dict[str, object] = {
        "upstream": {"host": "127.0.0.1", "port": tls_pg.port, "tls": upstream_tls},
        "tls": {"cert": str(certs[0]), "key": str(certs[1]), "mode": "prefer"},
        "auth": {"mode": mode},
        "control": {"dsn": tls_pg.dsn("dba", db="postgres")},
    }
    overrides.update(extra)
    from tests.harness.pgveil_proc import PgveilProcess

    proc = PgveilProcess(tls_pg, overrides)
    factory.append(proc)
    return proc.start()


@pytest.fixture
def made() -> Iterator[list]:
    procs: list = []
    yield procs
    for p in procs:
        p.cleanup()


def test_scram_mode_tls_both_legs(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "scram")
    with psycopg.connect(proxy.dsn("teller_sz01", sslmode="require")) as c:
        assert c.pgconn.ssl_in_use
        phone = c.execute("select phone from customers where id = 3").fetchone()[0]
        assert "****" in phone
        # upstream leg is TLS too: PostgreSQL sees an SSL connection for this backend
        assert c.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()"
                         ).fetchone() == (True,)


def test_scram_mode_channel_binding_required(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "scram")
    dsn = proxy.dsn("dba", sslmode="require", channel_binding="require")
    with psycopg.connect(dsn) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_scram_mode_wrong_password(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "scram")
    dsn = proxy.dsn("dba", sslmode="require").replace(password_for("dba"), "wrong")
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(dsn)
    assert "password authentication failed" in str(err.value)


async def test_scram_mode_wrong_password_sqlstate_asyncpg(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "scram")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(proxy.dsn("teller_sz01").replace(password_for("teller_sz01"), "x"),
                              ssl=False)


def test_scram_mode_unknown_user_looks_like_wrong_password(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "scram")
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn("nobody_here", sslmode="require"))
    assert "password authentication failed" in str(err.value)


def test_passthrough_plain_upstream_tls_client(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "passthrough", upstream_tls="disable")
    with psycopg.connect(proxy.dsn("dba", sslmode="require")) as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("select count(*) from branches").fetchone() == (3,)


def test_passthrough_tls_both_legs_explains_channel_binding(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "passthrough", upstream_tls="require")
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn("dba", sslmode="require"))
    assert "channel binding" in str(err.value) and "auth.mode: scram" in str(err.value)
    # without channel binding on the client the relay works on both TLS legs
    with psycopg.connect(proxy.dsn("dba", sslmode="require", channel_binding="disable")) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_passthrough_wrong_password(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "passthrough", upstream_tls="disable")
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn("dba").replace(password_for("dba"), "bad"))
    assert "password authentication failed" in str(err.value)


def test_userlist_mode(tls_pg, certs, made, tmp_path) -> None:
    users = tmp_path / "userlist.txt"
    users.write_text(
        f'"frontdesk" "{make_verifier("desk-secret")}" "teller_sz01" '
        f'"{password_for("teller_sz01")}"\n')
    proxy = _proxy(made, tls_pg, certs, "userlist", upstream_tls="require",
                   **{"auth": {"mode": "userlist", "userlist": str(users)}})
    dsn = proxy.dsn("frontdesk", sslmode="require").replace(password_for("frontdesk"),
                                                          "desk-secret")
    with psycopg.connect(dsn) as c:
        assert c.execute("select current_user").fetchone() == ("teller_sz01",)
    bad = proxy.dsn("frontdesk", sslmode="require").replace(password_for("frontdesk"), "no")
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(bad)
    assert "password authentication failed" in str(err.value)


def test_tls_required_refuses_plain_clients(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "passthrough", upstream_tls="disable",
                   tls={"cert": str(certs[0]), "key": str(certs[1]), "mode": "require"})
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn("dba", sslmode="disable"))
    assert "requires TLS" in str(err.value)
    with psycopg.connect(proxy.dsn("dba", sslmode="require")) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_workers_share_port_and_route_cancels(tls_pg, certs, made) -> None:
    proxy = _proxy(made, tls_pg, certs, "passthrough", upstream_tls="disable", workers=2)

    async def one() -> float:
        c = await asyncpg.connect(proxy.dsn("dba"), ssl=False)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                await c.execute("select pg_sleep(10)", timeout=0.3)
            assert await c.fetchval("select 1") == 1
            return loop.time() - t0
        finally:
            await c.close()

    async def run() -> list[float]:
        return await asyncio.gather(*(one() for _ in range(12)))

    times = asyncio.run(run())
    # every cancel reached its backend, whichever worker the CancelRequest landed on
    assert max(times) < 3, times
