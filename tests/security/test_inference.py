"""Inference attempts: compute over masked columns, or filter / sort / group by them.

SPEC §5: expressions, WHERE, ORDER BY, GROUP BY and window functions "only ever see masked values
of visible rows"; the exact-match ``lookup`` (top-level ``col = literal`` / ``col IN (literals)``
conjuncts on customers.phone and id_number) is the only exception. Every attempt here is a single
statement whose answer, if pgveil is right, equals the answer PostgreSQL gives over the oracle's
masked + filtered views (``masked_equiv=True``, see conftest.py); a raw answer is a leak even when
no secret string appears in it (a count, a rank, a length, an md5).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.security.conftest import LeakChecker, Protocol, expect_error, expect_rows

IDS = "where id in (3, 6, 9)"


def case(case_id: str, sql: str, **opts: Any) -> Any:
    return pytest.param(sql, opts, id=case_id)


FUNCTIONS = [
    case("lower-name", f"select id, lower(name) from customers {IDS}"),
    case("substr-phone", f"select id, substr(phone, 4, 4) from customers {IDS}"),
    case("reverse-phone", f"select id, reverse(phone) from customers {IDS}"),
    case("md5-id_number", f"select id, md5(id_number) from customers {IDS}"),
    case("lengths", f"select id, length(address), octet_length(name) from customers {IDS}"),
    case("ascii-digit", f"select id, ascii(substr(phone, 5, 1)) from customers {IDS}"),
    case("regexp_replace", f"select id, regexp_replace(phone, '(\\d)', '\\1-', 'g') "
         f"from customers {IDS}"),
    case("split_part-email", f"select id, split_part(email, '@', 1) from customers {IDS}"),
    case("format", f"select id, format('%s|%s', phone, id_number) from customers {IDS}"),
    case("concat", f"select id, concat(name, phone, email) from customers {IDS}"),
    case("to_number", f"select id, to_number(phone, '99999999999') from customers {IDS}"),
    case("xmlelement", f"select id, xmlelement(name p, phone)::text from customers {IDS}"),
    case("birthday-parts", f"select id, extract(doy from birthday), to_char(birthday, 'MMDD') "
         f"from customers {IDS}"),
    case("translate", f"select id, translate(phone, '0123456789', 'abcdefghij') "
         f"from customers {IDS}"),
    case("base64", f"select id, encode(convert_to(id_number, 'UTF8'), 'base64') "
         f"from customers {IDS}"),
    case("hashtext", f"select id, hashtext(phone) from customers {IDS}"),
    case("position", f"select id, position('0' in phone), strpos(id_number, '19') "
         f"from customers {IDS}"),
    case("overlay", f"select id, overlay(phone placing '' from 1 for 3) from customers {IDS}"),
    case("birth-date-from-id", f"select id, right(left(id_number, 14), 8) from customers {IDS}"),
    case("card-arithmetic", "select id, right(card_no, 8) from accounts "
         "where customer_id in (3, 6, 9)"),
    case("balance-coalesce", "select id, coalesce(balance, -1), balance * 2 from accounts "
         "where customer_id in (3, 6, 9)"),
    case("cast-bigint", "select id, phone::bigint from customers where id = 3"),
    case("starts_with", f"select id, starts_with(phone, '1860') from customers {IDS}"),
    case("age", f"select id, age(date '2024-01-01', birthday) from customers {IDS}"),
    case("split-to-table", f"select id, (select string_agg(x, '') from "
         f"regexp_split_to_table(phone, '') x) from customers {IDS}"),
    case("string_to_array", f"select id, array_to_string(string_to_array(id_number, NULL), ',') "
         f"from customers {IDS}"),
    case("upper-initcap-email", f"select id, upper(email), initcap(email) from customers {IDS}"),
    case("case-in-select", f"select id, case when phone like '1860%' then 1 else 0 end "
         f"from customers {IDS}"),
]

PREDICATES = [
    case("like-prefix", "select count(*) from customers where phone like '1860%'"),
    case("range-gt", "select count(*) from customers where phone > '1860'"),
    case("order-by-masked", "select id from customers where branch_id = 'SZ01' "
         "order by phone desc, id limit 10"),
    case("group-by-prefix", "select substr(phone, 1, 4) p, count(*) from customers "
         "where id > 0 group by 1"),
    case("group-having-birth-year", "select count(*) from customers where id > 0 "
         "group by substr(id_number, 7, 4) having count(*) > 5"),
    case("min-max", "select min(phone), max(id_number) from customers where id > 0"),
    case("string_agg", f"select string_agg(phone, ',' order by id) from customers {IDS}"),
    case("percentile_disc", "select percentile_disc(0.5) within group (order by phone) "
         "from customers where id > 0"),
    case("count-distinct", "select count(distinct phone), count(distinct id_number), "
         "count(distinct birthday) from customers where id > 0"),
    case("window-rank", "select id, rank() over (order by substr(phone, 4, 4)) from customers "
         "where id in (3, 6, 9, 12, 15)"),
    case("window-lag", f"select id, lag(right(phone, 8)) over (order by id) from customers {IDS}"),
    case("order-by-id_number", "select id from customers where id in (3, 6, 9, 12, 15, 18, 21) "
         "order by id_number desc, id limit 3"),
    case("like-birth-in-id", "select count(*) from customers where id_number like '%1983122%'"),
    case("birthday-between", "select count(*) from customers "
         "where birthday between '1983-12-01' and '1983-12-31'"),
    case("birthday-month", "select count(*) from customers where extract(month from birthday) "
         "= 12"),
    case("email-or", "select count(*) from customers where email = 'user3@example.com' "
         "or id < 0"),
    case("name-like", "select count(*) from customers where name like '%超'"),
    case("address-like", "select count(*) from customers where address like '%深南大道%'"),
    case("distinct-prefix", f"select distinct left(id_number, 10) from customers {IDS}"),
    case("exists-correlated", "select count(*) from customers c where exists (select 1 from "
         "customers c2 where c2.id = c.id and c2.phone like '1860%')"),
    case("in-subquery-masked", "select count(*) from customers where id in "
         "(select id from customers where phone like '1860%')"),
    case("balance-aggregates", "select sum(balance), avg(balance), max(balance) from accounts "
         "where customer_id > 0"),
    case("balance-range", "select count(*) from accounts where balance > 40000"),
    case("card-like", "select count(*) from accounts where card_no like '6222%'"),
    case("regex-match", "select count(*) from customers where phone ~ '^1860'"),
    case("similar-to", "select count(*) from customers where phone similar to '1860%'"),
    case("ilike", "select count(*) from customers where phone ilike '18600%'"),
    case("bool_or", "select bool_or(phone like '18600%') from customers where id > 0"),
    case("case-in-where", "select count(*) from customers "
         "where case when phone like '1860%' then true else false end"),
    case("join-on-masked", "select count(*) from customers c join accounts a "
         "on a.customer_id = c.id where a.card_no like '6222%'"),
    case("having-masked", "select count(*) from customers where id > 0 group by branch_id "
         "having max(phone) > '1890'"),
]

LOOKUP_MISUSE = [
    case("eq-or-false", "select count(*) from customers where phone = '<<phone:3>>' or id < 0"),
    case("not-ne", "select count(*) from customers where not (phone <> '<<phone:3>>')"),
    case("in-subselect", "select count(*) from customers where phone in (select '<<phone:3>>')"),
    case("any-array", "select count(*) from customers where phone = any(array['<<phone:3>>'])"),
    case("any-array-literal", "select count(*) from customers "
         "where phone = any('{<<phone:3>>}')"),
    case("like-exact", "select count(*) from customers where phone like '<<phone:3>>'"),
    case("like-one-wildcard", "select count(*) from customers where phone like '1860031418_'"),
    case("range-pinch", "select count(*) from customers where phone >= '<<phone:3>>' "
         "and phone <= '<<phone:3>>'"),
    case("between-id_number", "select count(*) from customers "
         "where id_number between '3301061983' and '3301061984'"),
    case("row-comparison", "select count(*) from customers where (phone, id) = "
         "('<<phone:3>>', 3)"),
    case("eq-is-true", "select count(*) from customers where (phone = '<<phone:3>>') is true"),
    case("coalesce-eq", "select count(*) from customers "
         "where coalesce(phone = '<<phone:3>>', false)"),
    case("concat-eq", "select count(*) from customers where phone || '' = '<<phone:3>>'"),
    case("in-or-false", "select count(*) from customers where phone in ('<<phone:3>>', "
         "'<<phone:6>>') or false"),
    case("scalar-subquery-eq", "select count(*) from customers c "
         "where (select c.phone = '<<phone:3>>')"),
    case("join-values", "select count(*) from customers c join (values ('<<phone:3>>')) "
         "v(p) on c.phone = v.p"),
    case("case-eq", "select count(*) from customers "
         "where case when phone = '<<id_number:3>>' or phone = '<<phone:3>>' then true end"),
    case("not-equal", "select count(*) from customers where phone <> '<<phone:3>>'"),
    case("not-eq", "select count(*) from customers where not phone = '<<phone:3>>'"),
    case("not-in", "select count(*) from customers where phone not in ('<<phone:3>>')"),
    case("is-distinct-from", "select count(*) from customers "
         "where phone is distinct from '<<phone:3>>'"),
    case("card-not-a-lookup", "select count(*) from accounts where card_no = '<<card_no:3>>'"),
    case("email-not-a-lookup", "select count(*) from customers where email = '<<email:3>>'"),
    case("name-not-a-lookup", "select count(*) from customers where name = '<<name:3>>'"),
    case("birthday-not-a-lookup", "select count(*) from customers "
         "where birthday = '<<birthday:3>>'"),
]


@pytest.mark.parametrize(("sql", "opts"), FUNCTIONS)
def test_functions_over_masked_columns(leak: LeakChecker, sql: str, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, masked_equiv=True, **opts)


@pytest.mark.parametrize(("sql", "opts"), PREDICATES)
def test_inference_through_predicates(leak: LeakChecker, sql: str, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, masked_equiv=True, **opts)


@pytest.mark.parametrize(("sql", "opts"), LOOKUP_MISUSE)
def test_lookup_is_exact_match_only(leak: LeakChecker, sql: str, opts: dict[str, Any]) -> None:
    leak.assert_no_leak(sql, masked_equiv=True, **opts)


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        pytest.param("select count(*) from customers where phone like %s", ("1860%",),
                     id="like-param"),
        pytest.param("select count(*) from customers where phone = %s or %s",
                     ("<<phone:3>>", False), id="eq-or-param"),
        pytest.param("select count(*) from customers where phone > %s", ("1860",),
                     id="range-param"),
        pytest.param("select count(*) from customers where phone = any(%s)",
                     (["<<phone:3>>"],), id="any-array-param"),
    ],
)
@pytest.mark.parametrize("protocol", [Protocol.SIMPLE, Protocol.PREPARED], ids=lambda p: p.value)
def test_inference_with_parameters(leak: LeakChecker, sql: str, params: tuple[Any, ...],
                                   protocol: Protocol) -> None:
    filled = tuple(
        [leak.secrets.fill(x) for x in p] if isinstance(p, list)
        else leak.secrets.fill(p) if isinstance(p, str) else p
        for p in params
    )
    leak.assert_no_leak(sql, filled, protocol=protocol, masked_equiv=True)


# ------------------------------------------------------------------ the lookup itself


def test_lookup_finds_in_scope_customer_masked(leak: LeakChecker) -> None:
    """Control: a real lookup works and stays masked (else the misuse tests prove nothing)."""
    received = leak.assert_no_leak(
        "select id, phone, id_number from customers where phone = '<<phone:3>>'")
    assert [r[0] for r in received.rows] == [3], received.describe()


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("select count(*) from customers where phone = '<<phone:1>>'", id="phone"),
        pytest.param("select count(*) from customers where id_number in ('<<id_number:1>>', "
                     "'<<id_number:2>>')", id="id_number-in"),
        pytest.param("select count(*) from customers where phone = '<<phone:1>>' "
                     "and id_number = '<<id_number:1>>'", id="both"),
        pytest.param("select count(*) from accounts a where a.customer_id in (select id from "
                     "customers where phone = '<<phone:4>>')", id="in-subquery"),
    ],
)
def test_lookup_never_reaches_other_branches(leak: LeakChecker, sql: str) -> None:
    leak.assert_no_leak(sql, expect=expect_rows([(0,)]))


def test_lookup_with_parameter_never_reaches_other_branches(leak: LeakChecker) -> None:
    leak.assert_no_leak("select count(*) from customers where phone = %s",
                        (leak.secrets.customer(1).phone,), protocol=Protocol.PREPARED,
                        expect=expect_rows([(0,)]))


def test_huge_lookup_list_is_refused(leak: LeakChecker) -> None:
    """A list of candidates would recover the digits a mask hides (lookup_max_values)."""
    phones = ", ".join(f"'{c.phone}'" for c in leak.secrets.customers.values())
    received = leak.assert_no_leak(f"select count(*) from customers where phone in ({phones})",
                                   expect=expect_error)
    assert received.denied and "lookup_max_values" in received.describe()


def test_lookup_list_within_the_cap_matches_only_own_branch(leak: LeakChecker) -> None:
    some = list(leak.secrets.customers.values())[:10]  # ids 1-10: every branch
    phones = ", ".join(f"'{c.phone}'" for c in some)
    own = sum(1 for c in some if c.branch == "SZ01")
    leak.assert_no_leak(f"select count(*) from customers where phone in ({phones})",
                        expect=expect_rows([(own,)]))
