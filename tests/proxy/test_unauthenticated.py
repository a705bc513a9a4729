"""What a client that never authenticates can make pgveil do (bypass hunt 12, control plane).

* The ``database`` of a startup packet is an unauthenticated claim: pgveil read that database's
  catalog before authentication, over the control login, with the name pasted into the
  control DSN (``postgres?session_preload_libraries=...`` became a setting of the control
  login's session), and left a catalog watcher per name. The name is quoted now, and no
  catalog is read before PostgreSQL has accepted the login.
* A client that never finishes its startup is closed after ``listen.startup_timeout``.
* The metrics endpoint serves a bounded number of clients, each within a deadline.
"""
from __future__ import annotations

import socket
import struct
import time
import uuid
from typing import Any

import psycopg

from proxy.config import Config
from proxy.runtime import control_dsn
from tests.conftest import PgveilFactory
from tests.harness.pgveil_proc import PgveilProcess


def _startup(port: int, user: str, database: str) -> bytes:
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0" + \
        database.encode() + b"\0\0"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        return s.recv(4096)


def _control_sessions(pgveil: PgveilProcess, marker: str) -> list[Any]:
    with psycopg.connect(pgveil.cluster.dsn("dba"), autocommit=True) as dba:
        return dba.execute("select pid, datname from pg_stat_activity "
                           "where application_name = %s", (marker,)).fetchall()


def test_the_control_dsn_quotes_the_database_name() -> None:
    config = Config.model_validate({"control": {"dsn": "postgresql://ctl@db:5432/postgres"}})
    dsn = control_dsn(config, "postgres?application_name=x&options=-c%20role%3Ddba")
    assert dsn is not None
    assert "?" not in dsn and dsn.startswith("postgresql://ctl@db:5432/postgres%3F")


def test_no_catalog_is_read_for_an_unauthenticated_database_name(pgveil: PgveilProcess) -> None:
    marker = f"unauth_{uuid.uuid4().hex[:8]}"
    answer = _startup(pgveil.port, "nobody_at_all", f"postgres?application_name={marker}")
    assert answer[:1] in (b"R", b"E"), answer  # an authentication request, or a refusal
    time.sleep(1.5)  # a catalog watcher would poll every catalog_poll_seconds (1 s)
    assert _control_sessions(pgveil, marker) == []
    assert marker not in pgveil.log_text()


def test_a_client_that_never_finishes_its_startup_is_closed(
        pgveil_factory: PgveilFactory) -> None:
    proc = pgveil_factory({"listen": {"startup_timeout": 1}})
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
        s.sendall(struct.pack("!I", 8))  # a length, then nothing
        started = time.monotonic()
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert time.monotonic() - started < 8
    assert b"startup not completed" in data, data
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:  # others still work
        assert conn.execute("select 1").fetchone() == (1,)


def test_the_metrics_endpoint_bounds_slow_and_many_clients(pgveil: PgveilProcess) -> None:
    port = pgveil.metrics_port
    held = []
    try:
        for _ in range(40):  # more than MetricsServer.MAX_CLIENTS, each sending half a request
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            held.append(s)
        # the probe still gets in: a newcomer evicts the oldest half-sent request
        with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
            probe.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert probe.recv(4096).startswith(b"HTTP/1.1 200")
        s = held[-1]
        s.settimeout(1)
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 12:
            try:  # one more header line a second: each in time, the whole head never
                s.sendall(b"X-Trickle: 1\r\n")
                closed = s.recv(4096) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        assert closed and time.monotonic() - started < 8  # closed at its deadline
    finally:
        for s in held:
            s.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
