"""Bulk export blocking (SPEC §5): COPY, the per-statement row cap counted on the wire,
unbounded reads, cursor drains and pg_dump — through real clients.

Why live: export limits are enforced on the wire (DataRows counted, the query cancelled
upstream, a 42501 put in its place), so only real clients show that the 51st row never arrives,
that the session survives and that client and server agree on the transaction state afterwards.

Each test reads as a *fresh teller login* of branch SZ01 (``teller_sz_<random>``, matched by the
policy's ``teller_sz*``): the teller quota (2000 rows an hour, shared through the control
database) then never carries over between tests or test files. The bank fixture puts customer
``g`` in SZ01 when ``g % 3 == 0``, so ``id <= 150`` holds exactly 50 SZ01 customers.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg2
import pytest
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from proxy.localpg import PostgresCluster, clean_env, client_binary, password_for
from tests.harness.pgveil_proc import PgveilProcess

CAP = 50
CAP_MESSAGE = "row limit of 50 exceeded for role teller"
OVER_CAP = "select id, name from customers where level >= 1"  # 666 SZ01 rows
EXACTLY_CAP = "select id, phone from customers where id <= 150"  # 50 SZ01 rows
ONE_OVER = "select id, phone from customers where id <= 153"  # 51 SZ01 rows


@pytest.fixture
def teller(pg: PostgresCluster) -> Iterator[str]:
    """A new SZ01 teller login (password ``pw_<login>``), dropped after the test."""
    login = f"teller_sz_{uuid.uuid4().hex[:10]}"
    pg.psql(f"create role {login} login password '{password_for(login)}'", db="postgres")
    try:
        yield login
    finally:
        pg.psql(f"drop role if exists {login}", db="postgres")


@pytest.fixture(scope="module")
def sz_phones(pg: PostgresCluster) -> list[str]:
    """Raw phone numbers of SZ01 customers: none may ever leave pgveil for a teller."""
    with psycopg.connect(pg.dsn("dba")) as conn:
        return [r[0] for r in conn.execute(
            "select phone from customers where branch_id = 'SZ01' order by id").fetchall()]


def run(cmd: list[str], stdin: str | None = None, timeout: float = 120) -> \
        subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=clean_env())


def alive(conn: psycopg.Connection[Any]) -> bool:
    return conn.execute("select 41 + 1").fetchone() == (42,)


# --------------------------------------------------------------------------- COPY TO


@pytest.mark.parametrize("sql", [
    "copy customers to stdout",
    "copy public.customers (phone, id_number) to stdout with (format csv, header)",
    "copy (select phone from customers where id < 100) to stdout",
    "copy (select * from accounts where customer_id < 10) to stdout (format binary)",
    "copy orders to stdout",
    "copy (with x as (select * from customers where id = 3) select * from x) to stdout",
    "copy (select c.phone from orders o join customers c on c.id = o.customer_id "
    "where o.id < 5) to stdout",
])
def test_copy_to_denied_for_teller(pgveil: PgveilProcess, teller: str, sql: str) -> None:
    with psycopg.connect(pgveil.dsn(teller), autocommit=True) as conn:
        received: list[Any] = []
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            with conn.cursor().copy(sql) as copy:
                received.extend(copy)
        assert received == []
        assert "not allowed" in str(info.value) and "teller" in str(info.value)
        assert alive(conn)


def test_copy_to_denied_inside_a_transaction(pgveil: PgveilProcess, teller: str) -> None:
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        assert alive(conn)
        with pytest.raises(pg_errors.InsufficientPrivilege):
            with conn.cursor().copy("copy customers to stdout") as copy:
                list(copy)
        assert conn.info.transaction_status is TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert alive(conn)


def test_psql_copy_and_backslash_copy_denied(pg: PostgresCluster, pgveil: PgveilProcess,
                                            teller: str, tmp_path: Path,
                                            sz_phones: list[str]) -> None:
    psql = client_binary(pg.bin_dir, "psql")
    out = tmp_path / "leak.csv"
    for command in (f"\\copy customers to '{out}' csv",
                    f"\\copy (select id, phone from customers where id < 300) to '{out}' csv",
                    "copy customers to stdout",
                    "copy (select phone from customers where id < 300) to stdout"):
        r = run([psql, "-X", pgveil.dsn(teller), "-v", "ON_ERROR_STOP=1", "-c", command])
        assert r.returncode != 0, command
        assert "not allowed" in r.stderr and "customers" in r.stderr, r.stderr
        leaked = r.stdout + (out.read_text() if out.exists() else "")
        assert not any(p in leaked for p in sz_phones), command
    # the same psql session carries on after the denial
    r = run([psql, "-X", "-qAt", pgveil.dsn(teller)],
            stdin="copy customers to stdout;\nselect count(*) from customers where id <= 30;\n")
    assert r.stdout.strip() == "10", r.stderr


async def test_asyncpg_copy_from_query_and_table_denied(pgveil: PgveilProcess,
                                                        teller: str) -> None:
    conn = await asyncpg.connect(pgveil.dsn(teller))
    try:
        sink = io.BytesIO()
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.copy_from_query("select phone from customers where id < $1", 100,
                                       output=sink)
        assert sink.getvalue() == b""
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.copy_from_table("customers", output=sink)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.copy_from_table("accounts", columns=["card_no", "balance"], output=sink,
                                       format="csv")
        assert sink.getvalue() == b""
        assert await conn.fetchval("select 7") == 7
    finally:
        await conn.close()


def test_dba_copy_equals_direct(pg: PostgresCluster, pgveil: PgveilProcess) -> None:
    def copy_out(dsn: str) -> bytes:
        buf = bytearray()
        with psycopg.connect(dsn) as conn:
            with conn.cursor().copy("copy customers to stdout") as copy:
                for chunk in copy:
                    buf += chunk
        return bytes(buf)

    via = copy_out(pgveil.dsn("dba"))
    assert via == copy_out(pg.dsn("dba"))
    assert via.count(b"\n") == 2000


def test_teller_copy_of_an_unprotected_table_works(pg: PostgresCluster, pgveil: PgveilProcess,
                                                   teller: str) -> None:
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        with conn.cursor().copy("copy branches to stdout") as copy:
            rows = list(copy.rows())
    assert len(rows) == 3


# --------------------------------------------------------------------------- COPY FROM


@pytest.mark.parametrize(("table", "row"), [
    ("customers (name, phone, id_number, branch_id)",
     ("王伟", "13800000000", "110105199001011234", "GZ01")),
    ("accounts (customer_id, card_no, balance, branch_id, opened_on)",
     (1, "6222020000000000", "1.00", "GZ01", "2024-01-01")),
    ("orders (customer_id, amount, note)", (1, "9.99", "copy-from-test")),
])
def test_copy_from_into_protected_tables_denied(pg: PostgresCluster, pgveil: PgveilProcess,
                                                teller: str, table: str,
                                                row: tuple[Any, ...]) -> None:
    name = table.split()[0]
    before = pg.psql(f"select count(*) from {name}").strip()
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        try:
            with pytest.raises(pg_errors.InsufficientPrivilege):
                with conn.cursor().copy(f"copy {table} from stdin") as copy:
                    copy.write_row(row)
        finally:
            conn.rollback()  # should it ever be accepted, leave the fixture data untouched
        assert alive(conn)
    assert pg.psql(f"select count(*) from {name}").strip() == before


async def test_asyncpg_copy_records_into_protected_table_denied(pg: PostgresCluster,
                                                                pgveil: PgveilProcess,
                                                                teller: str) -> None:
    before = pg.psql("select count(*) from orders").strip()
    conn = await asyncpg.connect(pgveil.dsn(teller))
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.copy_records_to_table(
                    "orders", records=[(3, 1, "x")], columns=["customer_id", "amount", "note"])
        finally:
            await tx.rollback()
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()
    assert pg.psql("select count(*) from orders").strip() == before


# --------------------------------------------------------------------------- max_rows


def test_exactly_max_rows_is_allowed_one_more_is_not(pgveil: PgveilProcess, teller: str) -> None:
    with psycopg.connect(pgveil.dsn(teller), autocommit=True) as conn:
        assert len(conn.execute(EXACTLY_CAP).fetchall()) == CAP
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            conn.execute(ONE_OVER).fetchall()
        assert CAP_MESSAGE in str(info.value)
        assert alive(conn)
        # the cap is per statement: several statements under it are all fine
        for _ in range(3):
            assert len(conn.execute("select id from customers where id <= 120").fetchall()) == 40


def test_the_51st_row_is_never_delivered(pgveil: PgveilProcess, teller: str) -> None:
    """psycopg's stream() hands over rows as they arrive (single-row mode)."""
    with psycopg.connect(pgveil.dsn(teller), autocommit=True) as conn:
        got: list[tuple[Any, ...]] = []
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            for row in conn.cursor().stream(OVER_CAP):
                got.append(row)
        assert len(got) == CAP
        assert info.value.diag.message_primary == CAP_MESSAGE
        assert conn.info.transaction_status is TransactionStatus.IDLE
        assert alive(conn)


@pytest.mark.parametrize("params", [None, (1,)], ids=["no-params", "bound-param"])
def test_cap_in_autocommit_keeps_the_session(pgveil: PgveilProcess, teller: str,
                                             params: tuple[int] | None) -> None:
    sql = OVER_CAP if params is None else "select id, name from customers where level >= %s"
    with psycopg.connect(pgveil.dsn(teller), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()
        for _ in range(2):
            with pytest.raises(pg_errors.InsufficientPrivilege, match=CAP_MESSAGE):
                conn.execute(sql, params)
            assert conn.info.transaction_status is TransactionStatus.IDLE
            assert alive(conn)
        assert conn.execute("select pg_backend_pid()").fetchone() == pid


@pytest.mark.parametrize("params", [None, (1,)], ids=["no-params", "bound-param"])
def test_cap_in_a_transaction_client_and_server_agree(pgveil: PgveilProcess, teller: str,
                                                      params: tuple[int] | None) -> None:
    """Whatever state the client is told, the server must be in the same one."""
    sql = OVER_CAP if params is None else "select id, name from customers where level >= %s"
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        assert alive(conn)
        with pytest.raises(pg_errors.InsufficientPrivilege, match=CAP_MESSAGE):
            conn.execute(sql, params)
        status = conn.info.transaction_status
        assert status in (TransactionStatus.INTRANS, TransactionStatus.INERROR)
        if status is TransactionStatus.INERROR:
            with pytest.raises(pg_errors.InFailedSqlTransaction):
                conn.execute("select 1")
        else:
            assert alive(conn)
        conn.rollback()
        assert alive(conn)


@pytest.mark.parametrize("params", [None, (1,)], ids=["no-params", "bound-param"])
def test_cap_in_a_transaction_fails_it(pgveil: PgveilProcess, teller: str,
                                       params: tuple[int] | None) -> None:
    """SPEC §5: inside a transaction block a denial leaves the transaction failed on both
    sides, as any error would."""
    sql = OVER_CAP if params is None else "select id, name from customers where level >= %s"
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        assert alive(conn)
        with pytest.raises(pg_errors.InsufficientPrivilege, match=CAP_MESSAGE):
            conn.execute(sql, params)
        assert conn.info.transaction_status is TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert alive(conn)


def test_cap_with_psql_and_psycopg2_simple_protocol(pg: PostgresCluster,
                                                    pgveil: PgveilProcess, teller: str,
                                                    sz_phones: list[str]) -> None:
    r = run([client_binary(pg.bin_dir, "psql"), "-X", "-qAt", pgveil.dsn(teller), "-c",
             "select id, phone from customers where level >= 1"])
    assert r.returncode != 0 and CAP_MESSAGE in r.stderr
    assert r.stdout.strip() == ""
    with psycopg2.connect(pgveil.dsn(teller)) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("select id from customers where id <= 120; " + OVER_CAP)
        conn.rollback()
        cur.execute("select id from customers where id <= 120; select 1")
        assert cur.fetchall() == [(1,)]


async def test_cap_with_asyncpg_binary(pgveil: PgveilProcess, teller: str) -> None:
    conn = await asyncpg.connect(pgveil.dsn(teller))
    try:
        assert len(await conn.fetch("select id, birthday from customers where id <= $1",
                                    150)) == CAP
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=CAP_MESSAGE):
            await conn.fetch("select id, birthday from customers where level >= $1", 1)
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


# --------------------------------------------------------------------------- unbounded reads


@pytest.mark.parametrize("sql", [
    "select id from customers",
    "select * from accounts",
    "select c.id, o.amount from customers c join orders o on o.customer_id = c.id",
])
def test_unbounded_read_denied_with_a_hint(pgveil: PgveilProcess, teller: str, sql: str) -> None:
    with psycopg.connect(pgveil.dsn(teller), autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege) as info:
            conn.execute(sql)
        diag = info.value.diag
        advice = f"{diag.message_primary} {diag.message_hint or ''}"
        assert "unbounded" in advice.lower() or "without" in advice.lower()
        assert "WHERE" in advice and "LIMIT" in advice  # tells the user what to add
        assert alive(conn)


def test_bounded_reads_and_count_allowed(pgveil: PgveilProcess, teller: str) -> None:
    with psycopg.connect(pgveil.dsn(teller), autocommit=True) as conn:
        assert len(conn.execute("select id from customers limit 10").fetchall()) == 10
        assert len(conn.execute("select id from customers where id <= 60").fetchall()) == 20
        assert conn.execute("select count(*) from customers").fetchone() == (666,)
        assert conn.execute("select count(*), max(id) from accounts").fetchone()[0] > 600


def test_a_limit_bounds_the_read_whatever_its_number(pgveil: PgveilProcess, teller: str
                                                     ) -> None:
    """SPEC: unbounded is "neither a filter nor a LIMIT". LIMIT 100 runs and max_rows stops it
    at 50 on the wire; a LIMIT parameter (ORM pagination) runs as well."""
    with psycopg.connect(pgveil.dsn(teller), autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(pg_errors.InsufficientPrivilege, match=CAP_MESSAGE):
            cur.execute("select * from customers limit 100")
            cur.fetchall()
        page = conn.execute("select id from customers order by id limit %s offset %s",
                            (10, 20), prepare=True).fetchall()
        assert len(page) == 10
        with pytest.raises(pg_errors.InsufficientPrivilege, match="unbounded"):
            conn.execute("select id from customers limit all")


# --------------------------------------------------------------------------- cursors


def test_declare_fetch_is_counted_cumulatively(pgveil: PgveilProcess, teller: str) -> None:
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        conn.execute("declare drain cursor for select id from customers where level >= 1")
        delivered = len(conn.execute("fetch 30 from drain").fetchall())
        assert delivered == 30
        with pytest.raises(pg_errors.InsufficientPrivilege, match=CAP_MESSAGE):
            conn.execute("fetch 30 from drain").fetchall()
        assert conn.info.transaction_status is TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("fetch 1 from drain")
        conn.rollback()
        assert alive(conn)


def test_declare_fetch_under_the_cap_and_fetch_all(pgveil: PgveilProcess, teller: str) -> None:
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        conn.execute("declare small cursor for select id from customers where id <= 120")
        got = conn.execute("fetch 20 from small").fetchall()
        got += conn.execute("fetch 20 from small").fetchall()
        assert [r[0] for r in got] == list(range(3, 121, 3))
        conn.commit()
        conn.execute("declare big cursor for select id from customers where level >= 1")
        with pytest.raises(pg_errors.InsufficientPrivilege, match=CAP_MESSAGE):
            conn.execute("fetch all from big")
        conn.rollback()
        assert alive(conn)


def test_psycopg_server_side_cursor_itersize(pgveil: PgveilProcess, teller: str) -> None:
    """psycopg named cursors: DECLARE + FETCH FORWARD itersize, under the hood."""
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        got = 0
        with pytest.raises(pg_errors.InsufficientPrivilege, match=CAP_MESSAGE):
            with conn.cursor(name="pages") as cur:
                cur.itersize = 20
                cur.execute("select id from customers where level >= 1")
                for _ in cur:
                    got += 1
        assert got <= CAP
        conn.rollback()
        with conn.cursor(name="fine") as cur:
            cur.itersize = 7
            cur.execute("select id from customers where id <= 120")
            assert len(list(cur)) == 40
        conn.rollback()


def test_psycopg_server_side_cursor_fetchmany(pgveil: PgveilProcess, teller: str) -> None:
    with psycopg.connect(pgveil.dsn(teller)) as conn:
        cur = conn.cursor(name="manual")
        cur.execute("select id, phone from customers where level >= 1")
        got = len(cur.fetchmany(25)) + len(cur.fetchmany(25))
        assert got == CAP
        with pytest.raises(pg_errors.InsufficientPrivilege, match=CAP_MESSAGE):
            cur.fetchmany(25)
        conn.rollback()
        assert alive(conn)


async def test_asyncpg_cursor_execute_with_row_limit(pgveil: PgveilProcess, teller: str) -> None:
    """asyncpg cursors Bind once and Execute with a row limit (PortalSuspended), like JDBC's
    setFetchSize: the rows of one portal are counted across Executes."""
    conn = await asyncpg.connect(pgveil.dsn(teller))
    try:
        got = 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=CAP_MESSAGE):
            async with conn.transaction():
                async for _ in conn.cursor("select id from customers where level >= $1", 1,
                                           prefetch=20):
                    got += 1
        assert got <= CAP
        assert await conn.fetchval("select 1") == 1
        async with conn.transaction():
            cur = await conn.cursor("select id from customers where id <= $1", 120)
            rows = await cur.fetch(15) + await cur.fetch(15) + await cur.fetch(15)
        assert len(rows) == 40
    finally:
        await conn.close()


# --------------------------------------------------------------------------- pg_dump, pgbench


def test_pg_dump_as_teller_fails_without_leaking(pg: PostgresCluster, pgveil: PgveilProcess,
                                                 teller: str, sz_phones: list[str]) -> None:
    dump = client_binary(pg.bin_dir, "pg_dump")
    for args in (["-t", "customers"], ["--data-only", "-t", "accounts"], []):
        r = run([dump, pgveil.dsn(teller), *args])
        assert r.returncode != 0, args
        assert not any(p in r.stdout for p in sz_phones), args
        # the refusal says what and why (pg_dump has printed the COPY header, no data)
        assert "COPY of protected table public." in r.stderr, r.stderr
        assert r.stdout.rstrip().endswith("FROM stdin;"), r.stdout[-300:]


def test_pg_dump_of_an_unprotected_table_as_teller_works(pg: PostgresCluster,
                                                        pgveil: PgveilProcess,
                                                        teller: str) -> None:
    """Its set-up query sets a setting by a computed name, pinned by its WHERE clause."""
    r = run([client_binary(pg.bin_dir, "pg_dump"), pgveil.dsn(teller), "-t", "branches"])
    assert r.returncode == 0, r.stderr
    assert "COPY public.branches" in r.stdout and "SZ01" in r.stdout


def test_pg_dump_as_dba_succeeds(pg: PostgresCluster, pgveil: PgveilProcess,
                                 sz_phones: list[str]) -> None:
    r = run([client_binary(pg.bin_dir, "pg_dump"), pgveil.dsn("dba"), "-t", "customers"])
    assert r.returncode == 0, r.stderr
    assert all(p in r.stdout for p in sz_phones[:20])


def test_pgbench_teller_lookups_no_failures(pg: PostgresCluster, pgveil: PgveilProcess,
                                            teller: str, tmp_path: Path) -> None:
    script = tmp_path / "lookup.sql"
    script.write_text(
        "\\set id 3 * random(1, 666)\n"
        "select name, phone, id_number from customers where id = :id;\n"
        "select card_no, balance from accounts where customer_id = :id;\n"
        "select count(*) from orders where customer_id = :id;\n")
    bench = client_binary(pg.bin_dir, "pgbench")
    for mode in ("simple", "extended", "prepared"):
        r = run([bench, "-n", "-c", "2", "-t", "40", "-M", mode, "-f", str(script),
                 pgveil.dsn(teller)], timeout=180)
        assert r.returncode == 0, (mode, r.stdout[-400:], r.stderr[-400:])
        assert "number of failed transactions: 0" in r.stdout, (mode, r.stdout[-400:])
        assert "number of transactions actually processed: 80/80" in r.stdout


async def test_concurrent_capped_sessions_stay_independent(pgveil: PgveilProcess,
                                                          teller: str) -> None:
    """Caps are per statement and per session: a capped neighbour does not affect others."""
    async def one(capped: bool) -> str:
        conn = await asyncpg.connect(pgveil.dsn(teller))
        try:
            if capped:
                try:
                    await conn.fetch("select id from customers where level >= $1", 1)
                except asyncpg.InsufficientPrivilegeError:
                    return "capped"
                return "not capped"
            return str(len(await conn.fetch("select id from customers where id <= $1", 90)))
        finally:
            await conn.close()

    results = await asyncio.gather(*(one(i % 2 == 0) for i in range(8)))
    assert list(results) == ["capped", "30"] * 4
