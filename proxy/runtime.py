"""The long-lived state of one pgveil worker process, and its life cycle.

A :class:`Runtime` owns what outlives a connection: the config, the policy in force (swapped
atomically on reload: each statement sees exactly one policy version, because a session reads
``self.policy`` once per connection and the analyser keys its cache on the version), the
catalog of each database clients use (read over pgveil's own asyncpg control connection), the
decision analyser and its cache, the audit trail, the metrics, and the map of cancel keys.

``serve(config)`` runs it: listen (SO_REUSEPORT so several workers can share the port), serve
metrics, reload the policy on SIGHUP and when the file changes, and drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from proxy._native import compiled_modules
from proxy.config import Config
from proxy.metrics import Metrics, MetricsServer
from proxy.operator import LocalQuota, OperatorState
from proxy.server import (
    CANCEL_REQUEST,
    ClientConnection,
    make_server_ssl,
    make_upstream_ssl,
    random_key,
    spawn_holder,
)
from proxy.session import Session
from rewriters.model import Action, Analysis, Catalog, LexSettings, OperatorView

log = logging.getLogger("pgveil")

_HIT, _MISS = ("hit",), ("miss",)


# Changes whenever relations (or their names), views/rules, user functions (any column of their
# pg_proc row: name, schema, body), triggers, row-level security policies, defaults,
# constraints, domain defaults, operators, casts, partitions or any recorded dependency change
# (proxy/catalog.py follows all of them). Whole-row hashes, not version-specific columns, so the
# query runs on any supported PostgreSQL.
_CATALOG_FINGERPRINT = """
SELECT (SELECT count(*) || ':' || coalesce(max(oid::int8), 0) FROM pg_catalog.pg_class)
    || '/' || (SELECT coalesce(sum(pg_catalog.hashtext(relname || relnamespace::text)::int8), 0)
               FROM pg_catalog.pg_class WHERE oid >= 16384)
    || '/' || (SELECT count(*) || ':' || coalesce(sum(pg_catalog.hashtext(p::text)::int8), 0)
               FROM pg_catalog.pg_proc p WHERE oid >= 16384)
    || '/' || (SELECT count(*) || ':' || coalesce(sum(pg_catalog.hashtext(ev_action::text)::int8), 0)
               FROM pg_catalog.pg_rewrite WHERE oid >= 16384)
    || '/' || (SELECT count(*) || ':' || coalesce(sum(pg_catalog.hashtext(t::text)::int8), 0)
               FROM pg_catalog.pg_trigger t)
    || '/' || (SELECT count(*) || ':' || coalesce(sum(pg_catalog.hashtext(p::text)::int8), 0)
               FROM pg_catalog.pg_policy p)
    || '/' || (SELECT count(*) || ':' || coalesce(max(oid::int8), 0) FROM pg_catalog.pg_attrdef)
    || '/' || (SELECT count(*) || ':' || coalesce(max(oid::int8), 0)
               FROM pg_catalog.pg_constraint)
    || '/' || (SELECT count(*) || ':' || coalesce(sum(attrelid::int8 + atttypid::int8), 0)
               FROM pg_catalog.pg_attribute
               WHERE atttypid IN (SELECT oid FROM pg_catalog.pg_type WHERE typtype = 'd'))
    || '/' || (SELECT count(*) || ':' || coalesce(sum(pg_catalog.hashtext(
                   coalesce(typdefaultbin::text, '') || typnotnull::text)::int8), 0)
               FROM pg_catalog.pg_type WHERE typtype = 'd')
    || '/' || (SELECT count(*) || ':' || coalesce(max(oid::int8), 0) FROM pg_catalog.pg_operator)
    || '/' || (SELECT count(*) || ':' || coalesce(max(oid::int8), 0) FROM pg_catalog.pg_cast)
    || '/' || (SELECT count(*) FROM pg_catalog.pg_inherits)
    || '/' || (SELECT count(*) FROM pg_catalog.pg_depend)
"""


def control_dsn(config: Config, database: str) -> str | None:
    """The control DSN pointed at another database: catalogs are per database."""
    dsn = config.control.dsn
    if not dsn:
        return None
    # quoted: the name comes from a client's startup packet, and ``?k=v`` in it would become
    # connection parameters of the control login (settings such as session_preload_libraries)
    return urlunsplit(urlsplit(dsn)._replace(path="/" + quote(database, safe="")))


class Runtime:
    """See module docstring."""

    def __init__(self, config: Config, metrics: Metrics | None = None, *,
                 worker: int = 0, cancel_dir: Path | None = None):
        from rewriters.analyze import Analyzer

        self.config = config
        self.metrics = metrics or Metrics()
        self.worker = worker
        self.cancel_dir = cancel_dir
        self.policy: Any = None
        # bumps on every policy swap and catalog generation: sessions re-check their view
        # only when it moved (OperatorState.current runs before every statement)
        self.epoch = [0]
        # _policy_file_mark() of the policy file as last read (or tried): a change reloads
        self.policy_mark: tuple[int, ...] | None = None
        self.analyzer = Analyzer()
        self.catalogs: dict[str, Catalog] = {}
        self._catalog_locks: dict[str, asyncio.Lock] = {}
        self._catalog_loaded: dict[str, float] = {}
        self._catalog_read: dict[str, tuple[object, ...]] = {}  # _catalog_wants() at each read
        self._catalog_gen: dict[str, int] = {}
        self._view_versions: dict[str, tuple[tuple[str, int], str]] = {}
        self._views: dict[tuple[Any, ...], OperatorView] = {}
        self._unrestricted: dict[tuple[Any, ...], bool] = {}
        self.cancel_keys: dict[tuple[int, int], tuple[int, int]] = {}
        self._auth_pool: Any = None
        self.control: Any = None
        self.local_quota = LocalQuota()
        self.quota_reservations: dict[str, int] = {}  # OperatorState.reserve, per login
        self.clients: set[ClientConnection] = set()
        self.tasks, self.spawn = spawn_holder()
        self.audit: Any = None
        self.authenticator = self._make_authenticator()
        self.server_ssl = None
        self.server_cert_der: bytes | None = None
        self.client_tls_mode = "disable"
        if config.tls is not None and config.tls.cert and config.tls.key:
            self.server_ssl = make_server_ssl(str(config.tls.cert), str(config.tls.key))
            self.server_cert_der = _cert_der(config.tls.cert)
            self.client_tls_mode = config.tls.mode
        self.upstream_ssl = make_upstream_ssl(
            config.upstream.tls, str(config.upstream.ca) if config.upstream.ca else None)
        self.strict_audit = config.audit.durability == "strict"
        self._server: asyncio.base_events.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._draining = False
        self._upstream_ok_at = 0.0

    def _make_authenticator(self) -> Any:
        from proxy.auth import (
            PassthroughAuthenticator,
            ScramAuthenticator,
            UserlistAuthenticator,
        )

        mode = self.config.auth.mode
        if mode == "scram":
            return ScramAuthenticator(self._fetch_verifier)
        if mode == "userlist":
            if self.config.auth.userlist is None:
                raise ValueError("auth.mode userlist needs auth.userlist: PATH")
            return UserlistAuthenticator(self.config.auth.userlist)
        return PassthroughAuthenticator()

    async def _fetch_verifier(self, user: str) -> str | None:
        """auth_query over the control connection (a small pool, opened on first use)."""
        import asyncpg

        if self._auth_pool is None:
            if not self.config.control.dsn:
                raise RuntimeError("auth.mode scram needs control.dsn")
            self._auth_pool = await asyncpg.create_pool(
                self.config.control.dsn, password=self.config.control_password,
                min_size=1, max_size=4, timeout=10)
        row = await self._auth_pool.fetchrow(self.config.auth.auth_query, user)
        return None if row is None else row[1]

    # ------------------------------------------------------------------ policy
    def load_policy(self) -> None:
        """Parse → validate → swap. Raises PolicyError; the caller decides what that means."""
        from rewriters.policy import load_policy

        mark = _policy_file_mark(self.config.policy)  # before reading: a change made while
        policy = load_policy(self.config.policy)       # it is read is seen at the next poll
        self.policy = policy
        self.policy_mark = mark
        self.epoch[0] += 1
        self._views.clear()
        self.metrics.set_policy_version(policy.version)

    def reload_policy(self) -> bool:
        from rewriters.policy import PolicyError

        mark = _policy_file_mark(self.config.policy)
        try:
            self.load_policy()
        except PolicyError as exc:
            self.metrics.policy_reloads.labels(result="error").inc()
            log.error("policy reload failed, keeping version %s:\n%s",
                      getattr(self.policy, "version", "?"), exc)
            self.policy_mark = mark  # not tried again until the file changes
            return False
        self.metrics.policy_reloads.labels(result="ok").inc()
        log.info("policy reloaded: version %s", self.policy.version)
        for database, read in list(self._catalog_read.items()):
            if read != self._catalog_wants():  # new protected tables or masked columns:
                self.invalidate_catalog(database)  # read their columns now, not at the poll
        return True

    def _catalog_wants(self) -> tuple[object, ...]:
        """What a catalog read depends on in the policy."""
        policy = self.policy
        return (tuple(sorted(policy.protected_tables)),
                tuple((t, tuple(sorted(c))) for t, c in sorted(policy.sensitive_columns.items())))

    async def _watch_policy(self) -> None:
        interval = self.config.policy_watch_seconds
        if not interval:
            return  # SIGHUP only
        while True:
            await asyncio.sleep(interval)
            mark = _policy_file_mark(self.config.policy)
            if mark is not None and mark != self.policy_mark:
                self.reload_policy()

    # ------------------------------------------------------------------ catalog
    def control_dsn(self, database: str) -> str | None:
        return control_dsn(self.config, database)

    async def catalog(self, database: str) -> Catalog:
        """The catalog of ``database``; the first call loads it and starts its watcher."""
        cat = self.catalogs.get(database)
        if cat is not None:
            return cat
        lock = self._catalog_locks.setdefault(database, asyncio.Lock())
        async with lock:
            cat = self.catalogs.get(database)
            if cat is not None:
                return cat
            await self._reload_catalog(database)
            self.spawn(self._watch_catalog(database))
            return self.catalogs.get(database) or Catalog()

    async def _reload_catalog(self, database: str) -> None:
        loaded = await self._load_catalog(database)
        if loaded is not None:
            self.catalogs[database] = loaded
            self._catalog_gen[database] = self._catalog_gen.get(database, 0) + 1
            self.epoch[0] += 1
            self._catalog_loaded[database] = time.monotonic()
            self._views = {k: v for k, v in self._views.items() if k[-1] != database}

    async def _watch_catalog(self, database: str) -> None:
        """Reload the catalog when the schema changes (a cheap fingerprint polled every
        ``catalog_poll_seconds``), after DDL through pgveil, and every
        ``catalog_refresh_seconds`` regardless. Open sessions pick the new catalog up at their
        next statement (their view's version carries the catalog generation)."""
        import asyncpg

        conn = None
        last: str | None = None
        failing = False
        while True:
            await asyncio.sleep(self.config.catalog_poll_seconds)
            try:
                if conn is None or conn.is_closed():
                    dsn = self.control_dsn(database)
                    if dsn is None:
                        return
                    conn = await asyncpg.connect(dsn, password=self.config.control_password,
                                                 timeout=10)
                mark = str(await conn.fetchval(_CATALOG_FINGERPRINT, timeout=10))
            except Exception as exc:  # the control DB may be down: keep the last catalog
                # said once per outage: schema changes go unseen until it ends
                (log.debug if failing else log.warning)(
                    "catalog check for %s failed (%s); keeping the last catalog until it "
                    "works again", database, exc)
                failing = True
                conn = None
                continue
            if failing:
                log.info("catalog check for %s works again", database)
                failing = False
            stale = time.monotonic() - self._catalog_loaded.get(database, 0) >= \
                self.config.catalog_refresh_seconds
            # the first fingerprint is taken after the first load: a change made in between
            # (DDL in the first poll interval) would never be seen, so reload once more
            if last is None or mark != last or stale:
                await self._reload_catalog(database)
            last = mark

    def view_version(self, database: str) -> str:
        """What a session's view must match: the policy version and the catalog generation.
        Asked before every statement, so the string is built once per change, not per call."""
        key = (self.policy.version, self._catalog_gen.get(database, 0))
        cached = self._view_versions.get(database)
        if cached is None or cached[0] != key:
            cached = (key, f"{key[0]}+c{key[1]}")
            self._view_versions[database] = cached
        return cached[1]

    async def _load_catalog(self, database: str) -> Catalog | None:
        import asyncpg

        from proxy.catalog import load_catalog

        dsn = self.control_dsn(database)
        if dsn is None:
            return None
        try:
            conn = await asyncpg.connect(dsn, password=self.config.control_password, timeout=10)
        except Exception as exc:
            log.warning("catalog: cannot connect to %s: %s", database, exc)
            return None
        try:
            wants = self._catalog_wants()
            cat, missing = await load_catalog(conn, self.policy.protected_tables,
                                              self.policy.sensitive_columns)
            self._catalog_read[database] = wants
            for name in missing:
                log.warning("protected table %s is missing from database %s", name, database)
            return cat
        except Exception as exc:
            log.warning("catalog: cannot read %s: %s", database, exc)
            return None
        finally:
            await conn.close()

    def invalidate_catalog(self, database: str) -> None:
        """DDL went through pgveil: reload at once rather than at the next poll."""
        self._catalog_loaded.pop(database, None)
        if database in self.catalogs:
            self.spawn(self._reload_catalog(database))

    def role_of(self, login: str, ip: str | None, application: str) -> tuple[str, bool]:
        """The login's role and whether it sees everything raw -- decided from the policy alone,
        before PostgreSQL has accepted the login (no catalog is read for an unauthenticated
        client: its database name is only a claim). Raises LookupError like operator_view."""
        from rewriters.policy import build_operator_view

        policy = self.policy
        operator = policy.resolve(login, ip, application)
        if operator is None:
            raise LookupError(f"no policy role matches login {login!r} and the policy has no "
                              "'default' role: connection refused")
        key = (policy.version, operator.role, tuple(sorted(operator.attributes.items())))
        known = self._unrestricted.get(key)
        if known is None:
            if len(self._unrestricted) > 1024:
                self._unrestricted.clear()
            known = self._unrestricted[key] = build_operator_view(
                policy, operator, Catalog()).unrestricted
        return operator.role, known

    async def operator_view(self, login: str, ip: str | None, application: str,
                            database: str) -> OperatorView:
        """The operator's view of ``database`` (its catalog loaded on first use): call only
        once PostgreSQL has accepted the login to that database."""
        policy = self.policy
        operator = policy.resolve(login, ip, application)
        if operator is None:
            raise LookupError(f"no policy role matches login {login!r} and the policy has no "
                              "'default' role: connection refused")
        await self.catalog(database)
        return self._view_for(policy, operator, login, database)

    def _view_for(self, policy: Any, operator: Any, login: str, database: str) -> OperatorView:
        """The operator's view under ``policy`` and the database's current catalog; its
        ``policy_version`` carries the catalog generation so cached decisions never outlive
        a schema change."""
        from rewriters.policy import build_operator_view

        catalog = self.catalogs.get(database) or Catalog()
        key = (policy.version, operator.role, tuple(sorted(operator.attributes.items())),
               login, id(catalog), database)
        view = self._views.get(key)
        if view is None:
            view = build_operator_view(policy, operator, catalog)
            version = f"{policy.version}+c{self._catalog_gen.get(database, 0)}"
            view = dataclasses.replace(view, policy_version=version)  # = view_version()
            self._views[key] = view
        return view

    # ------------------------------------------------------------------ sessions
    def new_session(self, view: OperatorView, lex: LexSettings, identity: dict[str, Any],
                    database: str, client_ip: str | None = None) -> Session:
        metrics = self.metrics
        analyzer = self.analyzer
        role = view.role
        statements = metrics.statement_counts
        cache_counts = metrics.cache_counts
        rewrite_hist = metrics.rewrite_durations

        def analyze(sql: str, v: OperatorView, lx: LexSettings, **kw: Any) -> Analysis:
            analysis = analyzer.analyze(sql, v, lx, **kw)
            touched = False
            for st in analysis.statements:
                if st.tables:
                    touched = True
                if st.kind == "ddl" and st.action is not Action.DENY:
                    self.invalidate_catalog(database)
            if touched:  # the fast path (nothing protected) is not a cache lookup
                cache_counts.inc(_HIT if analysis.cached else _MISS)
                rewrite_hist.observe(analysis.rewrite_seconds)
            return analysis

        record = statements.record
        keys: dict[str, dict[str, tuple[str, str, str]]] = {}

        count_hit, observe_rewrite = cache_counts.record, rewrite_hist.observe

        def memo_hit(seconds: float) -> None:  # a protected statement from the session memo
            count_hit(_HIT)
            observe_rewrite(seconds)

        def count_statement(decision: str, kind: str) -> None:
            by_kind = keys.get(decision)
            if by_kind is None:
                by_kind = keys[decision] = {}
            key = by_kind.get(kind)
            if key is None:
                key = by_kind[kind] = (role, decision, kind)
            record(key)

        login, ip, application = (identity.get("operator", view.login), client_ip,
                                  identity.get("application", ""))
        operator = OperatorState(
            view, self.control, self.control or self.local_quota,
            lambda role: self._rebuild_view(view, role, database),
            policy_view=lambda: self._current_policy_view(login, ip, application, database),
            policy_version=lambda: self.view_version(database), epoch=self.epoch,
            reservations=self.quota_reservations)
        if self.control is not None and view.limits.quota_seconds:
            self.spawn(self.control.refresh_quota(view.login, view.limits.quota_seconds))
        available = (lambda: self.audit.available) if self.audit is not None else (lambda: True)
        if self.audit is not None and self.config.audit.on_failure == "allow":
            available = lambda: True  # noqa: E731 - statements pass; failures are counted
        return Session(view=view, analyze=analyze, lex=lex, identity=identity,
                       audit_all=self.config.audit.all, audit_available=available,
                       operator=operator, count_statement=count_statement,
                       observe_duration=metrics.durations.observe,
                       hold_protected=self.audit is not None and self.strict_audit,
                       plain_kind=analyzer.plain_kind,
                       plain_memoizable=analyzer.plain_memoizable,
                       statement_key=lambda decision, kind: (role, decision, kind),
                       record_statement=record,
                       server_prepare=self.config.upstream.prepare_rewritten,
                       audit_form=self.audit_form, on_memo_hit=memo_hit)

    def _current_policy_view(self, login: str, ip: str | None, application: str,
                             database: str) -> tuple[str, OperatorView | None]:
        """(policy version, the operator's view under it) — used by open sessions to follow a
        policy reload at their next statement, so a tightened policy applies at once."""

        policy = self.policy
        operator = policy.resolve(login, ip, application)
        if operator is None:  # the login left the policy: customer data is refused from now on
            from rewriters.policy import revoked_view

            revoked = revoked_view(policy, login, self.catalogs.get(database) or Catalog())
            version = self.view_version(database)
            return version, dataclasses.replace(revoked, policy_version=version)
        view = self._view_for(policy, operator, login, database)
        return view.policy_version, view

    def _rebuild_view(self, view: OperatorView, role: str, database: str) -> OperatorView:
        """The view of another role for the same operator (a ``role=…`` grant)."""
        from rewriters.policy import Operator

        operator = Operator(view.login, role, dict(view.attributes))
        return self._view_for(self.policy, operator, view.login, database)

    async def _start_control(self) -> None:
        """Grants and shared quotas live in the control database (schema pgveil)."""
        from proxy.control import ControlStore

        if not self.config.control.dsn:
            return
        self.control = ControlStore(self.config.control.dsn, self.config.control_password)
        self.control.on_grant_event(self._audit_grant_event)
        await self.control.start(require=False)

    def _audit_grant_event(self, event: Any) -> None:
        grant = event.grant
        kind = getattr(event.kind, "value", str(event.kind))
        if self.audit is None:
            return
        from proxy.control import format_lift

        with contextlib.suppress(Exception):
            self.audit.record({
                "session": None, "operator": grant.login, "role": None, "client": None,
                "application": "pgveil grant", "database": None, "kind": f"grant_{kind}",
                "statement": None, "tables": [], "columns": [], "decision": "allowed",
                "reasons": [f"lift {format_lift(grant.lift)}", f"reason: {grant.reason}",
                            f"approver: {grant.approver}"],
                "grant": grant.id, "rows": None, "duration_ms": None, "error": None})

    def submit_audit(self, fields: dict[str, Any],
                     standard_conforming_strings: bool = True) -> asyncio.Future[None] | None:
        """Count a statement in the metrics and queue its audit record, its literals redacted
        as its session reads them (with standard_conforming_strings off, backslashes escape
        inside every string)."""
        # once per protected statement: the counters are batched (Metrics.flush adds them)
        metrics = self.metrics
        role = fields.get("role", "")
        if fields.get("decision") == "blocked":
            label = _reason_label((fields.get("reasons") or ["policy"])[0])
            if label == "policy" and fields.get("error"):  # a check that failed as it ran
                label = _reason_label(fields["error"])
            metrics.blocked_counts.inc((role, label))
        rows = fields.get("rows") or 0
        if rows:
            counts = metrics.protected_row_counts.pending
            for table in fields.get("tables") or ():
                key = (role, table)
                counts[key] = counts.get(key, 0) + rows
        lookups = fields.get("lookups")
        if lookups:
            counts = metrics.lookup_counts.pending
            for column in lookups:
                key = (role, column)
                counts[key] = counts.get(key, 0) + 1
        if self.audit is None:
            return None
        fields["statement"] = _audited_statement(fields.get("statement") or "",
                                                 standard_conforming_strings,
                                                 self.config.audit.redact_literals)
        if self.config.audit.redact_literals:
            if fields.get("error"):
                fields["error"] = _redact_error(fields["error"])
            if fields.get("reasons"):  # a denial's reason may quote the statement's text
                fields["reasons"] = [_redact_error(r) for r in fields["reasons"]]
        try:
            return self.audit.record(fields)
        except Exception as exc:  # the trail counts its own failures
            log.error("audit record failed: %s", exc)
            return None

    def audit_form(self, fields: dict[str, Any],
                   standard_conforming_strings: bool = True) -> AuditForm | None:
        """The fixed part of a protected statement's audit record and metrics (``fields`` as
        for :meth:`submit_audit`, without rows, duration_ms and error), for
        :meth:`submit_form`; None when the general path must be used: literals are not
        redacted (the statement text then differs from call to call), the decision is a
        block, or the trail cannot encode these fields in advance."""
        if fields.get("decision") == "blocked" or (
                self.audit is not None and not self.config.audit.redact_literals):
            return None
        role = fields.get("role", "")
        record = None
        if self.audit is not None:
            fields = dict(fields, statement=_audited_statement(
                fields.get("statement") or "", standard_conforming_strings, True))
            try:
                record = self.audit.prepare(fields)
            except ValueError:
                return None
            if record is None:
                return None
        return AuditForm(record, tuple((role, t) for t in fields.get("tables") or ()),
                         tuple((role, c) for c in fields.get("lookups") or ()))

    def submit_form(self, form: AuditForm, rows: int, duration_ms: float,
                    completion: Any = None) -> Any:
        """:meth:`submit_audit` for a statement whose record is ``form`` with these values.
        ``completion``: resolved like the returned future would be (see AuditTrail.record_form);
        returns it (or a new future), or None without an audit trail."""
        metrics = self.metrics
        if rows:
            counts = metrics.protected_row_counts.pending
            for key in form.row_keys:
                counts[key] = counts.get(key, 0) + rows
        if form.lookup_keys:
            counts = metrics.lookup_counts.pending
            for key in form.lookup_keys:
                counts[key] = counts.get(key, 0) + 1
        if form.record is None or self.audit is None:
            return None
        try:
            return self.audit.record_form(form.record, rows, duration_ms, completion)
        except Exception as exc:  # the trail counts its own failures
            log.error("audit record failed: %s", exc)
            return None

    def connection_opened(self, conn: ClientConnection) -> None:
        self.clients.add(conn)
        self.metrics.connections.inc()

    def connection_closed(self, conn: ClientConnection) -> None:
        self.clients.discard(conn)
        self.metrics.connections.dec()

    @property
    def connection_count(self) -> int:
        return len(self.clients)

    # ------------------------------------------------------------------ cancel
    def register_cancel_key(self, backend: tuple[int, int]) -> tuple[int, int]:
        """Hand the client a key of ours. Its pid carries the worker index in the top bits so
        a CancelRequest landing on another worker can be routed to the right one."""
        pid, key = random_key()
        pid = (self.worker << 22) | (pid & 0x3FFFFF)
        self.cancel_keys[(pid, key)] = backend
        return pid, key

    async def handle_cancel(self, pid: int, key: int) -> None:
        backend = self.cancel_keys.get((pid, key))
        if backend is not None:
            await self.send_cancel(backend)
            return
        worker = pid >> 22
        if worker != self.worker and self.cancel_dir is not None:
            path = self.cancel_dir / f"worker-{worker}.sock"
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                r, w = await asyncio.open_unix_connection(str(path))
                w.write(struct.pack("!IIII", 16, CANCEL_REQUEST, pid, key))
                await w.drain()
                # that worker closes once PostgreSQL has taken the cancel (see send_cancel)
                await asyncio.wait_for(r.read(), self.config.upstream.connect_timeout)
                w.close()

    async def send_cancel(self, backend: tuple[int, int]) -> None:
        """Send a CancelRequest for ``backend`` and wait, as libpq's PQcancel does, until
        PostgreSQL closes the connection, i.e. has signalled the backend. The client's own
        cancel connection is closed only after that: a client that sends its next statement
        as soon as its cancel call returns must not have that statement cancelled instead."""
        cfg = self.config.upstream
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(cfg.host, cfg.port), cfg.connect_timeout)
            writer.write(struct.pack("!IIII", 16, CANCEL_REQUEST, *backend))
            await writer.drain()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(), cfg.connect_timeout)
            writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("could not send cancel upstream: %s", exc)

    async def _serve_cancel_socket(self) -> None:
        if self.cancel_dir is None:
            return
        path = self.cancel_dir / f"worker-{self.worker}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                data = await reader.readexactly(16)
                _, code, pid, key = struct.unpack("!IIII", data)
                backend = self.cancel_keys.get((pid, key))
                if code == CANCEL_REQUEST and backend is not None:
                    await self.send_cancel(backend)
            writer.close()

        # keep a reference: a collected Server stops accepting
        self._cancel_server = await asyncio.start_unix_server(handle, str(path))

    # ------------------------------------------------------------------ life cycle
    def ready(self) -> bool:
        return self.policy is not None and self._server is not None and not self._draining

    async def start(self) -> None:
        cfg = self.config
        if self.policy is None:
            self.load_policy()
        if cfg.audit.file is not None or cfg.audit.postgres is not None:
            from proxy.audit import AuditSettings, AuditTrail

            a = cfg.audit
            settings = AuditSettings(
                file=a.file, postgres_dsn=a.postgres.dsn if a.postgres else None,
                postgres_table=a.postgres.table if a.postgres else "pgveil.audit",
                signing_key=a.signing_key, durability=a.durability, on_failure=a.on_failure,
                redact_literals=a.redact_literals, all=a.all,
                checkpoint_every=a.checkpoint_every, checkpoint_seconds=a.checkpoint_seconds,
                rotate_bytes=a.rotate_bytes, keep_files=a.keep_files, fsync=a.fsync)
            # stable across restarts (so a cut tail before a restart is detectable), unique among
            # the instances running on this host (one listen port each)
            chain = f"{socket.gethostname()}-{cfg.listen.port}-w{self.worker}"
            self.audit = AuditTrail(settings, chain_id=chain, metrics=_AuditMetrics(self.metrics))
            await self.audit.start()
        await self._start_control()
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.listen.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((cfg.listen.host, cfg.listen.port))
        sock.listen(cfg.listen.backlog)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ClientConnection(self), sock=sock)
        for s in self._server.sockets:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.spawn(self._watch_policy())
        self.spawn(self.metrics.flush_forever())
        self.spawn(self._serve_cancel_socket())
        if cfg.listen.idle_timeout > 0:
            self.spawn(self._idle_reaper(cfg.listen.idle_timeout))
        # warm the catalog of the databases we know of, so the first client does not wait
        log.info("pgveil listening on %s:%s (worker %d, policy %s, hot path %s)",
                 cfg.listen.host, self.port, self.worker, self.policy.version,
                 "compiled" if compiled_modules() else "pure Python")

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start_metrics(self, render: Any = None) -> None:
        cfg = self.config.metrics
        if not cfg.enabled:
            return
        self._metrics_server = MetricsServer(self.metrics, self.ready, render)
        await self._metrics_server.start(cfg.host, cfg.port)

    async def _idle_reaper(self, timeout: float) -> None:
        from proxy.server import fatal

        while True:
            await asyncio.sleep(min(timeout, 5.0))
            for conn in list(self.clients):
                if conn.session is not None and not conn.session._slots and \
                        conn.idle_for() > timeout:
                    conn.send_client(fatal("57P05", "terminating connection due to idle "
                                            "timeout (pgveil listen.idle_timeout)"))
                    conn.close()

    async def drain(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight statements finish, then close everything."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + timeout
        while self.clients and time.monotonic() < deadline:
            # a session is done once it is idle outside a transaction block: an open
            # transaction gets the chance to commit or roll back before the deadline
            busy = [c for c in self.clients if c.session is None or c.session.busy]
            idle = [c for c in self.clients if c not in busy]
            for c in idle:
                c.close()
            if not busy:
                break
            await asyncio.sleep(0.1)
        for c in list(self.clients):
            c.close()
        if self.audit is not None:
            # a sink that cannot be written must not hold up shutdown for long
            await self.audit.close(timeout=10.0 if self.audit.available else 2.0)
        if self.control is not None:
            with contextlib.suppress(Exception):
                await self.control.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()


def _cert_der(path: Path) -> bytes | None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        pem = path.read_bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=4096)
@dataclasses.dataclass(frozen=True, slots=True)
class AuditForm:
    """What :meth:`Runtime.submit_form` needs of one protected statement shape: its audit
    record with rows and duration left open, and its metric label tuples."""

    record: Any  # proxy.audit.RecordForm, or None without an audit trail
    row_keys: tuple[tuple[str, str], ...]  # (role, table) of pgveil_protected_rows_total
    lookup_keys: tuple[tuple[str, str], ...]  # (role, column) of the lookup counter


def _redact(sql: str, standard_conforming_strings: bool = True) -> str:
    """Literals out of the audited statement."""
    from rewriters.shape import redact_literals

    return redact_literals(sql, standard_conforming_strings)


# The statement text an audit record keeps: beyond this, the start and the length. A refused
# statement of megabytes would otherwise be redacted on the event loop (every session waits)
# and written whole into the log. An unterminated literal at the cut is redacted to its end.
AUDIT_STATEMENT_CHARS = 16384


def _audited_statement(sql: str, standard_conforming_strings: bool, redact: bool) -> str:
    cut = len(sql) > AUDIT_STATEMENT_CHARS
    text = sql[:AUDIT_STATEMENT_CHARS] if cut else sql
    if redact:
        text = _redact(text, standard_conforming_strings)
    if cut:
        text += f" … [cut: the statement has {len(sql)} characters]"
    return text


def _redact_error(message: str) -> str:
    """PostgreSQL error messages, and pgveil's reasons for a denial, can echo values
    (``invalid input syntax for type integer: "13812345678"``, ``syntax error at or near
    "'330106198312231112'"``): drop quoted parts and long digit runs."""
    import re

    code = ""
    if re.match(r"[0-9A-Z]{5}: ", message):  # the SQLSTATE the session puts first is no value
        code, message = message[:7], message[7:]
    message = re.sub(r'"[^"]*"', '"?"', message)
    message = re.sub(r"'(?:[^']|'')*'", "'?'", message)
    return code + re.sub(r"\d{4,}", "?", message)


# (phrase, label) for pgveil_blocked_total, first match wins: phrases of pgveil's own reasons,
# specific before general, never a bare word a login, role name or file path could contain
# ("auditor7" is not an audit failure, "copy-of-policy.yaml" not a COPY)
_REASON_LABELS = (
    ("no longer matched", "revoked"), ("renamed or dropped", "schema_changed"),
    ("changed since", "rules_changed"), ("role switching", "role"), ("set role", "role"),
    ("audit unavailable", "audit"), ("audit log", "audit"), ("audit record", "audit"),
    ("audit sink", "audit"), ("row limit", "row_limit"), ("unbounded", "unbounded"),
    ("hours", "hours"), ("quota", "quota"), ("copy", "copy"), ("ddl", "ddl"),
    ("function", "function"), ("statistics", "statistics"),
    ("cannot analyse", "cannot_analyse"), ("lookup", "lookup"), ("explain", "explain"),
    ("row filter", "row_filter"), ("insert", "insert"), ("update", "update"),
    ("delete", "delete"), ("view", "view"),
)


@functools.lru_cache(maxsize=1024)
def _reason_label(reason: str) -> str:
    """Bounded label for pgveil_blocked_total: the reason's category, not its details."""
    low = reason.lower()
    for phrase, label in _REASON_LABELS:
        if phrase in low:
            return label
    return "policy"


class _AuditMetrics:
    """Adapter handing the audit trail the three audit metrics."""

    def __init__(self, m: Metrics):
        self.records = m.audit_records
        self.failures = m.audit_failures
        self.queue = m.audit_queue


async def run_worker(config: Config, worker: int = 0, cancel_dir: Path | None = None,
                     serve_metrics: bool = True) -> None:
    rt = Runtime(config, worker=worker, cancel_dir=cancel_dir)
    rt.load_policy()
    if serve_metrics:
        # before the listener: whoever sees pgveil accept connections finds the metrics (and
        # /readyz answers 503 until the listener is up)
        await rt.start_metrics()
    await rt.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, rt.reload_policy)
    await stop.wait()
    log.info("draining")
    await rt.drain()


def _policy_file_mark(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """What tells that the policy file changed: not its mtime alone, which ``cp -p``,
    ``rsync -t`` or two writes in one clock tick keep; the inode (an editor's or a ConfigMap's
    rename), the size and the change time (which no one can set) as well. None: unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
