"""The control database: migrations, grants over LISTEN/NOTIFY, shared sliding-window quotas.

Pure tests cover the parsers and the local quota arithmetic. Live tests (the ``pg`` fixture) run
several :class:`ControlStore` instances — and, where it matters, separate OS processes — against
one private control database created for this module, and cut the connection with a TCP relay
to show that the hot path keeps working while the control database is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from proxy.control import (
    LATEST_VERSION,
    ControlError,
    ControlStore,
    Grant,
    GrantEvent,
    GrantEventKind,
    format_lift,
    migrate,
    parse_duration,
    parse_lift,
    validate_lift,
)
from proxy.localpg import PostgresCluster

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable


# ---------------------------------------------------------------------------- pure


def test_parse_duration() -> None:
    assert parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200
    assert parse_duration("1d") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("30d") == 30 * 86400
    for bad in ("", "2", "h", "2x", "-1h", "0m", "31d", "1h junk", "2 hours"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_parse_lift() -> None:
    assert parse_lift("max_rows=5000") == {"max_rows": 5000}
    assert parse_lift("copy") == {"copy": True}
    assert parse_lift("role=manager") == {"role": "manager"}
    assert parse_lift(["unbounded", "hours,quota"]) == {"unbounded": True, "hours": True,
                                                        "quota": True}
    assert format_lift(parse_lift("max_rows=10,copy")) == "max_rows=10,copy"
    for bad in ("max_rows=0", "max_rows=-5", "max_rows=x", "max_rows", "role=", "role",
                "copy=yes", "superuser", "", "copy,copy", "role=bad name;drop"):
        with pytest.raises(ValueError):
            parse_lift(bad)


def test_validate_lift_fails_closed() -> None:
    for bad in ({}, {"max_rows": True}, {"max_rows": "5"}, {"copy": 1}, {"ddl": True}, []):
        with pytest.raises(ValueError):
            validate_lift(bad)


def test_grant_json_round_trip() -> None:
    now = datetime.now(timezone.utc).replace(microsecond=123456)
    g = Grant(id="g_0123456789ab", login="teller_sz01", lift={"max_rows": 5000},
              expires_at=now, reason="月末对账", approver="王芳", created_at=now)
    back = Grant.from_json(json.loads(json.dumps(g.to_json())))
    assert back == g
    assert back.expires_ts == pytest.approx(now.timestamp())
    assert hash(back) == hash(g)  # usable in sets although lift is a dict


def test_quota_local_sliding_window() -> None:
    """Without any database: own rows count at once and leave the window on time."""
    store = ControlStore("postgresql://unused@127.0.0.1:1/x")
    t0 = 1_000_000.0
    store.add_rows("op", 10, now=t0)
    store.add_rows("op", 5, now=t0 + 3)
    store.add_rows("other", 99, now=t0)
    store.add_rows("op", 0, now=t0)
    assert store.quota_used("op", 10, now=t0 + 3) == 15
    assert store.quota_used("op", 10, now=t0 + 10.5) == 15  # a bucket overlapping the edge counts
    assert store.quota_used("op", 10, now=t0 + 11) == 5  # the first bucket slid out
    assert store.quota_used("op", 10, now=t0 + 14) == 0
    assert store.quota_used("nobody", 10, now=t0) == 0
    assert store.grants_for("op") == ()
    assert store.available is False


# ---------------------------------------------------------------------------- live helpers


@pytest.fixture(scope="module")
def control_db(pg: PostgresCluster) -> Iterator[str]:
    """A private control database for this module: superuser ``dba``'s libpq URL to it."""
    name = f"pgveil_ctl_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name}", db="postgres")
    try:
        yield pg.dsn("dba", name)
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", db="postgres")


@contextlib.asynccontextmanager
async def stores(dsn: str, n: int, **kwargs: float) -> AsyncIterator[list[ControlStore]]:
    made = [ControlStore(dsn, **kwargs) for _ in range(n)]  # type: ignore[arg-type]
    try:
        await asyncio.gather(*(s.start() for s in made))
        yield made
    finally:
        for s in made:
            await s.close()


async def wait_until(pred: Callable[[], bool], timeout: float) -> float:
    """Poll ``pred`` until true; return the seconds it took (fail the test on timeout)."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def login() -> str:
    return f"op_{uuid.uuid4().hex[:8]}"


class Relay:
    """A TCP relay to PostgreSQL that the test can cut and restore (same port)."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update((writer, uw))
        for src, dst in ((reader, uw), (ur, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()
            self.writers.discard(dst)

    def dsn(self, target_dsn: str) -> str:
        parts = urlsplit(target_dsn)
        netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{self.port}"
        return parts._replace(netloc=netloc).geturl()


# ---------------------------------------------------------------------------- live: schema


async def test_migration_idempotent_and_concurrent(pg: PostgresCluster) -> None:
    """Two stores migrating an empty database at once, then a third: one version row."""
    name = f"pgveil_mig_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name}", db="postgres")
    try:
        dsn = pg.dsn("dba", name)
        async with stores(dsn, 2):
            pass
        async with stores(dsn, 1):
            pass
        conn = await asyncpg.connect(dsn)
        try:
            assert await migrate(conn) == LATEST_VERSION
            rows = await conn.fetch("SELECT version FROM pgveil.schema_version ORDER BY 1")
            assert [r["version"] for r in rows] == list(range(1, LATEST_VERSION + 1))
            tables = {r["relname"] for r in await conn.fetch(
                "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE nspname = 'pgveil' AND relkind = 'r'")}
            assert {"schema_version", "grants", "grant_events", "quota_buckets"} <= tables
        finally:
            await conn.close()
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", db="postgres")


# ---------------------------------------------------------------------------- live: grants


async def test_grant_reaches_other_store_within_a_second(control_db: str) -> None:
    async with stores(control_db, 2) as (a, b):
        events: list[GrantEvent] = []
        b.on_grant_event(events.append)
        who, bystander = login(), login()
        gen = b.generation
        grant = await a.create_grant(who, {"max_rows": 5000}, 60, "month-end", "Wang Fang")
        assert a.grants_for(who) == (grant,)  # the creator applies it at once
        took = await wait_until(lambda: b.grants_for(who) != (), 1.0)
        assert took < 1.0
        assert b.grants_for(who)[0].lift == {"max_rows": 5000}
        assert b.grants_for(who)[0].id == grant.id
        assert b.grants_for(bystander) == ()
        assert b.generation > gen
        assert [(e.kind, e.grant.id) for e in events] == [(GrantEventKind.CREATED, grant.id)]
        assert [g.id for g in await b.list_grants()].count(grant.id) == 1

        gen = b.generation
        assert await a.revoke_grant(grant.id) is True
        assert a.grants_for(who) == ()
        took = await wait_until(lambda: b.grants_for(who) == (), 1.0)
        assert took < 1.0
        assert b.generation > gen
        assert events[-1].kind is GrantEventKind.REVOKED
        assert await a.revoke_grant(grant.id) is False  # already revoked
        assert grant.id not in [g.id for g in await a.list_grants()]
        assert grant.id in [g.id for g in await a.list_grants(include_expired=True)]
        await asyncio.sleep(0.2)
        assert len(events) == 2  # one event per change, the NOTIFY echo is not repeated


async def test_a_forged_notification_changes_no_grant(control_db: str) -> None:
    """Any login may NOTIFY pgveil_grants (no privilege needed): a store applies only what
    pgveil.grants holds under the id a notification names, so a forged "created" lifts
    nothing and a forged "revoked" leaves a real grant in force."""
    async with stores(control_db, 1) as (store,):
        intruder, holder = login(), login()
        now = datetime.now(timezone.utc)
        forged = Grant(id="g_0123456789ab", login=intruder, lift={"role": "dba"},
                       reason="x", approver="x", created_at=now,
                       expires_at=datetime.fromtimestamp(now.timestamp() + 60, timezone.utc))
        real = await store.create_grant(holder, {"max_rows": 5000}, 60, "month-end", "Wang Fang")
        conn = await asyncpg.connect(control_db)
        try:
            for kind, grant in ((GrantEventKind.CREATED, forged),
                                (GrantEventKind.REVOKED, real)):
                payload = json.dumps({"event": kind.value, "grant": grant.to_json()})
                await conn.execute("SELECT pg_notify('pgveil_grants', $1)", payload)
        finally:
            await conn.close()
        await asyncio.sleep(0.5)
        assert store.grants_for(intruder) == ()
        assert store.grants_for(holder) == (real,)
        assert await store.revoke_grant(real.id) is True  # the real revocation still works
        assert store.grants_for(holder) == ()


async def test_grant_expires_by_time(control_db: str) -> None:
    async with stores(control_db, 2) as (a, b):
        events: list[GrantEvent] = []
        b.on_grant_event(events.append)
        who = login()
        grant = await a.create_grant(who, {"copy": True}, 1.0, "one-off export", "Li Lei")
        await wait_until(lambda: b.grants_for(who) != (), 1.0)
        gen = b.generation
        await asyncio.sleep(max(0.0, grant.expires_ts - time.time()) + 0.2)
        assert b.grants_for(who) == ()
        assert a.grants_for(who) == ()
        assert b.generation > gen  # the timer dropped it, no NOTIFY involved
        assert [e.kind for e in events] == [GrantEventKind.CREATED, GrantEventKind.EXPIRED]


async def test_new_store_loads_active_grants(control_db: str) -> None:
    async with stores(control_db, 1) as (a,):
        who = login()
        grant = await a.create_grant(who, {"role": "manager"}, 60, "cover", "Zhao Min")
        async with stores(control_db, 1) as (late,):
            assert [g.id for g in late.grants_for(who)] == [grant.id]
        with pytest.raises(ValueError):
            await a.create_grant(who, {"bogus": True}, 60, "r", "a")
        with pytest.raises(ValueError):
            await a.create_grant(who, {"copy": True}, 31 * 86400, "r", "a")
        with pytest.raises(ValueError):
            await a.create_grant(who, {"copy": True}, 60, "   ", "a")


# ---------------------------------------------------------------------------- live: quotas


async def test_quota_is_shared_between_stores(control_db: str) -> None:
    async with stores(control_db, 2, flush_interval=0.2) as (a, b):
        who = login()
        assert await a.refresh_quota(who, 3600) == 0
        assert await b.refresh_quota(who, 3600) == 0
        a.add_rows(who, 30)
        b.add_rows(who, 12)
        assert a.quota_used(who, 3600) >= 30  # own rows count at once
        await wait_until(lambda: a.quota_used(who, 3600) == 42, 1.0)
        await wait_until(lambda: b.quota_used(who, 3600) == 42, 1.0)
        await asyncio.sleep(0.5)  # stable: no double counting after later syncs
        assert a.quota_used(who, 3600) == b.quota_used(who, 3600) == 42
        assert a.available and b.available
        async with stores(control_db, 1) as (c,):  # a newcomer primes itself
            assert await c.refresh_quota(who, 3600) == 42


async def test_own_rows_count_while_their_flush_is_in_flight(control_db: str) -> None:
    """The ticker's write of this process's rows takes a round trip; a statement gated
    meanwhile must still see them (they were in neither the pending nor the flushed set)."""
    async with stores(control_db, 1, flush_interval=0.05) as (a,):
        who = login()
        assert await a.refresh_quota(who, 3600) == 0
        seen: list[int] = []
        real = a._flush_with

        async def observed(conn: object, batch: dict[str, dict[int, int]]) -> None:
            seen.append(a.quota_used(who, 3600))  # before the write
            await real(conn, batch)
            seen.append(a.quota_used(who, 3600))  # written, not yet refreshed

        a._flush_with = observed  # type: ignore[method-assign]
        a.add_rows(who, 7)
        await wait_until(lambda: len(seen) >= 2, 2.0)
        assert seen[:2] == [7, 7]
        await asyncio.sleep(0.2)
        assert a.quota_used(who, 3600) == 7  # refreshed: counted once


async def test_quota_window_slides(control_db: str) -> None:
    async with stores(control_db, 2, flush_interval=0.2) as (a, b):
        who = login()
        a.add_rows(who, 10)
        await wait_until(lambda: b.quota_used(who, 2) == 10, 1.0)
        b.add_rows(who, 1)
        await wait_until(lambda: a.quota_used(who, 2) == 11, 1.0)
        await wait_until(lambda: b.quota_used(who, 2) <= 1, 3.0)
        await wait_until(lambda: a.quota_used(who, 2) == 0 and b.quota_used(who, 2) == 0, 3.0)
        assert await a.refresh_quota(who, 3600) == 11  # a longer window still sees them


async def test_quota_shared_with_another_os_process(control_db: str) -> None:
    """A separate pgveil-like process adds 7 rows, we add 5: both see 12."""
    who = login()
    script = textwrap.dedent(f"""
        import asyncio, sys, time
        from proxy.control import ControlStore
        async def main():
            s = ControlStore({control_db!r}, flush_interval=0.2)
            await s.start()
            s.add_rows({who!r}, 7)
            deadline = time.monotonic() + 20
            while s.quota_used({who!r}, 3600) < 12 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            print(s.quota_used({who!r}, 3600), flush=True)
            await s.close()
        asyncio.run(main())
    """)
    async with stores(control_db, 1, flush_interval=0.2) as (a,):
        await a.refresh_quota(who, 3600)
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-c", script, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        a.add_rows(who, 5)
        await wait_until(lambda: a.quota_used(who, 3600) == 12, 15.0)
        out, _ = await asyncio.wait_for(proc.communicate(), 25)
        assert proc.returncode == 0
        assert out.decode().strip() == "12"


async def test_control_db_down_keeps_hot_path_working(control_db: str) -> None:
    relay = Relay(control_db)
    await relay.start()
    async with stores(control_db, 1, flush_interval=0.2) as (direct,):
        cut = ControlStore(relay.dsn(control_db), flush_interval=0.2, connect_timeout=1.0,
                           op_timeout=1.0, keepalive_interval=0.5)
        try:
            await cut.start()
            who = login()
            grant = await direct.create_grant(who, {"max_rows": 100}, 60, "r", "a")
            await wait_until(lambda: cut.grants_for(who) != (), 1.0)
            cut.add_rows(who, 4)
            await wait_until(lambda: cut.quota_used(who, 3600) == 4 and cut.available, 1.0)

            await relay.stop()
            await wait_until(lambda: not cut.available, 3.0)
            # the hot path: no awaits, no exceptions, last known grants, local counting
            cut.add_rows(who, 6)
            assert cut.quota_used(who, 3600) == 10
            assert [g.id for g in cut.grants_for(who)] == [grant.id]
            await direct.revoke_grant(grant.id)  # the cut-off store cannot hear this yet
            await asyncio.sleep(0.6)
            cut.add_rows(who, 1)
            assert cut.quota_used(who, 3600) == 11
            assert [g.id for g in cut.grants_for(who)] == [grant.id]
            with pytest.raises(ControlError):  # management calls do fail
                await cut.list_grants()

            await relay.start()  # same port
            await wait_until(lambda: cut.available, 8.0)
            await wait_until(lambda: cut.grants_for(who) == (), 1.0)  # resynced on reconnect
            await direct.refresh_quota(who, 3600)
            await wait_until(lambda: direct.quota_used(who, 3600) == 11, 2.0)
            await asyncio.sleep(0.5)
            assert cut.quota_used(who, 3600) == 11  # flushed once, not twice
        finally:
            await cut.close()
            with contextlib.suppress(AssertionError):
                await relay.stop()


async def test_start_while_control_db_is_down(control_db: str) -> None:
    """require=True refuses to start; require=False counts locally and catches up later."""
    relay = Relay(control_db)
    await relay.start()
    await relay.stop()  # the port is known, nothing listens on it
    with pytest.raises(ControlError):
        await ControlStore(relay.dsn(control_db), connect_timeout=1.0).start()
    late = ControlStore(relay.dsn(control_db), flush_interval=0.2, connect_timeout=1.0)
    try:
        await late.start(require=False)
        who = login()
        assert not late.available
        late.add_rows(who, 3)
        assert late.quota_used(who, 3600) == 3 and late.grants_for(who) == ()
        await relay.start()
        await wait_until(lambda: late.available, 8.0)
        async with stores(control_db, 1) as (direct,):
            await wait_until(lambda: late.quota_used(who, 3600) == 3, 1.0)
            assert await direct.refresh_quota(who, 3600) == 3
    finally:
        await late.close()
        with contextlib.suppress(AssertionError):
            await relay.stop()


# ---------------------------------------------------------------------------- live: CLI


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "proxy", "grant", *args, cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_end_to_end(control_db: str) -> None:
    async with stores(control_db, 2) as (a, b):
        events: list[GrantEvent] = []
        a.on_grant_event(events.append)
        who = login()
        rc, out, err = await run_cli(
            "create", "--dsn", control_db, "--login", who, "--lift", "max_rows=5000",
            "--expires", "2h", "--reason", "month-end reconciliation", "--approver", "Wang Fang")
        assert rc == 0, err
        gid = out.strip()
        assert gid.startswith("g_") and "max_rows=5000" in err
        took_a = await wait_until(lambda: a.grants_for(who) != (), 1.0)
        took_b = await wait_until(lambda: b.grants_for(who) != (), 1.0)
        assert max(took_a, took_b) < 1.0
        assert [g.id for g in a.grants_for(who)] == [gid] == [g.id for g in b.grants_for(who)]
        assert 7100 < a.grants_for(who)[0].expires_ts - time.time() <= 7200
        assert events[0].kind is GrantEventKind.CREATED

        rc, out, err = await run_cli("list", "--dsn", control_db, "--login", who)
        assert rc == 0 and gid in out and "max_rows=5000" in out and "Wang Fang" in out

        rc, out, err = await run_cli("revoke", "--dsn", control_db, gid)
        assert rc == 0, err
        await wait_until(lambda: a.grants_for(who) == () and b.grants_for(who) == (), 1.0)
        assert events[-1].kind is GrantEventKind.REVOKED

        rc, out, err = await run_cli("revoke", "--dsn", control_db, gid)
        assert rc == 1 and "already revoked" in err
        rc, out, err = await run_cli("list", "--dsn", control_db, "--login", who, "--all",
                                     "--json")
        assert rc == 0 and json.loads(out)["state"] == "revoked"

    conn = await asyncpg.connect(control_db)
    try:
        rows = await conn.fetch("SELECT kind, actor, db_user FROM pgveil.grant_events "
                                "WHERE grant_id = $1 ORDER BY seq", gid)
    finally:
        await conn.close()
    assert [r["kind"] for r in rows] == ["created", "revoked"]
    assert all(r["actor"] and r["db_user"] == "dba" for r in rows)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run ``pgveil grant ARGS`` in-process (only for paths that never reach the database)."""
    from proxy.cli import main

    try:
        rc = main(["grant", *args])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


def test_cli_validates_before_connecting(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    dsn = "postgresql://nobody@127.0.0.1:1/postgres"  # never contacted
    base = ["create", "--login", "x", "--reason", "r", "--approver", "a"]
    rc, err = cli(capsys, *base, "--dsn", dsn, "--lift", "max_rows=0", "--expires", "2h")
    assert rc == 2 and "max_rows" in err
    rc, err = cli(capsys, *base, "--dsn", dsn, "--lift", "copy", "--expires", "45d")
    assert rc == 2 and "30 days" in err
    rc, err = cli(capsys, *base, "--dsn", dsn, "--lift", "copy", "--lift", "copy",
                  "--expires", "1h")
    assert rc == 2 and "twice" in err
    rc, err = cli(capsys, *base, "--dsn", dsn, "-c", "x.yaml", "--lift", "copy",
                  "--expires", "1h")
    assert rc == 2 and "not allowed with" in err
    rc, err = cli(capsys, *base, "-c", str(tmp_path / "missing.yaml"), "--lift", "copy",
                  "--expires", "1h")
    assert rc == 1 and "--dsn" in err
    cfg = tmp_path / "pgveil.yaml"
    cfg.write_text("policy: policy.yaml\n")
    rc, err = cli(capsys, *base, "-c", str(cfg), "--lift", "copy", "--expires", "1h")
    assert rc == 1 and "control.dsn is not set" in err
    # with a config, role=NAME must name a role of its policy
    cfg.write_text(f"control: {{dsn: '{dsn}'}}\npolicy: {ROOT / 'config' / 'policy.yaml'}\n")
    rc, err = cli(capsys, *base, "-c", str(cfg), "--lift", "role=no_such_role",
                  "--expires", "1h")
    assert rc == 1 and "no_such_role" in err and "manager" in err
    rc, err = cli(capsys)
    assert rc == 2


async def test_cli_unreachable_and_config_password(control_db: str, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    rc, _, err = await run_cli("list", "--dsn", f"postgresql://dba:x@127.0.0.1:{dead}/postgres")
    assert rc == 3 and "cannot connect" in err

    # the DSN from pgveil.yaml, the password from PGVEIL_CONTROL_PASSWORD
    parts = urlsplit(control_db)
    no_pw = parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}").geturl()
    cfg = tmp_path / "pgveil.yaml"
    cfg.write_text(f"control: {{dsn: '{no_pw}'}}\npolicy: {ROOT / 'config' / 'policy.yaml'}\n")
    rc, out, err = await run_cli(
        "create", "-c", str(cfg), "--login", login(), "--lift", "role=manager",
        "--expires", "10m", "--reason", "cover", "--approver", "a",
        env={"PGVEIL_CONTROL_PASSWORD": parts.password or ""})
    assert rc == 0, err
    assert out.strip().startswith("g_")
