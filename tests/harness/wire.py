"""Raw frontend messages over the socket of an authenticated psycopg connection.

Why: some attacks are message sequences no driver sends (a Close skipped after an error, a
Bind into a name a DECLARE holds, a Parse pgveil denies in the middle of a batch). psycopg
does the authentication; these helpers then write exact messages and read the answers up to
each ReadyForQuery.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg

ROW_CAP = 50  # the fixture teller's max_rows


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\x00")


def parse(name: bytes, sql: bytes) -> bytes:
    return msg(b"P", name + b"\x00" + sql + b"\x00" + struct.pack("!H", 0))


def bind(stmt: bytes, *params: bytes, portal: bytes = b"") -> bytes:
    body = portal + b"\x00" + stmt + b"\x00" + struct.pack("!HH", 0, len(params))
    for p in params:
        body += struct.pack("!I", len(p)) + p
    return msg(b"B", body + struct.pack("!H", 0))


def execute(portal: bytes = b"", limit: int = 0) -> bytes:
    return msg(b"E", portal + b"\x00" + struct.pack("!I", limit))


def close_statement(name: bytes) -> bytes:
    return msg(b"C", b"S" + name + b"\x00")


def close_portal(name: bytes) -> bytes:
    return msg(b"C", b"P" + name + b"\x00")


SYNC = msg(b"S", b"")


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

    def messages(self, syncs: int = 1) -> list[tuple[str, bytes]]:
        """The server's messages (type, body) up to the ``syncs``-th ReadyForQuery."""
        out: list[tuple[str, bytes]] = []
        while syncs:
            while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!I", self.buf, 1)[0]:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError("pgveil closed the connection")
                self.buf += chunk
            end = 1 + struct.unpack_from("!I", self.buf, 1)[0]
            kind, body, self.buf = chr(self.buf[0]), self.buf[5:end], self.buf[end:]
            out.append((kind, body))
            syncs -= kind == "Z"
        return out

    def batch(self, *messages: bytes) -> Batch:
        self.sock.sendall(b"".join(messages))
        out = Batch()
        for kind, body in self.messages():
            out.types.append(kind)
            if kind == "D":
                out.rows += 1
            elif kind == "E":
                fields = {p[:1]: p[1:] for p in body.split(b"\x00") if p}
                out.sqlstates.append(fields.get(b"C", b"").decode())
        return out

    def capped(self, stmt: bytes) -> Batch:
        """Run ``stmt`` with $1 = 1 and check the row cap stopped it."""
        got = self.batch(bind(stmt, b"1"), execute(), SYNC)
        assert got.rows <= ROW_CAP and "42501" in got.sqlstates, got
        return got


@contextlib.contextmanager
def open_wire(dsn: str) -> Iterator[Wire]:
    """A Wire on a new autocommit connection; afterwards the session must still answer."""
    conn = psycopg.connect(dsn, autocommit=True)
    w = Wire(conn)
    try:
        yield w
        w.batch(query("rollback"))
        assert w.batch(query("select 1")).types[-1] == "Z"  # still usable
    finally:
        w.sock.detach()
        conn.close()
