"""The audit trail of a running pgveil (SPEC §6): exactly one record per statement that touches a
protected table — blocked and failed ones included — with every field right, statements stored
without their values, a chain that ``pgveil audit verify`` trusts and that tampering breaks, and
``audit.on_failure: block`` refusing customer-table statements while the log cannot be written.

Why live: the record is assembled from what happened on the wire (rows sent, errors, the
client's address and application_name), and strict durability is a promise about the order of
the record and the result, so only a real proxy with real clients can show it.

Data flow: a module-scoped pgveil with its own audit file and signing key runs ``WORKLOAD`` (a
list of :class:`Stmt`, each saying what its record must contain) twice from several logins and
clients; the proxy is then stopped (final checkpoint) and the records are compared in order,
field by field, with the expectations. Tamper tests edit copies of that file. The audit.all and
on_failure tests start their own pgveil with ``pgveil_factory``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import pytest

from proxy.localpg import PostgresCluster, clean_env
from tests.harness.pgveil_proc import PgveilProcess

CHECKPOINT = "checkpoint"
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$")
REPEAT = 2  # the workload runs twice: record counts must scale exactly


def pgveil_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "pgveil"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "proxy"]
    env = {k: v for k, v in clean_env().items() if not k.startswith("PGVEIL_")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def cli_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``pgveil ARGS`` through the same entry point as the console script, without paying
    for a new interpreter per call (the subprocess path is exercised by the other tests)."""
    from proxy.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def statement_records(path: Path) -> list[dict[str, Any]]:
    """Statement records (no checkpoints, no grant events) in file order."""
    out = []
    for rec in all_records(path):
        kind = str(rec.get("kind"))
        if kind != CHECKPOINT and not kind.startswith("grant_"):
            out.append(rec)
    return out


def all_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def client_address(conn: psycopg.Connection[Any]) -> str:
    """host:port of the client end of a psycopg connection, as pgveil sees it."""
    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        host, port = sock.getsockname()[:2]
    finally:
        sock.detach()
    return f"{host}:{port}"


def redaction_pattern(sql: str) -> re.Pattern[str]:
    """The client's SQL with every literal replaced by ``?`` (``$n`` kept), as a regex that
    tolerates whitespace and case changes."""
    parts = re.split(r"(\$\d+|'(?:[^']|'')*'|(?<![\w$])\d+(?:\.\d+)?)", sql)
    rx: list[str] = []
    for i, part in enumerate(parts):
        if i % 2:
            rx.append(re.escape(part) if part.startswith("$") else r"\?")
        else:
            rx.extend(re.escape(word) for word in part.split())
    return re.compile(r"\s*".join(rx), re.IGNORECASE)


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Stmt:
    """One statement and what its audit record must say (None = no record)."""

    login: str
    sql: str
    params: tuple[Any, ...] | None = None
    kind: str = "select"
    tables: tuple[str, ...] = ()
    columns: frozenset[str] = frozenset()  # sensitive columns the record must list
    decision: tuple[str, ...] = ()  # acceptable decisions; empty = no record expected
    rows: tuple[int, ...] = (0,)  # acceptable row counts
    error: str | None = None  # substring of the record's error (None: error must be null)
    reasons: tuple[str, ...] = ()  # substrings each of which some reason must contain
    secrets: tuple[str, ...] = ()  # values that must not appear anywhere in the record
    how: str = "execute"  # execute | copy | rollback (run in a transaction rolled back)

    @property
    def audited(self) -> bool:
        return bool(self.decision)


ROLE = {"teller_sz01": "teller", "dba": "dba", "manager_sz01": "manager"}
CUST = "public.customers"
ACCT = "public.accounts"
ORD = "public.orders"


def workload(raw: dict[int, tuple[Any, ...]]) -> list[Stmt]:
    phone3, idn3, phone6 = raw[3][0], raw[3][1], raw[6][0]
    return [
        Stmt("teller_sz01", "select name, phone from customers where id = 3",
             tables=(CUST,), columns=frozenset({f"{CUST}.name", f"{CUST}.phone"}),
             decision=("rewritten",), rows=(1,),
             reasons=(f"mask {CUST}.phone: phone", f"mask {CUST}.name: chinese_name",
                      "row filter teller")),
        Stmt("teller_sz01", "select count(*) from accounts where balance > 100",
             tables=(ACCT,), columns=frozenset({f"{ACCT}.balance"}), decision=("rewritten",),
             rows=(1,), reasons=("row filter teller",)),
        Stmt("teller_sz01", "copy customers to stdout", kind="copy", tables=(CUST,),
             decision=("blocked",), rows=(0,), error="", reasons=("copy",), how="copy"),
        Stmt("teller_sz01", "select name from branches"),  # unprotected: no record
        Stmt("teller_sz01", "update customers set level = level where id = 3", kind="update",
             tables=(CUST,), decision=("rewritten",), rows=(0, 1), how="rollback"),
        Stmt("teller_sz01", "insert into orders (customer_id, amount, note) "
             "values (3, 12.5, 'audit test')", kind="insert", tables=(ORD,),
             decision=("rewritten", "allowed"), rows=(0, 1), how="rollback"),
        Stmt("teller_sz01", "select 1 / (id - 3) from customers where id = 3", tables=(CUST,),
             decision=("failed",), rows=(0,), error="division by zero"),
        Stmt("teller_sz01", "select phone from customers where id = %s", params=(6,),
             tables=(CUST,), columns=frozenset({f"{CUST}.phone"}), decision=("rewritten",),
             rows=(1,), reasons=(f"mask {CUST}.phone: phone",)),
        Stmt("teller_sz01", "select id from customers where id_number = %s", params=(idn3,),
             tables=(CUST,), columns=frozenset({f"{CUST}.id_number"}), decision=("rewritten",),
             rows=(1,), reasons=(f"lookup {CUST}.id_number",), secrets=(idn3,)),
        Stmt("teller_sz01", f"select id from customers where phone = '{phone6}'",
             tables=(CUST,), columns=frozenset({f"{CUST}.phone"}), decision=("rewritten",),
             rows=(1,), reasons=(f"lookup {CUST}.phone",), secrets=(phone6,)),
        Stmt("teller_sz01", "select id, name from customers where level >= 1", tables=(CUST,),
             columns=frozenset({f"{CUST}.name"}), decision=("blocked",), rows=(50,), error="",
             reasons=("row limit",)),
        Stmt("teller_sz01", "select 1"),
        Stmt("dba", f"select phone from customers where phone = '{phone3}'", tables=(CUST,),
             columns=frozenset({f"{CUST}.phone"}), decision=("allowed",), rows=(1,),
             secrets=(phone3,)),
        Stmt("dba", "select 1"),
        Stmt("dba", "set statement_timeout = 0"),
        Stmt("manager_sz01", "select o.amount from orders o where o.customer_id = 3",
             tables=(ORD,), decision=("allowed",), rows=(1, 2, 3, 4, 5, 6)),
        Stmt("manager_sz01", "select name, balance from customers c join accounts a "
             "on a.customer_id = c.id where c.id = %s", params=(3,), tables=(CUST, ACCT),
             columns=frozenset({f"{CUST}.name", f"{ACCT}.balance"}), decision=("rewritten",),
             rows=(1, 2)),
    ]


MULTI = ("select name from customers where id = 3; "
         "select balance from accounts where customer_id = 3")


@dataclass
class Run:
    """What the workload did: expectations paired with the connection that ran them."""

    proc: PgveilProcess
    pub_key: Path
    stmts: list[tuple[Stmt, str, int]] = field(default_factory=list)  # (stmt, client, rows)
    sessions: dict[str, str] = field(default_factory=dict)  # login -> client address
    records: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    multi_client: str = ""
    multi_rows: tuple[int, int] = (0, 0)
    strict_ok: list[bool] = field(default_factory=list)


def _execute(conn: psycopg.Connection[Any], st: Stmt) -> int:
    """Run one statement, return the rows the client received (errors are expected)."""
    try:
        if st.how == "copy":
            with conn.cursor().copy(st.sql) as copy:
                return sum(1 for _ in copy.rows())
        if st.how == "rollback":
            with conn.transaction(force_rollback=True):
                conn.execute(st.sql, st.params)
            return 0
        cur = conn.execute(st.sql, st.params)
        return len(cur.fetchall()) if cur.description is not None else 0
    except psycopg.Error:
        return 0


@pytest.fixture(scope="module")
def raw(pg: PostgresCluster) -> dict[int, tuple[Any, ...]]:
    with psycopg.connect(pg.dsn("dba")) as conn:
        return {r[0]: r[1:] for r in conn.execute(
            "select id, phone, id_number from customers where id <= 12").fetchall()}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("keys") / "k"
    r = pgveil_cli("keygen", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out / "audit.key", out / "audit.pub"


@pytest.fixture(scope="module")
def run(pg: PostgresCluster, raw: dict[int, tuple[Any, ...]],
        keys: tuple[Path, Path]) -> Iterator[Run]:
    proc = PgveilProcess(pg, {"audit": {"signing_key": str(keys[0]), "checkpoint_every": 7}})
    proc.start()
    try:
        result = Run(proc, keys[1])
        stmts = workload(raw)
        conns = {login: psycopg.connect(proc.dsn(login, application_name=f"app-{login}"),
                                        autocommit=True) for login in ROLE}
        try:
            result.sessions = {login: client_address(c) for login, c in conns.items()}
            for _ in range(REPEAT):
                for st in stmts:
                    before = len(statement_records(proc.audit_path))
                    rows = _execute(conns[st.login], st)
                    # strict durability: the record is on disk when the result is released
                    result.strict_ok.append(
                        len(statement_records(proc.audit_path)) == before + int(st.audited))
                    result.stmts.append((st, result.sessions[st.login], rows))
        finally:
            for c in conns.values():
                c.close()
        # a multi-statement simple Query (psycopg2 sends the text as one Query message)
        with psycopg2.connect(proc.dsn("teller_sz01", application_name="app-multi")) as c2:
            cur = c2.cursor()
            cur.execute(MULTI)
            cur.execute("select inet_client_port()")  # unprotected: no record
            fd = c2.fileno()
            sock = socket.socket(fileno=fd)
            try:
                host, port = sock.getsockname()[:2]
            finally:
                sock.detach()
            result.multi_client = f"{host}:{port}"
        proc.stop()  # graceful: the final checkpoint closes the chain
        result.lines = [ln for ln in proc.audit_path.read_text(encoding="utf-8").splitlines()
                        if ln.strip()]
        result.records = statement_records(proc.audit_path)
        yield result
    finally:
        proc.cleanup()


def _expected(run: Run) -> list[tuple[Stmt, str, int]]:
    return [(st, client, rows) for st, client, rows in run.stmts if st.audited]


# --------------------------------------------------------------------------- counts and fields


def test_one_record_per_protected_statement(run: Run) -> None:
    expected = _expected(run)
    # + the two statements of the multi-statement query
    assert len(run.records) == len(expected) + 2
    got_sql = [r["statement"] for r in run.records[:len(expected)]]
    for (st, _client, _rows), stmt in zip(expected, got_sql, strict=True):
        assert redaction_pattern(st.sql.replace("%s", "$1")).fullmatch(stmt or ""), \
            (st.sql, stmt)


def test_no_record_for_unprotected_statements(run: Run) -> None:
    for rec in run.records:
        assert rec.get("tables"), rec
        assert any(t in (CUST, ACCT, ORD) for t in rec["tables"]), rec


@pytest.mark.parametrize("index", range(13))
def test_record_fields(run: Run, index: int) -> None:
    expected = _expected(run)
    if index >= len(expected) // REPEAT:
        pytest.fail("workload shorter than the parametrization")
    for rep in range(REPEAT):
        i = rep * (len(expected) // REPEAT) + index
        st, client, rows = expected[i]
        rec = run.records[i]
        where = f"{st.sql!r} (run {rep + 1})"
        assert rec["operator"] == st.login, where
        assert rec["role"] == ROLE[st.login], where
        assert rec["client"] == client, where
        assert rec["application"] == f"app-{st.login}", where
        assert rec["database"] == "bank", where
        assert rec["kind"] == st.kind, where
        assert sorted(rec["tables"]) == sorted(st.tables), where
        assert st.columns <= set(rec["columns"]), (where, rec["columns"])
        assert rec["decision"] in st.decision, (where, rec["decision"], rec.get("reasons"))
        for needle in st.reasons:
            assert any(needle.lower() in r.lower() for r in rec["reasons"]), \
                (where, needle, rec["reasons"])
        assert rec["rows"] in st.rows, (where, rec["rows"])
        if rec["decision"] in ("rewritten", "allowed") and st.how == "execute":
            assert rec["rows"] == rows, (where, "rows returned", rows)
        assert isinstance(rec["duration_ms"], (int, float)) and rec["duration_ms"] > 0, where
        if st.error is None:
            assert rec["error"] is None, (where, rec["error"])
        else:
            assert isinstance(rec["error"], str) and st.error in rec["error"], \
                (where, rec["error"])
        assert rec["grant"] is None, where
        assert TS.match(rec["ts"]), rec["ts"]
        line = json.dumps(rec, ensure_ascii=False)
        for secret in st.secrets:
            assert secret not in line, (where, secret)


def test_sessions_are_per_connection(run: Run) -> None:
    by_login: dict[str, set[str]] = {}
    for rec in run.records:
        by_login.setdefault(rec["client"], set()).add(rec["session"])
    assert all(len(s) == 1 for s in by_login.values()), by_login
    sessions = [next(iter(s)) for s in by_login.values()]
    assert len(set(sessions)) == len(sessions) and all(sessions)


def test_multi_statement_query_gets_one_record_each(run: Run) -> None:
    first, second = run.records[-2:]
    assert first["client"] == second["client"] == run.multi_client
    assert first["application"] == "app-multi"
    assert first["tables"] == [CUST] and second["tables"] == [ACCT]
    assert redaction_pattern("select name from customers where id = 3").fullmatch(
        first["statement"]), first["statement"]
    assert redaction_pattern("select balance from accounts where customer_id = 3").fullmatch(
        second["statement"]), second["statement"]
    assert first["rows"] == 1 and second["rows"] >= 1
    assert first["decision"] == second["decision"] == "rewritten"


def test_statements_are_redacted_and_the_operators_own(run: Run) -> None:
    """Stored: the client's statement with literals replaced — no values, not the rewrite."""
    text = "\n".join(run.lines)
    for rec in run.records:
        assert "pg_catalog" not in rec["statement"] and "CASE WHEN" not in rec["statement"]
    for st, _client, _rows in run.stmts:
        for secret in st.secrets:
            assert secret not in text


def test_strict_durability_record_before_result(run: Run) -> None:
    assert all(run.strict_ok), run.strict_ok


def test_chain_fields(run: Run) -> None:
    recs = [json.loads(ln) for ln in run.lines]
    chains = {r["chain"] for r in recs}
    assert len(chains) == 1
    assert [r["seq"] for r in recs] == list(range(recs[0]["seq"], recs[0]["seq"] + len(recs)))
    for prev, cur in zip(recs, recs[1:], strict=False):
        assert cur["prev"] == prev["hash"]
    for ln in run.lines:
        body, _, tail = ln.rpartition(',"hash":"')
        assert hashlib.sha256((body + "}").encode()).hexdigest() == tail[:-2]
    checkpoints = [r for r in recs if r["kind"] == CHECKPOINT]
    assert checkpoints[0]["seq"] == recs[0]["seq"]  # a chain starts with a checkpoint
    assert checkpoints[-1] is recs[-1] and checkpoints[-1].get("final") is True
    assert all(c["sig"] for c in checkpoints)
    assert len(checkpoints) >= len(run.records) // 7


# --------------------------------------------------------------------------- verify and tamper


def test_audit_verify_passes_on_the_untouched_log(run: Run, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(run.lines) + "\n", encoding="utf-8")
    r = pgveil_cli("audit", "verify", str(log), "--key", str(run.pub_key))
    assert r.returncode == 0, r.stdout + r.stderr
    r = pgveil_cli("audit", "verify", str(log), "--key", str(run.pub_key), "--closed")
    assert r.returncode == 0, r.stdout + r.stderr


def _rehash(line: str, **changes: Any) -> str:
    rec = json.loads(line)
    rec.update(changes)
    rec.pop("hash")
    body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return body[:-1] + f',"hash":"{digest}"}}'


def _statement_line_indexes(lines: list[str]) -> list[int]:
    return [i for i, ln in enumerate(lines) if json.loads(ln)["kind"] != CHECKPOINT]


TAMPER: dict[str, Callable[[list[str], int], None]] = {
    "edit": lambda ls, i: ls.__setitem__(i, ls[i].replace('"rows":1,', '"rows":2,', 1)),
    "edit-operator": lambda ls, i: ls.__setitem__(
        i, re.sub(r'"operator":"[^"]*"', '"operator":"someone_else"', ls[i], count=1)),
    "edit-and-rehash": lambda ls, i: ls.__setitem__(i, _rehash(ls[i], rows=0)),
    "delete": lambda ls, i: ls.__delitem__(i),
    "swap": lambda ls, i: ls.__setitem__(slice(i, i + 2), [ls[i + 1], ls[i]]),
    "insert-copy": lambda ls, i: ls.insert(i, ls[i]),
    "delete-last-checkpoint": lambda ls, i: ls.__delitem__(len(ls) - 1),
}


@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_audit_verify_detects_tampering(run: Run, tmp_path: Path, kind: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    lines = list(run.lines)
    idx = [i for i in _statement_line_indexes(lines) if '"rows":1,' in lines[i]]
    i = idx[len(idx) // 2]
    TAMPER[kind](lines, i)
    assert lines != run.lines
    log = tmp_path / "tampered.jsonl"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = cli_in_process(capsys, "audit", "verify", str(log), "--key",
                                    str(run.pub_key), "--closed")
    assert code == 1, (kind, out, err)


def test_audit_verify_with_a_wrong_key_fails(run: Run, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    assert cli_in_process(capsys, "keygen", "--out", str(other))[0] == 0
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(run.lines) + "\n", encoding="utf-8")
    code, out, err = cli_in_process(capsys, "audit", "verify", str(log), "--key",
                                    str(other / "audit.pub"))
    assert code == 1, out + err


# --------------------------------------------------------------------------- audit search


def test_audit_search(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(run.lines) + "\n", encoding="utf-8")

    def search(*args: str) -> list[dict[str, Any]]:
        code, out, err = cli_in_process(capsys, "audit", "search", str(log), "--json", *args)
        assert code == 0, err
        return [json.loads(ln) for ln in out.splitlines() if ln.strip()]

    def seqs(recs: list[dict[str, Any]]) -> list[int]:
        return [r["seq"] for r in recs]

    blocked = search("--login", "teller_sz01", "--decision", "blocked")
    assert seqs(blocked) == seqs([r for r in run.records if r["operator"] == "teller_sz01"
                                  and r["decision"] == "blocked"])
    assert len(blocked) >= REPEAT  # at least the COPYs
    accounts = search("--table", "accounts")
    assert len(accounts) == sum(ACCT in r["tables"] for r in run.records) > 0
    assert len(search("--table", "public.customers", "--role", "dba")) == REPEAT
    assert len(search("--since", "1h")) == len(run.records)
    assert search("--until", "1h") == []
    assert seqs(search("--kind", "update")) == seqs(
        [r for r in run.records if r["kind"] == "update"])
    assert len(search("--kind", "update")) == REPEAT
    assert len(search("--limit", "3")) == 3
    # the table view: a header, one line per record, the count on stderr
    r = pgveil_cli("audit", "search", str(log), "--login", "manager_sz01")
    assert r.returncode == 0 and "(4 records)" in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 1 + 2 * REPEAT


# --------------------------------------------------------------------------- audit.all


def test_audit_all_records_unprotected_statements(pgveil_factory: Callable[..., PgveilProcess],
                                                  ) -> None:
    proc = pgveil_factory({"audit": {"all": True}})
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:
        conn.execute("select name from branches").fetchall()
        conn.execute("select 1").fetchall()
        conn.execute("select phone from customers where id = 3").fetchall()
    proc.stop()
    recs = statement_records(proc.audit_path)
    assert [r["tables"] for r in recs] == [[], [], [CUST]]
    assert [r["decision"] for r in recs] == ["allowed", "allowed", "rewritten"]
    assert [r["rows"] for r in recs] == [3, 1, 1]


@pytest.mark.parametrize("durability", ["batch", "strict"])
def test_a_client_hanging_up_mid_result_still_gets_its_record(
        pgveil_factory: Callable[..., PgveilProcess], durability: str) -> None:
    """A statement on a customer table whose client disconnects while it runs: one record,
    with the rows the client was sent (batch durability streams them) and the reason."""
    from tests.harness.wire import query
    proc = pgveil_factory({"audit": {"durability": durability}})
    sql = ("select c.id, c.phone, repeat('x', 4000) as pad, "
           "pg_sleep(case when c.id = 40 then 30 else 0 end) as hang_up_marker "
           "from customers c where c.id <= 40 order by c.id")
    conn = psycopg.connect(proc.dsn("dba"), autocommit=True)
    sock = socket.socket(fileno=conn.pgconn.socket)
    sock.settimeout(10)
    got = b""
    try:
        sock.sendall(query(sql))
        if durability == "batch":  # rows stream: wait for some of them
            while got.count(b"D\x00") < 5:
                got += sock.recv(65536)
        else:  # strict: the result waits for its record, which waits for the result
            time.sleep(1.0)
    finally:
        sock.close()
        conn.pgconn.finish()
    assert _wait(lambda: any("hang_up_marker" in str(r.get("statement"))
                             for r in statement_records(proc.audit_path)))
    rec = next(r for r in statement_records(proc.audit_path)
               if "hang_up_marker" in str(r.get("statement")))
    assert rec["decision"] == "allowed" and rec["tables"] == [CUST]
    assert "client disconnected" in rec["error"]
    if durability == "batch":
        assert rec["rows"] >= 5
    else:
        assert rec["rows"] >= 0


def test_copy_from_stdin_into_a_protected_table_under_strict_durability(
        pgveil_factory: Callable[..., PgveilProcess]) -> None:
    """The record of a COPY FROM waits for its completion, and its completion for the data:
    the CopyInResponse must reach the client at once (it was held with the result: a hang)."""
    proc = pgveil_factory({"audit": {"durability": "strict"}})
    with psycopg.connect(proc.dsn("dba"), autocommit=True) as conn:
        conn.execute("set statement_timeout = '20s'")
        with conn.cursor() as cur:
            with cur.copy("copy orders (customer_id, amount, note) from stdin") as copy:
                copy.write_row((3, "1.50", "strict-copy-in"))
            assert cur.rowcount == 1
        assert conn.execute("delete from orders where note = 'strict-copy-in'").rowcount == 1
    proc.stop()
    kinds = [(r["kind"], r["rows"], r["error"]) for r in statement_records(proc.audit_path)
             if "orders" in str(r.get("statement")) and str(r.get("statement")).startswith("copy")]
    assert kinds == [("copy", 0, None)]  # one record, no error


# --------------------------------------------------------------------------- on_failure


def _metric(proc: PgveilProcess, name: str) -> float:
    with urllib.request.urlopen(proc.metrics_url(), timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait(pred: Callable[[], bool], timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def _protected_ok(proc: PgveilProcess) -> bool:
    try:
        with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:
            return len(conn.execute("select phone from customers where id = 3").fetchall()) == 1
    except psycopg.Error:
        return False


def test_on_failure_block_full_disk_then_recovery(pgveil_factory: Callable[..., PgveilProcess],
                                                  keys: tuple[Path, Path]) -> None:
    proc = pgveil_factory({"audit": {"signing_key": str(keys[0])}})
    log = proc.audit_path
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:
        assert len(conn.execute("select phone from customers where id = 3").fetchall()) == 1
        saved = log.with_name("saved.jsonl")
        os.replace(log, saved)
        log.symlink_to("/dev/full")  # every write: ENOSPC
        try:
            got_rows = []
            for i in range(4):
                try:
                    got_rows.append(len(conn.execute(
                        "select phone from customers where id = 3").fetchall()))
                except psycopg.Error as exc:
                    got_rows.append(0)
                    if i > 0:  # the first may fail on the write itself; then the gate
                        assert exc.sqlstate == "42501", exc
                        assert "audit" in str(exc)
            # unprotected statements keep working
            assert conn.execute("select name from branches where id = 'SZ01'").fetchall()
            assert conn.execute("select 1").fetchone() == (1,)
            assert _metric(proc, "pgveil_audit_failures_total") >= 1
        finally:
            os.replace(saved, log)  # space again: the original file is back
        assert _wait(lambda: _protected_ok(proc)), "no automatic recovery"
        assert len(conn.execute("select phone from customers where id = 3").fetchall()) == 1
    proc.stop()
    r = pgveil_cli("audit", "verify", str(log), "--key", str(keys[1]))
    assert r.returncode == 0, r.stdout + r.stderr
    # strict durability: no result is released without its record, not even the first one
    # after the disk filled up
    assert got_rows == [0, 0, 0, 0]


def test_on_failure_block_unusable_directory_at_start(
        pgveil_factory: Callable[..., PgveilProcess]) -> None:
    proc = pgveil_factory(start=False)
    blocker = proc.dir / "blocked"
    blocker.write_text("a file where the audit directory should be")
    log = blocker / "audit.jsonl"
    proc.overrides = {"audit": {"file": str(log)}}
    proc.start()
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("select phone from customers where id = 3").fetchall()
        assert info.value.sqlstate == "42501" and "audit" in str(info.value)
        assert conn.execute("select count(*) from branches").fetchone() == (3,)
    blocker.unlink()
    blocker.mkdir()
    assert _wait(lambda: _protected_ok(proc)), "no automatic recovery"
    proc.stop()
    assert any(r.get("tables") == [CUST] and r["decision"] == "rewritten"
               for r in statement_records(log))


def test_on_failure_allow_lets_statements_through(
        pgveil_factory: Callable[..., PgveilProcess]) -> None:
    proc = pgveil_factory(start=False)
    blocker = proc.dir / "blocked"
    blocker.write_text("x")
    proc.overrides = {"audit": {"file": str(blocker / "audit.jsonl"), "on_failure": "allow"}}
    proc.start()
    with psycopg.connect(proc.dsn("teller_sz01"), autocommit=True) as conn:
        rows = conn.execute("select phone from customers where id = 3").fetchall()
    assert len(rows) == 1 and "*" in rows[0][0]
    assert _metric(proc, "pgveil_audit_failures_total") >= 1
    # SIGTERM still stops it in bounded time although its backlog can never be written
    started = time.monotonic()
    code = proc.stop(grace=8)
    assert code is not None and code != -signal.SIGKILL, code
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("login", ["dba", "manager_sz01"])
def test_literals_are_redacted_as_the_session_reads_them(pgveil: PgveilProcess,
                                                         login: str) -> None:
    """With standard_conforming_strings off a backslash escapes the quote after it: read as
    if it were on, 'a\\' ends the string and the rest of the literal was stored verbatim."""
    app = f"scs-{os.getpid()}-{time.monotonic_ns()}"
    with psycopg.connect(pgveil.dsn(login), autocommit=True, application_name=app) as conn:
        conn.execute("set standard_conforming_strings = off")
        try:
            conn.execute("select 'a\\' secretSCSOFF ' as scs_marker, id from customers "
                         "where id = 3").fetchall()
        except psycopg.errors.InsufficientPrivilege:
            assert login != "dba"  # a masked role is refused backslashes with it off
    records = [r for r in statement_records(pgveil.audit_path) if r.get("application") == app]
    assert records, "no audit record"
    for r in records:
        assert "secretSCSOFF" not in r["statement"], r["statement"]


def test_a_denials_reasons_are_redacted_too(pgveil: PgveilProcess) -> None:
    """The reason of a refusal may quote the statement (``syntax error at or near
    "'330106198312231112'"``): with redact_literals it is stored without the value."""
    app = f"reasons-{os.getpid()}-{time.monotonic_ns()}"
    with psycopg.connect(pgveil.dsn("teller_sz01"), autocommit=True,
                         application_name=app) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select id from customers where id_number = '330106198312231112' "
                         "'330106198312231112'")
    records = [r for r in statement_records(pgveil.audit_path) if r.get("application") == app]
    assert records and records[0]["decision"] == "blocked", records
    assert "330106198312231112" not in json.dumps(records, ensure_ascii=False), records


def test_the_application_name_is_kept_as_postgresql_keeps_it(pgveil: PgveilProcess) -> None:
    """PostgreSQL keeps 63 bytes of printable ASCII; an unbounded name made each record of the
    session as large as the client liked."""
    long_name = "app-" + "x" * 9000
    with psycopg.connect(pgveil.dsn("teller_sz01"), autocommit=True,
                         application_name=long_name) as conn:
        assert conn.execute("select id from customers where id = 3").fetchall() == [(3,)]
        server_side = conn.execute("show application_name").fetchone()[0]
    assert server_side == long_name[:63]
    records = [r for r in statement_records(pgveil.audit_path)
               if (r.get("application") or "").startswith("app-xxx")]
    assert records and all(r["application"] == server_side for r in records), \
        [r.get("application", "")[:80] for r in records]
