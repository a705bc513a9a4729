"""Bypass hunt 9: attacks on hunt 8's defences, against the real database.

* Lookups held no quota share (a lookup that finds nothing returns no row to claim one with):
  37 pipelined lookups of 10 candidate ID numbers all passed the gate under a 60-row quota, and
  the quota error landed exactly on the block that found the customer. A lookup now holds a row
  per value it presents from the moment it is sent; and lookup_max_values holds for a whole
  request (a Query message, the Binds up to a Sync), not only per statement.
* The bounded-summand rule only looked at the aggregate's own argument: the positional code
  moved into a derived table, a CTE, LATERAL or a joined factor packed the branch again
  (tests/rewriters/fixtures/packing.sql has every shape).
* pgJDBC writes ``IN (?,?)`` as ``($1,$2)``, which sqlglot read as a dollar quote: every JDBC
  statement with an IN list on customer data was refused.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import psycopg

from tests.harness.pgveil_proc import PgveilProcess
from tests.harness.wire import SYNC, Wire, bind, execute, open_wire, parse, query
from tests.security.conftest import QUOTA, LeakChecker


def _idn_blocks(leak: LeakChecker) -> tuple[str, list[list[str]]]:
    """Customer 3's raw ID number and the 365 candidates its masks leave, in blocks of 10."""
    c = leak.secrets.customer(3)
    d = datetime.date(int(c.birthday[:4]), 1, 1)
    cands = []
    while d.year == int(c.birthday[:4]):
        cands.append(f"{c.id_number[:6]}{d:%Y%m%d}{c.id_number[-4:]}")
        d += datetime.timedelta(days=1)
    assert c.id_number in cands
    return c.id_number, [cands[i:i + 10] for i in range(0, len(cands), 10)]


def _lookup_sql(block: list[str]) -> str:
    return ("select id from customers where id_number in ("
            + ", ".join(f"'{v}'" for v in block) + ")")


def _raw(dsn: str) -> tuple[psycopg.Connection[Any], Wire]:
    conn = psycopg.connect(dsn, autocommit=True)
    return conn, Wire(conn)


def test_pipelined_binds_of_lookups_meet_the_cap_as_one_request(
        q60: PgveilProcess, leak: LeakChecker, new_teller: Callable[[], str]) -> None:
    """Parse, then 37 Bind/Execute pairs of a 10-value lookup, one Sync: the Binds up to a
    Sync are one request, so the second is refused (and PostgreSQL skips the rest)."""
    _, blocks = _idn_blocks(leak)
    ph = ", ".join(f"${i + 1}" for i in range(10))
    msgs = [parse(b"", f"select id from customers where id_number in ({ph})".encode())]
    for b in blocks:
        b = b + [b[-1]] * (10 - len(b))
        msgs += [bind(b"", *[v.encode() for v in b]), execute()]
    conn, w = _raw(q60.dsn(new_teller()))
    try:
        got = w.batch(*msgs, SYNC)
    finally:
        w.sock.detach()
        conn.close()
    assert got.types.count("C") == 1 and got.sqlstates == ["42501"], got


def test_pipelined_lookup_requests_hold_their_values_against_the_quota(
        q60: PgveilProcess, leak: LeakChecker, new_teller: Callable[[], str]) -> None:
    """37 Query messages of one 10-value lookup each, written at once: each holds its values
    from the moment it is sent, so six run (60 values) and every later one is refused before
    it runs -- the block that would find customer 3 fails like its neighbours."""
    raw, blocks = _idn_blocks(leak)
    conn, w = _raw(q60.dsn(new_teller()))
    try:
        w.sock.sendall(b"".join(query(_lookup_sql(b)) for b in blocks))
        outcomes = [w.batch() for _ in blocks]
    finally:
        w.sock.detach()
        conn.close()
    ran = [i for i, o in enumerate(outcomes) if not o.sqlstates]
    assert 10 * len(ran) <= QUOTA and ran == list(range(len(ran))), ran
    hit = next(i for i, b in enumerate(blocks) if raw in b)
    assert hit not in ran and outcomes[hit].sqlstates == outcomes[hit - 1].sqlstates == ["42501"]


def test_one_request_of_many_lookups_meets_lookup_max_values(leak: LeakChecker) -> None:
    """37 statements of 10 candidates each in one Query message (each within the cap)."""
    _, blocks = _idn_blocks(leak)
    r = leak.assert_no_leak("; ".join(_lookup_sql(b) for b in blocks))
    assert r.denied and "lookup_max_values" in r.describe(), r.describe()


def test_sum_of_a_positional_code_from_a_derived_table_is_packing(leak: LeakChecker) -> None:
    r = leak.assert_no_leak(
        "select sum(v)::text from (select (left(phone,3)||right(phone,4))::numeric "
        "* 10::numeric ^ (7*(id/3)) as v from customers where id > 0) s")
    assert r.denied and "would pack more than max_rows" in r.describe(), r.describe()
    ok = leak.run("select avg(cnt) from (select level, count(*) as cnt from customers "
                  "where id > 0 group by level) t")
    assert not ok.errors and ok.rows


def test_jdbc_style_parameters_without_spaces(leak: LeakChecker) -> None:
    """pgJDBC sends IN (?,?) as ($1,$2): a lookup of two ids, masked and in scope."""
    with open_wire(leak.pgveil.dsn("teller_sz01")) as w:
        got = w.batch(parse(b"", b"select id, phone from customers where id in ($1,$2)"),
                      bind(b"", b"3", b"1"), execute(), SYNC)
    assert got.rows == 1 and not got.sqlstates, got  # customer 1 is another branch's


def test_sum_of_an_outer_column_in_a_scalar_subquery_is_packing(leak: LeakChecker) -> None:
    """Hunt 10: (SELECT sum(v)) aggregates the outer query's rows; an alias list renames by
    position. Both carried the branch in one row past the first trace."""
    p = "(left(phone,3)||right(phone,4))::numeric * 10::numeric ^ (7*(id/3))"
    for sql in (f"select (select sum(v))::text from (select {p} as v from customers "
                "where id > 0) s",
                f"select sum(v)::text from (select {p} as w, id as v from customers "
                "where id > 0) s(v, w)"):
        r = leak.assert_no_leak(sql)
        assert r.denied and "would pack more than max_rows" in r.describe(), r.describe()
