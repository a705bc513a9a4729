"""Bypass attempts through less common SQL shapes, hunt three.

Composite field selection through ``customers.*``, inheritance stars, grouping sets and windows,
JSON/XML/row-to-text conversions, materialized and SEARCH CTEs, VALUES in FROM, session
settings carrying a value, lookups placed where they must not be evaluated raw (a UNION branch,
a scalar subquery, a CTE, a row comparison, ``= ANY(array)``, a COLLATE, a JOIN condition, SQL
PREPARE), what the session catalog views show (pg_prepared_statements, pg_cursors), EXPLAIN
VERBOSE in JSON, and DML that copies through FROM/USING into the unprotected ``sec_sink``.
Each asserts against the real database that no raw protected value and no out-of-scope row
reaches the teller.
"""
from __future__ import annotations

from typing import Any

import pytest

from tests.security.conftest import LeakChecker


def case(case_id: str, sql: Any, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


PROBES = [
    case("composite-star-field", "select (customers.*).id_number from customers where id = 3"),
    case("only-star", "select phone from public.customers * where id = 3"),
    case("rollup", "select phone, count(*) from customers where id in (3, 6) group by rollup(phone)"),
    case("grouping-sets", "select phone, id_number from customers where id = 3 "
         "group by grouping sets ((phone), (id_number))"),
    case("window-first-value", "select first_value(phone) over (order by id) from customers "
         "where id in (3, 6)"),
    case("rows-from-jsonb", "select * from rows from (jsonb_to_record((select to_jsonb(c) from "
         "customers c where id = 3)) as x(phone text, id_number text))"),
    case("xmlelement", "select xmlelement(name x, (select id_number from customers where id = 3))"),
    case("distinct-on", "select distinct on (phone) phone, id_number from customers where id = 3"),
    case("order-using", "select phone from customers where id in (3, 6) order by phone using <"),
    case("natural-join", "select * from customers natural join (select 3 as id) x"),
    case("lateral-ref", "select x.p from customers join lateral (select phone as p, "
         "id_number as q) x on true where id = 3"),
    case("set-config-carry", ["select set_config('sec.x', (select phone from customers where "
                              "id = 3), false)", "show sec.x"]),
    case("array-subquery", "select array(select id_number from customers where id in (3, 6))"),
    case("json-agg-row", "select json_agg(c) from customers c where id in (3, 6)"),
    case("row-as-text", "select c::text from customers c where id = 3"),
    case("cte-materialized", "with m as materialized (select * from customers where id = 3) "
         "select phone from m"),
    case("cte-search-depth", "with recursive r as (select id, phone from customers where id = 3 "
         "union all select r.id + 1, r.phone from r where r.id < 4) search depth first by id "
         "set o select * from r"),
    case("values-in-from", "select * from (values ((select phone from customers "
         "where id = 3))) v(p)"),
    case("lookup-out-of-scope-in-union", "select id, phone from customers where id = 3 union all "
         "select id, phone from customers where id_number = '<<id_number:1>>'"),
    case("lookup-out-of-scope-in-subquery", "select (select phone from customers where "
         "id_number = '<<id_number:1>>')"),
    case("lookup-in-cte", "with x as (select * from customers where id_number = "
         "'<<id_number:1>>') select * from x"),
    case("lookup-row-compare", "select * from customers where (id_number, id) = "
         "('<<id_number:1>>', 1)"),
    case("lookup-any-array", "select * from customers where id_number = any(array["
         "'<<id_number:1>>', '<<id_number:3>>'])"),
    case("lookup-collate", "select * from customers where id_number = '<<id_number:1>>' "
         "collate \"C\""),
    case("lookup-on-join", "select c.* from customers c join orders o on o.customer_id = c.id "
         "and c.id_number = '<<id_number:1>>'"),
    case("prepare-sql-lookup", ["prepare sp(text) as select * from customers where "
                                "id_number = $1", "execute sp('<<id_number:1>>')"]),
    case("explain-json-verbose", "explain (format json, verbose) select * from customers "
         "where id = 3"),
    case("pg-prepared-statements", ["prepare sp2 as select * from customers where id = 3",
                                    "select statement from pg_prepared_statements"]),
    case("pg-cursors", ["begin", "declare cc cursor for select * from customers where id = 3",
                        "select statement from pg_cursors", "commit"]),
    case("string-to-array-row", "select string_to_array(c::text, ',') from customers c "
         "where id = 3"),
    case("format-row", "select format('%s', c) from customers c where id = 3"),
    case("pg-column-size-inference", "select id, octet_length(phone), octet_length(id_number) "
         "from customers where id = 3"),
    case("table-function-unnest", "select * from unnest((select array_agg(phone) from "
         "customers where id in (3, 6)))"),
    case("insert-select-returning", "insert into sec_sink (t) select id_number from customers "
         "where id = 3 returning t", tx=True),
    case("update-sink-from-customers", "update sec_sink s set t = c.phone from customers c "
         "where c.id = 3 returning s.t", tx=True),
    case("delete-using-returning", "delete from sec_sink s using customers c where c.id = 3 "
         "returning c.phone", tx=True),
    case("mixed-case-unicode", 'select "PHONE" from customers where id = 3'),
    case("schema-quoted-upper", 'select phone from "PUBLIC".customers where id = 3'),
]


@pytest.mark.parametrize(("sql", "opts"), PROBES)
def test_less_common_shapes(leak: LeakChecker, sql: Any, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, **opts)
