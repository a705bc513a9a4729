"""Hand-built operator views over the bank.sql catalog, for the rewriter tests.

These do not go through ``rewriters.policy``: the rewriter is tested against views whose every
field is visible here. Mask expressions are simple stand-ins (pg_catalog-qualified, returning the
column's type); the real ones come from ``rewriters.masks``.

Roles (mirroring config/policy.yaml):

* ``teller``  — branch SZ01: customers/accounts filtered by branch, orders by the customer's
  branch; identity, balance and card number masked; exact lookup on id_number and phone;
  max_rows 50; unbounded reads denied; no COPY, no DDL; may use ``public.branch_stats``.
* ``manager`` — branch SZ01: customers/accounts filtered; only card_no masked; max_rows 1000.
* ``auditor`` — all rows; identity and card masked, balance rounded; max_rows 10000.
* ``dba``     — unrestricted, COPY and DDL allowed.
* ``default`` — every filter ``false``, everything masked, max_rows 0.
* ``hasher``  — a teller whose e-mail column is masked with ``hash`` (key material in the SQL).
"""

from __future__ import annotations

from rewriters.model import (
    Catalog,
    CatalogColumn,
    ColumnView,
    Limits,
    OperatorView,
    TableView,
    Unbounded,
)

CATALOG = Catalog(
    tables={
        "public.customers": (
            CatalogColumn("id", "integer", 23, unique=True),
            CatalogColumn("name", "text", 25),
            CatalogColumn("phone", "text", 25),
            CatalogColumn("id_number", "text", 25),
            CatalogColumn("email", "text", 25),
            CatalogColumn("address", "text", 25),
            CatalogColumn("birthday", "date", 1082),
            CatalogColumn("branch_id", "text", 25, references="public.branches.id"),
            CatalogColumn("level", "integer", 23),
            CatalogColumn("created_at", "timestamp with time zone", 1184),
        ),
        "public.accounts": (
            CatalogColumn("id", "integer", 23, unique=True),
            CatalogColumn("customer_id", "integer", 23, references="public.customers.id"),
            CatalogColumn("card_no", "text", 25),
            CatalogColumn("balance", "numeric(14,2)", 1700),
            CatalogColumn("branch_id", "text", 25, references="public.branches.id"),
            CatalogColumn("opened_on", "date", 1082),
        ),
        "public.orders": (
            CatalogColumn("id", "integer", 23, unique=True),
            CatalogColumn("customer_id", "integer", 23, references="public.customers.id"),
            CatalogColumn("amount", "numeric(12,2)", 1700),
            CatalogColumn("note", "text", 25),
        ),
    },
    dependents={
        "public.customer_overview": ("public.customers",),
        "public.branch_stats": ("public.customers",),
        "public.find_customer": ("public.customers",),
    },
)

MASKS: dict[str, tuple[str, str]] = {
    "name": ("chinese_name", 'pg_catalog.textcat(pg_catalog.left("name", 1), \'**\')'),
    "phone": ("phone", 'pg_catalog.textcat(pg_catalog.left("phone", 3), \'****\')'),
    "id_number": ("id_number",
                  'pg_catalog.textcat(pg_catalog.left("id_number", 6), \'********\')'),
    "email": ("email", 'pg_catalog.textcat(\'***@\', pg_catalog.split_part("email", \'@\', 2))'),
    "address": ("redact", "CAST('******' AS text)"),
    "birthday": ("truncate", "CAST(pg_catalog.date_trunc('year', \"birthday\") AS date)"),
    "card_no": ("bank_card", 'pg_catalog.textcat(\'************\', pg_catalog.right("card_no", 4))'),
    "balance": ("null", "CAST(NULL AS numeric(14,2))"),
}
HASH_EMAIL = ("hash", "CAST(pg_catalog.encode(pg_catalog.sha256(pg_catalog.byteacat("
              "pg_catalog.decode('36363636', 'hex'), pg_catalog.convert_to(\"email\", 'UTF8'))), "
              "'hex') AS text)")
ROUND_BALANCE = ("round", 'CAST(CASE WHEN pg_catalog.numeric_le(pg_catalog.abs(pg_catalog.round('
                          '"balance", -3)), CAST(\'999999999999.99\' AS numeric)) THEN '
                          'pg_catalog.round("balance", -3) ELSE pg_catalog.trunc("balance", -3) END '
                          'AS numeric(14,2))')

IDENTITY = ("name", "phone", "id_number", "email", "address", "birthday")


def table_view(
    name: str,
    masked: dict[str, tuple[str, str]],
    row_filter: str | None = None,
    lookup: tuple[str, ...] = (),
) -> TableView:
    cols = []
    for c in CATALOG.tables[name]:
        mask = masked.get(c.name)
        cols.append(ColumnView(
            name=c.name,
            type_sql=c.type_sql,
            expr=mask[1] if mask else None,
            mask_name=mask[0] if mask else None,
            lookup=c.name in lookup,
            unique=c.unique,
            references=c.references,
        ))
    return TableView(name, tuple(cols), row_filter)


def _view(login: str, role: str, attributes: dict[str, str], tables: dict[str, TableView],
          limits: Limits, unrestricted: bool = False,
          allowed: frozenset[str] = frozenset()) -> OperatorView:
    return OperatorView(
        login=login,
        role=role,
        attributes=attributes,
        tables=tables,
        limits=limits,
        unrestricted=unrestricted,
        policy_version="test-1",
        allowed_dependents=allowed,
        dependents=dict(CATALOG.dependents),
    )


def teller(branch: str = "SZ01") -> OperatorView:
    f = f"branch_id = '{branch}'"
    return _view(
        f"teller_{branch.lower()}", "teller", {"branch": branch},
        {
            "public.customers": table_view(
                "public.customers", {c: MASKS[c] for c in IDENTITY}, f,
                lookup=("id_number", "phone")),
            "public.accounts": table_view(
                "public.accounts", {"card_no": MASKS["card_no"], "balance": MASKS["balance"]}, f),
            "public.orders": table_view(
                "public.orders", {},
                f"customer_id IN (SELECT id FROM public.customers WHERE branch_id = '{branch}')"),
        },
        Limits(max_rows=50, quota_rows=2000, quota_seconds=3600.0, unbounded=Unbounded.DENY),
        allowed=frozenset({"public.branch_stats"}),
    )


def manager() -> OperatorView:
    f = "branch_id = 'SZ01'"
    return _view(
        "manager_sz01", "manager", {"branch": "SZ01"},
        {
            "public.customers": table_view("public.customers", {}, f),
            "public.accounts": table_view("public.accounts", {"card_no": MASKS["card_no"]}, f),
            "public.orders": table_view("public.orders", {}),
        },
        Limits(max_rows=1000),
    )


def auditor() -> OperatorView:
    return _view(
        "auditor1", "auditor", {},
        {
            "public.customers": table_view("public.customers", {c: MASKS[c] for c in IDENTITY}),
            "public.accounts": table_view(
                "public.accounts", {"card_no": MASKS["card_no"], "balance": ROUND_BALANCE}),
            "public.orders": table_view("public.orders", {}),
        },
        Limits(max_rows=10000),
    )


def dba() -> OperatorView:
    return _view(
        "dba", "dba", {},
        {name: table_view(name, {}) for name in CATALOG.tables},
        Limits(max_rows=None, copy=True, ddl=True, functions=True),
        unrestricted=True,
    )


def default() -> OperatorView:
    everything = {**{c: MASKS[c] for c in IDENTITY}, "card_no": MASKS["card_no"],
                  "balance": MASKS["balance"]}
    return _view(
        "stranger", "default", {},
        {name: table_view(name, {k: v for k, v in everything.items()
                                 if k in {c.name for c in CATALOG.tables[name]}}, "false")
         for name in CATALOG.tables},
        Limits(max_rows=0),
    )


def hasher() -> OperatorView:
    base = teller()
    masks = {c: MASKS[c] for c in IDENTITY}
    masks["email"] = HASH_EMAIL
    tables = dict(base.tables)
    tables["public.customers"] = table_view("public.customers", masks, "branch_id = 'SZ01'",
                                            lookup=("id_number", "phone"))
    return _view("teller_sz01", "teller", {"branch": "SZ01"}, tables, base.limits,
                 allowed=base.allowed_dependents)


VIEWS = {
    "teller": teller,
    "teller_gz": lambda: teller("GZ01"),
    "manager": manager,
    "auditor": auditor,
    "dba": dba,
    "default": default,
    "hasher": hasher,
}


def view(role: str) -> OperatorView:
    return VIEWS[role]()
