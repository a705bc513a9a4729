#!/usr/bin/env python3
"""pgbench: direct vs PgBouncer vs pgveil, from one command.

Why: pgveil's cost has to be a number a DBA can reproduce, next to the same workload direct to
PostgreSQL and through the pooler most sites already run. SPEC §8 asks for select-only, TPC-B-like
and a masked customer lookup as a teller, in simple and prepared protocol.

Flow::

    throwaway PostgreSQL (proxy/localpg.py): logins, `bank` (2000 customers), and
      `pgbench` (pgbench -i -s 2, owned by dba)
    PgBouncer (apt-get install pgbouncer when absent): session pooling, SCRAM auth_file built
      from pg_authid, run as the postgres user when we are root
    pgveil (`pgveil serve`): the reference policy minus the teller's quota, audit per --audit
    for each case (workload x protocol), for each round, for each target: pgbench -T SECONDS
      (targets interleaved within a round so drift on a shared machine hits all three alike)
    table: median TPS and average latency per target; median of the per-round ratios
      pgveil/direct and pgveil/pgbouncer
    cleanup (also on Ctrl-C / SIGTERM): pgveil, PgBouncer, PostgreSQL - each by its pid

Usage: ``.venv/bin/python bench/run.py [--seconds 10] [--clients 8] [--only select-only]``.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from proxy.localpg import (  # noqa: E402
    PostgresCluster,
    RunAs,
    clean_env,
    client_binary,
    make_temp_dir,
    password_for,
    pick_free_port,
    wait_for_port,
)
from tests.harness.pgveil_proc import (  # noqa: E402
    DEFAULT_POLICY,
    PgveilError,
    PgveilProcess,
    pgveil_command,
)

WORKLOAD_DIR = Path(__file__).resolve().parent / "workloads"
PGBENCH_DB = "pgbench"
PGBENCH_SCALE = 2
BANK_SCALE = 2000


class Target(enum.Enum):
    """Where pgbench connects."""

    DIRECT = "direct"
    PGBOUNCER = "pgbouncer"
    PGVEIL = "pgveil"
    RELAY = "relay"  # bench/relay.py: the floor of any Python asyncio proxy (opt-in)
    # bench/relay.py --audit, sent pgveil's rewritten statement: the floor of any Python proxy
    # that masks at the source and audits strictly (opt-in; rewritten workloads only)
    AUDIT_RELAY = "audit-relay"


class Protocol(enum.Enum):
    """pgbench -M: one Query message per statement, or Parse once then Bind/Execute."""

    SIMPLE = "simple"
    PREPARED = "prepared"


@dataclass(frozen=True)
class Workload:
    """One pgbench script against one database as one login."""

    name: str
    db: str
    login: str
    args: tuple[str, ...]
    note: str


WORKLOADS: tuple[Workload, ...] = (
    Workload("select-only", PGBENCH_DB, "dba", ("-S",), "pgbench -S (built-in select-only)"),
    Workload(
        "tpcb",
        PGBENCH_DB,
        "dba",
        (),
        "pgbench default TPC-B-like (7 statements per transaction, writes)",
    ),
    Workload(
        "masked-lookup",
        "bank",
        "teller_sz01",
        ("-f", str(WORKLOAD_DIR / "masked_lookup.sql")),
        "teller_sz01: SELECT * FROM customers WHERE id = :id (masked + branch filter in pgveil)",
    ),
)


@dataclass(frozen=True)
class Case:
    """A workload in one protocol: one row of the result table."""

    workload: Workload
    protocol: Protocol

    @property
    def name(self) -> str:
        return f"{self.workload.name} {self.protocol.value}"


@dataclass(frozen=True)
class Sample:
    """One pgbench run: TPS excluding connection time, average latency, or an error."""

    case: str
    target: str
    round: int
    tps: float | None
    latency_ms: float | None
    failed: int = 0
    error: str = ""
    cpu_us: float | None = None  # pgveil's CPU (all its processes) per transaction


@dataclass
class Endpoint:
    """A running target and how to reach it."""

    target: Target
    port: int
    stop: Callable[[], None] = field(repr=False)
    pid: int | None = None  # pgveil: its serve process (workers are its children)


def process_tree_cpu(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its children (pgveil's workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    found = False
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1]: the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick
            found = True
    return total if found else None


# --------------------------------------------------------------------------- cleanup


class Cleanup:
    """Callbacks run once, newest first, on normal exit, an exception, Ctrl-C or SIGTERM."""

    def __init__(self) -> None:
        self._callbacks: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, callback: Callable[[], None]) -> None:
        self._callbacks.append((what, callback))

    def run(self) -> None:
        while self._callbacks:
            what, callback = self._callbacks.pop()
            try:
                callback()
            except Exception as exc:  # cleanup must go on to the next process
                log(f"cleanup of {what} failed: {exc}")


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup


def setup_pgbench_db(pg: PostgresCluster) -> None:
    """Create and initialise the pgbench database (owned by dba), then VACUUM ANALYZE it."""
    pg.psql(f"CREATE DATABASE {PGBENCH_DB} OWNER dba", db="postgres")
    cmd = [
        client_binary(pg.bin_dir, "pgbench"),
        "-i",
        "-q",
        "-s",
        str(PGBENCH_SCALE),
        "-h",
        pg.host,
        "-p",
        str(pg.port),
        "-U",
        "dba",
        PGBENCH_DB,
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=clean_env({"PGPASSWORD": password_for("dba")}),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{proc.stderr}")
    pg.psql("VACUUM ANALYZE", db=PGBENCH_DB)


def find_pgbouncer(install: bool) -> str | None:
    """The pgbouncer binary; installed with apt-get when absent, we are root and allowed."""
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    log("pgbouncer not found: apt-get install -y pgbouncer")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "pgbouncer"]):
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            return None
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def start_pgbouncer(pg: PostgresCluster, binary: str, pool_size: int, cleanup: Cleanup) -> Endpoint:
    """PgBouncer in session mode with a SCRAM auth_file copied from pg_authid.

    With the server's own SCRAM verifiers in auth_file, PgBouncer authenticates the client and
    then logs in to PostgreSQL with the keys from that exchange — no plain passwords on disk.
    """
    run_as = RunAs.for_server()
    work = make_temp_dir("pgveil-bench-bouncer-", run_as)
    cleanup.push("pgbouncer dir", lambda: shutil.rmtree(work, ignore_errors=True))
    rows = pg.psql(
        "SELECT rolname || ' ' || rolpassword FROM pg_authid "
        "WHERE rolcanlogin AND rolpassword IS NOT NULL ORDER BY 1",
        db="postgres",
    ).splitlines()
    userlist = work / "userlist.txt"
    userlist.write_text(
        "".join(f'"{name}" "{secret}"\n' for name, secret in (r.split(" ", 1) for r in rows)),
        encoding="utf-8",
    )
    port = pick_free_port(exclude={pg.port})
    ini = work / "pgbouncer.ini"
    ini.write_text(
        "\n".join(
            [
                "[databases]",
                f"* = host={pg.host} port={pg.port}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = scram-sha-256",
                f"auth_file = {userlist}",
                "pool_mode = session",
                "max_client_conn = 1000",
                f"default_pool_size = {pool_size}",
                "ignore_startup_parameters = extra_float_digits,options",
                f"logfile = {work / 'pgbouncer.log'}",
                "log_connections = 0",
                "log_disconnections = 0",
                "",
            ]
        ),
        encoding="utf-8",
    )
    for path in (userlist, ini):
        os.chmod(path, 0o600)
        run_as.own(path)
    proc = subprocess.Popen(  # type: ignore[call-overload]
        [binary, str(ini)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=work,
        env=clean_env(),
        start_new_session=True,
        **run_as.popen_kwargs(),
    )

    def stop() -> None:
        _stop_process(proc)

    cleanup.push("pgbouncer", stop)
    if not wait_for_port("127.0.0.1", port, 20) or proc.poll() is not None:
        logtext = (work / "pgbouncer.log").read_text(errors="replace") if work.exists() else ""
        raise RuntimeError(f"pgbouncer did not start:\n{logtext[-3000:]}")
    return Endpoint(Target.PGBOUNCER, port, stop)


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s; by the process's own pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def bench_policy(work: Path) -> Path:
    """A copy of config/policy.yaml without the teller's quota (2000 rows/h would cut the run)."""
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    for role in (policy.get("roles") or {}).values():
        if isinstance(role, dict):
            role.pop("quota", None)
    path = work / "policy-bench.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def audit_overrides(mode: str) -> dict[str, Any]:
    """pgveil.yaml audit settings for --audit: strict / batch durability, or no audit section."""
    if mode == "off":
        return {"audit": None}
    return {"audit": {"durability": mode}}


def start_pgveil(
    pg: PostgresCluster, audit: str, workers: int, work: Path, cleanup: Cleanup
) -> Endpoint:
    """pgveil serve with the bench policy; its own temp dir holds config, audit file and log."""
    overrides: dict[str, Any] = {"workers": workers, **audit_overrides(audit)}
    proc = PgveilProcess(pg, overrides, policy_path=bench_policy(work))
    cleanup.push("pgveil", proc.cleanup)
    proc.start()
    return Endpoint(Target.PGVEIL, proc.port, proc.stop, pid=proc.pid)


def start_relay(pg: PostgresCluster, cleanup: Cleanup, audit_file: Path | None = None) -> Endpoint:
    """bench/relay.py in front of PostgreSQL: what forwarding alone costs in Python + uvloop;
    with ``audit_file``, forwarding plus strict audit records (the ``audit-relay`` target)."""
    port = pick_free_port()
    extra = ["--audit", str(audit_file)] if audit_file is not None else []
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parent / "relay.py"),
            *extra,
            str(port),
            str(pg.port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        _stop_process(proc)

    target = Target.RELAY if audit_file is None else Target.AUDIT_RELAY
    cleanup.push(target.value, stop)
    if not wait_for_port("127.0.0.1", port, 15):
        raise RuntimeError("bench/relay.py did not listen within 15 s")
    return Endpoint(target, port, stop, pid=proc.pid)


def rewritten_workloads(pg: PostgresCluster, work: Path) -> dict[str, Workload]:
    """The workloads pgveil rewrites, with their statement replaced by what pgveil sends
    PostgreSQL (``pgveil explain``, bench policy): what the ``audit-relay`` target runs, so
    that PostgreSQL does the same work behind it as behind pgveil. Keyed by workload name."""
    proc = PgveilProcess(pg, {}, policy_path=bench_policy(work))
    config = proc.write_config()
    out: dict[str, Workload] = {}
    for wl in WORKLOADS:
        if "-f" not in wl.args:
            continue
        script = Path(wl.args[wl.args.index("-f") + 1])
        lines = script.read_text(encoding="utf-8").splitlines()
        sql_at = [
            i for i, line in enumerate(lines) if line.strip() and not line.startswith(("--", "\\"))
        ]
        if len(sql_at) != 1:
            continue
        variables = re.findall(r":(\w+)", lines[sql_at[0]])
        sql = lines[sql_at[0]].rstrip().rstrip(";")
        for n, name in enumerate(variables, 1):
            sql = sql.replace(f":{name}", f"${n}", 1)
        shown = subprocess.run(
            [*pgveil_command(config)[:-3], "explain", "-c", str(config), "--as", wl.login, sql],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout
        if "sent to PostgreSQL:" not in shown or ": rewrite (" not in shown:
            continue  # not rewritten for this login: nothing to compare
        sent = " ".join(
            part.strip()
            for part in shown.split("sent to PostgreSQL:", 1)[1].splitlines()
            if part.strip()
        )
        for n, name in reversed(list(enumerate(variables, 1))):
            sent = sent.replace(f"${n}", f":{name}")
        lines[sql_at[0]] = sent + ";"
        log(f"audit-relay: {wl.name} sends pgveil's statement: {sent[:90]} ...")
        path = work / f"{script.stem}.rewritten.sql"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[wl.name] = replace(wl, args=("-f", str(path)))
    return out


# --------------------------------------------------------------------------- running pgbench

_TPS_RE = re.compile(
    r"^tps = ([0-9.]+) \((?:without initial connection time|excluding connections establishing)\)",
    re.M,
)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
_DONE_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


def run_pgbench(
    pg: PostgresCluster,
    endpoint: Endpoint,
    case: Case,
    seconds: int,
    clients: int,
    round_no: int,
) -> Sample:
    """One pgbench run; a non-zero exit or missing numbers become a Sample with ``error``."""
    wl = case.workload
    cmd = [
        client_binary(pg.bin_dir, "pgbench"),
        "-n",
        "-T",
        str(seconds),
        "-c",
        str(clients),
        "-j",
        str(min(clients, os.cpu_count() or 1)),
        "-M",
        case.protocol.value,
        "-h",
        "127.0.0.1",
        "-p",
        str(endpoint.port),
        "-U",
        wl.login,
        *wl.args,
        wl.db,
    ]
    env = clean_env({"PGPASSWORD": password_for(wl.login), "PGSSLMODE": "disable"})
    cpu_before = process_tree_cpu(endpoint.pid) if endpoint.pid else None
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=seconds + 120, check=False
    )
    cpu_after = process_tree_cpu(endpoint.pid) if endpoint.pid else None
    done = _DONE_RE.search(proc.stdout)
    cpu_us = None
    if cpu_before is not None and cpu_after is not None and done and int(done.group(1)):
        cpu_us = (cpu_after - cpu_before) * 1e6 / int(done.group(1))
    tps = _TPS_RE.search(proc.stdout)
    lat = _LAT_RE.search(proc.stdout)
    failed = _FAILED_RE.search(proc.stdout)
    error = ""
    if proc.returncode != 0 or not tps or not lat:
        error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
    return Sample(
        case=case.name,
        target=endpoint.target.value,
        round=round_no,
        tps=float(tps.group(1)) if tps and not error else None,
        latency_ms=float(lat.group(1)) if lat and not error else None,
        failed=int(failed.group(1)) if failed else 0,
        error=error,
        cpu_us=cpu_us if not error else None,
    )


def select_cases(only: Sequence[str]) -> list[Case]:
    """All workload x protocol cases, or those whose name starts with an --only value.

    ``--only select-only`` picks both protocols; ``--only "tpcb prepared"`` or
    ``--only tpcb/prepared`` picks one.
    """
    cases = [Case(w, p) for w in WORKLOADS for p in Protocol]
    wanted = [
        o.replace("/", " ").replace(":", " ").strip() for item in only for o in item.split(",")
    ]
    wanted = [w for w in wanted if w]
    if not wanted:
        return cases
    chosen = [c for c in cases if any(c.name == w or c.workload.name == w for w in wanted)]
    if not chosen:
        names = ", ".join(sorted({w.name for w in WORKLOADS}))
        raise SystemExit(
            f"--only matched nothing; workloads: {names} (optionally + simple|prepared)"
        )
    return chosen


# --------------------------------------------------------------------------- report


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratios(samples: Sequence[Sample], num: str, den: str) -> list[float]:
    """Per-round TPS ratios num/den (rounds pair runs that ran back to back)."""
    by = {(s.target, s.round): s.tps for s in samples}
    out = []
    for rnd in sorted({s.round for s in samples}):
        a, b = by.get((num, rnd)), by.get((den, rnd))
        if a and b:
            out.append(a / b)
    return out


def render_table(
    cases: Sequence[Case], samples: Sequence[Sample], targets: Sequence[Target]
) -> str:
    """Median TPS / latency per target and median pgveil ratios, one row per case."""
    names = [t.value for t in targets]
    header = ["case"]
    for name in names:
        header += [f"{name} tps", f"{name} ms"]
    ratio_cols = []
    if "pgveil" in names and "direct" in names:
        ratio_cols.append(("pgveil", "direct"))
    if "pgveil" in names and "pgbouncer" in names:
        ratio_cols.append(("pgveil", "pgbouncer"))
    if "pgbouncer" in names and "direct" in names:
        ratio_cols.append(("pgbouncer", "direct"))
    for floor in ("relay", "audit-relay"):
        if floor in names and "pgbouncer" in names:
            ratio_cols.append((floor, "pgbouncer"))
    header += [f"{a}/{b}" for a, b in ratio_cols]
    cpu_cols = [n for n in ("relay", "audit-relay", "pgveil") if n in names]
    header += [f"{n} cpu µs/txn" for n in cpu_cols]

    rows = []
    for case in cases:
        mine = [s for s in samples if s.case == case.name]
        row = [case.name]
        for name in names:
            tps = _median([s.tps for s in mine if s.target == name])
            lat = _median([s.latency_ms for s in mine if s.target == name])
            row += [f"{tps:,.0f}" if tps else "n/a", f"{lat:.3f}" if lat else "n/a"]
        for a, b in ratio_cols:
            ratio = _median(_ratios(mine, a, b))
            row.append(f"{ratio:.2f}" if ratio else "n/a")
        for name in cpu_cols:
            cpu = _median([s.cpu_us for s in mine if s.target == name])
            row.append(f"{cpu:.0f}" if cpu else "n/a")
        rows.append(row)

    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for idx, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if idx == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pgbench TPS and latency: direct vs PgBouncer vs pgveil",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T per run")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=2, help="seconds per target before a case")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="workload (select-only, tpcb, masked-lookup), optionally 'NAME simple|prepared'; "
        "repeatable",
    )
    parser.add_argument(
        "--targets",
        default="direct,pgbouncer,pgveil",
        help="comma-separated subset of direct,pgbouncer,pgveil,relay,audit-relay (relay: "
        "bench/relay.py, a bare Python relay, the floor of any asyncio proxy; audit-relay: the "
        "relay sent pgveil's rewritten statement, holding each result for a strict audit record "
        "-- the floor of a Python proxy doing pgveil's job)",
    )
    parser.add_argument(
        "--audit",
        choices=("strict", "batch", "off"),
        default="strict",
        help="pgveil audit durability (off = no audit section in pgveil.yaml)",
    )
    parser.add_argument("--workers", type=int, default=1, help="pgveil worker processes")
    parser.add_argument(
        "--no-install", action="store_true", help="do not apt-get install pgbouncer when absent"
    )
    parser.add_argument("--json", type=Path, help="also write all samples as JSON here")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _signals_as_exit() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP unwind through ``finally``, so every started process gets stopped."""
    old = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Also when started with SIGINT ignored (a background job of a script): Ctrl-C must unwind.
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        targets = [Target(t.strip()) for t in args.targets.split(",") if t.strip()]
    except ValueError as exc:
        raise SystemExit(f"--targets: {exc}") from exc
    cases = select_cases(args.only)
    cleanup = Cleanup()
    samples: list[Sample] = []
    version = ""
    notes: list[str] = []
    with _signals_as_exit():
        try:
            bouncer_bin = None
            if Target.PGBOUNCER in targets:
                bouncer_bin = find_pgbouncer(install=not args.no_install)
                if bouncer_bin is None:
                    notes.append("pgbouncer: not installed, skipped")
                    targets.remove(Target.PGBOUNCER)

            log("starting PostgreSQL ...")
            pg = PostgresCluster.create(scale=BANK_SCALE)
            cleanup.push("postgres", pg.cleanup)
            if any(c.workload.db == PGBENCH_DB for c in cases):
                setup_pgbench_db(pg)
            work = make_temp_dir("pgveil-bench-", RunAs(None, None, None))
            cleanup.push("bench dir", lambda: shutil.rmtree(work, ignore_errors=True))

            endpoints: dict[Target, Endpoint] = {}
            if Target.DIRECT in targets:
                endpoints[Target.DIRECT] = Endpoint(Target.DIRECT, pg.port, lambda: None)
            if Target.PGBOUNCER in targets and bouncer_bin:
                endpoints[Target.PGBOUNCER] = start_pgbouncer(
                    pg, bouncer_bin, args.clients + 4, cleanup
                )
            if Target.RELAY in targets:
                endpoints[Target.RELAY] = start_relay(pg, cleanup)
            rewritten: dict[str, Workload] = {}
            if Target.AUDIT_RELAY in targets:
                rewritten = rewritten_workloads(pg, work)
                if rewritten:
                    endpoints[Target.AUDIT_RELAY] = start_relay(
                        pg, cleanup, work / "audit-relay.jsonl"
                    )
                else:
                    notes.append("audit-relay: pgveil explain rewrote no workload, skipped")
            if Target.PGVEIL in targets:
                try:
                    endpoints[Target.PGVEIL] = start_pgveil(
                        pg, args.audit, args.workers, work, cleanup
                    )
                except PgveilError as exc:
                    why = (exc.log_tail.strip().splitlines() or ["no output"])[-1]
                    notes.append(f"pgveil: did not start, skipped ({why[:160]})")
                    log(str(exc))
                    targets.remove(Target.PGVEIL)
            targets = [t for t in targets if t in endpoints]
            if not targets:
                raise SystemExit("no target could be started")

            version = subprocess.run(
                [client_binary(pg.bin_dir, "pgbench"), "--version"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            for case in cases:
                runs = {t: case for t in targets}
                if Target.AUDIT_RELAY in runs:  # the rewritten statement, or nothing to compare
                    wl = rewritten.get(case.workload.name)
                    if wl is None:
                        del runs[Target.AUDIT_RELAY]
                    else:
                        runs[Target.AUDIT_RELAY] = Case(wl, case.protocol)
                for target, run in runs.items():
                    if args.warmup > 0:
                        run_pgbench(pg, endpoints[target], run, args.warmup, args.clients, 0)
                for rnd in range(1, args.rounds + 1):
                    for target, run in runs.items():
                        sample = run_pgbench(
                            pg, endpoints[target], run, args.seconds, args.clients, rnd
                        )
                        samples.append(sample)
                        shown = (
                            f"{sample.tps:,.0f} tps {sample.latency_ms:.3f} ms"
                            if sample.tps is not None and sample.latency_ms is not None
                            else f"ERROR {sample.error}"
                        )
                        log(f"[{rnd}/{args.rounds}] {case.name:<24} {target.value:<10} {shown}")
        finally:
            log("stopping everything ...")
            cleanup.run()

    print()
    print(
        f"{version}; {args.clients} clients, {args.seconds} s x {args.rounds} interleaved "
        f"rounds (medians); pgveil audit={args.audit}, workers={args.workers}; "
        f"{os.cpu_count()} CPUs shared by server, proxies and pgbench"
    )
    for wl in WORKLOADS:
        if any(c.workload is wl for c in cases):
            print(f"  {wl.name}: {wl.note}; db {wl.db}")
    print()
    print(render_table(cases, samples, targets))
    errors = [s for s in samples if s.error]
    failed = [s for s in samples if s.failed]
    for s in errors:
        notes.append(f"{s.case} / {s.target} round {s.round}: {s.error}")
    for s in failed:
        notes.append(f"{s.case} / {s.target} round {s.round}: {s.failed} failed transactions")
    if notes:
        print()
        for note in notes:
            print(f"note: {note}")
    print(
        "\nratios are TPS ratios (1.00 = same throughput; 0.80 = 20% fewer transactions/s);"
        "\ncpu: CPU time of the proxy's processes per transaction (user + system)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "pgbench": version,
                    "samples": [asdict(s) for s in samples],
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
