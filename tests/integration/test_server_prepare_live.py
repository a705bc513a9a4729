"""Rewritten SELECTs sent as simple Queries run as statements pgveil prepares upstream
(``upstream.prepare_rewritten``): against the real PostgreSQL, every query below returns the
same rows, column types and errors as the same query with the feature off, and the repeated
shapes really run as prepared statements."""

from __future__ import annotations

from typing import Any

import psycopg2
import pytest

# Each runs three times: the first fills the shape cache, the second prepares the shape
# upstream, the third (and the second's new literal) run the prepared statement.
QUERIES = [
    "select * from customers where id = {}",
    "select name, phone from customers where id = {}.0",
    "select id, phone from customers where id = {}000000000",
    "select id from customers where id = '{}'",
    "select id, name from customers where id = -{}",
    "select id, name from customers where id in ({}, 6, 9) order by name, 1",
    "select id, 'x' as tag, name from customers where id = {}",
    "select id from customers where birthday > '1980-01-01' and id < {} order by id",
    "select id, email from customers where email like 'u%' and id = {}",
    "select count(*) from customers where id > {}",
    "select c.id, a.card_no from customers c join accounts a on a.customer_id = c.id "
    "where c.id = {} order by 1, 2",
    # a position in parentheses is still a position (not a constant $n): one group per level
    "select distinct on (2) id, level from customers where id < 4{} order by 2, 1",
    "select id, level from customers where id < 4{} order by (2) desc, id",
]


def _run(dsn: str, sqls: list[str]) -> list[Any]:
    results: list[Any] = []
    conn = psycopg2.connect(dsn)  # psycopg2: the simple Query protocol
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql in sqls:
                try:
                    cur.execute(sql)
                    types = [(d.name, d.type_code) for d in cur.description or ()]
                    results.append((types, cur.fetchall() if cur.description else None))
                except psycopg2.Error as exc:
                    results.append(("error", exc.pgcode))
            cur.execute("select count(*) from pg_prepared_statements "
                        "where name like 'pgveil\\_%'")
            results.append(("prepared", cur.fetchone()[0]))
    finally:
        conn.close()
    return results


def test_prepared_inside_transaction_blocks(pgveil) -> None:
    """psycopg2 without autocommit runs everything in a transaction block: shapes are
    prepared there too (inside a savepoint), and an impossible Parse does not abort it."""
    with psycopg2.connect(pgveil.dsn("teller_sz01")) as conn:
        cur = conn.cursor()
        for n in (3, 6, 9, 12):
            cur.execute(f"select id, 'x' || name from customers where id = {n}")
            assert len(cur.fetchall()) == 1
        cur.execute("select count(*) from pg_prepared_statements where name like 'pgveil\\_%'")
        assert cur.fetchone()[0] >= 1
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS


@pytest.mark.parametrize("login", ["teller_sz01", "auditor1", "manager_sz01"])
def test_same_results_as_text_queries(pgveil, pgveil_factory, login: str) -> None:
    sqls = [q.format(n) for q in QUERIES for n in (3, 12, 15)]
    on = _run(pgveil.dsn(login), sqls)
    off = _run(pgveil_factory({"upstream": {"prepare_rewritten": False}}).dsn(login), sqls)
    assert on[:-1] == off[:-1]
    assert any(rows for _, rows in on[:-1])  # the queries really return masked data
    assert on[-1][1] >= 5, "repeated rewritten shapes should run as prepared statements"
    assert off[-1][1] == 0


def test_errors_and_transactions_match(pgveil, pgveil_factory) -> None:
    script = [
        "begin",
        "select name from customers where id = 3",
        "select name from customers where id = 6",
        "select name from customers where id = 'x'",  # 22P02 aborts the block
        "select name from customers where id = 9",  # 25P02
        "rollback",
        "select name from customers where id = 9",
    ]

    def run(dsn: str) -> list[Any]:
        out: list[Any] = []
        conn = psycopg2.connect(dsn)
        try:
            conn.autocommit = True
            cur = conn.cursor()
            for _ in range(3):  # warm: the shapes are prepared before the block
                cur.execute("select name from customers where id = 3")
            for sql in script:
                try:
                    cur.execute(sql)
                    out.append(cur.fetchall() if cur.description else cur.statusmessage)
                except psycopg2.Error as exc:
                    out.append(exc.pgcode)
                out.append(conn.get_transaction_status())
        finally:
            conn.close()
        return out

    on = run(pgveil.dsn("teller_sz01"))
    off = run(pgveil_factory({"upstream": {"prepare_rewritten": False}}).dsn("teller_sz01"))
    assert on == off
    assert "22P02" in on and "25P02" in on


def test_discard_all_is_survived(pgveil) -> None:
    conn = psycopg2.connect(pgveil.dsn("teller_sz01"))
    try:
        conn.autocommit = True
        cur = conn.cursor()
        for n in (3, 6, 9):
            cur.execute(f"select name from customers where id = {n}")
        cur.execute("discard all")
        for n in (3, 6, 9, 12):
            cur.execute(f"select name from customers where id = {n}")
            assert len(cur.fetchall()) == 1
        cur.execute("select count(*) from pg_prepared_statements")
        assert cur.fetchone()[0] == 1  # prepared again after the DISCARD
    finally:
        conn.close()


@pytest.mark.parametrize("attempt", [
    "execute pgveil_1('SZ01', 100000)",
    "explain analyze execute pgveil_1('SZ01', 100000)",
    "create temp table t_steal as execute pgveil_1('SZ01', 100000)",
    'execute "pgveil_1"(\'SZ01\', 100000)',
])
def test_clients_cannot_run_pgveil_statements(pgveil, attempt: str) -> None:
    """pgveil's own statements are rewritten texts: run by name they would skip the row cap
    (max_rows 50 for a teller) and the audit record. A client can neither EXECUTE them."""
    conn = psycopg2.connect(pgveil.dsn("teller_sz01"))
    try:
        conn.autocommit = True
        cur = conn.cursor()
        for _ in range(3):  # prepares pgveil_1 for this shape on this connection
            with pytest.raises(psycopg2.Error, match="row limit"):
                cur.execute("select id from customers where branch_id = 'SZ01' and id < 3000")
        cur.execute("select name from pg_prepared_statements")
        assert ("pgveil_1",) in cur.fetchall()
        with pytest.raises(psycopg2.Error) as err:
            cur.execute(attempt)
            rows = cur.fetchall() if cur.description else []
            assert len(rows) <= 50, f"{len(rows)} rows past the teller's cap"
        assert err.value.pgcode == "42501"
        cur.execute("select 1")
    finally:
        conn.close()
