"""Maskers: the SQL they generate (pure) and what it returns in a real PostgreSQL (live).

The live tests evaluate every mask over a one-row derived table ``(SELECT CAST(v AS type) AS
"col")`` exactly as the rewriter's subquery will, and check the value, NULL-safety and that the
result has the column's exact type (typmod included, via CREATE TEMP TABLE AS + format_type).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from rewriters.masks import (
    MaskError,
    MaskKind,
    MaskSpec,
    hmac_pads,
    mask_expression,
    parse_mask,
    qualified_type,
    quote_ident,
    quote_literal,
    type_family,
)
from rewriters.model import CatalogColumn

KEY = b"test-hmac-key"

# (mask as in policy.yaml, column type, input value, expected output)
CASES: list[tuple[Any, str, Any, Any]] = [
    ("phone", "text", "13812345678", "138****5678"),
    ("phone", "text", "12345678", "123*5678"),
    ("phone", "text", "1234567", "*******"),
    ("phone", "character varying(20)", "+8613812345678", "+86*******5678"),
    ("phone", "text", None, None),
    ("chinese_name", "text", "王伟", "王*"),
    ("chinese_name", "text", "欧阳娜娜", "欧***"),
    ("chinese_name", "text", "王", "*"),
    ("chinese_name", "character varying(20)", "张建华", "张**"),
    ("chinese_name", "text", None, None),
    ("id_number", "text", "440304198109061234", "440304********1234"),
    ("id_number", "text", "44030419810906123X", "440304********123X"),
    ("id_number", "text", "1234567890", "**********"),
    ("id_number", "text", None, None),
    ("bank_card", "text", "6222021234568162", "************8162"),
    ("bank_card", "text", "1234", "****"),
    ("bank_card", "text", None, None),
    ("email", "text", "user1@example.com", "u***@example.com"),
    ("email", "text", "张三@例子.中国", "张***@例子.中国"),
    ("email", "text", "a@b@example.com", "a***@example.com"),
    ("email", "text", "not-an-email", "***"),
    ("email", "text", "@example.com", "***"),
    ("email", "character varying(64)", None, None),
    ("redact", "text", "广东省深圳市福田区深南大道1号", "******"),
    ({"redact": "******"}, "text", "anything", "******"),
    ({"redact": "O'Brien\\x"}, "text", "anything", "O'Brien\\x"),
    ({"redact": "[hidden]"}, "character varying(20)", "secret", "[hidden]"),
    ("redact", "text", None, None),
    ("redact", "integer", 42, None),
    ("redact", "date", "1981-09-06", None),
    (None, "numeric(14,2)", Decimal("1234.56"), None),
    ("null", "text", "x", None),
    ("null", "date", "1981-09-06", None),
    ({"keep": [2, 3]}, "text", "abcdefgh", "ab***fgh"),
    ({"keep": [2, 3]}, "text", "abcde", "*****"),
    ({"keep": [0, 0]}, "text", "abc", "***"),
    ({"keep": [1, 1]}, "text", None, None),
    ({"round": -3}, "numeric(14,2)", Decimal("1234.56"), Decimal("1000.00")),
    ({"round": -3}, "numeric(14,2)", Decimal("1500.00"), Decimal("2000.00")),
    ({"round": 1}, "numeric(14,2)", Decimal("1234.56"), Decimal("1234.60")),
    ({"round": -3}, "numeric(14,2)", None, None),
    ({"round": -2}, "integer", 1234, 1200),
    ({"round": -2}, "bigint", -1250, -1300),
    ({"round": 0}, "numeric", Decimal("2.5"), Decimal("3")),
    # rounding up past the type's limit: truncated towards zero instead, never an error
    ({"round": 0}, "numeric(7,2)", Decimal("99999.99"), Decimal("99999.00")),
    ({"round": 0}, "numeric(7,2)", Decimal("-99999.50"), Decimal("-99999.00")),
    ({"round": 0}, "numeric(7,2)", Decimal("99998.50"), Decimal("99999.00")),
    ({"round": -1}, "numeric(3,-2)", Decimal("99900"), Decimal("99900")),
    ({"round": -3}, "integer", 2147483647, 2147483000),
    ({"round": -3}, "integer", -2147483648, -2147483000),
    ({"round": -2}, "smallint", 32767, 32700),
    ({"round": -2}, "smallint", -32768, -32700),
    ({"round": -2}, "smallint", 32749, 32700),
    ({"round": -3}, "bigint", 9223372036854775807, 9223372036854775000),
    ({"round": 1}, "double precision", 1.26, 1.3),
    ({"truncate": "year"}, "date", "1981-09-06", datetime.date(1981, 1, 1)),
    ({"truncate": "month"}, "date", "1981-09-06", datetime.date(1981, 9, 1)),
    ({"truncate": "year"}, "date", None, None),
    ({"truncate": "month"}, "timestamp without time zone", "1981-09-06 12:34:56",
     datetime.datetime(1981, 9, 1)),
    ({"truncate": "year"}, "timestamp(3) without time zone", "1981-09-06 12:34:56.789",
     datetime.datetime(1981, 1, 1)),
    ({"sql": "pg_catalog.upper({col})"}, "text", "abc", "ABC"),
    ({"sql": "pg_catalog.upper({col})"}, "character varying(20)", None, None),
]


def _col(type_sql: str, name: str = "col") -> CatalogColumn:
    return CatalogColumn(name, type_sql)


def _strip_literals(sql: str) -> str:
    sql = re.sub(r"E?'(?:[^']|'')*'", "''", sql)
    return re.sub(r'"(?:[^"]|"")*"', '""', sql)


# Words that may precede "(" without pg_catalog.: the CAST keyword and type names with typmods.
_CALL_OK = {"CAST", "numeric", "varying", "character", "timestamp", "time"}


def _assert_hardened(sql: str) -> None:
    """Only pg_catalog-qualified calls, no operators a search_path could redirect."""
    bare = _strip_literals(sql)
    for m in re.finditer(r"([A-Za-z_][\w.]*)\s*\(", bare):
        name = m.group(1)
        assert name.startswith("pg_catalog.") or name in _CALL_OK, f"unqualified {name}( in {sql}"
    assert "||" not in bare
    assert not re.search(r"[|+*/<>=!~@#%^&]", bare), f"operator in {sql}"
    # The only '-' allowed is the sign of a literal digit count: ", -3)".
    assert not re.search(r"-(?!\d+\))", bare), f"operator - in {sql}"


# --------------------------------------------------------------------------------------------
# Pure tests


@pytest.mark.parametrize(("spec", "type_sql", "value", "expected"), CASES)
def test_generated_sql_is_hardened(spec: Any, type_sql: str, value: Any, expected: Any) -> None:
    _assert_hardened(mask_expression(spec, _col(type_sql), hmac_key=KEY))


def test_hash_sql_is_hardened_and_has_no_pgcrypto() -> None:
    sql = mask_expression("hash", _col("text"), hmac_key=KEY)
    _assert_hardened(sql)
    assert "pg_catalog.sha256(" in sql and "pg_catalog.byteacat(" in sql
    assert "digest(" not in sql and "hmac(" not in sql
    assert "\\" not in sql  # bytea via decode(hex), not '\x..' literals
    ipad, opad = hmac_pads(KEY)
    assert ipad.hex() in sql and opad.hex() in sql


def test_text_masks_reference_the_quoted_column() -> None:
    sql = mask_expression("phone", _col("text", 'we"ird'), hmac_key=KEY)
    assert '"we""ird"' in sql
    assert sql.startswith('CASE WHEN "we""ird" IS NULL THEN NULL')


def test_exact_type_casts() -> None:
    assert "CAST(" not in mask_expression("phone", _col("text"), hmac_key=KEY)
    assert mask_expression("phone", _col("character varying(20)"), hmac_key=KEY).endswith(
        " AS character varying(20))")
    assert mask_expression({"round": -3}, _col("numeric(14,2)"), hmac_key=KEY) == (
        'CAST(CASE WHEN pg_catalog.numeric_le(pg_catalog.abs(pg_catalog.round("col", -3)), '
        "CAST('999999999999.99' AS numeric)) THEN pg_catalog.round(\"col\", -3) "
        'ELSE pg_catalog.trunc("col", -3) END AS numeric(14,2))')
    assert mask_expression({"round": -3}, _col("numeric"), hmac_key=KEY) == (
        'pg_catalog.round("col", -3)')
    assert mask_expression({"round": -1}, _col("integer"), hmac_key=KEY) == (
        'CAST(CASE WHEN pg_catalog.numeric_le(pg_catalog.abs(pg_catalog.round(CAST("col" AS '
        "numeric), -1)), CAST('2147483647' AS numeric)) THEN pg_catalog.round(CAST(\"col\" AS "
        'numeric), -1) ELSE pg_catalog.trunc(CAST("col" AS numeric), -1) END AS integer)')
    assert mask_expression({"round": 1}, _col("double precision"), hmac_key=KEY) == (
        'CAST(pg_catalog.round(CAST("col" AS numeric), 1) AS double precision)')
    assert mask_expression(None, _col("date"), hmac_key=KEY) == "CAST(NULL AS pg_catalog.date)"
    assert mask_expression({"truncate": "year"}, _col("date"), hmac_key=KEY) == (
        "CAST(pg_catalog.date_trunc('year', CAST(\"col\" AS timestamp without time zone)) "
        "AS pg_catalog.date)")
    assert mask_expression({"sql": "pg_catalog.md5({col})"}, _col("text"), hmac_key=KEY) == (
        'CAST((pg_catalog.md5("col")) AS pg_catalog.text)')


@pytest.mark.parametrize(("spec", "type_sql", "needle"), [
    ("phone", "date", "mask phone needs a text column, but col is date"),
    ("chinese_name", "integer", "needs a text column"),
    ("email", "numeric(14,2)", "needs a text column"),
    ("hash", "numeric(14,2)", "mask hash needs a text column, but col is numeric(14,2)"),
    ("hash", "integer", "mask hash needs a text column"),
    ({"keep": [1, 1]}, "bigint", "mask keep needs a text column"),
    ({"round": 2}, "text", "mask round needs a numeric column, but col is text"),
    ({"truncate": "year"}, "text", "needs a date or timestamp column"),
    ("id_number", "text[]", "needs a text column, but col is text[]"),
])
def test_mask_on_wrong_type_is_a_clear_error(spec: Any, type_sql: str, needle: str) -> None:
    with pytest.raises(MaskError, match=re.escape(needle)):
        mask_expression(spec, _col(type_sql), hmac_key=KEY)


@pytest.mark.parametrize(("value", "expected"), [
    ("phone", MaskSpec(MaskKind.PHONE)),
    ("redact", MaskSpec(MaskKind.REDACT, constant="******")),
    ({"redact": "xx"}, MaskSpec(MaskKind.REDACT, constant="xx")),
    (None, MaskSpec(MaskKind.NULL)),
    ("null", MaskSpec(MaskKind.NULL)),
    ({"keep": [3, 4]}, MaskSpec(MaskKind.KEEP, keep=(3, 4))),
    ({"round": -3}, MaskSpec(MaskKind.ROUND, digits=-3)),
    ({"truncate": "month"}, MaskSpec(MaskKind.TRUNCATE, unit="month")),
    ({"sql": "pg_catalog.md5({col})"}, MaskSpec(MaskKind.SQL, template="pg_catalog.md5({col})")),
])
def test_parse_mask(value: Any, expected: MaskSpec) -> None:
    assert parse_mask(value) == expected


@pytest.mark.parametrize(("value", "needle"), [
    ("fone", "unknown mask 'fone'"),
    ({"keep": [1]}, "keep takes two non-negative integers"),
    ({"keep": [1, -1]}, "keep takes two non-negative integers"),
    ({"keep": ["1", 2]}, "keep takes two non-negative integers"),
    ({"round": "3"}, "round takes an integer"),
    ({"round": True}, "round takes an integer"),
    ({"truncate": "day"}, "truncate takes year or month"),
    ({"sql": "pg_catalog.md5(x)"}, "uses {col}"),
    ({"sql": "{col}; DROP TABLE x"}, "single expression"),
    ({"redact": 5}, "redact takes a string"),
    ({"round": 1, "keep": [1, 1]}, "exactly one key"),
    ({"blur": 1}, "unknown mask 'blur'"),
    (42, "a mask is a name"),
])
def test_parse_mask_errors(value: Any, needle: str) -> None:
    with pytest.raises(MaskError, match=re.escape(needle)):
        parse_mask(value)


def test_quoting_helpers() -> None:
    assert quote_literal("O'Brien") == "'O''Brien'"
    assert quote_literal("a\\b") == "E'a\\\\b'"
    assert quote_ident('a"b') == '"a""b"'
    with pytest.raises(MaskError):
        quote_literal("nul\x00")
    assert qualified_type("text") == "pg_catalog.text"
    assert qualified_type("date") == "pg_catalog.date"
    assert qualified_type("text[]") == "pg_catalog.text[]"
    assert qualified_type("numeric(14,2)") == "numeric(14,2)"
    assert qualified_type("character varying(20)") == "character varying(20)"
    assert qualified_type("timestamp with time zone") == "timestamp with time zone"
    assert qualified_type("crm.phone_domain") == "crm.phone_domain"
    assert type_family("character varying(20)").value == "text"
    assert type_family("timestamp(3) with time zone").value == "timestamp"
    assert type_family("double precision").value == "float"
    assert type_family("int4[]").value == "other"


def test_hmac_pads_long_key_is_hashed_first() -> None:
    long_key = b"k" * 100
    ipad, _ = hmac_pads(long_key)
    digest = hashlib.sha256(long_key).digest().ljust(64, b"\x00")
    assert ipad == bytes(b ^ 0x36 for b in digest)


# --------------------------------------------------------------------------------------------
# Live tests: the generated SQL in a real PostgreSQL


@pytest.fixture(scope="module")
def conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn) as c:
        yield c


@pytest.fixture
def tx(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """A connection inside a transaction that is rolled back (temp objects, SET LOCAL)."""
    try:
        yield conn
    finally:
        conn.rollback()


def _eval(c: psycopg.Connection[Any], expr: str, type_sql: str, value: Any) -> tuple[Any, str]:
    """Evaluate ``expr`` over a one-row source; return the value and its exact column type."""
    c.execute(
        f"CREATE TEMP TABLE mask_out ON COMMIT DROP AS SELECT {expr} AS v "
        f'FROM (SELECT CAST(%s AS {qualified_type(type_sql)}) AS "col") AS src',
        (None if value is None else str(value),),
        prepare=False,
    )
    row = c.execute(
        "SELECT (SELECT v FROM mask_out), pg_catalog.format_type(a.atttypid, a.atttypmod) "
        "FROM pg_catalog.pg_attribute a WHERE a.attrelid = 'mask_out'::pg_catalog.regclass "
        "AND a.attname = 'v'", prepare=False).fetchone()
    assert row is not None
    c.execute("DROP TABLE mask_out", prepare=False)
    return row[0], row[1]


@pytest.mark.live
@pytest.mark.parametrize(("spec", "type_sql", "value", "expected"), CASES)
def test_mask_in_postgres(tx: psycopg.Connection[Any], spec: Any, type_sql: str, value: Any,
                          expected: Any) -> None:
    expr = mask_expression(spec, _col(type_sql), hmac_key=KEY)
    got, got_type = _eval(tx, expr, type_sql, value)
    assert got == expected
    assert got_type == type_sql


@pytest.mark.live
def test_timestamptz_truncate_keeps_type(tx: psycopg.Connection[Any]) -> None:
    tx.execute("SET LOCAL TimeZone = 'Asia/Shanghai'")
    expr = mask_expression({"truncate": "month"}, _col("timestamp with time zone"), hmac_key=KEY)
    got, got_type = _eval(tx, expr, "timestamp with time zone", "1981-09-06 12:00:00+08")
    assert got_type == "timestamp with time zone"
    assert got.astimezone(datetime.timezone(datetime.timedelta(hours=8))).replace(
        tzinfo=None) == datetime.datetime(1981, 9, 1)


@pytest.mark.live
@pytest.mark.parametrize("key", [KEY, b"x" * 100, b""])
def test_hash_is_hmac_sha256(tx: psycopg.Connection[Any], key: bytes) -> None:
    expr = mask_expression("hash", _col("text"), hmac_key=key)
    for value in ["13812345678", "王伟", ""]:
        got, got_type = _eval(tx, expr, "text", value)
        assert got == hmac.new(key, value.encode(), hashlib.sha256).hexdigest()
        assert got_type == "text"
    assert _eval(tx, expr, "text", None) == (None, "text")
    # Deterministic, so two tables' hashed columns still join.
    assert _eval(tx, expr, "text", "a")[0] == _eval(tx, expr, "text", "a")[0]


@pytest.mark.live
def test_masks_survive_search_path_hijack(tx: psycopg.Connection[Any]) -> None:
    """User functions named like the built-ins, first in search_path, change nothing."""
    specs: list[tuple[Any, str, Any]] = [(s, t, v) for s, t, v, _ in CASES if v is not None]
    specs.append(("hash", "text", "13812345678"))
    exprs = [(mask_expression(s, _col(t), hmac_key=KEY), t, v) for s, t, v in specs]
    before = [_eval(tx, e, t, v) for e, t, v in exprs]

    tx.execute("SET LOCAL check_function_bodies = off")
    tx.execute("CREATE SCHEMA hijack")
    for sig, body in [
        ('"left"(text, integer)', "SELECT $1"),
        ('"right"(text, integer)', "SELECT $1"),
        ("textcat(text, text)", "SELECT 'HIJACKED'::text"),
        ("repeat(text, integer)", "SELECT 'HIJACKED'::text"),
        ("char_length(text)", "SELECT 99"),
        ("strpos(text, text)", "SELECT 1"),
        ("reverse(text)", "SELECT $1"),
        ("upper(text)", "SELECT 'HIJACKED'::text"),
        ("round(numeric, integer)", "SELECT $1"),
        ("date_trunc(text, timestamp without time zone)", "SELECT $2"),
        ("sha256(bytea)", "SELECT $1"),
        ("encode(bytea, text)", "SELECT 'HIJACKED'::text"),
    ]:
        ret = sig.split("(")[0]
        rtype = {"char_length": "integer", "strpos": "integer", "round": "numeric",
                 "date_trunc": "timestamp without time zone", "sha256": "bytea"}.get(
            ret.strip('"'), "text")
        tx.execute(f"CREATE FUNCTION hijack.{sig} RETURNS {rtype} LANGUAGE sql AS $${body}$$")
    tx.execute("CREATE FUNCTION hijack.int4gt(integer, integer) RETURNS boolean LANGUAGE sql "
               "AS 'SELECT true'")
    tx.execute("CREATE DOMAIN hijack.text AS character varying(3)")
    tx.execute("CREATE DOMAIN hijack.date AS timestamp without time zone")
    tx.execute("SET LOCAL search_path = hijack, pg_catalog")
    # The hijack is real for unqualified SQL ...
    assert tx.execute("SELECT left('13812345678', 3)").fetchone() == ("13812345678",)
    # ... and changes nothing in the masks.
    after = [_eval(tx, e, t, v) for e, t, v in exprs]
    # format_type now qualifies the shadowed built-in names; the types themselves are unchanged.
    assert [(v, t.removeprefix("pg_catalog.")) for v, t in after] == before


# --------------------------------------------------------------------------------------------
# Live test of proxy.catalog


@pytest.mark.live
async def test_load_catalog(pg_dsn: str) -> None:
    import asyncpg

    from proxy.catalog import load_catalog

    c = await asyncpg.connect(pg_dsn)
    tr = c.transaction()
    await tr.start()
    try:
        await c.execute("""
            SET LOCAL check_function_bodies = off;
            CREATE SCHEMA catalog_test;
            CREATE VIEW catalog_test.v_customers AS SELECT id, phone FROM public.customers;
            CREATE VIEW catalog_test.v_nested AS SELECT * FROM catalog_test.v_customers;
            CREATE FUNCTION catalog_test.count_them() RETURNS bigint LANGUAGE plpgsql
                AS $$BEGIN RETURN (SELECT count(*) FROM Public."CUSTOMERS"); END$$;
            CREATE FUNCTION catalog_test.innocent() RETURNS text LANGUAGE sql
                AS $$SELECT 'mycustomers_table'$$;
        """)
        catalog, missing = await load_catalog(
            c, ["public.customers", "public.accounts", "public.no_such_table"])
    finally:
        await tr.rollback()
        await c.close()

    assert missing == ["public.no_such_table"]
    cols = catalog.tables["public.customers"]
    assert [col.name for col in cols] == [
        "id", "name", "phone", "id_number", "email", "address", "birthday", "branch_id",
        "level", "created_at"]
    types = {col.name: col.type_sql for col in cols}
    assert types["id"] == "integer" and types["phone"] == "text"
    assert types["birthday"] == "date" and types["created_at"] == "timestamp with time zone"
    assert {col.name: col.type_sql for col in catalog.tables["public.accounts"]}["balance"] == (
        "numeric(14,2)")
    assert {col.name: col.type_oid for col in cols}["birthday"] == 1082
    assert catalog.dependents["catalog_test.v_customers"] == ("public.customers",)
    assert catalog.dependents["catalog_test.v_nested"] == ("public.customers",)
    assert catalog.dependents["catalog_test.count_them"] == ("public.customers",)
    assert "catalog_test.innocent" not in catalog.dependents
    assert "public.customers" not in catalog.dependents
