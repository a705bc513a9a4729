"""Bypass attempts that hide a protected table or column from a text rewriter.

Categories (SPEC §5 "mask at the source", NOTES-sqlglot "Attack paths"): aliases and qualified
names, search_path games, whole-row references, comments / quoting / unicode escapes, lexer
differentials (standard_conforming_strings, GBK/SJIS/BIG5 client encodings, dollar quotes inside
identifiers), and statements a parser may not follow (deep nesting, odd syntax). Each attempt runs
as teller_sz01 through the live pgveil; the oracle is in conftest.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.security.conftest import LeakChecker

P3 = "select phone, id_number, name, email, address, birthday from {t} where id = 3"


def case(case_id: str, sql: Any, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


NAMES = [
    case("qualified-public", P3.format(t="public.customers")),
    case("quoted", 'select "phone", "id_number" from "customers" where "id" = 3'),
    case("quoted-schema", 'select "phone" from "public"."customers" where id = 3'),
    case("upper-case", "SELECT PHONE, ID_NUMBER, NAME FROM PUBLIC.CUSTOMERS WHERE ID = 3"),
    case("alias", "select c.phone, c.id_number from customers as c where c.id = 3"),
    case("alias-column-list", "select x.p, x.q from customers x(i, n, p, q) where x.i = 3"),
    case("catalog-qualified", "select * from bank.public.customers where id = 3"),
    case("only", "select phone from only public.customers where id = 3"),
    case("inheritance-star", "select phone from customers * where id = 3"),
    case("spaces-around-dot", "select phone from public . customers where id = 3"),
    case("table-qualified-column", "select customers.phone from public.customers "
         "where customers.id = 3"),
    case("quoted-table-qualified-column",
         'select "customers"."phone" from customers where id = 3'),
    case("self-join-using", "select * from customers c join customers d using (id) "
         "where c.id = 3"),
    case("natural-join", "select * from customers natural join accounts where id = 3"),
    case("parenthesised-join", "select * from (customers c join accounts a "
         "on a.customer_id = c.id) where c.id = 3"),
    case("tablesample", "select phone from customers tablesample system (100) where id = 3"),
    case("for-update", "select phone, id_number from customers where id = 3 for update",
         tx=True),
    case("for-share-of-alias", "select c.phone from customers c where c.id = 3 for share of c",
         tx=True),
    case("out-of-scope-id", "select * from customers where id = 1"),
    case("out-of-scope-in-list", "select id, name from customers where id in (1, 2, 3, 4, 5)"),
    case("accounts-columns", "select card_no, balance from accounts where customer_id = 3"),
    case("accounts-out-of-scope", "select a.* from accounts a where a.customer_id in (1, 2, 3)"),
    case("orders-out-of-scope", "select o.customer_id, o.note from orders o "
         "where o.customer_id in (1, 2)"),
    case("two-aliases-one-out-of-scope", "select c1.phone, c2.phone from customers c1, "
         "customers c2 where c1.id = 3 and c2.id = 1"),
    case("search-path-empty", ["set search_path = ''", P3.format(t="public.customers")]),
    case("search-path-catalog-last", ["set search_path = public, pg_catalog",
                                      P3.format(t="customers")]),
    case("search-path-temp-first", ["set search_path = pg_temp, public",
                                    P3.format(t="customers")]),
    case("search-path-set-config", ["select set_config('search_path', 'public, pg_catalog', "
                                    "false)", P3.format(t="customers")]),
    case("temp-function-shadow", [
        "create function pg_temp.left(text, int) returns text language sql "
        "as 'select $1'", "set search_path = pg_temp, public, pg_catalog",
        P3.format(t="customers")]),
]

WHOLE_ROW = [
    case("row_to_json", "select row_to_json(c) from customers c where id = 3"),
    case("to_jsonb-star", "select to_jsonb(c.*) from customers c where id = 3"),
    case("row-cast-text", "select c::text from customers c where id = 3"),
    case("field-selection", "select (c).phone, (c).id_number from customers c where id = 3"),
    case("row-constructor", "select row(c.*)::text from customers c where id = 3"),
    case("array_agg-rows", "select array_agg(c)::text from customers c where id in (3, 6)"),
    case("json_agg", "select json_agg(c) from customers c where id in (3, 6)"),
    case("composite-column", "select c from customers c where id = 3"),
    case("scalar-subquery-row", "select (select c from customers c where id = 3)::text"),
    case("to_json-alias", "select to_json(c) from customers as c where c.id = 3"),
    case("derived-table-row", "select row_to_json(t) from (select * from customers "
         "where id = 3) t"),
    case("jsonb_agg-accounts", "select jsonb_agg(a) from accounts a where customer_id = 3"),
    case("json_populate_record", "select (json_populate_record(null::customers, "
         "row_to_json(c))).* from customers c where id = 3"),
    case("json_each_text", "select * from json_each_text((select row_to_json(c) "
         "from customers c where id = 3))"),
    case("xmlforest", "select xmlforest(c.phone, c.id_number, c.name) from customers c "
         "where id = 3"),
    case("record_out", "select textin(record_out(c)) from customers c where id = 3"),
    case("alias-star", "select c.* from customers c where c.id = 3"),
    case("lateral-row", "select row_to_json(x) from customers c, lateral (select c.*) x "
         "where c.id = 3"),
    case("table-name-as-row", "select to_jsonb(customers) from customers where id = 3"),
    case("table-name-as-column", "select customers from customers where id = 3"),
    case("table-name-field", "select (customers).phone from customers where id = 3"),
    case("hstore-free-text-agg", "select string_agg(c::text, ';') from customers c "
         "where id in (3, 6)"),
]

COMMENTS_QUOTING = [
    case("block-comments-everywhere",
         "select/**/phone/**/,id_number/**/from/**/customers/**/where/**/id=3"),
    case("line-comments", "select phone -- comment\n, id_number from customers -- x\n"
         "where id = 3"),
    case("line-comment-ended-by-cr",
         "select 1 as x --\r, (select phone from customers where id = 3) as p"),
    case("nested-block-comment",
         "/* outer /* nested */ still a comment */ select phone, id_number from customers "
         "where id = 3"),
    case("unicode-column", 'select U&"\\0070hone" from customers where id = 3'),
    case("unicode-table", 'select phone from U&"\\0063ustomers" where id = 3'),
    case("unicode-table-star", 'select * from U&"\\0063ustomers" where id = 3'),
    case("unicode-uescape", "select U&\"!0070hone\" UESCAPE '!' from customers where id = 3"),
    case("unicode-string-concat", "select U&'\\0031' || phone from customers where id = 3"),
    case("e-string-quote", "select E'\\'', phone from customers where id = 3"),
    case("dollar-quote-with-quote", "select $q$ ' $q$ as a, phone from customers where id = 3"),
    case("nested-dollar-tags", "select $a$ $b$ $a$ as x, phone from customers where id = 3"),
    case("dollar-in-identifiers",
         "select 1 as a$$, (select phone from customers where id = 3) as p, 2 as b$$"),
    case("dollar-identifier-then-quote",
         "select 1 as x$, (select id_number from customers where id = 3) as p -- $"),
    case("backslash-in-plain-string",
         "select 'x\\', (select phone from customers where id = 3) as p -- '"),
    case("e-string-escaped-backslash",
         "select E'x\\\\', (select phone from customers where id = 3) as p -- '"),
    case("e-string-escaped-quote",
         "select e'x\\'', (select phone from customers where id = 3) as p -- '"),
    case("doubled-quote-in-identifier",
         'select 1 as "x""", (select phone from customers where id = 3) as p -- "'),
    case("form-feed-whitespace", "select\fphone\ffrom\fcustomers\fwhere\fid=3"),
    case("double-semicolon", "select phone from customers where id = 3;;"),
    case("parenthesised-select", "((select phone, id_number from customers where id = 3))"),
    case("tagged-dollar-literal", "select $tag$x$tag$ as t, phone from customers where id = 3"),
]

GBK_ATTACK = b"select '\xbf\\' as a, (select phone from customers where id = 3) as p -- '"
GBK_E_ATTACK = b"select E'\xbf\\' as a, (select phone from customers where id = 3) as p -- '"
SCS_OFF_ATTACK = "select 'x\\'' , (select phone from customers where id = 3) as p -- '"

LEXER = [
    case("scs-off-then-backslash-quote",
         ["set standard_conforming_strings = off", SCS_OFF_ATTACK]),
    case("scs-off-same-message", "set standard_conforming_strings = off; " + SCS_OFF_ATTACK),
    case("scs-off-set-config",
         ["select set_config('standard_conforming_strings', 'off', false)", SCS_OFF_ATTACK]),
    case("scs-off-startup-option", [SCS_OFF_ATTACK],
         connect={"options": "-c standard_conforming_strings=off"}),
    case("gbk-scs-off", ["set client_encoding = 'GBK'",
                         "set standard_conforming_strings = off", GBK_ATTACK]),
    case("gbk-startup-scs-off", ["set standard_conforming_strings = off", GBK_ATTACK],
         connect={"client_encoding": "GBK"}),
    case("gbk-e-string", ["set client_encoding = 'GBK'", GBK_E_ATTACK]),
    case("gb18030-e-string", ["set client_encoding = 'GB18030'", GBK_E_ATTACK]),
    case("sjis-e-string", ["set client_encoding = 'SJIS'", GBK_E_ATTACK.replace(b"\xbf", b"\x95")]),
    case("big5-e-string", ["set client_encoding = 'BIG5'", GBK_E_ATTACK.replace(b"\xbf", b"\xa4")]),
    case("gbk-set-config", ["select set_config('client_encoding', 'GBK', false)",
                            GBK_E_ATTACK]),
]

PARSER = [
    case("200-parentheses",
         "select " + "(" * 200 + "phone" + ")" * 200 + " from customers where id = 3"),
    case("200-parentheses-in-from",
         "select * from " + "(" * 200 + "select * from customers" + ")" * 200
         + " x where id = 3"),
    case("3000-parentheses",
         "select " + "(" * 3000 + "phone" + ")" * 3000 + " from customers where id = 3"),
    case("100-nested-scalar-subqueries",
         "select " + "(select " * 100 + "phone from customers where id = 3" + ")" * 100),
    case("1000-nested-derived-tables",
         "select * from " + "(select * from " * 1000 + "customers" + ") x" * 1000
         + " where id = 3"),
    case("huge-in-list", "select id, phone from customers where id in ("
         + ", ".join(str(i) for i in range(1, 5001)) + ") limit 10"),
    case("xmlexists", "select phone from customers where id = 3 and "
         "xmlexists('//x' passing by value '<x/>')"),
    case("operator-syntax", "select phone from customers where id operator(pg_catalog.=) 3"),
    case("grouping-sets", "select phone from customers where id = 3 "
         "group by grouping sets ((phone), ())"),
    case("window-clause", "select phone, row_number() over w from customers where id = 3 "
         "window w as (order by id)"),
    case("fetch-first", "select phone, id_number from customers where id = 3 "
         "fetch first 1 rows only"),
    case("ctid", "select phone from customers c where c.id = 3 and c.ctid > '(0,0)'"),
    case("order-using", "select phone from customers where id = 3 order by 1 using ~<~"),
    case("rows-from", "select * from rows from (generate_series(1, 1)) g, customers c "
         "where c.id = 3"),
    case("is-normalized", "select phone from customers where id = 3 and 'a' is normalized"),
    case("table-in-subquery", "select x.phone from (table customers) x where x.id = 3"),
    case("collate", 'select phone collate "C" from customers where id = 3'),
    case("limit-all", "select * from customers where id = 3 limit all"),
    case("empty-select-subquery", "select (select phone from customers where id = 3 limit 1) "
         "as p from (select) s"),
    case("substring-similar", "select substring(phone similar '%#\"1%#\"%' escape '#') "
         "from customers where id = 3"),
    case("table-statement", "TABLE customers"),
    case("values-subquery", "values ((select phone from customers where id = 3))"),
    case("array-subquery", "select array(select phone from customers where id in (3, 6))"),
]


@pytest.mark.parametrize(("sql", "opts"), NAMES)
def test_names(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), WHOLE_ROW)
def test_whole_row(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), COMMENTS_QUOTING)
def test_comments_quoting(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), LEXER)
def test_lexer_differential(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)


@pytest.mark.parametrize(("sql", "opts"), PARSER)
def test_parser_limits(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)
