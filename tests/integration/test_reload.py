"""Policy reload of a running pgveil (SPEC §2 ``serve``): SIGHUP and a change of the policy file
swap the policy without dropping connections; an open session follows the new rules at its next
statement; a broken file keeps the old policy, says why in the log and counts
``pgveil_policy_reloads_total{result="error"}``. Also the ``hours`` window (SPEC §4).

Why live: reload is a property of the process (signals, a file watcher, sessions that stay
open), so only a real ``pgveil serve`` with real client sessions shows it.

Every test writes its own copy of config/policy.yaml (changed with ``edit_policy``) and starts
its own pgveil on it with ``pgveil_factory``.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors as pg_errors

from proxy.localpg import PostgresCluster
from tests.harness.pgveil_proc import DEFAULT_POLICY, PgveilProcess

Factory = Callable[..., PgveilProcess]
PHONE_SQL = "select phone from customers where id = 3"


def edit_policy(path: Path, change: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Write the fixture policy, changed by ``change``, to ``path``."""
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    if change is not None:
        change(policy)
    text = yaml.safe_dump(policy, allow_unicode=True, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def teller_clearance(level: int) -> Callable[[dict[str, Any]], None]:
    def change(policy: dict[str, Any]) -> None:
        policy["roles"]["teller"]["clearance"] = level
    return change


def bump_mtime(path: Path) -> None:
    """Make sure a watcher comparing mtimes sees a change even within one timer tick."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def metrics(proc: PgveilProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(proc.metrics_url(), timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def reloads(proc: PgveilProcess, result: str) -> float:
    return metrics(proc).get(("pgveil_policy_reloads_total", (("result", result),)), 0.0)


def policy_versions(proc: PgveilProcess) -> set[str]:
    return {dict(labels)["version"] for (name, labels), value in metrics(proc).items()
            if name == "pgveil_policy_info" and value == 1}


def wait_until(pred: Callable[[], bool], timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout} s")
        time.sleep(0.1)


def connect(proc: PgveilProcess, login: str, autocommit: bool = True) -> psycopg.Connection[Any]:
    """No automatic server-side prepare: the reload tests poll the same query many times, and
    prepared statements have their own test (test_tightened_policy_applies_to_prepared_...)."""
    return psycopg.connect(proc.dsn(login), autocommit=autocommit, prepare_threshold=None)


@pytest.fixture(scope="module")
def phone3(pg: PostgresCluster) -> str:
    with psycopg.connect(pg.dsn("dba")) as conn:
        row = conn.execute(PHONE_SQL).fetchone()
    assert row is not None
    return str(row[0])


def masked(phone: str) -> str:
    return phone[:3] + "****" + phone[-4:]


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    edit_policy(path)
    return path


# --------------------------------------------------------------------------- reload


def test_file_change_reloads_open_sessions(pgveil_factory: Factory, policy_file: Path,
                                           phone3: str) -> None:
    proc = pgveil_factory(policy_path=policy_file)
    ok_before = reloads(proc, "ok")
    (version,) = policy_versions(proc)
    with connect(proc, "teller_sz01") as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()
        assert conn.execute(PHONE_SQL).fetchone() == (masked(phone3),)
        edit_policy(policy_file, teller_clearance(1))  # identity columns unmasked
        bump_mtime(policy_file)
        wait_until(lambda: conn.execute(PHONE_SQL).fetchone() == (phone3,))
        # the same connection, never dropped
        assert conn.execute("select pg_backend_pid()").fetchone() == pid
        assert reloads(proc, "ok") >= ok_before + 1
        versions = policy_versions(proc)
        assert len(versions) == 1 and versions != {version}
        # and back
        edit_policy(policy_file)
        bump_mtime(policy_file)
        wait_until(lambda: conn.execute(PHONE_SQL).fetchone() == (masked(phone3),))
        assert policy_versions(proc) == {version}


def test_sighup_reloads_open_sessions(pgveil_factory: Factory, policy_file: Path,
                                      phone3: str) -> None:
    # no file watcher: only the signal can trigger this reload
    proc = pgveil_factory({"policy_watch_seconds": 0}, policy_path=policy_file)
    with connect(proc, "teller_sz01") as conn, \
            connect(proc, "teller_gz01") as other:
        assert conn.execute(PHONE_SQL).fetchone() == (masked(phone3),)
        edit_policy(policy_file, teller_clearance(1))
        time.sleep(1.5)
        assert conn.execute(PHONE_SQL).fetchone() == (masked(phone3),)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: conn.execute(PHONE_SQL).fetchone() == (phone3,))
        # every open session follows: the GZ01 teller sees its own customer unmasked too
        row = other.execute("select phone from customers where id = 1").fetchone()
        assert row is not None and "*" not in row[0]
    assert proc.returncode() is None  # SIGHUP reloads, it does not stop pgveil


def test_a_transaction_keeps_working_across_a_reload(pgveil_factory: Factory,
                                                      policy_file: Path, phone3: str) -> None:
    proc = pgveil_factory(policy_path=policy_file)
    with connect(proc, "teller_sz01", autocommit=False) as conn:  # a transaction stays open
        assert conn.execute(PHONE_SQL).fetchone() == (masked(phone3),)
        edit_policy(policy_file, teller_clearance(1))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: conn.execute(PHONE_SQL).fetchone() == (phone3,))
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS
        conn.commit()


def test_tightened_policy_applies_to_prepared_statements(pgveil_factory: Factory,
                                                         tmp_path: Path, phone3: str) -> None:
    """A statement prepared under a looser policy must not keep its rules after a reload."""
    path = tmp_path / "policy.yaml"
    edit_policy(path, teller_clearance(1))
    proc = pgveil_factory(policy_path=path)
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn, \
            connect(proc, "teller_sz01") as watcher:
        sql = "select phone from customers where id = %s"
        assert conn.execute(sql, (3,), prepare=True).fetchone() == (phone3,)
        conn.execute("prepare by_id (int) as select phone from customers where id = $1")
        assert conn.execute("execute by_id (3)").fetchone() == (phone3,)
        for _ in range(6):  # psycopg prepares it by itself from the 5th execution on
            assert conn.execute(PHONE_SQL).fetchone() == (phone3,)
        edit_policy(path)  # back to clearance 0: phones masked
        proc.signal(signal.SIGHUP)
        wait_until(lambda: watcher.execute(PHONE_SQL).fetchone() == (masked(phone3),))
        after = {"protocol-level": conn.execute(sql, (3,), prepare=True).fetchone(),
                 "auto-prepared": conn.execute(PHONE_SQL).fetchone(),
                 "sql-level": conn.execute("execute by_id (3)").fetchone()}
        assert after == dict.fromkeys(after, (masked(phone3),))


def test_statement_denied_after_a_reload_stays_denied(pgveil_factory: Factory,
                                                      tmp_path: Path) -> None:
    """A prepared statement the new policy denies is refused at every Bind, not only the first:
    the server still holds it as prepared under the old rules, so forgetting it would let the
    next Bind run it unaudited and without the new row cap."""
    path = tmp_path / "policy.yaml"

    def loose(policy: dict[str, Any]) -> None:
        policy["roles"]["teller"].update(unbounded="allow", max_rows=1000)
        policy["roles"]["teller"].pop("quota", None)

    edit_policy(path, loose)
    proc = pgveil_factory(policy_path=path)
    sql = "select id from customers"  # unbounded: neither a filter nor a LIMIT
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn, \
            connect(proc, "teller_sz01") as watcher:
        assert len(conn.execute(sql, prepare=True).fetchall()) == 666
        edit_policy(path)  # the fixture: unbounded reads denied, 50 rows at most
        proc.signal(signal.SIGHUP)

        def denied(c: psycopg.Connection[Any], **kw: Any) -> bool:
            try:
                c.execute(sql, **kw).fetchall()
            except pg_errors.InsufficientPrivilege:
                return True
            return False

        wait_until(lambda: denied(watcher))
        assert [denied(conn, prepare=True) for _ in range(3)] == [True, True, True]
        assert conn.execute("select 1").fetchone() == (1,)  # the session stays usable


def test_broken_policy_keeps_the_old_one(pgveil_factory: Factory, policy_file: Path,
                                         phone3: str) -> None:
    proc = pgveil_factory(policy_path=policy_file)
    versions = policy_versions(proc)
    errors_before = reloads(proc, "error")
    good = policy_file.read_text(encoding="utf-8")
    with connect(proc, "teller_sz01") as conn:
        for broken in (
            good.replace("max_rows: 50", "max_rows: lots"),  # invalid value
            good + "\nroles: [unbalanced\n",  # invalid YAML
            good.replace("clearance: 0", "clearance: 1", 1).replace(
                "public.customers:\n", "public.customers:\n    bogus_key: 1\n", 1),
        ):
            assert broken != good
            policy_file.write_text(broken, encoding="utf-8")
            bump_mtime(policy_file)
            count = reloads(proc, "error")
            wait_until(lambda c=count: reloads(proc, "error") >= c + 1)
            # the old policy is still in force, and the session is still there
            assert conn.execute(PHONE_SQL).fetchone() == (masked(phone3),)
            with pytest.raises(pg_errors.InsufficientPrivilege, match="row limit of 50"):
                conn.execute("select id from customers where level >= 1").fetchall()
            assert policy_versions(proc) == versions
        assert reloads(proc, "error") >= errors_before + 3
        log = proc.log_text()
        assert "reload" in log.lower() and str(policy_file.name) in log
        assert "max_rows" in log  # says why
        # a fixed file is picked up again
        edit_policy(policy_file, teller_clearance(1))
        bump_mtime(policy_file)
        wait_until(lambda: conn.execute(PHONE_SQL).fetchone() == (phone3,))
    assert proc.returncode() is None


def test_deleted_policy_file_keeps_the_old_one(pgveil_factory: Factory, policy_file: Path,
                                               phone3: str) -> None:
    proc = pgveil_factory(policy_path=policy_file)
    with connect(proc, "teller_sz01") as conn:
        policy_file.unlink()
        proc.signal(signal.SIGHUP)
        time.sleep(1.5)
        assert conn.execute(PHONE_SQL).fetchone() == (masked(phone3),)
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("copy customers to stdout")
    assert proc.returncode() is None


# --------------------------------------------------------------------------- hours


def _zone_where_it_is_noon() -> str:
    """An IANA fixed-offset zone in which the local time is now 12:xx, so that windows like
    09:00-15:00 (in) and 15:00-17:00 (out) never straddle midnight."""
    hour = datetime.datetime.now(datetime.timezone.utc).hour
    offset = 12 - hour  # local = utc + offset, in -11..12
    if offset == 0:
        return "UTC"
    # POSIX sign convention: Etc/GMT-8 is UTC+8
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


def teller_hours(window: str) -> Callable[[dict[str, Any]], None]:
    def change(policy: dict[str, Any]) -> None:
        policy["roles"]["teller"]["hours"] = window
        policy["roles"]["teller"]["timezone"] = _zone_where_it_is_noon()
    return change


def test_outside_hours_protected_statements_denied(pgveil_factory: Factory, tmp_path: Path,
                                                   phone3: str) -> None:
    path = tmp_path / "policy.yaml"
    edit_policy(path, teller_hours("15:00-17:00"))
    proc = pgveil_factory(policy_path=path)
    with connect(proc, "teller_sz01") as conn:
        for sql in (PHONE_SQL, "select count(*) from orders where customer_id = 3",
                    "select id from accounts where customer_id = 3"):
            with pytest.raises(pg_errors.InsufficientPrivilege) as info:
                conn.execute(sql).fetchall()
            message = str(info.value)
            assert "15:00" in message and "17:00" in message, message
        # unprotected work is fine, and the session stays usable
        assert conn.execute("select count(*) from branches").fetchone() == (3,)
        assert conn.execute("select 1").fetchone() == (1,)
    # roles without hours are unaffected
    with connect(proc, "manager_sz01") as conn:
        assert conn.execute(PHONE_SQL).fetchone() == (phone3,)
    # back inside the window after a reload
    edit_policy(path, teller_hours("09:00-15:00"))
    proc.signal(signal.SIGHUP)
    with connect(proc, "teller_sz01") as conn:
        wait_until(lambda: _allowed(conn))
        assert conn.execute(PHONE_SQL).fetchone() == (masked(phone3),)


def test_inside_hours_allowed_and_denial_in_a_transaction(pgveil_factory: Factory,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    edit_policy(path, teller_hours("09:00-15:00"))
    proc = pgveil_factory(policy_path=path)
    with connect(proc, "teller_sz01", autocommit=False) as conn:
        assert _allowed(conn)
        conn.commit()
        edit_policy(path, teller_hours("14:00-15:00"))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: _rolled_back_unless_allowed(conn) is False)
        # a denial inside a transaction fails it, as any error would
        conn.execute("select 1")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute(PHONE_SQL)
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()


def _allowed(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute(PHONE_SQL).fetchall()
    except pg_errors.InsufficientPrivilege:
        if not conn.autocommit:
            conn.rollback()
        return False
    return True


def _rolled_back_unless_allowed(conn: psycopg.Connection[Any]) -> bool:
    allowed = _allowed(conn)
    if not conn.autocommit:
        conn.rollback()
    return allowed


# --------------------------------------------------------------------------- policy vs schema

HUNT_TABLE = """
DROP TABLE IF EXISTS public.rl_people;
CREATE TABLE public.rl_people (id int PRIMARY KEY, branch_id text NOT NULL, phone text);
INSERT INTO public.rl_people VALUES (1, 'SZ01', '18600314187'), (2, 'GZ01', '18600000002');
GRANT SELECT ON public.rl_people TO PUBLIC;
"""


def protect_people(policy: dict[str, Any]) -> None:
    policy["protected"]["public.rl_people"] = {"columns": {"phone": {"level": 1,
                                                                     "mask": "phone"}}}
    policy["roles"]["teller"]["row_filters"]["public.rl_people"] = "branch_id = {{branch}}"


@pytest.fixture
def people(pg: PostgresCluster) -> Any:
    pg.psql(HUNT_TABLE)
    yield
    pg.psql("DROP TABLE IF EXISTS public.rl_people")


def test_a_renamed_masked_column_refuses_the_table(pgveil_factory: Factory, tmp_path: Path,
                                                   pg: PostgresCluster, people: Any) -> None:
    """The policy masks phone; after RENAME COLUMN phone TO mobile nothing names mobile, and it
    was served raw. The table is refused to the roles that mask the column until the policy
    names it again; the DBA still reads it."""
    path = tmp_path / "policy.yaml"
    edit_policy(path, protect_people)
    proc = pgveil_factory(policy_path=path)
    with connect(proc, "teller_sz01") as conn:
        assert conn.execute("select phone from rl_people where id > 0").fetchall() == [
            ("186****4187",)]
        pg.psql("ALTER TABLE public.rl_people RENAME COLUMN phone TO mobile")

        def refused() -> bool:
            try:
                conn.execute("select mobile from rl_people where id > 0").fetchall()
            except pg_errors.InsufficientPrivilege as exc:
                assert "public.rl_people.phone" in str(exc) and "renamed or dropped" in str(exc)
                return True
            except pg_errors.UndefinedColumn:
                pass  # the old catalog until pgveil's poll: phone is gone
            return False

        wait_until(refused)
        for sql in ("select * from rl_people where id > 0",
                    "select id from public.rl_people where id = 1"):
            with pytest.raises(pg_errors.InsufficientPrivilege):
                conn.execute(sql).fetchall()
    with connect(proc, "teller_sz01") as fresh, pytest.raises(pg_errors.InsufficientPrivilege):
        fresh.execute("select * from rl_people where id = 1").fetchall()
    with connect(proc, "dba") as dba:
        assert len(dba.execute("select mobile from rl_people").fetchall()) == 2


def test_a_reload_that_protects_an_existing_table_reads_its_columns(
        pgveil_factory: Factory, policy_file: Path, people: Any) -> None:
    proc = pgveil_factory(policy_path=policy_file)
    with connect(proc, "teller_sz01") as conn:
        assert conn.execute("select phone from rl_people order by id").fetchall() == [
            ("18600314187",), ("18600000002",)]  # not protected yet
        time.sleep(2.5)  # past the catalog watcher's first poll, which reloads once anyway
        edit_policy(policy_file, protect_people)
        bump_mtime(policy_file)
        wait_until(lambda: reloads(proc, "ok") >= 1)
        # within a moment, not at the next catalog refresh (300 s)

        def masked_rows() -> bool:
            try:
                rows = conn.execute("select id, phone from rl_people where id > 0").fetchall()
            except pg_errors.UndefinedColumn:
                return False  # the columns are not read yet: an error, never a raw value
            assert rows == [(1, "186****4187")]
            return True

        wait_until(masked_rows, timeout=3)


def test_a_login_the_policy_drops_is_refused_customer_data(pgveil_factory: Factory,
                                                           policy_file: Path,
                                                           pg: PostgresCluster) -> None:
    """The reloaded policy has no operator for teller_sz* and no default role: the open
    session's statements on customer data -- views created since included -- are refused."""
    proc = pgveil_factory(policy_path=policy_file)
    pg.psql("DROP VIEW IF EXISTS public.rl_v; CREATE VIEW public.rl_v AS SELECT id, phone "
            "FROM public.customers; GRANT SELECT ON public.rl_v TO PUBLIC", db="bank")
    try:
        with connect(proc, "teller_sz01") as conn:
            assert conn.execute(PHONE_SQL).fetchone() is not None
            edit_policy(policy_file, _drop_tellers)
            bump_mtime(policy_file)

            def refused(sql: str) -> bool:
                try:
                    conn.execute(sql).fetchall()
                except pg_errors.InsufficientPrivilege as exc:
                    return "no longer matched" in str(exc) or "rl_v" in str(exc)
                return False

            wait_until(lambda: refused(PHONE_SQL))
            assert refused("select phone from rl_v where id = 3")
            assert refused("select count(*) from public.accounts")
            assert conn.execute("select 1").fetchone() == (1,)  # the connection stays up
        with pytest.raises(psycopg.OperationalError):
            connect(proc, "teller_sz01").close()
    finally:
        pg.psql("DROP VIEW IF EXISTS public.rl_v", db="bank")


def test_a_replacement_keeping_the_mtime_is_noticed(pgveil_factory: Factory,
                                                   policy_file: Path, phone3: str) -> None:
    """cp -p / rsync -t keep the mtime: the inode, size and change time still tell."""
    proc = pgveil_factory(policy_path=policy_file)
    mtime = policy_file.stat().st_mtime_ns
    with connect(proc, "teller_sz01") as conn:
        assert conn.execute(PHONE_SQL).fetchone() == (masked(phone3),)
        edit_policy(policy_file, teller_clearance(1))
        os.utime(policy_file, ns=(mtime, mtime))
        wait_until(lambda: conn.execute(PHONE_SQL).fetchone() == (phone3,))


def _to_gz01(policy: dict[str, Any]) -> None:
    for o in policy["operators"]:
        if o["match"].get("user") == "teller_sz*":
            o["attributes"]["branch"] = "GZ01"


def _drop_tellers(policy: dict[str, Any]) -> None:
    policy["operators"] = [o for o in policy["operators"]
                           if o["match"].get("user") != "teller_sz*"]
    del policy["roles"]["default"]


CURSOR_SQL = "select id, phone from customers where id > 0 order by id"


def _read_after_reload(proc: PgveilProcess, policy_file: Path,
                       change: Callable[[dict[str, Any]], None] | None,
                       refusal: str) -> psycopg.Connection[Any]:
    """Open a WITH HOLD cursor ``c`` (SQL) and a protocol portal ``p``, read 3 rows of each,
    reload the policy with ``change``, and check that reading on from either is refused
    (``refusal``: the SQL error's message). Returns the SQL connection, still open."""
    from tests.harness.wire import SYNC, Wire, bind, execute, parse, query

    sql_conn = connect(proc, "teller_sz01")
    with connect(proc, "teller_sz01", autocommit=False) as wire_conn:
        w = Wire(wire_conn)
        try:
            sql_conn.execute(f"declare c cursor with hold for {CURSOR_SQL}")
            assert len(sql_conn.execute("fetch 3 from c").fetchall()) == 3
            w.batch(query("begin"))
            first = w.batch(parse(b"", CURSOR_SQL.encode()), bind(b"", portal=b"p"),
                            execute(b"p", 3), SYNC)
            assert first.rows == 3 and not first.sqlstates, first
            before = reloads(proc, "ok")
            edit_policy(policy_file, change)
            bump_mtime(policy_file)
            wait_until(lambda: reloads(proc, "ok") > before)
            with pytest.raises(pg_errors.InsufficientPrivilege, match=refusal):
                sql_conn.execute("fetch 5 from c").fetchall()
            later = w.batch(execute(b"p", 5), SYNC)
            assert later.rows == 0 and later.sqlstates == ["42501"], later
        finally:
            w.sock.detach()
    return sql_conn


def test_cursors_and_portals_opened_before_a_login_is_dropped_are_refused(
        pgveil_factory: Factory, policy_file: Path) -> None:
    """A WITH HOLD cursor or a protocol portal opened before the reload kept serving customer
    rows to the dropped login (masked, but past its revocation)."""
    proc = pgveil_factory(policy_path=policy_file)
    _read_after_reload(proc, policy_file, _drop_tellers, "no longer matched").close()


@pytest.mark.parametrize("change", ["clearance", "branch"])
def test_cursors_and_portals_opened_before_a_tightening_reload_are_refused(
        pgveil_factory: Factory, policy_file: Path, change: str) -> None:
    """A cursor or portal holds rows rewritten under the rules it was opened with: after a
    reload that shows its tables otherwise (the teller's clearance raised then lowered, the
    teller moved to another branch), reading on from it is refused."""
    if change == "clearance":
        edit_policy(policy_file, teller_clearance(1))  # identity raw, then masked again
    proc = pgveil_factory(policy_path=policy_file)
    tighten = None if change == "clearance" else _to_gz01
    with _read_after_reload(proc, policy_file, tighten, "changed since") as sql_conn:
        # a cursor declared now reads under the new rules
        sql_conn.execute("close c")
        sql_conn.execute(f"declare c cursor with hold for {CURSOR_SQL}")
        rows = sql_conn.execute("fetch 3 from c").fetchall()
        assert len(rows) == 3 and all("*" in r[1] for r in rows)


def test_a_redeclare_answered_after_a_reload_keeps_the_rules_it_was_rewritten_under(
        pgveil_factory: Factory, policy_file: Path) -> None:
    """DECLARE over a known cursor name is recorded when the server answers it; the session
    may have taken a reloaded policy by then, and the cursor holds rows of the old branch."""
    from tests.harness.wire import Wire, query

    proc = pgveil_factory(policy_path=policy_file)
    conn = connect(proc, "teller_sz01")
    w = Wire(conn)
    try:
        w.batch(query(f"declare c1 cursor with hold for {CURSOR_SQL}"))
        w.batch(query("close c1"))
        before = reloads(proc, "ok")
        w.sock.sendall(query(f"select pg_sleep(2); declare c1 cursor with hold for {CURSOR_SQL}"))
        edit_policy(policy_file, _to_gz01)
        bump_mtime(policy_file)
        wait_until(lambda: reloads(proc, "ok") > before)
        w.sock.sendall(query("select 1"))  # the session takes the new view meanwhile
        w.messages(2)
        got = w.batch(query("fetch 5 from c1"))
        assert got.rows == 0 and got.sqlstates == ["42501"], got
    finally:
        w.sock.detach()
        conn.close()


@pytest.mark.parametrize("change", ["same-content", "another-role"])
def test_a_reload_that_changes_nothing_for_the_tables_keeps_cursors_open(
        pgveil_factory: Factory, policy_file: Path, change: str) -> None:
    """Long reads (a JDBC fetchSize portal, a WITH HOLD cursor) survive a reload that does not
    change how their tables look to the operator."""
    from tests.harness.wire import SYNC, Wire, bind, execute, parse, query

    def other(policy: dict[str, Any]) -> None:
        policy["roles"]["manager"]["max_rows"] = 999

    proc = pgveil_factory(policy_path=policy_file)
    conn = connect(proc, "teller_sz01", autocommit=False)
    w = Wire(conn)
    try:
        w.batch(query(f"declare c1 cursor with hold for {CURSOR_SQL}"))
        w.batch(query("begin"))
        first = w.batch(parse(b"", CURSOR_SQL.encode()), bind(b"", portal=b"pp"),
                        execute(b"pp", 2), SYNC)
        assert first.rows == 2, first
        before = reloads(proc, "ok")
        edit_policy(policy_file, other if change == "another-role" else None)
        bump_mtime(policy_file)
        wait_until(lambda: reloads(proc, "ok") > before)
        assert w.batch(query("fetch 3 from c1")).rows == 3
        later = w.batch(execute(b"pp", 3), SYNC)
        assert later.rows == 3 and not later.sqlstates, later
        w.batch(query("rollback"))
    finally:
        w.sock.detach()
        conn.close()
