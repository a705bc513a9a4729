"""Transparency: real clients through pgveil get what a direct connection gets.

Every test compares against the same statement run directly on PostgreSQL, as the DBA (whose
policy role sees raw data), so any difference is pgveil's doing.
"""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import pg8000.native
import psycopg
import psycopg2
import pytest

from proxy.localpg import client_binary, password_for

JOIN = ("select customers.id, name, phone, balance, opened_on from customers "
        "join accounts a on a.customer_id = customers.id where customers.id <= %s order by a.id")


def psql(pg, dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([client_binary(pg.bin_dir, "psql"), dsn, "-qAt", "-c", sql],
                          capture_output=True, text=True, timeout=60)


def test_psql_query_and_copy_both_ways(pg, pgveil, tmp_path) -> None:
    dsn = pgveil.dsn("dba")
    r = psql(pg, dsn, "select count(*) from customers")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2000"
    out = tmp_path / "branches.csv"
    r = psql(pg, dsn, f"\\copy branches to '{out}' csv")
    assert r.returncode == 0, r.stderr
    assert "深圳福田营业厅" in out.read_text()
    script = (f"create temp table b2 (like branches); \\copy b2 from '{out}' csv\n"
              "select count(*) from b2")
    r = subprocess.run([client_binary(pg.bin_dir, "psql"), dsn, "-qAt"], input=script,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "3"


def test_multi_statement_simple_query(pgveil) -> None:
    with psycopg2.connect(pgveil.dsn("dba")) as c:
        cur = c.cursor()
        cur.execute("select 1; select name from branches where id = 'GZ01'")
        assert cur.fetchall() == [("广州天河营业厅",)]


def test_psycopg3_binary_pipeline_copy(pg, pgveil) -> None:
    with psycopg.connect(pg.dsn("dba")) as d, psycopg.connect(pgveil.dsn("dba")) as p:
        want = d.execute(JOIN, (20,), binary=True).fetchall()
        got = p.execute(JOIN, (20,), binary=True).fetchall()
        assert got == want and len(got) > 20
        with p.pipeline():
            curs = [p.execute("select %s::int + 1", (i,)) for i in range(30)]
        assert [c.fetchone()[0] for c in curs] == list(range(1, 31))
        p.execute("create temp table t(x int, y text)")
        with p.cursor().copy("copy t from stdin") as cp:
            for i in range(2000):
                cp.write_row((i, f"r{i}"))
        assert p.execute("select count(*), sum(x) from t").fetchone() == (2000, 1999000)
        with p.cursor().copy("copy (select x from t order by x) to stdout") as cp:
            rows = list(cp.rows())
        assert len(rows) == 2000


def test_psycopg3_server_side_cursor_pages(pgveil) -> None:
    with psycopg.connect(pgveil.dsn("dba")) as p:
        with p.cursor(name="pages") as cur:
            cur.itersize = 7
            cur.execute("select id from customers where id <= 100 order by id")
            assert [r[0] for r in cur] == list(range(1, 101))


def test_psycopg2_matches_direct(pg, pgveil) -> None:
    q = "select count(*), sum(balance) from accounts where branch_id = %s"
    with psycopg2.connect(pgveil.dsn("dba")) as c:
        cur = c.cursor()
        cur.execute(q, ("SZ01",))
        got = cur.fetchone()
    with psycopg2.connect(pg.dsn("dba")) as c:
        cur = c.cursor()
        cur.execute(q, ("SZ01",))
        assert cur.fetchone() == got


def test_pg8000(pgveil) -> None:
    c = pg8000.native.Connection("dba", password=password_for("dba"), host="127.0.0.1",
                                 port=pgveil.port, database="bank")
    try:
        assert c.run("select name from branches where id = :i", i="SZ01") == [["深圳福田营业厅"]]
    finally:
        c.close()


async def test_asyncpg_prepared_binary_and_timeouts(pg, pgveil) -> None:
    q = "select id, balance, opened_on from accounts where customer_id = $1 order by id"
    c = await asyncpg.connect(pgveil.dsn("dba"))
    d = await asyncpg.connect(pg.dsn("dba"))
    try:
        st = await c.prepare(q)
        for cid in (1, 7, 99):
            assert [tuple(r) for r in await st.fetch(cid)] == \
                [tuple(r) for r in await d.fetch(q, cid)]
        # server-side statement_timeout
        await c.execute("set statement_timeout = '200ms'")
        with pytest.raises(asyncpg.QueryCanceledError):
            await c.execute("select pg_sleep(3)")
        await c.execute("reset statement_timeout")
        # client-side timeout: asyncpg sends a CancelRequest, which pgveil must route
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await c.execute("select pg_sleep(5)", timeout=0.5)
        assert await c.fetchval("select 42") == 42
        assert loop.time() - t0 < 3
    finally:
        await c.close()
        await d.close()


def test_wrong_password_is_28P01(pgveil) -> None:
    bad = pgveil.dsn("dba").replace(password_for("dba"), "nope")
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(bad)
    assert "password authentication failed" in str(err.value)


def test_pgbench_all_protocols(pg, pgveil) -> None:
    pg.psql("drop database if exists wirebench")
    pg.psql("create database wirebench")
    bench = client_binary(pg.bin_dir, "pgbench")
    r = subprocess.run([bench, "-i", "-s", "1", "-q", pgveil.dsn("dba", db="wirebench")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for mode in ("simple", "extended", "prepared"):
        r = subprocess.run([bench, "-n", "-c", "4", "-t", "50", "-M", mode,
                            pgveil.dsn("dba", db="wirebench")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "number of failed transactions: 0" in r.stdout, \
            (mode, r.stdout[-300:], r.stderr[-300:])


def test_pg_dump_as_dba_matches_direct(pg, pgveil) -> None:
    dump = client_binary(pg.bin_dir, "pg_dump")
    via = subprocess.run([dump, pgveil.dsn("dba"), "-t", "branches", "-t", "orders"],
                         capture_output=True, text=True, timeout=120)
    direct = subprocess.run([dump, pg.dsn("dba"), "-t", "branches", "-t", "orders"],
                            capture_output=True, text=True, timeout=120)
    assert via.returncode == 0, via.stderr
    def strip(text: str) -> list[str]:  # drop lines that differ per run (random keys)
        return [ln for ln in text.splitlines()
                if not ln.startswith(("-- Dumped", "\\restrict", "\\unrestrict"))]

    assert strip(via.stdout) == strip(direct.stdout)


def test_ssl_request_answered_n_when_tls_disabled(pgveil) -> None:
    # the default test config offers no TLS: sslmode=prefer falls back to plain text
    with psycopg.connect(pgveil.dsn("dba", sslmode="prefer")) as c:
        assert c.execute("select 1").fetchone() == (1,)
        assert c.pgconn.ssl_in_use is False


async def test_many_concurrent_clients(pgveil) -> None:
    async def one(i: int) -> bool:
        c = await asyncpg.connect(pgveil.dsn("dba"), timeout=30)
        try:
            total = 0
            for _ in range(3):
                total += await c.fetchval("select $1::int from (select pg_sleep(0.01)) s", i)
            return total == 3 * i
        finally:
            await c.close()

    results = await asyncio.gather(*(one(i) for i in range(150)), return_exceptions=True)
    assert sum(r is True for r in results) == 150, [r for r in results if r is not True][:3]
