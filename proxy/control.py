"""The control database: grants and shared quota counters (SPEC §2 ``pgveil grant``, §4 ``quota``).

pgveil keeps the state that every worker and every replica must agree on in PostgreSQL itself,
in schema ``pgveil`` of the ``control.dsn`` database (asyncpg). This module owns that schema and
offers the proxy a :class:`ControlStore` whose hot-path methods never await.

Schema (created and upgraded by :func:`migrate`; versioned in ``pgveil.schema_version``;
idempotent; serialised by an advisory lock so two processes starting at once are safe):

* ``pgveil.grants`` — approved, expiring exceptions: who (login), what is lifted (``lift`` jsonb:
  ``{"max_rows": 5000}``, ``{"copy": true}``, ``{"role": "manager"}`` …), until when, why, who
  approved, who revoked.
* ``pgveil.grant_events`` — the audit trail of grant changes (created / revoked, actor, db user).
* ``pgveil.quota_buckets`` — protected rows returned per ``(login, bucket)``, a bucket being a
  ``bucket_seconds``-long slice of time (epoch seconds). Processes UPSERT-add their counts; the
  sum of the buckets inside a window is the sliding-window usage. Old buckets are pruned.

Grant flow::

    pgveil grant create ──INSERT + grant_events + pg_notify('pgveil_grants', grant json)──▶ DB
    DB ──NOTIFY──▶ every ControlStore's LISTEN connection ──▶ reads that grant back from
                   pgveil.grants (anyone may NOTIFY; only the table is trusted)
                   ──▶ in-memory set (generation += 1)
                                                              └▶ on_grant_event callbacks (audit)
    timer at the earliest expires_at ──▶ drop it from memory (generation += 1, event "expired")

The in-memory grant set is what :meth:`ControlStore.grants_for` reads (a dict lookup plus an
expiry check, so a grant also stops working on time when the timer is late). On every (re)connect
the full set of active grants is reloaded, and every ``resync_interval`` it is compared with the
table, so a NOTIFY missed during an outage cannot leave a revoked grant alive for long.

Quota flow (fast path first, shared truth in the background)::

    add_rows(login, n)     ──▶ pending[login][bucket] += n                    (no await)
    quota_used(login, W)   ──▶ shared slots of (login, W) inside W
                               + flushed-but-not-yet-refreshed + pending rows  (no await)
    every flush_interval   ──▶ UPSERT pending into quota_buckets, then re-read the per-slot sums
                               of every (login, W) asked about recently (one query per window)

The shared part is kept as a coarse histogram (about 60 slots per window) rather than one total,
so it keeps sliding correctly between refreshes and while the control database is down. Counting
errs on the side of *more* rows (fail closed): a slot that overlaps the window edge counts
whole, and a batch whose flush failed is re-added even if the commit may have happened.

Grant expiry times come from the database clock (``now() + expires_in``) and are compared with
the local clock, so keep the hosts NTP-synchronised; quota buckets use the local clock.

When the control database is unreachable: ``available`` is False, grants keep the last known set
(still expiring by time; revocations made meanwhile arrive at reconnect), quotas keep counting
locally and are flushed when it is back. Only the management calls (create/list/revoke) raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import getpass
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import asyncpg

log = logging.getLogger("pgveil.control")

NOTIFY_CHANNEL = "pgveil_grants"
SCHEMA = "pgveil"
MAX_GRANT_SECONDS = 30 * 86400
MAX_REASON_CHARS = 1000  # keeps the NOTIFY payload (whole grant as JSON) far below 8000 bytes
MAX_NAME_CHARS = 63  # PostgreSQL identifiers (NAMEDATALEN - 1)
# Lifts that take no value: the role's own ``copy: deny`` / ``unbounded: deny`` / ``hours`` /
# ``quota`` stop applying to this login while the grant lasts.
LIFT_FLAGS = ("copy", "unbounded", "hours", "quota")
LIFT_KEYS = ("max_rows", "role", *LIFT_FLAGS)
_ADVISORY_KEY = "pgveil-control-migrate"
_GRANT_ID = re.compile(r"^g_[0-9a-f]{12}$")
_DURATION = re.compile(r"(\d+)([smhd])")
_DURATION_FULL = re.compile(r"(?:\d+[smhd])+")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_SLOTS_PER_WINDOW = 60
# grant ids named by notifications and not yet read back from pgveil.grants; beyond this (a
# flood of NOTIFYs) the next resync reads the table instead
_MAX_UNCONFIRMED = 1000

# Errors that mean "the control database is not reachable or the connection broke"; anything
# else is a bug and propagates.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
)


class ControlError(Exception):
    """A management call could not be done (control database unreachable, bad input)."""


class GrantEventKind(str, enum.Enum):
    CREATED = "created"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Grant:
    """One approved, expiring exception for one login.

    ``lift`` holds what is lifted: ``{"max_rows": 5000}``, ``{"role": "manager"}`` or flags
    ``{"copy": True}`` (also ``unbounded``, ``hours``, ``quota``); several keys may be combined.
    """

    id: str
    login: str
    lift: dict[str, Any] = field(hash=False)
    expires_at: datetime
    reason: str
    approver: str
    created_at: datetime
    revoked: bool = False
    created_by: str = ""
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    expires_ts: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # grants_for compares this on every statement; avoid datetime arithmetic there.
        object.__setattr__(self, "expires_ts", self.expires_at.timestamp())

    def active(self, now: float | None = None) -> bool:
        return not self.revoked and self.expires_ts > (time.time() if now is None else now)

    def to_json(self) -> dict[str, Any]:
        """The NOTIFY payload form: epoch seconds, so decoding needs no timestamp parser."""
        return {
            "id": self.id, "login": self.login, "lift": self.lift,
            "expires_at": self.expires_at.timestamp(), "reason": self.reason,
            "approver": self.approver, "created_at": self.created_at.timestamp(),
            "revoked": self.revoked, "created_by": self.created_by,
            "revoked_at": None if self.revoked_at is None else self.revoked_at.timestamp(),
            "revoked_by": self.revoked_by,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Grant:
        def ts(v: Any) -> datetime:
            return datetime.fromtimestamp(float(v), tz=timezone.utc)

        return cls(
            id=str(data["id"]), login=str(data["login"]), lift=validate_lift(data["lift"]),
            expires_at=ts(data["expires_at"]), reason=str(data["reason"]),
            approver=str(data["approver"]), created_at=ts(data["created_at"]),
            revoked=bool(data.get("revoked", False)), created_by=str(data.get("created_by", "")),
            revoked_at=None if data.get("revoked_at") is None else ts(data["revoked_at"]),
            revoked_by=data.get("revoked_by"),
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Grant:
        lift = row["lift"]
        if isinstance(lift, str):  # asyncpg returns jsonb as text unless a codec is set
            lift = json.loads(lift)
        return cls(
            id=row["id"], login=row["login"], lift=validate_lift(lift),
            expires_at=row["expires_at"], reason=row["reason"], approver=row["approver"],
            created_at=row["created_at"], revoked=row["revoked_at"] is not None,
            created_by=row["created_by"], revoked_at=row["revoked_at"],
            revoked_by=row["revoked_by"],
        )


@dataclass(frozen=True)
class GrantEvent:
    """What an ``on_grant_event`` callback receives; ``at`` is the local epoch time."""

    kind: GrantEventKind
    grant: Grant
    at: float


GrantCallback = Callable[[GrantEvent], None]


# ---------------------------------------------------------------------------- input validation


def parse_duration(text: str) -> float:
    """Seconds in a grant duration; at most 30 days.

    >>> parse_duration("2h"), parse_duration("30m"), parse_duration("1d"), parse_duration("1h30m")
    (7200.0, 1800.0, 86400.0, 5400.0)
    """
    s = re.sub(r"\s+", "", text.lower())
    if not _DURATION_FULL.fullmatch(s):
        raise ValueError(f"bad duration {text!r}: use e.g. 30m, 2h, 1d or 1h30m")
    total = sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(s))
    if total <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    if total > MAX_GRANT_SECONDS:
        raise ValueError(f"duration {text!r} is longer than the maximum of 30 days")
    return float(total)


def parse_lift(items: str | Iterable[str]) -> dict[str, Any]:
    """``max_rows=5000`` / ``copy`` / ``unbounded`` / ``hours`` / ``quota`` / ``role=NAME``.

    Several items (a list, or one comma-separated string) combine into one lift.

    >>> parse_lift("max_rows=5000"), parse_lift(["copy", "role=manager"])
    ({'max_rows': 5000}, {'copy': True, 'role': 'manager'})
    """
    parts = [items] if isinstance(items, str) else list(items)
    lift: dict[str, Any] = {}
    for part in (p.strip() for chunk in parts for p in chunk.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if key in lift:
            raise ValueError(f"lift {key!r} given twice")
        if key == "max_rows":
            if not eq or not value.strip().isdigit():
                raise ValueError("max_rows needs a positive number: max_rows=5000")
            lift[key] = int(value.strip())
        elif key == "role":
            if not eq or not value.strip():
                raise ValueError("role needs a role name: role=manager")
            lift[key] = value.strip()
        elif key in LIFT_FLAGS:
            if eq:
                raise ValueError(f"lift {key!r} takes no value")
            lift[key] = True
        else:
            raise ValueError(f"unknown lift {key!r}: use one of max_rows=N, role=NAME, "
                             + ", ".join(LIFT_FLAGS))
    return validate_lift(lift)


def validate_lift(lift: Any) -> dict[str, Any]:
    """Check a lift mapping (from the CLI, the table or a NOTIFY); fail closed on anything odd."""
    if not isinstance(lift, Mapping) or not lift:
        raise ValueError("a grant must lift something: max_rows=N, role=NAME, "
                         + ", ".join(LIFT_FLAGS))
    out: dict[str, Any] = {}
    for key, value in lift.items():
        if key == "max_rows":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError("max_rows must be a positive integer")
        elif key == "role":
            if (not isinstance(value, str) or len(value) > MAX_NAME_CHARS
                    or not _ROLE_NAME.match(value)):
                raise ValueError(f"bad role name {value!r}")
        elif key in LIFT_FLAGS:
            if value is not True:
                raise ValueError(f"lift {key!r} must be true")
        else:
            raise ValueError(f"unknown lift {key!r}")
        out[key] = value
    return out


def format_lift(lift: Mapping[str, Any]) -> str:
    """The CLI form back: ``{"max_rows": 5000, "copy": True}`` -> ``max_rows=5000,copy``."""
    return ",".join(k if v is True else f"{k}={v}" for k, v in lift.items())


def _check_text(name: str, value: str, limit: int) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{name} must not be empty")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    return value


def new_grant_id() -> str:
    """Short, unguessable, easy to paste: ``g_3f9a0c5e7b21``."""
    return "g_" + secrets.token_hex(6)


def default_actor() -> str:
    """Who runs the management call, for grant_events (the database user is recorded too)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ---------------------------------------------------------------------------- schema


# (version, description, statements). Append only; never edit an applied migration.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "grants, grant events, quota buckets", (
        """CREATE TABLE IF NOT EXISTS pgveil.grants (
            id text PRIMARY KEY,
            login text NOT NULL,
            lift jsonb NOT NULL,
            reason text NOT NULL,
            approver text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            created_by text NOT NULL DEFAULT current_user,
            expires_at timestamptz NOT NULL,
            revoked_at timestamptz,
            revoked_by text,
            CHECK (expires_at > created_at))""",
        "CREATE INDEX IF NOT EXISTS grants_active_idx ON pgveil.grants (expires_at) "
        "WHERE revoked_at IS NULL",
        "CREATE INDEX IF NOT EXISTS grants_login_idx ON pgveil.grants (login)",
        """CREATE TABLE IF NOT EXISTS pgveil.grant_events (
            seq bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            grant_id text NOT NULL,
            kind text NOT NULL CHECK (kind IN ('created', 'revoked', 'expired')),
            login text NOT NULL,
            actor text NOT NULL,
            db_user text NOT NULL DEFAULT current_user,
            detail jsonb NOT NULL DEFAULT '{}')""",
        "CREATE INDEX IF NOT EXISTS grant_events_grant_idx ON pgveil.grant_events (grant_id)",
        # fillfactor leaves room for HOT updates: the same bucket row is UPSERTed many times.
        """CREATE TABLE IF NOT EXISTS pgveil.quota_buckets (
            login text NOT NULL,
            bucket bigint NOT NULL,
            rows bigint NOT NULL,
            PRIMARY KEY (login, bucket)) WITH (fillfactor = 70)""",
        "CREATE INDEX IF NOT EXISTS quota_buckets_bucket_idx ON pgveil.quota_buckets (bucket)",
    )),
)
LATEST_VERSION = MIGRATIONS[-1][0]


async def schema_version(conn: Any) -> int:
    """The applied version (0 when the schema does not exist yet)."""
    exists = await conn.fetchval("SELECT pg_catalog.to_regclass('pgveil.schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM pgveil.schema_version"))


async def migrate(conn: Any) -> int:
    """Bring schema ``pgveil`` up to :data:`LATEST_VERSION`; return the version now applied.

    Idempotent; a transaction-level advisory lock serialises concurrent starters (the second
    waits, then finds nothing to do). ``CREATE SCHEMA IF NOT EXISTS`` can still race with other
    pgveil components creating the same schema under their own lock, so a unique violation is
    retried.
    """
    applied = await schema_version(conn)
    if applied >= LATEST_VERSION:
        return applied  # also when a newer pgveil migrated further: never downgrade
    for attempt in range(3):
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext($1))",
                                   _ADVISORY_KEY)
                await conn.execute("CREATE SCHEMA IF NOT EXISTS pgveil")
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS pgveil.schema_version (version int PRIMARY KEY, "
                    "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
                current = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) FROM pgveil.schema_version")
                for version, description, statements in MIGRATIONS:
                    if version <= current:
                        continue
                    for sql in statements:
                        await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO pgveil.schema_version (version, description) VALUES ($1, $2)",
                        version, description)
                    log.info("control schema migrated to version %d (%s)", version, description)
                return int(await conn.fetchval(
                    "SELECT max(version) FROM pgveil.schema_version"))
        except (asyncpg.UniqueViolationError, asyncpg.DuplicateObjectError,
                asyncpg.DuplicateSchemaError, asyncpg.DuplicateTableError):
            if attempt == 2:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- grant statements


async def insert_grant(conn: Any, login: str, lift: Mapping[str, Any], expires_in: float,
                       reason: str, approver: str, actor: str | None = None) -> Grant:
    """Create a grant, its ``created`` event and the NOTIFY, in one transaction.

    The expiry is computed by the database clock (``now() + expires_in``) so every process
    agrees on it regardless of where the CLI runs.
    """
    login = _check_text("login", login, MAX_NAME_CHARS)
    lift = validate_lift(dict(lift))
    reason = _check_text("reason", reason, MAX_REASON_CHARS)
    approver = _check_text("approver", approver, 200)
    actor = _check_text("actor", actor or default_actor(), 200)
    if not 0 < expires_in <= MAX_GRANT_SECONDS:
        raise ValueError("a grant must expire within 30 days")
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO pgveil.grants (id, login, lift, reason, approver, created_by, expires_at) "
            "VALUES ($1, $2, $3::jsonb, $4, $5, $6, now() + make_interval(secs => $7)) "
            "RETURNING *",
            new_grant_id(), login, json.dumps(lift), reason, approver, actor, float(expires_in))
        grant = Grant.from_row(row)
        await _record_event(conn, GrantEventKind.CREATED, grant, actor,
                            {"lift": lift, "expires_at": grant.expires_at.isoformat(),
                             "reason": reason, "approver": approver})
    return grant


async def revoke_grant_row(conn: Any, grant_id: str, actor: str | None = None,
                           reason: str | None = None) -> Grant | None:
    """Revoke an active grant; None when it does not exist, is already revoked or expired."""
    actor = _check_text("actor", actor or default_actor(), 200)
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE pgveil.grants SET revoked_at = now(), revoked_by = $2 "
            "WHERE id = $1 AND revoked_at IS NULL AND expires_at > now() RETURNING *",
            grant_id, actor)
        if row is None:
            return None
        grant = Grant.from_row(row)
        await _record_event(conn, GrantEventKind.REVOKED, grant, actor,
                            {"reason": reason} if reason else {})
    return grant


async def _record_event(conn: Any, kind: GrantEventKind, grant: Grant, actor: str,
                        detail: Mapping[str, Any]) -> None:
    """grant_events row + NOTIFY (delivered at commit, so listeners never see a rolled-back one)."""
    await conn.execute(
        "INSERT INTO pgveil.grant_events (grant_id, kind, login, actor, detail) "
        "VALUES ($1, $2, $3, $4, $5::jsonb)",
        grant.id, kind.value, grant.login, actor, json.dumps(detail, ensure_ascii=False))
    payload = json.dumps({"v": 1, "event": kind.value, "grant": grant.to_json()},
                         ensure_ascii=False, separators=(",", ":"))
    await conn.execute("SELECT pg_catalog.pg_notify($1, $2)", NOTIFY_CHANNEL, payload)


async def fetch_grants(conn: Any, include_expired: bool = False,
                       login: str | None = None) -> list[Grant]:
    """Grants, oldest first: only active ones unless ``include_expired`` (then also revoked)."""
    rows = await conn.fetch(
        "SELECT * FROM pgveil.grants WHERE ($1 OR (revoked_at IS NULL AND expires_at > now())) "
        "AND ($2::text IS NULL OR login = $2) ORDER BY created_at, id",
        include_expired, login)
    grants = []
    for row in rows:
        try:
            grants.append(Grant.from_row(row))
        except ValueError as exc:
            log.error("skipping invalid grant %s in pgveil.grants: %s", row["id"], exc)
    return grants


async def fetch_grant(conn: Any, grant_id: str) -> Grant | None:
    row = await conn.fetchrow("SELECT * FROM pgveil.grants WHERE id = $1", grant_id)
    return None if row is None else Grant.from_row(row)


# ---------------------------------------------------------------------------- the store


def _slot_width(window: float, bucket: int) -> int:
    """Histogram slot length for a window: ~60 slots, a whole number of buckets."""
    per = max(1, math.ceil(window / _SLOTS_PER_WINDOW / bucket))
    return per * bucket


class ControlStore:
    """Grants and shared quota counters for one pgveil process (see the module docstring).

    ``grants_for``, ``generation``, ``quota_used``, ``add_rows`` and ``available`` are the hot
    path: plain attribute reads, never awaiting, never raising for a database problem.
    """

    def __init__(self, dsn: str, password: str | None = None, *, flush_interval: float = 0.5,
                 bucket_seconds: int = 1, connect_timeout: float = 5.0,
                 op_timeout: float = 5.0, resync_interval: float = 30.0,
                 keepalive_interval: float = 10.0, min_retention: float = 86400.0,
                 actor: str | None = None) -> None:
        if bucket_seconds < 1:
            raise ValueError("bucket_seconds must be >= 1")
        self._dsn = dsn
        self._password = password
        self.flush_interval = flush_interval
        self.bucket_seconds = int(bucket_seconds)
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout
        self._resync_interval = resync_interval
        self._keepalive_interval = keepalive_interval
        self._min_retention = min_retention
        self._actor = actor or default_actor()
        # grants
        self._grants: dict[str, Grant] = {}
        self._by_login: dict[str, tuple[Grant, ...]] = {}
        # bumps whenever the grant set changes: a cache of per-login decisions keys on it
        # (a plain attribute: sessions read it before every statement)
        self.generation = 0
        self._callbacks: list[GrantCallback] = []
        self._seen: dict[tuple[str, GrantEventKind], float] = {}  # dedupe: (id, kind) -> expiry
        self._expiry_handle: asyncio.TimerHandle | None = None
        # quotas: login -> bucket start (epoch s) -> rows
        self._pending: dict[str, dict[int, int]] = {}
        self._unseen: dict[str, dict[int, int]] = {}  # flushed, not yet in a refresh
        self._shared: dict[tuple[str, float], tuple[int, dict[int, int]]] = {}
        self._tracked: dict[tuple[str, float], float] = {}  # (login, window) -> last asked
        self._last_prune = 0.0
        # connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: Any = None
        self._listen: Any = None
        self._listen_lost: asyncio.Event | None = None
        self._quota_lock: asyncio.Lock | None = None
        self._migrated = False
        self._listen_up = False
        self._db_ok = False
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_resync = 0.0
        self._to_confirm: dict[str, int] = {}  # grant id -> backend pid of the notification
        self._confirming = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, require: bool = True) -> None:
        """Connect, migrate, LISTEN, load the active grants, start the background tasks.

        With ``require`` (default) a first connection failure raises :class:`ControlError` (a
        wrong DSN or password should stop ``pgveil serve``); without it the store starts
        unavailable and keeps retrying, counting quotas locally meanwhile.
        """
        self._loop = asyncio.get_running_loop()
        self._listen_lost = asyncio.Event()
        self._quota_lock = asyncio.Lock()
        self._pool = await asyncpg.create_pool(
            self._dsn, password=self._password, min_size=0, max_size=3,
            timeout=self._connect_timeout, command_timeout=self._op_timeout)
        try:
            await self._ensure_migrated()
            await self._connect_listener()
        except _DB_ERRORS as exc:
            if require:
                await self.close()
                raise ControlError(f"control database unreachable: {exc}") from exc
            log.warning("control database unreachable, retrying in the background: %s", exc)
        self._spawn(self._supervise(), "pgveil-control-listen")
        self._spawn(self._ticker(), "pgveil-control-quota")

    async def close(self) -> None:
        """Stop the tasks, try one last quota flush, close the connections."""
        self._closing = True
        if self._listen_lost is not None:
            self._listen_lost.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
            self._expiry_handle = None
        if self._pending and self._pool is not None and self._db_ok:
            with contextlib.suppress(*_DB_ERRORS):
                await asyncio.wait_for(self._flush(self._pending), 2.0)
                self._pending = {}
        if self._listen is not None:
            with contextlib.suppress(*_DB_ERRORS):
                await asyncio.wait_for(self._listen.close(), 2.0)
            self._listen = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 2.0)
            except (asyncio.TimeoutError, *_DB_ERRORS):
                self._pool.terminate()
            self._pool = None
        self._listen_up = self._db_ok = False

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)  # held: an unreferenced task may be garbage-collected mid-flight
        task.add_done_callback(self._tasks.discard)

    @property
    def available(self) -> bool:
        """True while the LISTEN connection is up and the last quota sync succeeded."""
        return self._listen_up and self._db_ok

    # ------------------------------------------------------------------ grants: hot path

    def grants_for(self, login: str, now: float | None = None) -> tuple[Grant, ...]:
        """The login's active grants (in memory; expired ones are never returned)."""
        grants = self._by_login.get(login)
        if not grants:
            return ()
        t = time.time() if now is None else now
        if all(g.expires_ts > t for g in grants):
            return grants
        return tuple(g for g in grants if g.expires_ts > t)

    def on_grant_event(self, callback: GrantCallback) -> None:
        """Call ``callback(GrantEvent)`` in the event loop on every created/revoked/expired."""
        self._callbacks.append(callback)

    # ------------------------------------------------------------------ grants: management

    async def create_grant(self, login: str, lift: Mapping[str, Any], expires_in: float,
                           reason: str, approver: str) -> Grant:
        """Create a grant (raises ValueError on bad input, ControlError when unreachable)."""
        grant = await self._with_conn(lambda c: insert_grant(
            c, login, lift, expires_in, reason, approver, self._actor))
        self._apply(GrantEventKind.CREATED, grant)  # the NOTIFY echo is then deduplicated
        return grant

    async def list_grants(self, include_expired: bool = False) -> list[Grant]:
        return await self._with_conn(lambda c: fetch_grants(c, include_expired))

    async def revoke_grant(self, grant_id: str) -> bool:
        """Revoke an active grant; False when it is unknown, already revoked or expired."""
        grant = await self._with_conn(lambda c: revoke_grant_row(c, grant_id, self._actor))
        if grant is None:
            return False
        self._apply(GrantEventKind.REVOKED, grant)
        return True

    async def _with_conn(self, fn: Callable[[Any], Any]) -> Any:
        if self._pool is None:
            raise ControlError("control store is not started")
        try:
            await self._ensure_migrated()
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                return await fn(conn)
        except _DB_ERRORS as exc:
            raise ControlError(f"control database: {exc}") from exc

    # ------------------------------------------------------------------ grants: in-memory set

    def _apply(self, kind: GrantEventKind, grant: Grant, now: float | None = None) -> bool:
        """Apply one event to the in-memory set; fire callbacks once per (grant, kind)."""
        t = time.time() if now is None else now
        key = (grant.id, kind)
        if key in self._seen:
            return False
        if kind is GrantEventKind.CREATED:
            if not grant.active(t) or (grant.id, GrantEventKind.REVOKED) in self._seen:
                return False
            self._grants[grant.id] = grant
        else:
            self._grants.pop(grant.id, None)
        self._seen[key] = grant.expires_ts
        self._changed()
        self._fire(GrantEvent(kind, grant, t))
        return True

    def _changed(self) -> None:
        by_login: dict[str, list[Grant]] = {}
        for g in sorted(self._grants.values(), key=lambda g: (g.created_at, g.id)):
            by_login.setdefault(g.login, []).append(g)
        self._by_login = {k: tuple(v) for k, v in by_login.items()}
        self.generation += 1
        self._schedule_expiry()

    def _fire(self, event: GrantEvent) -> None:
        for cb in list(self._callbacks):
            try:
                cb(event)
            except Exception:  # a broken listener must not stop the others or the store
                log.exception("grant event callback failed for %s %s", event.kind.value,
                              event.grant.id)

    def _schedule_expiry(self) -> None:
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
            self._expiry_handle = None
        if not self._grants or self._loop is None or self._closing:
            return
        nxt = min(g.expires_ts for g in self._grants.values())
        delay = max(0.0, nxt - time.time()) + 0.001
        self._expiry_handle = self._loop.call_later(delay, self._expire)

    def _expire(self, now: float | None = None) -> None:
        """Timer: drop grants whose time is up (no NOTIFY needed), bump the generation."""
        self._expiry_handle = None
        t = time.time() if now is None else now
        gone = [g for g in self._grants.values() if g.expires_ts <= t]
        for g in gone:
            del self._grants[g.id]
            self._seen[(g.id, GrantEventKind.EXPIRED)] = g.expires_ts
        if gone:
            self._changed()
            for g in gone:
                self._fire(GrantEvent(GrantEventKind.EXPIRED, g, t))
        else:
            self._schedule_expiry()
        # forget dedupe entries of grants long gone
        horizon = t - 3600
        for key in [k for k, exp in self._seen.items() if exp < horizon]:
            del self._seen[key]

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        """LISTEN callback (in the loop): a hint that a grant changed, never the grant itself.

        Any login can ``NOTIFY pgveil_grants`` (it needs no privilege), so the payload only
        names the grant; what is applied is what ``pgveil.grants`` -- writable only by the
        control role -- holds under that id (:meth:`_confirm`)."""
        try:
            msg = json.loads(payload)
            grant_id = msg["grant"]["id"]
            if not isinstance(grant_id, str) or not _GRANT_ID.match(grant_id):
                raise ValueError("no grant id")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring malformed %s notification from backend %s: %s", channel, pid,
                      exc)
            self._last_resync = 0.0  # make the next tick reconcile with the table
            return
        if len(self._to_confirm) >= _MAX_UNCONFIRMED:
            self._last_resync = 0.0  # a flood: the next resync reads the whole table instead
            return
        self._to_confirm[grant_id] = pid
        if not self._confirming and self._pool is not None and not self._closing:
            self._confirming = True
            self._spawn(self._confirm(), "pgveil-control-confirm")

    async def _confirm(self) -> None:
        """Apply what ``pgveil.grants`` holds for each grant a notification named: created when
        the row is active, revoked when it is revoked or gone. A notification for a grant the
        table does not hold is someone else's NOTIFY: logged, and nothing changes."""
        try:
            while self._to_confirm and not self._closing:
                grant_id, pid = next(iter(self._to_confirm.items()))
                del self._to_confirm[grant_id]
                try:
                    grant = await self._with_conn(lambda c, gid=grant_id: fetch_grant(c, gid))
                except (ControlError, ValueError) as exc:
                    log.error("cannot confirm grant %s from the control table: %s", grant_id,
                              exc)
                    self._last_resync = 0.0
                    continue
                now = time.time()
                if grant is None:
                    if grant_id in self._grants:  # deleted by hand: revoked (fail closed)
                        self._apply(GrantEventKind.REVOKED, self._grants[grant_id], now)
                    else:
                        log.warning("ignoring a %s notification from backend %s for grant %s, "
                                    "which pgveil.grants does not hold", NOTIFY_CHANNEL, pid,
                                    grant_id)
                elif grant.revoked:
                    self._apply(GrantEventKind.REVOKED, grant, now)
                elif grant.active(now):
                    self._apply(GrantEventKind.CREATED, grant, now)
        finally:
            self._confirming = False

    async def _resync(self, conn: Any) -> None:
        """Reconcile memory with the table: grants missed while disconnected, revocations."""
        rows = await conn.fetch(
            "SELECT * FROM pgveil.grants WHERE (revoked_at IS NULL AND expires_at > now()) "
            "OR id = ANY($1::text[])", list(self._grants))
        now = time.time()
        found: dict[str, Grant] = {}
        for row in rows:
            try:
                g = Grant.from_row(row)
            except ValueError as exc:  # never honour a lift we cannot validate
                log.error("ignoring invalid grant %s in pgveil.grants: %s", row["id"], exc)
                continue
            found[g.id] = g
        for g in found.values():
            if g.revoked and g.id in self._grants:
                self._apply(GrantEventKind.REVOKED, g, now)
            elif g.active(now) and g.id not in self._grants:
                self._apply(GrantEventKind.CREATED, g, now)
        for gid in [gid for gid in self._grants if gid not in found]:
            # deleted from the table by hand: treat as revoked (fail closed)
            self._apply(GrantEventKind.REVOKED, self._grants[gid], now)
        self._last_resync = time.monotonic()

    # ------------------------------------------------------------------ connections

    async def _ensure_migrated(self) -> None:
        if self._migrated:
            return
        async with self._pool.acquire(timeout=self._connect_timeout) as conn:
            await migrate(conn)
        self._migrated = True

    async def _connect_listener(self) -> None:
        """LISTEN first, then load the grants, so no change can fall between the two."""
        assert self._listen_lost is not None
        conn = await asyncpg.connect(self._dsn, password=self._password,
                                     timeout=self._connect_timeout,
                                     command_timeout=self._op_timeout)
        try:
            self._listen_lost.clear()
            conn.add_termination_listener(self._on_listener_lost)
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            await self._resync(conn)
        except BaseException:
            conn.terminate()
            raise
        self._listen = conn
        self._listen_up = True
        self._db_ok = True
        log.info("control database connected; %d active grant(s)", len(self._grants))

    def _on_listener_lost(self, conn: Any) -> None:
        if conn is self._listen:
            self._listen_up = False
            if self._listen_lost is not None:
                self._listen_lost.set()

    async def _supervise(self) -> None:
        """Keep the LISTEN connection alive: reconnect with backoff, ping, resync."""
        backoff = 0.2
        while not self._closing:
            try:
                backoff = await self._supervise_once(backoff)
            except Exception:  # keep supervising whatever happened; the cause is logged
                log.exception("control LISTEN supervisor error")
                self._listen_up = False
                await asyncio.sleep(1.0)

    async def _supervise_once(self, backoff: float) -> float:
        """One round: (re)connect if needed, else wait for loss / ping / resync; next backoff."""
        assert self._listen_lost is not None
        if self._listen is None or self._listen.is_closed():
            self._listen_up = False
            if self._listen is not None:
                self._listen.terminate()
                self._listen = None
            try:
                await self._ensure_migrated()
                await self._connect_listener()
            except _DB_ERRORS as exc:
                log.warning("control database reconnect failed (retry in %.1fs): %s",
                            backoff, exc)
                await asyncio.sleep(backoff)
                return min(backoff * 2, 5.0)
            return 0.2
        interval = min(self._keepalive_interval, self._resync_interval)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._listen_lost.wait(), interval)
            return backoff  # lost: reconnect in the next round
        conn = self._listen
        if conn is None or conn.is_closed():
            return backoff
        try:
            if time.monotonic() - self._last_resync >= self._resync_interval:
                await self._resync(conn)
            else:
                await conn.fetchval("SELECT 1", timeout=self._op_timeout)
        except _DB_ERRORS as exc:
            log.warning("control LISTEN connection failed its check: %s", exc)
            self._listen_up = False
            conn.terminate()
        return backoff

    # ------------------------------------------------------------------ quotas: hot path

    def add_rows(self, login: str, rows: int, now: float | None = None) -> None:
        """Count protected rows returned to ``login`` (local; flushed in the background)."""
        if rows <= 0:
            return
        t = time.time() if now is None else now
        bucket = int(t // self.bucket_seconds) * self.bucket_seconds
        per = self._pending.setdefault(login, {})
        per[bucket] = per.get(bucket, 0) + rows

    def quota_used(self, login: str, window_seconds: float, now: float | None = None) -> int:
        """Rows returned to ``login`` in the last ``window_seconds`` by all processes.

        The shared part is as of the last background refresh (at most ``flush_interval`` old
        while the database is up); this process's own rows are always included at once. The
        first call for a (login, window) has no shared part yet: :meth:`refresh_quota` at
        connection start closes that gap.
        """
        t = time.time() if now is None else now
        window = float(window_seconds)
        self._tracked[(login, window)] = t
        cutoff = t - window
        total = 0
        shared = self._shared.get((login, window))
        if shared is not None:
            width, slots = shared
            for idx, rows in slots.items():
                if (idx + 1) * width > cutoff:
                    total += rows
        b = self.bucket_seconds
        for src in (self._unseen.get(login), self._pending.get(login)):
            if src:
                for bucket, rows in src.items():
                    if bucket + b > cutoff:
                        total += rows
        return total

    async def refresh_quota(self, login: str, window_seconds: float,
                            timeout: float = 1.0) -> int:
        """Fetch the shared usage of one (login, window) now (e.g. when a session starts).

        Returns :meth:`quota_used` afterwards; on timeout or a database error it returns the
        local view without raising.
        """
        window = float(window_seconds)
        self._tracked[(login, window)] = time.time()
        if self._pool is not None and self._quota_lock is not None:
            try:
                await asyncio.wait_for(self._refresh_one(login, window), timeout)
            except _DB_ERRORS as exc:
                log.debug("quota refresh for %s failed: %s", login, exc)
        return self.quota_used(login, window)

    async def _refresh_one(self, login: str, window: float) -> None:
        assert self._quota_lock is not None
        async with self._quota_lock:
            if (login, window) in self._shared:
                return  # the ticker already keeps it fresh
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                await self._refresh(conn, [(login, window)], time.time())

    # ------------------------------------------------------------------ quotas: background

    async def _ticker(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.flush_interval)
            try:
                await self._tick()
            except _DB_ERRORS as exc:
                if self._db_ok:
                    log.warning("control database: quota sync failed: %s", exc)
                self._db_ok = False
            except Exception:  # keep counting; the cause is logged
                log.exception("control quota sync error")
                self._db_ok = False
            if self._grants:
                self._expire()  # backstop for a timer that was delayed or lost

    async def _tick(self, now: float | None = None) -> None:
        """Flush pending rows, then re-read the shared usage of every tracked (login, window)."""
        assert self._quota_lock is not None
        t = time.time() if now is None else now
        async with self._quota_lock:
            self._forget_idle(t)
            if self._pool is None:
                return
            if (not self._pending and not self._tracked and not self._unseen
                    and t - self._last_prune < 60.0):
                return  # nothing to say to the database; the LISTEN ping watches the link
            await self._ensure_migrated()  # started while the database was down
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                batch, self._pending = self._pending, {}
                if batch:
                    # counted as unseen while the write is in flight: a statement gated
                    # meanwhile must not find these rows in neither place
                    _merge(self._unseen, batch)
                    try:
                        await self._flush_with(conn, batch)
                    except BaseException:
                        # Unknown outcome: re-add (over-counting is the safe side).
                        _merge(self._unseen, batch, -1)
                        _merge(self._pending, batch)
                        raise
                keys = list(self._tracked)
                await self._refresh(conn, keys, t)
                added_since = {login for login, _ in set(self._tracked) - set(keys)}
                for login in [k for k in self._unseen if k not in added_since]:
                    del self._unseen[login]
                self._db_ok = True
                if t - self._last_prune >= 60.0:
                    await self._prune(conn, t)

    async def _flush(self, batch: dict[str, dict[int, int]]) -> None:
        async with self._pool.acquire(timeout=self._connect_timeout) as conn:
            await self._flush_with(conn, batch)

    async def _flush_with(self, conn: Any, batch: dict[str, dict[int, int]]) -> None:
        """One UPSERT for the whole batch; sorted keys so concurrent flushers cannot deadlock."""
        items = sorted((login, b, n) for login, per in batch.items() for b, n in per.items())
        if not items:
            return
        await conn.execute(
            "INSERT INTO pgveil.quota_buckets AS q (login, bucket, rows) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) "
            "ON CONFLICT (login, bucket) DO UPDATE SET rows = q.rows + EXCLUDED.rows",
            [i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
            timeout=self._op_timeout)

    async def _refresh(self, conn: Any, keys: list[tuple[str, float]], now: float) -> None:
        """Per-slot sums for the keys; one query per distinct window."""
        by_window: dict[float, list[str]] = {}
        for login, window in keys:
            by_window.setdefault(window, []).append(login)
        b = self.bucket_seconds
        fresh: dict[tuple[str, float], tuple[int, dict[int, int]]] = {}
        for window, logins in by_window.items():
            width = _slot_width(window, b)
            rows = await conn.fetch(
                "SELECT login, bucket / $3 AS slot, sum(rows)::bigint AS n "
                "FROM pgveil.quota_buckets WHERE login = ANY($1::text[]) AND bucket > $2 "
                "GROUP BY 1, 2",
                logins, math.floor(now - window - b), width, timeout=self._op_timeout)
            for login in logins:
                fresh[(login, window)] = (width, {})
            for r in rows:
                fresh[(r["login"], window)][1][int(r["slot"])] = int(r["n"])
        self._shared.update(fresh)

    async def _prune(self, conn: Any, now: float) -> None:
        """Delete buckets no window can reach any more (kept at least ``min_retention``)."""
        longest = max((w for _, w in self._tracked), default=0.0)
        cutoff = math.floor(now - max(self._min_retention, 2 * longest))
        await conn.execute("DELETE FROM pgveil.quota_buckets WHERE bucket < $1", cutoff,
                           timeout=self._op_timeout)
        self._last_prune = now

    def _forget_idle(self, now: float) -> None:
        """Stop refreshing (login, window) pairs nobody asked about for a while."""
        for key, last in list(self._tracked.items()):
            if now - last > max(300.0, key[1]):
                del self._tracked[key]
                self._shared.pop(key, None)


def _merge(into: dict[str, dict[int, int]], batch: Mapping[str, Mapping[int, int]],
           sign: int = 1) -> None:
    """Add (``sign`` -1: take back) ``batch``'s rows per login and bucket."""
    for login, per in batch.items():
        dst = into.setdefault(login, {})
        for bucket, rows in per.items():
            left = dst.get(bucket, 0) + sign * rows
            if left:
                dst[bucket] = left
            else:
                dst.pop(bucket, None)
        if not dst:
            del into[login]


__all__ = [
    "ControlError", "ControlStore", "Grant", "GrantEvent", "GrantEventKind", "LATEST_VERSION",
    "LIFT_FLAGS", "MAX_GRANT_SECONDS", "MIGRATIONS", "NOTIFY_CHANNEL", "fetch_grant",
    "fetch_grants", "format_lift", "insert_grant", "migrate", "parse_duration", "parse_lift",
    "revoke_grant_row", "schema_version", "validate_lift",
]
