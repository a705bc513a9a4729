"""policy.yaml: loading, error reporting, operator resolution and per-operator views (pure)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from rewriters.masks import hmac_pads
from rewriters.model import Catalog, CatalogColumn, OperatorView, Unbounded
from rewriters.policy import (
    Operator,
    Policy,
    PolicyError,
    build_operator_view,
    load_policy,
    normalize_column_path,
    normalize_table,
    parse_client_address,
    parse_policy,
    period_seconds,
    policy_json_schema,
    render_row_filter,
    sql_literal,
    validate_against_catalog,
)
from tests.rewriters.helpers import ROUND_BALANCE

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "config" / "policy.yaml"
SCHEMA = ROOT / "config" / "policy.schema.json"
SAMPLES = Path(__file__).resolve().parent / "policies"


def _c(name: str, type_sql: str, oid: int = 0) -> CatalogColumn:
    return CatalogColumn(name, type_sql, oid)


# The bank.sql tables as proxy.catalog reads them.
BANK = Catalog(
    tables={
        "public.customers": (
            _c("id", "integer", 23), _c("name", "text", 25), _c("phone", "text", 25),
            _c("id_number", "text", 25), _c("email", "text", 25), _c("address", "text", 25),
            _c("birthday", "date", 1082), _c("branch_id", "text", 25),
            _c("level", "integer", 23), _c("created_at", "timestamp with time zone", 1184),
        ),
        "public.accounts": (
            _c("id", "integer", 23), _c("customer_id", "integer", 23), _c("card_no", "text", 25),
            _c("balance", "numeric(14,2)", 1700), _c("branch_id", "text", 25),
            _c("opened_on", "date", 1082),
        ),
        "public.orders": (
            _c("id", "integer", 23), _c("customer_id", "integer", 23),
            _c("amount", "numeric(12,2)", 1700), _c("note", "text", 25),
        ),
    },
    dependents={"public.v_customers": ("public.customers",)},
)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(REFERENCE, env={})


def _view(policy: Policy, login: str, addr: str | None = None) -> OperatorView:
    op = policy.resolve(login, addr, None)
    assert op is not None
    return build_operator_view(policy, op, BANK)


def _masked(view: OperatorView, table: str) -> dict[str, str | None]:
    return {c.name: c.mask_name for c in view.tables[table].columns}


def _errors(text: str, filename: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, filename, env={})
    return info.value.errors


# --------------------------------------------------------------------------------------------
# The reference policy


def test_reference_policy_loads(policy: Policy) -> None:
    assert policy.protected_tables == {"public.customers", "public.accounts", "public.orders"}
    assert set(policy.roles) == {"default", "teller", "manager", "auditor", "dba"}
    assert re.fullmatch(r"[0-9a-f]{12}", policy.version)
    assert policy.warnings == ()
    assert [c for c in policy.tables["public.customers"].columns] == [
        "name", "phone", "id_number", "email", "address", "birthday"]
    assert policy.tables["public.orders"].columns == {}


@pytest.mark.parametrize(("login", "role", "attributes"), [
    ("teller_sz01", "teller", {"branch": "SZ01"}),
    ("teller_gz01", "teller", {"branch": "GZ01"}),
    ("manager_sz01", "manager", {"branch": "SZ01"}),
    ("auditor1", "auditor", {}),
    ("dba", "dba", {}),
    ("postgres", "dba", {}),
    ("stranger", "default", {}),
    ("DBA", "default", {}),  # logins are case-sensitive, like PostgreSQL's
    ("dba2", "default", {}),
])
def test_resolve_reference_logins(policy: Policy, login: str, role: str,
                                  attributes: dict[str, str]) -> None:
    op = policy.resolve(login, "10.1.2.3", "crm")
    assert op is not None
    assert (op.login, op.role, op.attributes) == (login, role, attributes)
    assert (op.rule is None) == (role == "default")


def test_policy_without_default_resolves_to_none() -> None:
    p = load_policy(SAMPLES / "minimal.yaml", env={})
    op = p.resolve("teller_x", None, None)
    assert op is not None and op.role == "teller"
    assert p.resolve("stranger", "10.0.0.1", None) is None


def test_first_match_wins_with_cidr_and_application() -> None:
    p = parse_policy("""
protected:
  public.t: {}
operators:
  - match: {user: "app_*", cidr: ["10.0.0.0/8", "fd00::/8"], application: "crm*"}
    role: internal
  - match: {user: "app_*"}
    role: outside
  - match: {}
    role: anyone
roles:
  internal: {}
  outside: {}
  anyone: {}
""", "p.yaml", env={})

    def role(login: str, addr: str | None, app: str | None) -> str | None:
        op = p.resolve(login, addr, app)
        return op.role if op else None

    assert role("app_1", "10.9.9.9", "crm-web") == "internal"
    assert role("app_1", "10.9.9.9:51234", "crm") == "internal"
    assert role("app_1", "::ffff:10.1.2.3", "crm") == "internal"
    assert role("app_1", "[fd00::1]:5432", "crm") == "internal"
    assert role("app_1", "192.168.1.1", "crm") == "outside"
    assert role("app_1", None, "crm") == "outside"  # Unix socket: no address, no cidr match
    assert role("app_1", "10.9.9.9", None) == "outside"
    assert role("app_1", "10.9.9.9", "psql") == "outside"
    assert role("bob", None, None) == "anyone"


def test_parse_client_address() -> None:
    assert str(parse_client_address("10.1.2.3")) == "10.1.2.3"
    assert str(parse_client_address("10.1.2.3:5000")) == "10.1.2.3"
    assert str(parse_client_address("::1")) == "::1"
    assert str(parse_client_address("[::1]:5000")) == "::1"
    assert str(parse_client_address("::ffff:10.1.2.3")) == "10.1.2.3"
    assert parse_client_address("garbage") is None
    assert parse_client_address(None) is None


# --------------------------------------------------------------------------------------------
# Errors: file:line: key.path: message


@pytest.mark.parametrize(("sample", "expected"), [
    ("bad_mask.yaml", "bad_mask.yaml:7: protected.public.customers.columns.phone.mask: "
                      "unknown mask 'fone'; expected one of phone, chinese_name, id_number, "),
    ("unknown_table.yaml", "unknown_table.yaml:10: roles.default.row_filters.public.custmers: "
                           "table public.custmers is not in protected"),
    ("placeholder.yaml", "placeholder.yaml:13: roles.teller.row_filters.public.customers: "
                         "placeholder {{branch}} is not defined by operators[1] "
                         "(match user 'teller_new*')"),
    ("bad_yaml.yaml", "bad_yaml.yaml:6: yaml: expected ',' or '}', but got ':' "
                      "(while parsing a flow mapping at line 5)"),
    ("unknown_key.yaml", "unknown_key.yaml:7: roles.default.max_row: unknown key"),
    ("bad_quota.yaml", "bad_quota.yaml:7: roles.default.quota.per: quota period must be like "
                       '"30m", "1h", "1d" or a number of seconds'),
])
def test_broken_sample_policies(sample: str, expected: str) -> None:
    path = SAMPLES / sample
    with pytest.raises(PolicyError) as info:
        load_policy(path, env={})
    assert len(info.value.errors) == 1, info.value.errors
    assert info.value.errors[0].startswith(f"{path}:{expected.split(':', 1)[1]}"), (
        info.value.errors)


BASE = REFERENCE.read_text(encoding="utf-8")


def _line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


@pytest.mark.parametrize(("old", "new", "path", "message"), [
    ("mask: bank_card", "mask: {keep: [1, -2]}",
     "protected.public.accounts.columns.card_no.mask", "keep takes two non-negative integers"),
    ("balance:   {level: 2", "balance:   {level: 7",
     "protected.public.accounts.columns.balance.level", "unknown level 7 (levels: 1, 2, 3)"),
    ("role: auditor", "role: auditr", "operators.3.role", "unknown role 'auditr'"),
    ('{user: "dba"}', '{user: "dba", cidr: "10.0.0.0/33"}', "operators.4.match.cidr",
     "not a CIDR network: '10.0.0.0/33'"),
    ("lookup: [public.customers.id_number", "lookup: [public.custmers.id_number",
     "roles.teller.lookup.0", "lookup 'public.custmers.id_number': table public.custmers is "
     "not in protected"),
    ("max_rows: 50", "max_rows: fifty", "roles.teller.max_rows",
     'max_rows is a non-negative integer or "unlimited"'),
    ("rows: 2000", "rows: lots", "roles.teller.quota.rows", "Input should be a valid integer"),
    ("copy: deny\n    ddl: deny\n\n  teller", "copy: maybe\n    ddl: deny\n\n  teller",
     "roles.default.copy", "expected allow or deny"),
    ('public.orders: "false"', 'public.orders: "false) OR (true"',
     "roles.default.row_filters.public.orders", "unbalanced parentheses"),
    ('public.orders: "false"', 'public.orders: "id = 1; DELETE FROM orders"',
     "roles.default.row_filters.public.orders", "a row filter is one predicate (no ';')"),
    ('public.orders: "false"', 'public.orders: "false -- hide"',
     "roles.default.row_filters.public.orders", "comments are not allowed in a row filter"),
    ('public.orders: "false"', 'public.orders: "id = = 1"',
     "roles.default.row_filters.public.orders", "not a SQL predicate"),
    ('public.orders: "false"', 'public.orders: "id = {branch}}"',
     "roles.default.row_filters.public.orders", "malformed placeholder"),
    ("    ddl: allow", "    ddl: allow\n    timezone: Mars/Base",
     "roles.dba.timezone", "unknown timezone 'Mars/Base'"),
    ("    ddl: allow", "    ddl: allow\n    hours: 25:00-01:00",
     "roles.dba.hours", "hours '25:00-01:00': not a valid time of day"),
    ("  public.orders: {}", "  public.orders: {}\n  public.orders: {}",
     "protected.public.orders", "duplicate key"),
    ("  public.orders: {}", "  public.orders: {}\n  Orders: {}", "protected.Orders", "public.orders is listed twice"),
    ("    clearance: 2\n", "    clearance: 2\n    reveal: [public.accounts.card_no]\n"
     "    mask: {public.accounts.card_no: hash}\n",
     "roles.manager.mask.public.accounts.card_no", "is both revealed and masked"),
    ("    clearance: 2\n", "    clearance: 2\n    mask: {public.accounts.card_no: {sql: "
     '"pg_catalog.md5({col}) FROM x"}}\n',
     "roles.manager.mask.public.accounts.card_no", "sql mask is not a SQL expression"),
])
def test_reference_variants_report_the_line(old: str, new: str, path: str, message: str) -> None:
    assert old in BASE
    text = BASE.replace(old, new, 1)
    errors = _errors(text)
    key = path.split(".")[-1]
    matching = [e for e in errors if e.startswith("p.yaml:") and f": {path}: " in e]
    assert matching, errors
    line = int(matching[0].split(":")[1])
    # The reported line holds the offending key (or, for a list item, the item).
    assert key in text.splitlines()[line - 1] or key.isdigit(), (line, matching)
    assert message in matching[0]


def test_yaml_merge_keys_are_not_duplicates() -> None:
    """``<<: *anchor`` merges the anchored mapping; a key set beside it overrides, as in
    plain YAML, rather than counting as a duplicate."""
    text = BASE.replace("  manager:  ", "  manager: &mgr", 1)
    assert text != BASE
    text = text.replace("operators:", "operators:\n  - match: {user: \"acting_mgr*\"}\n"
                        "    role: acting\n    attributes: {branch: SZ01}", 1)
    text += "\n  acting:\n    <<: *mgr\n    max_rows: 10\n"
    p = parse_policy(text, "p.yaml", env={})
    assert p.roles["acting"].max_rows == 10 and p.roles["acting"].clearance == 2
    assert "duplicate key" in " ".join(_errors(text + "    max_rows: 11\n"))


def test_every_problem_is_reported_at_once() -> None:
    text = (BASE.replace("mask: chinese_name", "mask: chinese_nam")
            .replace("max_rows: 50", "max_rows: -1")
            .replace("    max_rows: 10000", "    max_row: 10000"))
    errors = _errors(text)
    assert len(errors) == 3, errors
    assert any(".columns.name.mask: unknown mask 'chinese_nam'" in e for e in errors)
    assert any("roles.teller.max_rows:" in e for e in errors)
    assert any("roles.auditor.max_row: unknown key" in e for e in errors)


def test_placeholder_in_default_role_is_an_error() -> None:
    text = BASE.replace('public.orders: "false"', 'public.orders: "branch_id = {{branch}}"')
    (error,) = _errors(text)
    line = _line_of(text, 'public.orders: "branch_id')
    assert error == (
        f"p.yaml:{line}: roles.default.row_filters."
        "public.orders: placeholder {{branch}} is not defined by logins matched by no operator "
        "(role default)")


def test_missing_required_and_empty() -> None:
    assert _errors("protected: {}\n") == ["p.yaml:1: roles: required key is missing"]
    assert _errors("") == ["p.yaml:1: (top): the policy is empty"]
    assert _errors("- a\n- b\n") == ["p.yaml:1: (top): the policy must be a mapping"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "absent.yaml")


def test_only_a_regular_file_is_read(tmp_path: Path) -> None:
    """A FIFO or a device in the policy's place hung the whole proxy at its next reload."""
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(fifo)  # returns at once: nobody writes the FIFO
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy("/dev/zero")


# --------------------------------------------------------------------------------------------
# Values


def test_attribute_quoting() -> None:
    assert sql_literal("O'Brien") == "'O''Brien'"
    assert sql_literal("a\\b") == "E'a\\\\b'"
    assert sql_literal(42) == "42"
    assert sql_literal(-5) == "(-5)"
    assert sql_literal(1.5) == "1.5"
    assert sql_literal(True) == "TRUE"
    assert render_row_filter("owner = {{ who }} AND n > -{{n}}", {"who": "O'Brien", "n": -5}) == (
        "owner = 'O''Brien' AND n > -(-5)")


def test_row_filter_literals_in_view() -> None:
    p = parse_policy("""
protected:
  public.customers: {}
  public.accounts: {}
operators:
  - match: {user: "obrien"}
    role: owner
    attributes: {name: "O'Brien", branch_no: 7, path: 'C:\\x'}
roles:
  owner:
    row_filters:
      public.customers: "owner = {{name}} AND branch_no = {{branch_no}}"
      public.accounts: "path = {{path}}"
""", "p.yaml", env={})
    op = p.resolve("obrien", None, None)
    assert op is not None
    view = build_operator_view(p, op, BANK)
    assert view.tables["public.customers"].row_filter == (
        "owner = 'O''Brien' AND branch_no = 7")
    assert view.tables["public.accounts"].row_filter == "path = E'C:\\\\x'"
    assert view.attributes == {"name": "O'Brien", "branch_no": "7", "path": "C:\\x"}
    assert not view.unrestricted


def test_names_and_periods() -> None:
    assert normalize_table("Customers") == "public.customers"
    assert normalize_table("CRM.Clients") == "crm.clients"
    assert normalize_column_path("customers.Phone") == ("public.customers", "phone")
    assert normalize_column_path("crm.clients.phone") == ("crm.clients", "phone")
    with pytest.raises(ValueError):
        normalize_table("a.b.c")
    with pytest.raises(ValueError):
        normalize_table('"Weird Name"')
    assert period_seconds("30m") == 1800
    assert period_seconds("1h") == 3600
    assert period_seconds("1d") == 86400
    assert period_seconds(90) == 90


def test_quota_hours_timezone_and_defaults() -> None:
    p = parse_policy("""
hours: "08:00-20:00"
timezone: Asia/Shanghai
protected:
  customers: {}
operators:
  - match: {user: "a"}
    role: plain
  - match: {user: "b"}
    role: night
roles:
  plain: {}
  night:
    hours: "22:00-06:00"
    timezone: Europe/Berlin
    quota: {rows: 10, per: 90}
    max_rows: 5
    copy: allow
    unbounded: deny
    ddl: true
    functions: deny
""", "p.yaml", env={})
    assert p.protected_tables == {"public.customers"}
    plain = build_operator_view(p, Operator("a", "plain", {}), BANK).limits
    assert (plain.max_rows, plain.quota_rows, plain.quota_seconds) == (None, None, None)
    assert (plain.hours, plain.timezone) == (("08:00", "20:00"), "Asia/Shanghai")
    assert (plain.copy, plain.unbounded, plain.ddl, plain.functions) == (
        False, Unbounded.ALLOW, False, False)
    night = build_operator_view(p, Operator("b", "night", {}), BANK).limits
    assert (night.max_rows, night.quota_rows, night.quota_seconds) == (5, 10, 90.0)
    assert (night.hours, night.timezone) == (("22:00", "06:00"), "Europe/Berlin")
    assert (night.copy, night.unbounded, night.ddl, night.functions) == (
        True, Unbounded.DENY, True, False)


# --------------------------------------------------------------------------------------------
# Operator views of the reference policy against the bank catalog


def test_teller_view(policy: Policy) -> None:
    view = _view(policy, "teller_sz01")
    assert (view.login, view.role, view.attributes) == ("teller_sz01", "teller", {"branch": "SZ01"})
    assert not view.unrestricted
    assert view.policy_version == policy.version
    customers = view.tables["public.customers"]
    assert [c.name for c in customers.columns] == [c.name for c in
                                                   BANK.tables["public.customers"]]
    assert _masked(view, "public.customers") == {
        "id": None, "name": "chinese_name", "phone": "phone", "id_number": "id_number",
        "email": "email", "address": "redact", "birthday": "truncate", "branch_id": None,
        "level": None, "created_at": None}
    assert {c.name for c in customers.columns if c.lookup} == {"phone", "id_number"}
    assert all(c.type_sql == b.type_sql for c, b in
               zip(customers.columns, BANK.tables["public.customers"], strict=True))
    assert customers.row_filter == "branch_id = 'SZ01'"
    assert view.tables["public.accounts"].row_filter == "branch_id = 'SZ01'"
    assert view.tables["public.orders"].row_filter == (
        "customer_id IN (SELECT id FROM public.customers WHERE branch_id = 'SZ01')")
    assert _masked(view, "public.accounts")["card_no"] == "bank_card"
    assert _masked(view, "public.accounts")["balance"] == "null"
    phone = next(c for c in customers.columns if c.name == "phone")
    assert phone.expr is not None and phone.expr.startswith('CASE WHEN "phone" IS NULL')
    limits = view.limits
    assert (limits.max_rows, limits.quota_rows, limits.quota_seconds) == (50, 2000, 3600.0)
    assert (limits.unbounded, limits.copy, limits.ddl, limits.functions) == (
        Unbounded.DENY, False, False, False)
    assert view.dependents == {"public.v_customers": ("public.customers",)}
    assert view.allowed_dependents == frozenset()

    gz = _view(policy, "teller_gz01")
    assert gz.tables["public.customers"].row_filter == "branch_id = 'GZ01'"


def test_manager_view(policy: Policy) -> None:
    view = _view(policy, "manager_sz01")
    customers = _masked(view, "public.customers")
    assert all(m is None for m in customers.values())
    assert _masked(view, "public.accounts") == {
        "id": None, "customer_id": None, "card_no": "bank_card", "balance": None,
        "branch_id": None, "opened_on": None}
    assert view.tables["public.customers"].row_filter == "branch_id = 'SZ01'"
    assert view.tables["public.orders"].row_filter is None
    assert not view.unrestricted
    assert view.limits.max_rows == 1000 and view.limits.unbounded is Unbounded.ALLOW


def test_auditor_view(policy: Policy) -> None:
    view = _view(policy, "auditor1")
    assert all(t.row_filter is None for t in view.tables.values())
    masked = _masked(view, "public.customers")
    assert {k for k, v in masked.items() if v} == {
        "name", "phone", "id_number", "email", "address", "birthday"}
    balance = next(c for c in view.tables["public.accounts"].columns if c.name == "balance")
    assert balance.mask_name == "round"
    assert balance.expr == ROUND_BALANCE[1]
    assert _masked(view, "public.accounts")["card_no"] == "bank_card"
    assert not any(c.lookup for t in view.tables.values() for c in t.columns)
    assert view.limits.max_rows == 10000


def test_dba_view_is_unrestricted(policy: Policy) -> None:
    for login in ("dba", "postgres"):
        view = _view(policy, login)
        assert view.unrestricted
        assert all(c.expr is None for t in view.tables.values() for c in t.columns)
        assert all(t.row_filter is None for t in view.tables.values())
        assert (view.limits.max_rows, view.limits.copy, view.limits.ddl) == (None, True, True)
        assert view.limits.functions  # functions defaults to the role's ddl


def test_default_view_sees_nothing(policy: Policy) -> None:
    view = _view(policy, "stranger")
    assert view.role == "default"
    assert {t.row_filter for t in view.tables.values()} == {"false"}
    assert view.limits.max_rows == 0


def test_table_missing_from_catalog_uses_policy_columns(policy: Policy) -> None:
    partial = Catalog(tables={k: v for k, v in BANK.tables.items() if k != "public.accounts"})
    view = build_operator_view(policy, Operator("t", "teller", {"branch": "SZ01"}), partial)
    assert [c.name for c in view.tables["public.accounts"].columns] == ["card_no", "balance"]
    assert view.tables["public.orders"].columns[0].name == "id"


def test_a_masked_column_missing_from_its_table_refuses_the_table(policy: Policy) -> None:
    """phone renamed to mobile: nothing in the policy names mobile, so the roles that mask
    phone are refused the table (and only those); a statement naming it is denied."""
    from rewriters.analyze import Analyzer

    renamed = Catalog(tables={**BANK.tables, "public.customers": tuple(
        CatalogColumn("mobile", c.type_sql) if c.name == "phone" else c
        for c in BANK.tables["public.customers"])})
    teller = build_operator_view(policy, policy.resolve("teller_sz01", None, None), renamed)
    why = teller.tables["public.customers"].refused
    assert why is not None and "public.customers.phone" in why and "renamed or dropped" in why
    assert teller.tables["public.accounts"].refused is None
    for login in ("manager_sz01", "dba"):  # they see identity raw: nothing is hidden
        view = build_operator_view(policy, policy.resolve(login, None, None), renamed)
        assert view.tables["public.customers"].refused is None
    decision = Analyzer().analyze("select mobile from customers where id = 3",
                                  teller).statements[0]
    assert decision.action.name == "DENY" and decision.message == why


def test_explain_shows_a_refused_table_as_refused(policy: Policy) -> None:
    from rewriters.analyze import Analyzer
    from rewriters.explain import explain_report

    renamed = Catalog(tables={**BANK.tables, "public.customers": tuple(
        CatalogColumn("mobile", c.type_sql) if c.name == "phone" else c
        for c in BANK.tables["public.customers"])})
    teller = build_operator_view(policy, policy.resolve("teller_sz01", None, None), renamed)
    sql = "select * from customers where id = 3"
    report = explain_report(Analyzer().analyze(sql, teller), teller)
    assert "REFUSED: the policy masks public.customers.phone" in report, report


def test_a_login_the_policy_dropped_gets_a_view_refusing_everything(policy: Policy) -> None:
    from rewriters.analyze import Analyzer
    from rewriters.policy import revoked_view

    view = revoked_view(policy, "teller_sz01", BANK)
    assert view.revoked and not view.unrestricted
    analyzer = Analyzer()
    for sql in ("select phone from customers where id = 3", "select * from v_customers"):
        decision = analyzer.analyze(sql, view).statements[0]
        assert decision.action.name == "DENY", sql
    assert analyzer.analyze("select 1", view).statements[0].action.name == "FORWARD"


@pytest.mark.parametrize("login", ["teller_sz01", "manager_sz01", "auditor", "stranger"])
def test_database_without_the_protected_tables_still_builds(policy: Policy, login: str) -> None:
    """A database that lacks every protected table (a teller's health check against
    ``postgres``): the truncate and round masks build on guessed types, nothing is refused."""
    op = policy.resolve(login, None, None)
    assert op is not None
    view = build_operator_view(policy, op, Catalog())
    birthday = next(c for c in view.tables["public.customers"].columns if c.name == "birthday")
    balance = next(c for c in view.tables["public.accounts"].columns if c.name == "balance")
    if login != "manager_sz01":  # the manager sees identity raw
        assert birthday.mask_name == "truncate" and "date_trunc" in (birthday.expr or "")
    if login == "auditor":
        assert balance.mask_name == "round" and "round" in (balance.expr or "")


def test_listen_channels_of_the_policy_and_the_role_add_up() -> None:
    text = BASE + "listen_channels: [cache_*]\n"
    text = text.replace("    clearance: 0\n    lookup:",
                        "    clearance: 0\n    listen_channels: [branch_events]\n    lookup:", 1)
    p = parse_policy(text, "p.yaml", env={})
    teller = p.resolve("teller_sz01", None, None)
    assert teller is not None
    assert build_operator_view(p, teller, BANK).limits.listen == ("cache_*", "branch_events")
    dba = p.resolve("dba", None, None)
    assert dba is not None and build_operator_view(p, dba, BANK).limits.listen == ("cache_*",)


def test_mask_on_wrong_type_fails_the_build_with_the_policy_line() -> None:
    text = BASE.replace("phone:     {level: 1, mask: phone}",
                        "phone:     {level: 1, mask: {round: 2}}")
    p = parse_policy(text, "p.yaml", env={})
    op = p.resolve("teller_sz01", None, None)
    assert op is not None
    with pytest.raises(PolicyError) as info:
        build_operator_view(p, op, BANK)
    line = _line_of(text, "phone:     {level")
    assert info.value.errors == [
        f"p.yaml:{line}: protected.public.customers.columns.phone.mask: public.customers.phone: "
        "mask round needs a numeric column, but phone is text"]
    # The DBA sees raw data anyway, so no mask is built for it and nothing fails.
    dba = p.resolve("dba", None, None)
    assert dba is not None and build_operator_view(p, dba, BANK).unrestricted
    problems = validate_against_catalog(p, BANK)
    assert any("mask round needs a numeric column" in x for x in problems)


def test_validate_against_catalog(policy: Policy) -> None:
    assert validate_against_catalog(policy, BANK) == []
    partial = Catalog(tables={
        "public.customers": tuple(c for c in BANK.tables["public.customers"]
                                  if c.name != "email"),
        "public.accounts": BANK.tables["public.accounts"],
    })
    problems = validate_against_catalog(policy, partial)
    line = _line_of(BASE, "public.orders: {}")
    assert f"{REFERENCE}:{line}: protected.public.orders: table public.orders not found in the " \
           "database" in problems
    assert any("column public.customers.email not found in the database" in x for x in problems)


def test_check_names_the_roles_serve_refuses_a_table_to(policy: Policy) -> None:
    """A masked column the table lacks (renamed?) makes serve refuse the table to the roles
    that mask it: pgveil check says so, naming exactly those roles."""
    renamed = Catalog(tables={
        **BANK.tables,
        "public.customers": tuple(_c("mobile", c.type_sql) if c.name == "phone" else c
                                  for c in BANK.tables["public.customers"]),
    })
    refused = sorted(
        name for name in policy.roles
        if build_operator_view(policy, Operator("x", name, {"branch": "SZ01"}), renamed)
        .tables["public.customers"].refused)
    assert refused and "dba" not in refused
    problems = [p for p in validate_against_catalog(policy, renamed)
                if "public.customers.phone not found" in p]
    assert problems  # the table's column, and the teller's lookup on it
    for problem in problems:
        assert problem.endswith("pgveil serve refuses public.customers to role(s) "
                                f"{', '.join(refused)} until the policy names its columns "
                                "again (renamed or dropped?)")


def test_mixed_case_catalog_column_is_still_masked(policy: Policy) -> None:
    quoted = Catalog(tables={"public.customers": (_c("id", "integer"), _c("Phone", "text"))})
    view = build_operator_view(policy, Operator("t", "teller", {"branch": "SZ01"}), quoted)
    phone = view.tables["public.customers"].columns[1]
    assert (phone.name, phone.mask_name, phone.lookup) == ("Phone", "phone", True)
    assert phone.expr is not None and '"Phone"' in phone.expr


def test_reveal_and_mask_overrides() -> None:
    text = BASE.replace("    clearance: 2\n", "    clearance: 2\n"
                        "    reveal: [public.accounts.card_no]\n"
                        "    mask: {public.customers.created_at: {truncate: month},"
                        " public.customers.phone: hash}\n")
    p = parse_policy(text, "p.yaml", env={"PGVEIL_HASH_KEY": "s3cret"})
    view = _view(p, "manager_sz01")
    assert _masked(view, "public.accounts")["card_no"] is None
    customers = _masked(view, "public.customers")
    assert customers["created_at"] == "truncate"
    assert customers["phone"] == "hash"
    assert customers["name"] is None
    phone = next(c for c in view.tables["public.customers"].columns if c.name == "phone")
    assert phone.expr is not None and hmac_pads(b"s3cret")[0].hex() in phone.expr
    assert p.warnings == ()


def test_hash_key_falls_back_with_a_warning() -> None:
    text = BASE.replace("mask: bank_card", "mask: hash")
    p = parse_policy(text, "p.yaml", env={})
    assert len(p.warnings) == 1 and "$PGVEIL_HASH_KEY is not set" in p.warnings[0]
    again = parse_policy(text, "p.yaml", env={})
    assert again.hash_key == p.hash_key  # deterministic for the same policy text
    custom = parse_policy(text + "hash_key_env: BANK_HASH_KEY\n", "p.yaml",
                          env={"BANK_HASH_KEY": "k"})
    assert custom.hash_key == b"k" and custom.warnings == ()


def test_allow_dependents() -> None:
    text = BASE.replace("    clearance: 2\n", "    clearance: 2\n"
                        "    allow_dependents: [Reports.Branch_Summary]\n")
    text += "allow_dependents: [v_public_stats]\n"
    p = parse_policy(text, "p.yaml", env={})
    view = _view(p, "manager_sz01")
    assert view.allowed_dependents == {"reports.branch_summary", "public.v_public_stats"}
    assert _view(p, "teller_sz01").allowed_dependents == {"public.v_public_stats"}


# --------------------------------------------------------------------------------------------
# JSON Schema


def test_schema_file_is_in_sync() -> None:
    assert json.loads(SCHEMA.read_text(encoding="utf-8")) == policy_json_schema(), (
        "config/policy.schema.json is stale: run `python -m rewriters.policy`")


def test_reference_policy_matches_schema() -> None:
    import yaml

    schema = policy_json_schema()
    document = json.loads(json.dumps(yaml.safe_load(BASE)))  # YAML int keys -> JSON strings
    assert set(document) <= set(schema["properties"])
    assert set(schema["required"]) <= set(document)
    jsonschema.validate(document, schema)


@pytest.mark.parametrize(("path", "value"), [
    (("roles", "teller", "quota", "per"), "fortnight"),
    (("roles", "teller", "quota", "per"), 0),
    (("roles", "teller", "hours"), "8-20"),
    (("levels", "three"), "x"),
    (("protected", "bank.public.orders"), {}),
    (("roles", "teller", "max_rows"), -1),
    (("protected", "public.customers", "columns", "phone", "mask"), "phon"),
])
def test_schema_rejects_what_check_rejects_without_a_database(path: tuple[str, ...],
                                                              value: Any) -> None:
    import yaml

    document = json.loads(json.dumps(yaml.safe_load(BASE)))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, policy_json_schema())
    with pytest.raises(PolicyError):
        parse_policy(yaml.safe_dump(document), "p.yaml", env={})
