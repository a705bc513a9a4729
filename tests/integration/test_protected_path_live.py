"""The protected hot path against the real PostgreSQL: repeated lookups -- simple Queries of a
memoised shape and Binds of prepared protected statements -- return exactly what the general
path returns (masked, filtered), get one complete audit record each that ``pgveil audit
verify`` trusts, count against the quota, and keep the row cap.

Each query runs often enough with literals of one length to take the hot path (the first fills
the shape cache, the second prepares the shape upstream, the third memoises it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import psycopg
import psycopg2
import pytest

from tests.harness.pgveil_proc import policy_with_teller_quota
from tests.integration.test_audit_live import pgveil_cli

IDS = (3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36)  # branch SZ01 ids of one and two digits
SIMPLE = [
    "select * from customers where id = {}",
    "select id, phone, id_number from customers where id = {}",
    "select * from customers where phone = '1380000{:04d}'",
    "select id, name from customers where id = {} and level >= 1",
    "select c.id, a.card_no, a.balance from customers c join accounts a on a.customer_id = c.id "
    "where c.id = {} order by 2",
]


def _simple(dsn: str) -> list[Any]:
    out: list[Any] = []
    conn = psycopg2.connect(dsn)  # the simple Query protocol
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql in SIMPLE:
                for n in IDS:
                    cur.execute(sql.format(n))
                    out.append(([d.type_code for d in cur.description], cur.fetchall()))
    finally:
        conn.close()
    return out


@pytest.fixture
def teller(logins) -> str:  # noqa: F811 - the fixture imported above
    """A teller of SZ01 of its own: these tests read many rows, and the fixture policy's quota
    (2000 rows an hour) is shared by every session of a login."""
    return logins("sz")


@pytest.mark.parametrize("login", ["teller", "auditor1", "manager_sz01"])
def test_simple_lookups_match_the_general_path(pgveil, pgveil_factory, login: str,
                                               request: pytest.FixtureRequest) -> None:
    if login == "teller":
        login = request.getfixturevalue("teller")
    fast = _simple(pgveil.dsn(login))
    general = _simple(pgveil_factory({"upstream": {"prepare_rewritten": False}}).dsn(login))
    assert fast == general
    assert sum(len(rows) for _, rows in fast) > len(IDS)  # rows came back, masked
    if login.startswith("teller"):
        phones = [row[1] for _, rows in fast[len(IDS):2 * len(IDS)] for row in rows]
        assert phones and all("*" in p for p in phones)


async def _asyncpg_lookups(dsn: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)  # extended protocol, binary results
    try:
        stmt = await conn.prepare("select * from customers where id = $1")
        out = [[tuple(r) for r in await stmt.fetch(n)] for n in IDS]
        out.append([tuple(r) for r in await conn.fetch(
            "select id, phone from customers where id = any($1::int[]) order by id",
            list(IDS))])
        return out
    finally:
        await conn.close()


def test_prepared_lookups_match_the_general_path(pgveil, pgveil_factory, teller: str) -> None:
    general = pgveil_factory({"upstream": {"prepare_rewritten": False}})
    for client in ("psycopg", "asyncpg"):
        results = []
        for proxy in (pgveil, general):
            if client == "asyncpg":
                results.append(asyncio.run(_asyncpg_lookups(proxy.dsn(teller))))
                continue
            with psycopg.connect(proxy.dsn(teller), autocommit=True) as conn:
                results.append([conn.execute("select id, name, phone from customers "
                                             "where id = %s", (n,), prepare=True).fetchall()
                                for n in IDS])
        assert results[0] == results[1]
        assert any(results[0]), client


def test_every_lookup_has_its_record_and_the_chain_verifies(pgveil_factory, teller: str
                                                           ) -> None:
    proxy = pgveil_factory()
    with psycopg2.connect(proxy.dsn(teller)) as conn:
        conn.autocommit = True
        cur = conn.cursor()
        for n in IDS:
            cur.execute(f"select * from customers where id = {n}")
            assert len(cur.fetchall()) == 1
    with psycopg.connect(proxy.dsn(teller), autocommit=True) as conn:
        for n in IDS:
            rows = conn.execute("select * from customers where id = %s", (n + 1,),
                                prepare=True).fetchall()
            assert rows == []  # id n+1 is not of branch SZ01: filtered out
    proxy.stop()
    records = [json.loads(line) for line in proxy.audit_path.read_text().splitlines()]
    lookups = [r for r in records if r["kind"] == "select"]
    assert len(lookups) == 2 * len(IDS)
    simple, prepared = lookups[:len(IDS)], lookups[len(IDS):]
    assert {r["statement"] for r in simple} == {"select * from customers where id = ?"}
    assert {r["statement"] for r in prepared} == {"select * from customers where id = $1"}
    assert [r["rows"] for r in simple] == [1] * len(IDS)
    assert [r["rows"] for r in prepared] == [0] * len(IDS)
    for r in lookups:
        assert r["decision"] == "rewritten" and r["role"] == "teller"
        assert r["tables"] == ["public.customers"] and r["error"] is None
        assert "public.customers.phone" in r["columns"]
        assert isinstance(r["duration_ms"], float) and r["duration_ms"] >= 0
    verified = pgveil_cli("audit", "verify", str(proxy.audit_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_prepared_lookups_count_against_the_quota(pgveil_factory, tmp_path, logins) -> None:  # noqa: F811
    proxy = pgveil_factory(policy_path=policy_with_teller_quota(tmp_path, 5))
    login = logins("sz")  # a teller of SZ01 whose quota no other test has used
    with psycopg.connect(proxy.dsn(login), autocommit=True) as conn:
        got = 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="quota"):
            for n in IDS:
                got += len(conn.execute("select * from customers where id = %s", (n,),
                                        prepare=True).fetchall())
        assert got == 5  # one row each until the quota of 5 rows is used up


def test_the_row_cap_holds_for_repeated_prepared_reads(pgveil, teller: str) -> None:
    sql = "select id from customers where id < %s order by id"
    with psycopg.connect(pgveil.dsn(teller), autocommit=True) as conn:
        for bound in (90, 93, 96):  # one prepared shape, under the teller's cap of 50 rows
            rows = conn.execute(sql, (bound,), prepare=True).fetchall()
            assert [r[0] for r in rows] == list(range(3, bound, 3))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row limit of 50"):
            conn.execute(sql, (300,), prepare=True).fetchall()
