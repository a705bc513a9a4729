"""The leak oracle for the bypass suite: what the attacker may not see, and how we look for it.

Why: a bypass test is only as good as its oracle. Every attempt in ``tests/security`` runs as an
operator through the live pgveil and collects *everything* the client receives — rows (every value
``str()``-ed, recursing into JSON, arrays and records), command tags, errors with detail / hint /
context, notices, NOTIFY payloads, ParameterStatus values and COPY data — and then asserts:

a) no raw secret appears anywhere in it (phones, ID numbers, e-mails, full names, addresses,
   birthdays, card numbers, balances; also reversed, digits-only and md5/sha256 forms), except
   values the attacker typed into the statement himself;
b) no customer outside the operator's scope shows up (customer ids by column name, and the
   other branches' codes in rows of statements that do not mention branches);
c) for "inference" attempts (``masked_equiv=True``), the result equals what PostgreSQL returns
   when the same statement runs as dba over hand-written masked, filtered views of the tables
   (``sec_oracle``); the attempt must also discriminate, i.e. that result must differ from the
   one over filtered raw views (``sec_raw``), otherwise the test itself is useless;
d) a denial (SQLSTATE 42501) is a valid outcome, but the session must stay usable afterwards.

Data flow::

    sec_db (package)      dba creates the oracle schemas, attack targets (views, functions,
                          a sink table, extended statistics) and drops them afterwards
    secrets (package)     dba reads every raw value -> Secrets -> per-login Forbidden sets
    leak (package)        LeakChecker: run SQL through pgveil with psycopg (simple, client-side,
                          extended/binary, prepared, streaming, pipeline), asyncpg or psql
                          -> Received -> check() -> pytest failure naming what leaked

Attack SQL may contain ``<<field:id>>`` placeholders (e.g. ``<<phone:3>>``) that
``Secrets.fill`` replaces with the raw value of that customer (accounts: ``<<card_no:cid>>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import itertools
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from proxy.localpg import PostgresCluster, clean_env, client_binary
from tests.harness.pgveil_proc import DEFAULT_POLICY, PgveilProcess, policy_with_teller_quota

# --------------------------------------------------------------------------- scope of each login

ALL_BRANCHES: frozenset[str] = frozenset({"SZ01", "GZ01", "BJ01"})
PROTECTED_WORDS = ("customers", "accounts", "orders")


@dataclass(frozen=True)
class Scope:
    """What config/policy.yaml lets a login see: visible branches, clearance, row cap."""

    branches: frozenset[str]
    clearance: int
    max_rows: int | None


SCOPES: dict[str, Scope] = {
    "teller_sz01": Scope(frozenset({"SZ01"}), 0, 50),
    "teller_gz01": Scope(frozenset({"GZ01"}), 0, 50),
    "manager_sz01": Scope(frozenset({"SZ01"}), 2, 1000),
    "auditor1": Scope(ALL_BRANCHES, 0, 10000),
    "stranger": Scope(frozenset(), 0, 0),
}

# ParameterStatus values PostgreSQL 15 reports (GUC_REPORT); all are captured after each step.
REPORTED_PARAMS = (
    "application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
    "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser", "server_encoding",
    "server_version", "session_authorization", "standard_conforming_strings", "TimeZone",
)

# --------------------------------------------------------------------------- raw secrets


@dataclass(frozen=True)
class Customer:
    id: int
    branch: str
    name: str
    phone: str
    id_number: str
    email: str | None
    address: str | None
    birthday: str | None  # ISO date


@dataclass(frozen=True)
class Account:
    id: int
    customer_id: int
    branch: str
    card_no: str
    balance: str  # numeric(14,2) as text


_PLACEHOLDER = re.compile(r"<<(\w+):(\d+)>>")
_ADDRESS_NUMBER = re.compile(r"\d+号$")


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Forbidden:
    """Raw values one login must never receive, indexed by the shape we search them in."""

    digits: frozenset[str]  # phones, ID numbers, card numbers (lower-case 'x'), and reversed
    digits17: frozenset[str]  # ID numbers without the check character (digits-only pass)
    hashes: frozenset[str]  # md5 / sha256 hex of every secret
    emails: frozenset[str]
    dates: frozenset[str]
    balances: frozenset[str]
    cjk: frozenset[str]  # full names (2+ chars) and full addresses
    stems: frozenset[str]  # address without the house number ("广东省深圳市福田区深南大道")
    digit_lengths: tuple[int, ...]
    cjk_lengths: tuple[int, ...]


class Secrets:
    """Every raw value of the bank tables, read directly as dba before the attacks run."""

    def __init__(self, customers: Sequence[Customer], accounts: Sequence[Account]) -> None:
        self.customers: dict[int, Customer] = {c.id: c for c in customers}
        self.accounts: dict[int, Account] = {a.id: a for a in accounts}
        self._forbidden: dict[str, Forbidden] = {}

    @classmethod
    def load(cls, dsn: str) -> Secrets:
        with psycopg.connect(dsn, autocommit=True) as conn:
            customers = [
                Customer(*row)
                for row in conn.execute(
                    "SELECT id, branch_id, name, phone, id_number, email, address, "
                    "birthday::text FROM public.customers ORDER BY id"
                )
            ]
            accounts = [
                Account(*row)
                for row in conn.execute(
                    "SELECT id, customer_id, branch_id, card_no, balance::text "
                    "FROM public.accounts ORDER BY id"
                )
            ]
        return cls(customers, accounts)

    # ------------------------------------------------------------------ attack building blocks

    def customer(self, cid: int) -> Customer:
        return self.customers[cid]

    def first_account(self, cid: int) -> Account:
        return next(a for a in self.accounts.values() if a.customer_id == cid)

    def fill(self, sql: str) -> str:
        """Replace ``<<phone:3>>`` by customer 3's raw phone, ``<<card_no:3>>`` by a card of 3."""

        def value(match: re.Match[str]) -> str:
            field_name, cid = match.group(1), int(match.group(2))
            if field_name in ("card_no", "balance"):
                return str(getattr(self.first_account(cid), field_name))
            return str(getattr(self.customer(cid), field_name))

        return _PLACEHOLDER.sub(value, sql)

    def out_of_scope_ids(self, login: str) -> frozenset[int]:
        scope = SCOPES[login]
        return frozenset(c.id for c in self.customers.values() if c.branch not in scope.branches)

    # ------------------------------------------------------------------ forbidden values

    def forbidden(self, login: str) -> Forbidden:
        if login not in self._forbidden:
            self._forbidden[login] = self._build_forbidden(SCOPES[login])
        return self._forbidden[login]

    def _build_forbidden(self, scope: Scope) -> Forbidden:
        def identity(customers: Iterable[Customer]) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {k: set() for k in ("digits", "emails", "dates", "cjk")}
            out["stems"] = set()
            for c in customers:
                out["digits"].update({c.phone, c.id_number.lower()})
                if c.email:
                    out["emails"].add(c.email.lower())
                # A birthday on 1 January is its own masked value (truncate: year): not secret.
                if c.birthday and not c.birthday.endswith("-01-01"):
                    out["dates"].add(c.birthday)
                if len(c.name) >= 2:
                    out["cjk"].add(c.name)
                if c.address:
                    out["cjk"].add(c.address)
                    out["stems"].add(_ADDRESS_NUMBER.sub("", c.address))
            return out

        visible = [c for c in self.customers.values() if c.branch in scope.branches]
        hidden = [c for c in self.customers.values() if c.branch not in scope.branches]
        shown = identity(visible) if scope.clearance >= 1 else identity([])
        secret = identity(hidden if scope.clearance >= 1 else self.customers.values())
        sets = {k: secret[k] - shown[k] for k in secret}

        balances: set[str] = set()
        for a in self.accounts.values():
            if scope.clearance >= 2 and a.branch in scope.branches:
                continue
            # Only distinctive balances (>= 10000, not a multiple of 1000 that rounding keeps).
            if len(a.balance) >= 8 and not a.balance.endswith("000.00"):
                balances.add(a.balance)
        if scope.clearance >= 2:
            balances -= {a.balance for a in self.accounts.values() if a.branch in scope.branches}
        if scope.clearance < 3:
            sets["digits"].update(a.card_no for a in self.accounts.values())

        digits = set(sets["digits"])
        digits.update(d[::-1] for d in list(digits))
        hashes: set[str] = set()
        for group in ("digits", "emails", "dates", "cjk"):
            for value in sets[group]:
                hashes.update({_md5(value), _sha256(value)})
        for value in sets["digits"]:
            if value.endswith("x"):
                hashes.update({_md5(value.upper()), _sha256(value.upper())})
        return Forbidden(
            digits=frozenset(digits),
            digits17=frozenset(d[:17] for d in sets["digits"] if len(d) == 18),
            hashes=frozenset(hashes),
            emails=frozenset(sets["emails"]),
            dates=frozenset(sets["dates"]),
            balances=frozenset(balances),
            cjk=frozenset(sets["cjk"]),
            stems=frozenset(sets["stems"]),
            digit_lengths=tuple(sorted({len(d) for d in digits})),
            cjk_lengths=tuple(sorted({len(v) for v in sets["cjk"]})),
        )


_RUN = re.compile(r"[0-9x]{8,}")
_HEX = re.compile(r"(?<![0-9a-f])(?:[0-9a-f]{64}|[0-9a-f]{32})(?![0-9a-f])")
_EMAIL = re.compile(r"[a-z0-9._%+-]+@[a-z0-9.-]+")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_BALANCE = re.compile(r"(?<![\d.])\d{5,}\.\d{2}(?!\d)")
_CJK = re.compile(r"[\u3400-\u9fff]+(?:\d+号)?")
_PIECES = re.compile(r"[,(){}\"\[\]:;|\t\n=<>]+")


def find_leaks(forbidden: Forbidden, texts: Iterable[str], typed: str) -> list[str]:
    """The raw secrets that occur in ``texts``, minus those the attacker typed himself.

    Searched by shape rather than by brute-force substring search over ~30 000 values: digit runs
    (every window of a secret's length), digits-only pieces (``138-1234-5678``), hex digests,
    e-mails, dates, balances, CJK runs (every window of a name's length) and address stems.
    """
    typed = typed.lower()
    hits: set[str] = set()

    def windows(run: str, lengths: Sequence[int], pool: frozenset[str]) -> None:
        for length in lengths:
            for i in range(len(run) - length + 1):
                chunk = run[i : i + length]
                if chunk in pool:
                    hits.add(chunk)

    for text in texts:
        low = text.lower()
        for run in _RUN.findall(low):
            windows(run, forbidden.digit_lengths, forbidden.digits)
        for piece in _PIECES.split(low):
            only = re.sub(r"[^0-9x]", "", piece)
            if len(only) >= 11 and only != piece:
                windows(only, forbidden.digit_lengths, forbidden.digits)
                windows(only, (17,), forbidden.digits17)
        hits.update(h for h in _HEX.findall(low) if h in forbidden.hashes)
        hits.update(e for e in _EMAIL.findall(low) if e in forbidden.emails)
        hits.update(d for d in _DATE.findall(low) if d in forbidden.dates)
        hits.update(b for b in _BALANCE.findall(low) if b in forbidden.balances)
        for run in _CJK.findall(text):
            if run in forbidden.cjk:
                hits.add(run)
            windows(run, forbidden.cjk_lengths, forbidden.cjk)
        hits.update(s for s in forbidden.stems if s in text)
    return sorted(h for h in hits if h not in typed and h[::-1] not in typed)


# --------------------------------------------------------------------------- what came back


@dataclass
class ResultSet:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    status: str | None = None


@dataclass
class Received:
    """Everything one attempt delivered to the client."""

    results: list[ResultSet] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    notices: list[dict[str, str]] = field(default_factory=list)
    notifies: list[str] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    copy_data: list[str] = field(default_factory=list)
    raw_output: list[str] = field(default_factory=list)  # psql stdout / stderr
    alive: bool = False
    connected: bool = True
    elapsed: float = 0.0

    @property
    def sqlstates(self) -> list[str]:
        return [e.get("sqlstate", "") for e in self.errors]

    @property
    def denied(self) -> bool:
        return "42501" in self.sqlstates

    @property
    def rows(self) -> list[tuple[Any, ...]]:
        return [row for rs in self.results for row in rs.rows]

    @property
    def statuses(self) -> list[str]:
        return [rs.status for rs in self.results if rs.status]

    def texts(self) -> Iterator[str]:
        for rs in self.results:
            for row in rs.rows:
                for value in row:
                    yield from flatten(value)
            if rs.status:
                yield rs.status
        for group in (self.errors, self.notices):
            for item in group:
                yield from (v for v in item.values() if v)
        yield from self.notifies
        yield from self.params.values()
        yield from self.copy_data
        yield from self.raw_output

    def describe(self) -> str:
        parts = [f"results={[(rs.columns, rs.rows[:5], rs.status) for rs in self.results]}"]
        if self.errors:
            parts.append(f"errors={self.errors}")
        if self.notices:
            parts.append(f"notices={self.notices}")
        if self.notifies:
            parts.append(f"notifies={self.notifies}")
        if self.copy_data:
            parts.append(f"copy={[c[:300] for c in self.copy_data]}")
        if self.raw_output:
            parts.append(f"output={[o[:600] for o in self.raw_output]}")
        return "; ".join(parts)[:3000]


def flatten(value: Any) -> Iterator[str]:
    """Every string inside a value: JSON dicts/lists, arrays, records, bytes (text and hex)."""
    if value is None:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        yield data.decode("utf-8", "replace")
        yield data.hex()
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key)
            yield from flatten(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from flatten(item)
    elif isinstance(value, (date, datetime, dtime, Decimal, int, float, bool)):
        yield str(value)
    elif isinstance(value, asyncpg.Record):
        for item in value.values():
            yield from flatten(item)
    else:
        yield str(value)


def _diag(exc: BaseException) -> dict[str, str]:
    """Every field of an error the client got (psycopg diag, asyncpg fields, or the text)."""
    out: dict[str, str] = {"text": str(exc)}
    diag = getattr(exc, "diag", None)
    if diag is not None:
        for name in (
            "sqlstate", "severity", "message_primary", "message_detail", "message_hint",
            "context", "internal_query", "schema_name", "table_name", "column_name",
            "datatype_name", "constraint_name", "statement_position",
        ):
            value = getattr(diag, name, None)
            if value:
                out[name] = str(value)
    if isinstance(exc, asyncpg.PostgresError):
        for key, value in exc.as_dict().items():
            if value is not None:
                out[key] = str(value)
        out["sqlstate"] = str(getattr(exc, "sqlstate", "") or "")
    return out


def _notice(diag: Any) -> dict[str, str]:
    return {
        name: str(getattr(diag, name))
        for name in ("severity", "message_primary", "message_detail", "message_hint", "context")
        if getattr(diag, name, None)
    }


# --------------------------------------------------------------------------- protocols


class Protocol(enum.Enum):
    """How psycopg sends the statement."""

    SIMPLE = "simple"  # Query message (psycopg without params); with params: unnamed extended
    CLIENT = "client"  # ClientCursor: parameters merged client-side, Query message
    EXTENDED = "extended"  # Parse/Bind/Execute, binary results
    PREPARED = "prepared"  # named prepared statement (psycopg prepare=True)
    STREAM = "stream"  # single-row mode: rows are seen as they arrive, before any error
    PIPELINE = "pipeline"  # every statement pipelined in one Sync batch


Statements = str | bytes | Sequence[str | bytes]


def _as_list(sql: Statements) -> list[str | bytes]:
    if isinstance(sql, (str, bytes)):
        return [sql]
    return list(sql)


def _is_copy_out(sql: str | bytes) -> bool:
    text = sql.decode("latin-1") if isinstance(sql, bytes) else sql
    return bool(re.match(r"\s*copy\b", text, re.I)) and bool(re.search(r"\bto\s+stdout\b", text, re.I))


def _columns(cur: psycopg.Cursor[Any]) -> list[str]:
    return [d.name for d in cur.description or []]


def _collect_sets(cur: psycopg.Cursor[Any], received: Received) -> None:
    while True:
        rows = cur.fetchall() if cur.description else []
        received.results.append(ResultSet(_columns(cur), list(rows), cur.statusmessage))
        if not cur.nextset():
            break


def _snapshot_params(conn: psycopg.Connection[Any], received: Received) -> None:
    for name in REPORTED_PARAMS:
        value = conn.info.parameter_status(name)
        if value is not None:
            received.params[name] = value


def run_psycopg(
    conn: psycopg.Connection[Any],
    statements: Statements,
    params: Sequence[Any] | Mapping[str, Any] | None,
    protocol: Protocol,
    received: Received,
) -> None:
    """Run each statement on an autocommit connection, recording results and errors."""
    stmts = _as_list(statements)
    if protocol is Protocol.PIPELINE:
        try:
            with conn.pipeline():
                curs = []
                for stmt in stmts:
                    cur = conn.cursor()
                    cur.execute(stmt, params)  # type: ignore[arg-type]
                    curs.append(cur)
            for cur in curs:
                with contextlib.suppress(psycopg.Error):
                    _collect_sets(cur, received)
        except psycopg.Error as exc:
            received.errors.append(_diag(exc))
        _snapshot_params(conn, received)
        return
    for stmt in stmts:
        try:
            if _is_copy_out(stmt):
                cur = conn.cursor()
                with cur.copy(stmt) as copy:  # type: ignore[arg-type]
                    chunks = [bytes(chunk) for chunk in copy]
                received.copy_data.append(b"".join(chunks).decode("utf-8", "replace"))
                received.results.append(ResultSet([], [], cur.statusmessage))
            elif protocol is Protocol.STREAM:
                cur = conn.cursor()
                rows: list[tuple[Any, ...]] = []
                received.results.append(ResultSet([], rows))
                for row in cur.stream(stmt, params):  # type: ignore[arg-type]
                    rows.append(row)
                    received.results[-1].columns = _columns(cur)
                received.results[-1].status = cur.statusmessage
            elif protocol is Protocol.CLIENT:
                ccur = psycopg.ClientCursor(conn)
                ccur.execute(stmt, params)  # type: ignore[arg-type]
                _collect_sets(ccur, received)
            else:
                cur = conn.cursor(binary=protocol is Protocol.EXTENDED)
                cur.execute(
                    stmt,  # type: ignore[arg-type]
                    params,
                    prepare=protocol is Protocol.PREPARED,
                )
                _collect_sets(cur, received)
        except psycopg.Error as exc:
            received.errors.append(_diag(exc))
            if conn.closed:
                break
        finally:
            if not conn.closed:
                _snapshot_params(conn, received)


def check_alive(conn: psycopg.Connection[Any], received: Received) -> None:
    """After the attempt: end any transaction and prove the session still answers."""
    if conn.closed:
        received.alive = False
        return
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        received.alive = conn.execute("SELECT 1").fetchone() == (1,)
        _snapshot_params(conn, received)
    except psycopg.Error as exc:
        received.errors.append(_diag(exc))
        received.alive = False


# --------------------------------------------------------------------------- the checker


def _typed_text(statements: Statements, params: Any) -> str:
    parts = []
    for stmt in _as_list(statements):
        parts.append(stmt.decode("latin-1") if isinstance(stmt, bytes) else stmt)
        if isinstance(stmt, bytes):
            parts.append(stmt.decode("gbk", "replace"))
    if params is not None:
        parts.append(" ".join(str(p) for p in (params.values() if isinstance(params, Mapping)
                                                else params)))
    return "\n".join(parts)


_ID_COLUMNS_ALWAYS = frozenset({"customer_id", "cid", "cust_id"})
_OTHER_BRANCH = re.compile(r"\b(GZ01|BJ01|SZ01)\b")


def _normalise(rows: Iterable[Sequence[Any]]) -> list[tuple[str, ...]]:
    return sorted(tuple("∅" if v is None else str(v) for v in row) for row in rows)


Expect = Callable[[Received], None]


def _trace(login: str, typed: str, received: Received) -> None:
    """With PGVEIL_SEC_TRACE=<file>, append each attempt's outcome (for the bypass report)."""
    path = os.environ.get("PGVEIL_SEC_TRACE")
    if not path:
        return
    outcome = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
        "login": login,
        "sql": typed[:300],
        "errors": [(e.get("sqlstate"), e.get("message_primary", e.get("text", ""))[:160])
                   for e in received.errors],
        "rows": [rs.rows[:2] for rs in received.results][:3],
        "nrows": sum(len(rs.rows) for rs in received.results),
        "notifies": received.notifies,
        "notices": [n.get("message_primary") for n in received.notices],
        "application_name": received.params.get("application_name"),
    }
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(outcome, ensure_ascii=False, default=str) + "\n")


class LeakChecker:
    """Runs attempts through pgveil and fails the test with exactly what leaked."""

    def __init__(self, pg: PostgresCluster, pgveil: PgveilProcess, secrets: Secrets) -> None:
        self.pg = pg
        self.pgveil = pgveil
        self.secrets = secrets
        self._oracles: dict[str, psycopg.Connection[Any]] = {}

    # ------------------------------------------------------------------ connections

    def connect(self, login: str = "teller_sz01", **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit psycopg connection through pgveil (kwargs are libpq parameters)."""
        return psycopg.connect(self.pgveil.dsn(login), autocommit=True, connect_timeout=10,
                               **kwargs)

    def oracle(self, schema: str) -> psycopg.Connection[Any]:
        """A direct dba connection whose unqualified table names are ``schema``'s views."""
        conn = self._oracles.get(schema)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.pg.dsn("dba"), autocommit=True)
            conn.execute(f"SET search_path = {schema}, public")
            self._oracles[schema] = conn
        return conn

    def close(self) -> None:
        for conn in self._oracles.values():
            conn.close()

    # ------------------------------------------------------------------ psycopg

    def run(
        self,
        sql: Statements,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        login: str = "teller_sz01",
        protocol: Protocol = Protocol.SIMPLE,
        tx: bool = False,
        conn: psycopg.Connection[Any] | None = None,
        connect: Mapping[str, Any] | None = None,
        listen: str | None = None,
    ) -> Received:
        """Run the attempt and collect what came back (no assertions)."""
        received = Received()
        own = conn is None
        started = time.monotonic()
        try:
            if conn is None:
                conn = self.connect(login, **dict(connect or {}))
        except psycopg.Error as exc:
            received.connected = False
            received.errors.append(_diag(exc))
            return received
        try:
            conn.add_notice_handler(lambda d: received.notices.append(_notice(d)))
            conn.add_notify_handler(lambda n: received.notifies.append(f"{n.channel}:{n.payload}"))
            if listen:
                conn.execute(f"LISTEN {listen}")
            stmts = _as_list(sql)
            if tx:
                stmts = ["BEGIN", *stmts]
            started = time.monotonic()
            run_psycopg(conn, stmts, params, protocol, received)
            received.elapsed = time.monotonic() - started
            check_alive(conn, received)
            if listen and not conn.closed:
                # Notifications sent by a committed statement arrive with the next message.
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT 1")
        finally:
            if own and conn is not None:
                conn.close()
        return received

    def assert_no_leak(
        self,
        sql: Statements,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        login: str = "teller_sz01",
        protocol: Protocol = Protocol.SIMPLE,
        tx: bool = False,
        conn: psycopg.Connection[Any] | None = None,
        connect: Mapping[str, Any] | None = None,
        listen: str | None = None,
        ids: Sequence[str] = (),
        masked_equiv: bool = False,
        expect: Expect | None = None,
        branch_check: bool = True,
    ) -> Received:
        """Run ``sql`` through pgveil as ``login`` and fail on any leak (see module docstring).

        ``sql`` may hold ``<<field:id>>`` placeholders; a list runs statement by statement on
        one connection (``tx=True`` wraps it in BEGIN ... ROLLBACK so DML never persists).
        """
        sql = self._fill(sql)
        received = self.run(sql, params, login=login, protocol=protocol, tx=tx, conn=conn,
                            connect=connect, listen=listen)
        self.check(received, sql, params, login=login, ids=ids, branch_check=branch_check)
        if masked_equiv:
            self.check_masked_equivalent(received, sql, params, login=login)
        if expect is not None:
            expect(received)
        return received

    def _fill(self, sql: Statements) -> Statements:
        if isinstance(sql, str):
            return self.secrets.fill(sql)
        if isinstance(sql, bytes):
            return self.secrets.fill(sql.decode("latin-1")).encode("latin-1")
        return [self._fill(s) for s in sql]  # type: ignore[misc]

    # ------------------------------------------------------------------ the oracle

    def check(
        self,
        received: Received,
        sql: Statements,
        params: Any = None,
        *,
        login: str = "teller_sz01",
        ids: Sequence[str] = (),
        branch_check: bool = True,
        session_must_survive: bool = True,
    ) -> None:
        typed = _typed_text(sql, params)
        _trace(login, typed, received)
        if any("quota" in e.get("message_primary", e.get("text", "")).lower()
               for e in received.errors):
            pytest.fail(f"inconclusive: the operator's quota is exhausted: {received.errors}")
        problems: list[str] = []
        leaked = find_leaks(self.secrets.forbidden(login), received.texts(), typed)
        if leaked:
            problems.append(f"raw secrets received: {leaked[:12]}")
        problems += self._scope_problems(received, typed, login, ids, branch_check)
        scope = SCOPES[login]
        if scope.max_rows is not None and any(w in typed.lower() for w in PROTECTED_WORDS):
            for rs in received.results:
                if len(rs.rows) > scope.max_rows and scope.max_rows > 0:
                    problems.append(
                        f"{len(rs.rows)} rows delivered, over max_rows {scope.max_rows}"
                    )
        if session_must_survive and received.connected and not received.alive:
            problems.append("the session was not usable after the attempt (SELECT 1 failed)")
        if problems:
            pytest.fail(
                f"LEAK as {login}: {'; '.join(problems)}\n--- sql ---\n{typed[:1500]}\n"
                f"--- received ---\n{received.describe()}",
                pytrace=False,
            )

    def _scope_problems(self, received: Received, typed: str, login: str, ids: Sequence[str],
                        branch_check: bool) -> list[str]:
        hidden = self.secrets.out_of_scope_ids(login)
        scope = SCOPES[login]
        low = typed.lower()
        other_tables = any(w in low for w in ("accounts", "orders", "branches"))
        problems: list[str] = []
        seen: set[int] = set()
        for rs in received.results:
            for index, name in enumerate(rs.columns):
                is_id = (name in ids or name in _ID_COLUMNS_ALWAYS
                         or (name == "id" and not other_tables and "customers" in low))
                if not is_id:
                    continue
                for row in rs.rows:
                    value = row[index]
                    if isinstance(value, int) and value in hidden:
                        seen.add(value)
        if seen:
            problems.append(f"out-of-scope customer ids visible: {sorted(seen)[:10]}")
        mentions_branch = "branch" in low or bool(_OTHER_BRANCH.search(typed)) or "pg_stat" in low
        if branch_check and not mentions_branch and scope.branches != ALL_BRANCHES:
            foreign: set[str] = set()
            for rs in received.results:
                for row in rs.rows:
                    for value in row:
                        for text in flatten(value):
                            foreign.update(
                                b for b in _OTHER_BRANCH.findall(text)
                                if b not in scope.branches
                            )
            if foreign:
                problems.append(f"rows of other branches visible: {sorted(foreign)}")
        return problems

    def check_masked_equivalent(self, received: Received, sql: Statements, params: Any,
                                *, login: str) -> None:
        """Inference attempts: pgveil must answer exactly like the masked, filtered views."""
        assert login == "teller_sz01", "the oracle views model teller_sz01 only"
        assert isinstance(sql, str), "the differential oracle takes one statement"
        masked = self._oracle_result("sec_oracle", sql, params)
        raw = self._oracle_result("sec_raw", sql, params)
        assert masked != raw, (
            f"test bug: the attempt does not discriminate masked from raw data: {sql}"
        )
        if received.errors:
            return  # denied (42501) or failed: the error text was checked for leaks already
        got = _normalise(received.rows)
        if got != masked:
            verdict = "== the RAW result" if got == raw else "!= the masked result"
            pytest.fail(
                f"LEAK (inference) as {login}: pgveil's answer {verdict}\n--- sql ---\n{sql}\n"
                f"--- pgveil ---\n{got[:10]}\n--- masked views ---\n{masked[:10]}\n"
                f"--- raw views ---\n{raw[:10]}",
                pytrace=False,
            )

    def _oracle_result(self, schema: str, sql: str, params: Any) -> list[tuple[str, ...]] | str:
        conn = self.oracle(schema)
        try:
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            return _normalise(cur.fetchall() if cur.description else [])
        except psycopg.Error as exc:
            return f"error {exc.sqlstate}"

    # ------------------------------------------------------------------ asyncpg

    async def run_asyncpg(
        self,
        sql: str,
        *args: Any,
        login: str = "teller_sz01",
        mode: str = "fetch",
        prefetch: int = 10,
    ) -> Received:
        """asyncpg (extended protocol, named prepared statements, binary): fetch | prepare |
        cursor (a portal read ``prefetch`` rows at a time, inside a transaction) | execute
        (no arguments: simple protocol)."""
        received = Received()
        try:
            conn = await asyncpg.connect(self.pgveil.dsn(login), timeout=10,
                                         statement_cache_size=0 if mode == "execute" else 100)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            received.connected = False
            received.errors.append(_diag(exc))
            return received
        conn.add_log_listener(lambda _c, msg: received.notices.append(
            {k: str(v) for k, v in msg.as_dict().items() if v is not None}))
        try:
            rs = ResultSet([], [])
            received.results.append(rs)
            try:
                if mode == "fetch":
                    records = await conn.fetch(sql, *args)
                    rs.rows = [tuple(r.values()) for r in records]
                    rs.columns = list(records[0].keys()) if records else []
                elif mode == "prepare":
                    stmt = await conn.prepare(sql)
                    rs.columns = [a.name for a in stmt.get_attributes()]
                    rs.rows = [tuple(r.values()) for r in await stmt.fetch(*args)]
                elif mode == "cursor":
                    async with conn.transaction():
                        async for record in conn.cursor(sql, *args, prefetch=prefetch):
                            rs.columns = list(record.keys())
                            rs.rows.append(tuple(record.values()))
                elif mode == "execute":
                    rs.status = await conn.execute(sql)
                else:  # pragma: no cover - test bug
                    raise ValueError(mode)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                received.errors.append(_diag(exc))
            settings = conn.get_settings()
            for name in REPORTED_PARAMS:
                value = getattr(settings, name, None)
                if value is not None:
                    received.params[name] = str(value)
            try:
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                received.alive = await asyncio.wait_for(conn.fetchval("SELECT 1"), 10) == 1
            except (asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                received.errors.append(_diag(exc))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
        return received

    async def assert_no_leak_asyncpg(self, sql: str, *args: Any, login: str = "teller_sz01",
                                     mode: str = "fetch", ids: Sequence[str] = (),
                                     expect: Expect | None = None) -> Received:
        sql = self.secrets.fill(sql)
        received = await self.run_asyncpg(sql, *args, login=login, mode=mode)
        self.check(received, sql, args or None, login=login, ids=ids)
        if expect is not None:
            expect(received)
        return received

    # ------------------------------------------------------------------ psql

    def run_psql(self, script: str, *, login: str = "teller_sz01",
                 extra_args: Sequence[str] = ()) -> Received:
        """psql -f - with the script, then a liveness probe; stdout and stderr are checked."""
        received = Received()
        psql = client_binary(self.pg.bin_dir, "psql")
        probe = "\n;\nROLLBACK;\nSELECT 'sec' || '-alive';\n"
        proc = subprocess.run(
            [psql, "-X", "-A", "-v", "ON_ERROR_STOP=0", *extra_args,
             "-d", self.pgveil.dsn(login), "-f", "-"],
            input=script + probe,
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
            check=False,
        )
        received.raw_output = [proc.stdout, proc.stderr]
        received.alive = "sec-alive" in proc.stdout
        for match in re.finditer(r"ERROR:\s+(.*)", proc.stderr):
            received.errors.append({"text": match.group(1)})
        return received

    def assert_no_leak_psql(self, script: str, *, login: str = "teller_sz01",
                            extra_args: Sequence[str] = ()) -> Received:
        script = self.secrets.fill(script)
        received = self.run_psql(script, login=login, extra_args=extra_args)
        self.check(received, script, login=login)
        return received


# --------------------------------------------------------------------------- expectations


def expect_error(received: Received) -> None:
    """The statement must have been refused (by pgveil or PostgreSQL), not carried out."""
    assert received.errors, f"expected a refusal, got {received.describe()}"


def expect_status(*allowed: str) -> Expect:
    """The command tag must be one of ``allowed`` (e.g. ``UPDATE 0``) unless refused."""

    def check(received: Received) -> None:
        if received.errors:
            return
        assert any(s in allowed for s in received.statuses), (
            f"command tag {received.statuses} not in {allowed}: rows outside the filter "
            f"were reached"
        )

    return check


def expect_rows(expected: Sequence[tuple[Any, ...]]) -> Expect:
    """Unless refused, the rows must be exactly these (after str() of every value)."""

    def check(received: Received) -> None:
        if received.errors:
            return
        assert _normalise(received.rows) == _normalise(expected), (
            f"rows {received.rows[:10]} != expected {list(expected)[:10]}"
        )

    return check


def expect_at_most_rows(limit: int) -> Expect:
    def check(received: Received) -> None:
        counts = [len(rs.rows) for rs in received.results]
        assert all(c <= limit for c in counts), f"delivered {counts} rows, limit {limit}"

    return check


def expect_not_sqlstate(sqlstate: str, why: str) -> Expect:
    def check(received: Received) -> None:
        assert sqlstate not in received.sqlstates, (
            f"SQLSTATE {sqlstate} came back: {why}\n{received.describe()}"
        )

    return check


def expect_faster_than(seconds: float, why: str) -> Expect:
    def check(received: Received) -> None:
        assert received.elapsed < seconds, f"took {received.elapsed:.2f}s: {why}"

    return check


# --------------------------------------------------------------------------- fixtures

_MASKED_CUSTOMERS = """
SELECT id,
  CASE WHEN name IS NULL THEN NULL WHEN char_length(name) > 1
       THEN left(name, 1) || repeat('*', char_length(name) - 1)
       ELSE repeat('*', char_length(name)) END AS name,
  CASE WHEN phone IS NULL THEN NULL WHEN char_length(phone) > 7
       THEN left(phone, 3) || repeat('*', char_length(phone) - 7) || right(phone, 4)
       ELSE repeat('*', char_length(phone)) END AS phone,
  CASE WHEN id_number IS NULL THEN NULL WHEN char_length(id_number) > 10
       THEN left(id_number, 6) || repeat('*', char_length(id_number) - 10) || right(id_number, 4)
       ELSE repeat('*', char_length(id_number)) END AS id_number,
  CASE WHEN email IS NULL THEN NULL
       WHEN strpos(reverse(email), '@') > 0 AND strpos(reverse(email), '@') < char_length(email)
       THEN left(email, 1) || '***' || right(email, strpos(reverse(email), '@'))
       ELSE '***' END AS email,
  CASE WHEN address IS NULL THEN NULL ELSE '******' END AS address,
  CAST(date_trunc('year', CAST(birthday AS timestamp)) AS date) AS birthday,
  branch_id, level, created_at
FROM public.customers WHERE branch_id = 'SZ01'
"""

_MASKED_ACCOUNTS = """
SELECT id, customer_id,
  CASE WHEN card_no IS NULL THEN NULL WHEN char_length(card_no) > 4
       THEN repeat('*', char_length(card_no) - 4) || right(card_no, 4)
       ELSE repeat('*', char_length(card_no)) END AS card_no,
  CAST(NULL AS numeric(14,2)) AS balance, branch_id, opened_on
FROM public.accounts WHERE branch_id = 'SZ01'
"""

_ORDERS = """
SELECT * FROM public.orders
WHERE customer_id IN (SELECT id FROM public.customers WHERE branch_id = 'SZ01')
"""

SETUP_SQL = f"""
DROP SCHEMA IF EXISTS sec_oracle CASCADE;
DROP SCHEMA IF EXISTS sec_raw CASCADE;
CREATE SCHEMA sec_oracle;
CREATE SCHEMA sec_raw;
REVOKE ALL ON SCHEMA sec_oracle, sec_raw FROM PUBLIC;
CREATE VIEW sec_oracle.customers AS {_MASKED_CUSTOMERS};
CREATE VIEW sec_oracle.accounts AS {_MASKED_ACCOUNTS};
CREATE VIEW sec_oracle.orders AS {_ORDERS};
CREATE VIEW sec_raw.customers AS SELECT * FROM public.customers WHERE branch_id = 'SZ01';
CREATE VIEW sec_raw.accounts AS SELECT * FROM public.accounts WHERE branch_id = 'SZ01';
CREATE VIEW sec_raw.orders AS {_ORDERS};

DROP VIEW IF EXISTS public.sec_v_customers;
CREATE VIEW public.sec_v_customers AS SELECT * FROM public.customers;
DROP MATERIALIZED VIEW IF EXISTS public.sec_mv_customers;
CREATE MATERIALIZED VIEW public.sec_mv_customers AS
    SELECT id, name, phone, id_number, branch_id FROM public.customers;
CREATE OR REPLACE FUNCTION public.sec_f_phone(int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT phone FROM public.customers WHERE id = $1 $$;
CREATE OR REPLACE FUNCTION public.sec_f_secdef(int) RETURNS text LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = public
    AS $$ BEGIN RETURN (SELECT id_number FROM public.customers WHERE id = $1); END $$;
DROP FUNCTION IF EXISTS public.sec_f_rows();
CREATE FUNCTION public.sec_f_rows() RETURNS SETOF public.customers LANGUAGE sql STABLE
    AS $$ SELECT * FROM public.customers $$;
CREATE OR REPLACE FUNCTION public.sec_f_dyn(q text) RETURNS SETOF text LANGUAGE plpgsql
    AS $$ BEGIN RETURN QUERY EXECUTE q; END $$;
CREATE OR REPLACE FUNCTION public.sec_f_wrap(int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT public.sec_f_phone($1) $$;
CREATE OR REPLACE FUNCTION public.sec_f_obf(int) RETURNS text LANGUAGE plpgsql
    AS $$ DECLARE r text; BEGIN
        EXECUTE 'SELECT id_number FROM ' || 'cust' || 'omers WHERE id = $1' INTO r USING $1;
        RETURN r; END $$;
DROP VIEW IF EXISTS public.sec_v_nested;
CREATE VIEW public.sec_v_nested AS SELECT * FROM public.sec_v_customers;
GRANT SELECT ON public.sec_v_nested TO PUBLIC;
DROP TABLE IF EXISTS public.sec_sink;
CREATE TABLE public.sec_sink (t text);
GRANT ALL ON public.sec_sink TO PUBLIC;
GRANT SELECT ON public.sec_v_customers, public.sec_mv_customers TO PUBLIC;
DROP STATISTICS IF EXISTS public.sec_stx;
CREATE STATISTICS public.sec_stx (mcv) ON branch_id, phone FROM public.customers;
ANALYZE public.customers;
"""

TEARDOWN_SQL = """
DROP SCHEMA IF EXISTS sec_oracle CASCADE;
DROP SCHEMA IF EXISTS sec_raw CASCADE;
DROP VIEW IF EXISTS public.sec_v_nested;
DROP VIEW IF EXISTS public.sec_v_customers;
DROP MATERIALIZED VIEW IF EXISTS public.sec_mv_customers;
DROP FUNCTION IF EXISTS public.sec_f_wrap(int);
DROP FUNCTION IF EXISTS public.sec_f_obf(int);
DROP FUNCTION IF EXISTS public.sec_f_phone(int);
DROP FUNCTION IF EXISTS public.sec_f_secdef(int);
DROP FUNCTION IF EXISTS public.sec_f_rows();
DROP FUNCTION IF EXISTS public.sec_f_dyn(text);
DROP TABLE IF EXISTS public.sec_sink;
DROP STATISTICS IF EXISTS public.sec_stx;
"""


@pytest.fixture(scope="package")
def sec_db(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    """dba's attack targets and oracle views exist for the whole package, then are dropped."""
    with psycopg.connect(pg.dsn("dba"), autocommit=True) as conn:
        conn.execute(SETUP_SQL)
    try:
        yield pg
    finally:
        with psycopg.connect(pg.dsn("dba"), autocommit=True) as conn:
            conn.execute(TEARDOWN_SQL)
        # the quota rows read here (teller quotas raised to a million) must not use up the
        # fixture quota of the tests that run after this package on the cluster (the control
        # database of tests.harness.pgveil_proc)
        with psycopg.connect(pg.dsn("dba", db="postgres"), autocommit=True) as conn:
            conn.execute("DO $$ BEGIN IF pg_catalog.to_regclass('pgveil.quota_buckets') "
                         "IS NOT NULL THEN DELETE FROM pgveil.quota_buckets; END IF; END $$")


@pytest.fixture(scope="package")
def secrets(sec_db: PostgresCluster) -> Secrets:
    return Secrets.load(sec_db.dsn("dba"))


def _wait_for_catalog(pgveil: PgveilProcess, timeout: float = 15.0) -> None:
    """pgveil notices schema changes by polling a catalog fingerprint (catalog_poll_seconds):
    wait until the dba's new view is known as reading customers (the teller is refused it)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(pgveil.dsn("teller_sz01"), autocommit=True) as conn:
            try:
                conn.execute("select 1 from sec_v_customers limit 1").fetchall()
            except psycopg.errors.InsufficientPrivilege:
                return
            except psycopg.Error:
                pass
        time.sleep(0.3)
    raise AssertionError("pgveil did not pick up the new catalog objects")


@pytest.fixture(scope="package")
def sec_pgveil(sec_db: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[PgveilProcess]:
    """pgveil with the fixture policy, the teller's quota raised from 2000 to a million rows
    an hour: every attempt reads as teller_sz01, and hundreds of them would exhaust the
    fixture's quota (a denial that proves nothing); three LISTEN channels listed. The quota still applies, so its code paths
    run as in production; its own tests are in tests/integration/test_grants_quota.py."""
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    policy["roles"]["teller"]["quota"] = {"rows": 1_000_000, "per": "1h"}
    # channels the attempts LISTEN to, to see what a teller's own NOTIFY carries (masked roles
    # may LISTEN only to listed channels: test_hunt5.py)
    policy["listen_channels"] = ["sec_ch", "h2c", "h4_cust"]
    path = tmp_path_factory.mktemp("sec-policy") / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    with PgveilProcess(sec_db, policy_path=path) as proc:
        yield proc


QUOTA = 60  # the teller quota of q60


@pytest.fixture(scope="module")
def q60(sec_db: PostgresCluster, tmp_path_factory: pytest.TempPathFactory,
        ) -> Iterator[PgveilProcess]:
    """A second pgveil on the security cluster whose policy gives tellers 60 rows per hour
    (the quota tests: test_hunt8.py, test_hunt9.py)."""
    with PgveilProcess(sec_db, policy_path=policy_with_teller_quota(
            tmp_path_factory.mktemp("q60"), QUOTA)) as proc:
        yield proc


@pytest.fixture
def new_teller(logins: Callable[[str], str]) -> Callable[[], str]:
    """Fresh logins matching teller_sz* (role teller, branch SZ01): each a quota of its own."""
    return lambda: logins("sz")


@pytest.fixture(scope="package")
def leak(sec_db: PostgresCluster, sec_pgveil: PgveilProcess, secrets: Secrets
         ) -> Iterator[LeakChecker]:
    _wait_for_catalog(sec_pgveil)
    checker = LeakChecker(sec_db, sec_pgveil, secrets)
    try:
        yield checker
    finally:
        checker.close()


_SENTINELS = itertools.count()


@contextlib.contextmanager
def dba_objects(leak: LeakChecker, setup: Sequence[str], teardown: str, probe: str,
                timeout: float = 30.0) -> Iterator[LeakChecker]:
    """Objects a DBA created (``setup``, run as dba in order) for the length of a module.

    pgveil learns about them from its catalog poll, so this waits until the teller is denied
    ``probe`` (a statement reading one of the new dependents) and a sentinel function created
    after the whole setup, and drops them (``teardown``) afterwards, also when a test failed.
    The sentinel matters: a poll can read its (consistent) snapshot halfway through the setup,
    when ``probe``'s object exists but later ones do not; a catalog that holds the sentinel was
    read after all of them.
    """
    sentinel = f"public.sec_sentinel_{os.getpid()}_{next(_SENTINELS)}"
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as conn:
        conn.execute(teardown)
        for sql in setup:
            conn.execute(sql)
        conn.execute(f"CREATE FUNCTION {sentinel}() RETURNS bigint LANGUAGE sql STABLE "
                     "AS 'SELECT count(*) FROM public.customers'")
    try:
        deadline = time.monotonic() + timeout
        pending = [f"select {sentinel}()", probe]
        while pending:
            with leak.connect() as conn:
                try:
                    conn.execute(pending[0])
                except psycopg.errors.InsufficientPrivilege:
                    pending.pop(0)
                    continue
                except psycopg.Error:
                    pass  # e.g. the catalog is not read yet and PostgreSQL refused it
            assert time.monotonic() < deadline, "pgveil did not pick up the new catalog"
            time.sleep(0.3)
        yield leak
    finally:
        with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as conn:
            conn.execute(teardown)
            conn.execute(f"DROP FUNCTION IF EXISTS {sentinel}()")
