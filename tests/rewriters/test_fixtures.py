"""The rewriter's input -> expected pairs in ``tests/rewriters/fixtures/*.sql`` (sqlglot-style).

Format — blocks of::

    -- # free text describing the case (ignored)
    -- as: teller                    role of a view in tests/rewriters/helpers.py
    -- lex: scs=off encoding=GBK     optional LexSettings
    SELECT phone FROM customers WHERE id = 3;
    -- expect:                       the exact Analysis.sql ...
    SELECT phone FROM {{customers & "id" OPERATOR(pg_catalog.=) 3}} AS "customers" WHERE TRUE;
    -- lookups: public.customers.id_number       optional checks on the (last) decision
    -- tables: public.customers
    -- kind: select
    -- lookup_values: 1                             values the lookups present (quota charge)
    -- row_weight: 2                                 rows of customer data one row can carry
    -- row_limit: 25                                 the wire cap (max_rows / row_weight)

or ``-- deny: <substring of the message>``, ``-- forward`` or ``-- rewritten`` (rewritten, text
not compared) instead of ``-- expect:``.

In expected SQL, ``{{customers}}`` stands for the derived table the role's view produces for
``customers`` (``CompiledTable.derived``): ``{{customers@public.customers}}`` when the client
wrote another name text, ``{{customers & <cond> & <cond>}}`` with conditions moved inside.
``[[cap-write public.orders: <statement>]]`` (a data change with RETURNING) and
``[[cap-read public.customers: <statement>]]`` (a read sharing its text with other statements)
stand for the statement wrapped so that PostgreSQL fails it past the role's max_rows
(``rewriters.analyze.cap_inside``). ``[[masked-returning public.customers "c": <the change,
ending RETURNING "c".*> || <the client's RETURNING list>]]`` stands for a data change whose
RETURNING reads masked columns, run over the masked row (``rewriters.analyze.masked_returning``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rewriters.analyze import Analyzer
from rewriters.compiled import compile_view
from rewriters.model import FAILING_PREFIX, Action, LexSettings
from tests.rewriters.helpers import view

FIXTURES = Path(__file__).parent / "fixtures"
_DIRECTIVE = re.compile(r"^-- (as|expect|deny|forward|rewritten|lookup_values|lookups|row_limit|row_weight|tables|kind|lex|columns)\b:?\s*(.*)$")
_MACRO = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_CAPPED = re.compile(r"\[\[cap-(read|write) ([^:]+): (.*?)\]\]", re.DOTALL)
_MASKED_RETURNING = re.compile(r"\[\[masked-returning (\S+) (\S+): (.*?) \|\| (.*?)\]\]",
                               re.DOTALL)
_CAP_GUARD = (
    'WITH "pgveil_rows" AS {materialized}(\n{inner}\n) SELECT * FROM "pgveil_rows" WHERE (SELECT '
    "CASE WHEN pg_catalog.count(*) OPERATOR(pg_catalog.<=) {limit} THEN true ELSE "
    "CAST(CAST(CAST(pg_catalog.concat('pgveil: row limit of {limit} exceeded for role {role}: "
    "the statement returned more than {limit} rows of {tables}, so PostgreSQL stopped it and "
    "nothing it did was kept') AS pg_catalog.int4) AS pg_catalog.text) AS boolean) END FROM "
    '"pgveil_rows")')


@dataclass
class Case:
    file: str
    line: int
    role: str
    sql: str = ""
    outcome: str = ""  # expect | deny | forward
    expected: str = ""
    checks: dict[str, str] = field(default_factory=dict)
    lex: LexSettings = field(default_factory=LexSettings)

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _lex(spec: str) -> LexSettings:
    scs = True
    enc = "UTF8"
    for part in spec.split():
        k, _, v = part.partition("=")
        if k == "scs":
            scs = v.lower() not in ("off", "false", "0")
        elif k == "encoding":
            enc = v
    return LexSettings(standard_conforming_strings=scs, client_encoding=enc)


def _flush(current: Case | None, mode: str, buf: list[str]) -> None:
    """Store the collected lines as the case's SQL or expected SQL, then empty ``buf``."""
    text = "\n".join(buf).strip()
    if current is not None:
        if mode == "sql":
            current.sql = text
        elif mode == "expect":
            current.expected = text
    buf.clear()


def load_cases(paths: list[Path] | None = None) -> list[Case]:
    cases: list[Case] = []
    for path in paths if paths is not None else sorted(FIXTURES.glob("*.sql")):
        current: Case | None = None
        mode = ""
        buf: list[str] = []
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if raw.startswith("-- #"):
                continue
            m = _DIRECTIVE.match(raw)
            if not m:
                buf.append(raw)
                continue
            key, value = m.group(1), m.group(2).strip()
            if key == "as":
                _flush(current, mode, buf)
                current = Case(path.name, n, value)
                cases.append(current)
                mode = "sql"
                continue
            assert current is not None, f"{path}:{n}: directive before '-- as:'"
            if key == "lex":
                current.lex = _lex(value)
                continue
            if key in ("expect", "deny", "forward", "rewritten"):
                _flush(current, mode, buf)
                current.outcome = key
                if key == "deny":
                    current.expected = value
                mode = "expect" if key == "expect" else ""
                continue
            _flush(current, mode, buf)
            mode = ""
            current.checks[key] = value
        _flush(current, mode, buf)
    return cases


CASES = load_cases()
ANALYZER = Analyzer()


def expand(expected: str, role: str) -> str:
    v = view(role)
    cv = compile_view(v)

    def capped(m: re.Match[str]) -> str:
        return _CAP_GUARD.format(materialized="MATERIALIZED " if m.group(1) == "read" else "",
                                 inner=m.group(3), limit=v.limits.max_rows, role=v.role,
                                 tables=m.group(2))

    expected = _CAPPED.sub(capped, expected)

    def masked_returning(m: re.Match[str]) -> str:
        table, alias, body, listing = m.groups()
        rows = (f"SELECT {listing} FROM (SELECT {cv.tables[table].projection} FROM "
                f'"pgveil_dml") AS {alias}')
        guard = _CAP_GUARD.format(materialized="", inner=rows, limit=v.limits.max_rows,
                                  role=v.role, tables=table)
        one_each = (f"RETURNING of {table} must give one row per changed row (no aggregates "
                    "or set-returning functions)")
        guard = guard.replace(
            '"pgveil_rows" WHERE (SELECT CASE',
            '"pgveil_rows" WHERE (SELECT CASE WHEN pg_catalog.count(*) OPERATOR(pg_catalog.=) '
            '(SELECT pg_catalog.count(*) FROM "pgveil_dml") THEN true ELSE CAST(CAST(CAST('
            f"pg_catalog.concat('pgveil: {one_each}') AS pg_catalog.int4) AS pg_catalog.text) "
            'AS boolean) END FROM "pgveil_rows") AND (SELECT CASE', 1)
        return guard.replace('WITH "pgveil_rows" AS (',
                             f'WITH "pgveil_dml" AS (\n{body}\n), "pgveil_rows" AS (', 1)

    expected = _MASKED_RETURNING.sub(masked_returning, expected)

    def sub(m: re.Match[str]) -> str:
        head, *extra = [p.strip() for p in m.group(1).split(" & ")]
        bare, _, name_text = head.partition("@")
        ct = cv.tables[f"public.{bare}"]
        return ct.derived(name_text or bare, extra)

    # the fixtures write pgveil's checks as 'pgveil: …'; they carry the process's nonce
    # (rewriters.model.FAILING_PREFIX)
    return _MACRO.sub(sub, expected).replace("concat('pgveil: ", f"concat('{FAILING_PREFIX}")


def test_fixture_corpus_is_large() -> None:
    assert len(CASES) >= 150
    assert {c.role for c in CASES} >= {"teller", "manager", "auditor", "dba", "default"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fixture(case: Case) -> None:
    assert case.outcome, f"{case.id}: no -- expect/-- deny/-- forward"
    analysis = ANALYZER.analyze_uncached(case.sql, view(case.role), case.lex)
    denied = analysis.denied
    if case.outcome == "deny":
        assert denied is not None, f"expected a denial, got {analysis.sql!r}"
        assert case.expected.lower() in denied.message.lower(), denied.message
        assert denied.sql and denied.sqlstate == "42501"
    else:
        assert denied is None, f"unexpected denial: {denied.message if denied else ''}"
        if case.outcome == "forward":
            assert all(d.action is Action.FORWARD for d in analysis.statements), analysis.sql
        elif case.outcome == "rewritten":  # the text is another fixture's business
            assert any(d.action is Action.REWRITE for d in analysis.statements), analysis.sql
        else:
            assert analysis.sql == expand(case.expected, case.role)
    last = analysis.statements[-1] if analysis.statements else None
    for key, value in case.checks.items():
        assert last is not None
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        if key == "lookups":
            assert last.lookups == items
        elif key == "tables":
            assert last.tables == items
        elif key == "columns":
            assert last.columns == items
        elif key == "kind":
            assert last.kind == value
        elif key == "lookup_values":
            assert last.lookup_values == int(value)
        elif key == "row_limit":
            assert last.row_limit == (None if value == "none" else int(value))
        elif key == "row_weight":
            assert last.row_weight == int(value)
