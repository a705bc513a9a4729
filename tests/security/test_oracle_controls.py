"""Controls for the oracle itself: the same reads made DIRECTLY against PostgreSQL must be caught.

Why: if ``find_leaks`` or the scope checks were blind (a regex typo, a wrong forbidden set), every
bypass test would pass vacuously. These tests bypass pgveil on purpose and expect the checker to
fail them; they also pin down that masked output is *not* reported (no false alarms).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.security.conftest import LeakChecker, Received, ResultSet, find_leaks


def _direct(leak: LeakChecker, sql: str, login: str = "teller_sz01") -> Received:
    """Run sql straight on PostgreSQL (no pgveil) as login and collect it like an attack."""
    received = Received()
    with psycopg.connect(leak.pg.dsn(login), autocommit=True) as conn:
        cur = conn.execute(leak.secrets.fill(sql))
        rows: list[tuple[Any, ...]] = cur.fetchall()
        received.results.append(ResultSet([d.name for d in cur.description or []], rows,
                                          cur.statusmessage))
        received.alive = True
    return received


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("select phone from customers where id = 3", id="phone"),
        pytest.param("select reverse(id_number) from customers where id = 3", id="reversed"),
        pytest.param("select md5(phone) from customers where id = 3", id="md5"),
        pytest.param(
            "select regexp_replace(phone, '(\\d{3})(\\d{4})', '\\1-\\2 ') from customers "
            "where id = 3",
            id="digits-with-separators",
        ),
        pytest.param("select row_to_json(c) from customers c where id = 3", id="json-row"),
        pytest.param("select upper(email) from customers where id = 3", id="email-upper"),
        pytest.param("select name from customers where id = 3", id="name"),
        pytest.param("select substr(address, 1, 13) from customers where id = 3", id="stem"),
        pytest.param("select card_no from accounts where customer_id = 3 limit 1", id="card"),
        pytest.param(
            "select balance from accounts where balance >= 10000 and "
            "balance::text not like '%000.00' limit 1",
            id="balance",
        ),
        pytest.param("select birthday from customers where id = 3", id="birthday"),
        pytest.param("select id from customers where id = 1", id="out-of-scope-id"),
        pytest.param("select branch_id, level from customers where id = 1", id="other-branch"),
    ],
)
def test_direct_reads_are_detected(leak: LeakChecker, sql: str) -> None:
    received = _direct(leak, sql)
    with pytest.raises(pytest.fail.Exception):
        leak.check(received, sql.replace("branch_id", "level"))


def test_masked_output_is_not_a_leak(leak: LeakChecker) -> None:
    received = _direct(
        leak,
        "select id, left(name, 1) || '*', left(phone, 3) || '****' || right(phone, 4), "
        "left(id_number, 6) || '********' || right(id_number, 4), 'u***@example.com', "
        "'******', date_trunc('year', birthday)::date, branch_id from customers "
        "where branch_id = 'SZ01' limit 50",
    )
    leak.check(received, "select from customers")


def test_typed_secrets_are_not_reported(leak: LeakChecker) -> None:
    phone = leak.secrets.customer(3).phone
    forbidden = leak.secrets.forbidden("teller_sz01")
    assert find_leaks(forbidden, [f"no such thing: {phone}"], typed="") == [phone]
    assert find_leaks(forbidden, [f"no such thing: {phone}"], typed=f"where phone = '{phone}'") == []


def test_manager_may_see_own_branch_but_not_others(leak: LeakChecker) -> None:
    own = leak.secrets.customer(3)
    other = leak.secrets.customer(1)
    forbidden = leak.secrets.forbidden("manager_sz01")
    assert find_leaks(forbidden, [own.phone, own.id_number, own.address or ""], "") == []
    assert other.phone in find_leaks(forbidden, [other.phone], "")
    card = leak.secrets.first_account(3).card_no
    assert find_leaks(forbidden, [card], "") == [card]


def test_differential_oracle_distinguishes_masked_from_raw(leak: LeakChecker) -> None:
    sql = "select count(*) from customers where phone like '1860%'"
    masked = leak._oracle_result("sec_oracle", sql, None)
    raw = leak._oracle_result("sec_raw", sql, None)
    assert masked != raw
    assert masked == [("0",)]


@pytest.mark.parametrize(
    ("sql", "listen"),
    [
        pytest.param("select pg_notify('sec_ctl', phone) is null from customers where id = 3",
                     "sec_ctl", id="notify-payload"),
        pytest.param("select set_config('application_name', phone, false) is null "
                     "from customers where id = 3", None, id="parameter-status"),
        pytest.param("do $$ begin raise notice '%', (select id_number from customers "
                     "where id = 3); end $$", None, id="notice"),
        pytest.param("select phone::int from customers where id = 3", None, id="error-echo"),
        pytest.param("update customers set level = null where id = 3", None,
                     id="error-detail"),
    ],
)
def test_side_channels_are_collected(leak: LeakChecker, sql: str, listen: str | None) -> None:
    """The collectors see NOTIFY payloads, ParameterStatus, notices and error fields."""
    with psycopg.connect(leak.pg.dsn("teller_sz01"), autocommit=True) as conn:
        received = leak.run(sql, conn=conn, listen=listen)
    assert received.alive
    with pytest.raises(pytest.fail.Exception):
        leak.check(received, sql)
