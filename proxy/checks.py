"""``pgveil check`` and ``pgveil explain``: the DBA's tools to see what a policy does.

``check`` validates pgveil.yaml and the policy (errors as ``file:line: key: message``), then —
unless ``--offline`` or no control DSN is configured — connects to the database and fails when a
protected table is missing, and warns about columns that look sensitive but that the policy
leaves unclassified (the same detector as ``pgveil discover``).

``explain`` resolves the login to a role exactly as the proxy would, reads the catalog when it
can, and prints the decision for one statement with the rewritten SQL.
"""

from __future__ import annotations

import sys
from typing import Any

from proxy.config import Config


def _load_policy(config: Config) -> Any:
    from rewriters.policy import PolicyError, load_policy

    try:
        return load_policy(config.policy)
    except PolicyError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


async def _catalog(config: Config, policy: Any, database: str) -> tuple[Any, list[str], Any]:
    """(catalog, missing tables, connection error) for one database via the control DSN."""
    import asyncpg

    from proxy.catalog import load_catalog
    from proxy.runtime import control_dsn

    dsn = control_dsn(config, database)
    if dsn is None:
        return None, [], "no control.dsn configured"
    try:
        conn = await asyncpg.connect(dsn, password=config.control_password, timeout=10)
    except Exception as exc:  # report, don't crash: the caller decides the exit code
        return None, [], exc
    try:
        catalog, missing = await load_catalog(conn, policy.protected_tables,
                                                   policy.sensitive_columns)
        return catalog, missing, None
    finally:
        await conn.close()


async def run_check(config: Config, database: str | None, offline: bool) -> int:
    policy = _load_policy(config)
    if policy is None:
        return 1
    print(f"config {config.source}: ok")
    print(f"policy {config.policy}: ok (version {policy.version}, "
          f"{len(policy.protected_tables)} protected tables)")
    if offline or not config.control.dsn:
        if not config.control.dsn:
            print("database: not checked (no control.dsn)")
        return 0
    from urllib.parse import urlsplit

    db = database or (urlsplit(config.control.dsn).path.lstrip("/") or "postgres")
    catalog, missing, error = await _catalog(config, policy, db)
    if error is not None:
        print(f"database {db}: unreachable: {error}", file=sys.stderr)
        return 3
    from rewriters.policy import validate_against_catalog

    status = 0
    problems = validate_against_catalog(policy, catalog)
    for name in missing:
        line = f"{config.policy}: protected table {name} does not exist in database {db}"
        if not any(name in p for p in problems):
            problems.insert(0, line)
    for problem in problems:
        print(problem, file=sys.stderr)
        status = 1
    for table, hooks in catalog.write_hooks.items():
        unlisted = [h for h in hooks if h not in policy.allow_dependents]
        if unlisted:
            print(f"warning: writing {table} runs {', '.join(unlisted)} (triggers' functions "
                  "and rules) on raw rows: masked roles may not INSERT/UPDATE/DELETE it until "
                  "the policy lists them in allow_dependents (for a role or for all)")
    if missing and len(missing) == len(policy.protected_tables):
        print(f"hint: none of the protected tables is in database {db}; the control DSN may "
              "name another database — use --database NAME", file=sys.stderr)
    try:
        from proxy.discover import unclassified_warnings
    except ImportError:
        unclassified_warnings = None  # type: ignore[assignment]
    if unclassified_warnings is not None:
        for warning in await unclassified_warnings(config, policy, db):
            print(f"warning: {warning}")
    if status == 0:
        print(f"database {db}: every protected table and column exists")
    return status


async def run_explain(config: Config, login: str, sql: str, database: str,
                      client: str | None, application: str) -> int:
    from rewriters.analyze import Analyzer
    from rewriters.explain import explain_report
    from rewriters.model import Catalog, LexSettings
    from rewriters.policy import PolicyError, build_operator_view

    policy = _load_policy(config)
    if policy is None:
        return 1
    operator = policy.resolve(login, client, application)
    if operator is None:
        print(f"login {login!r}: no role matches and the policy has no 'default' role — "
              "the connection would be refused")
        return 1
    catalog, missing, error = await _catalog(config, policy, database)
    if catalog is None:
        print(f"note: catalog not read ({error}); using the columns listed in the policy",
              file=sys.stderr)
        catalog = Catalog()
    try:
        view = build_operator_view(policy, operator, catalog)
    except PolicyError as exc:
        print(f"login {login!r}: the policy cannot be applied to database {database!r}:",
              file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    analysis = Analyzer().analyze(sql, view, LexSettings())
    print(explain_report(analysis, view))
    return 0
