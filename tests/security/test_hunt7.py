"""Bypass hunt 7: existence oracles through keys a DBA added.

* A unique or exclusion index that the catalog could not map to one plain column (an
  expression ``upper(id_number)``, ``UNIQUE (phone) INCLUDE (branch_id)``, ``EXCLUDE (email
  WITH =)``) let a teller's ``UPDATE customers SET id_number = '<guess>'`` answer 23505 when any
  customer of any branch had that value and ``UPDATE 1`` otherwise. Every column such an index
  uses now counts as unique: an explicit value for it is denied, as for a primary key.
* A table with a foreign key onto a masked column (``h7_vip(phone) references
  customers(phone)``) holds copies of raw phones, and inserting into it answered "does this
  phone exist" for every branch. It now counts as reading customers: denied unless listed.
* One result row could carry 120 customers (``lag(phone, k)``, ``nth_value``, FILTER pivots)
  or ten (a ten-way self-join) past the teller's 50-row cap: the cap now counts rows of
  customer data (tests/rewriters/fixtures/packing.sql has the weights).
* Lookup lists of thousands of candidates recovered hidden digits: see
  tests/rewriters/fixtures/lookup.sql (lookup_max_values) and the quota test in
  tests/integration/test_grants_quota.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.security.conftest import LeakChecker, Received, dba_objects

ABSENT = {"phone": "13999999999", "id_number": "110105199901019999",
          "email": "nobody-h7@example.com"}


def _outcome(r: Received) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(r.sqlstates), tuple(s for s in r.statuses if s != "BEGIN")


def _wait_denied(leak: LeakChecker, sql: str, timeout: float = 20.0) -> None:
    """Until pgveil's catalog poll has seen the DBA's change (the teller is denied ``sql``)."""
    deadline = time.monotonic() + timeout
    while not leak.run([sql], tx=True).denied:
        assert time.monotonic() < deadline, f"pgveil never denied {sql!r}"
        time.sleep(0.3)


@pytest.fixture
def dba_change(leak: LeakChecker, request: pytest.FixtureRequest) -> Iterator[None]:
    setup, teardown = request.param
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute(teardown)
        dba.execute(setup)
    try:
        yield
    finally:
        with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
            dba.execute(teardown)


KEYS = [
    pytest.param(("create unique index h7_uq_idn on public.customers (upper(id_number))",
                  "drop index if exists public.h7_uq_idn"), "id_number",
                 id="expression-unique-index"),
    pytest.param(("create unique index h7_uq_email on public.customers (lower(email))",
                  "drop index if exists public.h7_uq_email"), "email",
                 id="expression-unique-index-email"),
    pytest.param(("alter table public.customers add constraint h7_uq_phone unique (phone) "
                  "include (branch_id)",
                  "alter table public.customers drop constraint if exists h7_uq_phone"), "phone",
                 id="unique-include"),
    pytest.param(("alter table public.customers add constraint h7_ex_email exclude using btree "
                  "(email with =)",
                  "alter table public.customers drop constraint if exists h7_ex_email"), "email",
                 id="exclusion-constraint"),
    pytest.param(("create unique index h7_uq_pair on public.customers (id_number, name)",
                  "drop index if exists public.h7_uq_pair"), "id_number",
                 id="two-column-unique-index"),
]


@pytest.mark.parametrize(("dba_change", "col"), KEYS, indirect=["dba_change"])
def test_unique_keys_answer_nothing_about_other_branches(leak: LeakChecker, dba_change: None,
                                                         col: str) -> None:
    present = getattr(leak.secrets.customer(1), col)  # GZ01: out of the teller's scope
    _wait_denied(leak, f"update customers set {col} = '{ABSENT[col]}' where id = 3")
    outcomes = {}
    for value in (present, ABSENT[col]):
        sql = f"update customers set {col} = '{value}' where id = 3"
        r = leak.run([sql], tx=True)
        leak.check(r, sql)
        assert r.denied, r.describe()
        outcomes[value] = _outcome(r)
        row = {"name": "h7", "phone": "1", "id_number": "1", "email": "h7@x", col: value}
        insert = (f"insert into customers (name, phone, id_number, email, branch_id) values "
                  f"('{row['name']}', '{row['phone']}', '{row['id_number']}', '{row['email']}', "
                  "'SZ01')")
        r = leak.run([insert], tx=True)
        leak.check(r, insert)
        outcomes[value + " insert"] = _outcome(r)
    assert outcomes[present] == outcomes[ABSENT[col]]
    assert outcomes[present + " insert"] == outcomes[ABSENT[col] + " insert"]


FK_ONTO_PHONE = (
    "alter table public.customers add constraint h7_uq_phone1 unique (phone); "
    "create table public.h7_vip (phone text references public.customers(phone)); "
    "grant all on public.h7_vip to public",
    "drop table if exists public.h7_vip; "
    "alter table public.customers drop constraint if exists h7_uq_phone1")


@pytest.mark.parametrize("dba_change", [pytest.param(FK_ONTO_PHONE, id="fk-onto-phone")],
                         indirect=True)
def test_foreign_key_onto_a_masked_column_is_a_protected_copy(leak: LeakChecker,
                                                              dba_change: None) -> None:
    present = leak.secrets.customer(1).phone
    _wait_denied(leak, "select count(*) from h7_vip")
    outcomes = {}
    for value in (present, ABSENT["phone"]):
        sql = f"insert into h7_vip values ('{value}')"
        r = leak.run([sql], tx=True)
        leak.check(r, sql)
        assert r.denied, r.describe()
        outcomes[value] = _outcome(r)
    assert outcomes[present] == outcomes[ABSENT["phone"]]
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute(f"insert into h7_vip values ('{present}')")
    r = leak.run(["select phone from h7_vip"])
    leak.check(r, "select phone from h7_vip")
    assert r.denied, r.describe()


def test_foreign_key_onto_an_unmasked_column_stays_usable(leak: LeakChecker) -> None:
    """``customer_id -> customers(id)`` copies nothing the policy masks."""
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute("drop table if exists public.h7_notes")
        dba.execute("create table public.h7_notes (customer_id int references "
                    "public.customers(id), note text); grant all on public.h7_notes to public")
    try:
        time.sleep(1.5)  # a catalog poll
        r = leak.run(["insert into h7_notes values (3, 'called back')",
                      "select note from h7_notes"], tx=True)
        assert not r.errors, r.describe()
        assert r.rows == [("called back",)]
    finally:
        with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
            dba.execute("drop table if exists public.h7_notes")


# A teller's max_rows is 50 DataRows; one row could carry many customers' rows.
LAGS = ", ".join(f"lag(phone, {k}) over w" for k in range(120))
NTH = ", ".join(f"nth_value(name || '/' || phone, {k}) over w" for k in range(1, 101))
PIVOT = ", ".join(f"max(id_number) filter (where id = {3 * k})" for k in range(1, 121))
FAN = (", ".join(f"c{k}.phone" for k in range(10)) + " from customers c0 "
       + " ".join(f"join customers c{k} on c{k}.id = c0.id + {3 * k}" for k in range(1, 10)))


@pytest.mark.parametrize(("sql", "per_row"), [
    pytest.param(f"select {LAGS} from customers where id > 0 window w as (order by id) "
                 "limit 1 offset 119", 120, id="lag-offsets"),
    pytest.param(f"select {NTH} from customers where id > 0 window w as (order by id rows "
                 "between unbounded preceding and unbounded following) limit 1", 100,
                 id="nth-value"),
    pytest.param(f"select {PIVOT} from customers where id > 0", 120, id="filter-pivot"),
    pytest.param(f"select {FAN} limit 50", 10, id="ten-way-self-join"),
])
def test_packed_rows_count_against_max_rows(leak: LeakChecker, sql: str, per_row: int) -> None:
    r = leak.run([sql])
    leak.check(r, sql)
    assert r.alive
    carried = len(r.rows) * per_row
    assert r.denied or carried <= 50, f"{len(r.rows)} rows carrying {carried} customers"


def test_other_sessions_statement_text_is_refused(leak: LeakChecker) -> None:
    """In auth.mode userlist several logins may share one upstream role, and PostgreSQL shows
    the text of a same-role session's statement: another branch's teller's lookup literal."""
    for sql in ("select pid, query from pg_stat_activity",
                "select * from pg_catalog.pg_stat_get_activity(null)"):
        r = leak.run([sql])
        leak.check(r, sql)
        assert r.denied and r.alive, r.describe()


@pytest.fixture
def sessions_view(leak: LeakChecker) -> Iterator[LeakChecker]:
    with dba_objects(
            leak, ["create view public.h7_sessions as select pid, query from pg_stat_activity",
                   "grant select on public.h7_sessions to public",
                   "create function public.h7_queries() returns setof text language sql "
                   "as $$ select query from pg_catalog.pg_stat_activity $$"],
            "drop view if exists public.h7_sessions; drop function if exists "
            "public.h7_queries()", "select count(*) from h7_sessions") as dba:
        yield dba


@pytest.mark.parametrize("sql", ["select query from h7_sessions", "select * from h7_queries()"])
def test_dba_objects_over_other_sessions_text_are_refused(sessions_view: LeakChecker,
                                                          sql: str) -> None:
    """PostgreSQL records no dependency on the pinned pg_stat_activity: a view's definition is
    matched by name, and a function body naming it counts, as for pg_stats."""
    r = sessions_view.run([sql])
    sessions_view.check(r, sql)
    assert r.denied and r.alive, r.describe()
