"""The policy engine seen from real clients: each role of config/policy.yaml gets what SPEC §4-§5
promise, compared field by field with the raw rows read directly from PostgreSQL.

Why live: masks, row filters and lookups are only worth something if a client on the wire gets
exactly these values and types — text and binary results, simple and extended protocol,
prepared statements, pipelines — and if denials leave client and server agreeing on the
transaction state.

Data flow of every test: ``raw`` reads the bank tables directly as the DBA (the ground truth);
the same statement goes through the session's ``pgveil`` as one login; the expected result is
computed here from ``raw`` with the masks of the fixture policy (``VIEWS`` below) and compared
with what the client received.

Logins of the fixture policy: teller_sz01 / teller_gz01 (teller of branch SZ01 / GZ01: identity
masked, own branch, lookup by id_number and phone), manager_sz01 (identity and balance raw, card
masked, own branch), auditor1 (all branches, all personal fields masked, balances round(-3)),
dba (raw), stranger (matched by nothing: role ``default``, sees nothing).
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from proxy.localpg import PostgresCluster
from tests.harness.pgveil_proc import PgveilProcess

ALL = frozenset({"SZ01", "GZ01", "BJ01"})
NONE: frozenset[str] = frozenset()
CUSTOMER_COLS = ("id", "name", "phone", "id_number", "email", "address", "birthday",
                 "branch_id", "level", "created_at")
ACCOUNT_COLS = ("id", "customer_id", "card_no", "balance", "branch_id", "opened_on")
ORDER_COLS = ("id", "customer_id", "amount", "note")
SAMPLE_IDS = list(range(1, 13))  # 4 customers of each branch: far below every max_rows
ADDRESS_MASK = "******"


@dataclass(frozen=True)
class View:
    """What one login must see under config/policy.yaml."""

    role: str
    customers: frozenset[str]  # branches whose customers / accounts are visible
    orders: frozenset[str]  # branches whose customers' orders are visible
    identity_raw: bool  # level-1 columns unmasked
    balance: str  # "raw" | "null" | "round"
    card_raw: bool


VIEWS: dict[str, View] = {
    "teller_sz01": View("teller", frozenset({"SZ01"}), frozenset({"SZ01"}), False, "null", False),
    "teller_gz01": View("teller", frozenset({"GZ01"}), frozenset({"GZ01"}), False, "null", False),
    # manager has no row filter on orders: it sees every branch's orders
    "manager_sz01": View("manager", frozenset({"SZ01"}), ALL, True, "raw", False),
    "auditor1": View("auditor", ALL, ALL, False, "round", False),
    "dba": View("dba", ALL, ALL, True, "raw", True),
    "stranger": View("default", NONE, NONE, False, "null", False),
}
LOGINS = tuple(VIEWS)


# --------------------------------------------------------------------------- masks (policy)


def mask_name(v: str) -> str:
    return v[0] + "*" * (len(v) - 1)


def mask_phone(v: str) -> str:
    return v[:3] + "*" * (len(v) - 7) + v[-4:]


def mask_id_number(v: str) -> str:
    return v[:6] + "*" * (len(v) - 10) + v[-4:]


def mask_email(v: str) -> str:
    local, _, domain = v.partition("@")
    return f"{local[0]}***@{domain}"


def mask_card(v: str) -> str:
    return "*" * (len(v) - 4) + v[-4:]


def mask_birthday(v: datetime.date) -> datetime.date:
    return datetime.date(v.year, 1, 1)


# --------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class Raw:
    """The bank tables as the DBA reads them directly (no pgveil in between)."""

    customers: dict[int, tuple[Any, ...]]
    accounts: dict[int, tuple[Any, ...]]
    orders: dict[int, tuple[Any, ...]]
    rounded: dict[int, decimal.Decimal]  # accounts.id -> round(balance, -3) as PostgreSQL does

    def branch_of(self, customer_id: int) -> str:
        return str(self.customers[customer_id][7])

    def ids_of(self, branch: str) -> list[int]:
        return sorted(i for i, r in self.customers.items() if r[7] == branch)


@pytest.fixture(scope="module")
def raw(pg: PostgresCluster) -> Raw:
    with psycopg.connect(pg.dsn("dba")) as conn:
        customers = {r[0]: r for r in conn.execute(
            f"select {', '.join(CUSTOMER_COLS)} from customers").fetchall()}
        accounts = {r[0]: r for r in conn.execute(
            f"select {', '.join(ACCOUNT_COLS)} from accounts").fetchall()}
        orders = {r[0]: r for r in conn.execute(
            f"select {', '.join(ORDER_COLS)} from orders").fetchall()}
        rounded = dict(conn.execute("select id, round(balance, -3) from accounts").fetchall())
    return Raw(customers, accounts, orders, rounded)


def expected_customer(view: View, row: tuple[Any, ...]) -> tuple[Any, ...]:
    if view.identity_raw:
        return tuple(row)
    cid, name, phone, id_number, email, _address, birthday, branch, level, created = row
    return (cid, mask_name(name), mask_phone(phone), mask_id_number(id_number), mask_email(email),
            ADDRESS_MASK, mask_birthday(birthday), branch, level, created)


def expected_account(view: View, raw: Raw, row: tuple[Any, ...]) -> tuple[Any, ...]:
    aid, cid, card, balance, branch, opened = row
    shown = {"raw": balance, "null": None, "round": raw.rounded[aid]}[view.balance]
    return (aid, cid, card if view.card_raw else mask_card(card), shown, branch, opened)


def fetch(dsn: str, sql: str, params: Sequence[Any] | None = None,
          **kwargs: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params, **kwargs).fetchall()


def describe(dsn: str, sql: str, params: Sequence[Any] | None = None) -> list[tuple[str, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        assert cur.description is not None
        return [(d.name, d.type_code) for d in cur.description]


@pytest.fixture
def teller(pgveil: PgveilProcess) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pgveil.dsn("teller_sz01"), autocommit=True) as conn:
        yield conn


# --------------------------------------------------------------------------- what each role sees


@pytest.mark.parametrize("login", LOGINS)
def test_customers_rows_and_masks(pgveil: PgveilProcess, raw: Raw, login: str) -> None:
    view = VIEWS[login]
    got = fetch(pgveil.dsn(login),
                f"select {', '.join(CUSTOMER_COLS)} from customers where id = any(%s) order by id",
                (SAMPLE_IDS,))
    want = [expected_customer(view, raw.customers[i]) for i in SAMPLE_IDS
            if raw.branch_of(i) in view.customers]
    assert got == want


@pytest.mark.parametrize("login", LOGINS)
def test_select_star_keeps_every_column(pgveil: PgveilProcess, raw: Raw, login: str) -> None:
    """``select *`` through the masked subquery: same columns, same order, masked values."""
    view = VIEWS[login]
    got = fetch(pgveil.dsn(login), "select * from customers where id <= 12 order by id")
    want = [expected_customer(view, raw.customers[i]) for i in SAMPLE_IDS
            if raw.branch_of(i) in view.customers]
    assert got == want


@pytest.mark.parametrize("login", LOGINS)
def test_accounts_card_and_balance(pgveil: PgveilProcess, raw: Raw, login: str) -> None:
    view = VIEWS[login]
    got = fetch(pgveil.dsn(login),
                f"select {', '.join(ACCOUNT_COLS)} from accounts where customer_id = any(%s) "
                "order by id", (SAMPLE_IDS,))
    want = [expected_account(view, raw, r) for r in sorted(raw.accounts.values())
            if r[1] in SAMPLE_IDS and r[4] in view.customers]
    assert got == want
    if view.role in ("teller", "manager", "auditor"):
        assert want and all(r[2].startswith("*" * 12) and len(r[2]) == 16 for r in got)


@pytest.mark.parametrize("login", LOGINS)
def test_orders_row_filter(pgveil: PgveilProcess, raw: Raw, login: str) -> None:
    view = VIEWS[login]
    got = fetch(pgveil.dsn(login),
                f"select {', '.join(ORDER_COLS)} from orders where customer_id = any(%s) "
                "order by id", (SAMPLE_IDS,))
    want = [tuple(r) for r in sorted(raw.orders.values())
            if r[1] in SAMPLE_IDS and raw.branch_of(r[1]) in view.orders]
    assert got == want


def test_teller_shapes_match_the_policy_comments(pgveil: PgveilProcess, raw: Raw) -> None:
    """The literal shapes of SPEC §4 / policy.yaml: 138****5678, 王*, 440304********1234 …"""
    (row,) = fetch(pgveil.dsn("teller_sz01"),
                   "select name, phone, id_number, email, address, birthday from customers "
                   "where id = 3")
    name, phone, id_number, email, address, birthday = row
    orig = raw.customers[3]
    assert len(name) == len(orig[1]) and name[0] == orig[1][0] and set(name[1:]) == {"*"}
    assert phone == f"{orig[2][:3]}****{orig[2][-4:]}" and len(phone) == 11
    assert id_number == f"{orig[3][:6]}{'*' * 8}{orig[3][-4:]}" and len(id_number) == 18
    assert email == "u***@example.com"
    assert address == ADDRESS_MASK
    assert isinstance(birthday, datetime.date) and (birthday.month, birthday.day) == (1, 1)
    assert birthday.year == orig[6].year


@pytest.mark.parametrize(("login", "branch"), [
    ("teller_sz01", "SZ01"), ("teller_gz01", "GZ01"), ("manager_sz01", "SZ01")])
def test_row_filter_own_branch_only(pgveil: PgveilProcess, raw: Raw, login: str,
                                    branch: str) -> None:
    dsn = pgveil.dsn(login)
    want = [i for i in raw.ids_of(branch) if i < 60]
    assert [r[0] for r in fetch(dsn, "select id from customers where id < 60 order by id")] == want
    (n,) = fetch(dsn, "select count(*) from customers where level >= 1")[0]
    assert n == len(raw.ids_of(branch))
    # explicit attempts at other branches find nothing
    others = sorted(ALL - {branch})
    assert fetch(dsn, "select id from customers where branch_id = any(%s) limit 10",
                 (others,)) == []
    other_id = raw.ids_of(others[0])[0]
    assert fetch(dsn, "select id from customers where id = %s", (other_id,)) == []
    assert fetch(dsn, "select a.id from accounts a join customers c on c.id = a.customer_id "
                 "where c.id = %s", (other_id,)) == []
    assert fetch(dsn, "select count(*) from accounts where branch_id <> %s", (branch,)) == [(0,)]


def test_auditor_sees_all_branches_masked_and_rounded(pgveil: PgveilProcess, raw: Raw) -> None:
    dsn = pgveil.dsn("auditor1")
    assert fetch(dsn, "select count(*) from customers where level >= 1") == [(len(raw.customers),)]
    assert fetch(dsn, "select count(distinct branch_id) from customers where id < 100") == [(3,)]
    rows = fetch(dsn, "select c.id, c.phone, a.id, a.balance from customers c "
                 "join accounts a on a.customer_id = c.id where c.id <= 30 order by a.id")
    assert rows
    for cid, phone, aid, balance in rows:
        assert phone == mask_phone(raw.customers[cid][2])
        assert balance == raw.rounded[aid] and balance % 1000 == 0
    # aggregates run over the rounded value, never the raw one
    (total,) = fetch(dsn, "select sum(balance) from accounts where customer_id <= 30")[0]
    assert total == sum(raw.rounded[a] for a, r in raw.accounts.items() if r[1] <= 30)


def test_manager_raw_identity_and_balance_masked_card(pgveil: PgveilProcess, raw: Raw) -> None:
    rows = fetch(pgveil.dsn("manager_sz01"),
                 "select c.id, c.name, c.phone, c.id_number, a.id, a.card_no, a.balance "
                 "from customers c join accounts a on a.customer_id = c.id "
                 "where c.id in (3, 4) order by a.id")
    assert rows and {r[0] for r in rows} == {3}  # customer 4 is GZ01
    for cid, name, phone, id_number, aid, card, balance in rows:
        orig, acct = raw.customers[cid], raw.accounts[aid]
        assert (name, phone, id_number) == (orig[1], orig[2], orig[3])
        assert card == mask_card(acct[2]) and card != acct[2]
        assert balance == acct[3]


def test_dba_sees_raw_data_of_all_branches(pgveil: PgveilProcess, raw: Raw) -> None:
    got = fetch(pgveil.dsn("dba"),
                f"select {', '.join(CUSTOMER_COLS)} from customers where id <= 30 order by id")
    assert got == [raw.customers[i] for i in range(1, 31)]
    assert fetch(pgveil.dsn("dba"), "select count(*) from customers") == [(len(raw.customers),)]


def test_stranger_gets_role_default_and_sees_nothing(pgveil: PgveilProcess) -> None:
    dsn = pgveil.dsn("stranger")
    for sql in ("select id, phone from customers where id = 3",
                "select * from accounts where customer_id = 3",
                "select * from orders where customer_id = 3"):
        assert fetch(dsn, sql) == []
    try:
        counted = fetch(dsn, "select count(*) from customers where level >= 1")
    except psycopg.Error as exc:  # max_rows: 0 may refuse even the one aggregate row
        assert exc.sqlstate == "42501"
    else:
        assert counted == [(0,)]
    # unprotected tables stay readable
    assert fetch(dsn, "select count(*) from branches") == [(3,)]


def test_other_database_without_protected_tables_is_usable(pgveil: PgveilProcess) -> None:
    """A teller (whose policy truncates a date and rounds a number) connecting to ``postgres``,
    where no protected table exists: the connection works; reading ``customers`` there fails
    in PostgreSQL (the table is not there), it is not refused by pgveil's type checks."""
    for login in ("teller_sz01", "auditor1"):
        dsn = pgveil.dsn(login, db="postgres")
        assert fetch(dsn, "select current_database(), 1") == [("postgres", 1)]
        with pytest.raises(psycopg.Error) as info:
            fetch(dsn, "select birthday from customers where id = 1")
        assert info.value.sqlstate == "42P01"


# --------------------------------------------------------------------------- mask at the source


def test_masked_values_cannot_be_matched_or_inferred(pgveil: PgveilProcess, raw: Raw) -> None:
    dsn = pgveil.dsn("teller_sz01")
    orig = raw.customers[3]
    # name and email are not lookup columns: predicates see the masked value
    assert fetch(dsn, "select id from customers where name = %s", (orig[1],)) == []
    assert fetch(dsn, "select id from customers where email = %s", (orig[4],)) == []
    assert fetch(dsn, "select id from customers where id = 3 and address = %s",
                 (orig[5],)) == []
    assert fetch(dsn, "select id from customers where id = 3 and birthday = %s",
                 (orig[6],)) == ([] if orig[6] != mask_birthday(orig[6]) else [(3,)])
    # expressions over masked columns see masked values too
    (row,) = fetch(dsn, "select upper(phone), length(id_number), phone || '' from customers "
                   "where id = 3")
    assert row == (mask_phone(orig[2]), 18, mask_phone(orig[2]))
    (js,) = fetch(dsn, "select row_to_json(c) from customers c where c.id = 3")[0]
    assert js["phone"] == mask_phone(orig[2]) and js["name"] == mask_name(orig[1])
    assert js["id_number"] == mask_id_number(orig[3]) and js["address"] == ADDRESS_MASK
    # a CTE and a subquery read the same masked source
    assert fetch(dsn, "with x as (select * from customers where id = 3) select phone from x") \
        == [(mask_phone(orig[2]),)]
    assert fetch(dsn, "select (select phone from customers where id = 3)") \
        == [(mask_phone(orig[2]),)]


# --------------------------------------------------------------------------- names and types


TYPED_QUERIES = [
    ("select * from customers where id = %s", (3,)),
    ("select * from accounts where customer_id = %s", (3,)),
    ("select c.*, a.* from customers c join accounts a on a.customer_id = c.id where c.id = %s",
     (3,)),
    ("select name as n, phone, birthday, balance, card_no from customers c "
     "join accounts a on a.customer_id = c.id where c.id = %s", (3,)),
    ("select row_to_json(c) as j, c.birthday + 1 as later, a.balance * 2 as doubled "
     "from customers c join accounts a on a.customer_id = c.id where c.id = %s", (3,)),
    ("select count(*), max(birthday), sum(balance) from customers c "
     "join accounts a on a.customer_id = c.id where c.id = %s", (3,)),
    ("select id, amount, note from orders where customer_id = %s", (3,)),
]


@pytest.mark.parametrize("login", ["teller_sz01", "manager_sz01", "auditor1", "dba"])
@pytest.mark.parametrize(("sql", "params"), TYPED_QUERIES)
def test_column_names_and_type_oids_equal_direct(pg: PostgresCluster, pgveil: PgveilProcess,
                                                 login: str, sql: str,
                                                 params: tuple[Any, ...]) -> None:
    assert describe(pgveil.dsn(login), sql, params) == describe(pg.dsn("dba"), sql, params)


def test_text_and_binary_results_agree(pgveil: PgveilProcess, raw: Raw) -> None:
    sql = ("select c.id, c.name, c.phone, c.birthday, c.created_at, a.card_no, a.balance "
           "from customers c join accounts a on a.customer_id = c.id where c.id in (3, 6) "
           "order by a.id")
    with psycopg.connect(pgveil.dsn("auditor1")) as conn:
        text = conn.execute(sql).fetchall()
        binary = conn.execute(sql, binary=True).fetchall()
    assert text == binary and text
    assert all(r[2] == mask_phone(raw.customers[r[0]][2]) for r in binary)


async def test_asyncpg_binary_values_and_types(pg: PostgresCluster, pgveil: PgveilProcess,
                                               raw: Raw) -> None:
    sql = ("select c.id, c.name, c.phone, c.birthday, c.created_at, c.level, a.card_no, "
           "a.balance, a.opened_on from customers c join accounts a on a.customer_id = c.id "
           "where c.id = $1 order by a.id")
    via = await asyncpg.connect(pgveil.dsn("teller_sz01"))
    direct = await asyncpg.connect(pg.dsn("dba"))
    try:
        rows = await via.fetch(sql, 3)
        assert rows
        for r in rows:
            orig = raw.customers[3]
            assert r["name"] == mask_name(orig[1]) and r["phone"] == mask_phone(orig[2])
            assert isinstance(r["birthday"], datetime.date)
            assert r["birthday"] == mask_birthday(orig[6])
            assert isinstance(r["created_at"], datetime.datetime) and r["level"] == orig[8]
            assert r["balance"] is None and isinstance(r["opened_on"], datetime.date)
            assert r["card_no"].startswith("*" * 12)
        # manager: balance is numeric → Decimal over the binary protocol
        mgr = await asyncpg.connect(pgveil.dsn("manager_sz01"))
        try:
            bal = await mgr.fetchval("select balance from accounts where customer_id = $1 "
                                     "order by id limit 1", 3)
        finally:
            await mgr.close()
        assert isinstance(bal, decimal.Decimal)
        # Describe (extended protocol): names, type OIDs and parameter types equal direct's
        st_via, st_direct = await via.prepare(sql), await direct.prepare(sql)
        assert [(a.name, a.type.oid) for a in st_via.get_attributes()] == \
            [(a.name, a.type.oid) for a in st_direct.get_attributes()]
        assert [p.oid for p in st_via.get_parameters()] == \
            [p.oid for p in st_direct.get_parameters()]
        assert [tuple(r) for r in await st_via.fetch(3)] == [tuple(r) for r in rows]
    finally:
        await via.close()
        await direct.close()


def test_psycopg_prepared_statements_keep_description(pg: PostgresCluster,
                                                      pgveil: PgveilProcess) -> None:
    sql = "select id, phone, birthday from customers where id = %s"
    with psycopg.connect(pg.dsn("dba")) as d:
        want = [(c.name, c.type_code) for c in d.execute(sql, (3,)).description or ()]
    with psycopg.connect(pgveil.dsn("teller_sz01")) as conn:
        for i in range(4):  # the 2nd+ execution runs a server-side prepared statement
            cur = conn.execute(sql, (3 + 3 * i,), prepare=True)
            assert [(c.name, c.type_code) for c in cur.description or ()] == want
            assert len(cur.fetchall()) == 1


# --------------------------------------------------------------------------- lookup


def test_lookup_by_id_number_literal_and_parameter(pgveil: PgveilProcess, raw: Raw) -> None:
    dsn = pgveil.dsn("teller_sz01")
    orig = raw.customers[3]
    want = [(3, mask_phone(orig[2]), mask_id_number(orig[3]))]
    assert fetch(dsn, f"select id, phone, id_number from customers "
                   f"where id_number = '{orig[3]}'") == want
    assert fetch(dsn, "select id, phone, id_number from customers where id_number = %s",
                   (orig[3],)) == want


async def test_lookup_with_asyncpg_parameter(pgveil: PgveilProcess, raw: Raw) -> None:
    """A $1 parameter bound in binary over the extended protocol is a lookup too."""
    orig = raw.customers[3]
    conn = await asyncpg.connect(pgveil.dsn("teller_sz01"))
    try:
        got = [tuple(r) for r in await conn.fetch(
            "select id, phone, id_number from customers where id_number = $1", orig[3])]
        other = await conn.fetch("select id from customers where id_number = $1",
                                 raw.customers[1][3])
    finally:
        await conn.close()
    assert got == [(3, mask_phone(orig[2]), mask_id_number(orig[3]))]
    assert other == []


def test_lookup_by_phone_and_in_lists(pgveil: PgveilProcess, raw: Raw) -> None:
    dsn = pgveil.dsn("teller_sz01")
    c3, c6, c1 = raw.customers[3], raw.customers[6], raw.customers[1]
    assert fetch(dsn, "select id, phone from customers where phone = %s", (c3[2],)) == \
        [(3, mask_phone(c3[2]))]
    assert fetch(dsn, f"select id from customers where phone = '{c6[2]}'") == [(6,)]
    # IN with literals and with parameters; the GZ01 customer 1 is never found
    assert fetch(dsn, f"select id from customers where id_number in "
                   f"('{c3[3]}', '{c6[3]}', '{c1[3]}') order by id") == [(3,), (6,)]
    assert fetch(dsn, "select id from customers where phone in (%s, %s, %s) order by id",
                   (c3[2], c6[2], c1[2])) == [(3,), (6,)]
    # a lookup conjunct combined with other conditions still works
    assert fetch(dsn, "select id from customers where id_number = %s and level >= 1",
                   (c3[3],)) == [(3,)]


def test_lookup_never_crosses_the_branch(pgveil: PgveilProcess, raw: Raw) -> None:
    gz = raw.customers[1]  # GZ01
    assert raw.branch_of(1) == "GZ01"
    assert fetch(pgveil.dsn("teller_sz01"), "select id from customers where id_number = %s",
                   (gz[3],)) == []
    assert fetch(pgveil.dsn("teller_sz01"), "select id from customers where phone = %s",
                   (gz[2],)) == []
    # the GZ01 teller finds its own customer, masked
    assert fetch(pgveil.dsn("teller_gz01"), "select id, phone from customers "
                   "where id_number = %s", (gz[3],)) == [(1, mask_phone(gz[2]))]
    assert fetch(pgveil.dsn("teller_gz01"), "select id from customers where id_number = %s",
                   (raw.customers[3][3],)) == []


@pytest.mark.parametrize("where", [
    "id_number like %s",
    "id_number ilike %s",
    "id_number between %s and %s",
    "id_number >= %s and id_number <= %s",
    "lower(id_number) = lower(%s)",
    "id_number || '' = %s",
    "(id_number = %s or id = -1)",
    "case when id_number = %s then true else false end",
    "coalesce(id_number, '') = %s",
    "substr(id_number, 7, 8) = substr(%s, 7, 8)",
    "phone like %s",
    "phone > %s and phone < %s",
])
def test_lookup_is_exact_match_only(pgveil: PgveilProcess, raw: Raw, where: str) -> None:
    """LIKE, ranges, functions, OR, CASE: all see the masked value, so the raw one matches
    nothing (the patterns are built so that they would match the raw value of customer 3)."""
    orig = raw.customers[3]
    column = 3 if "id_number" in where else 2
    value = orig[column]
    if "like" in where:
        params: tuple[Any, ...] = (value[:10] + "%",)
    elif "between" in where or ">=" in where:
        params = (value, value)
    elif "phone >" in where:
        params = (value[:9] + "0" * 2, value[:9] + "99")
    else:
        params = (value,)
    got = fetch(pgveil.dsn("teller_sz01"),
                  f"select id from customers where id = 3 and {where}", params)
    assert got == []


def test_select_list_and_order_by_stay_masked_duringfetch(pgveil: PgveilProcess,
                                                            raw: Raw) -> None:
    orig = raw.customers[3]
    rows = fetch(pgveil.dsn("teller_sz01"),
                   "select id_number, phone, (id_number = %s) as same from customers "
                   "where id_number = %s order by id_number", (orig[3], orig[3]))
    assert rows == [(mask_id_number(orig[3]), mask_phone(orig[2]), False)]


# --------------------------------------------------------------------------- role cannot change


def test_application_name_does_not_change_the_role(pgveil: PgveilProcess, raw: Raw) -> None:
    masked = [(mask_phone(raw.customers[3][2]),)]
    with psycopg.connect(pgveil.dsn("teller_sz01", application_name="dba"),
                         autocommit=True) as conn:
        assert conn.execute("select phone from customers where id = 3").fetchall() == masked
        conn.execute("set application_name = 'admin-console'")
        assert conn.execute("select phone from customers where id = 3").fetchall() == masked
        assert conn.execute("select current_setting('application_name')").fetchone() == \
            ("admin-console",)


@pytest.mark.parametrize("escape", [
    "set role dba",
    "set session authorization dba",
    "set role postgres",
    "select set_config('role', 'dba', false)",
    "reset session authorization",
])
def test_role_switching_does_not_escape_the_policy(pgveil: PgveilProcess, raw: Raw,
                                                   escape: str) -> None:
    masked = [(mask_phone(raw.customers[3][2]),)]
    with psycopg.connect(pgveil.dsn("teller_sz01"), autocommit=True) as conn:
        try:
            conn.execute(escape)
        except psycopg.Error as exc:
            assert exc.sqlstate == "42501", exc
        assert conn.execute("select current_user").fetchone() == ("teller_sz01",)
        assert conn.execute("select phone from customers where id = 3").fetchall() == masked
        assert conn.execute("select id from customers where id = 1").fetchall() == []


# --------------------------------------------------------------------------- denials


@pytest.mark.parametrize(("sql", "table"), [
    ("copy customers to stdout", "customers"),
    ("select id from customers", "customers"),
    ("select * from accounts", "accounts"),
    ("copy (select phone from orders o join customers c on c.id = o.customer_id) to stdout",
     "customers"),
])
def test_denial_is_42501_naming_the_table(teller: psycopg.Connection[Any], sql: str,
                                          table: str) -> None:
    with pytest.raises(psycopg.Error) as info:
        teller.execute(sql)
    err = info.value
    assert err.sqlstate == "42501"
    assert err.diag.severity_nonlocalized == "ERROR"
    assert table in (err.diag.message_primary or "")
    assert teller.info.transaction_status is TransactionStatus.IDLE
    assert teller.execute("select 1").fetchone() == (1,)


def test_ddl_denial_says_what_and_for_whom(teller: psycopg.Connection[Any]) -> None:
    with pytest.raises(pg_errors.InsufficientPrivilege) as info:
        teller.execute("create view v_leak as select * from customers")
    message = info.value.diag.message_primary or ""
    assert "teller" in message and ("DDL" in message or "view" in message.lower())
    assert teller.execute("select 1").fetchone() == (1,)


def test_denied_statement_never_reaches_postgres(pg: PostgresCluster,
                                                 teller: psycopg.Connection[Any]) -> None:
    name = f"leak_{uuid.uuid4().hex[:8]}"
    with pytest.raises(psycopg.Error) as info:
        teller.execute(f"create table {name} as select * from customers where id < 10")
    assert info.value.sqlstate == "42501"
    assert pg.psql(f"select to_regclass('public.{name}') is null").strip() == "t"


def test_denial_in_a_transaction_fails_it_on_both_sides(pgveil: PgveilProcess) -> None:
    with psycopg.connect(pgveil.dsn("teller_sz01")) as conn:  # not autocommit: BEGIN implied
        assert conn.execute("select 1").fetchone() == (1,)
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("copy customers to stdout")
        assert conn.info.transaction_status is TransactionStatus.INERROR
        for _ in range(2):  # the server, too, refuses everything until the rollback
            with pytest.raises(pg_errors.InFailedSqlTransaction):
                conn.execute("select 1")
        conn.rollback()
        assert conn.info.transaction_status is TransactionStatus.IDLE
        assert conn.execute("select 2").fetchone() == (2,)
        # extended protocol (a bound parameter) behaves the same
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("select id from customers where %s::int = 1", (1,))
        assert conn.info.transaction_status is TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select %s::int", (1,))
        conn.rollback()


def test_savepoint_recovers_from_a_denial_like_from_any_error(pgveil: PgveilProcess) -> None:
    with psycopg.connect(pgveil.dsn("teller_sz01")) as conn:
        conn.execute("select 1")
        conn.execute("savepoint s1")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("select * from accounts")
        conn.execute("rollback to savepoint s1")
        assert conn.info.transaction_status is TransactionStatus.INTRANS
        assert conn.execute("select 3").fetchone() == (3,)
        conn.commit()


def test_denial_in_autocommit_keeps_the_session(teller: psycopg.Connection[Any]) -> None:
    pid = teller.execute("select pg_backend_pid()").fetchone()
    for _ in range(3):
        with pytest.raises(pg_errors.InsufficientPrivilege):
            teller.execute("select phone from customers")
        assert teller.info.transaction_status is TransactionStatus.IDLE
        assert teller.execute("select 1").fetchone() == (1,)
    assert teller.execute("select pg_backend_pid()").fetchone() == pid


def _pipeline_outcome(dsn: str, failing: str) -> dict[str, Any]:
    """Run [mark 'first', failing, mark 'third'] as one psycopg pipeline batch (one Sync),
    then look at what ran. psycopg may raise the error at any call once the failure has
    arrived, so every call is guarded; the server-side marks say what really executed."""
    raised: list[str] = []
    statements = ("select set_config('pgveil_test.first', 'ran', false)", failing,
                  "select set_config('pgveil_test.third', 'ran', false)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        curs: list[psycopg.Cursor[Any] | None] = []
        try:
            with conn.pipeline() as pipe:
                for sql in statements:
                    try:
                        curs.append(conn.execute(sql))
                    except psycopg.Error as exc:
                        raised.append(type(exc).__name__)
                        curs.append(None)
                try:
                    pipe.sync()
                except psycopg.Error as exc:
                    raised.append(type(exc).__name__)
        except psycopg.Error as exc:
            raised.append(type(exc).__name__)
        first_result: Any = None
        if curs and curs[0] is not None:
            try:
                first_result = curs[0].fetchall()
            except psycopg.Error as exc:
                first_result = type(exc).__name__
        ran = conn.execute("select current_setting('pgveil_test.first', true), "
                           "current_setting('pgveil_test.third', true)").fetchone()
        status = conn.info.transaction_status
    return {"first error": raised[0] if raised else None, "first result": first_result,
            "ran": ran, "status": status}


def test_pipeline_denial_fails_the_rest_of_the_batch_like_postgres(
        pg: PostgresCluster, pgveil: PgveilProcess) -> None:
    direct = _pipeline_outcome(pg.dsn("teller_sz01"), "select 1/0")
    via = _pipeline_outcome(pgveil.dsn("teller_sz01"), "select phone from customers")
    assert direct["first error"] == "DivisionByZero"
    assert via["first error"] == "InsufficientPrivilege"
    # the statement before the failure ran and its result arrived, but the batch's implicit
    # transaction rolled it back; the one after it never ran; the session is idle and
    # usable — exactly as on PostgreSQL
    assert direct["ran"] == ("", None)
    assert via["ran"] == direct["ran"]
    assert via["first result"] == direct["first result"] == [("ran",)]
    assert via["status"] is direct["status"] is TransactionStatus.IDLE


def test_pipeline_in_a_transaction_after_denial(pgveil: PgveilProcess) -> None:
    with psycopg.connect(pgveil.dsn("teller_sz01")) as conn:
        with pytest.raises(psycopg.Error), conn.pipeline():
            conn.execute("select 1")
            conn.execute("select phone from customers")  # unbounded: denied
            conn.execute("select 2")
        assert conn.info.transaction_status is TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)
