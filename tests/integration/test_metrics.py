"""The Prometheus endpoint of a running pgveil (SPEC §7): every promised metric is exported,
counters move with real traffic by exactly what happened, labels stay bounded (roles, never
logins or SQL), and the health probes answer.

Why live: the metrics are fed from the wire path (statements, rows, denials, the audit writer,
the rewrite cache), so only traffic through a real proxy shows they are wired up.

Each test starts its own pgveil (``pgveil_factory``) so that no other test's traffic moves the
counters; the scrape is parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.localpg import LOGINS, pick_free_port
from tests.harness.pgveil_proc import PgveilProcess

Factory = Callable[..., PgveilProcess]
SPEC_METRICS = {
    # family name (as the parser reports it) -> type
    "pgveil_connections": "gauge",
    "pgveil_statements": "counter",
    "pgveil_protected_rows": "counter",
    "pgveil_blocked": "counter",
    "pgveil_statement_duration_seconds": "histogram",
    "pgveil_rewrite_duration_seconds": "histogram",
    "pgveil_rewrite_cache": "counter",
    "pgveil_audit_records": "counter",
    "pgveil_audit_failures": "counter",
    "pgveil_audit_queue": "gauge",
    "pgveil_policy_reloads": "counter",
    "pgveil_policy_info": "gauge",
    "pgveil_upstream_errors": "counter",
}
POLICY_ROLES = {"default", "teller", "manager", "auditor", "dba"}
PROTECTED = {"public.customers", "public.accounts", "public.orders"}
DECISIONS = {"allowed", "rewritten", "blocked", "failed"}


class Scrape:
    """One parsed /metrics response."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str) -> list[Any]:
        return [s for f in self.families.values() for s in f.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(s.value for s in self.samples(name)
                   if all(s.labels.get(k) == v for k, v in labels.items()))


def get(proc: PgveilProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(proc.metrics_url(path), timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(proc: PgveilProcess) -> Scrape:
    status, text = get(proc, "/metrics")
    assert status == 200
    return Scrape(text)


def teller_traffic(proc: PgveilProcess, n: int = 20) -> None:
    """n masked single-row lookups of SZ01 customers, same statement shape each time."""
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:
        conn.prepare_threshold = None  # Parse every time: each one is a rewrite-cache lookup
        for i in range(n):
            rows = conn.execute("select name, phone from customers where id = %s",
                                (3 * (i + 1),)).fetchall()
            assert len(rows) == 1


# --------------------------------------------------------------------------- presence, probes


def test_every_spec_metric_is_exported(pgveil_factory: Factory) -> None:
    proc = pgveil_factory()
    teller_traffic(proc, 2)
    s = scrape(proc)
    missing = {name for name in SPEC_METRICS if name not in s.families}
    assert not missing
    wrong = {n: s.families[n].type for n, t in SPEC_METRICS.items() if s.families[n].type != t}
    assert not wrong
    # the exact sample names a dashboard queries
    for name in ("pgveil_statements_total", "pgveil_protected_rows_total",
                 "pgveil_rewrite_cache_total", "pgveil_audit_records_total",
                 "pgveil_audit_failures_total", "pgveil_policy_reloads_total",
                 "pgveil_upstream_errors_total", "pgveil_statement_duration_seconds_bucket",
                 "pgveil_rewrite_duration_seconds_count", "pgveil_connections",
                 "pgveil_audit_queue", "pgveil_policy_info"):
        assert s.samples(name), name


def test_health_probes(pgveil_factory: Factory) -> None:
    proc = pgveil_factory()
    assert get(proc, "/healthz")[0] == 200
    assert get(proc, "/readyz")[0] == 200
    assert get(proc, "/no-such-page")[0] == 404


def test_policy_info_and_reload_counters_at_start(pgveil_factory: Factory) -> None:
    proc = pgveil_factory()
    s = scrape(proc)
    info = s.samples("pgveil_policy_info")
    assert len(info) == 1 and info[0].value == 1
    version = info[0].labels["version"]
    assert version and len(version) <= 64
    assert s.value("pgveil_policy_reloads_total", result="error") == 0
    assert {x.labels["result"] for x in s.samples("pgveil_policy_reloads_total")} >= {"ok",
                                                                                      "error"}


# --------------------------------------------------------------------------- counters move


def test_statement_row_cache_and_audit_counters(pgveil_factory: Factory) -> None:
    proc = pgveil_factory()
    before = scrape(proc)
    teller_traffic(proc, 20)
    after = scrape(proc)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("pgveil_statements_total", role="teller", decision="rewritten",
                 kind="select") == 20
    assert delta("pgveil_protected_rows_total", role="teller", table="public.customers") == 20
    assert delta("pgveil_audit_records_total") == 20
    assert delta("pgveil_audit_failures_total") == 0
    # the same statement shape: the first is analysed, the rest come from the cache
    assert delta("pgveil_rewrite_cache_total", result="hit") >= 19
    assert delta("pgveil_rewrite_cache_total", result="miss") <= 1
    assert delta("pgveil_statement_duration_seconds_count") >= 20
    assert delta("pgveil_rewrite_duration_seconds_count") >= 1
    assert delta("pgveil_blocked_total") == 0
    assert after.value("pgveil_audit_queue") == 0


def test_blocked_counter_per_reason(pgveil_factory: Factory) -> None:
    proc = pgveil_factory()
    before = scrape(proc)
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:
        for sql in ("copy customers to stdout", "select id from customers",
                    "select id, name from customers where level >= 1"):
            with pytest.raises(psycopg.Error) as info:
                conn.execute(sql)
            assert info.value.sqlstate == "42501"
    after = scrape(proc)

    def delta(**labels: str) -> float:
        return after.value("pgveil_blocked_total", **labels) - \
            before.value("pgveil_blocked_total", **labels)

    reasons = {s.labels["reason"] for s in after.samples("pgveil_blocked_total")}
    assert delta(role="teller") == 3, reasons
    assert delta(role="teller", reason="copy") == 1
    assert len(reasons) == 3, reasons  # copy, unbounded, row limit: one label each
    assert any("unbounded" in r for r in reasons) and any("row" in r for r in reasons)
    assert after.value("pgveil_statements_total", role="teller", decision="blocked") >= 3


def test_connections_gauge_follows_open_clients(pgveil_factory: Factory) -> None:
    proc = pgveil_factory()
    conns = [psycopg.connect(proc.dsn(login)) for login in ("dba", "teller_sz01", "auditor1")]
    try:
        assert scrape(proc).value("pgveil_connections") == 3
    finally:
        for c in conns:
            c.close()
    deadline = time.monotonic() + 5
    while scrape(proc).value("pgveil_connections") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scrape(proc).value("pgveil_connections") == 0


def test_upstream_errors_counted(pgveil_factory: Factory) -> None:
    dead = pick_free_port()
    proc = pgveil_factory({"upstream": {"port": dead}})
    before = scrape(proc).value("pgveil_upstream_errors_total")
    for _ in range(2):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proc.dsn("dba"), connect_timeout=10)
    assert scrape(proc).value("pgveil_upstream_errors_total") - before >= 2
    assert get(proc, "/healthz")[0] == 200


# --------------------------------------------------------------------------- bounded labels


def test_labels_are_bounded(pgveil_factory: Factory) -> None:
    proc = pgveil_factory()
    teller_traffic(proc, 3)
    with psycopg.connect(proc.dsn("teller_gz01"), autocommit=True) as conn:
        conn.execute("select phone from customers where id = 1").fetchall()
    with psycopg.connect(proc.dsn("dba"), autocommit=True) as conn:
        conn.execute("select count(*) from accounts where balance > 1").fetchall()
    with psycopg.connect(proc.dsn("stranger"), autocommit=True) as conn:
        conn.execute("select id from orders where id = 1").fetchall()
    first = scrape(proc)
    # many statements that differ only in text and literals must not add series
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:
        for i in range(30):
            conn.execute(f"select name /* q{i} */ from customers where id = {3 * (i + 1)} "
                         f"and level > {i % 5 - 10}").fetchall()
    second = scrape(proc)
    for login in set(LOGINS) - POLICY_ROLES:  # "dba" is both a login and a role
        assert login not in second.text, login
    assert "customers where" not in second.text and "/* q" not in second.text
    for family in second.families.values():
        for sample in family.samples:
            labels = sample.labels
            if "role" in labels:
                assert labels["role"] in POLICY_ROLES, sample
            if "table" in labels:
                assert labels["table"] in PROTECTED, sample
            if "decision" in labels:
                assert labels["decision"] in DECISIONS, sample
            for key, value in labels.items():
                assert len(value) <= 40 and "\n" not in value, (key, value)

    def series(s: Scrape) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {(x.name, tuple(sorted(x.labels.items()))) for f in s.families.values()
                for x in f.samples if not x.name.endswith(("_bucket", "_created"))}

    assert series(second) - series(first) == set()
