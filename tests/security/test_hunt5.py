"""Bypass hunt 5: data published by other sessions, and literals hidden from the audit log.

* LISTEN: channels are database-wide, so a masked operator listening on a channel where an
  application or a DBA tool publishes rows (``pg_notify('events', row_to_json(c)::text)``)
  received whole raw rows of every branch. Masked roles may now LISTEN only to channels the
  policy lists (``listen_channels``, names or glob patterns); the suite's policy lists three.
  Notifications of other channels are dropped on the wire too (a function can LISTEN).
* The audit log's literal redaction ended a block comment at the first ``*/``; PostgreSQL
  nests them, so ``/* /* */ " */ phone = '186…' /* " */`` kept the raw phone in the record.

The session stays usable after each denial.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from tests.security.conftest import LeakChecker, dba_objects


def _notifications(conn: psycopg.Connection[object]) -> list[str]:
    conn.execute("select 1")  # lets psycopg read what arrived meanwhile
    return [n.payload for n in conn.notifies(timeout=1, stop_after=1)]


@pytest.mark.parametrize("listen", ["listen h5_events", 'LISTEN "H5_Events"', 'LISTEN "SEC_CH"',
                                    "select 1; listen h5_events"])
def test_masked_role_cannot_listen_to_an_unlisted_channel(leak: LeakChecker,
                                                          listen: str) -> None:
    with leak.connect() as teller:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            teller.execute(listen)
        assert "listen" in str(info.value).lower()
        with leak.connect("dba") as dba:
            dba.execute("select pg_notify('h5_events', row_to_json(c)::text) "
                        "from customers c where id = 1")
            dba.execute("select pg_notify('H5_Events', row_to_json(c)::text) "
                        "from customers c where id = 1")
        time.sleep(0.3)
        got = _notifications(teller)
        assert got == [], got
        assert teller.execute("select 1").fetchone() == (1,)


def test_listed_channel_and_the_dba_are_unaffected(leak: LeakChecker) -> None:
    with leak.connect() as teller, leak.connect("dba") as dba:
        teller.execute("listen sec_ch")  # listed in the suite's policy
        dba.execute("listen h5_events")  # the DBA is unrestricted
        dba.execute("notify sec_ch, 'hello'")
        dba.execute("notify h5_events, 'for the dba'")
        time.sleep(0.3)
        assert _notifications(teller) == ["hello"]
        assert _notifications(dba) == ["for the dba"]
        teller.execute("unlisten *")


def test_subscription_made_inside_a_function_delivers_nothing(leak: LeakChecker) -> None:
    """A DBA's function with a static LISTEN in PL/pgSQL subscribes the caller's session
    without a LISTEN statement: the notifications themselves are filtered by channel."""
    with leak.connect("dba") as dba:
        dba.execute("create or replace function h5_subscribe() returns int language plpgsql "
                    "as $$ begin listen h5_fn_events; return 1; end $$")
    try:
        with leak.connect() as teller, leak.connect("dba") as dba:
            teller.execute("listen sec_ch")
            assert teller.execute("select h5_subscribe()").fetchone() == (1,)
            assert teller.execute("select pg_listening_channels() order by 1").fetchall() == \
                [("h5_fn_events",), ("sec_ch",)]
            dba.execute("select pg_notify('h5_fn_events', row_to_json(c)::text) "
                        "from customers c where id = 1")
            dba.execute("notify sec_ch, 'listed'")
            time.sleep(0.3)
            got = _notifications(teller)
            assert got == ["listed"], got
            assert teller.execute("select 1").fetchone() == (1,)
    finally:
        with leak.connect("dba") as dba:
            dba.execute("drop function if exists h5_subscribe()")


def test_nested_comment_does_not_hide_a_literal_from_the_audit_log(leak: LeakChecker) -> None:
    phone = leak.secrets.fill("<<phone:3>>")
    sql = f"select id, phone from customers where /* /* */ \" */ phone = '{phone}' /* \" */"
    with leak.connect() as teller:
        rows = teller.execute(sql).fetchall()
    assert rows and rows[0][0] == 3 and rows[0][1] != phone  # found by lookup, shown masked
    deadline = time.monotonic() + 5
    while True:
        records = [json.loads(line) for line in
                   leak.pgveil.audit_path.read_text(encoding="utf-8").splitlines()]
        mine = [r for r in records if "/* */" in (r.get("statement") or "")
                and "phone = ?" in (r.get("statement") or "")]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mine, "the lookup's audit record was not written"
    assert all(phone not in json.dumps(r, ensure_ascii=False) for r in mine)


# ------------------------------------------------ debug output of the rewritten statements
# With client_min_messages = log, debug_print_plan sends the plan tree of every statement to
# the client: the rewritten statement's masks and filters, and a hash mask's key material.


@pytest.mark.parametrize("sql", [
    "set debug_print_plan = on",
    "SET SESSION debug_print_rewritten TO true",
    "set local debug_print_parse = 1",
    "select set_config('debug_print_plan', 'on', false)",
    "select set_config(' Debug_Print_Plan ', 'on', false)",
])
def test_debug_printing_is_refused_to_masked_roles(leak: LeakChecker, sql: str) -> None:
    with leak.connect() as teller:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            with teller.transaction():
                teller.execute(sql)
        assert "internals" in str(info.value)
        assert teller.execute("show debug_print_plan").fetchone() == ("off",)
        teller.execute("reset debug_print_plan")  # back to the default: allowed


@pytest.mark.parametrize("settings", [{"debug_print_plan": "on"}, {"Role": "dba"},
                                      {"options": "-c debug_print_rewritten=on"}])
async def test_startup_settings_that_escape_the_policy_are_refused(leak: LeakChecker,
                                                                   settings: dict[str, str]
                                                                   ) -> None:
    import asyncpg

    options = settings.get("options")
    server_settings = {k: v for k, v in settings.items() if k != "options"}
    if options:
        server_settings["options"] = options
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
        await asyncpg.connect(leak.pgveil.dsn("teller_sz01"), server_settings=server_settings)
    assert "escaping the policy for role teller" in str(info.value)
    conn = await asyncpg.connect(leak.pgveil.dsn("dba"), server_settings={"debug_print_plan": "on"})
    try:
        assert await conn.fetchval("show debug_print_plan") == "on"
    finally:
        await conn.close()


# ------------------------------------------------ catalog changes that count no relation
def test_an_operator_created_later_is_noticed_within_seconds(leak: LeakChecker) -> None:
    """CREATE OPERATOR over a function pgveil already knows changes no relation, function or
    rule: the catalog fingerprint counts operators (and casts, policies, partitions, domain
    defaults and dependencies), so the operator is denied within seconds, not at the next
    full refresh (catalog_refresh_seconds, 300 s)."""
    setup = ["CREATE FUNCTION public.h5_imm(int) RETURNS text LANGUAGE sql IMMUTABLE "
             "AS $$ SELECT phone FROM public.customers WHERE id = $1 $$"]
    teardown = ("DROP OPERATOR IF EXISTS public.### (NONE, int); "
                "DROP FUNCTION IF EXISTS public.h5_imm(int)")
    with dba_objects(leak, setup, teardown, "select public.h5_imm(1)"):
        with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
            dba.execute("CREATE OPERATOR public.### (RIGHTARG = int, FUNCTION = public.h5_imm)")
        deadline = time.monotonic() + 10
        with leak.connect() as teller:
            while True:
                try:
                    got = teller.execute("select ### 1").fetchall()
                except psycopg.errors.InsufficientPrivilege:
                    break
                assert time.monotonic() < deadline, f"the new operator was allowed: {got}"
                time.sleep(0.3)
