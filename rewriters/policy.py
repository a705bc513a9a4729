"""policy.yaml: load, validate, resolve operators, and build each operator's view.

Data flow::

    policy.yaml --parse_policy--> Policy            (once per load / reload; pure)
    (login, client address, application_name) --Policy.resolve--> Operator
    (Policy, Operator, Catalog) --build_operator_view--> OperatorView   (once per connection)

Loading is three passes, all of which report *every* problem, each as ``file:line: key.path:
message`` (the line comes from PyYAML's composed node marks):

1. YAML: syntax errors and duplicate keys (PyYAML silently keeps the last duplicate, which would
   quietly drop a DBA's rule).
2. Shape: the pydantic models below (unknown keys are errors, masks are parsed by
   ``rewriters.masks.parse_mask``). The same models generate ``config/policy.schema.json``.
3. Meaning: roles and levels referenced exist, row filters / masks / reveals / lookups name
   protected tables, every ``{{attribute}}`` a role's filter uses is defined by every operator
   that maps to the role, and each filter — with the real attribute values substituted as SQL
   literals — parses as one PostgreSQL predicate (sqlglot) with no comment or ``;`` that could
   swallow the SQL the rewriter puts around it.

A reload that fails keeps the old policy (the caller swaps only on success): this module raises
:class:`PolicyError` and never returns a half-valid :class:`Policy`.

Nothing here does I/O except :func:`load_policy` reading the file; the catalog comes from
``proxy.catalog``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import stat
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import sqlglot
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    WrapValidator,
)
from pydantic_core import PydanticCustomError
from sqlglot import exp
from sqlglot.tokenizer_core import TokenType

from rewriters import masks
from rewriters.masks import MaskError, MaskSpec
from rewriters.model import (
    Catalog,
    CatalogColumn,
    ColumnView,
    Limits,
    OperatorView,
    TableView,
    Unbounded,
)

log = logging.getLogger("pgveil.policy")

DEFAULT_ROLE = "default"
DEFAULT_HASH_KEY_ENV = "PGVEIL_HASH_KEY"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "policy.schema.json"

_IDENT = r"[a-z_][a-z0-9_$]*"
_IDENT_RE = re.compile(rf"^{_IDENT}$")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_HOURS = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_PERIOD = re.compile(r"^(\d+)\s*([smhd])$")
_PERIOD_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PolicyError(Exception):
    """The policy is invalid; ``errors`` holds one ``file:line: key.path: message`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --------------------------------------------------------------------------------------------
# Pass 2: the shape of policy.yaml, as pydantic models (also the source of the JSON Schema)


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("policy", message)


def _one_message(message: str) -> WrapValidator:
    """Replace pydantic's one-error-per-union-branch noise with one readable message."""

    def wrap(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _fail(message) from None

    return WrapValidator(wrap)


def _mask_wrap(value: Any, handler: Any) -> MaskSpec:
    # masks.parse_mask gives better messages than the union, and its result is what we keep.
    del handler
    try:
        return masks.parse_mask(value)
    except MaskError as e:
        raise _fail(str(e)) from None


def _check_hours(value: str) -> str:
    m = _HOURS.match(value)
    if not m:
        raise _fail('hours must look like "08:00-20:00"')
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
        raise _fail(f"hours {value!r}: not a valid time of day")
    if (h1, m1) == (h2, m2):
        raise _fail(f"hours {value!r}: empty window (start equals end)")
    return value


def _check_timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _fail(f"unknown timezone {value!r} (use an IANA name like Asia/Shanghai)") from None
    return value


def _check_period(value: str | int) -> str | int:
    if isinstance(value, int):
        if value <= 0:
            raise _fail("quota period must be positive")
        return value
    if not _PERIOD.match(value.strip()) or period_seconds(value) <= 0:
        raise _fail('quota period must be like "30m", "1h", "1d" or a number of seconds')
    return value


def _check_cidr(value: str | list[str]) -> str | list[str]:
    for item in [value] if isinstance(value, str) else value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _fail(f"not a CIDR network: {item!r}") from None
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise _fail(f"not an environment variable name: {value!r}")
    return value


def _none_to_empty(value: Any) -> Any:
    return {} if value is None else value


MaskValue = Annotated[
    Union[
        Literal["phone", "chinese_name", "id_number", "bank_card", "email", "redact", "null",
                "hash"],
        None,
        "RedactMask",
        "KeepMask",
        "RoundMask",
        "TruncateMask",
        "SqlMask",
    ],
    WrapValidator(_mask_wrap),
    Field(description="a built-in mask name, YAML null (= the null mask), or a one-key mapping"),
]
AllowDeny = Annotated[Literal["allow", "deny"] | StrictBool,
                      _one_message("expected allow or deny")]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
AttrValue = StrictStr | StrictInt | StrictFloat | StrictBool


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedactMask(_Model):
    redact: StrictStr | None = Field("******", description="the constant shown instead")


class KeepMask(_Model):
    keep: tuple[NonNegInt, NonNegInt] = Field(description="[first, last] characters kept")


class RoundMask(_Model):
    round: StrictInt = Field(description="decimal digits; negative rounds to tens, thousands…")


class TruncateMask(_Model):
    truncate: Literal["year", "month"]


class SqlMask(_Model):
    sql: StrictStr = Field(description="an expression using {col}; qualify functions with "
                                       "pg_catalog.")


class ColumnModel(_Model):
    level: StrictInt = Field(description="sensitivity level (a key of `levels`)")
    mask: MaskValue = Field("redact", validate_default=True)


class TableModel(_Model):
    columns: Annotated[dict[StrictStr, ColumnModel], BeforeValidator(_none_to_empty)] = Field(
        default_factory=dict, description="sensitive columns; unlisted columns are shown raw")


class MatchModel(_Model):
    user: StrictStr | None = Field(None, description="glob on the login name")
    cidr: Annotated[StrictStr | list[StrictStr] | None, AfterValidator(
        lambda v: v if v is None else _check_cidr(v))] = Field(
        None, description="client address network(s)")
    application: StrictStr | None = Field(None, description="glob on application_name")


class OperatorModel(_Model):
    match: Annotated[MatchModel, BeforeValidator(_none_to_empty)]
    role: StrictStr
    attributes: Annotated[dict[StrictStr, AttrValue], BeforeValidator(_none_to_empty)] = Field(
        default_factory=dict, description="values for {{placeholders}} in row filters")


class QuotaModel(_Model):
    rows: NonNegInt
    per: Annotated[StrictStr | StrictInt, AfterValidator(_check_period)] = Field(
        description='window: "30m", "1h", "1d" or seconds')


class RoleModel(_Model):
    clearance: NonNegInt = Field(0, description="levels up to this are shown unmasked")
    reveal: list[StrictStr] = Field(default_factory=list,
                                    description="schema.table.column shown raw anyway")
    mask: Annotated[dict[StrictStr, MaskValue], BeforeValidator(_none_to_empty)] = Field(
        default_factory=dict, description="schema.table.column -> mask, replacing the default")
    lookup: list[StrictStr] = Field(default_factory=list,
                                    description="masked columns that may be matched exactly")
    lookup_max_values: PositiveInt = Field(
        10, description="values one lookup may present at once (col IN (...)); a longer list "
                        "is denied")
    row_filters: Annotated[
        dict[StrictStr, Annotated[StrictStr | StrictBool, _one_message(
            "a row filter is a SQL predicate string")]],
        BeforeValidator(_none_to_empty),
    ] = Field(default_factory=dict, description="schema.table -> SQL predicate")
    max_rows: Annotated[NonNegInt | Literal["unlimited"], _one_message(
        'max_rows is a non-negative integer or "unlimited"')] = "unlimited"
    quota: QuotaModel | None = None
    hours: Annotated[StrictStr, AfterValidator(_check_hours)] | None = None
    timezone: Annotated[StrictStr, AfterValidator(_check_timezone)] | None = None
    # "copy" would shadow BaseModel.copy: keep the YAML key through an alias.
    copy_: AllowDeny = Field("deny", alias="copy")
    unbounded: AllowDeny = "allow"
    ddl: AllowDeny = "deny"
    functions: AllowDeny | None = Field(
        None, description="may use views/functions that read protected tables; default: as ddl")
    allow_dependents: list[StrictStr] = Field(
        default_factory=list, description="views/functions reading protected tables that this "
                                          "role may use (vetted by the DBA)")
    listen_channels: list[StrictStr] = Field(
        default_factory=list, description="notification channels (names or glob patterns) "
                                          "this role may LISTEN to")


class PolicyModel(_Model):
    """pgveil policy: who may see which customer data, how, for how long, and how much."""

    model_config = ConfigDict(title="pgveil policy")

    version: Literal[1] = 1
    levels: Annotated[dict[StrictInt, StrictStr], BeforeValidator(_none_to_empty)] = Field(
        default_factory=lambda: {1: "identity", 2: "financial", 3: "secret"})
    protected: Annotated[dict[StrictStr, Annotated[TableModel, BeforeValidator(
        _none_to_empty)]], BeforeValidator(_none_to_empty)]
    operators: Annotated[list[OperatorModel], BeforeValidator(
        lambda v: [] if v is None else v)] = Field(default_factory=list)
    roles: Annotated[dict[StrictStr, Annotated[RoleModel, BeforeValidator(_none_to_empty)]],
                     BeforeValidator(_none_to_empty)]
    hours: Annotated[StrictStr, AfterValidator(_check_hours)] | None = None
    timezone: Annotated[StrictStr, AfterValidator(_check_timezone)] = "UTC"
    allow_dependents: list[StrictStr] = Field(default_factory=list)
    listen_channels: list[StrictStr] = Field(
        default_factory=list, description="notification channels (names or glob patterns) "
                                          "every role may LISTEN to; other sessions' NOTIFY "
                                          "payloads are not masked, so masked roles may LISTEN "
                                          "to no channel that is not listed")
    hash_key_env: Annotated[StrictStr, AfterValidator(_check_env_name)] = DEFAULT_HASH_KEY_ENV


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of policy.yaml (committed as config/policy.schema.json for editors)."""
    schema = PolicyModel.model_json_schema()
    # what the validators check on strings, where a pattern can say it too (editors then flag
    # it; `pgveil check` still says why, with the line)
    hours = {"type": "string", "pattern": r"^\d{2}:\d{2}-\d{2}:\d{2}$"}
    for props in (schema["properties"], schema["$defs"]["RoleModel"]["properties"]):
        props["hours"]["anyOf"] = [hours, {"type": "null"}]
    schema["$defs"]["QuotaModel"]["properties"]["per"]["anyOf"] = [
        {"type": "string", "pattern": r"^\s*\d+\s*[smhd]\s*$"},
        {"type": "integer", "minimum": 1}]
    schema["properties"]["levels"]["propertyNames"] = {"pattern": "^[0-9]+$"}
    ident = r"[A-Za-z_][A-Za-z0-9_$]*"
    schema["properties"]["protected"]["propertyNames"] = {"pattern": f"^({ident}\\.)?{ident}$"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --------------------------------------------------------------------------------------------
# The validated policy


@dataclass(frozen=True)
class ProtectedColumn:
    name: str
    level: int
    mask: MaskSpec
    source: str  # "file:line: key.path" of the mask, for errors found at build time


@dataclass(frozen=True)
class ProtectedTable:
    name: str  # schema.table, lower case
    columns: dict[str, ProtectedColumn]
    source: str = ""


@dataclass(frozen=True)
class MaskOverride:
    spec: MaskSpec
    source: str


@dataclass(frozen=True)
class RowFilter:
    template: str  # predicate with {{placeholders}}
    placeholders: frozenset[str]
    source: str


@dataclass(frozen=True)
class Role:
    """A role with every default of SPEC §4 filled in."""

    name: str
    source: str = ""
    clearance: int = 0
    reveal: frozenset[tuple[str, str]] = frozenset()
    masks: dict[tuple[str, str], MaskOverride] = field(default_factory=dict)
    lookup: frozenset[tuple[str, str]] = frozenset()
    lookup_max_values: int = 10
    row_filters: dict[str, RowFilter] = field(default_factory=dict)
    max_rows: int | None = None
    quota_rows: int | None = None
    quota_seconds: float | None = None
    hours: tuple[str, str] | None = None
    timezone: str | None = None
    copy: bool = False
    unbounded: Unbounded = Unbounded.ALLOW
    ddl: bool = False
    functions: bool = False
    allow_dependents: frozenset[str] = frozenset()
    listen: tuple[str, ...] = ()


@dataclass(frozen=True)
class OperatorRule:
    user: str | None
    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None
    application: str | None
    role: str
    attributes: dict[str, str | int | float | bool]

    def matches(self, login: str, client_addr: str | None, application: str | None) -> bool:
        if self.user is not None and not fnmatchcase(login, self.user):
            return False
        if self.cidrs is not None:
            addr = parse_client_address(client_addr)
            if addr is None or not any(addr.version == net.version and addr in net
                                       for net in self.cidrs):
                return False
        if self.application is not None and not fnmatchcase(application or "", self.application):
            return False
        return True


@dataclass(frozen=True)
class Operator:
    """Who is connected: the login, the role it resolved to, and its filter attributes.

    ``rule`` is the index of the matching ``operators`` entry, None for the ``default`` role.
    """

    login: str
    role: str
    attributes: dict[str, str | int | float | bool]
    rule: int | None = None


@dataclass(frozen=True, eq=False)
class Policy:
    filename: str
    version: str  # short content hash: goes into metrics and cache keys
    levels: dict[int, str]
    tables: dict[str, ProtectedTable]
    operators: tuple[OperatorRule, ...]
    roles: dict[str, Role]
    hours: tuple[str, str] | None
    timezone: str
    allow_dependents: frozenset[str]
    hash_key_env: str
    hash_key: bytes = field(repr=False)
    listen: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def protected_tables(self) -> frozenset[str]:
        return frozenset(self.tables)

    @property
    def sensitive_columns(self) -> dict[str, frozenset[str]]:
        """Each protected table's columns the policy lists (and may mask)."""
        return {name: frozenset(t.columns) for name, t in self.tables.items()}

    def resolve(self, login: str, client_addr: str | None,
                application: str | None) -> Operator | None:
        """The operator for a new connection: first matching rule, else role ``default``.

        None means the policy has no ``default`` role: the caller refuses the connection.
        """
        for i, rule in enumerate(self.operators):
            if rule.matches(login, client_addr, application):
                return Operator(login, rule.role, dict(rule.attributes), i)
        if DEFAULT_ROLE in self.roles:
            return Operator(login, DEFAULT_ROLE, {}, None)
        return None


def parse_client_address(addr: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse a client address ("10.1.2.3", "10.1.2.3:5123", "[::1]:5123", "::ffff:10.1.2.3").

    IPv4-mapped IPv6 addresses are unwrapped so a dual-stack listener still matches 10.0.0.0/8.
    None (a Unix-socket client) or garbage gives None, which no ``cidr`` matches.
    """
    if not addr:
        return None
    text = addr.strip()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else text[1:]
    candidates = [text]
    if text.count(":") == 1:
        candidates.append(text.rsplit(":", 1)[0])
    for cand in candidates:
        try:
            ip = ipaddress.ip_address(cand.split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip
    return None


def period_seconds(value: str | int | float) -> float:
    """ "30m" -> 1800.0, "1h" -> 3600.0, "1d" -> 86400.0, 90 -> 90.0."""
    if isinstance(value, (int, float)):
        return float(value)
    m = _PERIOD.match(value.strip())
    if not m:
        raise ValueError(f"bad period {value!r}")
    return float(int(m.group(1)) * _PERIOD_UNITS[m.group(2)])


def sql_literal(value: str | int | float | bool) -> str:
    """An attribute value as a SQL literal — never spliced text.

    >>> sql_literal("O'Brien"), sql_literal(42), sql_literal(-5), sql_literal(True)
    ("'O''Brien'", '42', '(-5)', 'TRUE')

    Negative numbers are parenthesised: ``x -{{n}}`` must not become the comment ``x --5``.
    """
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value) if value >= 0 else f"({value})"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("attribute value must be a finite number")
        return repr(value) if value >= 0 else f"({value!r})"
    return masks.quote_literal(value)


def render_row_filter(template: str, attributes: Mapping[str, str | int | float | bool]) -> str:
    """Substitute ``{{attr}}`` placeholders with SQL literals of the operator's attributes."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in attributes:
            raise KeyError(name)
        return sql_literal(attributes[name])

    return _PLACEHOLDER.sub(sub, template).strip()


def normalize_table(name: str) -> str:
    """``Customers`` -> ``public.customers``; ``crm.Clients`` -> ``crm.clients``."""
    parts = name.strip().lower().split(".")
    if len(parts) == 1:
        parts = ["public", *parts]
    if len(parts) != 2 or not all(_IDENT_RE.match(p) for p in parts):
        raise ValueError(f"not a table name: {name!r} (use schema.table, unquoted)")
    return ".".join(parts)


def normalize_column_path(path: str) -> tuple[str, str]:
    """``public.customers.phone`` (or ``customers.phone``) -> (``public.customers``, ``phone``)."""
    parts = path.strip().lower().split(".")
    if len(parts) not in (2, 3) or not all(_IDENT_RE.match(p) for p in parts):
        raise ValueError(f"not a column name: {path!r} (use schema.table.column)")
    return normalize_table(".".join(parts[:-1])), parts[-1]


# --------------------------------------------------------------------------------------------
# Pass 1: YAML with line numbers


def _load_yaml(text: str, filename: str) -> tuple[Any, dict[tuple[str, ...], int], list[str]]:
    """Parse YAML, returning the data, a map key path -> line, and duplicate-key errors."""
    loader = yaml.SafeLoader(text)
    lines: dict[tuple[str, ...], int] = {(): 1}
    errors: list[str] = []

    def walk(n: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in n.value:
                key = str(k.value)
                sub = (*path, key)
                if key in seen and key != "<<":
                    errors.append(f"{filename}:{k.start_mark.line + 1}: "
                                  f"{'.'.join(sub)}: duplicate key")
                seen.add(key)
                lines.setdefault(sub, k.start_mark.line + 1)
                walk(v, sub)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                sub = (*path, str(i))
                lines.setdefault(sub, item.start_mark.line + 1)
                walk(item, sub)

    try:
        node = loader.get_single_node()
        if node is not None:
            # before constructing: a merge key (<<: *anchor) is flattened into the mapping
            # node then, and a key set beside it would read as a duplicate
            walk(node, ())
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        problem = e.problem or e.context or "invalid YAML"
        if e.problem and e.context:
            where = f" at line {e.context_mark.line + 1}" if e.context_mark else ""
            problem += f" ({e.context}{where})"
        raise PolicyError([f"{filename}:{line}: yaml: {problem}"]) from None
    except yaml.YAMLError as e:
        raise PolicyError([f"{filename}:1: yaml: {e}"]) from None
    finally:
        loader.dispose()
    return data, lines, errors


class _Reporter:
    """Formats ``file:line: key.path: message`` from a key path, using the YAML line map."""

    def __init__(self, filename: str, lines: dict[tuple[str, ...], int]) -> None:
        self.filename = filename
        self.lines = lines
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def where(self, path: Iterable[object]) -> str:
        parts = tuple(str(p) for p in path)
        probe = parts
        while probe not in self.lines:
            probe = probe[:-1]
        return f"{self.filename}:{self.lines[probe]}: {'.'.join(parts) or '(top)'}"

    def error(self, path: Iterable[object], message: str) -> None:
        self.errors.append(f"{self.where(path)}: {message}")

    def warn(self, path: Iterable[object], message: str) -> None:
        self.warnings.append(f"{self.where(path)}: {message}")


def _pydantic_errors(exc: ValidationError, rep: _Reporter) -> None:
    for err in exc.errors():
        loc = [p for p in err["loc"] if p != "[key]"]
        is_key = "[key]" in err["loc"]
        kind = err["type"]
        if kind == "missing":
            msg = "required key is missing"
        elif kind == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"]
        rep.error(loc, ("bad key: " if is_key else "") + msg)


# --------------------------------------------------------------------------------------------
# Pass 3: meaning


def _check_predicate(sql: str) -> str | None:
    """None when ``sql`` is one PostgreSQL predicate safe to put inside ``WHERE (…)``."""
    try:
        tokens = sqlglot.tokenize(sql, read="postgres")
    except sqlglot.errors.SqlglotError as e:  # TokenError: an unterminated string or the like
        return f"cannot tokenize: {e}"
    depth = 0
    for tok in tokens:
        if tok.comments:
            return "comments are not allowed in a row filter"
        if tok.token_type is TokenType.SEMICOLON:
            return "a row filter is one predicate (no ';')"
        if tok.token_type is TokenType.L_PAREN:
            depth += 1
        elif tok.token_type is TokenType.R_PAREN:
            depth -= 1
            if depth < 0:
                return "unbalanced parentheses"
    if depth:
        return "unbalanced parentheses"
    if not tokens:
        return "empty predicate"
    try:
        stmts = sqlglot.parse(f"SELECT 1 WHERE ({sql})", read="postgres")
    except sqlglot.errors.ParseError as e:
        first = e.errors[0] if e.errors else {}
        return f"not a SQL predicate: {first.get('description') or e}"
    except RecursionError:
        return "not a SQL predicate: nested too deeply"
    if len(stmts) != 1 or not isinstance(stmts[0], exp.Select) or stmts[0].find(exp.Command):
        return "not a SQL predicate"
    return None


class _Builder:
    """Pass 3: turn the validated model into a :class:`Policy`, reporting meaning errors."""

    def __init__(self, model: PolicyModel, rep: _Reporter) -> None:
        self.model = model
        self.rep = rep
        self.levels = dict(model.levels)
        self.tables: dict[str, ProtectedTable] = {}
        self.operators: list[OperatorRule] = []
        self.users_of: dict[str, list[tuple[int, OperatorRule]]] = {}

    def build(self, text: str, filename: str, env: Mapping[str, str]) -> Policy:
        for lv in self.levels:
            if lv < 1:
                self.rep.error(("levels", lv), "levels are positive integers "
                               "(clearance 0 sees none)")
        self.build_tables()
        self.build_operators()  # before roles: placeholders are checked against operators
        roles = {name: self.build_role(name, rmodel) for name, rmodel in self.model.roles.items()}
        return Policy(
            filename=filename,
            version=hashlib.sha256(text.encode()).hexdigest()[:12],
            levels=self.levels,
            tables=self.tables,
            operators=tuple(self.operators),
            roles=roles,
            hours=_hours(self.model.hours),
            timezone=self.model.timezone,
            allow_dependents=self.dependents(("allow_dependents",), self.model.allow_dependents),
            listen=_channels(self.model.listen_channels),
            hash_key_env=self.model.hash_key_env,
            hash_key=self.hash_key(text, env, roles),
            warnings=tuple(self.rep.warnings),
        )

    def build_tables(self) -> None:
        rep = self.rep
        for raw_name, tmodel in self.model.protected.items():
            path = ("protected", raw_name)
            try:
                name = normalize_table(raw_name)
            except ValueError as e:
                rep.error(path, str(e))
                continue
            if name in self.tables:
                rep.error(path, f"{name} is listed twice")
                continue
            cols: dict[str, ProtectedColumn] = {}
            for raw_col, cmodel in tmodel.columns.items():
                cpath = (*path, "columns", raw_col)
                col = raw_col.strip().lower()
                if not _IDENT_RE.match(col):
                    rep.error(cpath, f"not a column name: {raw_col!r}")
                    continue
                if col in cols:
                    rep.error(cpath, f"column {col} is listed twice")
                    continue
                if cmodel.level not in self.levels:
                    known = ", ".join(str(k) for k in sorted(self.levels))
                    rep.error((*cpath, "level"), f"unknown level {cmodel.level} (levels: {known})")
                mask = cmodel.mask
                assert isinstance(mask, MaskSpec)
                if mask.kind is masks.MaskKind.SQL:
                    _check_sql_mask(mask, rep, (*cpath, "mask"))
                cols[col] = ProtectedColumn(col, cmodel.level, mask, rep.where((*cpath, "mask")))
            self.tables[name] = ProtectedTable(name, cols, rep.where(path))

    def build_operators(self) -> None:
        for i, omodel in enumerate(self.model.operators):
            opath = ("operators", i)
            if omodel.role not in self.model.roles:
                self.rep.error((*opath, "role"), f"unknown role {omodel.role!r}")
            for key, val in omodel.attributes.items():
                if isinstance(val, str) and "\x00" in val:
                    self.rep.error((*opath, "attributes", key), "attribute contains a NUL "
                                   "character")
                if isinstance(val, float) and not math.isfinite(val):
                    self.rep.error((*opath, "attributes", key), "attribute must be a finite "
                                   "number")
            cidr = omodel.match.cidr
            cidrs = None if cidr is None else tuple(
                ipaddress.ip_network(c, strict=False)
                for c in ([cidr] if isinstance(cidr, str) else cidr))
            rule = OperatorRule(omodel.match.user, cidrs, omodel.match.application, omodel.role,
                                dict(omodel.attributes))
            self.operators.append(rule)
            self.users_of.setdefault(omodel.role, []).append((i, rule))

    def column_ref(self, path: tuple[object, ...], ref: str, what: str) -> tuple[str, str] | None:
        try:
            table, col = normalize_column_path(ref)
        except ValueError as e:
            self.rep.error(path, str(e))
            return None
        if table not in self.tables:
            self.rep.error(path, f"{what} {ref!r}: table {table} is not in protected")
            return None
        return table, col

    def dependents(self, path: tuple[object, ...], names: list[str]) -> frozenset[str]:
        out: set[str] = set()
        for i, n in enumerate(names):
            try:
                out.add(normalize_table(n))
            except ValueError as e:
                self.rep.error((*path, i), str(e).replace("table", "view or function"))
        return frozenset(out)

    def build_role(self, rname: str, rmodel: RoleModel) -> Role:
        rpath = ("roles", rname)
        reveal = {got for i, ref in enumerate(rmodel.reveal)
                  if (got := self.column_ref((*rpath, "reveal", i), ref, "reveal"))}
        lookup = {got for i, ref in enumerate(rmodel.lookup)
                  if (got := self.column_ref((*rpath, "lookup", i), ref, "lookup"))}
        overrides: dict[tuple[str, str], MaskOverride] = {}
        for ref, spec in rmodel.mask.items():
            mpath = (*rpath, "mask", ref)
            got = self.column_ref(mpath, ref, "mask")
            if not got:
                continue
            assert isinstance(spec, MaskSpec)
            if got in reveal:
                self.rep.error(mpath, f"{ref} is both revealed and masked")
            if spec.kind is masks.MaskKind.SQL:
                _check_sql_mask(spec, self.rep, mpath)
            overrides[got] = MaskOverride(spec, self.rep.where(mpath))
        if rname not in self.users_of and rname != DEFAULT_ROLE:
            self.rep.warn(rpath, f"role {rname} is not used by any operator")
        quota_rows = quota_seconds = None
        if rmodel.quota is not None:
            quota_rows = rmodel.quota.rows
            quota_seconds = period_seconds(rmodel.quota.per)
        return Role(
            name=rname,
            source=self.rep.where(rpath),
            clearance=rmodel.clearance,
            reveal=frozenset(reveal),
            masks=overrides,
            lookup=frozenset(lookup),
            lookup_max_values=rmodel.lookup_max_values,
            row_filters=self.row_filters(rname, rmodel),
            max_rows=None if rmodel.max_rows == "unlimited" else int(rmodel.max_rows),
            quota_rows=quota_rows,
            quota_seconds=quota_seconds,
            hours=_hours(rmodel.hours),
            timezone=rmodel.timezone,
            copy=_allowed(rmodel.copy_),
            unbounded=Unbounded.ALLOW if _allowed(rmodel.unbounded) else Unbounded.DENY,
            ddl=_allowed(rmodel.ddl),
            functions=_allowed(rmodel.ddl if rmodel.functions is None else rmodel.functions),
            allow_dependents=self.dependents((*rpath, "allow_dependents"),
                                             rmodel.allow_dependents),
            listen=_channels(rmodel.listen_channels),
        )

    def row_filters(self, rname: str, rmodel: RoleModel) -> dict[str, RowFilter]:
        """Check each filter with the attributes of every operator that can hold the role."""
        holders: list[tuple[str, Mapping[str, Any]]] = [
            (f"operators[{i}] ({_describe(rule)})", rule.attributes)
            for i, rule in self.users_of.get(rname, [])
        ]
        if rname == DEFAULT_ROLE:
            holders.append(("logins matched by no operator (role default)", {}))
        filters: dict[str, RowFilter] = {}
        for raw_table, pred in rmodel.row_filters.items():
            fpath = ("roles", rname, "row_filters", raw_table)
            try:
                table = normalize_table(raw_table)
            except ValueError as e:
                self.rep.error(fpath, str(e))
                continue
            if table not in self.tables:
                self.rep.error(fpath, f"table {table} is not in protected")
                continue
            template = ("true" if pred else "false") if isinstance(pred, bool) else pred
            names = frozenset(_PLACEHOLDER.findall(template))
            rest = _PLACEHOLDER.sub("", template)
            if "{{" in rest or "}}" in rest:
                self.rep.error(fpath, "malformed placeholder (use {{attribute}})")
                continue
            # A role nobody holds is still checked, with a stand-in value for each placeholder.
            samples = holders or [("(unused role)", dict.fromkeys(names, "x"))]
            ok = True
            for who, attrs in samples:
                missing = sorted(n for n in names if n not in attrs)
                if missing:
                    shown = ", ".join("{{" + m + "}}" for m in missing)
                    self.rep.error(fpath, f"placeholder {shown} is not defined by {who}")
                    ok = False
                    continue
                problem = _check_predicate(render_row_filter(template, attrs))
                if problem:
                    self.rep.error(fpath, problem)
                    ok = False
                    break
            if ok:
                filters[table] = RowFilter(template.strip(), names, self.rep.where(fpath))
        return filters

    def hash_key(self, text: str, env: Mapping[str, str], roles: Mapping[str, Role]) -> bytes:
        env_name = self.model.hash_key_env
        key_text = env.get(env_name, "")
        if key_text:
            return key_text.encode()
        used = any(c.mask.kind is masks.MaskKind.HASH
                   for t in self.tables.values() for c in t.columns.values()) or any(
            o.spec.kind is masks.MaskKind.HASH for r in roles.values() for o in r.masks.values())
        if used:
            self.rep.warn(("hash_key_env",), f"${env_name} is not set: the hash mask key is "
                          "derived from the policy text, so anyone who can read the policy can "
                          "test guesses against hashed values, and hashes change when it is "
                          "edited")
        return hashlib.sha256(b"pgveil hash mask key\x00" + text.encode()).digest()


def _check_sql_mask(spec: MaskSpec, rep: _Reporter, path: tuple[object, ...]) -> None:
    expr = (spec.template or "").replace("{col}", '"col"')
    try:
        tokens = sqlglot.tokenize(expr, read="postgres")
        if any(t.comments for t in tokens):
            rep.error(path, "comments are not allowed in a sql mask")
            return
        parsed = sqlglot.parse(f"SELECT ({expr}) FROM t", read="postgres")
    except (sqlglot.errors.ParseError, RecursionError):
        rep.error(path, "sql mask is not a SQL expression")
        return
    except sqlglot.errors.SqlglotError as e:  # TokenError
        rep.error(path, f"sql mask cannot be tokenized: {e}")
        return
    if len(parsed) != 1 or not isinstance(parsed[0], exp.Select):
        rep.error(path, "sql mask is not a single SQL expression")


def _describe(rule: OperatorRule) -> str:
    parts = []
    if rule.user is not None:
        parts.append(f"user {rule.user!r}")
    if rule.cidrs is not None:
        parts.append("cidr " + ",".join(str(c) for c in rule.cidrs))
    if rule.application is not None:
        parts.append(f"application {rule.application!r}")
    return "match " + (" ".join(parts) or "anything")


def _allowed(value: str | bool) -> bool:
    return value is True or value == "allow"


def _hours(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    start, end = value.split("-")
    return start, end


def parse_policy(text: str, filename: str = "policy.yaml",
                 env: Mapping[str, str] | None = None) -> Policy:
    """Validate policy text; raise :class:`PolicyError` listing every problem.

    ``env`` (default ``os.environ``) supplies the hash-mask key named by ``hash_key_env``.
    """
    data, lines, yaml_errors = _load_yaml(text, filename)
    rep = _Reporter(filename, lines)
    rep.errors.extend(yaml_errors)
    if data is None:
        raise PolicyError([f"{filename}:1: (top): the policy is empty"])
    if not isinstance(data, dict):
        raise PolicyError([f"{filename}:1: (top): the policy must be a mapping"])
    try:
        model = PolicyModel.model_validate(data)
    except ValidationError as e:
        _pydantic_errors(e, rep)
        raise PolicyError(rep.errors) from None
    policy = _Builder(model, rep).build(text, filename, os.environ if env is None else env)
    if rep.errors:
        raise PolicyError(rep.errors)
    for w in policy.warnings:
        log.warning("%s", w)
    return policy


MAX_POLICY_BYTES = 16 << 20


def load_policy(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Policy:
    """Read and validate a policy file (see :func:`parse_policy`).

    Only a regular file is read, opened without blocking and at most MAX_POLICY_BYTES: the
    proxy reloads on its event loop, where a FIFO or ``/dev/zero`` put in the policy's place
    would hang or fill every session's process."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise OSError("not a regular file")
            data = fh.read(MAX_POLICY_BYTES + 1)
        if len(data) > MAX_POLICY_BYTES:
            raise OSError(f"larger than {MAX_POLICY_BYTES} bytes")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError([f"{p}:1: (top): cannot read policy: {e}"]) from None
    return parse_policy(text, str(p), env)


# --------------------------------------------------------------------------------------------
# Per-operator view


def _column_plan(policy: Policy, role: Role, table: str,
                 col: str) -> tuple[MaskSpec | None, str]:
    """The mask to apply (None = raw) and where it came from in the policy.

    Policy names are lower case; a column created quoted with capitals ("Phone") still gets
    the rule for ``phone`` rather than slipping through unmasked.
    """
    col = col.lower()
    override = role.masks.get((table, col))
    if override is not None:
        return override.spec, override.source
    if (table, col) in role.reveal:
        return None, ""
    listed = policy.tables[table].columns.get(col)
    if listed is not None and listed.level > role.clearance:
        return listed.mask, listed.source
    return None, ""


def _table_columns(policy: Policy, table: str,
                   catalog: Catalog) -> tuple[tuple[CatalogColumn, ...], bool]:
    cols = catalog.tables.get(table)
    if cols is not None:
        return cols, True
    # Not in the database (yet): fall back to the policy's list. Queries on the table fail in
    # PostgreSQL anyway; the types are a guess (see _guessed_type) and never reach a client.
    return tuple(CatalogColumn(c, "text") for c in policy.tables[table].columns), False


def _guessed_type(spec: MaskSpec) -> str:
    """A type the mask applies to, for a column of a table the database does not have.

    The fallback columns are typed ``text``; a ``truncate`` or ``round`` mask on one would be
    refused as a type error, and with it every connection to a database without the table (a
    teller's health check against ``postgres``, say). Any query on the table fails in
    PostgreSQL, so the guess only has to let the mask build.
    """
    if spec.kind is masks.MaskKind.TRUNCATE:
        return "timestamp without time zone"
    if spec.kind is masks.MaskKind.ROUND:
        return "numeric"
    return "text"


def build_operator_view(policy: Policy, operator: Operator, catalog: Catalog) -> OperatorView:
    """How every protected table looks to this operator (resolved once per connection).

    Raises :class:`PolicyError` when a mask cannot apply to the column's real type (``phone``
    on a date, ``hash`` on a number): the connection is refused rather than shown raw data.
    """
    role = policy.roles.get(operator.role)
    if role is None:
        raise PolicyError([f"{policy.filename}:1: roles: operator {operator.login!r} has "
                           f"unknown role {operator.role!r}"])
    errors: list[str] = []
    views: dict[str, TableView] = {}
    for name in policy.tables:
        columns, in_catalog = _table_columns(policy, name, catalog)
        if not in_catalog:
            log.warning("protected table %s is not in the database catalog; using the columns "
                        "listed in %s", name, policy.filename)
        present = {c.name.lower() for c in columns}
        refused = None
        listed = [*policy.tables[name].columns, *(c for t, c in role.masks if t == name)]
        for col in dict.fromkeys(listed):
            if in_catalog and col not in present:
                log.warning("%s.%s is listed in %s but not in the database", name, col,
                            policy.filename)
                spec, source = _column_plan(policy, role, name, col)
                if spec is not None and refused is None:
                    # renamed or dropped: whatever holds its values now is not masked
                    refused = (f"the policy masks {name}.{col} ({source}) for role "
                               f"{role.name}, but the table has no such column (renamed or "
                               f"dropped?): {name} is refused until the policy names its "
                               "columns again")
        out: list[ColumnView] = []
        for c in columns:
            spec, source = _column_plan(policy, role, name, c.name)
            lookup = (name, c.name.lower()) in role.lookup
            if spec is None:
                out.append(ColumnView(c.name, c.type_sql, None, None, lookup,
                                      unique=c.unique, references=c.references))
                continue
            if not in_catalog:
                c = CatalogColumn(c.name, _guessed_type(spec))
            try:
                expr = masks.mask_expression(spec, c, hmac_key=policy.hash_key)
            except MaskError as e:
                errors.append(f"{source}: {name}.{c.name}: {e}")
                continue
            out.append(ColumnView(c.name, c.type_sql, expr, spec.name, lookup,
                                  unique=c.unique, references=c.references))
        row_filter = None
        rf = role.row_filters.get(name)
        if rf is not None:
            try:
                row_filter = render_row_filter(rf.template, operator.attributes)
            except KeyError as e:
                errors.append(f"{rf.source}: operator {operator.login!r} has no attribute "
                              f"{e.args[0]!r}")
        views[name] = TableView(name, tuple(out), row_filter, refused)
    if errors:
        raise PolicyError(errors)
    limits = Limits(
        max_rows=role.max_rows,
        quota_rows=role.quota_rows,
        quota_seconds=role.quota_seconds,
        hours=role.hours if role.hours is not None else policy.hours,
        timezone=role.timezone or policy.timezone,
        copy=role.copy,
        unbounded=role.unbounded,
        ddl=role.ddl,
        functions=role.functions,
        listen=tuple(dict.fromkeys(policy.listen + role.listen)),
        lookup_max_values=role.lookup_max_values,
    )
    return OperatorView(
        login=operator.login,
        role=role.name,
        attributes={k: _attr_text(v) for k, v in operator.attributes.items()},
        tables=views,
        limits=limits,
        unrestricted=not any(v.masked for v in views.values()),
        policy_version=policy.version,
        allowed_dependents=policy.allow_dependents | role.allow_dependents,
        dependents=dict(catalog.dependents),
        write_hooks=dict(catalog.write_hooks),
    )


def _null_column(c: CatalogColumn) -> ColumnView:
    spec = masks.parse_mask("null")
    return ColumnView(c.name, c.type_sql, masks.mask_expression(spec, c, hmac_key=b""),
                      spec.name)


def revoked_view(policy: Policy, login: str, catalog: Catalog) -> OperatorView:
    """The view of an open session whose login no operator matches any more (and the policy
    has no ``default`` role): every statement that names a protected table or a view or
    function reading one is refused; the connection itself stays up."""
    why = (f"login {login!r} is no longer matched by any operator of the policy "
           f"({policy.filename}): its statements on customer data are refused")
    tables = {
        name: TableView(name, tuple(_null_column(c)
                                    for c in _table_columns(policy, name, catalog)[0]),
                        "false", why)
        for name in policy.tables
    }
    return OperatorView(
        login=login, role="(revoked)", attributes={}, tables=tables, revoked=True,
        limits=Limits(max_rows=0, unbounded=Unbounded.DENY),
        unrestricted=False, policy_version=policy.version,
        allowed_dependents=frozenset(), dependents=dict(catalog.dependents),
        write_hooks=dict(catalog.write_hooks),
    )


def _channels(names: list[str]) -> tuple[str, ...]:
    """LISTEN channel names or glob patterns, compared with the name as PostgreSQL stores it
    (``LISTEN Cache`` is ``cache``; ``LISTEN "Cache"`` is ``Cache``)."""
    return tuple(dict.fromkeys(n.strip() for n in names if n.strip()))


def _attr_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def validate_against_catalog(policy: Policy, catalog: Catalog) -> list[str]:
    """Problems between the policy and a live database, for ``pgveil check``.

    Protected tables or listed columns that do not exist, role overrides naming missing
    columns, and masks that cannot apply to a column's real type (for every role).
    """
    problems: list[str] = []
    for name, table in policy.tables.items():
        cols = catalog.tables.get(name)
        if cols is None:
            problems.append(f"{table.source}: table {name} not found in the database")
            continue
        by_name = {c.name.lower(): c for c in cols}
        for col in table.columns.values():
            real = by_name.get(col.name)
            if real is None:
                problems.append(f"{col.source}: column {name}.{col.name} not found in the "
                                f"database{_refused_to(policy, name, col.name)}")
                continue
            try:
                masks.mask_expression(col.mask, real, hmac_key=policy.hash_key)
            except MaskError as e:
                problems.append(f"{col.source}: {e}")
        for role in policy.roles.values():
            for t, c in (*role.reveal, *role.lookup, *role.masks):
                if t == name and c not in by_name:
                    problems.append(f"{role.source}: column {t}.{c} not found in the database"
                                    f"{_refused_to(policy, t, c)}")
            for (t, c), override in role.masks.items():
                if t == name and c in by_name:
                    try:
                        masks.mask_expression(override.spec, by_name[c],
                                              hmac_key=policy.hash_key)
                    except MaskError as e:
                        problems.append(f"{override.source}: {e}")
    return sorted(set(problems))


def _refused_to(policy: Policy, table: str, column: str) -> str:
    """What ``serve`` does about a column the policy names but the table lacks: the roles that
    mask it are refused the whole table (build_operator_view), since whatever holds its values
    now (a rename) would be shown unmasked."""
    roles = [r.name for r in policy.roles.values()
             if _column_plan(policy, r, table, column)[0] is not None]
    if not roles:
        return ""
    return (f"; pgveil serve refuses {table} to role(s) {', '.join(sorted(roles))} until the "
            "policy names its columns again (renamed or dropped?)")


def write_policy_schema(path: str | os.PathLike[str] = SCHEMA_PATH) -> None:
    """Regenerate config/policy.schema.json from the models."""
    Path(path).write_text(json.dumps(policy_json_schema(), indent=2, ensure_ascii=False) + "\n",
                          encoding="utf-8")


if __name__ == "__main__":  # python -m rewriters.policy  -> regenerate the JSON Schema
    write_policy_schema()
