#!/usr/bin/env python3
"""The floor of a Python proxy: a uvloop TCP relay that forwards bytes and looks at nothing.

Why: pgveil's TPS is judged against PgBouncer (C, libevent). Part of the gap is what any
asyncio proxy pays per message -- a ``data_received`` callback and a ``write`` on each side, plus
the kernel's work for the extra hop -- and no policy engine can win that part back. Running this
relay as a bench target (``bench/run.py --targets direct,pgbouncer,relay,pgveil``) measures that
floor on the same machine in the same run, so what pgveil adds above it is a number, not a guess.

It is a benchmark instrument, not part of pgveil: no parsing, no TLS, no auth, no backpressure
beyond the transports' own buffers.

``--audit FILE`` adds the one piece of pgveil's work no implementation of its contract can skip:
strict audit durability (SPEC §3 ``durability: strict``). Each result that ends in ReadyForQuery
is held until a hash-chained JSON record of it (its rows counted) is appended to FILE, in groups
written under ``flock`` as pgveil's file sink writes them. Sent pgveil's rewritten statement
(``bench/run.py --targets …,audit-relay``), it is the floor of any Python proxy that masks at
the source and audits strictly: what pgveil spends above it is its enforcement.

Usage: ``python bench/relay.py [--audit FILE] LISTEN_PORT UPSTREAM_PORT [UPSTREAM_HOST]``.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import struct
import sys
import time

import uvloop

_LENGTH = struct.Struct("!I")
# a group is written this many event-loop passes after its first record, as pgveil does
# (proxy/audit.py FLUSH_PASSES), so that results arriving meanwhile share its write
FLUSH_PASSES = 3


class _StrictTrail:
    """Results held until their audit records are appended (strict durability), in groups."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.prev = "0" * 64
        self.seq = 0
        self.group: list[tuple[bytes, asyncio.Transport, bytes]] = []
        self.flushing = False

    def submit(self, client: asyncio.Transport, data: bytes) -> None:
        rows, pos, n = 0, 0, len(data)
        while pos + 5 <= n:  # count the DataRows, as any record of the statement must
            rows += data[pos] == 0x44
            pos += 1 + _LENGTH.unpack_from(data, pos + 1)[0]
        self.seq += 1
        line = (
            f'{{"chain":"relay","decision":"rewritten","prev":"{self.prev}","rows":{rows},'
            f'"seq":{self.seq},"ts":{time.time():.6f}}}'
        ).encode()
        self.prev = hashlib.sha256(line).hexdigest()
        self.group.append((line, client, data))
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self._flush, FLUSH_PASSES - 1)

    def _flush(self, passes_left: int) -> None:
        if passes_left > 0:
            asyncio.get_running_loop().call_soon(self._flush, passes_left - 1)
            return
        self.flushing = False
        group, self.group = self.group, []
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            os.stat(self.path)  # pgveil's sink checks the path is still its file (rotation)
            os.write(self.fd, b"\n".join(line for line, _, _ in group) + b"\n")
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        for _, client, data in group:
            if not client.is_closing():
                client.write(data)


_TRAIL: _StrictTrail | None = None


class _Upstream(asyncio.Protocol):
    """The relay's connection to PostgreSQL: every byte goes to the client as it came."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client.transport
        if client is None:
            return
        # a whole response in one read (the benchmark's one-row lookups): audited and held
        if _TRAIL is not None and len(data) >= 6 and data[-6] == 0x5A:
            _TRAIL.submit(client, data)
        else:
            client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    """A client connection: bytes that arrive before the upstream is connected are queued."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream_addr = upstream
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.early: list[bytes] | None = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Upstream(self), *self.upstream_addr)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.upstream = up
        assert up.transport is not None
        for chunk in self.early or ():
            up.transport.write(chunk)
        self.early = None

    def data_received(self, data: bytes) -> None:
        if self.early is not None:
            self.early.append(data)
        elif self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(listen_port: int, upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream), "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    global _TRAIL
    if len(argv) >= 2 and argv[0] == "--audit":
        _TRAIL = _StrictTrail(argv[1])
        argv = argv[2:]
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    host = argv[2] if len(argv) == 3 else "127.0.0.1"
    try:
        uvloop.run(serve(int(argv[0]), (host, int(argv[1]))))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
