"""The data that flows between the policy, the catalog, the rewriter and the proxy.

These frozen dataclasses are the contract between the packages:

* ``rewriters.policy`` loads policy.yaml and, for one operator (login + client address +
  application_name), produces an :class:`OperatorView`: which tables are protected, how each
  column is shown to this operator (a SQL expression, already qualified with ``pg_catalog``), the
  row filter with the operator's attributes spliced in as SQL literals, and the role's limits.
* ``proxy.catalog`` reads the database and produces a :class:`Catalog`: the columns (in order,
  with their exact types) of every protected table, and the views, materialized views and
  functions that read them.
* ``rewriters.analyze`` takes one SQL text plus an :class:`OperatorView` and
  :class:`LexSettings` and returns an :class:`Analysis`: one :class:`StatementDecision` per
  statement, and the SQL to send upstream.
* ``proxy.session`` acts on the decision: forwards, sends the rewritten SQL, or denies; counts
  rows on the wire against ``row_limit``; hands the audit fields to ``proxy.audit``.

Everything here is pure data; nothing does I/O.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field

DENY_SQLSTATE = "42501"  # insufficient_privilege: every policy denial uses it
# how the message of a check pgveil writes into a statement begins (rewriters.dml.failing):
# PostgreSQL raises it as invalid input (22P02) and the session turns it into a 42501 denial.
# A nonce of this process, so that a client's own bad cast ('pgveil: …'::int) stays its own
# error rather than passing for a denial.
FAILING_PREFIX = f"pgveil {secrets.token_hex(4)}: "
# among the reasons of a statement pgveil wrote such checks into (the exact messages are in
# StatementDecision.checks: only those errors are denials, so a client that learnt the nonce
# cannot relabel its own statements' failures)
EXECUTION_CHECK_REASON = "row filter checked as rows are written"
# ... and of a statement pgveil wrapped so that PostgreSQL itself fails it past max_rows
# (rewriters.analyze.cap_inside): a data change with RETURNING, or a capped read that shares
# its request with other statements. Stopped on the wire instead, the rows would be withheld
# while PostgreSQL committed the change and ran the rest of the request.
ROW_LIMIT_CHECK_REASON = "max_rows checked inside PostgreSQL (the statement fails as a whole)"


@dataclass(frozen=True)
class CatalogColumn:
    """One column of a protected table as PostgreSQL has it."""

    name: str
    type_sql: str  # pg_catalog.format_type(atttypid, atttypmod), e.g. "numeric(14,2)", "text"
    type_oid: int = 0
    # Keys, for the existence oracles of DML (a duplicate-key or foreign-key error tells whether
    # a row outside the operator's filter holds a value):
    unique: bool = False  # in a unique or exclusion index: key, INCLUDE, expression or predicate
    references: str | None = None  # "schema.table.column" of a single-column foreign key


@dataclass(frozen=True)
class Catalog:
    """What the database says about the protected tables (read by ``proxy.catalog``).

    ``tables`` maps ``schema.table`` to its columns in attnum order (dropped columns excluded).
    ``dependents`` maps ``schema.name`` of a view / materialized view / function / rule that
    reads a protected table to the protected tables it reads. A masked role is denied access to
    a dependent unless the policy lists it.
    ``write_hooks`` maps a protected table to what runs with its raw rows when it is written:
    the functions of its triggers (and of its partitions' triggers) and its non-view rules, as
    ``schema.name``. A masked role's INSERT / UPDATE / DELETE / MERGE / COPY FROM on the table
    is denied while one of them is not listed in the policy (the hook sees NEW and OLD raw and
    can copy them anywhere: a NOTICE, NOTIFY, a history table).
    """

    tables: dict[str, tuple[CatalogColumn, ...]] = field(default_factory=dict)
    dependents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    write_hooks: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnView:
    """How one column of a protected table is presented to an operator.

    ``expr`` is None when the column is shown raw, else a complete SQL expression over the raw
    column (referenced by its quoted name) that returns the column's exact type, e.g.
    ``CAST(CASE WHEN "phone" IS NULL THEN NULL ELSE pg_catalog.textcat(...) END AS text)``.
    """

    name: str
    type_sql: str
    expr: str | None = None
    mask_name: str | None = None  # "phone", "round", ... for reasons/audit; None when raw
    lookup: bool = False  # exact-match lookup on the raw value is allowed for this column
    unique: bool = False  # CatalogColumn.unique, copied
    references: str | None = None  # CatalogColumn.references, copied


@dataclass(frozen=True)
class TableView:
    """One protected table as one operator sees it."""

    name: str  # schema.table, lower case, as in the policy
    columns: tuple[ColumnView, ...]  # catalog order
    row_filter: str | None = None  # SQL predicate with attributes already as literals; None = all rows
    # why every statement that names this table is refused for this operator (the policy masks
    # a column the table no longer has, or the login left the policy); None = substituted
    refused: str | None = None

    @property
    def masked(self) -> bool:
        return (self.row_filter is not None or self.refused is not None
                or any(c.expr is not None for c in self.columns))


class Unbounded(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class Limits:
    """Export limits of a role (SPEC §4); None means unlimited."""

    max_rows: int | None = None
    quota_rows: int | None = None
    quota_seconds: float | None = None
    hours: tuple[str, str] | None = None  # ("08:00", "20:00")
    timezone: str = "UTC"
    copy: bool = False  # copy: allow
    unbounded: Unbounded = Unbounded.ALLOW
    ddl: bool = False  # ddl: allow (create views, functions, DO blocks)
    functions: bool = False  # may call functions/views that read protected tables
    # notification channels (names as PostgreSQL stores them, or glob patterns) a masked role
    # may LISTEN to: another session's NOTIFY payload can carry any data, unmasked
    listen: tuple[str, ...] = ()
    # values one ``lookup`` conjunct may present (``phone IN (...)``): the masks show most of a
    # value, so a long list of candidates would recover the hidden digits in a few statements
    lookup_max_values: int = 10


@dataclass(frozen=True)
class OperatorView:
    """Everything the rewriter needs to know about one operator, resolved once per connection.

    ``unrestricted`` is True for a role that sees everything raw with no filter (the DBA): its
    statements are still classified and audited, but never rewritten or denied for masking.
    ``allowed_dependents`` are views/functions the policy explicitly lists as safe.
    ``policy_version`` goes into cache keys so a reload never serves a stale decision.
    """

    login: str
    role: str
    attributes: dict[str, str]
    tables: dict[str, TableView]  # schema.table -> view
    limits: Limits
    unrestricted: bool
    policy_version: str
    allowed_dependents: frozenset[str] = frozenset()
    dependents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    write_hooks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # Catalog.write_hooks
    # the login no operator matches any more (policy.revoked_view): no grant lifts it
    revoked: bool = False


@dataclass(frozen=True)
class LexSettings:
    """Session settings that change how PostgreSQL reads SQL text (tracked from ParameterStatus).

    Part of every cache key: the same bytes lex differently under
    ``standard_conforming_strings = off`` or a GBK client encoding.
    """

    standard_conforming_strings: bool = True
    client_encoding: str = "UTF8"
    # An earlier statement of the session is still running (or its ParameterStatus reports,
    # which PostgreSQL sends with ReadyForQuery, have not arrived): it may have changed the two
    # settings above, so this text may be read under other ones (a pipelined
    # ``SET standard_conforming_strings = off`` or ``SET client_encoding = 'GBK'``).
    unsettled: bool = False


class Action(enum.Enum):
    FORWARD = "forward"  # send the statement unchanged
    REWRITE = "rewrite"  # send StatementDecision.sql instead
    DENY = "deny"  # answer with an ErrorResponse (42501); the statement never reaches PostgreSQL


@dataclass(frozen=True)
class StatementDecision:
    """The decision for one statement, with everything the audit record and wire limits need.

    ``kind`` is the lower-case leading keyword class: select, insert, update, delete, merge,
    copy, ddl, utility, set, transaction, prepare, execute, declare, fetch, explain, other.
    ``tables``/``columns`` list the *protected* tables and columns the statement references
    (qualified, e.g. ``public.customers.phone``); ``protected`` is True when ``tables`` is
    non-empty (or the statement may touch one): such statements are audited and row-counted.
    ``row_limit`` is the role's max_rows to enforce on the wire (None = no cap).
    ``cursor``: name of the cursor a DECLARE creates, or the cursor a FETCH/MOVE reads.
    ``prepared``: name of the statement a SQL-level PREPARE creates or an EXECUTE runs.
    ``lookups``: qualified columns matched exactly on raw values (audited as lookups).
    ``lookup_values``: how many values those lookups present; the statement is charged at least
    that many rows against the quota, found or not (a guess that misses is not free).
    ``row_weight``: how many rows of customer data one result row can carry (a self-join, lag,
    pivots); ``row_limit`` is already divided by it and the quota is charged rows x weight.
    """

    action: Action
    sql: str
    kind: str
    tables: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    message: str = ""
    sqlstate: str = DENY_SQLSTATE
    row_limit: int | None = None
    cursor: str | None = None
    prepared: str | None = None
    lookups: tuple[str, ...] = ()
    lookup_values: int = 0
    row_weight: int = 1
    copy_out: bool = False
    copy_in: bool = False
    # the command tag PostgreSQL's answer stands for when pgveil wrapped a data change into a
    # SELECT (``UPDATE``, ``DELETE``, ``INSERT 0``): the session writes it back
    command_tag: str | None = None
    # the messages of the checks pgveil wrote into it (rewriters.dml.failing): a failed cast of
    # one of these is a policy denial, any other error the statement's own
    checks: tuple[str, ...] = ()

    @property
    def protected(self) -> bool:
        return bool(self.tables)


@dataclass(frozen=True)
class ServerForm:
    """``Analysis.sql`` as a parameterised statement PostgreSQL can prepare once per
    connection: ``sql`` with ``$1..$n`` where the client's literals were, ``types`` the
    parameter type OIDs each literal has as a literal (0 = unknown, like a quoted string),
    ``values`` their text-format values. Executing it with these values means what executing
    ``Analysis.sql`` means, without PostgreSQL parsing and planning the rewritten text again."""

    sql: str
    types: tuple[int, ...]
    values: tuple[str, ...]
    # where each literal is in the analysed text, as (start, end) character offsets
    spans: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Analysis:
    """The result of analysing one SQL text (a simple Query may hold several statements).

    ``sql`` is what to send upstream when nothing is denied: the original text byte-for-byte when
    every statement is FORWARD. ``statements`` are in text order. ``cached`` says whether the
    decision came from the shape cache (for metrics); ``rewrite_seconds`` is the analysis time.
    ``server_form``: for a single rewritten SELECT from the shape cache, the same statement as
    a parameterised one the proxy may prepare upstream (None when that is not known to be
    equivalent).
    """

    sql: str
    statements: tuple[StatementDecision, ...]
    cached: bool = False
    rewrite_seconds: float = 0.0
    server_form: ServerForm | None = None

    @property
    def denied(self) -> StatementDecision | None:
        for st in self.statements:
            if st.action is Action.DENY:
                return st
        return None

    @property
    def changed(self) -> bool:
        return any(st.action is not Action.FORWARD for st in self.statements)
