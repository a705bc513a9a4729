"""Prometheus metrics (SPEC §7) and the /metrics, /healthz, /readyz endpoint.

All metrics live in one :class:`Metrics` object so tests can make a private registry. Labels are
bounded: role names, decisions, statement kinds and reasons — never logins or SQL text.
The HTTP endpoint is a small asyncio server on the metrics port (no threads): ``/metrics`` renders
the registry, ``/healthz`` says the process is alive, ``/readyz`` says it can serve (policy
loaded, listening, upstream reachable recently).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger("pgveil.metrics")

# How often a worker adds what its sessions counted to the Prometheus values (the in-process
# /metrics endpoint flushes before every scrape; with workers: N the parent reads what each
# worker flushed, so a scrape lags by at most this much).
FLUSH_SECONDS = 1.0

_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
_STATEMENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0)


class BatchedCounter:
    """Per-statement increments of a labelled Counter, kept in a plain dict on the hot path
    and added to the Counter by :meth:`flush` (a Counter's ``labels()`` lookup and locked
    ``inc`` cost more than the rest of forwarding a pass-through statement)."""

    def __init__(self, counter: Counter):
        self.counter = counter
        self.pending: dict[tuple[str, ...], float] = {}
        self._children: dict[tuple[str, ...], Any] = {}
        # label tuples counted once each (``record = events.append``); the list is never
        # replaced, so a bound ``record`` stays valid
        self.events: list[tuple[str, ...]] = []
        self.record = self.events.append

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        pending = self.pending
        pending[labels] = pending.get(labels, 0) + amount

    def flush(self) -> None:
        if self.events:  # the hot path's one-per-statement increments
            counted = collections.Counter(self.events)
            self.events.clear()
            for labels, count in counted.items():
                self.pending[labels] = self.pending.get(labels, 0) + count
        pending, self.pending = self.pending, {}
        for labels, amount in pending.items():
            child = self._children.get(labels)
            if child is None:
                child = self._children[labels] = self.counter.labels(*labels)
            child.inc(amount)


class BatchedHistogram:
    """Observations of a label-less Histogram, collected in a list on the hot path (one
    ``append``) and bucketed into the Histogram by :meth:`flush`."""

    def __init__(self, histogram: Histogram, buckets: tuple[float, ...]):
        self.histogram = histogram
        self._bounds = list(buckets)  # the +Inf bucket is index len(buckets)
        self._values: list[float] = []
        self.observe = self._values.append  # the list is never replaced: safe to hand out
        # prometheus_client keeps non-cumulative per-bucket values and a sum; add to them in
        # bulk when they are there (all versions we support), else replay observations
        inner = getattr(histogram, "_buckets", None)
        self._bulk = isinstance(inner, list) and len(inner) == len(buckets) + 1 and \
            hasattr(histogram, "_sum")

    def flush(self) -> None:
        if not self._values:
            return
        values = self._values.copy()
        self._values.clear()
        h: Any = self.histogram
        if not self._bulk:  # pragma: no cover - other prometheus_client layouts
            for v in values:
                h.observe(v)
            return
        counts = [0] * (len(self._bounds) + 1)
        where = bisect.bisect_left
        bounds = self._bounds
        for v in values:
            counts[where(bounds, v)] += 1
        for i, c in enumerate(counts):
            if c:
                h._buckets[i].inc(c)
        h._sum.inc(sum(values))


class Metrics:
    """The SPEC §7 metric families in one registry.

    The per-statement metrics (``statements``, ``statement_duration``) are counted through
    :attr:`statement_counts` / :attr:`durations` and reach Prometheus on :meth:`flush` (before
    every in-process scrape, and every ``FLUSH_SECONDS`` from the worker's loop); so do the
    per-audit-record ones (``protected_rows``, ``blocked``, ``lookups``) through
    :attr:`protected_row_counts` / :attr:`blocked_counts` / :attr:`lookup_counts`.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.connections = Gauge("pgveil_connections", "Open client connections", registry=r,
                                 multiprocess_mode="livesum")
        self.statements = Counter(
            "pgveil_statements_total", "Statements handled",
            ["role", "decision", "kind"], registry=r)
        self.protected_rows = Counter(
            "pgveil_protected_rows_total", "Rows of protected tables returned to clients",
            ["role", "table"], registry=r)
        self.blocked = Counter(
            "pgveil_blocked_total", "Statements denied by the policy", ["role", "reason"],
            registry=r)
        self.statement_duration = Histogram(
            "pgveil_statement_duration_seconds", "Statement latency through pgveil",
            buckets=_STATEMENT_BUCKETS, registry=r)
        self.rewrite_duration = Histogram(
            "pgveil_rewrite_duration_seconds", "Time spent analysing and rewriting SQL",
            buckets=_FAST_BUCKETS, registry=r)
        self.rewrite_cache = Counter(
            "pgveil_rewrite_cache_total", "Decision cache lookups", ["result"], registry=r)
        self.audit_records = Counter(
            "pgveil_audit_records_total", "Audit records written", registry=r)
        self.audit_failures = Counter(
            "pgveil_audit_failures_total", "Audit records that could not be written", registry=r)
        self.audit_queue = Gauge(
            "pgveil_audit_queue", "Audit records waiting to be written", registry=r,
            multiprocess_mode="livesum")
        self.policy_reloads = Counter(
            "pgveil_policy_reloads_total", "Policy reload attempts", ["result"], registry=r)
        self.policy_info = Gauge(
            "pgveil_policy_info", "The policy version in force (value 1)", ["version"],
            registry=r, multiprocess_mode="liveall")
        self.upstream_errors = Counter(
            "pgveil_upstream_errors_total", "Failures connecting to or talking to PostgreSQL",
            registry=r)
        self.lookups = Counter(
            "pgveil_lookups_total", "Exact-match lookups on raw masked columns",
            ["role", "column"], registry=r)
        # make the label-less counters and common label sets visible from the first scrape
        for result in ("hit", "miss"):
            self.rewrite_cache.labels(result=result)
        for result in ("ok", "error"):
            self.policy_reloads.labels(result=result)
        self._policy_version: str | None = None
        self.statement_counts = BatchedCounter(self.statements)
        self.durations = BatchedHistogram(self.statement_duration, _STATEMENT_BUCKETS)
        self.protected_row_counts = BatchedCounter(self.protected_rows)
        self.blocked_counts = BatchedCounter(self.blocked)
        self.lookup_counts = BatchedCounter(self.lookups)
        self.cache_counts = BatchedCounter(self.rewrite_cache)
        self.rewrite_durations = BatchedHistogram(self.rewrite_duration, _FAST_BUCKETS)

    def flush(self) -> None:
        """Add what the hot path counted locally to the Prometheus values."""
        self.statement_counts.flush()
        self.durations.flush()
        self.protected_row_counts.flush()
        self.blocked_counts.flush()
        self.lookup_counts.flush()
        self.cache_counts.flush()
        self.rewrite_durations.flush()

    async def flush_forever(self, interval: float = FLUSH_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - metrics must never take the proxy down
                log.exception("metrics flush failed")

    def set_policy_version(self, version: str) -> None:
        if self._policy_version is not None:
            self.policy_info.remove(self._policy_version)
        self._policy_version = version
        self.policy_info.labels(version=version).set(1)

    def render(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)


class MetricsServer:
    """HTTP/1.0-style endpoint on asyncio: GET /metrics, /healthz, /readyz.

    ``ready`` is a callable so readiness reflects live state (policy loaded, upstream reachable).
    """

    def __init__(self, metrics: Metrics, ready: Callable[[], bool],
                 render: Callable[[], bytes] | None = None):
        self.metrics = metrics
        self.ready = ready
        self.render = render or metrics.render
        self._server: asyncio.base_events.Server | None = None
        self._clients = 0
        # clients still sending their request head, oldest first (dicts keep insertion order)
        self._reading: dict[asyncio.StreamWriter, None] = {}

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # A scrape is one short request: its whole head must arrive within REQUEST_SECONDS, and at
    # most MAX_CLIENTS are served at once (the endpoint shares the proxy's process and its file
    # descriptors: trickling requests must not hold them). When all are taken, a newcomer
    # evicts the oldest client still sending its head: one that trickles 40 half requests
    # could otherwise keep the liveness probe out for good (and have the pod restarted).
    REQUEST_SECONDS = 5.0
    MAX_CLIENTS = 32
    MAX_HEAD_LINES = 100

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= self.MAX_CLIENTS:
            oldest = next(iter(self._reading), None)
            if oldest is None:  # every slot is writing a response: those end by themselves
                writer.close()
                return
            del self._reading[oldest]
            oldest.transport.abort()  # its read fails; its handler frees the slot
        self._clients += 1
        self._reading[writer] = None
        try:
            line = await asyncio.wait_for(self._read_head(reader), self.REQUEST_SECONDS)
            self._reading.pop(writer, None)
            if line is None:
                return
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else "/"
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.render()
            elif path == "/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path == "/readyz":
                ok = self.ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), self.REQUEST_SECONDS)
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                ValueError):  # ValueError: a line over the stream's limit
            pass
        finally:
            self._reading.pop(writer, None)
            self._clients -= 1
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request line, after reading the rest of the head (None: too many lines)."""
        line = await reader.readline()
        for _ in range(self.MAX_HEAD_LINES):
            if (await reader.readline()) in (b"\r\n", b"\n", b""):
                return line
        return None
