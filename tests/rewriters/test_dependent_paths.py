"""Paths to a catalog dependent that do not look like a call: ``CALL``, attribute notation, an
operator; and writing a protected table whose triggers or rules see its raw rows.

Why: the verifier found dependents only in function calls and relation names, so a procedure
run by ``CALL``, ``c.fn`` (PostgreSQL's spelling of ``fn(c)``) and ``#@ 1`` (an operator over
a function reading customers) reached PostgreSQL for masked roles (tests/security/test_hunt4.py
shows the leaks on a live database). Pure: the catalog is given here, as proxy/catalog.py would
read it.
"""

from __future__ import annotations

import dataclasses

import pytest

from proxy.catalog import decode_unicode_identifiers
from rewriters.analyze import Analyzer
from rewriters.model import Action, OperatorView
from tests.rewriters.helpers import view

DEPENDENTS = {
    "public.h_proc": ("public.customers",),  # a procedure
    "public.cust_phone": ("public.customers",),  # fn(c customers): c.cust_phone
    "public.#@": ("public.customers",),  # CREATE OPERATOR #@ (FUNCTION = reads customers)
    "public.h_type": ("public.customers",),  # a type whose cast function reads customers
}
HOOKS = {"public.customers": ("public.notify_change",)}


def _with_catalog(role: str, allowed: frozenset[str] = frozenset()) -> OperatorView:
    v = view(role)
    return dataclasses.replace(
        v, dependents={**v.dependents, **DEPENDENTS}, write_hooks=dict(HOOKS),
        allowed_dependents=v.allowed_dependents | allowed)


def _decide(sql: str, v: OperatorView) -> tuple[Action, str]:
    st = Analyzer().analyze_uncached(sql, v).statements[0]
    return st.action, st.message


@pytest.mark.parametrize(("sql", "dependent"), [
    ("call h_proc(1, null)", "public.h_proc"),
    ("CALL public.h_proc($1, NULL)", "public.h_proc"),
    ("select c.cust_phone from customers c where id = 3", "public.cust_phone"),
    ("select (c).cust_phone from customers c where id = 3", "public.cust_phone"),
    ("select (row(1)::sec_sink).cust_phone", "public.cust_phone"),
    ("select #@ 1", "public.#@"),
    ("select 1 operator(public.#@) 2", "public.#@"),
    ("select (1::h_type).v", "public.h_type"),
])
def test_dependent_reached_without_a_call_is_denied(sql: str, dependent: str) -> None:
    action, message = _decide(sql, _with_catalog("teller"))
    assert action is Action.DENY
    assert dependent in message or "cannot" in message, message


@pytest.mark.parametrize("sql", [
    "call h_proc(1, null)",
    "select c.cust_phone from customers c where id = 3",
    "select #@ 1",
])
def test_the_dba_and_listed_dependents_pass(sql: str) -> None:
    assert _decide(sql, _with_catalog("dba"))[0] is not Action.DENY
    allowed = frozenset(DEPENDENTS)
    assert _decide(sql, _with_catalog("teller", allowed))[0] is not Action.DENY


@pytest.mark.parametrize("sql", [
    "update customers set level = level where id = 3",
    "delete from customers where id = 3",
    "insert into customers (name, branch_id) values ('x', 'SZ01')",
])
def test_writing_a_table_with_a_trigger_is_denied_unless_listed(sql: str) -> None:
    action, message = _decide(sql, _with_catalog("teller"))
    assert action is Action.DENY
    assert "public.notify_change" in message and "allow_dependents" in message
    listed = _with_catalog("teller", frozenset({"public.notify_change"}))
    assert _decide(sql, listed)[0] is not Action.DENY
    assert _decide(sql, _with_catalog("dba"))[0] is not Action.DENY


def test_reading_a_table_with_a_trigger_is_unaffected() -> None:
    action, _ = _decide("select phone from customers where id = 3", _with_catalog("teller"))
    assert action is Action.REWRITE


def test_a_plain_qualified_column_is_not_a_call() -> None:
    action, _ = _decide("select c.phone, o.note from customers c join orders o "
                        "on o.customer_id = c.id where c.id = 3", _with_catalog("teller"))
    assert action is Action.REWRITE


@pytest.mark.parametrize(("body", "decoded"), [
    ('select phone from public.U&"cust\\006Fmers"', "select phone from public.customers"),
    ('from U&"d!0061t!+000061" UESCAPE \'!\'', "from data"),
    ('from U&"a\\\\b"', "from a\\b"),
    ('from U&"x\\zz"', "from x\\zz"),  # not an escape: kept
    ("no identifiers here", "no identifiers here"),
])
def test_function_bodies_are_read_with_unicode_identifiers_decoded(body: str,
                                                                   decoded: str) -> None:
    assert decode_unicode_identifiers(body) == decoded
