"""The ``pgveil`` command line: serve, demo, check, explain, discover, grant, audit, keygen.

Each subcommand is a thin function that parses arguments and calls into the module that does
the work, so the CLI holds no logic of its own. Exit codes: 0 success, 1 a check failed or the
input is invalid (config/policy errors print ``file:line: message``), 2 usage error, 3 a needed
service (database) was unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

EPILOG = """examples:
  pgveil demo                                   start the embedded demo (PostgreSQL + pgveil)
  pgveil serve -c pgveil.yaml                   run the proxy
  pgveil check -c pgveil.yaml                   validate config + policy (+ database)
  pgveil explain -c pgveil.yaml --as teller_sz01 "select phone from customers where id = 3"
  pgveil discover --dsn postgresql://dba@db/bank  propose a policy for personal data
  pgveil keygen --out keys/                     make the audit signing key pair
  pgveil audit verify audit/pgveil-audit.jsonl --key keys/audit.pub

exit codes: 0 ok, 1 check failed / invalid input, 2 usage, 3 service unreachable
"""


def _version() -> str:
    try:
        return version("pgveil")
    except PackageNotFoundError:
        return "0+unknown"


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _load_config(path: str):  # type: ignore[no-untyped-def]
    from proxy.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        sys.exit(1)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    _setup_logging(config.log_level)
    from proxy.workers import serve
    from rewriters.policy import PolicyError

    try:
        return serve(config)
    except PolicyError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pgveil: cannot listen on {config.listen.host}:{config.listen.port}: {exc}",
              file=sys.stderr)
        return 3


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    from proxy.checks import run_check

    return asyncio.run(run_check(config, database=args.database, offline=args.offline))


def cmd_explain(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    from proxy.checks import run_explain

    return asyncio.run(run_explain(config, login=args.login, sql=args.sql,
                                   database=args.database, client=args.client,
                                   application=args.application))


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(port=args.port, workdir=args.workdir, scale=args.scale)


def cmd_discover(args: argparse.Namespace) -> int:
    from proxy.discover import cmd_discover as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgveil", description="A PostgreSQL proxy that masks, filters, limits and audits "
        "access to customer data per operator.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"pgveil {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the proxy", description="Run the proxy. SIGHUP or a "
                       "change of the policy file reloads the policy; SIGTERM drains.",
                       epilog="example:\n  pgveil serve -c /etc/pgveil/pgveil.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-c", "--config", default=os.environ.get("PGVEIL_CONFIG", "pgveil.yaml"))
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check", help="validate config and policy (and the database)",
                       description="Validate pgveil.yaml and the policy; with a reachable "
                       "database also check every protected table and column exists and warn "
                       "about unclassified columns that look sensitive.",
                       epilog="example:\n  pgveil check -c pgveil.yaml --database bank",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-c", "--config", default=os.environ.get("PGVEIL_CONFIG", "pgveil.yaml"))
    s.add_argument("--database", default=None, help="database to check (default: from "
                   "control.dsn)")
    s.add_argument("--offline", action="store_true", help="do not connect to the database")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("explain", help="show what the policy does to a statement",
                       description="Show the operator's role, the decision, the tables and "
                       "columns touched, the reasons and the rewritten SQL.",
                       epilog='example:\n  pgveil explain -c pgveil.yaml --as teller_sz01 '
                       '"select phone from customers where id = 3"',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-c", "--config", default=os.environ.get("PGVEIL_CONFIG", "pgveil.yaml"))
    s.add_argument("--as", dest="login", required=True, help="the login to explain for")
    s.add_argument("--database", default="bank")
    s.add_argument("--client", default=None, help="client address for cidr matches")
    s.add_argument("--application", default="", help="application_name for matches")
    s.add_argument("sql")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("demo", help="start the embedded demo",
                       description="Start a local PostgreSQL with the demo bank data, pgveil "
                       "in front of it, and print psql lines for a teller, a manager, an "
                       "auditor and the DBA. Ctrl-C stops everything.",
                       epilog="example:\n  pgveil demo", formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--port", type=int, default=6432, help="pgveil's port (default 6432)")
    s.add_argument("--workdir", default=None, help="where to keep the demo cluster (default: "
                   "a temporary directory, removed on exit)")
    s.add_argument("--scale", type=int, default=2000, help="number of demo customers")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("discover", help="find columns holding personal data",
                       description="Scan a database for personal data by column name and by "
                       "sampled values; print a policy snippet.",
                       epilog="example:\n  pgveil discover --dsn postgresql://dba@127.0.0.1/bank",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--dsn", required=True)
    s.add_argument("--sample", type=int, default=200, help="rows sampled per table")
    s.add_argument("--schema", action="append", default=None, help="schema(s) to scan")
    s.set_defaults(func=cmd_discover)

    _add_audit_commands(sub)
    _add_grant_commands(sub)
    return p


def _add_audit_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        from proxy.audit_verify import add_audit_arguments
    except ImportError:
        return
    add_audit_arguments(sub)


def _add_grant_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        from proxy.grants import add_grant_arguments
    except ImportError:
        return
    add_grant_arguments(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "Path"]
