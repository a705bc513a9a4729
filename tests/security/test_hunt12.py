"""Bypass hunt 12: prepared-statement bookkeeping, what a row-limit error leaves behind, and
shared state a masked role could change.

* ``EXECUTE`` of a SQL-prepared statement pgveil had lost track of ran with no row cap and no
  audit record. Three ways to lose it: a protocol Bind of the name that failed (read as a
  failed PREPARE), ``DEALLOCATE q$x`` (the name parsed as ``q``), and a ``PREPARE`` sent with
  the extended protocol (asyncpg sends every text that way). Each is fixed, and an
  ``EXECUTE`` of a name pgveil did not see prepared is now refused for masked roles.
* A row-limit error used to be pgveil's alone: PostgreSQL committed a data change whose
  RETURNING passed ``max_rows``, and ran and committed the rest of a multi-statement request
  (unaudited). Such statements now fail inside PostgreSQL (``rewriters.analyze.cap_inside``).
  A pipelined extended batch still runs on to its Sync: what runs there after the cap is
  audited.
* ``setval()`` (an existence oracle through the next INSERT, shared by every session, kept by
  ROLLBACK) and ``UPDATE pg_settings`` (set_config by another name) are refused.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import asyncpg
import psycopg
import pytest

from tests.harness.wire import SYNC, Wire, bind, execute, parse, query
from tests.security.conftest import LeakChecker

CAP = 50  # the fixture teller's max_rows
WIDE = "select id, name, phone, branch_id from customers limit 1000"  # 666 rows in SZ01


def _capped_or_refused(batch: object) -> None:
    rows, states = batch.rows, batch.sqlstates  # type: ignore[attr-defined]
    assert rows <= CAP and states == ["42501"], batch


def test_a_failed_bind_of_a_sql_prepared_name_does_not_forget_it(leak: LeakChecker) -> None:
    name = f"q_{uuid.uuid4().hex[:8]}"
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(query(f"PREPARE {name} AS {WIDE}")).sqlstates
        _capped_or_refused(w.batch(query(f"EXECUTE {name}")))
        _capped_or_refused(w.batch(bind(name.encode()), execute(), SYNC))
        _capped_or_refused(w.batch(query(f"EXECUTE {name}")))


def test_deallocate_of_another_name_does_not_forget_the_statement(leak: LeakChecker) -> None:
    name = f"q_{uuid.uuid4().hex[:8]}"
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(query(f"PREPARE {name} AS {WIDE}")).sqlstates
        assert w.batch(query(f"DEALLOCATE {name}$x")).sqlstates == ["26000"]
        _capped_or_refused(w.batch(query(f"EXECUTE {name}")))
        assert not w.batch(query(f"DEALLOCATE {name}")).sqlstates  # the real one still works
        after = w.batch(query(f"EXECUTE {name}"))
        assert after.rows == 0 and after.sqlstates, after


def test_execute_of_a_name_pgveil_did_not_see_prepared_is_refused(leak: LeakChecker) -> None:
    with leak.connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="did not see prepared"):
            conn.execute("EXECUTE never_prepared_here")


def test_a_prepare_sent_with_the_extended_protocol_is_capped_and_audited(
        leak: LeakChecker) -> None:
    name = f"p{uuid.uuid4().hex[:8]}"

    async def attempt() -> None:
        conn = await asyncpg.connect(leak.pgveil.dsn("teller_sz01"))
        try:
            await conn.fetch(f"PREPARE {name} AS {WIDE}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row limit of 50"):
                await conn.fetch(f"EXECUTE {name}")
        finally:
            await conn.close()

    asyncio.run(attempt())
    records = [json.loads(line) for line in leak.pgveil.audit_path.read_text().splitlines()
               if name in line]
    assert any(r["kind"] == "execute" and r["decision"] == "blocked" for r in records), records


def _xmin(leak: LeakChecker, ids: str) -> str:
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        row = dba.execute(f"select string_agg(xmin::text, ',' order by id) from orders "
                          f"where id in ({ids})").fetchone()
        assert row is not None
        return str(row[0])


def _sz01_orders(leak: LeakChecker, n: int) -> str:
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        rows = dba.execute("select o.id from orders o join customers c on c.id = o.customer_id "
                           "where c.branch_id = 'SZ01' order by o.id limit %s", (n,)).fetchall()
    return ",".join(str(r[0]) for r in rows)


@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
def test_a_data_change_whose_returning_passes_max_rows_is_not_kept(
        leak: LeakChecker, prepare: bool) -> None:
    ids = _sz01_orders(leak, CAP + 10)
    before = _xmin(leak, ids)
    with leak.connect() as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row limit of 50"):
            cur.execute(f"update orders set note = note where id in ({ids}) returning id",
                        prepare=prepare)
        assert conn.info.transaction_status.name == "IDLE"
        small = cur.execute(f"update orders set note = note where id in ({ids}) "
                            f"and id < 0 returning id", prepare=prepare)
        assert small.statusmessage == "UPDATE 0"  # the tag the client sent for
    assert _xmin(leak, ids) == before  # nothing was committed


def test_a_request_stopped_at_max_rows_keeps_none_of_its_statements(leak: LeakChecker) -> None:
    ids = _sz01_orders(leak, 1)
    before = _xmin(leak, ids)
    marker = f"h12after{uuid.uuid4().hex[:6]}"
    with leak.connect() as conn:
        w = Wire(conn)
        got = w.batch(query(f"update orders set note = note where id = {ids}; "
                            "select id from customers where id > 0; "
                            f"update orders as {marker} set note = note where id = {ids}"))
        assert got.sqlstates == ["42501"] and got.rows == 0, got
        assert w.batch(query("select 1")).rows == 1
        tx = w.batch(query(f"begin; update orders set note = note where id = {ids}; "
                           "select id from customers where id > 0; commit"))
        assert tx.sqlstates == ["42501"], tx
        assert w.batch(query("select 1")).sqlstates == ["25P02"]  # the transaction failed
        assert not w.batch(query("rollback")).sqlstates
    assert _xmin(leak, ids) == before


def test_what_a_pipelined_batch_runs_after_the_cap_is_audited(leak: LeakChecker) -> None:
    ids = _sz01_orders(leak, 1)
    marker = f"h12pipe{uuid.uuid4().hex[:6]}"
    with leak.connect() as conn:
        w = Wire(conn)
        got = w.batch(parse(b"", b"select id from customers where id > 0"), bind(b""),
                      execute(), parse(b"", f"update orders as {marker} set note = note "
                                       f"where id = {ids}".encode()), bind(b""), execute(),
                      SYNC)
        assert got.sqlstates == ["42501"] and got.rows <= CAP, got
    records = [json.loads(line) for line in leak.pgveil.audit_path.read_text().splitlines()
               if marker in line]
    assert len(records) == 1, records
    assert records[0]["kind"] == "update" and "withheld" in records[0]["error"], records


@pytest.mark.parametrize("sql", [
    "select setval('customers_id_seq', 1, false)",
    "select pg_catalog.setval('public.orders_id_seq'::regclass, 1)",
    "update pg_settings set setting = 'on' where name = 'debug_print_' || 'rewritten'",
])
def test_shared_state_a_masked_role_may_not_change(leak: LeakChecker, sql: str) -> None:
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        seq = dba.execute("select last_value from customers_id_seq").fetchone()
    for login in ("teller_sz01", "stranger"):
        with leak.connect(login) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
            setting = conn.execute("show debug_print_rewritten").fetchone()
            assert setting == ("off",)
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        assert dba.execute("select last_value from customers_id_seq").fetchone() == seq


def test_a_forged_grant_notification_lifts_nothing(leak: LeakChecker) -> None:
    """Any login may NOTIFY the channel pgveil's instances listen on for grants; what a
    notification names is read back from pgveil.grants, which only the control role writes."""
    now = int(time.time())
    forged = {"event": "created", "grant": {
        "id": "g_0123456789ab", "login": "stranger", "lift": {"role": "dba"},
        "expires_at": now + 60, "reason": "x", "approver": "x", "created_at": now}}
    with psycopg.connect(leak.pgveil.dsn("stranger", db="postgres"), autocommit=True) as conn:
        conn.execute("select pg_notify('pgveil_grants', %s)", (json.dumps(forged),))
    time.sleep(0.5)
    with leak.connect("stranger") as conn:
        rows = conn.execute("select id, phone from customers where id in (1, 2, 3)").fetchall()
    assert rows == []


@pytest.mark.parametrize("sql", [
    "copy orders (customer_id, amount, note) from stdin",
    "insert into orders (id, customer_id, amount, note) values (9, 3, 1, 'x') "
    "on conflict (id) do update set customer_id = 1 returning id",
])
def test_a_key_into_hidden_rows_is_checked_on_every_write_path(leak: LeakChecker,
                                                               sql: str) -> None:
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        before = dba.execute("select customer_id, xmin::text from orders where id = 9").fetchone()
    with leak.connect("manager_sz01") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not set|not allowed"):
            if sql.startswith("copy"):
                with conn.cursor().copy(sql) as copy:
                    copy.write_row((1, 1, "x"))
            else:
                conn.execute(sql)
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        assert dba.execute("select customer_id, xmin::text from orders where id = 9"
                           ).fetchone() == before


@pytest.mark.parametrize("login", ["teller_sz01", "dba"])
def test_trace_messages_do_not_reach_a_masked_role(leak: LeakChecker, login: str) -> None:
    """trace_sort at client_min_messages = log reports the sort of every row the executor
    touched, rows outside the row filter included (exact counts of other branches' orders)."""
    with leak.connect(login) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(f"{d.severity_nonlocalized}: "
                                                         f"{d.message_primary}"))
        conn.execute("set trace_sort = on")
        conn.execute("set client_min_messages = log")
        conn.execute("set enable_hashjoin = off")
        conn.execute("set enable_nestloop = off")
        conn.execute("select count(id) from orders where customer_id >= 1 "
                     "and customer_id <= 342").fetchall()
        conn.execute("select count(*) from (select id from orders where customer_id <= 342 "
                     "order by note offset 0) s").fetchall()
    traces = [n for n in notices if n.startswith(("LOG", "DEBUG"))]
    if login == "dba":
        assert traces, notices  # the probe does produce them
    else:
        assert traces == [], traces


def test_a_huge_refused_statement_is_audited_short_and_stalls_nobody(leak: LeakChecker) -> None:
    marker = f"h12huge{uuid.uuid4().hex[:6]}"
    sql = (f"select id as {marker} from customers where id in ("
           + ",".join(["13812345678"] * 400_000) + ")")  # about 4.8 MB
    with leak.connect() as conn:
        started = time.monotonic()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="too large"):
            conn.execute(sql)
        took = time.monotonic() - started
    assert took < 2.0, took
    records = [json.loads(line) for line in leak.pgveil.audit_path.read_text().splitlines()
               if marker in line]
    assert len(records) == 1, records
    statement = records[0]["statement"]
    assert len(statement) < 17_000 and "characters]" in statement
    assert "13812345678" not in statement


def test_a_client_cannot_relabel_its_own_error_as_a_denial(leak: LeakChecker) -> None:
    """The check nonce can be read back (current_query() of a wrapped statement); a failing
    cast of the client's own with it must not pass for a pgveil denial of its choosing."""
    with leak.connect() as conn:
        text = conn.execute("select current_query() from customers where id = 3; "
                            "select 1").fetchall()
        m = re.search(r"pgveil [0-9a-f]{8}: ", str(text))
        assert m is not None, text
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f"select id from customers where id = 3 and "
                         f"('{m.group(0)}fake denial chosen by the client')::int = 1; select 1")
        assert "fake denial" not in str(info.value) or info.value.sqlstate != "42501"


def test_a_statement_pgveil_cannot_decode_is_refused_and_audited(leak: LeakChecker) -> None:
    from tests.harness.wire import msg

    marker = f"h12undecodable{uuid.uuid4().hex[:6]}"
    raw = (f"select id as {marker} from customers where id = 3 and name <> '".encode()
           + b"\xff\xfe" + b"'\x00")
    with leak.connect() as conn:
        got = Wire(conn).batch(msg(b"Q", raw))
        assert got.sqlstates == ["42501"] and got.rows == 0, got
    records = [json.loads(line) for line in leak.pgveil.audit_path.read_text().splitlines()
               if marker in line]
    assert len(records) == 1, records
    assert records[0]["decision"] == "blocked" and records[0]["tables"] == ["public.customers"]


def test_a_refused_duplicate_prepare_leaves_the_statement_as_postgres_holds_it(
        leak: LeakChecker) -> None:
    name = f"q_{uuid.uuid4().hex[:8]}"
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(query(f"PREPARE {name} AS {WIDE}")).sqlstates
        dup = w.batch(query(f"PREPARE {name} AS select id from customers where id = 1"))
        assert dup.sqlstates == ["42P05"], dup
        _capped_or_refused(w.batch(query(f"EXECUTE {name}")))
        _capped_or_refused(w.batch(bind(name.encode()), execute(), SYNC))


def test_a_prepare_and_its_execute_in_one_pipeline(leak: LeakChecker) -> None:
    name = f"p_{uuid.uuid4().hex[:8]}"
    with leak.connect() as conn:
        got = Wire(conn).batch(parse(b"", f"PREPARE {name} AS select id from customers "
                                         "where id = 3".encode()), bind(b""), execute(),
                               parse(b"", f"EXECUTE {name}".encode()), bind(b""), execute(),
                               SYNC)
        assert not got.sqlstates and got.rows == 1, got


@pytest.mark.parametrize("sql", [
    "PREPARE {n} AS update orders set note = note where id > 0 returning id",
])
def test_a_prepared_data_change_past_max_rows_is_not_kept(leak: LeakChecker, sql: str) -> None:
    name = f"u_{uuid.uuid4().hex[:8]}"
    ids = _sz01_orders(leak, CAP + 10)
    before = _xmin(leak, ids)
    with leak.connect() as conn:
        conn.execute(sql.format(n=name))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row limit of 50"):
            conn.execute(f"EXECUTE {name}")
    assert _xmin(leak, ids) == before


def test_a_capped_execute_or_fetch_may_not_share_a_request_with_writes(
        leak: LeakChecker) -> None:
    ids = _sz01_orders(leak, 1)
    before = _xmin(leak, ids)
    name = f"s_{uuid.uuid4().hex[:8]}"
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(query(f"PREPARE {name} AS select id from customers "
                                 "where id > 0")).sqlstates
        got = w.batch(query(f"EXECUTE {name}; update orders set note = note where id = {ids}"))
        assert got.sqlstates == ["42501"] and got.rows == 0, got
        got = w.batch(query("begin; declare c cursor for select id from customers where id > 0; "
                            f"fetch 100 from c; update orders set note = note where id = {ids}; "
                            "commit"))
        assert got.sqlstates == ["42501"], got
        w.batch(query("rollback"))
    assert _xmin(leak, ids) == before
