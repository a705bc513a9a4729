"""``pgveil grant create|list|revoke``: temporary, audited exceptions from the command line.

A DBA lifts one limit of one operator's role for a while, with a reason and an approver::

    pgveil grant create --login teller_sz01 --lift max_rows=5000 --expires 2h \\
        --reason "month-end reconciliation, ticket OPS-1234" --approver "Wang Fang"

Flow: arguments are validated here (``--lift`` and ``--expires`` with the parsers of
:mod:`proxy.control`); the control DSN comes from ``--dsn`` or from ``control.dsn`` of the config
file, its password from ``PGVEIL_CONTROL_PASSWORD`` (or the DSN). One asyncpg connection then
runs the schema migration (so the CLI works before any proxy ever started) and the statement:
the grant row, a ``pgveil.grant_events`` row (who, when, what) and a NOTIFY, in one transaction.
Every running pgveil receives the NOTIFY within a second, applies the grant to that login's new
statements and writes its own audit record of the event.

Exit codes follow ``pgveil``: 0 ok, 1 invalid input or nothing to revoke, 2 usage, 3 the control
database is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import unicodedata
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import asyncpg

from proxy.control import (
    MAX_GRANT_SECONDS,
    Grant,
    default_actor,
    fetch_grant,
    fetch_grants,
    format_lift,
    insert_grant,
    migrate,
    parse_duration,
    parse_lift,
    revoke_grant_row,
)

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

GRANT_EPILOG = """examples:
  pgveil grant create --login teller_sz01 --lift max_rows=5000 --expires 2h \\
      --reason "month-end reconciliation, OPS-1234" --approver "Wang Fang"
  pgveil grant create --login auditor1 --lift copy --expires 30m --reason "regulator export" \\
      --approver "Li Lei" --dsn postgresql://pgveil_admin@db1/postgres
  pgveil grant create --login teller_gz01 --lift role=manager --expires 1d \\
      --reason "covering for the branch manager" --approver "Zhao Min"
  pgveil grant list                 active grants
  pgveil grant list --all           also expired and revoked ones
  pgveil grant revoke g_3f9a0c5e7b21

what can be lifted (--lift, repeatable or comma-separated):
  max_rows=N     raise the per-statement row cap to N
  copy           allow COPY ... TO (export)
  unbounded      allow reads of customer tables with neither a filter nor a LIMIT
  hours          allow access outside the role's hours
  quota          stop counting against the role's quota
  role=NAME      act as role NAME of the policy (its clearance, filters and limits)

The control database is control.dsn of pgveil.yaml (-c, default $PGVEIL_CONFIG or ./pgveil.yaml)
or --dsn; its password is $PGVEIL_CONTROL_PASSWORD or part of the DSN. Running proxies apply a
grant within a second; every grant event is recorded in pgveil.grant_events and in the audit log.
"""


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lift_arg(text: str) -> dict[str, Any]:
    try:
        return parse_lift(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_grant_arguments(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``grant`` with its ``create``, ``list`` and ``revoke`` actions to ``pgveil``."""
    raw = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "grant", help="create, list and revoke temporary grants",
        description="Temporary, audited exceptions: lift one limit of one operator's role until "
        "the grant expires or is revoked.", epilog=GRANT_EPILOG, formatter_class=raw)
    p.set_defaults(func=cmd_grant, grant_parser=p)
    actions = p.add_subparsers(dest="grant_command", metavar="ACTION")

    source = argparse.ArgumentParser(add_help=False)
    where = source.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", default=None,
                       help="pgveil.yaml whose control.dsn to use (default: $PGVEIL_CONFIG or "
                       "./pgveil.yaml)")
    where.add_argument("--dsn", default=None,
                       help="control database URL instead of the config file; password from "
                       "$PGVEIL_CONTROL_PASSWORD or the URL")

    c = actions.add_parser(
        "create", parents=[source], help="create a grant and print its id",
        description="Create a grant for one login. Prints the grant id on stdout (a summary "
        "goes to stderr), so GRANT=$(pgveil grant create ...) works.",
        epilog=GRANT_EPILOG, formatter_class=raw)
    c.add_argument("--login", required=True, help="the operator's login (exact, no globs)")
    c.add_argument("--lift", required=True, action="append", type=_lift_arg, metavar="WHAT",
                   help="max_rows=N | copy | unbounded | hours | quota | role=NAME "
                   "(repeatable)")
    c.add_argument("--expires", required=True, type=_duration_arg, metavar="DURATION",
                   help="how long the grant lasts: 30m, 2h, 1d, 1h30m (at most 30d)")
    c.add_argument("--reason", required=True, help="why (ticket, task); goes into the audit log")
    c.add_argument("--approver", required=True, help="who approved it (e.g. the manager)")
    c.add_argument("--json", action="store_true", help="print the grant as JSON")
    c.set_defaults(grant_func=_create, grant_parser=c)

    li = actions.add_parser(
        "list", parents=[source], help="list grants",
        description="List active grants (with --all also expired and revoked ones).",
        epilog="examples:\n  pgveil grant list\n  pgveil grant list --all --login teller_sz01",
        formatter_class=raw)
    li.add_argument("--all", action="store_true", help="include expired and revoked grants")
    li.add_argument("--login", default=None, help="only this login's grants")
    li.add_argument("--json", action="store_true", help="one JSON object per line")
    li.set_defaults(grant_func=_list, grant_parser=li)

    r = actions.add_parser(
        "revoke", parents=[source], help="revoke a grant now",
        description="Revoke an active grant; running proxies stop honouring it within a second.",
        epilog="example:\n  pgveil grant revoke g_3f9a0c5e7b21 --reason \"task finished\"",
        formatter_class=raw)
    r.add_argument("id", metavar="ID", help="the grant id printed by create / list")
    r.add_argument("--reason", default=None, help="why it is revoked early (recorded)")
    r.set_defaults(grant_func=_revoke, grant_parser=r)


# ---------------------------------------------------------------------------- command


def cmd_grant(args: argparse.Namespace) -> int:
    """Entry point of ``pgveil grant``: resolve the control DSN, then run the action."""
    func = getattr(args, "grant_func", None)
    if func is None:
        args.grant_parser.print_help()
        return EXIT_USAGE
    lift: dict[str, Any] | None = None
    if func is _create:
        lift = {}
        for item in args.lift:
            dup = set(lift) & set(item)
            if dup:
                args.grant_parser.error(f"argument --lift: {', '.join(sorted(dup))} given twice")
            lift.update(item)
        if not 0 < args.expires <= MAX_GRANT_SECONDS:
            args.grant_parser.error("argument --expires: at most 30 days")
    try:
        dsn, roles = _control_source(args)
    except _InputError as exc:
        print(f"pgveil grant: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if lift is not None and "role" in lift and roles is not None and lift["role"] not in roles:
        print(f"pgveil grant: role {lift['role']!r} is not defined in the policy "
              f"(roles: {', '.join(sorted(roles))})", file=sys.stderr)
        return EXIT_INVALID
    password = os.environ.get("PGVEIL_CONTROL_PASSWORD") or None
    return asyncio.run(_run(dsn, password, lambda conn: func(conn, args, lift)))


class _InputError(Exception):
    pass


def _control_source(args: argparse.Namespace) -> tuple[str, frozenset[str] | None]:
    """The control DSN and, when a config file names a readable policy, its role names."""
    if args.dsn:
        return args.dsn, None
    from proxy.config import ConfigError, load_config

    path = args.config or os.environ.get("PGVEIL_CONFIG") or "pgveil.yaml"
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise _InputError("\n".join(exc.errors) + "\n(or pass --dsn)") from None
    if not config.control.dsn:
        raise _InputError(f"{path}: control.dsn is not set; set it or pass --dsn")
    roles: frozenset[str] | None = None
    try:
        from rewriters.policy import PolicyError, load_policy

        roles = frozenset(load_policy(config.policy).roles)
    except (ImportError, OSError, PolicyError) as exc:
        print(f"pgveil grant: warning: cannot read the policy to check role names: {exc}",
              file=sys.stderr)
    return config.control.dsn, roles


async def _run(dsn: str, password: str | None,
               action: Callable[[Any], Awaitable[int]]) -> int:
    """Connect, migrate, run the action; map connection failures to exit code 3."""
    try:
        conn = await asyncpg.connect(dsn, password=password, timeout=10, command_timeout=30)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as exc:
        print(f"pgveil grant: cannot connect to the control database: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ValueError as exc:  # a malformed DSN
        print(f"pgveil grant: bad control DSN: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        await migrate(conn)
        return await action(conn)
    except ValueError as exc:
        print(f"pgveil grant: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except asyncpg.PostgresError as exc:
        print(f"pgveil grant: control database error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError) as exc:
        print(f"pgveil grant: lost the control database: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        await conn.close()


# ---------------------------------------------------------------------------- actions


async def _create(conn: Any, args: argparse.Namespace, lift: dict[str, Any] | None) -> int:
    assert lift is not None
    grant = await insert_grant(conn, args.login, lift, args.expires, args.reason,
                               args.approver, default_actor())
    if args.json:
        print(json.dumps(_grant_json(grant), ensure_ascii=False))
    else:
        print(grant.id)
        print(f"granted {format_lift(grant.lift)} to {grant.login} until "
              f"{_when(grant.expires_at)} ({_left(grant)}), approved by {grant.approver}",
              file=sys.stderr)
    return EXIT_OK


async def _list(conn: Any, args: argparse.Namespace, lift: dict[str, Any] | None) -> int:
    grants = await fetch_grants(conn, include_expired=args.all, login=args.login)
    if args.json:
        for g in grants:
            print(json.dumps(_grant_json(g), ensure_ascii=False))
        return EXIT_OK
    if not grants:
        print("no grants" if args.all else "no active grants", file=sys.stderr)
        return EXIT_OK
    rows = [("ID", "LOGIN", "LIFT", "EXPIRES", "STATE", "APPROVER", "REASON")]
    rows += [(g.id, g.login, format_lift(g.lift), _when(g.expires_at), _state(g), g.approver,
              g.reason) for g in grants]
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(v + " " * (w - _width(v)) for v, w in zip(r[:-1], widths, strict=True))
              + "  " + r[-1])
    return EXIT_OK


async def _revoke(conn: Any, args: argparse.Namespace, lift: dict[str, Any] | None) -> int:
    grant = await revoke_grant_row(conn, args.id, default_actor(), args.reason)
    if grant is not None:
        print(f"revoked {grant.id} ({format_lift(grant.lift)} for {grant.login})")
        return EXIT_OK
    existing = await fetch_grant(conn, args.id)
    if existing is None:
        print(f"pgveil grant: no grant {args.id!r}", file=sys.stderr)
    elif existing.revoked:
        print(f"pgveil grant: {existing.id} was already revoked at "
              f"{_when(existing.revoked_at)} by {existing.revoked_by}", file=sys.stderr)
    else:
        print(f"pgveil grant: {existing.id} already expired at {_when(existing.expires_at)}",
              file=sys.stderr)
    return EXIT_INVALID


# ---------------------------------------------------------------------------- formatting


def _width(text: str) -> int:
    """Terminal columns: CJK names (approvers, reasons) take two each."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _when(ts: datetime | None) -> str:
    if ts is None:
        return "-"
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _left(grant: Grant) -> str:
    secs = int(grant.expires_ts - time.time())
    if secs <= 0:
        return "expired"
    d, rest = divmod(secs, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m and not d else "",
             f"{s}s" if s and not (d or h) else ""]
    return ("".join(parts) or "0s") + " left"


def _state(grant: Grant) -> str:
    if grant.revoked:
        return "revoked"
    return _left(grant) if grant.active() else "expired"


def _grant_json(grant: Grant) -> dict[str, Any]:
    return {
        "id": grant.id, "login": grant.login, "lift": grant.lift,
        "expires_at": _when(grant.expires_at), "created_at": _when(grant.created_at),
        "reason": grant.reason, "approver": grant.approver, "created_by": grant.created_by,
        "state": "revoked" if grant.revoked else ("active" if grant.active() else "expired"),
        "revoked_at": _when(grant.revoked_at) if grant.revoked_at else None,
        "revoked_by": grant.revoked_by,
    }


__all__ = ["add_grant_arguments", "cmd_grant"]
