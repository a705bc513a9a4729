"""Built-in maskers: turn a policy ``mask`` into a SQL expression over the raw column.

Data flow: ``rewriters.policy`` parses each ``mask:`` value of policy.yaml with
:func:`parse_mask` into a :class:`MaskSpec` (so a typo is a load-time error with a line number);
when it builds an operator's view it calls :func:`mask_expression` with the column as the
catalog has it, and the rewriter substitutes that expression for the column inside the subquery
that replaces the protected table (``SELECT …, <expr> AS "phone", … FROM customers WHERE …``).

Every generated expression obeys three rules, because it runs with the *operator's* session
settings and inside statements the operator wrote:

* **Exact type.** It returns the column's own type (``CatalogColumn.type_sql``), cast back when
  the natural type differs, so RowDescription keeps the same type OID and binary clients keep
  decoding. Type names that PostgreSQL looks up through ``search_path`` are ``pg_catalog``-qualified.
* **NULL stays NULL.** A mask never turns a NULL into a value (and vice versa for redact).
* **No hijackable names.** Only ``pg_catalog.``-qualified functions, no operators at all
  (``pg_catalog.textcat`` instead of ``||``, ``pg_catalog.int4gt`` instead of ``>``), because an
  operator with ``SET search_path = public, pg_catalog`` and a ``public.left(text, int)`` would
  otherwise run the attacker's function on the raw value. CASE, IS NULL, AND and casts to
  grammar-keyword or qualified types are resolved without ``search_path``. String literals never
  contain a backslash unless written as ``E'…'``, so ``standard_conforming_strings`` cannot
  change how they read.

Example: ``bank_card`` on a ``text`` column ``card_no`` gives::

    CASE WHEN "card_no" IS NULL THEN NULL
         WHEN pg_catalog.int4gt(pg_catalog.char_length("card_no"), 4)
         THEN pg_catalog.textcat(pg_catalog.repeat('*', pg_catalog.int4mi(
                  pg_catalog.char_length("card_no"), 4)), pg_catalog.right("card_no", 4))
         ELSE pg_catalog.repeat('*', pg_catalog.char_length("card_no")) END
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from rewriters.model import CatalogColumn

DEFAULT_REDACTION = "******"
HMAC_BLOCK = 64  # SHA-256 block size in bytes


class MaskError(ValueError):
    """A mask that cannot be parsed, or cannot apply to the column's type."""


class MaskKind(enum.Enum):
    PHONE = "phone"
    CHINESE_NAME = "chinese_name"
    ID_NUMBER = "id_number"
    BANK_CARD = "bank_card"
    EMAIL = "email"
    REDACT = "redact"
    NULL = "null"
    HASH = "hash"
    KEEP = "keep"
    ROUND = "round"
    TRUNCATE = "truncate"
    SQL = "sql"


# Masks written as a bare name in policy.yaml.
SIMPLE_MASKS: tuple[str, ...] = (
    "phone", "chinese_name", "id_number", "bank_card", "email", "redact", "null", "hash",
)
# Masks written as a one-key mapping: {keep: [3, 4]}, {round: -3}, ...
PARAM_MASKS: tuple[str, ...] = ("redact", "keep", "round", "truncate", "sql")
TRUNCATE_UNITS: tuple[str, ...] = ("year", "month")


@dataclass(frozen=True)
class MaskSpec:
    """A validated mask from the policy, independent of any column.

    Only the field that belongs to ``kind`` is set: ``constant`` for redact, ``keep`` for the
    keep-style masks, ``digits`` for round, ``unit`` for truncate, ``template`` for sql.
    """

    kind: MaskKind
    constant: str | None = None
    keep: tuple[int, int] | None = None
    digits: int | None = None
    unit: str | None = None
    template: str | None = None

    @property
    def name(self) -> str:
        return self.kind.value


# The named text masks are "keep the first F and the last L characters" with fixed F, L.
_KEEP_SHAPES: dict[MaskKind, tuple[int, int]] = {
    MaskKind.PHONE: (3, 4),  # 13812345678 -> 138****5678 (length >= 8)
    MaskKind.CHINESE_NAME: (1, 0),  # 欧阳娜娜 -> 欧***
    MaskKind.ID_NUMBER: (6, 4),  # 440304********1234
    MaskKind.BANK_CARD: (0, 4),  # ************8162
}


def parse_mask(value: object) -> MaskSpec:
    """Validate one ``mask:`` value of policy.yaml (YAML ``null`` means the ``null`` mask).

    >>> parse_mask({"round": -3})
    MaskSpec(kind=<MaskKind.ROUND: 'round'>, constant=None, keep=None, digits=-3, unit=None, template=None)
    """
    if value is None:
        return MaskSpec(MaskKind.NULL)
    if isinstance(value, str):
        if value not in SIMPLE_MASKS:
            raise MaskError(
                f"unknown mask {value!r}; expected one of {', '.join(SIMPLE_MASKS)}, "
                "or {keep: [first, last]}, {round: N}, {truncate: year|month}, "
                "{redact: \"text\"}, {sql: \"... {col} ...\"}"
            )
        if value == "redact":
            return MaskSpec(MaskKind.REDACT, constant=DEFAULT_REDACTION)
        return MaskSpec(MaskKind(value))
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise MaskError(f"a mask mapping has exactly one key ({', '.join(PARAM_MASKS)})")
        ((key, arg),) = value.items()
        if key == "redact":
            if arg is None:
                return MaskSpec(MaskKind.REDACT, constant=DEFAULT_REDACTION)
            if not isinstance(arg, str):
                raise MaskError("redact takes a string constant, e.g. {redact: \"******\"}")
            if "\x00" in arg:
                raise MaskError("redact constant may not contain a NUL character")
            return MaskSpec(MaskKind.REDACT, constant=arg)
        if key == "keep":
            if (
                not isinstance(arg, (list, tuple))
                or len(arg) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in arg)
                or any(n < 0 for n in arg)
            ):
                raise MaskError("keep takes two non-negative integers: {keep: [first, last]}")
            return MaskSpec(MaskKind.KEEP, keep=(int(arg[0]), int(arg[1])))
        if key == "round":
            if not isinstance(arg, int) or isinstance(arg, bool) or not -1000 <= arg <= 1000:
                raise MaskError("round takes an integer number of decimal digits, e.g. {round: -3}")
            return MaskSpec(MaskKind.ROUND, digits=arg)
        if key == "truncate":
            if arg not in TRUNCATE_UNITS:
                raise MaskError("truncate takes year or month, e.g. {truncate: year}")
            return MaskSpec(MaskKind.TRUNCATE, unit=str(arg))
        if key == "sql":
            if not isinstance(arg, str) or "{col}" not in arg:
                raise MaskError("sql takes an expression that uses {col}, e.g. "
                                "{sql: \"pg_catalog.md5({col})\"}")
            if "\x00" in arg or ";" in arg:
                raise MaskError("sql mask must be a single expression (no ';')")
            return MaskSpec(MaskKind.SQL, template=arg)
        raise MaskError(f"unknown mask {key!r}; parameterised masks are {', '.join(PARAM_MASKS)}")
    raise MaskError("a mask is a name (phone, email, ...) or a one-key mapping ({round: -3})")


# --------------------------------------------------------------------------------------------
# Types


class TypeFamily(enum.Enum):
    TEXT = "text"
    INTEGER = "integer"
    NUMERIC = "numeric"
    FLOAT = "float"
    DATE = "date"
    TIMESTAMP = "timestamp"
    OTHER = "other"


_TEXT_BASES = ("text", "character varying", "varchar", "character", "char", "bpchar", "name",
               "citext")
_INTEGER_BASES = ("smallint", "integer", "bigint", "int2", "int4", "int8", "int")
_FLOAT_BASES = ("real", "double precision", "float4", "float8")

# Types whose names PostgreSQL's grammar maps to pg_catalog itself (SystemTypeName): casting to
# them never consults search_path. Everything else is looked up by name, so we qualify it.
_KEYWORD_TYPE = re.compile(
    r"^(character varying|character|varchar|char|national character|numeric|decimal|dec|"
    r"integer|int|smallint|bigint|real|double precision|float|boolean|bool|"
    r"timestamp|time|interval|bit varying|bit)\b"
)
_PG_CATALOG_NAMES = frozenset({
    "text", "date", "name", "bpchar", "bytea", "uuid", "json", "jsonb", "inet", "cidr",
    "macaddr", "money", "xml", "oid", "int2", "int4", "int8", "float4", "float8", "timestamptz",
    "timetz", "tsvector", "tsquery",
})
_SIMPLE_TYPE = re.compile(r"^([a-z_][a-z0-9_]*)(\([0-9, ]*\))?((?:\[\])*)$")


def type_family(type_sql: str) -> TypeFamily:
    """Classify a ``format_type`` string (arrays and unknown/user types are OTHER)."""
    t = type_sql.strip().lower()
    if t.startswith("pg_catalog."):
        t = t[len("pg_catalog."):]
    if t.endswith("]"):
        return TypeFamily.OTHER
    base = re.sub(r"\(.*\)", "", t).strip()
    if base in _TEXT_BASES:
        return TypeFamily.TEXT
    if base in _INTEGER_BASES:
        return TypeFamily.INTEGER
    if base in ("numeric", "decimal"):
        return TypeFamily.NUMERIC
    if base in _FLOAT_BASES:
        return TypeFamily.FLOAT
    if base == "date":
        return TypeFamily.DATE
    if base.startswith("timestamp"):
        return TypeFamily.TIMESTAMP
    return TypeFamily.OTHER


def qualified_type(type_sql: str) -> str:
    """The type name to cast to, safe from ``search_path`` (``text`` -> ``pg_catalog.text``)."""
    t = type_sql.strip()
    low = t.lower()
    if _KEYWORD_TYPE.match(low) or "." in t or t.startswith('"'):
        return t
    m = _SIMPLE_TYPE.match(low)
    if m and m.group(1) in _PG_CATALOG_NAMES:
        return "pg_catalog." + t
    return t


def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL reads it back (always quoted: case is kept)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A string literal that reads the same under any ``standard_conforming_strings``.

    >>> quote_literal("O'Brien")
    "'O''Brien'"
    >>> quote_literal("a\\\\b")
    "E'a\\\\\\\\b'"
    """
    if "\x00" in text:
        raise MaskError("a SQL string cannot contain a NUL character")
    body = text.replace("'", "''")
    if "\\" in body:
        return "E'" + body.replace("\\", "\\\\") + "'"
    return "'" + body + "'"


# --------------------------------------------------------------------------------------------
# Expressions


_INTEGER_MAX = {"smallint": 32767, "int2": 32767, "integer": 2**31 - 1, "int4": 2**31 - 1,
                "int": 2**31 - 1, "bigint": 2**63 - 1, "int8": 2**63 - 1}


def _largest(type_sql: str, family: TypeFamily) -> Decimal | None:
    """The largest magnitude a value of an integer or ``numeric(p[,s])`` type may have (the
    negative end of an integer type is one further; not used), None when unbounded."""
    t = type_sql.strip().lower()
    if family is TypeFamily.INTEGER:
        limit = _INTEGER_MAX.get(t)
        return Decimal(limit) if limit is not None else None
    m = re.fullmatch(r"(?:numeric|decimal)\s*\(\s*(\d+)\s*(?:,\s*(-?\d+)\s*)?\)", t)
    if family is not TypeFamily.NUMERIC or m is None:
        return None
    precision, scale = int(m.group(1)), int(m.group(2) or 0)
    nines = "9" * precision  # 10^(precision-scale) - 10^-scale, written out (no rounding)
    if scale <= 0:
        return Decimal(nines + "0" * -scale)
    if scale >= precision:
        return Decimal("0." + "0" * (scale - precision) + nines)
    return Decimal(nines[:precision - scale] + "." + nines[precision - scale:])


def _cast(expr: str, natural: str, column: CatalogColumn) -> str:
    """Cast back to the column's exact type unless the expression already has it."""
    if column.type_sql.strip().lower() == natural:
        return expr
    return f"CAST({expr} AS {qualified_type(column.type_sql)})"


def _concat(parts: list[str]) -> str:
    expr = parts[0]
    for part in parts[1:]:
        expr = f"pg_catalog.textcat({expr}, {part})"
    return expr


def _keep_expr(col: str, first: int, last: int) -> str:
    """Keep ``first`` leading and ``last`` trailing characters; stars everywhere else.

    A value too short to hide at least one character becomes all stars, so a short phone
    number is never shown whole.
    """
    n = f"pg_catalog.char_length({col})"
    total = first + last
    parts: list[str] = []
    if first:
        parts.append(f"pg_catalog.left({col}, {first})")
    parts.append(f"pg_catalog.repeat('*', pg_catalog.int4mi({n}, {total}))")
    if last:
        parts.append(f"pg_catalog.right({col}, {last})")
    return (
        f"CASE WHEN {col} IS NULL THEN NULL "
        f"WHEN pg_catalog.int4gt({n}, {total}) THEN {_concat(parts)} "
        f"ELSE pg_catalog.repeat('*', {n}) END"
    )


def _email_expr(col: str) -> str:
    """user1@example.com -> u***@example.com; the domain starts at the *last* '@'."""
    at = f"pg_catalog.strpos(pg_catalog.reverse({col}), '@')"  # position of the last '@' from the end
    n = f"pg_catalog.char_length({col})"
    shown = _concat([f"pg_catalog.left({col}, 1)", "'***'", f"pg_catalog.right({col}, {at})"])
    return (
        f"CASE WHEN {col} IS NULL THEN NULL "
        f"WHEN pg_catalog.int4gt({at}, 0) AND pg_catalog.int4lt({at}, {n}) THEN {shown} "
        f"ELSE '***' END"
    )


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """The HMAC-SHA256 inner and outer padded keys (RFC 2104)."""
    if len(key) > HMAC_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(HMAC_BLOCK, b"\x00")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def _hash_expr(col: str, key: bytes) -> str:
    """Hex HMAC-SHA256 of the UTF-8 value, in SQL with built-ins only (no pgcrypto).

    ``decode('<hex>', 'hex')`` rather than a ``'\\x…'`` bytea literal, which would read
    differently under ``standard_conforming_strings = off``.
    """
    ipad, opad = hmac_pads(key)
    inner = (
        f"pg_catalog.sha256(pg_catalog.byteacat(pg_catalog.decode('{ipad.hex()}', 'hex'), "
        f"pg_catalog.convert_to({col}, 'UTF8')))"
    )
    outer = f"pg_catalog.sha256(pg_catalog.byteacat(pg_catalog.decode('{opad.hex()}', 'hex'), {inner}))"
    return f"CASE WHEN {col} IS NULL THEN NULL ELSE pg_catalog.encode({outer}, 'hex') END"


def _need(family: TypeFamily, allowed: tuple[TypeFamily, ...], spec: MaskSpec,
          column: CatalogColumn, what: str) -> None:
    if family not in allowed:
        raise MaskError(
            f"mask {spec.name} needs {what} column, but {column.name} is {column.type_sql}"
        )


def mask_expression(spec: MaskSpec | str | Mapping[str, object] | None, column: CatalogColumn,
                    *, hmac_key: bytes) -> str:
    """A SQL expression over the quoted raw column that shows it masked, in its own type.

    Raises :class:`MaskError` when the mask makes no sense for the column's type (``phone`` on
    a date, ``hash`` on a number): the policy is then refused at build time, never applied
    half-way.
    """
    if not isinstance(spec, MaskSpec):
        spec = parse_mask(spec)
    col = quote_ident(column.name)
    family = type_family(column.type_sql)
    kind = spec.kind
    text_only = (TypeFamily.TEXT,)

    if kind in _KEEP_SHAPES or kind is MaskKind.KEEP:
        _need(family, text_only, spec, column, "a text")
        first, last = spec.keep if kind is MaskKind.KEEP and spec.keep else _KEEP_SHAPES[kind]
        return _cast(_keep_expr(col, first, last), "text", column)
    if kind is MaskKind.EMAIL:
        _need(family, text_only, spec, column, "a text")
        return _cast(_email_expr(col), "text", column)
    if kind is MaskKind.HASH:
        _need(family, text_only, spec, column, "a text")
        return _cast(_hash_expr(col, hmac_key), "text", column)
    if kind is MaskKind.REDACT:
        if family is TypeFamily.TEXT:
            constant = quote_literal(spec.constant if spec.constant is not None
                                     else DEFAULT_REDACTION)
            return _cast(f"CASE WHEN {col} IS NULL THEN NULL ELSE {constant} END", "text", column)
        return f"CAST(NULL AS {qualified_type(column.type_sql)})"
    if kind is MaskKind.NULL:
        return f"CAST(NULL AS {qualified_type(column.type_sql)})"
    if kind is MaskKind.ROUND:
        _need(family, (TypeFamily.NUMERIC, TypeFamily.INTEGER, TypeFamily.FLOAT), spec, column,
              "a numeric")
        digits = spec.digits or 0
        arg = col if family is TypeFamily.NUMERIC else f"CAST({col} AS numeric)"
        rounded = f"pg_catalog.round({arg}, {digits})"
        bound = _largest(column.type_sql, family)
        if bound is not None:  # rounding up may not fit (99999.99 in numeric(7,2) with round 0):
            # such a value is truncated towards zero instead, which never grows it
            rounded = (f"CASE WHEN pg_catalog.numeric_le(pg_catalog.abs({rounded}), "
                       f"CAST('{bound}' AS numeric)) THEN {rounded} "
                       f"ELSE pg_catalog.trunc({arg}, {digits}) END")
        return _cast(rounded, "numeric", column)
    if kind is MaskKind.TRUNCATE:
        _need(family, (TypeFamily.DATE, TypeFamily.TIMESTAMP), spec, column, "a date or timestamp")
        unit = quote_literal(spec.unit or "year")
        if family is TypeFamily.DATE:
            # Through timestamp WITHOUT time zone so the session TimeZone cannot shift the day.
            expr = f"pg_catalog.date_trunc({unit}, CAST({col} AS timestamp without time zone))"
            return f"CAST({expr} AS pg_catalog.date)"
        natural = column.type_sql.strip().lower()
        natural = natural if natural in ("timestamp without time zone",
                                         "timestamp with time zone") else "?"
        return _cast(f"pg_catalog.date_trunc({unit}, {col})", natural, column)
    if kind is MaskKind.SQL:
        template = spec.template or ""
        return f"CAST(({template.replace('{col}', col)}) AS {qualified_type(column.type_sql)})"
    raise MaskError(f"unsupported mask {spec.name}")  # pragma: no cover - enum is exhaustive
