"""Bypass hunt 13: what pgveil and PostgreSQL each believe after a request pgveil cut short.

* A ``SET standard_conforming_strings = off`` or ``SET client_encoding`` sharing a simple
  Query with an ``EXECUTE`` stopped at ``max_rows`` took effect in PostgreSQL, but its
  ParameterStatus was dropped with the rest of the request: pgveil kept lexing with the old
  settings, so a later statement hid a subquery over ``customers`` inside what pgveil read as a
  string literal and PostgreSQL ran it raw. ParameterStatus is now recorded and passed on even
  while the rest of a request is discarded.
* Plain ``EXPLAIN`` printed the planner's row estimates. They come from statistics over every
  row of the table: a probe value on a histogram bound prints an exact round number, and a
  binary search on it read raw phones of other branches (manager) and order amounts (teller).
  A masked role's EXPLAIN on protected data now runs with ``COSTS OFF``.
* A client could Close pgveil's own upstream statement ``pgveil_1`` (the rewritten lookup its
  hot path binds by name) and Parse its own text under that name: the next lookup of the shape
  ran the client's ``DECLARE ... CURSOR`` over 666 rows, past the row cap and unaudited. Names
  beginning with ``pgveil_`` are now refused in Parse, Close, Bind, ``PREPARE`` and
  ``DEALLOCATE``.
* A simple Query or FunctionCall sent after a failing Bind and before its Sync is skipped by
  PostgreSQL, but pgveil waited for its answer: every later request got the previous one's
  answer (a capped read's 666 rows among them, audited as one row). pgveil now ends such a
  batch with a Sync of its own first, and runs or skips the Query once it knows.
* After an ``EXECUTE`` stopped at ``max_rows``, the rows of the next statement of the same
  Query still reached the client behind the error (pg8000 broke on them), and a data-modifying
  ``WITH`` or a ``COMMIT`` next to it ran and was kept while the client was told the request
  failed. Those rows are dropped now, and such companions refuse the EXECUTE.
* A data change inside ``WITH`` escaped what a top-level one meets: the manager inserted 1100
  orders past his 1000-row cap (kept), pointed an order at a hidden customer (the foreign-key
  guard), and the teller copied all 666 SZ01 customers into ``branches``. A data-modifying
  ``WITH`` in a statement on protected data is now refused for masked roles.
"""
from __future__ import annotations

import asyncio
import struct
import uuid

import asyncpg
import psycopg
import pytest

from tests.harness.wire import SYNC, Wire, bind, close_statement, execute, msg, parse, query
from tests.security.conftest import LeakChecker

OTHER = 1  # a GZ01 customer: outside the teller's branch
HIDDEN = ("(SELECT concat_ws(chr(32), id, name, phone, id_number, email, branch_id) "
          f"FROM customers WHERE id = {OTHER})")


def _cap_with(conn: psycopg.Connection, setting: str) -> None:
    """A prepared read past max_rows, executed in one Query after ``setting``."""
    name = f"q_{uuid.uuid4().hex[:8]}"
    conn.execute(f"PREPARE {name} AS SELECT id FROM customers WHERE id > 0")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row limit of 50"):
        conn.execute(f"{setting}; EXECUTE {name}")


@pytest.mark.parametrize("login", ["teller_sz01", "auditor1"])
def test_a_setting_changed_next_to_a_capped_execute_reaches_the_lexer(
        leak: LeakChecker, login: str) -> None:
    with leak.connect(login) as conn:
        if login == "auditor1":  # max_rows 10000: a wider read to pass it
            name = f"q_{uuid.uuid4().hex[:8]}"
            conn.execute(f"PREPARE {name} AS SELECT a.id FROM customers a "
                         "CROSS JOIN generate_series(1, 6) g WHERE a.id > 0")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row limit"):
                conn.execute("SET standard_conforming_strings = off; "
                             f"EXECUTE {name}")
        else:
            _cap_with(conn, "SET standard_conforming_strings = off")
        # the client was told too: its driver escapes for the server's setting
        assert conn.info.parameter_status("standard_conforming_strings") == "off"
        leak.assert_no_leak(
            "SELECT 'a\\' AS x, ' AS y, " + HIDDEN + " AS p, ' AS z -- '",
            login=login, conn=conn)


def test_a_client_encoding_changed_next_to_a_capped_execute_reaches_the_lexer(
        leak: LeakChecker) -> None:
    with leak.connect() as conn:
        _cap_with(conn, "SET client_encoding = 'GBK'")
        assert conn.info.parameter_status("client_encoding") == "GBK"
        w = Wire(conn)
        # sent as UTF-8 bytes: in GBK the backslash is the second byte of a character
        sql = "SELECT E'\u4e2d\\' AS x, " + HIDDEN + " AS p, ' AS z -- '"
        w.sock.sendall(msg(b"Q", sql.encode("utf-8") + b"\x00"))
        answer = b"".join(body for _, body in w.messages())
        raw = leak.secrets.customer(OTHER)
        for value in (raw.phone, raw.id_number, raw.email):
            assert value.encode() not in answer, answer
        assert not w.batch(query("SET client_encoding = 'UTF8'")).sqlstates
        w.sock.detach()  # the fd is psycopg's to close


@pytest.mark.parametrize(("login", "sql"), [
    ("manager_sz01", "EXPLAIN SELECT 1 FROM customers c JOIN generate_series(1, 1000000000000) g "
                     "ON (c.phone > '13505445908' OR g IS NULL)"),
    ("teller_sz01", "EXPLAIN (FORMAT JSON, COSTS true) SELECT id FROM orders WHERE amount > 969.91"),
    ("teller_sz01", "EXPLAIN SELECT id FROM customers WHERE branch_id <> 'GZ01'"),
])
def test_explain_prints_no_estimates_for_a_masked_role(
        leak: LeakChecker, login: str, sql: str) -> None:
    with leak.connect(login) as conn:
        plan = "\n".join(str(row[0]) for row in conn.execute(sql).fetchall())
    assert plan and "rows=" not in plan and "Plan Rows" not in plan and "cost=" not in plan, plan
    with leak.connect("dba") as conn:  # unmasked: the plan as PostgreSQL prints it
        plan = "\n".join(str(row[0]) for row in conn.execute(sql).fetchall())
    assert "rows=" in plan or "Plan Rows" in plan, plan


def test_a_client_cannot_take_over_pgveils_own_statements(leak: LeakChecker) -> None:
    lookup = "SELECT name FROM customers WHERE id = {}"
    with leak.connect() as conn:
        w = Wire(conn)
        for cid in (3, 6, 9):  # a repeated shape: pgveil prepares it upstream as pgveil_N
            assert w.batch(query(lookup.format(cid))).rows == 1
        own = [r[0] for r in conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgveil%'").fetchall()]
        assert own, "pgveil prepared no statement of its own for the repeated lookup"
        name = own[0].encode()
        takeover = b"DECLARE c CURSOR WITH HOLD FOR SELECT id, phone FROM customers WHERE id > 0"
        for attempt in ((close_statement(name), SYNC), (parse(name, takeover), SYNC),
                        (query(f"DEALLOCATE {own[0]}"),), (query(f"DEALLOCATE PREPARE \"{own[0]}\""),),
                        (query(f"PREPARE {own[0].upper()} AS SELECT 1"),)):
            assert w.batch(*attempt).sqlstates == ["42501"], attempt
        got = w.batch(query(lookup.format(0)))
        assert got.sqlstates == [] and "C" in got.types, got
        assert w.batch(query("FETCH ALL FROM c")).sqlstates, "a cursor c exists"
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements "
                            "WHERE name = %s", (own[0],)).fetchone() == (1,)
        w.sock.detach()  # the fd is psycopg's to close


@pytest.mark.parametrize("inside", [
    query("SELECT 1"),
    query("SELECT name FROM customers WHERE id = 3"),
    msg(b"F", struct.pack("!IHHIH", 1598, 0, 0, 0, 0)),  # FunctionCall of random()
])
def test_a_query_skipped_inside_a_failed_batch_leaves_pgveil_in_step(
        leak: LeakChecker, inside: bytes) -> None:
    with leak.connect() as conn:
        w = Wire(conn)
        for _ in range(3):  # pgveil knows the lookup's shape: it would prepare it upstream
            assert w.batch(query("SELECT name FROM customers WHERE id = 3")).rows == 1
        # PostgreSQL skips the Query (or FunctionCall) after the failed Bind: one error, and
        # one ReadyForQuery, the Sync's
        got = w.batch(bind(b"no_such_statement"), inside, SYNC)
        assert got.types == ["E", "Z"] and got.sqlstates == ["26000"], got
        got = w.batch(query("SELECT id, name FROM customers WHERE id > 0"))
        assert got.sqlstates == ["42501"] and got.rows <= 50, got
        assert w.batch(query("SELECT 7")).rows == 1
        w.sock.detach()  # the fd is psycopg's to close


@pytest.mark.parametrize("opener", [
    close_statement(b"pgveil_1"),  # refused by pgveil: its raise starts PostgreSQL's skip
    msg(b"C", b"X\x00"),  # a Close of no known kind: 08P01 from PostgreSQL, then the skip
    msg(b"H", b"junk"),  # a Flush with a body: the same
])
def test_a_query_behind_a_failed_close_or_flush_is_skipped_too(
        leak: LeakChecker, opener: bytes) -> None:
    with leak.connect() as conn:
        w = Wire(conn)
        got = w.batch(opener, query("SELECT 1 AS skipped_by_postgres"), SYNC)
        assert got.types == ["E", "Z"], got
        got = w.batch(query("SELECT c.id, c.phone FROM customers c WHERE c.id > 0"))
        assert got.sqlstates == ["42501"] and got.rows <= 50, got
        assert w.batch(query("SELECT 7")).rows == 1
        w.sock.detach()


def test_a_query_behind_an_execute_that_may_start_copy_ends_the_connection(
        leak: LeakChecker) -> None:
    """PostgreSQL, reading COPY data, would ignore pgveil's Sync while pgveil held the data."""
    with leak.connect() as conn:
        w = Wire(conn)
        w.sock.sendall(parse(b"", b"COPY branches FROM STDIN") + bind(b"") + execute()
                       + query("SELECT 42"))
        answer = w.buf
        while chunk := w.sock.recv(65536):  # up to pgveil closing the connection
            answer += chunk
        w.sock.detach()
        assert b"C08P01" in answer and b"COPY FROM STDIN" in answer, answer


def test_a_query_after_a_flushed_describe_runs(leak: LeakChecker) -> None:
    """asyncpg prepares with Parse, Describe and Flush, and may send a Query next."""
    with leak.connect() as conn:
        w = Wire(conn)
        w.sock.sendall(parse(b"s1", b"SELECT id, phone FROM customers WHERE id = $1")
                       + msg(b"D", b"Ss1\x00") + msg(b"H", b""))
        got = w.batch(query("SELECT id, phone FROM customers WHERE id = 3"))
        assert got.types[:3] == ["1", "t", "T"] and got.rows == 1 and not got.sqlstates, got
        got = w.batch(bind(b"s1", b"6"), execute(), SYNC)
        assert got.rows == 1 and not got.sqlstates, got
        w.sock.detach()


def _direct(leak: LeakChecker, sql: str) -> list[tuple]:
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def test_nothing_of_a_request_reaches_the_client_after_a_capped_execute(
        leak: LeakChecker) -> None:
    name = f"p_{uuid.uuid4().hex[:8]}"
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(query(f"PREPARE {name} AS SELECT id, phone FROM customers "
                                 "WHERE id > 0")).sqlstates
        w.sock.sendall(query(f"EXECUTE {name}; SELECT id, phone FROM customers "
                             "WHERE id > 1000 LIMIT 40"))
        kinds = "".join(kind for kind, _ in w.messages())
        assert kinds.endswith("EZ") and kinds.count("E") == 1, kinds
        assert w.batch(query("SELECT 1")).rows == 1
        w.sock.detach()


@pytest.mark.parametrize("companion", [
    "WITH d AS (DELETE FROM branches WHERE id = 'QQ01' RETURNING id) SELECT * FROM d",
    "COMMIT",
])
def test_a_capped_execute_may_not_share_a_request_with_a_write_or_a_commit(
        leak: LeakChecker, companion: str) -> None:
    tag = f"hunt13-{uuid.uuid4().hex[:8]}"
    name = f"p_{uuid.uuid4().hex[:8]}"
    _direct(leak, f"INSERT INTO orders (customer_id, amount, note) VALUES (3, 1, '{tag}')")
    try:
        with leak.connect() as conn:
            conn.execute(f"PREPARE {name} AS SELECT id FROM customers WHERE id > 0")
            conn.execute("BEGIN")
            conn.execute(f"UPDATE orders SET note = 'changed' WHERE note = '{tag}'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"EXECUTE {name}; " + companion)
            conn.execute("ROLLBACK")
        assert _direct(leak, f"SELECT count(*) FROM orders WHERE note = '{tag}'") == [(1,)]
    finally:
        _direct(leak, f"DELETE FROM orders WHERE note IN ('{tag}', 'changed')")


@pytest.mark.parametrize(("login", "sql"), [
    ("manager_sz01", "WITH x AS (INSERT INTO orders (customer_id, amount, note) SELECT 3, 1, "
                     "'{tag}' FROM generate_series(1, 1100) RETURNING id) SELECT * FROM x"),
    ("manager_sz01", "WITH x AS (INSERT INTO orders (customer_id, amount, note) VALUES "
                     "(1, 1, '{tag}') RETURNING id) SELECT * FROM x"),  # 1: a GZ01 customer
    ("teller_sz01", "WITH x AS (INSERT INTO branches (id, name, city) SELECT 'Z' || id, name, "
                    "'{tag}' FROM customers WHERE id > 0 RETURNING 1) SELECT count(*) FROM x"),
    ("teller_sz01", "WITH d AS (UPDATE branches SET city = '{tag}' WHERE id = 'SZ01' "
                    "RETURNING id) SELECT c.id, c.phone FROM customers c WHERE c.id > 0 "
                    "LIMIT 60"),
])
def test_a_data_modifying_with_on_protected_data_is_refused(
        leak: LeakChecker, login: str, sql: str) -> None:
    tag = f"hunt13-{uuid.uuid4().hex[:8]}"
    with leak.connect(login) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="data-modifying WITH"):
            conn.execute(sql.format(tag=tag))
    assert _direct(leak, f"SELECT (SELECT count(*) FROM orders WHERE note = '{tag}') + "
                         f"(SELECT count(*) FROM branches WHERE city = '{tag}')") == [(0,)]


def test_deleting_a_branch_cannot_tell_whether_hidden_customers_reference_it(
        leak: LeakChecker) -> None:
    """``DELETE FROM branches WHERE id = 'BJ01'`` failed with a foreign-key error naming
    customers exactly when BJ01 has customers, none of them visible to a teller of SZ01."""
    with leak.connect("teller_sz01") as conn:
        for sql in ("DELETE FROM branches WHERE id = 'BJ01'",
                    "UPDATE branches SET id = 'XX01' WHERE id = 'BJ01'",
                    "WITH d AS (DELETE FROM branches WHERE id = 'BJ01' RETURNING id) "
                    "SELECT count(*) FROM d"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match="foreign-key error would tell"):
                conn.execute(sql)
        assert conn.execute("SELECT count(*) FROM branches WHERE id = 'BJ01'").fetchone() == (1,)
    with leak.connect("dba") as conn:  # the DBA's statement reaches PostgreSQL
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("DELETE FROM branches WHERE id = 'BJ01'")


def test_returning_of_masked_columns_gives_the_masked_row(leak: LeakChecker) -> None:
    """RETURNING that reads masked columns (``RETURNING *`` is what pgjdbc adds for
    getGeneratedKeys) used to be refused; it now runs over the masked row (SPEC: "RETURNING
    gives masked values"), with the command tag of the data change."""
    raw = leak.secrets.customer(3)  # an SZ01 customer
    with leak.connect() as conn:
        conn.execute("BEGIN")
        cur = conn.execute("UPDATE customers SET level = level WHERE id = 3 RETURNING *")
        row = dict(zip([d.name for d in cur.description], cur.fetchone(), strict=True))
        assert cur.statusmessage == "UPDATE 1" and cur.rowcount == 1
        assert row["id"] == 3 and row["phone"] != raw.phone and "*" in row["phone"], row
        assert raw.id_number not in str(row) and raw.phone not in str(row), row
        cur = conn.execute("INSERT INTO customers (name, phone, id_number, branch_id, level) "
                           "VALUES ('新客户', '13912345678', '110101199001011234', 'SZ01', 1) "
                           "RETURNING id, phone, customers")
        new_id, phone, whole = cur.fetchone()
        assert cur.statusmessage == "INSERT 0 1" and phone == "139****5678", (phone, whole)
        assert "13912345678" not in str(whole) and "110101199001011234" not in str(whole)
        # past max_rows PostgreSQL fails it as a whole: nothing is kept
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row limit of 50"):
            conn.execute("UPDATE customers SET level = level + 1 WHERE id > 0 RETURNING phone")
        conn.execute("ROLLBACK")
    assert _direct(leak, f"SELECT count(*) FROM customers WHERE id = {new_id}") == [(0,)]
    with leak.connect() as conn:  # out of the filter: nothing to return, nothing changed
        cur = conn.execute("UPDATE customers SET level = level WHERE id = 1 RETURNING *")
        assert cur.statusmessage == "UPDATE 0" and cur.fetchall() == []


def test_asyncpg_prepare_then_execute_after_an_earlier_error(leak: LeakChecker) -> None:
    """asyncpg prepares with Parse, Describe and Flush, then may send a simple Query. An error
    earlier in the session (answered in a read of its own) left a flag set that made pgveil
    skip that Query as if the batch had failed: the connection hung."""

    async def attempt() -> tuple[str, object]:
        conn = await asyncpg.connect(leak.pgveil.dsn("teller_sz01"))
        try:
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.execute("SELECT 1/0")
            await conn.execute("SET statement_timeout = 0")
            stmt = await conn.prepare("SELECT name FROM customers WHERE id = $1")
            tag = await asyncio.wait_for(conn.execute("SET application_name = 'legacy'"), 10)
            return tag, await asyncio.wait_for(stmt.fetchval(3), 10)
        finally:
            conn.terminate()

    tag, name = asyncio.run(attempt())
    assert tag == "SET" and name == leak.secrets.customer(3).name[0] + "*" * (
        len(leak.secrets.customer(3).name) - 1), name


@pytest.mark.parametrize("listing", [
    "(SELECT phone FROM pgveil_dml LIMIT 1)",
    '(SELECT max(phone) FROM "pgveil_dml")',
    "(SELECT phone FROM PGVEIL_DML LIMIT 1)",
])
def test_returning_cannot_read_the_raw_rows_it_is_evaluated_next_to(
        leak: LeakChecker, listing: str) -> None:
    leak.assert_no_leak(["BEGIN", "UPDATE customers SET level = level WHERE id = 3 RETURNING "
                         + listing, "ROLLBACK"], expect=None)
    with leak.connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil's own"):
            conn.execute("UPDATE customers SET level = level WHERE id = 3 RETURNING " + listing)


@pytest.mark.parametrize(("login", "sql"), [
    ("teller_sz01", "WITH accounts AS (SELECT 1 AS id, 'x'::text AS card_no) UPDATE customers "
                    "SET level = level WHERE id = 3 RETURNING phone, (SELECT card_no FROM "
                    "accounts WHERE id = <<id:accounts-other>>)"),
    ("teller_sz01", "WITH customers AS (SELECT 1 AS id, 'x'::text AS phone, 'x'::text AS name) "
                    "UPDATE public.customers SET level = level WHERE id = 3 RETURNING phone, "
                    "(SELECT row(name, phone)::text FROM customers WHERE id = 1)"),
    ("auditor1", "WITH accounts AS (SELECT 1 AS id, 'x'::text AS card_no) UPDATE customers "
                 "SET level = level WHERE id = 3 RETURNING phone, (SELECT card_no FROM "
                 "accounts WHERE id = 3)"),
])
def test_returning_keeps_the_scope_of_the_change(leak: LeakChecker, login: str,
                                                 sql: str) -> None:
    """Moved next to the masked row, RETURNING had lost the change's own WITH: a CTE named
    like a protected table shadowed it in the analysis and the real table answered."""
    sql = sql.replace("<<id:accounts-other>>", "3")
    with leak.connect(login) as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="WITH clause"):
            conn.execute(sql)
        conn.execute("ROLLBACK")
    leak.assert_no_leak(["BEGIN", sql, "ROLLBACK"], login=login)


@pytest.mark.parametrize("listing", ["count(*), max(phone)", "phone, generate_series(1, 3)"])
def test_returning_gives_one_row_per_changed_row(leak: LeakChecker, listing: str) -> None:
    """PostgreSQL refuses aggregates in RETURNING; over the masked row they would have packed
    666 changed rows into one, past max_rows, under the tag UPDATE 1."""
    with leak.connect() as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="one row per changed"):
            conn.execute(f"UPDATE customers SET level = level WHERE id IN (3, 6) "
                         f"RETURNING {listing}")
        conn.execute("ROLLBACK")


def test_delete_returning_and_a_column_labelled_returning(leak: LeakChecker) -> None:
    """DELETE ... RETURNING * (ORMs send it) was refused as if it had USING; a column
    labelled ``returning`` was taken for the RETURNING clause."""
    with leak.connect() as conn:
        conn.execute("BEGIN")
        new_id = conn.execute("INSERT INTO customers (name, phone, id_number, branch_id, level) "
                              "VALUES ('删除', '13800000009', '110101199001019999', 'SZ01', 1) "
                              "RETURNING id").fetchone()[0]
        cur = conn.execute(f"DELETE FROM customers WHERE id = {new_id} RETURNING *")
        row = cur.fetchone()
        assert cur.statusmessage == "DELETE 1" and "13800000009" not in str(row), row
        conn.execute("ROLLBACK")
    with leak.connect("auditor1") as conn:
        conn.execute("BEGIN")
        cur = conn.execute("INSERT INTO accounts (customer_id, card_no, balance, branch_id, "
                           "opened_on) SELECT customer_id, card_no AS returning, balance, "
                           "branch_id, opened_on FROM accounts WHERE id = 3 RETURNING card_no")
        (card,) = cur.fetchone()
        assert cur.statusmessage == "INSERT 0 1" and card.startswith("****"), card
        conn.execute("ROLLBACK")


def test_a_multi_column_set_meets_the_rules_of_each_column(leak: LeakChecker) -> None:
    """``SET (a, b) = (x, y)`` (some query builders send it) was refused outright."""
    with leak.connect() as conn:
        conn.execute("BEGIN")
        cur = conn.execute("UPDATE customers SET (level, address) = (2, '深圳') WHERE id = 3")
        assert cur.statusmessage == "UPDATE 1"
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row filter"):
            conn.execute("UPDATE customers SET (level, branch_id) = (2, 'GZ01') WHERE id = 3")
        conn.execute("ROLLBACK")
        cur = conn.execute("UPDATE customers SET (level, address) = (2, 'x') WHERE id = 1")
        assert cur.statusmessage == "UPDATE 0"  # a GZ01 customer: outside the filter


def test_a_prepare_run_after_a_capped_execute_stays_recorded(leak: LeakChecker) -> None:
    """PostgreSQL ran a PREPARE that followed an EXECUTE stopped at max_rows in one Query;
    pgveil, dropping the rest of that request, took it for failed and forgot it, so a protocol
    Bind of the name read all 666 SZ01 customers with no cap and no audit record."""
    s, yy = f"s_{uuid.uuid4().hex[:8]}", f"y_{uuid.uuid4().hex[:8]}"
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(query(f"PREPARE {s} AS SELECT id FROM customers WHERE id > $1")
                           ).sqlstates
        got = w.batch(query(f"EXECUTE {s}(0); PREPARE {yy} AS SELECT id, name, phone "
                            "FROM customers WHERE id > 0"))
        assert got.sqlstates == ["42501"] and got.rows <= 50, got
        got = w.batch(bind(yy.encode()), execute(), SYNC)
        assert got.rows <= 50 and got.sqlstates == ["42501"], got
        got = w.batch(query(f"DEALLOCATE {s}; EXECUTE {yy}"))  # known, so capped again
        assert got.rows <= 50 and got.sqlstates == ["42501"], got
        w.sock.detach()


def test_a_bind_of_a_name_pgveil_has_no_record_of_fails_like_an_unknown_one(
        leak: LeakChecker) -> None:
    """Each loss of track of a prepared statement so far ran rows past max_rows through a
    protocol Bind of its name: such a Bind now fails as one of an unknown name does, whatever
    the server holds, and the unnamed statement is left alone."""
    with leak.connect() as conn:
        w = Wire(conn)
        assert not w.batch(parse(b"", b"SELECT 41"), SYNC).sqlstates
        got = w.batch(bind(b"never_seen"), execute(), SYNC)
        assert got.sqlstates == ["26000"], got
        got = w.batch(bind(b""), execute(), SYNC)  # the unnamed statement is intact
        assert got.rows == 1 and not got.sqlstates, got
        w.sock.detach()


@pytest.mark.parametrize("messages", [
    lambda b: [parse(b + b"2", b"SELECT 1"), SYNC],
    lambda b: [parse(b"", b"SELECT id FROM customers WHERE id > 0"), bind(b"", portal=b + b"1"),
               execute(b + b"2"), SYNC],
    lambda b: [bind(b + b"2"), execute(), SYNC],
])
def test_names_longer_than_postgresql_keeps_end_the_connection(leak: LeakChecker,
                                                                messages: object) -> None:
    """PostgreSQL keys statements and portals on their first 63 bytes: two names pgveil told
    apart were one on the server, and a Bind of the harmless one ran a protected statement
    (666 rows, unaudited)."""
    base = b"n" * 63
    with leak.connect() as conn:
        w = Wire(conn)
        w.sock.sendall(b"".join(messages(base)))  # type: ignore[operator]
        answer = w.buf
        while chunk := w.sock.recv(65536):
            answer += chunk
        w.sock.detach()
    assert b"C08P01" in answer and b"longer than 63 bytes" in answer, answer
