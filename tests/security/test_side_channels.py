"""Bypass attempts through channels other than the result rows.

Categories: catalog statistics (pg_stats, pg_stats_ext after dba's ANALYZE and CREATE STATISTICS),
SQL functions that take SQL or a table name as a string (query_to_xml, table_to_xml,
database_to_xml, ts_stat, …), errors that echo values (failed casts), existence oracles
(division by zero, sleeping, EXPLAIN ANALYZE row counts), ParameterStatus and NOTIFY side
channels, escaping the policy (SET ROLE, SET SESSION AUTHORIZATION, set_config('role'), startup
``options``), DO blocks, EXPLAIN, and multi-statement simple queries mixing allowed and
protected statements.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from tests.security.conftest import (
    LeakChecker,
    Received,
    expect_error,
    expect_faster_than,
    expect_not_sqlstate,
    expect_rows,
)


def case(case_id: str, sql: Any, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


NO_DIV0 = expect_not_sqlstate("22012", "division by zero reveals an out-of-scope row")
FOLLOW_UP = "select phone, id_number, current_user from customers where id = 3"

STATISTICS = [
    case("pg_stats-phone", "select histogram_bounds::text from pg_stats "
         "where tablename = 'customers' and attname = 'phone'"),
    case("pg_stats-many-columns", "select most_common_vals::text, histogram_bounds::text "
         "from pg_catalog.pg_stats where attname in ('id_number', 'email', 'name', "
         "'birthday', 'address')"),
    case("pg_stats-accounts", "select * from pg_stats where tablename = 'accounts'"),
    case("pg_stats_ext", "select most_common_vals::text from pg_stats_ext "
         "where statistics_name = 'sec_stx'"),
    case("pg_stats_ext-all", "select * from pg_stats_ext"),
    case("pg_stats_ext_exprs", "select * from pg_stats_ext_exprs"),
    case("pg_statistic", "select stavalues1::text from pg_statistic"),
    case("pg_statistic_ext_data", "select stxdmcv::text from pg_statistic_ext_data"),
    case("pg_stats-quoted-in-cte", "with s as (select * from \"pg_stats\") "
         "select histogram_bounds::text from s where attname = 'phone'"),
    case("pg_stats-upper-case-scalar", "select (select histogram_bounds::text from "
         "PG_CATALOG.PG_STATS where attname = 'phone' limit 1)"),
    case("pg_stats-union", "select histogram_bounds::text from pg_stats s "
         "where s.attname = 'phone' union all select '1'"),
    case("pg_stats-qualified-column", "select pg_catalog.pg_stats.histogram_bounds::text "
         "from pg_catalog.pg_stats where attname = 'id_number'"),
    case("pg_stats-through-dynamic-sql", "select * from sec_f_dyn('select histogram_bounds"
         "::text from pg_stats where attname = ''phone''')"),
    case("pg_stats-in-string-function", "select query_to_xml('select histogram_bounds "
         "from pg_stats where attname = ''phone''', true, true, '')"),
]

STRING_SQL = [
    case("query_to_xml", "select query_to_xml('select phone, id_number from customers "
         "where id = 3', true, true, '')"),
    case("query_to_xml-concat", "select query_to_xml('select phone from cust' || "
         "'omers where id = 3', true, true, '')"),
    case("table_to_xml", "select table_to_xml('customers', true, true, '')"),
    case("table_to_xml-concat", "select table_to_xml('cust' || 'omers', true, true, '')"),
    case("table_to_xml-oid", "select table_to_xml((select oid from pg_class "
         "where relname = 'accounts'), true, true, '')"),
    case("table_to_xml-values", "select table_to_xml(t::regclass, true, true, '') "
         "from (values ('customers')) v(t)"),
    case("query_to_xml_and_xmlschema", "select query_to_xml_and_xmlschema('select phone "
         "from customers where id = 3', true, true, '')"),
    case("schema_to_xml", "select schema_to_xml('public', true, true, '')"),
    case("database_to_xml", "select database_to_xml(true, true, '')"),
    case("ts_stat", "select * from ts_stat('select to_tsvector(''simple'', phone) "
         "from customers where id = 3')"),
    case("xpath-over-query_to_xml", "select xpath('//phone/text()', query_to_xml('select "
         "phone from customers where id = 3', true, true, ''))::text"),
    case("quoted-function-name", "select \"query_to_xml\"('select phone from customers "
         "where id = 3', true, true, '')"),
    case("qualified-upper-function", "select pg_catalog.QUERY_TO_XML('select phone from "
         "customers where id = 3', true, true, '')"),
    case("hex-encoded-sql", "select query_to_xml(convert_from(decode("
         "'73656c6563742070686f6e652066726f6d20637573746f6d657273207768657265206964203d2033',"
         " 'hex'), 'UTF8'), true, true, '')"),
    case("xmltable-over-query", "select * from xmltable('//row' passing query_to_xml('select "
         "id_number from customers where id = 3', true, true, '') columns p text "
         "path 'id_number')"),
]

ERROR_ECHO = [
    case("phone-to-int", "select phone::int from customers where id = 3"),
    case("id_number-to-int", "select id_number::numeric::int from customers where id = 3"),
    case("email-to-inet", "select cast(email as inet) from customers where id = 3"),
    case("name-to-int", "select name::int from customers where id = 3"),
    case("address-to-date", "select to_date(address, 'YYYY') from customers where id = 3"),
    case("phone-to-json", "select phone::json from customers where id = 3"),
    case("card-to-int", "select card_no::int from accounts where customer_id = 3"),
    case("phone-to-date", "select (phone || 'x')::date from customers where id = 3"),
    case("out-of-scope-cast", "select phone::int from customers where id = 1"),
    case("div0-select-list", "select 1/(case when id = 1 then 0 else 1 end) from customers "
         "where id in (1, 3)", expect=NO_DIV0),
    case("div0-where", "select count(*) from customers where 1/(id - 1) > -5", expect=NO_DIV0),
    case("div0-case-bj01", "select count(*) from customers "
         "where 1/(case when id = 2 then 0 else 1 end) = 1", expect=NO_DIV0),
    case("div0-accounts", "select count(*) from accounts where 1/(customer_id - 1) > -5",
         expect=NO_DIV0),
    case("div0-orders", "select count(*) from orders where 1/(customer_id - 1) > -5",
         expect=NO_DIV0),
    case("div0-with-index-cond", "select count(*) from customers where id = 1 "
         "and 1/(id - 1) = 1", expect=NO_DIV0),
    case("div0-after-lookup", "select count(*) from customers where phone = '<<phone:1>>' "
         "and 1/(id - 1) > 0", expect=NO_DIV0),
    case("cast-error-on-out-of-scope", "select count(*) from customers "
         "where (case when id = 1 then 'x' else '1' end)::int = 1",
         expect=expect_not_sqlstate("22P02", "a cast error reveals an out-of-scope row")),
    case("div0-join", "select count(*) from customers c join orders o on o.customer_id = c.id "
         "where 1/(o.customer_id - 1) > -5", expect=NO_DIV0),
    case("sleep-oracle", "select count(*) from customers where case when id = 1 "
         "then pg_sleep(0.6) is not null else true end",
         expect=expect_faster_than(0.5, "pg_sleep ran on an out-of-scope row")),
]

SESSION = [
    case("notify-masked-value", "select pg_notify('sec_ch', phone || '/' || id_number) "
         "from customers where id = 3", listen="sec_ch"),
    case("notify-out-of-scope", "select pg_notify('sec_ch', phone) from customers "
         "where id = 1", listen="sec_ch"),
    case("application_name-parameter-status", "select set_config('application_name', phone, "
         "false) from customers where id = 3"),
    case("application_name-then-show", ["select set_config('application_name', (select "
                                        "id_number from customers where id = 3), false)",
                                        "show application_name"]),
    case("custom-guc", "select set_config('sec.x', phone, false), current_setting('sec.x') "
         "from customers where id = 3"),
    case("set-role-dba", ["set role dba", FOLLOW_UP]),
    case("set-role-quoted", ['set role "dba"', FOLLOW_UP]),
    case("set-session-authorization", ["set session authorization dba", FOLLOW_UP]),
    case("set-config-role", ["select set_config('role', 'dba', false)", FOLLOW_UP]),
    case("set-config-session-authorization",
         ["select set_config('session_authorization', 'dba', false)", FOLLOW_UP]),
    case("set-local-role-in-tx", ["set local role dba", FOLLOW_UP], tx=True),
    case("reset-role", ["reset role", "set role none", FOLLOW_UP]),
    case("alter-role-set-role", ["alter role current_user set role = 'dba'", FOLLOW_UP],
         tx=True),
    case("startup-option-role", [FOLLOW_UP], connect={"options": "-c role=dba"}),
    case("startup-option-session-authorization", [FOLLOW_UP],
         connect={"options": "-c session_authorization=dba"}),
    case("startup-option-search-path", [FOLLOW_UP.replace("customers", "public.customers")],
         connect={"options": "-c search_path=pg_temp,public"}),
    case("do-block-notice", "do $$ begin raise notice '%', (select phone from customers "
         "where id = 3); end $$"),
    case("do-block-set-config", "do language plpgsql $$ begin perform set_config("
         "'application_name', (select id_number from customers where id = 3), false); end $$"),
    case("do-block-dynamic", "do $$ begin raise notice '%', (select string_agg(x, ',') from "
         "sec_f_dyn('select phone from customers where id = 3') x); end $$"),
    case("explain-analyze-verbose", "explain (analyze, verbose) select phone, id_number "
         "from customers where id = 3"),
    case("explain-verbose", "explain (verbose, costs off) select * from customers "
         "where id = 3"),
    case("explain-json-analyze", "explain (format json, analyze) select * from customers "
         "where phone like '1860%'"),
    case("explain-analyze-dml", "explain analyze update customers set level = level "
         "where id = 3 returning phone", tx=True),
    case("multi-allowed-then-protected", "select 1; select phone, id_number from customers "
         "where id = 3"),
    case("multi-two-protected", "select phone from customers where id = 3; "
         "select row_to_json(c) from customers c where id = 3"),
    case("multi-in-transaction", "begin; select phone from customers where id = 3; commit"),
    case("multi-set-then-read", "set search_path = public; select phone from customers "
         "where id = 3"),
    case("multi-denied-second", "select 1; select phone from customers"),
    case("multi-set-role-then-read", "set role dba; select phone from customers where id = 3"),
    case("multi-scs-off-then-backslash", "set standard_conforming_strings = off; "
         "select 'x\\'' , (select phone from customers where id = 3) as p -- '"),
]

OTHER_ROLES = [
    case("manager-out-of-scope", "select phone, id_number, name from customers where id = 1",
         login="manager_sz01"),
    case("manager-card-masked", "select card_no, balance from accounts where customer_id = 3",
         login="manager_sz01"),
    case("manager-whole-row-accounts", "select row_to_json(a) from accounts a "
         "where customer_id in (1, 3)", login="manager_sz01"),
    case("manager-query_to_xml", "select query_to_xml('select card_no from accounts "
         "where customer_id = 3', true, true, '')", login="manager_sz01"),
    case("manager-function-out-of-scope", "select sec_f_phone(1)", login="manager_sz01"),
    case("manager-update-out-of-scope", "update customers set level = null where id = 1",
         login="manager_sz01", tx=True),
    case("manager-pg_stats", "select histogram_bounds::text from pg_stats "
         "where attname = 'phone'", login="manager_sz01"),
    case("auditor-identity", "select phone, id_number, email, address, birthday "
         "from customers where id in (1, 2, 3)", login="auditor1"),
    case("auditor-balances", "select balance, card_no from accounts "
         "where customer_id in (1, 2, 3)", login="auditor1"),
    case("auditor-pg_stats", "select histogram_bounds::text from pg_stats "
         "where attname = 'phone'", login="auditor1"),
    case("auditor-whole-row", "select row_to_json(c) from customers c where id = 1",
         login="auditor1"),
    case("auditor-copy", "copy (select phone from customers where id = 1) to stdout",
         login="auditor1"),
    case("stranger-select", "select id, phone from customers where id = 3", login="stranger"),
    case("stranger-count", "select count(*) from customers", login="stranger",
         expect=expect_rows([(0,)])),
    case("stranger-view", "select * from sec_v_customers where id = 3", login="stranger"),
    case("stranger-query_to_xml", "select query_to_xml('select phone from customers "
         "where id = 3', true, true, '')", login="stranger"),
    case("teller-gz01-other-branch", "select id, phone from customers where id in (1, 3)",
         login="teller_gz01"),
]


@pytest.mark.parametrize(("sql", "opts"), STATISTICS)
def test_catalog_statistics(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), STRING_SQL)
def test_sql_in_strings(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), ERROR_ECHO)
def test_errors_and_oracles(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), SESSION)
def test_session_side_channels(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    received = leak.assert_no_leak(sql, **opts)
    users = [row[-1] for rs in received.results for row in rs.rows
             if rs.columns and rs.columns[-1] == "current_user"]
    assert all(u == "teller_sz01" for u in users), f"the session changed role: {users}"
    assert received.params.get("is_superuser", "off") == "off", received.params
    assert received.params.get("session_authorization", "teller_sz01") == "teller_sz01"


@pytest.mark.parametrize(("sql", "opts"), OTHER_ROLES)
def test_other_roles(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


# ------------------------------------------------------------------ paired existence oracles


def _normalise_plan(received: Received) -> list[str]:
    lines = [str(v) for row in received.rows for v in row]
    return [re.sub(r"\d+\.\d+", "N", line) for line in lines]


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("select count(*) from customers where 1/(id - {x}) > -5", id="where"),
        pytest.param("select count(*) from customers where id = {x} and 1/(id - {x}) = 1",
                     id="index-cond"),
        pytest.param("select count(*) from accounts where 1/(customer_id - {x}) > -5",
                     id="accounts"),
    ],
)
def test_division_by_zero_same_for_hidden_and_absent_ids(leak: LeakChecker,
                                                         template: str) -> None:
    hidden = leak.run(template.format(x=1))
    absent = leak.run(template.format(x=999999))
    leak.check(hidden, template)
    assert hidden.sqlstates == absent.sqlstates, (
        f"customer 1 (GZ01) is distinguishable from an absent id: {hidden.describe()} VS "
        f"{absent.describe()}"
    )


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("prepare sec_ex(int) as select id from customers where id = $1",
                     id="execute-prepared"),
        pytest.param(None, id="direct"),
    ],
)
def test_explain_analyze_does_not_reveal_out_of_scope_ids(leak: LeakChecker,
                                                          statement: str | None) -> None:
    """EXPLAIN ANALYZE prints 'Rows Removed by Filter: 1' when the hidden row exists."""

    def attempt(x: int) -> Received:
        if statement is None:
            sql = ("explain (analyze, costs off, timing off, summary off) "
                   f"select id from customers where id = {x}")
            return leak.run(sql)
        return leak.run([statement, "explain (analyze, costs off, timing off, summary off) "
                         f"execute sec_ex({x})"])

    hidden, absent = attempt(1), attempt(999999)
    leak.check(hidden, "explain execute customers")
    plan_hidden = [line.replace("= 1)", "= X)") for line in _normalise_plan(hidden)]
    plan_absent = [line.replace("= 999999)", "= X)") for line in _normalise_plan(absent)]
    assert plan_hidden == plan_absent, (
        f"EXPLAIN ANALYZE tells an out-of-scope id from an absent one:\n{plan_hidden}\n"
        f"VS\n{plan_absent}"
    )


def test_explain_analyze_does_not_count_other_branches(leak: LeakChecker) -> None:
    """'Rows Removed by Filter: 1334' would tell a SZ01 teller how many customers others have."""
    hidden = sum(1 for c in leak.secrets.customers.values() if c.branch != "SZ01")
    received = leak.run([
        "prepare sec_cnt as select count(*) from customers where id > 0",
        "explain (analyze, costs off, timing off, summary off) execute sec_cnt"])
    text = "\n".join(str(v) for row in received.rows for v in row)
    assert f"Rows Removed by Filter: {hidden}" not in text, text


def test_denied_statement_keeps_transaction_state_in_step(leak: LeakChecker) -> None:
    """After a denial inside BEGIN, the transaction is failed on both sides (SPEC §5), so a
    later statement of the same transaction cannot run on a state the client thinks is gone."""
    conn = leak.connect()
    try:
        conn.execute("begin")
        with pytest.raises(psycopg.Error) as denied:
            conn.execute("select phone from customers")
        assert denied.value.sqlstate == "42501"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.Error) as aborted:
            conn.execute("select 1")
        assert aborted.value.sqlstate == "25P02"
        conn.execute("rollback")
        assert conn.execute("select 1").fetchone() == (1,)
    finally:
        conn.close()


def test_do_blocks_are_denied(leak: LeakChecker) -> None:
    leak.assert_no_leak("do $$ begin perform 1; end $$", expect=expect_error)
