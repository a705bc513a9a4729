"""Temporary grants and shared quotas across pgveil processes (SPEC §2 ``pgveil grant``, §4
``quota``): two proxies on one control database, driven by the real CLI.

Why live: grants travel from the CLI through the control database (INSERT + NOTIFY) to every
running proxy and must reach sessions that are already open; quotas are counted by each proxy
and shared through the same database. Only separate processes show that.

Every test works on *fresh logins* (``teller_sz_<random>``, matched by the policy's
``teller_sz*`` → role teller, branch SZ01) created for it, so that a grant or quota usage can
never leak into another test: the control database lives as long as the test session.
The bank fixture puts customer ``g`` in SZ01 when ``g % 3 == 0``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import errors as pg_errors

from proxy.localpg import PostgresCluster, clean_env
from tests.harness.pgveil_proc import DEFAULT_POLICY, PgveilProcess, policy_with_teller_quota

GRANT_ID = re.compile(r"^g_[0-9a-f]{12}$")
ROWS_200 = "select id from customers where id <= 600"  # 200 SZ01 rows: over the teller cap
ROWS_51 = "select id from customers where id <= 153"  # 51 SZ01 rows: the cheapest probe
PROPAGATION = 3.0  # SPEC: within a second; some slack for a loaded test machine


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m proxy ARGS`` as a DBA runs it (no PGVEIL_* from the test environment)."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("PGVEIL_")}
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def pair(pg: PostgresCluster, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[tuple[PgveilProcess, PgveilProcess]]:
    """Two proxies on the same control database (shared by the grant tests: each works on
    its own logins). The teller quota is raised so that polling for a grant to arrive never
    runs into it; quotas have their own tests."""
    path = policy_with_teller_quota(tmp_path_factory.mktemp("grants"), 10_000_000)
    procs = [PgveilProcess(pg, policy_path=path), PgveilProcess(pg, policy_path=path)]
    try:
        for proc in procs:
            proc.start()
        yield procs[0], procs[1]
    finally:
        for proc in procs:
            proc.cleanup()


@pytest.fixture(scope="module")
def quota_pair(pg: PostgresCluster, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[tuple[PgveilProcess, PgveilProcess]]:
    """Two proxies whose policy lowers the teller quota to 60 rows per hour."""
    path = policy_with_teller_quota(tmp_path_factory.mktemp("quota"), 60)
    procs = [PgveilProcess(pg, policy_path=path), PgveilProcess(pg, policy_path=path)]
    try:
        for proc in procs:
            proc.start()
        yield procs[0], procs[1]
    finally:
        for proc in procs:
            proc.cleanup()


def grant(proc: PgveilProcess, login: str, lift: str, expires: str = "1h") -> str:
    r = cli("grant", "create", "--login", login, "--lift", lift, "--expires", expires,
            "--reason", f"test {lift}", "--approver", "boss", "-c", str(proc.config_path))
    assert r.returncode == 0, r.stderr
    gid = r.stdout.strip()
    assert GRANT_ID.match(gid), r.stdout
    return gid


def revoke(proc: PgveilProcess, gid: str) -> subprocess.CompletedProcess[str]:
    return cli("grant", "revoke", gid, "--reason", "done", "-c", str(proc.config_path))


def capped(conn: psycopg.Connection[Any], sql: str = ROWS_51) -> bool:
    """True when the statement is stopped by the row cap, False when all rows arrive."""
    try:
        rows = conn.execute(sql).fetchall()
    except pg_errors.InsufficientPrivilege as exc:
        assert "row limit" in str(exc), exc
        return True
    assert rows
    return False


def prepared_capped(conn: psycopg.Connection[Any], sql: str = ROWS_51) -> bool:
    """Like :func:`capped` through a server-side prepared statement (Parse once, then only
    Bind/Execute: what psycopg does after 5 executions, and JDBC and asyncpg always)."""
    try:
        rows = conn.execute(sql, prepare=True).fetchall()
    except pg_errors.InsufficientPrivilege as exc:
        assert "row limit" in str(exc), exc
        return True
    assert rows
    return False


def wait_until(pred: Callable[[], bool], timeout: float = PROPAGATION) -> float:
    """Seconds until ``pred()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not reached within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - start


def audit_records(proc: PgveilProcess) -> list[dict[str, Any]]:
    if not proc.audit_path.exists():
        return []
    return [json.loads(ln) for ln in proc.audit_path.read_text().splitlines() if ln.strip()]


def connect(proc: PgveilProcess, login: str) -> psycopg.Connection[Any]:
    """Autocommit, and no automatic server-side prepare: every poll is parsed again, so the
    tests of propagation do not depend on prepared statements (those have their own test)."""
    return psycopg.connect(proc.dsn(login), autocommit=True, prepare_threshold=None)


# --------------------------------------------------------------------------- grants


def test_max_rows_grant_reaches_open_sessions_on_both_proxies(
        pair: tuple[PgveilProcess, PgveilProcess],
        logins: Callable[[str], str]) -> None:
    a, b = pair
    login, other = logins("sz"), logins("sz")
    with connect(a, login) as ca, connect(b, login) as cb, connect(a, other) as co:
        assert capped(ca) and capped(cb) and capped(co)
        gid = grant(a, login, "max_rows=500")
        try:
            wait_until(lambda: not capped(ca))
            wait_until(lambda: not capped(cb))
            assert len(ca.execute(ROWS_200).fetchall()) == 200
            assert len(cb.execute(ROWS_200).fetchall()) == 200
            # the new cap is 500, not unlimited
            with pytest.raises(pg_errors.InsufficientPrivilege, match="row limit of 500"):
                cb.execute("select id from customers where id <= 1800").fetchall()
            # only that login: another teller of the same role and branch keeps the cap
            assert capped(co)
            with connect(b, other) as cbo:
                assert capped(cbo)
            # a new session of the login gets the grant too
            with connect(b, login) as fresh:
                assert not capped(fresh)
            # listed as active
            r = cli("grant", "list", "--json", "--login", login, "-c", str(b.config_path))
            assert r.returncode == 0, r.stderr
            listed = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
            assert [(g["id"], g["state"], g["lift"]) for g in listed] == \
                [(gid, "active", {"max_rows": 500})]
            assert listed[0]["approver"] == "boss" and listed[0]["reason"] == "test max_rows=500"
        finally:
            r = revoke(b, gid)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: capped(ca))
        wait_until(lambda: capped(cb))
    r = cli("grant", "list", "--all", "--json", "--login", login, "-c", str(a.config_path))
    assert [json.loads(ln)["state"] for ln in r.stdout.splitlines() if ln.strip()] == ["revoked"]
    again = revoke(a, gid)
    assert again.returncode == 1 and "already revoked" in again.stderr


def test_statements_under_a_grant_are_audited_with_its_id(
        pair: tuple[PgveilProcess, PgveilProcess],
        logins: Callable[[str], str]) -> None:
    a, b = pair
    login = logins("sz")
    with connect(a, login) as ca, connect(b, login) as cb:
        ca.execute("select id from customers where id = 3").fetchall()
        gid = grant(a, login, "max_rows=500")
        try:
            wait_until(lambda: not capped(ca))
            wait_until(lambda: not capped(cb))
        finally:
            assert revoke(a, gid).returncode == 0
        wait_until(lambda: capped(ca))
        wait_until(lambda: capped(cb))
    for proc in (a, b):
        recs = audit_records(proc)
        mine = [r for r in recs if r.get("operator") == login and r.get("kind") == "select"]
        assert mine and all(r["grant"] in (None, gid) for r in mine)
        granted = [r for r in mine if r["grant"] == gid]
        assert granted and all(r["decision"] == "rewritten" and r["rows"] == 51
                               for r in granted)
        assert mine[-1]["grant"] is None  # after the revoke
        # the grant's own events are in every proxy's log
        events = [r for r in recs if r.get("grant") == gid and r.get("kind", "").startswith(
            "grant")]
        kinds = {r["kind"] for r in events}
        assert any("creat" in k for k in kinds) and any("revok" in k for k in kinds), kinds
        created = next(r for r in events if "creat" in r["kind"])
        assert created["operator"] == login
        assert any("boss" in x for x in created["reasons"])
        assert any("max_rows=500" in x for x in created["reasons"])


def test_short_grant_expires_for_auto_prepared_statements(
        pair: tuple[PgveilProcess, PgveilProcess], logins: Callable[[str], str]) -> None:
    """psycopg's default: the 5th execution of the same query prepares it server-side, later
    ones only Bind/Execute. Such a session must also fall back to the role's cap when the
    grant expires."""
    a, _b = pair
    login = logins("sz")
    with psycopg.connect(a.dsn(login), autocommit=True) as conn:  # prepare_threshold = 5
        grant(a, login, "max_rows=500", expires="4s")
        wait_until(lambda: not capped(conn))
        for _ in range(6):
            assert not capped(conn)
        wait_until(lambda: capped(conn), timeout=8)


def test_short_grant_expires_by_itself(pair: tuple[PgveilProcess, PgveilProcess],
                                       logins: Callable[[str], str]) -> None:
    a, b = pair
    login = logins("sz")
    with connect(a, login) as ca, connect(b, login) as cb:
        grant(b, login, "max_rows=500", expires="4s")
        wait_until(lambda: not capped(ca))
        wait_until(lambda: not capped(cb))
        # expired: back to the role's cap without any revoke
        wait_until(lambda: capped(ca) and capped(cb), timeout=8)
    r = cli("grant", "list", "--all", "--json", "--login", login, "-c", str(a.config_path))
    assert [json.loads(ln)["state"] for ln in r.stdout.splitlines() if ln.strip()] == ["expired"]


def test_copy_grant_allows_copy_to_for_that_login_only(
        pg: PostgresCluster, pair: tuple[PgveilProcess, PgveilProcess],
        logins: Callable[[str], str]) -> None:
    a, b = pair
    login, other = logins("sz"), logins("sz")
    sql = "copy (select id, phone from customers where id <= 30 order by id) to stdout"

    def copy_rows(proc: PgveilProcess, who: str) -> list[tuple[str, ...]] | None:
        try:
            with connect(proc, who) as conn, conn.cursor().copy(sql) as copy:
                return [tuple(r) for r in copy.rows()]
        except pg_errors.InsufficientPrivilege:
            return None

    assert copy_rows(a, login) is None
    gid = grant(a, login, "copy")
    try:
        wait_until(lambda: copy_rows(a, login) is not None)
        wait_until(lambda: copy_rows(b, login) is not None)
        with psycopg.connect(pg.dsn("dba")) as d:
            raw = dict(d.execute("select id::text, phone from customers where id <= 30")
                       .fetchall())
        rows = copy_rows(b, login)
        assert rows is not None
        # still filtered to the branch and masked: a grant lifts the export ban, not the mask
        assert [r[0] for r in rows] == [str(i) for i in range(3, 31, 3)]
        assert all(r[1] == raw[r[0]][:3] + "****" + raw[r[0]][-4:] for r in rows)
        assert copy_rows(a, other) is None and copy_rows(b, other) is None
    finally:
        assert revoke(a, gid).returncode == 0
    wait_until(lambda: copy_rows(b, login) is None)


def test_role_grant_acts_as_manager(pg: PostgresCluster,
                                    pair: tuple[PgveilProcess, PgveilProcess],
                                    logins: Callable[[str], str]) -> None:
    a, b = pair
    login = logins("sz")
    with psycopg.connect(pg.dsn("dba")) as d:
        phone3, card3 = d.execute("select c.phone, a.card_no from customers c join accounts a "
                                  "on a.customer_id = c.id where c.id = 3 order by a.id limit 1"
                                  ).fetchone()  # type: ignore[misc]
    sql = ("select c.phone, a.card_no, a.balance from customers c join accounts a "
           "on a.customer_id = c.id where c.id = 3 order by a.id limit 1")
    with connect(a, login) as ca, connect(b, login) as cb:
        assert ca.execute(sql).fetchone()[0] != phone3  # type: ignore[index]
        gid = grant(b, login, "role=manager")
        try:
            for conn in (ca, cb):
                wait_until(lambda c=conn: c.execute(sql).fetchone()[0] == phone3)
                phone, card, balance = conn.execute(sql).fetchone()  # type: ignore[misc]
                assert card != card3 and card.endswith(card3[-4:])  # level 3 stays masked
                assert balance is not None  # clearance 2: balances shown
                # still the operator's own branch
                assert conn.execute("select id from customers where id = 1").fetchall() == []
        finally:
            assert revoke(a, gid).returncode == 0
        wait_until(lambda: ca.execute(sql).fetchone()[0] != phone3)
    recs = [r for r in audit_records(a) if r.get("operator") == login and r.get("grant") == gid
            and r.get("kind") == "select"]
    assert recs and all(r["role"] == "manager" for r in recs), [r["role"] for r in recs]


def test_revoke_reaches_statements_prepared_under_the_grant(
        pg: PostgresCluster, pair: tuple[PgveilProcess, PgveilProcess],
        logins: Callable[[str], str]) -> None:
    """A statement prepared while a grant was active must not keep the grant's rules after
    the revoke: neither the protocol-level prepared statement (Parse once, Bind/Execute many,
    what psycopg does after 5 executions and JDBC always) nor SQL PREPARE/EXECUTE."""
    a, _b = pair
    login = logins("sz")
    with psycopg.connect(pg.dsn("dba")) as d:
        row = d.execute("select phone from customers where id = 3").fetchone()
    assert row is not None
    phone3 = row[0]
    sql = "select phone from customers where id = %s"
    with connect(a, login) as conn:
        gid = grant(a, login, "role=manager")
        try:
            wait_until(lambda: conn.execute(sql, (3,)).fetchone() == (phone3,))
            assert conn.execute(sql, (3,), prepare=True).fetchone() == (phone3,)
            conn.execute("prepare by_id (int) as select phone from customers where id = $1")
            assert conn.execute("execute by_id (3)").fetchone() == (phone3,)
        finally:
            assert revoke(a, gid).returncode == 0
        wait_until(lambda: conn.execute(sql, (3,)).fetchone() != (phone3,))
        leaked = {"protocol-level": conn.execute(sql, (3,), prepare=True).fetchone(),
                  "sql-level": conn.execute("execute by_id (3)").fetchone()}
        assert all(v != (phone3,) for v in leaked.values()), leaked


def test_revoke_reaches_the_row_cap_of_prepared_statements(
        pair: tuple[PgveilProcess, PgveilProcess], logins: Callable[[str], str]) -> None:
    a, _b = pair
    login = logins("sz")
    with connect(a, login) as conn:
        gid = grant(a, login, "max_rows=500")
        try:
            wait_until(lambda: not prepared_capped(conn))
            conn.execute(f"prepare rows51 as {ROWS_51}")
            assert len(conn.execute("execute rows51").fetchall()) == 51
        finally:
            assert revoke(a, gid).returncode == 0
        # only the prepared statements run now: nothing is parsed again on this session
        wait_until(lambda: prepared_capped(conn))
        assert capped(conn, "execute rows51")


@pytest.mark.parametrize(("args", "code"), [
    (["--lift", "role=no_such_role", "--expires", "1h"], 1),
    (["--lift", "bogus", "--expires", "1h"], 2),
    (["--lift", "max_rows=500", "--expires", "31d"], 2),
    (["--lift", "max_rows=500", "--expires", "soon"], 2),
])
def test_grant_create_rejects_bad_input(pg: PostgresCluster, tmp_path: Path,
                                        args: list[str], code: int) -> None:
    config = tmp_path / "pgveil.yaml"
    config.write_text(yaml.safe_dump({"control": {"dsn": pg.dsn("dba", db="postgres")},
                                      "policy": str(DEFAULT_POLICY)}), encoding="utf-8")
    login = f"teller_sz_{uuid.uuid4().hex[:10]}"  # grants name logins; it need not exist
    r = cli("grant", "create", "--login", login, *args, "--reason", "r", "--approver", "boss",
            "-c", str(config))
    assert r.returncode == code, (r.stdout, r.stderr)
    assert r.stdout.strip() == ""  # no grant id printed
    listed = cli("grant", "list", "--all", "--json", "--login", login, "-c", str(config))
    assert listed.returncode == 0 and listed.stdout.strip() == "", listed.stderr


# --------------------------------------------------------------------------- quota


def _read_20(conn: psycopg.Connection[Any]) -> int:
    return len(conn.execute("select id, phone from customers where id <= 60").fetchall())


def test_quota_is_shared_by_two_proxies(quota_pair: tuple[PgveilProcess, PgveilProcess],
                                        logins: Callable[[str], str]) -> None:
    a, b = quota_pair
    login, neighbour = logins("sz"), logins("sz")
    settle = 1.0  # counts are flushed to the control database every 0.5 s
    with connect(a, login) as ca, connect(b, login) as cb:
        assert _read_20(ca) == 20
        time.sleep(settle)
        assert _read_20(cb) == 20
        time.sleep(settle)
        assert _read_20(ca) == 20  # 60 rows in total: the quota is used up
        time.sleep(settle)
        for conn in (cb, ca):
            with pytest.raises(pg_errors.InsufficientPrivilege, match="quota") as info:
                conn.execute("select id from customers where id = 3").fetchall()
            assert "60" in str(info.value)
            # denied, not dropped: unprotected work goes on
            assert conn.execute("select count(*) from branches").fetchone() == (3,)
        # a new session on either proxy is over quota too
        with connect(b, login) as again:
            with pytest.raises(pg_errors.InsufficientPrivilege, match="quota"):
                again.execute("select id from customers where id = 6").fetchall()
        # the quota is per operator: a neighbour of the same role is unaffected
        with connect(a, neighbour) as na, connect(b, neighbour) as nb:
            assert _read_20(na) == 20 and _read_20(nb) == 20
        # a "quota" grant lifts it for a while
        gid = grant(a, login, "quota")
        try:
            wait_until(lambda: _try_read(ca) and _try_read(cb))
        finally:
            assert revoke(a, gid).returncode == 0
        wait_until(lambda: not _try_read(ca) and not _try_read(cb))


def _try_read(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("select id from customers where id = 3").fetchall()
    except pg_errors.InsufficientPrivilege as exc:
        assert "quota" in str(exc)
        return False
    return True


def test_quota_counts_only_rows_of_protected_tables(
        quota_pair: tuple[PgveilProcess, PgveilProcess], logins: Callable[[str], str]) -> None:
    proc = quota_pair[0]
    login = logins("sz")
    with connect(proc, login) as conn:
        for _ in range(30):  # 90 rows of an unprotected table
            assert len(conn.execute("select * from branches").fetchall()) == 3
        time.sleep(1.0)
        assert _read_20(conn) == 20
        assert _read_20(conn) == 20


def test_lookups_that_find_nothing_still_use_the_quota(
        quota_pair: tuple[PgveilProcess, PgveilProcess], logins: Callable[[str], str]) -> None:
    """Each value a lookup presents costs a row of quota, found or not: guessing the hidden
    digits of a phone through misses is not free (SPEC §4 lookup: "counts against the quota")."""
    a, _ = quota_pair
    guesses = [f"'1860000{i:04d}'" for i in range(60)]  # no customer has these phones
    with connect(a, logins("sz")) as conn:
        for start in range(0, 60, 10):  # six lookups of ten values: 60, the quota
            sql = f"select id from customers where phone in ({', '.join(guesses[start:start + 10])})"
            assert conn.execute(sql).fetchall() == []
        with pytest.raises(pg_errors.InsufficientPrivilege, match="quota"):
            conn.execute("select id from customers where id = 3").fetchall()
