"""Adversity: malformed bytes, vanishing clients, a restarting upstream, connection limits."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import time

import asyncpg
import psycopg
import pytest

from proxy.localpg import client_binary


def _alive(pgveil) -> bool:
    with psycopg.connect(pgveil.dsn("dba"), connect_timeout=10) as c:
        return c.execute("select 7").fetchone() == (7,)


@pytest.mark.parametrize("payload", [
    b"\x00\x00\x00\x08\x04\xd2\x16\x2fGARBAGE" * 3,
    struct.pack("!I", 0xFFFFFFF0) + b"x" * 64,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00" * 4096,
    struct.pack("!II", 8, 196608),  # a startup packet with no user
])
def test_malformed_startup_rejected_service_continues(pgveil, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", pgveil.port), timeout=5) as s:
        s.sendall(payload)
        try:
            answer = s.recv(1024)
        except (TimeoutError, ConnectionResetError):
            answer = b""
    assert answer == b"" or answer[:1] in (b"E", b"N")
    assert _alive(pgveil)


def test_malformed_message_after_login_ends_session_cleanly(pgveil) -> None:
    with psycopg.connect(pgveil.dsn("dba")) as c:
        sock = socket.socket(fileno=c.pgconn.socket)
        try:
            sock.sendall(b"Q\x00\x00\x00\x02")  # length < 4
            sock.settimeout(5)
            data = sock.recv(4096)
        finally:
            sock.detach()
    assert data[:1] == b"E" and b"08P01" in data
    assert _alive(pgveil)


def test_client_killed_mid_query_cancels_upstream(pg, pgveil) -> None:
    p = subprocess.Popen([client_binary(pg.bin_dir, "psql"), pgveil.dsn("dba"), "-c",
                          "select pg_sleep(60) /* orphan-test */"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    p.kill()
    p.wait()
    q = ("select count(*) from pg_stat_activity where query like '%orphan-test */' "
         "and state = 'active' and pid <> pg_backend_pid()")
    for _ in range(20):
        time.sleep(0.5)
        if pg.psql(q).strip() == "0":
            return
    pytest.fail("upstream query still running 10 s after its client died")


def test_upstream_restart_gives_errors_not_hangs(pg, pgveil_factory) -> None:
    proxy = pgveil_factory()

    async def client_loop(deadline: float) -> tuple[int, int, int]:
        ok = errors = hung = 0
        while time.time() < deadline:
            try:
                c = await asyncpg.connect(proxy.dsn("dba"), timeout=5)
                try:
                    for _ in range(20):
                        await asyncio.wait_for(c.fetchval("select 1"), 8)
                        ok += 1
                finally:
                    await c.close()
            except asyncio.TimeoutError:
                hung += 1
            except Exception:  # noqa: BLE001 - errors are expected while it restarts
                errors += 1
                await asyncio.sleep(0.2)
        return ok, errors, hung

    async def run() -> tuple[int, int, int]:
        task = asyncio.create_task(client_loop(time.time() + 8))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(pg.restart, "immediate")
        return await task

    ok, errors, hung = asyncio.run(run())
    assert hung == 0 and ok > 0
    time.sleep(0.5)
    assert _alive(proxy)


def test_max_connections_gives_clear_error(pgveil_factory) -> None:
    proxy = pgveil_factory({"listen": {"max_connections": 2}})
    a = psycopg.connect(proxy.dsn("dba"))
    b = psycopg.connect(proxy.dsn("dba"))
    try:
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(proxy.dsn("dba"))
        assert "too many clients" in str(err.value)
    finally:
        a.close()
        b.close()


def test_idle_timeout_closes_only_idle_clients(pgveil_factory) -> None:
    """listen.idle_timeout: a client silent for longer is told why (57P05) and closed; a busy
    one on the same proxy keeps its connection."""
    proxy = pgveil_factory({"listen": {"idle_timeout": 1}})
    idle = psycopg.connect(proxy.dsn("dba"))
    busy = psycopg.connect(proxy.dsn("dba"))
    try:
        assert idle.execute("select 1").fetchone() == (1,)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            assert busy.execute("select 2").fetchone() == (2,)
            time.sleep(0.2)
        with pytest.raises(psycopg.OperationalError) as err:
            idle.execute("select 1")
        assert "idle timeout" in str(err.value) or idle.closed
        assert busy.execute("select 3").fetchone() == (3,)
    finally:
        idle.close()
        busy.close()
    assert _alive(proxy)


def test_upstream_down_gives_fatal_error(pgveil_factory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    proxy = pgveil_factory({"upstream": {"port": dead_port}})
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn("dba"), connect_timeout=10)
    assert "cannot connect to the PostgreSQL server" in str(err.value)


def test_upstream_that_accepts_and_never_answers_gives_an_error(pgveil_factory) -> None:
    """A listener that never accepts (a hung server, a black-holing middlebox): the client
    gets an error after upstream.connect_timeout, not a wait as long as its own patience."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)  # the kernel completes handshakes; nobody ever reads
        proxy = pgveil_factory({"upstream": {"port": silent.getsockname()[1],
                                             "connect_timeout": 2}})
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(proxy.dsn("dba"), connect_timeout=30)
        assert time.monotonic() - started < 10
    assert "no answer to the startup message within 2 s" in str(err.value)


def test_sigterm_drains_in_flight_query(pgveil_factory) -> None:
    import signal
    import threading

    proxy = pgveil_factory()
    result: list[object] = []

    def slow() -> None:
        try:
            with psycopg.connect(proxy.dsn("dba")) as c:
                result.append(c.execute("select pg_sleep(1), 5").fetchone()[1])
        except Exception as exc:  # noqa: BLE001
            result.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.4)
    proxy.signal(signal.SIGTERM)
    t.join(15)
    assert result == [5]


@pytest.mark.parametrize(("version", "options"), [
    ((3 << 16) | 2, {}),
    ((3 << 16), {"_pq_.w7_option": "on"}),
    ((3 << 16) | 2, {"_pq_.a": "1", "_pq_.b": "2"}),
])
def test_newer_protocol_and_pq_options_are_negotiated_down(pgveil, version: int,
                                                           options: dict[str, str]) -> None:
    """PostgreSQL answers a newer minor version or unknown ``_pq_.`` options with
    NegotiateProtocolVersion (3.0) before the authentication request; so does pgveil, and the
    options never reach PostgreSQL (whose own 'v' a relayed login did not expect: it hung)."""
    params = {"user": "dba", "database": "bank", **options}
    body = struct.pack("!I", version) + b"".join(
        k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()) + b"\x00"
    with socket.create_connection(("127.0.0.1", pgveil.port), timeout=5) as s:
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        answer = b""
        while len(answer) < 5 or len(answer) < 1 + struct.unpack_from("!I", answer, 1)[0] + 9:
            answer += s.recv(4096)
    end = 1 + struct.unpack_from("!I", answer, 1)[0]
    assert answer[:1] == b"v"
    newest, count = struct.unpack_from("!II", answer, 5)
    assert newest == 3 << 16
    assert answer[13:end].split(b"\x00")[:count] == [k.encode() for k in options]
    assert answer[end:end + 1] == b"R"  # then the authentication request, as directly
    assert _alive(pgveil)


def test_an_unsupported_major_version_is_refused_like_postgresql_does(pgveil) -> None:
    body = struct.pack("!I", 4 << 16) + b"user\x00dba\x00\x00"
    with socket.create_connection(("127.0.0.1", pgveil.port), timeout=5) as s:
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        answer = s.recv(4096)
    assert answer[:1] == b"E" and b"C0A000" in answer
    assert b"unsupported frontend protocol 4.0" in answer
    assert _alive(pgveil)
