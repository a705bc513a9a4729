"""Bypass hunt 8: the quota, the lookup cap and numeric packing, against the real database.

* The quota was checked when a request started (``used >= quota``) and charged when each
  statement ended, so every statement of one Query message, or of twenty sessions of one login,
  started under the quota: a 60-row quota gave the whole SZ01 branch (666 rows) in one round
  trip. Each run now claims a share of what is left when its first row arrives, held until it
  is charged; rows beyond the share are stopped like rows beyond max_rows.
* ``lookup_max_values`` was counted per IN list: 37 UNION ALL branches of 10 candidates each
  tested every ID number the masks leave possible for one customer. It is now per statement.
* ``sum(x * 10::numeric ^ (7 * id))`` put every row's digits into one numeric: one row carried
  the branch past max_rows. Accumulating aggregates now take only a bounded summand on
  customer data for capped roles (tests/rewriters/fixtures/packing.sql).
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.harness.pgveil_proc import PgveilProcess
from tests.security.conftest import QUOTA, LeakChecker

CAP = 50  # the teller's max_rows


def _rows_of(cur: psycopg.Cursor[Any]) -> int:
    total = 0
    while True:
        if cur.description:
            total += len(cur.fetchall())
        if not cur.nextset():
            return total


def test_one_request_of_many_statements_stops_at_the_quota(
        q60: PgveilProcess, new_teller: Callable[[], str]) -> None:
    """Fourteen 50-row SELECTs in one Query message: 60 rows, then the quota error."""
    login = new_teller()
    sql = ";".join(f"select id, name, phone from customers where id > {i * 150} "
                   f"order by id limit 50" for i in range(14))
    got = 0
    with psycopg.connect(q60.dsn(login), autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="quota of 60"):
            cur.execute(sql)
            got = _rows_of(cur)
        # the client sees the first statement's rows and the quota error; the session goes on
        assert conn.execute("select 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="exhausted"):
            conn.execute("select id from customers where id = 3").fetchall()
    assert got <= QUOTA


def test_sequential_reads_stop_at_the_quota(q60: PgveilProcess,
                                            new_teller: Callable[[], str]) -> None:
    """50 rows, then a second 50-row read gets the 10 left and is stopped there."""
    login = new_teller()
    total = 0
    with psycopg.connect(q60.dsn(login), autocommit=True) as conn:
        total += len(conn.execute("select id from customers where id > 0 order by id "
                                  "limit 50").fetchall())
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="quota of 60"):
            conn.execute("select id from customers where id > 150 order by id limit 50")
        # a lookup that finds nothing is still charged: none fits any more
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="exhausted"):
            conn.execute("select id from customers where id = 3")
    assert total == 50


def test_parallel_sessions_of_one_login_share_the_quota(
        q60: PgveilProcess, new_teller: Callable[[], str]) -> None:
    """Twenty sessions of one login start a 50-row read at once: 60 rows in all."""
    login = new_teller()
    results: list[int | str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def one(i: int) -> None:
        try:
            with psycopg.connect(q60.dsn(login), autocommit=True) as conn:
                barrier.wait(30)
                n = len(conn.execute(
                    "select id, phone from customers where id > %s and pg_sleep(0.01) is "
                    "not null order by id limit 50", (i * 30,)).fetchall())
                with lock:
                    results.append(n)
        except psycopg.Error as exc:
            with lock:
                results.append(exc.sqlstate or "?")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 20
    total = sum(r for r in results if isinstance(r, int))
    assert total <= QUOTA, results
    assert all(r == "42501" for r in results if not isinstance(r, int)), results


def test_the_quota_is_given_back_when_a_share_is_unused(
        q60: PgveilProcess, new_teller: Callable[[], str]) -> None:
    """A run holds up to max_rows of quota while it returns rows; one that returns fewer
    (or fails, or whose client goes away) holds nothing afterwards."""
    login = new_teller()
    with psycopg.connect(q60.dsn(login), autocommit=True) as conn:
        for _ in range(3):  # 3 x 10 rows, each first holding a share of 50
            assert len(conn.execute("select id from customers where id > 0 order by id "
                                    "limit 10").fetchall()) == 10
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select id, 1 / (id - 9) from customers where id > 0 order by id "
                         "limit 10").fetchall()
    with psycopg.connect(q60.dsn(login), autocommit=True) as conn:
        # 30 charged (plus what the failed statement sent): the rest is still there
        assert len(conn.execute("select id from customers where id > 300 order by id "
                                "limit 20").fetchall()) == 20


def _idn_candidates(prefix: str, year: int, suffix: str) -> list[str]:
    out, d = [], datetime.date(year, 1, 1)
    while d.year == year:
        out.append(prefix + d.strftime("%Y%m%d") + suffix)
        d += datetime.timedelta(days=1)
    return out


@pytest.mark.parametrize("shape", ["union_all", "subqueries"])
def test_lookup_cap_counts_the_whole_statement(leak: LeakChecker, shape: str) -> None:
    """All 365 ID numbers the masks leave possible for customer 3 in one statement, in blocks
    of 10 (each within lookup_max_values): denied, nothing narrowed."""
    c = leak.secrets.customer(3)
    cands = _idn_candidates(c.id_number[:6], int(c.birthday[:4]), c.id_number[-4:])
    assert c.id_number in cands
    blocks = [",".join(f"'{v}'" for v in cands[i:i + 10]) for i in range(0, len(cands), 10)]
    if shape == "union_all":
        sql = " union all ".join(
            f"select {n} as blk from customers where id = 3 and id_number in ({b})"
            for n, b in enumerate(blocks))
    else:
        sql = "select " + ", ".join(
            f"(select count(*) from customers where id = 3 and id_number in ({b})) as b{n}"
            for n, b in enumerate(blocks))
    r = leak.assert_no_leak(sql)
    assert r.denied and "lookup_max_values" in r.describe(), r.describe()


def _unpack(total: str, width: int) -> list[str]:
    digits = str(total).split(".")[0]
    digits = "0" * ((-len(digits)) % width) + digits
    return [digits[i:i + width] for i in range(0, len(digits), width)]


@pytest.mark.parametrize("sql", [
    "select sum((left(phone,3)||right(phone,4))::numeric * 10::numeric ^ (7*(id/3)))::text "
    "from customers where id > 0",
    "select (sum((left(phone,3)||right(phone,4))::numeric * 10::numeric ^ (7*(id/3))) over ())"
    "::text from customers where id > 0 limit 1",
])
def test_sum_cannot_pack_a_branch_into_one_row(leak: LeakChecker, sql: str) -> None:
    r = leak.assert_no_leak(sql)
    assert r.denied and "would pack more than max_rows" in r.describe(), r.describe()
    # a sum a report needs still works, in scope
    ok = leak.run("select level, sum(case when level > 2 then 1 else 0 end) from customers "
                  "where id > 0 group by level order by level limit 10")
    assert not ok.errors and ok.rows


def test_manager_cannot_pack_orders_past_max_rows(leak: LeakChecker) -> None:
    """manager_sz01 (max_rows 1000): one sum() row would carry all 6000 order ids."""
    r = leak.run("select sum(id::numeric * 10::numeric ^ (4*id))::text from orders where id > 0",
                 login="manager_sz01")
    carried = 0
    if not r.errors and r.rows and r.rows[0][0] is not None:
        carried = len([x for x in _unpack(r.rows[0][0], 4) if x.strip("0")])
    assert r.denied and carried == 0, r.describe()


def test_pipelined_statements_on_the_unnamed_portal_count_separately(leak: LeakChecker) -> None:
    """Two pipelined 30-row reads, each through the unnamed portal (psycopg pipeline mode,
    JDBC batches): each is its own statement under max_rows 50, not one of 60 rows."""
    with leak.connect() as conn:
        curs = []
        with conn.pipeline():
            for i in range(2):
                cur = conn.cursor()
                cur.execute("select id, phone from customers where id > %s order by id "
                            "limit 30", (i * 150,))
                curs.append(cur)
        got = [len(c.fetchall()) for c in curs]
    assert got == [30, 30]
    # ... while Executes of one binding with a row limit still add up (PortalSuspended)
    from tests.harness.wire import SYNC, bind, execute, open_wire, parse
    with open_wire(leak.pgveil.dsn("teller_sz01")) as w:
        one = w.batch(parse(b"", b"select id, phone from customers where id > 0 order by id "
                                 b"limit 60"), bind(b""), execute(b"", 40), execute(b"", 40),
                      SYNC)
        two = w.batch(parse(b"", b"select id from customers where id > 0 order by id limit 30"),
                      bind(b""), execute(b""),
                      parse(b"", b"select id from customers where id > 300 order by id "
                                 b"limit 30"), bind(b""), execute(b""), SYNC)
    assert one.rows == 50 and "42501" in one.sqlstates, one
    assert two.rows == 60 and not two.sqlstates, two


@pytest.mark.parametrize("login", ["teller_sz01", "manager_sz01", "auditor1"])
def test_catalog_introspection_with_regclass_works_for_masked_roles(leak: LeakChecker,
                                                                    login: str) -> None:
    """What pgJDBC getTables(), SQLAlchemy/Django reflection and psql \\d send: the same answer
    through pgveil as directly (a ::regclass cast reads no data)."""
    statements = [
        "select count(*) > 0 from pg_catalog.pg_description d "
        "where d.classoid = 'pg_catalog.pg_class'::regclass or true",
        "select a.attname, a.atttypid::regtype::text from pg_catalog.pg_attribute a "
        "where a.attrelid = '\"customers\"'::regclass and a.attnum > 0 order by a.attnum",
        "select c.oid::pg_catalog.regclass::text from pg_catalog.pg_class c "
        "where c.relname in ('branches', 'customers') order by 1",
        "select to_regclass('public.accounts')::text",
    ]
    with psycopg.connect(leak.pg.dsn(login), autocommit=True) as direct, \
            psycopg.connect(leak.pgveil.dsn(login), autocommit=True) as proxied:
        for sql in statements:
            assert proxied.execute(sql).fetchall() == direct.execute(sql).fetchall(), sql


def test_a_refused_statement_in_a_multi_statement_query_runs_what_is_ahead_of_it(
        leak: LeakChecker) -> None:
    """PostgreSQL runs BEGIN and the INSERT ahead of a failing statement and leaves the block
    failed; pgveil did nothing at all and left the session idle (the application's next
    statements then autocommitted)."""
    from tests.harness.wire import open_wire, query
    with open_wire(leak.pgveil.dsn("teller_sz01")) as w:
        got = w.batch(query("begin; insert into sec_sink values ('h8-ahead'); "
                            "select * from customers; commit"))
        assert got.types == ["C", "C", "E", "Z"] and got.sqlstates == ["42501"], got
        inside = w.batch(query("select count(*) from sec_sink where t = 'h8-ahead'"))
        assert inside.sqlstates == ["25P02"], inside  # the block failed, as in PostgreSQL
        w.batch(query("rollback"))
        # without BEGIN: the implicit transaction is rolled back with the refusal
        got = w.batch(query("insert into sec_sink values ('h8-implicit'); "
                            "select * from customers"))
        assert got.types == ["C", "E", "Z"], got
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        assert dba.execute("select count(*) from sec_sink where t like 'h8-%'").fetchone() == (0,)
