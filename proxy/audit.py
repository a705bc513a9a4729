"""The tamper-evident audit trail: one hash-chained, signed record per protected statement.

Data flow::

    session ──record(fields)──▶ queue ──writer task──▶ chain + sign ──▶ sinks ──▶ futures resolved
                 ▲ Future                  (one task)    (seq, prev,      (file: one write +
                 └──────── resolved when durable ◀────── hash, sig)        fsync per group;
                                                                           PostgreSQL: one INSERT)

* ``record()`` (event-loop thread, never blocks) stamps ``ts``, queues the fields and returns a
  future. With ``durability: strict`` the future resolves only after the group the record
  belongs to is written and fsynced to every configured sink; the session holds the statement's
  final ReadyForQuery until then, so a crash never loses the record of a result the client saw.
  With ``batch`` it resolves at once and the file is fsynced within a second.
* Group commit: the writer drains everything queued (up to 4096 records), chains it, writes it
  with one ``write()`` + one ``fsync`` in its own I/O thread, then resolves all the futures.
  While the disk is busy the next group accumulates, so throughput grows with concurrency.
  With only a file sink and no fsync per group the write cannot block, and a group is chained
  and written on the event loop a few loop passes after the I/O callbacks that queued it, so
  that the results arriving meanwhile join it (``_schedule``), instead of by the task; the task keeps everything else (start, retries, timed checkpoints and
  fsyncs, the PostgreSQL sink, closing).
* The hot path's records come as a :class:`RecordForm` (every field encoded once per statement
  shape) plus rows and duration, and their "future" may be any object with a Future's
  ``done``/``set_result``/``set_exception``/``exception`` (the shell's held result itself).
* Chain: every record carries ``seq`` (0, 1, 2, … per chain), ``chain`` (the writer's id: one
  chain per worker process, so workers and replicas sharing a file or a table never contend for
  a head), ``prev`` (the previous record's ``hash``; the first record of a chain has 64 zeros)
  and ``hash`` = SHA-256 of the canonical JSON of the record without ``hash`` (sorted keys,
  ``(",", ":")`` separators, UTF-8, no NaN). The line written is exactly those canonical bytes
  with ``,"hash":"…"`` appended as the last member (:func:`seal`), so a line is its own
  canonical form and the hash covers the bytes before it.
* Checkpoints are chain records of ``kind: "checkpoint"`` with ``head`` (= ``prev``, the hash
  they vouch for), ``count`` (statement records since the previous checkpoint; null on a
  ``resume``, where the new process cannot know it), ``every`` and
  ``seconds`` (the cadence), ``reason``, ``key`` (the signing key's fingerprint) and ``sig``:
  base64 Ed25519 over ``b"pgveil-audit-checkpoint-v1\\n"`` + canonical JSON of the checkpoint
  without ``sig`` and ``hash``. (We sign the whole checkpoint body, not only
  ``chain:seq:head``, so its ``final``/``torn``/cadence fields cannot be altered either.)
  Without a signing key ``sig`` and ``key`` are null and the log is only hash-chained.
* When checkpoints are written — the invariant ``audit verify`` relies on:
  a chain starts with a checkpoint (``reason`` ``start``, or ``resume`` after a restart);
  before chaining a statement record the writer emits a checkpoint if ``checkpoint_every``
  records have been chained since the last one, or if ``checkpoint_seconds`` have passed since
  it (wall clock, the same clock as ``ts``); when records wait unsigned for
  ``checkpoint_seconds`` a timer emits one; a rotation, a recovered outage and a torn line each
  add one; ``close()`` writes a final one (``"final": true``). Hence in an untouched log at
  most ``every`` records follow any checkpoint before the next one, and each is stamped less
  than ``seconds`` after it. A tail that breaks this shows that a checkpoint was cut away and
  the tail re-hashed, which ``audit verify`` reports as a truncated tail.
* Restart: ``start()`` finds the last complete record of this chain id in the current file (or
  the rotated ones, newest first: writers sharing the file may have rotated it several times
  meanwhile; or the PostgreSQL table) and continues from it with a ``resume`` checkpoint, so
  the chain links across the restart. If the file ends in a torn line (power loss mid-write)
  the file sink terminates it with a newline and the resume/start checkpoint records its
  SHA-256 and length in ``torn``: the torn line is acknowledged by a signature
  instead of being silently skipped, and the chain continues from the last *good* record of
  this chain (a torn record's statement never got its ReadyForQuery in strict mode). With a
  chain id that was never seen (e.g. it contains the pid) a new chain starts at seq 0.
* Failure: any sink error (ENOSPC, EACCES, a missing directory that cannot be created, the
  audit database down) fails the futures of the group with :class:`AuditUnavailable`, sets
  ``available`` to False (the session then blocks protected statements with
  ``on_failure: block``) and the writer retries the same group every second. The records are
  kept (chained, at most ``max_backlog``) and written when the sink is back — a statement that
  ran during the outage (``on_failure: allow``) still gets its record late; records beyond the
  backlog are dropped, counted in ``pgveil_audit_failures_total`` and declared as ``lost`` in
  the next checkpoint. A sink that comes back makes ``available`` True again by itself.
* Several sinks: a record is durable only when *every* configured sink has it, so with a file
  and a PostgreSQL table an audit-database outage makes the trail unavailable too (fail
  closed); each sink catches up from where it stopped.
* The caller redacts: ``statement`` arrives already redacted (``redact_literals``) and the
  trail never logs record contents, only sink errors (with the DSN password scrubbed).
  Chain ids must be unique among live writers (the caller uses host + pid + worker).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, TypeVar

from proxy.audit_sinks import (
    AuditSinkError,
    FileSink,
    PostgresSink,
    TornTail,
    format_ts,
    parse_ts,
)
from proxy.keys import key_fingerprint, load_private_key

log = logging.getLogger(__name__)

GENESIS = "0" * 64
CHECKPOINT = "checkpoint"
SIG_DOMAIN = b"pgveil-audit-checkpoint-v1\n"
RECORD_FIELDS = ("session", "operator", "role", "client", "application", "database", "kind",
                 "statement", "tables", "columns", "decision", "reasons", "grant", "rows",
                 "duration_ms", "error")
RESERVED = frozenset({"seq", "ts", "chain", "prev", "hash"})
GROUP_MAX = 4096
# The inline writer writes a group on this many passes of the event loop after its first record
# was queued (see _schedule).
FLUSH_PASSES = 3
# The queue gauge is set when a group of more than this many records is taken, when a write
# completes (unless it stays 0) and during an outage; not per record, as a Gauge.set costs more
# than a tenth of what a record costs.
GAUGE_QUIET = 64
RETRY_SECONDS = 1.0
BATCH_SYNC_SECONDS = 1.0

_T = TypeVar("_T")


class AuditUnavailable(Exception):
    """The record could not be made durable (sink failing, backlog full or trail closed)."""


class Durability(enum.Enum):
    STRICT = "strict"
    BATCH = "batch"


class OnFailure(enum.Enum):
    BLOCK = "block"
    ALLOW = "allow"


@dataclass(frozen=True)
class AuditSettings:
    """The ``audit:`` section of pgveil.yaml (SPEC §3), paths already resolved."""

    file: Path | None = None
    postgres_dsn: str | None = None
    postgres_table: str = "pgveil.audit"
    signing_key: Path | None = None
    durability: str = "strict"  # strict | batch
    on_failure: str = "block"  # block | allow
    redact_literals: bool = True
    all: bool = False
    checkpoint_every: int = 1000
    checkpoint_seconds: float = 10.0
    rotate_bytes: int = 100 * 1024 * 1024
    keep_files: int = 0  # rotated files kept; 0 = keep all
    max_backlog: int = 100_000  # records held in memory while a sink is failing
    # strict durability releases a result once its record is written to the file (it then
    # survives a crash of pgveil); fsync: True also waits for the disk (survives a crash of the
    # host) at a throughput cost. Without it the file is fsynced within BATCH_SYNC_SECONDS.
    fsync: bool = False

    def __post_init__(self) -> None:
        Durability(self.durability)
        OnFailure(self.on_failure)
        if self.checkpoint_every < 1:
            raise ValueError("audit.checkpoint_every must be >= 1")
        if not self.checkpoint_seconds > 0:
            raise ValueError("audit.checkpoint_seconds must be > 0")
        if self.rotate_bytes < 1 or self.keep_files < 0 or self.max_backlog < 1:
            raise ValueError("audit.rotate_bytes/keep_files/max_backlog out of range")


class _Inc(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class AuditMetrics(Protocol):
    """The three audit metrics (prometheus_client Counter/Counter/Gauge fit)."""

    @property
    def records(self) -> _Inc:
        """pgveil_audit_records_total: statement records durably written (not checkpoints)."""

    @property
    def failures(self) -> _Inc:
        """pgveil_audit_failures_total: records not durable in time, or dropped."""

    @property
    def queue(self) -> _Gauge:
        """pgveil_audit_queue: records queued or being written."""


# ---------------------------------------------------------------------------------------------
# The record format (shared with proxy.audit_verify).


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes that are hashed and written: sorted keys, compact, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``record`` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(record: dict[str, Any]) -> bytes:
    """Set ``record["hash"]`` and return the line to write.

    The line is the canonical JSON of the record without ``hash``, with ``"hash":"…"`` appended
    as the last member: the hash covers exactly the bytes before it, one JSON encoding per
    record (this is the writer's hot path), and ``audit verify`` can demand that every line is
    byte-for-byte what :func:`seal` would produce.
    """
    record.pop("hash", None)
    body = canonical(record)
    digest = hashlib.sha256(body).hexdigest()
    record["hash"] = digest
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


def checkpoint_message(record: Mapping[str, Any]) -> bytes:
    """The bytes a checkpoint's Ed25519 signature covers (everything but ``sig`` and ``hash``)."""
    body = {k: v for k, v in record.items() if k not in ("sig", "hash")}
    return SIG_DOMAIN + canonical(body)


def normalize(value: Any) -> Any:
    """Make a field value JSON-stable: lists for tuples/sets, finite floats, valid UTF-8.

    The hash is over the canonical JSON, so what we store must survive a JSON (and jsonb)
    round trip unchanged: NaN/inf become null, sets become sorted lists, enums their value.
    """
    kind = type(value)
    if kind is str:
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a lenient decoder
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if value is None or kind is bool or kind is int:
        return value
    if kind is list or kind is tuple:
        return [normalize(v) for v in value]
    if kind is float:
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return normalize(value.value)
    if isinstance(value, (bool, int)):
        return bool(value) if isinstance(value, bool) else int(value)
    if isinstance(value, str):
        return normalize(str.__str__(value))
    if isinstance(value, float):
        return normalize(float(value))
    if isinstance(value, Mapping):
        return {normalize(str(k)): normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((normalize(v) for v in value), key=lambda v: canonical({"v": v}))
    if isinstance(value, datetime):
        return format_ts(value)
    if isinstance(value, bytes):
        return value.hex()
    return normalize(str(value))


# ---------------------------------------------------------------------------------------------
# The fast path for statement records.
#
# A statement record is encoded without json.dumps: record() encodes each field value with the
# same string encoder json.dumps uses (ensure_ascii=False), from caches for the strings and
# lists of strings that repeat from statement to statement (identity, statement text, tables,
# reasons), and the writer splices those encodings and its own seq/ts/prev into a template
# prepared once per key set, with the keys already in sorted order and the chain id and the
# missing fields' nulls baked in. The result is byte-identical to canonical() (the fuzz test in
# tests/proxy/test_audit_encoding.py compares the two). Anything unusual -- other value types,
# nested lists, NaN/inf, lone surrogates, non-str keys -- takes the json.dumps path (``_Slow``).

_encode_str = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses
_int_repr = int.__repr__
_float_repr = float.__repr__
_isfinite = math.isfinite
_CACHE_ENTRIES = 4096  # per cache; cleared when full (cheap, and refilled by the next records)
_CACHE_CHARS = 4096  # longer values are encoded every time
_STR_CACHE: dict[str, str] = {}
_LIST_CACHE: dict[tuple[str, ...], str] = {}
_PLANS_MAX = 256


class _Slow(Exception):
    """A value the fast encoder leaves to normalize() + json.dumps."""


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a lenient decoder
        return False
    return True


def _str_miss(value: str) -> str:
    if not value.isascii() and not _utf8(value):
        raise _Slow  # normalize() rewrites lone surrogates
    encoded = _encode_str(value)
    if len(value) <= _CACHE_CHARS:
        if len(_STR_CACHE) >= _CACHE_ENTRIES:
            _STR_CACHE.clear()
        _STR_CACHE[value] = encoded
    return encoded


def _list_miss(value: list[Any]) -> str:
    key = tuple(value)
    parts = []
    for v in value:
        if type(v) is not str:
            raise _Slow
        e = _STR_CACHE.get(v)
        parts.append(e if e is not None else _str_miss(v))
    encoded = "[" + ",".join(parts) + "]"
    if len(encoded) <= _CACHE_CHARS:
        if len(_LIST_CACHE) >= _CACHE_ENTRIES:
            _LIST_CACHE.clear()
        _LIST_CACHE[key] = encoded
    return encoded


def _encode_values(values: Iterable[Any]) -> list[str]:
    """The canonical JSON of each value; raises _Slow (or TypeError/ValueError) otherwise.

    The list cache is keyed by the tuple of the list's items and holds only lists of ``str``:
    a tuple with any other item (``1`` == ``True`` == ``1.0``) can never equal one of its keys.
    """
    out: list[str] = []
    app = out.append
    strs, lists = _STR_CACHE, _LIST_CACHE
    for v in values:
        t = type(v)
        if t is str:
            e = strs.get(v)
            app(e if e is not None else _str_miss(v))
        elif v is None:
            app("null")
        elif t is list:
            e = lists.get(tuple(v))
            app(e if e is not None else _list_miss(v))
        elif t is int:
            app(_int_repr(v))
        elif t is float:
            if not _isfinite(v):
                raise _Slow
            app(_float_repr(v))
        elif t is bool:
            app("true" if v else "false")
        else:
            raise _Slow
    return out


def _plan(keys: tuple[str, ...], chain_id: str
          ) -> tuple[list[str], Callable[[list[str]], tuple[str, ...]], list[int]]:
    """The canonical line of a statement record with these keys, as a template.

    Returns (template, getter, slots): ``template`` alternates constant text and slots (the
    odd positions); ``getter`` picks the slot values, in sorted key order, from the list of
    the fields' encodings (in the fields' order) followed by seq, ts and prev; ``slots`` are
    the positions it picks. The chain id and the nulls of absent RECORD_FIELDS are constant
    text.
    """
    n = len(keys)
    position = {k: i for i, k in enumerate(keys)}
    position.update(seq=n, ts=n + 1, prev=n + 2)
    names = sorted(set(RECORD_FIELDS).union(keys, ("seq", "ts", "chain", "prev")))
    template: list[str] = []
    slots: list[int] = []
    text = "{"
    for i, name in enumerate(names):
        text += ("," if i else "") + _encode_str(name) + ":"
        if name == "chain":
            text += _encode_str(chain_id)
        elif name in position:
            quote = '"' if name in ("ts", "prev") else ""  # ours: never need escaping
            template += (text + quote, "")
            slots.append(position[name])
            text = quote
        else:
            text += "null"
    template.append(text + "}")
    return template, itemgetter(*slots), slots  # >= 3 slots: the getter returns a tuple


# The fields of a RecordForm's record that vary per statement, in the canonical (sorted) order
# the form's pieces alternate with; seq, ts and prev are the writer's.
_FORM_VARYING = ("duration_ms", "prev", "rows", "seq", "ts")


class RecordForm:
    """A statement record with every field fixed except ``rows`` and ``duration_ms`` (and the
    writer's ``seq``, ``ts`` and ``prev``): the encoded text around those five values,
    ``pieces[0] duration pieces[1] prev pieces[2] rows pieces[3] seq pieces[4] ts pieces[5]``.

    Statements of one prepared statement or one cached shape share their identity, statement
    text (redacted), tables, columns, decision and reasons; encoding those once per shape
    instead of once per record is what keeps the audit record of a repeated lookup cheap. The
    bytes are exactly the canonical JSON the dict path produces (tested)."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: tuple[str, ...]):
        self.pieces = pieces


def _record_form(fields: Mapping[Any, Any], chain_id: str) -> RecordForm | None:
    """The form of records with these fields plus ``rows`` and ``duration_ms``; None when a
    value needs the json.dumps path."""
    if type(fields) is not dict or "rows" in fields or "duration_ms" in fields:
        return None
    keys = (*fields, "rows", "duration_ms")
    if not all(type(k) is str and (k.isascii() or _utf8(k)) for k in keys):
        return None
    try:
        encs = _encode_values(fields.values())
    except (_Slow, TypeError, ValueError):
        return None
    template, _getter, slots = _plan(keys, chain_id)
    n = len(fields)
    varying = {n: "rows", n + 1: "duration_ms", n + 2: "seq", n + 3: "ts", n + 4: "prev"}
    pieces: list[str] = []
    order: list[str] = []
    text = template[0]
    for i, position in enumerate(slots):
        name = varying.get(position)
        if name is None:
            text += encs[position] + template[2 * i + 2]
        else:
            pieces.append(text)
            order.append(name)
            text = template[2 * i + 2]
    pieces.append(text)
    if tuple(order) != _FORM_VARYING:  # pragma: no cover - sorted key names guarantee it
        return None
    return RecordForm(tuple(pieces))


# The queue holds (encs, plan, ts, future, body) tuples: a fast-path record has its fields'
# encodings and plan (body None), a form record the encodings of its duration_ms and rows and
# its RecordForm as plan, a json.dumps-path one its normalized body (encs None); ts is
# in µs since the epoch (UTC wall clock). The pending list holds (record, line, future,
# checkpoint) tuples; ``record`` is the full record for checkpoints and json.dumps-path records
# and, for fast-path records, only what the PostgreSQL sink reads (chain, seq, ts, hash) -- or
# None without that sink. A future failed meanwhile stays in its tuple: whoever resolves a
# future checks done() first.
_Item = tuple[Any, ...]
_Chained = tuple[Any, ...]


class _Wake:
    """The writer's wake-up flag: an asyncio.Event without a task per timed wait."""

    __slots__ = ("_flag", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    async def wait(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        """Return when set, or after ``timeout`` seconds (None: no limit)."""
        if self._flag:
            return
        w = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _settle, w) if timeout is not None else None
        try:
            await w
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _now_us() -> int:
    """The wall clock (UTC) in whole microseconds: the resolution of ``ts``."""
    return time.time_ns() // 1000


@dataclass
class _CheckpointRequest:
    reasons: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, reason: str, **extra: Any) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.extra.update(extra)


_SINK_ERRORS: tuple[type[BaseException], ...] = (OSError, AuditSinkError, asyncio.TimeoutError,
                                                  ConnectionError)
try:  # asyncpg is a dependency; keep the module importable without it for the verifier
    import asyncpg as _asyncpg

    _SINK_ERRORS += (_asyncpg.PostgresError, _asyncpg.InterfaceError)
except ImportError:  # pragma: no cover
    pass


class AuditTrail:
    """One worker's audit chain: queue, writer task, sinks. See the module docstring."""

    def __init__(self, settings: AuditSettings, *, chain_id: str,
                 metrics: AuditMetrics | None = None) -> None:
        if not chain_id or any(c in chain_id for c in "\n\r\0") or not _utf8(chain_id):
            raise ValueError("audit chain id must be a non-empty single-line UTF-8 string")
        if settings.file is None and settings.postgres_dsn is None:
            raise ValueError("audit needs a file or a postgres sink")
        self.settings = settings
        self.chain_id = chain_id
        self._metrics = metrics
        self._strict = Durability(settings.durability) is Durability.STRICT
        self._key = load_private_key(settings.signing_key) if settings.signing_key else None
        self._key_id = key_fingerprint(self._key) if self._key is not None else None
        self._file = (FileSink(settings.file, rotate_bytes=settings.rotate_bytes,
                               keep_files=settings.keep_files)
                      if settings.file is not None else None)
        self._pg = (PostgresSink(settings.postgres_dsn, settings.postgres_table)
                    if settings.postgres_dsn else None)
        self._queue: deque[_Item] = deque()
        self._pending: list[_Chained] = []
        self._written: dict[str, int] = {}  # sink name -> pending records it already has
        self._seq = 0
        self._head = GENESIS
        self._since_cp = 0
        self._last_cp_ts: int | None = None  # µs, like the queued records' ts
        self._plans: dict[tuple[Any, ...], tuple[Any, ...] | None] = {}
        self._gauge_value: int | None = None  # what the queue gauge was last set to
        self._ts_sec = -1  # the second _ts_prefix formats
        self._ts_prefix = ""
        self._initialized = False
        self._cp_request = _CheckpointRequest()
        self._lost = 0
        self._available = True
        self._failing_since: float | None = None
        self._last_error = ""
        self._closing = False
        self._final_emitted = False
        self._closed = False
        self._close_deadline = math.inf
        self._wake = _Wake()
        self._close_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._unsynced_since: float | None = None
        self._flush_soon = False  # an inline write is scheduled (see _schedule)
        self._timer_armed = False  # the writer task waits with a timeout
        self._io_busy = 0  # calls running in the I/O thread

    # -- public API ---------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the sink is failing (the session then blocks protected statements)."""
        return self._available

    @property
    def last_error(self) -> str:
        return self._last_error

    async def start(self) -> None:
        """Open the sinks, resume the chain and start the writer.

        An unusable sink does not make this raise: the trail starts unavailable and keeps
        retrying (the proxy can come up and block until the disk or database is back). A bad
        signing key raises already in ``__init__``.
        """
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgveil-audit")
        if not await self._initialize():
            self._set_failing("start", self._last_error)
        self._task = self._loop.create_task(self._run(), name=f"pgveil-audit-{self.chain_id}")

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued plus a final checkpoint, then close the sinks."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._closing = True
        self._close_deadline = loop.time() + timeout
        self._wake.set()
        self._close_event.set()
        try:
            if self._task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._task), timeout + 2 * RETRY_SECONDS)
                except asyncio.TimeoutError:
                    self._task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._task
        finally:
            self._closed = True
            self._fail_all(AuditUnavailable("audit trail closed"))
            if self._pg is not None:
                await self._pg.close()
            if self._file is not None:
                if self._executor is not None:
                    # behind any write still running in the I/O thread: never close its fd
                    # under it (the number could be reused by another file meanwhile)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._io(self._file.close), 5.0)
                else:
                    self._file.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    def record(self, fields: Mapping[Any, Any]) -> asyncio.Future[None]:
        """Queue one statement's record; the future resolves when it is durable.

        ``fields``: session, operator, role, client, application, database, kind, statement
        (already redacted), tables, columns, decision, reasons, grant, rows, duration_ms, error
        (missing ones are stored as null; extra keys are kept). Must be called on the event
        loop's thread.
        """
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        item: _Item | None = None
        if type(fields) is dict:  # the fast path (see _encode_values)
            keys = tuple(fields)
            plan = self._plans.get(keys, False)
            if plan is False:
                plan = self._plan(keys)
            if plan is not None:
                if fields.get("kind") == CHECKPOINT:
                    raise ValueError("audit kind 'checkpoint' is reserved")
                try:
                    item = (_encode_values(fields.values()), plan, _now_us(), fut, None)
                except (_Slow, TypeError, ValueError):
                    pass
        if item is None:
            item = (None, None, _now_us(), fut, self._body(fields))
        return self._admit(item, fut)

    def prepare(self, fields: Mapping[Any, Any]) -> RecordForm | None:
        """The :class:`RecordForm` of statement records with these fields (as for
        :meth:`record`, without ``rows`` and ``duration_ms``), for :meth:`record_form`; None
        when these fields need the general path."""
        bad = RESERVED.intersection(fields)
        if bad:
            raise ValueError(f"audit fields may not set {sorted(bad)}")
        if fields.get("kind") == CHECKPOINT:
            raise ValueError("audit kind 'checkpoint' is reserved")
        return _record_form(fields, self.chain_id)

    def record_form(self, form: RecordForm, rows: int, duration_ms: float,
                    completion: Any = None) -> Any:
        """:meth:`record` of ``form``'s fields with these ``rows`` and ``duration_ms`` (an
        int and a finite float), without encoding the fixed fields again. ``completion``:
        resolved instead of a new future -- anything with a Future's ``done``,
        ``set_result``, ``set_exception`` and ``exception``, called on the loop's thread
        (it is returned)."""
        if completion is None:
            loop = self._loop or asyncio.get_running_loop()
            completion = loop.create_future()
        return self._admit(((_float_repr(duration_ms), _int_repr(rows)), form, _now_us(),
                            completion, None), completion)

    def _admit(self, item: _Item, fut: asyncio.Future[None]) -> asyncio.Future[None]:
        """Queue a record (or fail its future) according to durability and availability."""
        if (self._available and self._strict and not self._closed and not self._final_emitted
                and len(self._queue) + len(self._pending) < self.settings.max_backlog):
            self._queue.append(item)  # the writer sets the gauge when it takes the group
            self._schedule()
            return fut
        if self._closed or self._final_emitted:
            self._fail(fut, "audit trail closed")
            return fut
        if len(self._queue) + len(self._pending) >= self.settings.max_backlog:
            self._lost += 1
            self._fail(fut, f"audit backlog full ({self.settings.max_backlog} records)")
            return fut
        if not self._available:
            self._fail(fut, f"audit sink unavailable: {self._last_error}")
            self._queue.append(item)
            self._gauge()  # the writer is pausing: keep the gauge current meanwhile
        else:  # batch durability: resolved at once
            fut.set_result(None)
            self._queue.append(item)
            self._schedule()
            return fut
        self._wake.set()
        return fut

    # -- the inline writer ----------------------------------------------------------------------
    # With only a file sink and no fsync per group, writing a group is one write() that does
    # not block: it is done in a callback on the event loop right after the I/O callbacks that
    # queued the records (call_soon), not by waking the writer task, which would cost a task
    # step per group (much more than the write). The task still does everything else: start,
    # retries and failures, the timed checkpoints and fsyncs, PostgreSQL sinks, closing.
    def _inline_ready(self) -> bool:
        return (self._initialized and self._available and not self._closing
                and self._pg is None and self._file is not None and not self._io_busy
                and not (self._strict and self.settings.fsync))

    def _schedule(self) -> None:
        """Have what is queued written soon: inline when possible, else by the task.

        Inline, the group is written :data:`FLUSH_PASSES` passes of the event loop later, not
        on the next one: under load each pass delivers only a few results, and the ones that
        arrive during the extra passes join the group, which shares the per-group costs (the
        file lock, the write, the callbacks) among more records -- measured with 8 pgbench
        clients: 8 to 13 µs less CPU per masked lookup than with one pass, the same with five.
        When the loop is idle the extra passes cost microseconds: a loop with callbacks ready
        polls for I/O without waiting.
        """
        if self._flush_soon:
            return
        if self._inline_ready():
            self._flush_soon = True
            assert self._loop is not None
            self._loop.call_soon(self._flush_pass, FLUSH_PASSES - 1)
        else:
            self._wake.set()

    def _flush_pass(self, passes_left: int) -> None:
        if passes_left > 0:
            assert self._loop is not None
            self._loop.call_soon(self._flush_pass, passes_left - 1)
        else:
            self._flush_inline()

    def _flush_inline(self) -> None:
        self._flush_soon = False
        if not self._queue:
            return
        if not self._inline_ready():
            self._wake.set()
            return
        try:
            self._form(_now_us())
            if self._pending and not self._flush_file():
                self._wake.set()  # failing: the task retries
                return
        except Exception as exc:  # noqa: BLE001 - as in _run: a bug must block, not hang
            log.exception("audit writer error")
            self._set_failing("writer", _describe(exc))
            self._wake.set()
            return
        if not self._timer_armed:  # the task must start timing the checkpoint and fsync
            self._wake.set()

    def _flush_file(self) -> bool:
        """:meth:`_flush` with only the file sink and no fsync per group, synchronously."""
        total = len(self._pending)
        sink = self._file
        assert sink is not None
        if self._written.get(sink.name, 0) < total:
            data = b"".join([c[1] for c in self._pending[self._written.get(sink.name, 0):total]])
            try:
                result = sink.write(data, sync=False)
            except Exception as exc:  # noqa: BLE001 - any sink failure blocks (fail closed)
                if not isinstance(exc, _SINK_ERRORS):
                    log.exception("audit sink %s failed unexpectedly", sink.name)
                self._set_failing(sink.name, _describe(exc))
                return False
            if result.torn is not None:
                self._ack_torn(result.torn)
            if self._unsynced_since is None:
                self._unsynced_since = time.monotonic()
            self._written[sink.name] = total
        self._resolve(total)
        return True

    # -- building records ---------------------------------------------------------------------
    def _plan(self, keys: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The template for records with these keys (None: use the json.dumps path)."""
        bad = RESERVED.intersection(keys)
        if bad:
            raise ValueError(f"audit fields may not set {sorted(bad)}")
        plan = (_plan(keys, self.chain_id)[:2]
                if all(type(k) is str and (k.isascii() or _utf8(k)) for k in keys) else None)
        if len(self._plans) >= _PLANS_MAX:
            self._plans.clear()
        self._plans[keys] = plan
        return plan

    def _ts_text(self, us: int) -> str:
        """:func:`format_ts` of a µs timestamp, formatting the date and time once a second."""
        sec, frac = divmod(us, 1_000_000)
        if sec != self._ts_sec:
            t = time.gmtime(sec)
            self._ts_prefix = "%04d-%02d-%02dT%02d:%02d:%02d." % (  # noqa: UP031
                t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
            self._ts_sec = sec
        return "%s%06dZ" % (self._ts_prefix, frac)  # noqa: UP031

    def _body(self, fields: Mapping[Any, Any]) -> dict[str, Any]:
        bad = RESERVED.intersection(fields)
        if bad:
            raise ValueError(f"audit fields may not set {sorted(bad)}")
        if fields.get("kind") == CHECKPOINT:
            raise ValueError("audit kind 'checkpoint' is reserved")
        body: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
        for k, v in fields.items():  # inline fast path: this runs once per statement
            t = type(v)
            if (t is str and v.isascii()) or v is None or t is int or t is bool:
                body[k if type(k) is str and k.isascii() else normalize(str(k))] = v
            else:
                body[k if type(k) is str and k.isascii() else normalize(str(k))] = normalize(v)
        return body

    def _append(self, body: dict[str, Any], ts: int, future: asyncio.Future[None] | None,
                checkpoint: bool) -> None:
        rec: dict[str, Any] = {**body, "seq": self._seq, "ts": self._ts_text(ts),
                               "chain": self.chain_id, "prev": self._head}
        if checkpoint and self._key is not None:
            rec["sig"] = base64.b64encode(self._key.sign(checkpoint_message(rec))).decode()
        line = seal(rec)
        self._pending.append((rec, line, future, checkpoint))
        self._seq += 1
        self._head = rec["hash"]

    def _checkpoint(self, now: int, reason: str, **extra: Any) -> None:
        # after a restart the records since the last checkpoint are not known: count null
        count = None if reason.startswith("resume") else self._since_cp
        body: dict[str, Any] = {"kind": CHECKPOINT, "reason": reason, "head": self._head,
                                "count": count, "every": self.settings.checkpoint_every,
                                "seconds": float(self.settings.checkpoint_seconds),
                                "key": self._key_id, "sig": None}
        body.update(normalize(extra))
        self._append(body, now, None, checkpoint=True)
        self._since_cp = 0
        self._last_cp_ts = now

    def _cp_due(self, now: int) -> bool:
        if self._last_cp_ts is None:
            return True
        # the same arithmetic as timedelta.total_seconds() on the µs timestamps
        return (now - self._last_cp_ts) / 10**6 >= self.settings.checkpoint_seconds

    def _form(self, now: int) -> None:
        """Chain what is queued, with the checkpoints the invariant requires (module doc)."""
        req = self._cp_request
        if self._lost:
            req.add("lost", lost=self._lost + req.extra.get("lost", 0))
            self._lost = 0
        if self._file is not None and self._file.needs_rotation() and not self._pending:
            req.add("rotate")
        if req.reasons:
            extra = dict(req.extra)
            self._cp_request = _CheckpointRequest()
            self._checkpoint(now, ",".join(req.reasons), **extra)
        queue = self._queue
        if queue:
            every = self.settings.checkpoint_every
            due = self._cp_due(now)  # false after any checkpoint stamped ``now``
            limit, pending = self.settings.max_backlog, self._pending
            popleft, append, sha256 = queue.popleft, pending.append, hashlib.sha256
            chain_id, ts_text, with_record = self.chain_id, self._ts_text, self._pg is not None
            for _ in range(min(len(queue), GROUP_MAX)):
                if len(pending) >= limit:
                    break
                encs, plan, ts, fut, body = popleft()
                if self._since_cp >= every:
                    self._checkpoint(now, "count")
                    due = False
                elif due:
                    self._checkpoint(now, "interval")
                    due = False
                try:
                    if encs is None:
                        self._append(body, ts, fut, checkpoint=False)
                    else:
                        seq, prev, ts = self._seq, self._head, ts_text(ts)
                        if type(plan) is RecordForm:  # encs: (duration_ms, rows) encoded
                            p = plan.pieces
                            data = "".join((p[0], encs[0], p[1], prev, p[2], encs[1], p[3],
                                            _int_repr(seq), p[4], ts, p[5])).encode()
                        else:  # fill the plan's template (see _plan)
                            encs += (_int_repr(seq), ts, prev)
                            template, getter = plan
                            out = template[:]
                            out[1::2] = getter(encs)
                            data = "".join(out).encode()
                        digest = sha256(data).hexdigest()
                        rec = {"chain": chain_id, "seq": seq, "ts": ts, "hash": digest} \
                            if with_record else None
                        line = data[:-1] + b',"hash":"' + digest.encode() + b'"}\n'
                        append((rec, line, fut, False))
                        self._seq = seq + 1
                        self._head = digest
                except Exception:  # noqa: BLE001 - e.g. an int json refuses: never wedge
                    log.exception("audit record cannot be encoded; dropped, declared lost")
                    self._lost += 1  # the next checkpoint declares it
                    if fut is not None:
                        self._fail(fut, "audit record cannot be encoded")
                    continue
                self._since_cp += 1
        if self._since_cp and self._cp_due(now):
            self._checkpoint(now, "interval")
        if self._closing and not self._queue and not self._final_emitted:
            self._checkpoint(now, "close", final=True)
            self._final_emitted = True

    # -- the writer ---------------------------------------------------------------------------
    async def _io(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn`` in the I/O thread; meanwhile nothing is written inline (the sink is busy)."""
        assert self._loop is not None
        self._io_busy += 1
        try:
            return await self._loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        finally:
            self._io_busy -= 1

    async def _initialize(self) -> bool:
        """Open the sinks and find where this chain left off; False (retry) on I/O errors."""
        try:
            last: dict[str, Any] | None = None
            torn: TornTail | None = None
            if self._file is not None:
                await self._io(self._file.open)
                torn = await self._io(self._file.repair_tail)
                line = await self._io(self._file.find_last, self.chain_id,
                                      lambda raw: self._resumable(raw) is not None)
                last = self._resumable(line) if line else None
            if self._pg is not None:
                await self._pg.open()
                other = self._resumable(await self._pg.find_last(self.chain_id))
                if other is not None and (last is None or other["seq"] > last["seq"]):
                    last = other
        except Exception as exc:  # noqa: BLE001 - retried; unexpected ones are logged in full
            if not isinstance(exc, _SINK_ERRORS):
                log.exception("audit start failed unexpectedly")
            self._last_error = _describe(exc)
            return False
        if last is not None:
            self._seq, self._head = last["seq"] + 1, last["hash"]
            self._cp_request.add("resume")
        else:
            self._cp_request.add("start")
        if torn is not None:
            self._ack_torn(torn)
        self._initialized = True
        return True

    def _resumable(self, text: str | bytes | None) -> dict[str, Any] | None:
        """The record to continue from, if it is intact and ours (else keep looking back)."""
        if not text:
            return None
        try:
            rec = json.loads(text)
        except ValueError:
            return None
        if (isinstance(rec, dict) and rec.get("chain") == self.chain_id
                and isinstance(rec.get("seq"), int) and rec.get("hash") == record_hash(rec)):
            return rec
        return None

    def _ack_torn(self, torn: TornTail) -> None:
        acks = list(self._cp_request.extra.get("torn", []))
        acks.append({"sha256": torn.sha256, "bytes": torn.length, "file": torn.file})
        self._cp_request.add("torn", torn=acks)
        log.warning("audit file %s ended in a torn line of %d bytes (crash or full disk); "
                    "terminated it and acknowledged it in a checkpoint", torn.file, torn.length)

    async def _run(self) -> None:
        """The writer loop; an unexpected error is treated like a failing sink (fail closed)."""
        while True:
            try:
                if await self._step():
                    return
            except Exception as exc:  # noqa: BLE001 - a bug must block, not hang sessions
                log.exception("audit writer error")
                self._set_failing("writer", _describe(exc))
                if self._closing and self._past_deadline():
                    return
                await self._pause()

    def _past_deadline(self) -> bool:
        assert self._loop is not None
        return self._loop.time() >= self._close_deadline

    async def _step(self) -> bool:
        """One round: initialise if needed, chain the queue, write, wait. True = finished."""
        self._wake.clear()
        if not self._initialized:
            if self._closing and self._past_deadline():
                return True
            if not await self._initialize():
                self._set_failing("start", self._last_error)
                await self._pause()
                return False
        self._form(_now_us())
        if len(self._pending) > GAUGE_QUIET:  # a backlog: show it while it is written
            self._gauge()
        if self._pending and not await self._flush():
            if self._closing and self._past_deadline():
                return True
            await self._pause()
            return False
        if self._unsynced_since is not None and (
                self._closing or time.monotonic() - self._unsynced_since >= BATCH_SYNC_SECONDS):
            await self._sync()
        if self._closing and self._final_emitted and not self._queue and not self._pending:
            return True
        if self._wake.is_set() or self._cp_request.reasons or self._queue:
            return False
        assert self._loop is not None
        timeout = self._next_timeout()
        self._timer_armed = timeout is not None
        await self._wake.wait(self._loop, timeout)
        self._timer_armed = False
        return False

    def _next_timeout(self) -> float | None:
        waits: list[float] = []
        if self._since_cp and self._last_cp_ts is not None:
            age = (_now_us() - self._last_cp_ts) / 10**6
            waits.append(max(0.0, self.settings.checkpoint_seconds - age) + 0.001)
        if self._unsynced_since is not None:
            waits.append(max(0.0, BATCH_SYNC_SECONDS - (time.monotonic()
                                                       - self._unsynced_since)))
        return min(waits) if waits else None

    async def _pause(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._close_event.wait(), RETRY_SECONDS)
        if self._closing:  # retry at most once a second while closing too
            await asyncio.sleep(min(RETRY_SECONDS, 0.2))

    async def _flush(self) -> bool:
        """Write the pending records to every sink that lacks them; resolve on full success."""
        total = len(self._pending)
        sinks: list[FileSink | PostgresSink] = [s for s in (self._file, self._pg) if s is not None]
        for sink in sinks:
            start = self._written.get(sink.name, 0)
            if start >= total:
                continue
            chunk = self._pending[start:total]
            try:
                if isinstance(sink, FileSink):
                    data = b"".join([c[1] for c in chunk])
                    sync = self._strict and self.settings.fsync
                    if sync:  # the fsync may block: off the event loop
                        result = await self._io(sink.write, data, sync=True)
                    else:  # an append to the page cache: cheaper inline than a thread hop
                        result = sink.write(data, sync=False)
                    if result.torn is not None:
                        self._ack_torn(result.torn)
                    if not sync and self._unsynced_since is None:
                        self._unsynced_since = time.monotonic()
                else:
                    await sink.write([c[0] for c in chunk], [c[1] for c in chunk])
            except Exception as exc:  # noqa: BLE001 - any sink failure blocks (fail closed)
                if not isinstance(exc, _SINK_ERRORS):
                    log.exception("audit sink %s failed unexpectedly", sink.name)
                self._set_failing(sink.name, _describe(exc))
                return False
            self._written[sink.name] = total
        self._resolve(total)
        return True

    def _resolve(self, total: int) -> None:
        """The first ``total`` pending records are in every sink: resolve their futures."""
        done = self._pending[:total]
        del self._pending[:total]
        self._written = {}
        written = 0
        for _rec, _line, fut, checkpoint in done:
            if not checkpoint:
                written += 1
            if fut is not None and not fut.done():
                fut.set_result(None)
        if self._metrics is not None and written:
            self._metrics.records.inc(written)
        self._set_available()
        if self._gauge_value != 0 or self._queue:
            self._gauge()

    async def _sync(self) -> None:
        self._unsynced_since = None
        if self._file is not None:
            try:
                await self._io(self._file.sync)
            except OSError as exc:
                log.error("audit fsync failed: %s", _describe(exc))

    # -- availability -------------------------------------------------------------------------
    def _set_failing(self, sink: str, error: str) -> None:
        secret = _dsn_password(self.settings.postgres_dsn)
        if secret:  # never log the audit database's password, whatever a driver echoes
            error = error.replace(secret, "***")
        self._last_error = f"{sink}: {error}"
        if self._available:
            self._available = False
            self._failing_since = time.monotonic()
            log.error("audit sink failing (%s); protected statements are %s until it recovers",
                      self._last_error,
                      "blocked" if self.settings.on_failure == "block" else "allowed unaudited")
        for c in self._pending:
            if c[2] is not None:
                self._fail(c[2], f"audit sink unavailable: {self._last_error}")
        for item in self._queue:
            if item[3] is not None:
                self._fail(item[3], f"audit sink unavailable: {self._last_error}")
        self._gauge()

    def _set_available(self) -> None:
        if self._available:
            return
        outage = time.monotonic() - (self._failing_since or time.monotonic())
        self._available = True
        self._failing_since = None
        log.warning("audit sink recovered after %.1f s", outage)
        self._cp_request.add("recovered", outage_seconds=round(outage, 3))
        self._wake.set()

    def _fail(self, fut: asyncio.Future[None], message: str) -> None:
        if not fut.done():
            fut.set_exception(AuditUnavailable(message))
            fut.exception()  # retrieved: callers may legitimately ignore the future
            if self._metrics is not None:
                self._metrics.failures.inc()

    def _fail_all(self, exc: AuditUnavailable) -> None:
        for c in self._pending:
            if c[2] is not None:
                self._fail(c[2], str(exc))
        for item in self._queue:
            if item[3] is not None:
                self._fail(item[3], str(exc))

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._gauge_value = len(self._queue) + len(self._pending)
            self._metrics.queue.set(self._gauge_value)


def _dsn_password(dsn: str | None) -> str | None:
    if not dsn:
        return None
    try:
        from urllib.parse import unquote, urlsplit

        password = urlsplit(dsn).password
    except ValueError:
        return None
    return unquote(password) if password else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["AuditMetrics", "AuditSettings", "AuditTrail", "AuditUnavailable", "CHECKPOINT",
           "GENESIS", "RecordForm", "canonical", "checkpoint_message", "normalize", "parse_ts", "record_hash",
           "seal"]
