"""pgveil's record of the client's prepared statements stays what the server really holds.

Why: a Bind of a statement pgveil does not know runs as pass-through (no row cap, no audit
record), so pgveil must never believe a protected statement is gone (or replaced by a harmless
one) while the server still has it. PostgreSQL skips every message after an error until Sync,
a failed Parse creates nothing, and a named Parse of an existing name fails: pgveil settles
each Parse and Close only when the server answers it (ParseComplete / CloseComplete), and takes
back at ReadyForQuery what the server skipped.

Each test speaks the extended protocol over the socket of an authenticated psycopg connection,
in batches of its own making, and then runs the statement: a teller of SZ01 (max_rows 50)
reading all 666 of the branch's customers must be stopped by the row cap.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from tests.integration.test_grants_quota import logins  # noqa: F401 - fixture

MANY = b"select id from customers where level >= $1"  # 666 rows of SZ01 for $1 = 1
ROW_CAP = 50


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def parse(name: bytes, sql: bytes) -> bytes:
    return _msg(b"P", name + b"\x00" + sql + b"\x00" + struct.pack("!H", 0))


def bind(stmt: bytes, *params: bytes, portal: bytes = b"") -> bytes:
    body = portal + b"\x00" + stmt + b"\x00" + struct.pack("!HH", 0, len(params))
    for p in params:
        body += struct.pack("!I", len(p)) + p
    return _msg(b"B", body + struct.pack("!H", 0))


def execute(portal: bytes = b"") -> bytes:
    return _msg(b"E", portal + b"\x00" + struct.pack("!I", 0))


def close_statement(name: bytes) -> bytes:
    return _msg(b"C", b"S" + name + b"\x00")


SYNC = _msg(b"S", b"")


@dataclass
class Batch:
    """What the server (through pgveil) answered to one batch, up to its ReadyForQuery."""

    types: list[str] = field(default_factory=list)
    rows: int = 0
    sqlstates: list[str] = field(default_factory=list)


class Wire:
    """Raw protocol messages on an authenticated connection's socket."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.sock = socket.socket(fileno=conn.pgconn.socket)
        self.sock.settimeout(15)
        self.buf = b""

    def batch(self, *messages: bytes) -> Batch:
        self.sock.sendall(b"".join(messages))
        out = Batch()
        while True:
            while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!I", self.buf, 1)[0]:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError("pgveil closed the connection")
                self.buf += chunk
            end = 1 + struct.unpack_from("!I", self.buf, 1)[0]
            kind, body, self.buf = chr(self.buf[0]), self.buf[5:end], self.buf[end:]
            out.types.append(kind)
            if kind == "D":
                out.rows += 1
            elif kind == "E":
                fields = {p[:1]: p[1:] for p in body.split(b"\x00") if p}
                out.sqlstates.append(fields.get(b"C", b"").decode())
            elif kind == "Z":
                return out

    def capped(self, stmt: bytes) -> Batch:
        """Run ``stmt`` with $1 = 1 and check the row cap stopped it."""
        got = self.batch(bind(stmt, b"1"), execute(), SYNC)
        assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got
        return got

    def close(self) -> None:
        self.sock.detach()


@pytest.fixture
def wire(pgveil, logins) -> Iterator[Wire]:  # noqa: F811 - the fixture imported above
    # a teller of SZ01 of its own: capped reads count against the per-login quota
    conn = psycopg.connect(pgveil.dsn(logins("sz")), autocommit=True)
    w = Wire(conn)
    try:
        yield w
        assert w.batch(_msg(b"Q", b"select 1\x00")).types[-1] == "Z"  # still usable
    finally:
        w.close()
        conn.close()


def test_close_skipped_after_an_error_keeps_the_statement(wire: Wire) -> None:
    assert wire.batch(parse(b"s1", MANY), SYNC).types == ["1", "Z"]
    skipped = wire.batch(bind(b"no_such_statement"), close_statement(b"s1"), SYNC)
    assert skipped.sqlstates == ["26000"] and "3" not in skipped.types  # Close skipped
    wire.capped(b"s1")


def test_unnamed_parse_skipped_after_an_error_keeps_the_old_one(wire: Wire) -> None:
    assert wire.batch(parse(b"", MANY), SYNC).types == ["1", "Z"]
    skipped = wire.batch(bind(b"no_such_statement"), parse(b"", b"select 1"), SYNC)
    assert skipped.sqlstates == ["26000"] and "1" not in skipped.types  # Parse skipped
    wire.capped(b"")


def test_denied_parse_of_a_held_name_keeps_the_old_one(wire: Wire) -> None:
    assert wire.batch(parse(b"s2", MANY), SYNC).types == ["1", "Z"]
    denied = wire.batch(parse(b"s2", b"select id from customers"), SYNC)  # unbounded: denied
    assert denied.sqlstates == ["42501"]
    wire.capped(b"s2")


def test_parse_that_fails_on_the_server_records_nothing(wire: Wire) -> None:
    assert wire.batch(parse(b"s3", MANY), SYNC).types == ["1", "Z"]
    # PostgreSQL refuses a second Parse of the name (42P05) and keeps the first statement
    refused = wire.batch(parse(b"s3", b"select id from customers where id = $1"), SYNC)
    assert refused.sqlstates == ["42P05"]
    wire.capped(b"s3")


def test_parse_answered_before_a_later_error_stands(wire: Wire) -> None:
    """Control: the server created the statement before the batch failed, so it is kept."""
    failed = wire.batch(parse(b"s4", MANY), bind(b"s4", b"not a number"), SYNC)
    assert failed.types[0] == "1" and failed.sqlstates == ["22P02"]
    wire.capped(b"s4")


def test_statement_really_closed_is_forgotten(wire: Wire) -> None:
    """Control: after a Close the server answered, the name is free for a new statement."""
    assert wire.batch(parse(b"s5", MANY), SYNC).types == ["1", "Z"]
    assert wire.batch(close_statement(b"s5"), SYNC).types == ["3", "Z"]
    assert wire.batch(parse(b"s5", b"select 1"), SYNC).types == ["1", "Z"]
    got = wire.batch(bind(b"s5"), execute(), SYNC)
    assert got.rows == 1 and not got.sqlstates
