"""Masks against columns of less common types, live: domains (masked as their base type, as
PostgreSQL describes them on the wire; a NOT NULL or CHECK domain does not make a masked read
fail), a type outside pg_catalog (cast schema-qualified, whatever the session's search_path),
and rounding that would carry a value past its column's limit (truncated instead of an
overflow error)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.localpg import PostgresCluster
from tests.harness.pgveil_proc import DEFAULT_POLICY, PgveilProcess

SETUP = """
DROP SCHEMA IF EXISTS mt CASCADE;
CREATE SCHEMA mt;
CREATE DOMAIN mt.phone_no AS varchar(11) CHECK (VALUE ~ '^[0-9]+$');
CREATE DOMAIN mt.phone_no2 AS mt.phone_no;
CREATE DOMAIN mt.required AS text NOT NULL;
CREATE TYPE mt.mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE mt.t (id int PRIMARY KEY, branch text NOT NULL, ph mt.phone_no,
                   ph2 mt.phone_no2, req mt.required, amount numeric(7,2), small smallint,
                   big int, mood mt.mood);
INSERT INTO mt.t VALUES
  (1, 'SZ01', '13812345678', '13900001111', 'secret', 99999.99, 32767, 2147483647, 'happy'),
  (2, 'SZ01', '13711112222', NULL, 'x', -99999.50, -32768, -2147483648, NULL),
  (3, 'GZ01', '13600000000', '13600000000', 'other', 1.00, 1, 1, 'sad');
GRANT USAGE ON SCHEMA mt TO PUBLIC;
GRANT SELECT ON mt.t TO PUBLIC;
"""
QUERY = "select id, ph, ph2, req, amount, small, big, mood from mt.t order by id limit 10"
EXPECTED = [
    (1, "138****5678", "139****1111", None, Decimal("99999.00"), 32700, 2147483000, "ok"),
    (2, "137****2222", None, None, Decimal("-99999.00"), -32700, -2147483000, "ok"),
]


@pytest.fixture(scope="module")
def typed_pgveil(pg: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[PgveilProcess]:
    pg.psql(SETUP)
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    policy["protected"]["mt.t"] = {"columns": {
        "ph": {"level": 1, "mask": "phone"}, "ph2": {"level": 1, "mask": "phone"},
        "req": {"level": 1, "mask": "null"}, "amount": {"level": 1, "mask": {"round": 0}},
        "small": {"level": 1, "mask": {"round": -2}}, "big": {"level": 1, "mask": {"round": -3}},
        "mood": {"level": 1, "mask": {"sql": "CASE WHEN {col} IS NULL THEN 'ok' ELSE 'ok' END"}},
    }}
    policy["roles"]["teller"]["row_filters"]["mt.t"] = "branch = {{branch}}"
    path = Path(tmp_path_factory.mktemp("mask-types")) / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False), encoding="utf-8")
    try:
        with PgveilProcess(pg, policy_path=path) as proc:
            yield proc
    finally:
        pg.psql("DROP SCHEMA IF EXISTS mt CASCADE")


def _read(dsn: str, *, search_path: str | None = None, binary: bool = False
          ) -> tuple[list[Any], list[int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if search_path is not None:
            conn.execute(f"SET search_path = {search_path}")
        cur = conn.cursor(binary=binary)
        cur.execute(QUERY)
        # an enum psycopg has no adapter for: text, or its bytes in binary
        rows = [tuple(v.decode() if isinstance(v, bytes) else v for v in r)
                for r in cur.fetchall()]
        return rows, [d.type_code for d in cur.description]


@pytest.mark.parametrize("binary", [False, True])
def test_masked_domains_rounding_and_enums(typed_pgveil: PgveilProcess, pg: PostgresCluster,
                                            binary: bool) -> None:
    rows, types = _read(typed_pgveil.dsn("teller_sz01"), binary=binary)
    assert rows == EXPECTED
    _, direct_types = _read(pg.dsn("dba"), binary=binary)
    assert types == direct_types  # a domain column is described by its base type either way


@pytest.mark.parametrize("search_path", ["pg_catalog", "mt, public", "\"$user\""])
def test_masks_do_not_depend_on_search_path(typed_pgveil: PgveilProcess,
                                            search_path: str) -> None:
    rows, _ = _read(typed_pgveil.dsn("teller_sz01"), search_path=search_path)
    assert rows == EXPECTED
