"""The same attacks through other real clients and protocol paths.

Why: pgveil sees different wire traffic for the same SQL — psycopg's simple Query, client-side
binding, unnamed and named Parse/Bind/Execute with binary results, single-row streaming and
pipelines; asyncpg's named prepared statements, binary codecs and portals read a few rows at a
time; psql's client-side statement splitting, ``\\;`` multi-statement queries, ``\\copy`` and
``FETCH_COUNT`` cursors. SPEC §5: all of them get the same enforcement.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.security.conftest import LeakChecker, Protocol, expect_at_most_rows, expect_rows

CORE = [
    pytest.param("select phone, id_number, name, email, address, birthday from customers "
                 "where id = 3", id="columns"),
    pytest.param("select row_to_json(c) from customers c where id = 3", id="row_to_json"),
    pytest.param("select c::text from customers c where id = 3", id="row-text"),
    pytest.param("select * from customers where id = 1", id="out-of-scope"),
    pytest.param("select card_no, balance from accounts where customer_id = 3", id="accounts"),
    pytest.param("with x as (select * from customers where id = 3) select to_jsonb(x) from x",
                 id="cte-jsonb"),
    pytest.param("select query_to_xml('select phone from customers where id = 3', true, true, "
                 "'')", id="query_to_xml"),
    pytest.param("select phone::int from customers where id = 3", id="cast-error"),
    pytest.param("select * from sec_f_dyn('select phone from customers where id = 3')",
                 id="dynamic-sql-function"),
]


@pytest.mark.parametrize(
    "protocol",
    [Protocol.CLIENT, Protocol.EXTENDED, Protocol.PREPARED, Protocol.STREAM, Protocol.PIPELINE],
    ids=lambda p: p.value,
)
@pytest.mark.parametrize("sql", CORE)
def test_psycopg_protocols(leak: LeakChecker, sql: str, protocol: Protocol) -> None:
    leak.assert_no_leak(sql, protocol=protocol)


# ------------------------------------------------------------------ asyncpg


@pytest.mark.parametrize(
    ("sql", "args", "mode", "opts"),
    [
        pytest.param("select phone, id_number from customers where id = $1", (3,), "fetch", {},
                     id="fetch-params"),
        pytest.param("select * from customers where id = $1", (1,), "fetch", {},
                     id="fetch-out-of-scope"),
        pytest.param("select row_to_json(c)::text from customers c where id = $1", (3,),
                     "prepare", {}, id="prepare-whole-row"),
        pytest.param("select c from customers c where id = $1", (3,), "fetch", {},
                     id="binary-composite"),
        pytest.param("select card_no, balance from accounts where customer_id = $1", (3,),
                     "fetch", {}, id="binary-numeric"),
        pytest.param("select id, phone from customers where branch_id = $1", ("SZ01",),
                     "cursor", {"expect": expect_at_most_rows(50)}, id="portal-cursor-cap"),
        pytest.param("select query_to_xml($1, true, true, '')",
                     ("select phone from customers where id = 3",), "fetch", {},
                     id="sql-in-parameter"),
        pytest.param("select set_config('application_name', (select phone from customers "
                     "where id = 3), false)", (), "execute", {}, id="simple-parameter-status"),
        pytest.param("select count(*) from customers where phone = $1", ("<<phone:1>>",),
                     "fetch", {"expect": expect_rows([(0,)])}, id="lookup-other-branch"),
        pytest.param("select * from sec_f_dyn($1)",
                     ("select phone from customers where id = 3",), "fetch", {},
                     id="dynamic-sql-parameter"),
        pytest.param("select count(*) from customers where phone = any($1::text[])",
                     (["<<phone:3>>"],), "fetch", {"expect": expect_rows([(0,)])},
                     id="any-array-parameter"),
        pytest.param("select phone from customers where id = $1 and $2", (3, True), "prepare",
                     {}, id="boolean-parameter"),
        pytest.param("select $1::text, phone from customers where id = 3", ("x",), "fetch", {},
                     id="untyped-literal-param"),
    ],
)
async def test_asyncpg(leak: LeakChecker, sql: str, args: tuple[Any, ...], mode: str,
                       opts: dict[str, Any]) -> None:
    filled = tuple(
        [leak.secrets.fill(x) for x in a] if isinstance(a, list)
        else leak.secrets.fill(a) if isinstance(a, str) else a
        for a in args
    )
    await leak.assert_no_leak_asyncpg(sql, *filled, mode=mode, **opts)


# ------------------------------------------------------------------ psql


@pytest.mark.parametrize(
    "script",
    [
        pytest.param("select phone, id_number from customers where id = 3;", id="plain"),
        pytest.param("\\copy (select phone from customers where id = 3) to stdout",
                     id="backslash-copy"),
        pytest.param("select 1 \\; select phone from customers where id = 3 \\; select 2;",
                     id="multi-statement"),
        pytest.param("select 'select id_number from customers where id = 3' \\gexec",
                     id="gexec"),
        pytest.param("\\set FETCH_COUNT 10\nselect id, phone from customers "
                     "where branch_id = 'SZ01';", id="fetch-count-cursor"),
        pytest.param("select 1 \\; copy (select phone from customers where id = 3) to stdout;",
                     id="multi-statement-copy"),
        pytest.param("\\d+ customers\nselect phone from customers where id = 3;",
                     id="describe-then-read"),
        pytest.param("set standard_conforming_strings = off;\n"
                     "select 'x\\'' , (select phone from customers where id = 3) as p -- ';",
                     id="scs-off"),
    ],
)
def test_psql(leak: LeakChecker, script: str) -> None:
    received = leak.assert_no_leak_psql(script)
    data_lines = [line for line in received.raw_output[0].splitlines()
                  if line.split("|")[0].isdigit()]
    assert len(data_lines) <= 50, f"psql printed {len(data_lines)} rows"
