"""The statement-shape normalizer, the shape cache and literal redaction (rewriters.shape).

Why these tests: a cache keyed by statement shape is only safe if two statements with one key
always get one decision (NOTES "the statement-shape cache must be conservative"). The unit tests
pin what the normalizer refuses; the property test checks, over every fixture statement with its
literals mutated, that a warm cache decides exactly like a cold analyzer.
"""

from __future__ import annotations

import random
from dataclasses import astuple

import pytest

from rewriters.analyze import Analyzer
from rewriters.model import Action, Analysis, LexSettings
from rewriters.shape import Normalized, normalize, redact_literals
from tests.rewriters.helpers import view
from tests.rewriters.test_fixtures import CASES, Case

UTF8 = LexSettings()


def refill(norm: Normalized) -> str:
    """The text a shape and its literals stand for (the shape's markers are 2 chars)."""
    out = norm.shape
    for lit in norm.literals:
        i = out.index("\x00")
        out = out[:i] + lit + out[i + 2 :]
    return out


# --- normalize: what becomes a literal slot ---------------------------------------------------


def test_literals_in_value_positions_are_slots() -> None:
    sql = "SELECT * FROM t WHERE a = 'x' AND b IN (1, 2.5, -3) AND c = $1 LIMIT 10 OFFSET 2"
    norm = normalize(sql, UTF8)
    assert norm is not None
    assert norm.shape == ("SELECT * FROM t WHERE a = \x00s AND b IN (\x00i, \x00n, -\x00i) "
                          "AND c = $1 LIMIT 10 OFFSET 2")
    assert norm.literals == ("'x'", "1", "2.5", "3")
    assert refill(norm) == sql


def test_literal_kind_is_part_of_the_shape() -> None:
    shapes = {normalize(f"SELECT * FROM t WHERE id = {v}", UTF8).shape  # type: ignore[union-attr]
              for v in ("5", "5.0", "'5'", "5e0")}
    assert len(shapes) == 3  # integer, other number (twice), string


@pytest.mark.parametrize(("sql", "kept"), [
    ("SELECT date '2024-01-01', interval '1 day'", "'2024-01-01'"),  # typed literals
    ("SELECT x::text FROM t LIMIT 5", "5"),
    ("SELECT 1 FROM t FETCH FIRST 3 ROWS ONLY", "3"),
    ("SELECT x FROM t OFFSET 4", "4"),
])
def test_non_value_literals_stay_in_the_shape(sql: str, kept: str) -> None:
    norm = normalize(sql, UTF8)
    assert norm is not None
    assert kept not in norm.literals and kept in norm.shape
    assert refill(norm) == sql


def test_comments_are_kept_verbatim() -> None:
    sql = "SELECT 1 /* note 'x' */ FROM t -- tail 'y'\nWHERE a = 'z'"
    norm = normalize(sql, UTF8)
    assert norm is not None
    assert norm.literals == ("1", "'z'")
    assert "/* note 'x' */" in norm.shape and "-- tail 'y'" in norm.shape


@pytest.mark.parametrize("sql", [
    "SELECT $$a$$",  # dollar quotes
    "SELECT $tag$ ' $tag$ FROM t WHERE a = 'x'",
    "SELECT E'\\'' FROM t",  # escape strings
    "SELECT e'x'",
    "SELECT B'0101', 1",
    "SELECT X'1F'",
    "SELECT N'x'",
    "SELECT U&'\\0041'",  # unicode strings and identifiers
    'SELECT U&"\\0070hone" FROM t',
    "SELECT /* outer /* nested */ still comment */ 1",  # nested comments
    "SELECT 1 /* unterminated",
    "SELECT 'unterminated",
    'SELECT "unterminated',
    "SELECT 'a'\n'b'",  # string continuation
    "SELECT 'a' 'b'",
    "SELECT 123abc",  # number glued to an identifier
    "SELECT 1..2",
    "SELECT 0x1F",
    "SELECT 'a\\' FROM t",  # a backslash anywhere
    "SELECT '\x00'",
    "SELECT * FROM t WHERE a = 'customers'",  # a string naming a protected table
    "SELECT * FROM t WHERE a = 'x_to_xml'",  # ... or holding a risky word
])
def test_refuses_what_it_does_not_fully_understand(sql: str) -> None:
    cv_sensitive = Analyzer()._views.get(view("teller")).sensitive
    assert normalize(sql, UTF8, cv_sensitive) is None


def test_standard_conforming_strings_off() -> None:
    off = LexSettings(standard_conforming_strings=False)
    # 'a\' ... : with scs off the backslash escapes the quote; the normalizer gives up.
    assert normalize("SELECT * FROM t WHERE a = 'x\\' OR 1=1 --'", off) is None
    # without a backslash the text lexes the same either way
    assert normalize("SELECT * FROM t WHERE a = 'x'", off) is not None


def test_gbk_with_non_ascii_is_not_normalized() -> None:
    gbk = LexSettings(client_encoding="GBK")
    assert normalize("SELECT * FROM t WHERE a = '縗' AND b = 1", gbk) is None
    assert normalize("SELECT * FROM t WHERE b = 1", gbk) is not None
    assert normalize("SELECT * FROM t WHERE a = '縗'", UTF8) is not None


def test_gbk_statements_are_never_cached() -> None:
    gbk = LexSettings(client_encoding="GBK")
    analyzer = Analyzer()
    v = view("teller")
    for n in (1, 2, 3):
        a = analyzer.analyze(f"SELECT name FROM customers WHERE id = {n} AND name <> '王'", v, gbk)
        assert not a.cached
        assert a.denied is not None  # non-ASCII text in GBK naming customer data: denied


def test_cache_key_includes_the_lexing_settings_and_the_view() -> None:
    analyzer = Analyzer()
    sql = "SELECT name FROM customers WHERE id = {}"
    first = analyzer.analyze(sql.format(1), view("teller"))
    assert not first.cached
    assert analyzer.analyze(sql.format(2), view("teller")).cached
    # another lexing setting, another view: not the teller's template
    off = analyzer.analyze(sql.format(3), view("teller"), LexSettings(False))
    assert not off.cached
    gz = analyzer.analyze(sql.format(4), view("teller_gz"))
    assert not gz.cached
    assert "'GZ01'" in gz.sql and "'SZ01'" not in gz.sql


def test_value_dependent_decisions_are_not_cached() -> None:
    analyzer = Analyzer()
    v = view("teller")
    ok = "INSERT INTO customers (name, phone, id_number, branch_id) VALUES ('a', '1', '2', 'SZ01')"
    assert analyzer.analyze(ok, v).denied is None
    bad = analyzer.analyze(ok.replace("'SZ01'", "'GZ01'"), v)
    assert bad.denied is not None and not bad.cached


def test_statement_without_literals_is_cached() -> None:
    analyzer = Analyzer()
    v = view("teller")
    sql = "SELECT name FROM customers WHERE id = $1"
    assert not analyzer.analyze(sql, v).cached
    again = analyzer.analyze(sql, v)
    assert again.cached
    assert _decision(again) == _decision(Analyzer().analyze_uncached(sql, v))


# --- redact_literals --------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM t WHERE phone = '138' AND id = $1 LIMIT 5",
     "SELECT * FROM t WHERE phone = ? AND id = $1 LIMIT ?"),
    ("SELECT E'a\\'b', $$x$$, $q$ 'y' $q$, B'01', U&'\\0041', 1.5e3",
     "SELECT ?, ?, ?, ?, ?, ?"),
    ("SELECT 1 /* 13812345678 */ -- 440304\n", "SELECT ? /* */ --\n"),
    ('SELECT "phone" FROM "t"', 'SELECT "phone" FROM "t"'),
    ("SELECT 'unterminated 138", "SELECT ?"),
    ("SELECT 1; SELECT /* open", "SELECT ?; SELECT ?"),
    # nested block comments are one comment (PostgreSQL's reading): the quote after the first
    # */ is inside it, so the literal after the comment is still a literal
    ("SELECT id FROM c WHERE /* /* */ \" */ phone = '18600314187' /* \" */",
     "SELECT id FROM c WHERE /* */ phone = ? /* */"),
    ("SELECT 1 /* a /* b */ c '13900104729' */, 'x'", "SELECT ? /* */, ?"),
    ("SELECT 1 /* a /* b */ '13900104729'", "SELECT ? /* */?"),
    ("", ""),
])
def test_redact_literals(sql: str, expected: str) -> None:
    assert redact_literals(sql) == expected


def test_redact_literals_never_raises_and_never_keeps_a_literal() -> None:
    rng = random.Random(20261124)
    alphabet = "ab1'\"$/*-\\ \n;()U&E.x9\x00電"
    for _ in range(2000):
        sql = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        out = redact_literals(sql)
        assert isinstance(out, str)
    secret = "SELECT '13812345678', 440304199001011234, $a$13900000000$a$"
    out = redact_literals(secret)
    assert "1381234" not in out and "4403041990" not in out and "1390000" not in out


# --- the property: a warm cache decides like a cold analyzer ----------------------------------

_STRINGS = ("'SZ01'", "'GZ01'", "'zz'", "'13800000000'")
_INTEGERS = ("7", "0", "13", "50")
_NUMBERS = ("2.5", "1e3", ".5", "0.0")


def _variants(case: Case, count: int = 3) -> list[str]:
    """The case's text with every literal slot given other values of the same kind."""
    norm = normalize(case.sql, case.lex)
    if norm is None or not norm.spans:
        return []
    out = []
    for j in range(count):
        parts: list[str] = []
        pos = 0
        for (start, end), lit in zip(norm.spans, norm.literals, strict=True):
            parts.append(case.sql[pos:start])
            if lit.startswith("'"):
                parts.append(_STRINGS[j])
            elif lit.isdigit():
                parts.append(_INTEGERS[j])
            else:
                parts.append(_NUMBERS[j])
            pos = end
        parts.append(case.sql[pos:])
        out.append("".join(parts))
    return out


def _decision(a: Analysis) -> tuple[object, ...]:
    return (a.sql, tuple(astuple(d) for d in a.statements))


def test_warm_cache_decides_like_a_cold_analyzer() -> None:
    mutated = 0
    hits = 0
    for case in CASES:
        v = view(case.role)
        warm = Analyzer()
        warm.analyze(case.sql, v, case.lex)  # fills the cache with this shape
        for text in _variants(case):
            mutated += 1
            got = warm.analyze(text, v, case.lex)
            hits += got.cached
            cold = Analyzer().analyze(text, v, case.lex)
            assert _decision(got) == _decision(cold), (case.id, text)
            assert (got.denied is None) == (cold.denied is None)
    assert mutated >= 300
    assert hits >= 150  # the property is about the cache: it must actually be used


def test_cached_decision_equals_uncached_on_the_fixture_texts() -> None:
    analyzer = Analyzer()
    for case in CASES:
        v = view(case.role)
        analyzer.analyze(case.sql, v, case.lex)
        again = analyzer.analyze(case.sql, v, case.lex)
        fresh = Analyzer().analyze_uncached(case.sql, v, case.lex)
        assert _decision(again) == _decision(fresh), case.id
        if again.cached:
            assert all(d.action is not Action.DENY for d in again.statements)
