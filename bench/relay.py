#!/usr/bin/env python3
"""The floor of a Python proxy: a uvloop TCP relay that forwards bytes and looks at nothing.

Why: pgveil's TPS is judged against PgBouncer (C, libevent). Part of the gap is what any
asyncio proxy pays per message -- a ``data_received`` callback and a ``write`` on each side, plus
the kernel's work for the extra hop -- and no policy engine can win that part back. Running this
relay as a bench target (``bench/run.py --targets direct,pgbouncer,relay,pgveil``) measures that
floor on the same machine in the same run, so what pgveil adds above it is a number, not a guess.

It is a benchmark instrument, not part of pgveil: no parsing, no TLS, no auth, no backpressure
beyond the transports' own buffers.

Usage: ``python bench/relay.py LISTEN_PORT UPSTREAM_PORT [UPSTREAM_HOST]``.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Upstream(asyncio.Protocol):
    """The relay's connection to PostgreSQL: every byte goes to the client as it came."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

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
