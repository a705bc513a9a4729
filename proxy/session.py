"""The per-connection policy state machine, after startup: pure, no sockets, no asyncio.

The asyncio shell (``proxy.server``) feeds it the bytes each side sends and performs what it
returns. Theory of operation:

* **Client → server.** Frames are split; only Query ('Q') and Parse ('P') carry SQL, so only
  they are analysed (``rewriters.analyze.Analyzer``). A statement that needs no change is
  forwarded byte-for-byte; a rewritten one is re-encoded with the session's client encoding; a
  denied one is replaced by a statement that makes *PostgreSQL itself* raise SQLSTATE 42501
  with our message (``DO $$ … RAISE …``). That keeps client and server in step on transaction
  state for free: inside a block the transaction ends up failed on both sides, and in the
  extended protocol the server skips the rest of the batch until Sync exactly as it would for
  any failed Parse. The denied statement itself never reaches PostgreSQL.
  Bind/Execute/Describe/Close/Sync are tracked (portals and statements by name) so results can
  be attributed to the decision that produced them.
* **Server → client.** Results are attributed to *slots* pushed in client order: one per
  simple Query (covering each of its statements in turn), one per Execute, and a marker per
  Sync. DataRows of protected statements are counted; past the role's ``max_rows`` they stop
  being forwarded, the shell cancels the query upstream, and the statement's end
  (CommandComplete / PortalSuspended / the cancel's ErrorResponse) is replaced by our 42501
  error. When a statement ends, an audit record is emitted if it touched a protected table.
* ReadyForQuery and ParameterStatus keep the session's view of the transaction status and of the
  settings that change how SQL is lexed (client_encoding, standard_conforming_strings).

Effects the shell must perform are returned as :class:`Output` (bytes to each side, plus a
cancel request flag and audit events).
"""

from __future__ import annotations

import enum
import logging
import re
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from proxy.operator import OperatorState
from proxy.protocol import ProtocolError, error_response, python_encoding
from rewriters.model import (
    DENY_SQLSTATE,
    FAILING_PREFIX,
    Action,
    Analysis,
    LexSettings,
    OperatorView,
    ServerForm,
    StatementDecision,
)

log = logging.getLogger("pgveil.session")

# the name: a quoted identifier, or every character up to a blank or ";" (``\w+`` would stop at
# ``$`` and name another statement: ``DEALLOCATE q$x`` is not ``DEALLOCATE q``)
_DEALLOCATE = re.compile(r'\s*deallocate\s+(prepare\s+)?("(?:[^"]|"")+"|[^\s;"]+)\s*;?\s*$',
                         re.I)
# PostgreSQL folds only ASCII letters of an unquoted name (downcase_identifier)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HDR = struct.Struct("!cI")

def python_codec(pg_encoding: str) -> str | None:
    """The Python codec for a PostgreSQL client_encoding name, None when we have none (the
    statement then cannot be decoded and restricted roles are refused it). SQL_ASCII passes
    bytes through: latin-1 maps every byte to one code point and back, losslessly."""
    if pg_encoding.upper().replace("_", "") == "SQLASCII":
        return "latin-1"
    try:
        return python_encoding(pg_encoding)
    except ProtocolError:
        return None


class TxStatus(enum.Enum):
    IDLE = "I"
    IN_TRANSACTION = "T"
    FAILED = "E"


class ProtocolState(enum.Enum):
    """What the server side of the session is doing (tracked from the messages we relay)."""

    READY = "ready"  # idle, waiting for the client
    BUSY = "busy"  # results of a query or batch are pending
    COPY_IN = "copy_in"
    COPY_OUT = "copy_out"
    COPY_BOTH = "copy_both"


AnalyzeFn = Callable[..., Analysis]


@dataclass
class AuditEvent:
    """What the session knows about one finished statement on a protected table."""

    fields: dict[str, Any]
    future: Any = None  # set by the shell: resolves when the record is durable
    held: bool = False  # a HeldResult waits on this record


@dataclass
class HeldResult:
    """A protected statement's result, held back until its audit record is durable (strict
    durability): ``data`` is released when the record is written, ``failure`` (an error) when
    it cannot be."""

    data: list[bytes]
    failure: bytes
    event: AuditEvent | None


class Output:
    """What one input to the session asks the shell to do (a plain class: one per message
    batch, and mypyc compiles its constructor natively)."""

    __slots__ = ("audit", "cancel", "close", "resume", "to_client", "to_server")

    def __init__(self) -> None:
        self.to_server: list[bytes] = []
        self.to_client: list[Any] = []  # bytes, or a HeldResult
        self.cancel = False
        self.audit: list[AuditEvent] = []
        self.close = False
        # messages wait in the session's buffer after a long analysis (ANALYSIS_SLICE): the
        # shell lets other connections run, then calls from_client(b"") to go on
        self.resume = False

    def extend(self, later: Output) -> None:
        """Add what ``later`` (an input handled after this one's) asks for, every field of it:
        a field left out here is a request lost (resume once was, and a pipeline hung)."""
        self.to_server.extend(later.to_server)
        self.to_client.extend(later.to_client)
        self.audit.extend(later.audit)
        self.cancel = self.cancel or later.cancel
        self.close = self.close or later.close
        self.resume = self.resume or later.resume


# _StatementRun.room: no quota applies / one applies and the run has not claimed its share yet
UNLIMITED_ROOM = 1 << 62
QUOTA_UNCLAIMED = -1


# the audit record's error of a statement PostgreSQL ran after pgveil stopped an earlier one of
# the same request at max_rows (its effects stand; its result never reached the client)
WITHHELD_AFTER_CAP = ("result withheld from the client: an earlier statement of the same "
                      "request was stopped at max_rows")


def _check_failure(fields: dict[str, str], checks: tuple[str, ...]) -> str | None:
    """The message of a check pgveil wrote into a statement (a row outside the row filter,
    known only as it is written: rewriters.dml.failing), which PostgreSQL raises as a failed
    cast of that message (22P02); None for any other error. The client and the audit record
    get it as the policy denial it is (42501)."""
    if fields.get("C") != "22P02":
        return None
    message = fields.get("M", "")
    at = message.find(FAILING_PREFIX)
    if at < 0:
        return None
    check = message[at + len(FAILING_PREFIX):].rstrip("\"'»”」")  # quotes per lc_messages
    # the nonce can be seen (EXPLAIN VERBOSE, current_query()): a client that writes its own
    # failing cast with it gets one of the statement's own check messages at most
    return check if check in checks else None


class _StatementRun:
    """One statement being executed upstream, attributed results and counted rows.

    A plain class with an explicit ``__init__`` rather than a dataclass: one is made per
    statement on the hot path, and mypyc compiles this constructor natively, where a
    dataclass's generated ``__init__`` stays interpreted."""

    __slots__ = ("binding", "capped", "counter_key", "decision", "declare_over",
                 "declare_pending", "declare_view", "denied", "done", "error", "event",
                 "form", "held", "held_bytes", "hidden", "quota_capped", "reserved", "room",
                 "rows", "source", "started")

    def __init__(self, decision: StatementDecision, started: float, *,
                 counter_key: tuple[str, str] | None = None, source: str = "",
                 denied: bool = False, hidden: bool = False, form: Any = None,
) -> None:
        self.decision = decision
        self.started = started
        self.rows = 0
        # rows it may return before the operator's quota stops it: QUOTA_UNCLAIMED until its
        # first row claims a share of the quota (Session._claim_quota)
        self.room = UNLIMITED_ROOM
        self.reserved = 0  # quota rows held for it (OperatorState.reserve) until it is charged
        self.quota_capped = False  # capped by the quota rather than by max_rows
        # ("portal"|"cursor", name): cumulative counting
        self.counter_key: tuple[str, str] | None = counter_key
        # an Execute of the unnamed portal counted as that portal's (not a cursor's FETCH):
        # which Bind of it (Session._unnamed_binds) made the portal it runs; its rows count
        # towards the next Execute only while no later Bind replaced the portal (pipelined
        # Bind/Execute pairs each start from zero). A FETCH's rows are its cursor's, however
        # many times the unnamed portal is bound around it
        self.binding = 0
        self.capped = False
        self.denied = denied
        self.error: str | None = None
        self.source = source  # the client's text of this statement (for the audit record)
        self.hidden = hidden  # a statement pgveil injected: its completion is not forwarded
        # strict durability: its output, until its record is written
        self.held: list[bytes] | None = None
        self.held_bytes = 0
        self.done = False
        self.event: AuditEvent | None = None
        self.form: Any = form  # its audit form, when the hot path made the run (see _form_for)
        # a DECLARE of a name that held a protected cursor: recorded only once the server
        # answers it (see Session._declare_sent); Session._portal_changes when it was sent: a
        # DECLARE that succeeds shows a portal of that name closed, if none changed since
        self.declare_pending = False
        self.declare_over = -1
        self.declare_view: OperatorView | None = None  # the view it was rewritten under

    def __repr__(self) -> str:
        return (f"_StatementRun({self.decision.kind}, rows={self.rows}, done={self.done}, "
                f"denied={self.denied}, hidden={self.hidden})")


@dataclass(slots=True)
class _ProtectedQuery:
    """A simple Query text whose rewritten SELECT runs as one of pgveil's prepared statements:
    the memo entry that lets a repeat with other literals skip decoding and analysis.

    Valid for texts with the same bytes outside the literals' spans (``original`` is the text
    it was made from; a same-key text differs only in digits, and those must all lie inside
    the spans), under the same view, while ``name`` is still prepared for ``key``."""

    view: OperatorView
    original: bytes
    spans: tuple[tuple[int, int, bool], ...]  # byte offsets in the frame; True: a '…' string
    # the Bind/Describe/Execute/Sync to send is pieces[0] value[0] pieces[1] … pieces[n]: a
    # text of this key has the same length and the same literal lengths, so every byte but
    # the values' is known in advance
    pieces: tuple[bytes, ...]
    decision: StatementDecision
    form: Any  # the audit form of its runs


class _Slot:
    """A unit of expected server output: a simple Query, an Execute, or a Sync marker.

    A plain class for the same reason as :class:`_StatementRun` (two per extended batch)."""

    __slots__ = ("barrier", "changes", "converted", "failed", "hidden_z", "in_copy", "index",
                 "injected", "kind", "opens_copy", "portal_changes", "prepare_key", "runs",
                 "started")

    def __init__(self, kind: str, *, runs: list[_StatementRun] | None = None,
                 started: float = 0.0, converted: bool = False,
                 prepare_key: tuple[str, tuple[int, ...]] | None = None, hidden_z: int = 1,
                 changes: list[_StatementChange] | None = None) -> None:
        self.kind = kind  # "query" | "execute" | "sync" | "inject" | "hidden"
        self.runs: list[_StatementRun] = [] if runs is None else runs
        self.index = 0
        self.failed = False
        self.started = started  # query / sync slots: when the client's request went upstream
        # a simple Query sent as Bind/Describe/Execute/Sync of a statement pgveil prepared
        # upstream: its BindComplete is pgveil's, not the client's
        self.converted = converted
        # kind "hidden": pgveil's own Parse+Sync preparing ``prepare_key`` upstream (inside a
        # savepoint when the client is in a transaction block); every message up to and
        # including its last ReadyForQuery (``hidden_z`` of them) is pgveil's
        self.prepare_key: tuple[str, tuple[int, ...]] | None = prepare_key
        self.hidden_z = hidden_z
        # sync / query slots: the Parse and Close messages sent since the previous one, settled
        # at this slot's ReadyForQuery (see _StatementChange)
        self.changes: list[_StatementChange] | None = changes
        # sync / query slots: portals re-bound or closed in the batch while they held a
        # protected result (name, record before, its count before); taken back if the batch
        # failed
        self.portal_changes: list[tuple[bytes, Any, int]] | None = None
        # COPY FROM STDIN (Session._copy_window): the window this slot's statement may open,
        # and, for a Sync, the window it was sent in (PostgreSQL ignores it if the COPY began)
        self.opens_copy = 0
        self.in_copy = 0
        # pgveil's own Parse+Bind ahead of this Execute (_send_raise): completions to swallow
        self.injected = 0
        # a Sync of pgveil's own ahead of a Query sent inside an extended batch (see
        # Session._hold_behind_sync): its ReadyForQuery is pgveil's
        self.barrier = False

    def __repr__(self) -> str:
        return f"_Slot({self.kind}, runs={len(self.runs)}, index={self.index})"


class _StatementChange:
    """A Parse or Close sent upstream whose answer (ParseComplete / CloseComplete) has not come.

    pgveil records a prepared statement's decision when it forwards the Parse (the Bind in the
    same batch needs it) and forgets it when it forwards the Close. The server may not do either:
    after an error it skips every message until Sync, a failed Parse creates nothing, and a
    named Parse of an existing name fails. Then the decision recorded must go back to what it
    was (``before``), or a Bind of a protected statement the server still holds would run as
    no one's -- without row cap or audit record. The server answers in order, so each answer
    settles the oldest change still waiting; at the batch's ReadyForQuery the ones never
    answered are taken back. ``name`` None: a change pgveil does not track by name (a portal,
    its own re-prepare's Close), counted only to keep the answers in step.
    """

    __slots__ = ("answer", "before", "name", "settled")

    def __init__(self, answer: int, name: bytes | None, before: tuple[Any, ...] | None) -> None:
        self.answer = answer  # 0x31 ParseComplete or 0x33 CloseComplete
        self.name = name
        self.before = before
        self.settled = False


def _frame(type_byte: bytes, payload: bytes) -> bytes:
    return _HDR.pack(type_byte, len(payload) + 4) + payload


_DESCRIBE_PORTAL = _frame(b"D", b"P\x00")
_EXECUTE_ALL = _frame(b"E", b"\x00\x00\x00\x00\x00")
_SYNC = _frame(b"S", b"")
_SAVEPOINT = _frame(b"Q", b"SAVEPOINT pgveil_prepare\x00")
_ROLLBACK_TO_SAVEPOINT = _frame(b"Q", b"ROLLBACK TO SAVEPOINT pgveil_prepare; "
                                b"RELEASE SAVEPOINT pgveil_prepare\x00")


def _cstr(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.index(b"\x00", pos)
    return data[pos:end], end + 1


def error_message(sqlstate: str, message: str, severity: str = "ERROR",
                  detail: str | None = None, hint: str | None = None) -> bytes:
    """An ErrorResponse with the fields PostgreSQL itself always sends (S, V, C, M)."""
    return error_response(severity, sqlstate, message, detail=detail, hint=hint)


def parse_error_fields(payload: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        code = chr(payload[pos])
        value, pos = _cstr(payload, pos + 1)
        out[code] = value.decode("utf-8", "replace")
    return out


def _quota_charge(d: StatementDecision, rows: int) -> int:
    """Quota rows a protected statement costs: rows of customer data (a row that carries several
    counts as that many, ``row_weight``), and a lookup at least the values it presented, found
    or not."""
    charge = rows * d.row_weight
    return charge if charge >= d.lookup_values else d.lookup_values


def raise_sql(sqlstate: str, message: str, hint: str | None = None) -> str:
    """SQL that makes PostgreSQL raise our error, so its transaction state follows PostgreSQL's
    own rules. The message is dollar-quoted with a tag it cannot contain."""
    text = message + (hint or "")
    tag, outer = "pgveil_msg", "pgveil_do"
    while f"${tag}$" in text:
        tag += "_"
    while f"${outer}$" in text:
        outer += "_"
    hint_sql = f", HINT = ${tag}${hint}${tag}$" if hint else ""
    return (f"DO ${outer}$BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', "
            f"MESSAGE = ${tag}${message}${tag}${hint_sql}; END${outer}$")


# Q P B E S C X F: SQL carriers, portal/statement bookkeeping, Terminate, FunctionCall;
# c f: CopyDone / CopyFail end the data of a COPY FROM STDIN
_CLIENT_WATCHED = frozenset((0x51, 0x50, 0x42, 0x45, 0x53, 0x43, 0x58, 0x46, 0x63, 0x66,
                             0x44, 0x48))
# Parse, Bind, Describe, Execute, Close, Flush: the messages after which PostgreSQL may be
# skipping to Sync (an error in any of them -- pgveil's own refusal of one included, or a
# malformed Close or Flush -- starts the skip)
_OPENS_BATCH = frozenset((0x50, 0x42, 0x44, 0x45, 0x43, 0x48))
_SYNC_FRAME = b"S\x00\x00\x00\x04"
# Statement text that may be a COPY FROM STDIN (a false hit only costs the fast paths for a
# while): PostgreSQL then reads the client's stream in COPY mode, where it ignores Sync and
# Flush and fails the COPY on any other message (see Session._copy_window).
_MAY_COPY_IN = re.compile(rb"(?i)stdin")
# PostgreSQL's limits on a client message's length (pqcomm.h): a Query, Parse, Bind, CopyData or
# FunctionCall may be up to 1 GB, anything else 10 000 bytes. Longer is a broken stream, not
# something to buffer.
LARGE_MESSAGE_LIMIT = 0x3FFFFFFF
# what a client may send behind a Query held until its extended batch ends (_hold_behind_sync):
# the hold stops the stream's backpressure, so it is bounded
HELD_CLIENT_LIMIT = 64 << 20
# How long one from_client call may analyse statements before it leaves the rest of the
# client's messages for a later turn of the event loop (Output.resume): a long statement on
# customer data costs up to about 2 s to analyse, and a pipeline of them must not hold every
# other connection for the sum
ANALYSIS_SLICE = 0.05
SMALL_MESSAGE_LIMIT = 10000
_LARGE_CLIENT_MESSAGES = frozenset((0x51, 0x50, 0x42, 0x64, 0x46))
# Client messages PostgreSQL rejects in COPY mode (Terminate and Flush are fine).
_NOT_IN_COPY = frozenset((0x51, 0x50, 0x42, 0x45, 0x43, 0x46, 0x44))
# C s I E Z S G H W: completions, errors, ReadyForQuery, ParameterStatus, COPY starts
_SERVER_WATCHED = frozenset((0x43, 0x73, 0x49, 0x45, 0x5A, 0x53, 0x47, 0x48, 0x57))
# NoticeResponse severities (the non-localised V field) a masked role never receives
_TRACE_SEVERITIES = frozenset((b"LOG", b"DEBUG"))


# Parse, Bind, Describe, Execute, Close: the messages that name statements and portals
_NAMED_MESSAGES = frozenset((0x50, 0x42, 0x44, 0x45, 0x43))
NAME_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL keys statements and portals on that much
_UNNAMED_PORTAL = ("portal", "")  # the unnamed portal's row count (Session._counts)


def _check_name_lengths(mtype: int, frame: bytes) -> None:
    """Refuse statement and portal names longer than PostgreSQL keeps: it cuts them to 63
    bytes, so two names pgveil tells apart would be one statement on the server, and a Bind of
    the harmless one would run the other, past max_rows and the audit record."""
    first, pos = _cstr(frame, 6 if mtype in (0x44, 0x43) else 5)
    names = [first]
    if mtype == 0x42:  # Bind: portal, then statement
        names.append(_cstr(frame, pos)[0])
    if any(len(n) > NAME_BYTES for n in names):
        raise ProtocolViolation(f"statement and portal names longer than {NAME_BYTES} bytes "
                                "are not supported (PostgreSQL would cut them)")


def _is_trace(buf: bytes, pos: int, end: int) -> bool:
    """Whether the NoticeResponse at ``buf[pos:end]`` has severity LOG or DEBUG."""
    at = pos + 5
    while at < end and buf[at] != 0:
        nul = buf.find(b"\x00", at + 1, end)
        if nul < 0:
            return False
        if buf[at] == 0x56:  # V
            return buf[at + 1:nul] in _TRACE_SEVERITIES
        at = nul + 1
    return False


# Server messages with nothing to track while the statement they answer has no runs
# (pass-through): RowDescription, DataRow, NoticeResponse, ParseComplete, BindComplete,
# CloseComplete, NoData, ParameterDescription. Not NotificationResponse: a masked operator only
# receives those of the channels the policy lists (:meth:`Session._notification_allowed`).
_PLAIN_SERVER = frozenset((0x54, 0x44, 0x4E, 0x31, 0x32, 0x33, 0x6E, 0x74))
_PLAIN_SERVER_NO_NOTICE = _PLAIN_SERVER - {0x4E}  # a masked role's notices are looked at
_TX_BY_BYTE = {0x49: TxStatus.IDLE, 0x54: TxStatus.IN_TRANSACTION, 0x45: TxStatus.FAILED}
_PLAIN_SLOTS = frozenset(("query", "execute", "sync"))
_REWRITE = Action.REWRITE
_BUSY, _READY = ProtocolState.BUSY, ProtocolState.READY  # module constants: cheaper to load
_IDLE = TxStatus.IDLE
# What may precede the rows of a protected SELECT in protected_response: ParseComplete,
# BindComplete, RowDescription, NoData, ParameterDescription (extended); RowDescription (a
# simple Query run as pgveil's prepared statement, after the BindComplete it drops).
_EXECUTE_PRELUDE = frozenset((0x31, 0x32, 0x54, 0x6E, 0x74))
_QUERY_PRELUDE = frozenset((0x54,))
_BIND_COMPLETE = b"2\x00\x00\x00\x04"
_ZERO_DIGIT_BYTES = bytes.maketrans(b"123456789", b"000000000")
PLAIN_MEMO_SIZE = 1024  # plain Query texts remembered per session (digits zeroed)
_DECISION_NAMES = {Action.FORWARD: "allowed", Action.REWRITE: "rewritten",
                   Action.DENY: "blocked"}
# Statements pgveil prepares upstream per connection (rewritten SELECT shapes), at most, and
# their names' prefix (rewriters.analyze denies EXECUTE of such a name a client did not prepare;
# a Bind of one is denied here).
MAX_SERVER_STATEMENTS = 64
SERVER_STATEMENT_PREFIX = b"pgveil_"
# what a Bind of a statement pgveil has no record of binds instead (pgveil_ names are reserved)
_UNKNOWN_STATEMENT = SERVER_STATEMENT_PREFIX + b"unknown_"
_PARAM_COUNT = struct.Struct("!H")


class Session:
    """State of one client session after authentication (see module docstring)."""

    def __init__(self, *, view: OperatorView, analyze: AnalyzeFn, lex: LexSettings,
                 identity: dict[str, Any], audit_all: bool = False,
                 audit_available: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], float] = time.time,
                 on_decision: Callable[[Analysis], None] | None = None,
                 operator: OperatorState | None = None,
                 count_statement: Callable[[str, str], None] | None = None,
                 observe_duration: Callable[[float], None] | None = None,
                 hold_protected: bool = False,
                 plain_kind: Callable[[str, OperatorView], str | None] | None = None,
                 server_prepare: bool = False,
                 plain_memoizable: Callable[[OperatorView], bool] | None = None,
                 statement_key: Callable[[str, str], tuple[str, ...]] | None = None,
                 record_statement: Callable[[tuple[str, ...]], None] | None = None,
                 audit_form: Callable[[dict[str, Any], bool], Any] | None = None,
                 on_memo_hit: Callable[[float], None] | None = None):
        # the hot path's way to count a statement: record(statement_key(decision, kind)) is
        # what count_statement(decision, kind) does, with the key built once per kind
        self._keyed_count: tuple[Callable[[str, str], tuple[str, ...]],
                                 Callable[[tuple[str, ...]], None]] | None = (
            (statement_key, record_statement)
            if statement_key is not None and record_statement is not None else None)
        self._allowed_keys: dict[str, tuple[str, ...]] = {}
        self._run_keys: dict[tuple[str, str], tuple[str, ...]] = {}
        # Run a repeated rewritten SELECT of a simple Query as a statement prepared upstream
        # once per connection (PostgreSQL then neither parses nor plans the rewritten text
        # again): shape key -> statement name, and shapes whose Parse failed here.
        self.server_prepare = server_prepare
        self._server_statements: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._server_failed: set[tuple[str, tuple[int, ...]]] = set()
        self._server_seq = 0
        self._pending_prepare: dict[tuple[str, tuple[int, ...]], bytes] = {}
        # the hot path for pass-through traffic: the kind of a single statement that needs
        # neither rewriting nor bookkeeping, or None (then the full analysis decides)
        self._plain_kind = plain_kind if not audit_all else None
        self._plain_miss: tuple[bytes, str, str | None] | None = None
        self._dropped_channels: set[str] = set()  # logged once per session
        self.server_fatal = False  # PostgreSQL sent a FATAL: the shell adds no error of its own
        # COPY FROM STDIN windows. PostgreSQL reads the client's stream in COPY mode from the
        # COPY statement on until CopyDone/CopyFail (or its own error): it ignores a Sync sent
        # in that stretch, and any Query/Parse/Bind/Execute fails the COPY and is consumed.
        # Counting such a Sync as a request would leave a slot nobody answers, and every later
        # result would be attributed to the statement before it (uncounted, unaudited).
        # _copy_window: the window the client's stream is in (pending until the server's
        # CopyInResponse, 0 = none); _copy_open: the window PostgreSQL is known to be in;
        # _copy_stray: a window some other message was sent in. _copy_statements/_portals:
        # statements and portals whose text may be a COPY FROM STDIN.
        self._copy_window = 0
        self._copy_open = 0
        self._copy_stray = 0
        self._copy_epoch = 0
        self._copy_statements: set[bytes] = set()
        self._copy_portals: set[bytes] = set()
        self._plain_memo: dict[bytes, str] | None = None  # plain texts only
        self._plain_memoizable = plain_memoizable  # may this view's answers be memoised so
        self._plain_memo_view: OperatorView | None = None
        self._audit_lists: dict[int, tuple[Any, ...]] = {}
        # The protected hot path (see protected_response): the fixed part of a statement's
        # audit record and metrics, made by the shell's ``audit_form``, per decision and text;
        # and repeated rewritten SELECTs of simple Queries run as pgveil's prepared statements,
        # by raw text with digits zeroed (see _memo_protected).
        self._audit_form = audit_form
        self._forms: dict[tuple[int, str, str, bool], tuple[Any, ...]] = {}
        self._protected_memo: dict[bytes, _ProtectedQuery] = {}
        self._on_memo_hit = on_memo_hit
        self.count_statement = count_statement
        self.observe_duration = observe_duration
        self.hold_protected = hold_protected
        self._holding: _StatementRun | None = None
        self.view = view
        # A masked role gets no LOG or DEBUG messages: with client_min_messages = log, settings
        # any user may change (trace_sort, and the like) describe the executor's work on every
        # row it touched, rows outside the row filter included (how many were sorted). Nothing
        # an application needs is sent at those levels.
        self._drop_traces = not view.unrestricted
        self._plain_server = _PLAIN_SERVER_NO_NOTICE if self._drop_traces else _PLAIN_SERVER
        self.operator = operator
        self._analyze = analyze
        self.lex = lex
        self.identity = identity  # session, operator, role, client, application, database
        self.audit_all = audit_all
        self.audit_available = audit_available
        self.clock = clock
        self.now = now
        self.on_decision = on_decision
        # unknown encodings decode as UTF-8: anything not valid UTF-8 is then undecodable and
        # refused to restricted roles, and the rewriter refuses non-ASCII statements on
        # protected data under non-UTF8 encodings anyway
        self.codec = python_codec(lex.client_encoding) or "utf-8"
        self.tx = TxStatus.IDLE
        self.state = ProtocolState.READY
        # an incomplete message, and how many bytes it takes to go on (its header's length):
        # until then a read only appends (a multi-megabyte row arrives in many reads)
        self._cbuf = bytearray()
        self._cbuf_need = 0
        self._sbuf = bytearray()
        self._sbuf_need = 0
        self._slots: deque[_Slot] = deque()
        # extended protocol: statement / portal name → (decision, client text)
        self._statements: dict[bytes, tuple[StatementDecision, str]] = {}
        self._portals: dict[bytes, tuple[StatementDecision, str]] = {}
        # the view a portal was bound / a cursor declared under: a later Execute or FETCH
        # under a view that shows its tables otherwise is refused (see _stale)
        self._portal_views: dict[bytes, OperatorView] = {}
        self._cursor_views: dict[str, OperatorView] = {}
        # bumped whenever an entry of _portals is set, replaced or removed (see _declare_sent)
        self._portal_changes = 0
        # every parsed statement: name → (client text, Parse tail with parameter types, the
        # policy version it was decided under) — to re-decide it when the rules change
        self._parsed: dict[bytes, tuple[str, bytes, str]] = {}
        self._swallow = 0  # completions of messages pgveil injected, not to be forwarded
        # Parse/Close sent upstream and not yet answered, oldest first; and those of the batch
        # the client has not ended with Sync (or Query) yet (see _StatementChange)
        self._changes: deque[_StatementChange] = deque()
        self._batch_changes: list[_StatementChange] = []
        self._prepared_version: dict[str, str] = {}  # SQL-level PREPARE → policy version
        self._prepared_source: dict[str, str] = {}  # SQL-level PREPARE → the client's text
        # a PREPARE sent, not yet answered: the name's records before it (_record_prepare)
        self._prepare_before: dict[str, tuple[Any, ...]] = {}
        self._counts: dict[tuple[str, str], int] = {}  # cumulative rows per portal / cursor
        self._reserved = 0  # quota rows this session's runs hold (_claim_quota)
        self._unnamed_binds = 0  # Binds of the unnamed portal sent (_StatementRun.binding)
        self._batch_lookups = 0  # lookup values the Binds since the last Sync present
        self.prepared: dict[str, StatementDecision] = {}  # SQL-level PREPARE
        self.cursors: dict[str, StatementDecision] = {}  # SQL-level DECLARE
        # Portals (Bind) and cursors (DECLARE) share one namespace on the server: Execute
        # can run a DECLAREd cursor and FETCH can read a bound portal. A Bind or Close of a
        # portal that held a protected result may be skipped or refused by the server (the
        # old portal then lives on): such changes wait here until their batch's
        # ReadyForQuery says whether it failed (see _portal_changed).
        self._batch_portals: list[tuple[bytes, Any, int]] = []
        self._portal_unsettled: dict[bytes, tuple[Any, int]] = {}
        self._bound_in_batch: set[bytes] = set()
        self._batch_error = False
        # client side: Parse, Bind, Describe, Execute, Close or Flush sent since the last Sync
        # (_OPENS_BATCH). PostgreSQL skips a Query or FunctionCall sent then if an earlier
        # message of the batch failed: pgveil syncs first and holds the client's bytes until
        # it knows (_hold_behind_sync)
        self._extended_open = False
        self._held_client: bytearray | None = None
        self._skip_till_sync = False  # emulating PostgreSQL's skip after that batch failed
        self._drop_server = False  # server side: discard results until ReadyForQuery
        self._abort_after_cap = False  # a capped statement completed: fail the transaction
        # the statement over its row cap, until it ends: the shell cancels it only while it
        # is still running, so a late cancel cannot hit the client's next statement
        self.capped_run: object | None = None
        self._pending_cancel = False
        self.parameters: dict[str, str] = {}
        self._source = ""  # decoded text of the statement being analysed

    @property
    def busy(self) -> bool:
        """Results pending, or inside a transaction block (for graceful draining)."""
        return bool(self._slots) or self.tx is not TxStatus.IDLE

    # ------------------------------------------------------------------ helpers
    def _decode_sql(self, raw: bytes) -> str | None:
        try:
            return raw.decode(self.codec)
        except (UnicodeDecodeError, LookupError):
            return None

    def _encode_sql(self, sql: str) -> bytes:
        return sql.encode(self.codec)

    def _analyze_sql(self, raw: bytes, decoded: str | None = None,
                     sensitive: bool = False) -> Analysis:
        """Analyse a statement text. ``decoded``: ``raw`` already decoded (and the view
        refreshed) by the caller; ``sensitive``: the plain-kind check already found a
        sensitive name in it, so the analyser's own fast path need not look again."""
        sql = decoded if decoded is not None else self._decode_sql(raw)
        if sql is None:
            # what it may touch, read leniently, so that the refusal is audited like any other
            # attempt on a protected table
            lenient = raw.decode("latin-1").lower()
            tables = tuple(name for name in self.view.tables
                           if name.rpartition(".")[2] in lenient)
            self._source = raw.decode(self.codec, "replace")
            st = StatementDecision(
                action=Action.FORWARD if self.view.unrestricted else Action.DENY,
                sql="", kind="other", tables=tables,
                message=f"cannot decode the statement in client encoding "
                        f"{self.lex.client_encoding}; refusing what pgveil cannot read")
            return Analysis(sql="", statements=(st,))
        if self.operator is not None and decoded is None:
            self.view = self.operator.current()
        self._source = sql
        lex = self.lex
        if self.state is not ProtocolState.READY or self._slots:
            # A statement sent earlier has not reached its ReadyForQuery (PostgreSQL reports
            # changed settings only then): it may have changed how the server lexes this text.
            lex = LexSettings(lex.standard_conforming_strings, lex.client_encoding, True)
        try:
            if sensitive:
                analysis = self._analyze(sql, self.view, lex, prepared=self.prepared,
                                         cursors=self._cursor_map(), sensitive=True)
            else:
                analysis = self._analyze(sql, self.view, lex, prepared=self.prepared,
                                         cursors=self._cursor_map())
        except Exception as exc:  # fail closed: a statement we could not analyse never runs
            log.exception("analysis failed; statement refused")
            st = StatementDecision(
                action=Action.DENY, sql=sql, kind="other", reasons=("analysis error",),
                message=f"pgveil could not analyse this statement and refused it "
                        f"(fail closed): {type(exc).__name__}")
            return Analysis(sql=sql, statements=(st,))
        if self.on_decision is not None:
            self.on_decision(analysis)
        return analysis

    def _policy_gate(self, analysis: Analysis) -> StatementDecision | None:
        """Checks that depend on time or live state, not on the SQL (never cached)."""
        for st in analysis.statements:
            if st.kind == "execute" and st.prepared and \
                    st.prepared not in self._prepared_version:
                # a protocol-level statement run with SQL EXECUTE (SQL-level PREPAREs are
                # re-prepared transparently in _on_query)
                parsed = self._parsed.get(st.prepared.encode(self.codec, "replace"))
                version = parsed[2] if parsed else None
                if version is not None and version != self.view.policy_version:
                    # the server holds the text rewritten under the old rules
                    return StatementDecision(
                        action=Action.DENY, sql=st.sql, kind=st.kind, tables=st.tables,
                        columns=st.columns, reasons=("policy changed since PREPARE",),
                        message=f"prepared statement {st.prepared} was prepared under rules "
                                "that have changed since (policy reload or grant); "
                                "DEALLOCATE and PREPARE it again")
            if st.cursor and st.kind == "fetch" and st.tables:
                opened = self._cursor_views.get(st.cursor)
                if opened is None:
                    opened = self._portal_views.get(st.cursor.encode(self.codec, "replace"))
                stale = self._stale(st, opened)
                if stale is not None:
                    return stale
        protected = [s for s in analysis.statements if s.protected]
        if not protected:
            return None
        too_many = self._lookup_cap(protected, sum(st.lookup_values for st in protected))
        return too_many or self._live_gate(protected[0], protected)

    def _lookup_cap(self, statements: Sequence[StatementDecision], presented: int
                    ) -> StatementDecision | None:
        """lookup_max_values holds for a whole request (a Query message, the Binds up to a
        Sync), not only per statement: 37 statements of 10 candidates each would test every ID
        number a mask leaves possible in one round trip."""
        cap = self.view.limits.lookup_max_values
        if presented <= cap:
            return None
        first = statements[0]
        return StatementDecision(
            action=Action.DENY, sql=first.sql, kind=first.kind, tables=first.tables,
            columns=first.columns, reasons=("lookup_max_values",),
            message=f"a request may present at most {cap} lookup values at once for role "
                    f"{self.view.role} (lookup_max_values); this one presents {presented}")

    def _stale(self, d: StatementDecision, opened: OperatorView | None
               ) -> StatementDecision | None:
        """A cursor or portal opened under a view that showed its tables otherwise than the
        current one (a reload tightened a mask or moved the operator; a grant ended): the
        server still holds rows rewritten under the old rules, so reading on is refused."""
        if opened is None or opened is self.view:
            return None
        now, then = self.view.tables, opened.tables
        for name in d.tables:
            old, cur = then.get(name), now.get(name)
            if cur is not old and cur != old:
                message = (f"{'cursor ' + d.cursor if d.cursor else 'this portal'} was opened "
                           f"under rules for {name} that have changed since (policy reload, "
                           "schema change or grant); close it and open it again")
                return StatementDecision(
                    action=Action.DENY, sql=d.sql, kind=d.kind, tables=d.tables,
                    columns=d.columns, reasons=("rules changed since the cursor was opened",),
                    message=message)
        return None

    def _refused_now(self, d: StatementDecision) -> StatementDecision | None:
        """A decision made under an earlier view (a portal bound, a cursor declared before a
        reload), run now: refused when the current view refuses one of its tables -- the
        login left the policy, or a column the policy masks left the table."""
        tables = self.view.tables
        for name in d.tables:
            tv = tables.get(name)
            if tv is not None and tv.refused is not None:
                return StatementDecision(
                    action=Action.DENY, sql=d.sql, kind=d.kind, tables=d.tables,
                    columns=d.columns, reasons=(tv.refused,), message=tv.refused)
        return None

    def _live_gate(self, first: StatementDecision,
                   statements: Sequence[StatementDecision] | None = None
                   ) -> StatementDecision | None:
        """The checks of a protected statement that depend on time and live state (hours,
        quota, audit availability), made each time it runs; ``first``: its decision,
        ``statements``: all of the request's, when it has several (their lookups add up)."""
        limits = self.view.limits
        if limits.hours is not None and not _within_hours(limits.hours, limits.timezone,
                                                          self.now()):
            return StatementDecision(
                action=Action.DENY, sql=first.sql, kind=first.kind, tables=first.tables,
                columns=first.columns,
                reasons=(f"outside hours {limits.hours[0]}-{limits.hours[1]}",),
                message=f"access to {', '.join(first.tables)} is allowed for role "
                        f"{self.view.role} only between {limits.hours[0]} and "
                        f"{limits.hours[1]} ({limits.timezone})")
        if self.operator is not None:
            exhausted = self._quota_gate(statements) if statements is not None else \
                self.operator.quota_exceeded(self.view, max(1, first.lookup_values))
            if exhausted is not None:
                return StatementDecision(
                    action=Action.DENY, sql=first.sql, kind=first.kind, tables=first.tables,
                    columns=first.columns, reasons=("quota exhausted",), message=exhausted)
        if not self.audit_available():
            return StatementDecision(
                action=Action.DENY, sql=first.sql, kind=first.kind, tables=first.tables,
                columns=first.columns, reasons=("audit unavailable",),
                message=f"statement on {', '.join(first.tables)} refused: the audit log "
                        "cannot be written (audit.on_failure: block)")
        return None

    def _quota_gate(self, statements: Sequence[StatementDecision]) -> str | None:
        """Why these protected statements (one request) may not start under the quota: there
        must be room for a row, and for every value their lookups present (each costs a row,
        found or not). What they return is held to the quota as it arrives (_claim_quota)."""
        if self.operator is None:
            return None
        need = sum(st.lookup_values for st in statements if st.protected)
        return self.operator.quota_exceeded(self.view, max(1, need))

    def _quota_start(self, run: _StatementRun) -> _StatementRun:
        """A new run under the quota: its rows claim a share when they come (``room``), and
        a lookup holds a row for each value it presents from now on -- it is charged them
        found or not, and lookups pipelined behind it, or in other sessions, must see them
        spent before it completes."""
        d = run.decision
        if d.protected and self.operator is not None and self.view.limits.quota_rows is not None:
            run.room = QUOTA_UNCLAIMED
            if d.lookup_values:
                run.reserved = d.lookup_values
                self._reserved += d.lookup_values
                self.operator.reserve(d.lookup_values)
        return run

    def _claim_quota(self, run: _StatementRun) -> None:
        """A run's first row: take its share of the operator's quota. The quota is charged when
        a statement completes, so without a share a request of fourteen capped SELECTs, or
        twenty sessions of one login, would all start under the quota and together read far
        past it. The share -- what is left of the quota after everything charged and every
        share held, up to what the run may return under max_rows -- is held until the run is
        charged; rows beyond it are stopped like rows beyond max_rows."""
        if run.room != QUOTA_UNCLAIMED:
            return
        op = self.operator
        room = op.quota_room(self.view) if op is not None else None
        if op is None or room is None:  # a grant lifted the quota meanwhile
            run.room = UNLIMITED_ROOM
            return
        d = run.decision
        weight = d.row_weight if d.row_weight > 1 else 1
        held = run.reserved  # a lookup's values: rows it is charged anyway
        share = room + held if room > 0 else held
        if d.row_limit is not None:
            prior = self._counts.get(run.counter_key, 0) if run.counter_key else 0
            share = min(share, max(0, d.row_limit - prior) * weight)
        if share < held:
            share = held
        run.room = share // weight
        run.reserved = share
        self._reserved += share - held
        op.reserve(share - held)

    def _release_run(self, run: _StatementRun) -> None:
        if self.operator is not None:
            self.operator.release(run.reserved)
        self._reserved -= run.reserved
        run.reserved = 0

    def abandon(self, reason: str) -> Output:
        """The connection ended with statements still running upstream: their audit records
        (the rows the client got so far, charged to the quota; ``reason`` as the error, the
        outcome unknown) -- without them a client that hangs up mid-result would have read
        rows no record mentions."""
        out = Output()
        for slot in self._slots:
            for run in slot.runs[slot.index:]:
                if not (run.done or run.denied or run.hidden):
                    run.done = True
                    self._audit(out, run, self._decision_name(run.decision), error=reason)
        self.release_quota()
        return out

    def release_quota(self) -> None:
        """The connection ended: give back the quota its unfinished runs held."""
        if self._reserved and self.operator is not None:
            self.operator.release(self._reserved)
        self._reserved = 0
        for slot in self._slots:
            for run in slot.runs:
                run.reserved = 0

    def _audit(self, out: Output, run: _StatementRun, decision_name: str,
               error: str | None = None) -> None:
        d = run.decision
        if not (d.protected or self.audit_all):
            return
        fields = self._audit_fields(run, decision_name)
        fields.update(rows=run.rows, duration_ms=round((self.clock() - run.started) * 1000, 3),
                      error=error)
        event = AuditEvent(fields)
        run.event = event
        out.audit.append(event)
        if d.protected and self.operator is not None:
            if run.reserved:
                self._release_run(run)
            self.operator.add_rows(_quota_charge(d, run.rows))

    def _audit_fields(self, run: _StatementRun, decision_name: str) -> dict[str, Any]:
        """A statement's audit fields except rows, duration_ms and error."""
        d = run.decision
        fields = dict(self.identity)
        # the list fields of a decision, built once: cache hits and prepared statements share
        # their decision's tuples, so identity finds them (the entry keeps the tuples alive)
        memo = self._audit_lists.get(id(d.reasons))
        if memo is None or memo[0] is not d.reasons or memo[1] is not d.lookups or \
                memo[2] is not d.tables or memo[3] is not d.columns:
            reasons = list(d.reasons) + [f"lookup {c}" for c in d.lookups
                                         if f"lookup {c}" not in d.reasons]
            memo = (d.reasons, d.lookups, d.tables, d.columns, reasons, list(d.tables),
                    list(d.columns), list(d.lookups))
            if len(self._audit_lists) >= 256:
                self._audit_lists.clear()
            self._audit_lists[id(d.reasons)] = memo
        reasons = memo[4]
        if run.quota_capped:
            reasons = ["quota exhausted", *reasons]
        elif run.capped:
            reasons = [f"row limit {d.row_limit} exceeded", *reasons]
        fields.update(
            role=self.view.role,  # a role=… grant changes it for the statements it covers
            kind=d.kind, statement=run.source or d.sql,
            tables=memo[5], columns=memo[6], decision=decision_name,
            reasons=reasons,
            grant=self.operator.grant_id if self.operator is not None else None,
            lookups=memo[7])
        return fields

    def _form_for(self, run: _StatementRun, decision_name: str) -> Any | None:
        """The shell's audit form of this run's record (see Runtime.audit_form), made once
        per decision, statement text and view; None: use the general path."""
        make = self._audit_form
        if make is None or run.capped:
            return None
        d = run.decision
        grant = self.operator.grant_id if self.operator is not None else None
        scs = self.lex.standard_conforming_strings  # how the statement's literals read
        key = (id(d.reasons), run.source, decision_name, scs)
        hit = self._forms.get(key)
        if hit is not None and hit[0] is d.reasons and hit[1] is self.view and hit[2] == grant \
                and hit[3] is d.tables and hit[4] is d.columns and hit[5] is d.lookups:
            return hit[6]
        form = make(self._audit_fields(run, decision_name), scs)
        if len(self._forms) >= 256:
            self._forms.clear()
        self._forms[key] = (d.reasons, self.view, grant, d.tables, d.columns, d.lookups, form)
        return form

    @staticmethod
    def _decision_name(d: StatementDecision) -> str:
        return _DECISION_NAMES[d.action]

    # ------------------------------------------------------------------ client side
    def from_client(self, data: bytes) -> Output:
        """Feed bytes the client sent; returns what to send where.

        Messages forwarded unchanged stay in one contiguous run of the input (no per-message
        copies); only a message a handler replaces splits the run.
        """
        out = Output()
        if self._held_client is not None:  # waiting for our Sync's answer: kept for later
            self._held_client += data
            if len(self._held_client) > HELD_CLIENT_LIMIT:
                raise ProtocolViolation(
                    f"more than {HELD_CLIENT_LIMIT} bytes sent behind a Query that waits "
                    "for the end of an extended-protocol batch")
            return out
        if self._cbuf:
            self._cbuf += data
            if len(self._cbuf) < self._cbuf_need:
                return out
            buf = bytes(self._cbuf)
            self._cbuf.clear()
        else:
            buf = data
        pos, n = 0, len(buf)
        start = 0
        to_server = out.to_server
        began = self.clock()
        while n - pos >= 5:
            mtype = buf[pos]
            length = _U32.unpack_from(buf, pos + 1)[0]
            if length < 4 or (length > SMALL_MESSAGE_LIMIT and (
                    length > LARGE_MESSAGE_LIMIT or mtype not in _LARGE_CLIENT_MESSAGES)):
                raise ProtocolViolation(f"invalid message length {length} for message type "
                                        f"{chr(mtype)!r}")
            end = pos + 1 + length
            if end > n:
                break
            if self._skip_till_sync:
                if mtype != 0x53:
                    # PostgreSQL would skip this message of a failed batch: so does pgveil
                    if pos > start:
                        to_server.append(buf[start:pos])
                    start = pos = end
                    continue
                self._skip_till_sync = False
            if (mtype == 0x51 or mtype == 0x46) and self._extended_open:
                if self._copy_window:
                    # an Execute of the batch may have started COPY FROM STDIN: PostgreSQL
                    # would ignore our Sync and wait for the data we hold
                    raise ProtocolViolation(
                        "Query message sent in an extended-protocol batch that may have "
                        "started COPY FROM STDIN; send Sync first")
                if pos > start:
                    to_server.append(buf[start:pos])
                self._hold_behind_sync(buf[pos:], out)
                return out
            if mtype in _CLIENT_WATCHED:
                frame = buf[pos:end]
                mark = len(to_server)
                self._client_message(mtype, frame, out)
                if len(to_server) == mark + 1 and to_server[mark] is frame:
                    to_server.pop()  # forwarded unchanged: keep it in the run
                else:
                    if pos > start:
                        to_server.insert(mark, buf[start:pos])
                    start = end
                if n - end >= 5 and self.clock() - began > ANALYSIS_SLICE:
                    pos = end
                    out.resume = True  # the rest on a later turn (stays in _cbuf, in order)
                    break
            pos = end
        if pos > start:
            to_server.append(buf[start:pos] if start or pos < n else buf)
        if pos < n:
            self._cbuf += buf[pos:]
            self._cbuf_need = 1 + _U32.unpack_from(buf, pos + 1)[0] if n - pos >= 5 else 5
        return out

    def _hold_behind_sync(self, rest: bytes, out: Output) -> None:
        """A Query or FunctionCall arrived while an extended batch is open (asyncpg sends one
        after Parse, Describe and Flush). PostgreSQL runs it -- unless a message of the batch
        failed, in which case it skips everything up to the client's Sync and answers nothing,
        not even a ReadyForQuery. pgveil cannot know which until the server has answered, so
        it ends the batch with a Sync of its own and keeps the client's bytes until that Sync's
        ReadyForQuery (_release_held): then they run, or are skipped as PostgreSQL would have.
        """
        self._slots.append(_Slot("sync", changes=self._take_batch_changes()))
        barrier = self._slots[-1]
        barrier.barrier = True
        if self._batch_portals or self._bound_in_batch:
            barrier.portal_changes = self._batch_portals
            self._batch_portals = []
            self._bound_in_batch.clear()
        self._batch_lookups = 0
        self._extended_open = False
        self._held_client = bytearray(rest)
        self.state = ProtocolState.BUSY
        out.to_server.append(_SYNC_FRAME)

    def _release_held(self, failed: bool, out: Output) -> None:
        """Our Sync's ReadyForQuery arrived: run the held client bytes, after skipping up to
        the client's Sync what PostgreSQL would have skipped had the batch failed."""
        held = bytes(self._held_client or b"")
        self._held_client = None
        self._skip_till_sync = failed
        more = self.from_client(held)
        out.extend(more)

    def _open_copy_window(self, slot: _Slot) -> None:
        self._copy_epoch += 1
        slot.opens_copy = self._copy_window = self._copy_epoch
        self._copy_open = self._copy_stray = 0

    def _copy_window_message(self, mtype: int) -> None:
        """A client message sent while a COPY FROM STDIN may be reading the stream."""
        if mtype == 0x63 or mtype == 0x66:  # CopyDone / CopyFail: the data ends
            self._copy_window = self._copy_open = 0
        elif mtype in _NOT_IN_COPY:
            if self._copy_open:
                raise ProtocolViolation(
                    f"message type {chr(mtype)!r} sent during COPY FROM STDIN data; end the "
                    "COPY with CopyDone or CopyFail first")
            self._copy_stray = self._copy_window

    def _client_message(self, mtype: int, frame: bytes, out: Output) -> None:
        if self._copy_window:
            self._copy_window_message(mtype)
        if mtype in _NAMED_MESSAGES and not self.view.unrestricted:
            _check_name_lengths(mtype, frame)
        if mtype in _OPENS_BATCH:
            self._extended_open = True
        elif mtype == 0x53:  # Sync
            self._extended_open = False
        if mtype == 0x51:  # Query
            made = len(self._slots)
            self._on_query(frame, out)
            if _MAY_COPY_IN.search(frame) is not None:
                for slot in reversed(self._slots):
                    if slot.kind == "query":
                        self._open_copy_window(slot)
                        break
            if self._batch_changes:  # a Query ends an extended batch like a Sync
                new_slots = list(self._slots)[made:]
                for slot in reversed(new_slots):
                    if slot.kind in ("query", "sync"):
                        slot.changes = (slot.changes or []) + (self._take_batch_changes() or [])
                        break
            if self._batch_portals or self._bound_in_batch:
                new_slots = list(self._slots)[made:]
                for slot in reversed(new_slots):
                    if slot.kind in ("query", "sync"):
                        slot.portal_changes = (slot.portal_changes or []) + self._batch_portals
                        self._batch_portals = []
                        self._bound_in_batch.clear()
                        break
        elif mtype == 0x50:  # Parse
            self._on_parse(frame, out)
        elif mtype == 0x42:  # Bind
            payload = frame[5:]
            portal, pos = _cstr(payload, 0)
            stmt, _ = _cstr(payload, pos)
            parsed = self._parsed.get(stmt)
            if parsed is None and self._refuse_own_name(stmt, "bind", out):
                return
            if parsed is None and stmt not in self._statements and \
                    not self.view.unrestricted:
                # A name pgveil has no record of: PostgreSQL holds no such statement, or one
                # pgveil lost track of (each such loss so far ran rows past max_rows and the
                # audit record). Bound under a name that cannot exist, it fails as an unknown
                # one does (26000), and the unnamed statement stays as it was.
                frame = _frame(b"B", payload[:pos] + _UNKNOWN_STATEMENT + payload[pos:])
                self._portal_changed(portal, None)
                out.to_server.append(frame)
                return
            if parsed is not None and self.operator is not None and \
                    self.operator.current().policy_version != parsed[2]:
                # the policy was reloaded or a grant changed since this statement was parsed:
                # decide again, and re-prepare it upstream under the current rules
                if not self._reprepare(stmt, parsed, out):
                    return
            decision = self._statements.get(stmt)
            if decision is not None and decision[0].protected:
                # each run of a prepared statement meets the hours, the quota and the audit
                if self.operator is not None:
                    self.view = self.operator.current()
                self._batch_lookups += decision[0].lookup_values
                refused = self._lookup_cap(decision[:1], self._batch_lookups) or \
                    self._live_gate(decision[0])
                if refused is not None:
                    self._portals.pop(portal, None)
                    self._portal_changes += 1
                    self._source = decision[1]  # the audit record's statement
                    self._deny_runs(Analysis(sql="", statements=(refused,)), refused, out)
                    self._send_raise(refused, out)
                    return
            self._portal_changed(portal, decision)
            if stmt in self._copy_statements:
                self._copy_portals.add(portal)
            elif self._copy_portals:
                self._copy_portals.discard(portal)
            out.to_server.append(frame)
        elif mtype == 0x45:  # Execute
            portal, _ = _cstr(frame, 5)
            bound = self._portal_record(portal)
            slot = _Slot("execute")
            if bound is not None and bound[0].tables:
                if self.operator is not None:
                    self.view = self.operator.current()
                refused = self._refused_now(bound[0]) or self._stale(
                    bound[0], self._cursor_views.get(bound[0].cursor or "") if bound[2]
                    else self._portal_views.get(portal))
                if refused is not None:  # bound under a view the policy has since changed
                    self._source = bound[1]
                    self._deny_runs(Analysis(sql="", statements=(refused,)), refused, out)
                    self._send_raise(refused, out)
                    return
            if bound is not None:
                d, text, is_cursor, floor = bound
                if d.kind == "prepare" and d.prepared and not is_cursor and \
                        self.prepared.get(d.prepared) is not d:
                    # a SQL PREPARE run through the extended protocol: recorded as it is sent,
                    # like a simple Query's (an EXECUTE pipelined behind it finds it), and
                    # taken back if the server refuses it (_settle_prepared)
                    self._record_prepare(d, text)
                # FETCH counts against its cursor (cumulative across FETCHes), anything else
                # against its portal (cumulative across Executes with a row limit); a named
                # portal is a cursor to SQL (FETCH reads it): one count for both
                if is_cursor:
                    key = self._portal_key(portal)
                elif d.cursor and d.kind != "declare":
                    key = ("cursor", d.cursor)
                else:
                    key = self._portal_key(portal)
                if floor and self._counts.get(key, 0) < floor:
                    self._counts[key] = floor
                run = self._quota_start(_StatementRun(d, self.clock(), counter_key=key,
                                                      source=text))
                if key == _UNNAMED_PORTAL:  # not a cursor's FETCH: its count is the cursor's
                    run.binding = self._unnamed_binds
                if not is_cursor and d.cursor and d.kind == "declare":
                    self._declare_sent(d, run)
                slot.runs.append(run)
            self._slots.append(slot)
            if self._copy_portals and portal in self._copy_portals:
                self._open_copy_window(slot)
            self.state = ProtocolState.BUSY
            out.to_server.append(frame)
        elif mtype == 0x53:  # Sync
            if self._copy_open:  # PostgreSQL is reading COPY data: it ignores the Sync
                out.to_server.append(frame)
                return
            self._slots.append(_Slot("sync", started=self.clock(),
                                     changes=self._take_batch_changes()))
            self._batch_lookups = 0
            self._slots[-1].in_copy = self._copy_window
            if self._batch_portals or self._bound_in_batch:
                self._slots[-1].portal_changes = self._batch_portals
                self._batch_portals = []
                self._bound_in_batch.clear()
            self.state = ProtocolState.BUSY
            out.to_server.append(frame)
        elif mtype == 0x43:  # Close
            kind = frame[5:6]
            name, _ = _cstr(frame, 6)
            if kind == b"S" and self._refuse_own_name(name, "close", out):
                return
            if kind == b"S":
                before = self._statement_state(name)
                self._forget_statement(name)
                self._sent_change(0x33, name, before)
            else:
                self._portal_changed(name, None)
                self._sent_change(0x33, None, None)
            out.to_server.append(frame)
        elif mtype == 0x46:  # FunctionCall: calls any function by OID, invisible to SQL analysis
            if self.view.unrestricted:
                # answered by FunctionCallResponse and ReadyForQuery: a request of its own, or
                # its ReadyForQuery would close the slot of whatever is pipelined behind it
                self._slots.append(_Slot("query", started=self.clock()))
                self.state = ProtocolState.BUSY
                out.to_server.append(frame)
                return
            denied = StatementDecision(
                action=Action.DENY, sql="", kind="function_call",
                reasons=("protocol-level FunctionCall",),
                message=f"function calls by OID (FunctionCall message) are not allowed for "
                        f"role {self.view.role}")
            slot = _Slot("query", runs=[_StatementRun(denied, self.clock(), denied=True)])
            self._slots.append(slot)
            sql = raise_sql(DENY_SQLSTATE, denied.message)
            out.to_server.append(_frame(b"Q", sql.encode("utf-8") + b"\x00"))
        elif mtype == 0x58:  # Terminate
            out.to_server.append(frame)
            out.close = True
        else:
            out.to_server.append(frame)

    # -- portals and cursors: one namespace on the server ---------------------------------
    def _portal_key(self, portal: bytes) -> tuple[str, str]:
        """The cumulative row count of a portal: a named one is a cursor to SQL (FETCH reads
        it, Execute runs a DECLAREd cursor), so both count against the same key."""
        if not portal:
            return _UNNAMED_PORTAL
        return ("cursor", portal.decode(self.codec, "replace"))

    def _portal_record(self, portal: bytes) -> tuple[StatementDecision, str, bool, int] | None:
        """What an Execute of ``portal`` runs: (decision, client text, is a DECLAREd cursor,
        rows already counted at least) -- the most protected of what the server may hold
        under the name: the portal bound last, one whose re-Bind or Close in an earlier batch
        the server has not answered yet, or a cursor of that name."""
        found: list[tuple[StatementDecision, str, bool, int]] = []
        rec = self._portals.get(portal)
        if rec is not None:
            found.append((rec[0], rec[1], False, 0))
        if self._portal_unsettled and portal not in self._bound_in_batch:
            pending = self._portal_unsettled.get(portal)
            if pending is not None:
                old, count = pending
                found.append((old[0], old[1], old[2], count))
        if portal and self.cursors:
            d = self.cursors.get(portal.decode(self.codec, "replace"))
            if d is not None:
                found.append((d, d.sql, True, 0))
        for item in found:
            if item[0].protected:
                return item
        return found[0] if found else None

    def _cursor_map(self) -> dict[str, StatementDecision]:
        """The cursors FETCH / MOVE may name: DECLAREd ones and protected portals bound with
        the extended protocol (FETCH reads those as well)."""
        if not self._portals and not self._portal_unsettled:
            return self.cursors
        merged = dict(self.cursors)
        for portal in (*self._portals, *self._portal_unsettled):
            if not portal:
                continue
            rec = self._portal_record(portal)
            if rec is None or not rec[0].protected or rec[2]:
                continue
            name = portal.decode(self.codec, "replace")
            have = merged.get(name)
            if have is None or not have.protected:
                merged[name] = rec[0]
        return merged

    def _portal_changed(self, portal: bytes, new: tuple[StatementDecision, str] | None
                        ) -> None:
        """A Bind (``new``: the bound statement's record, None when untracked) or a Close
        (None) of ``portal`` was sent. When the name held a protected result, the server may
        skip or refuse the message (an earlier error in the batch, a Bind of an unknown
        statement or with the wrong parameter count, a name in use) and keep the old portal:
        the old record stays in force for other batches until this one's ReadyForQuery, and
        comes back if the batch failed."""
        old = self._portal_record(portal)
        key = self._portal_key(portal)
        if not portal:
            self._unnamed_binds += 1
        if old is not None and old[0].protected:
            count = max(self._counts.get(key, 0), old[3])
            change = (portal, old, count)
            self._batch_portals.append(change)
            self._portal_unsettled.setdefault(portal, (old, count))
        if new is not None:
            self._portals[portal] = new
            if new[0].tables:
                self._portal_views[portal] = self.view
            self._portal_changes += 1
            self._counts.pop(key, None)
        else:
            self._portals.pop(portal, None)
            self._portal_changes += 1
        self._bound_in_batch.add(portal)

    def _settle_portals(self, changes: list[tuple[bytes, Any, int]]) -> None:
        """ReadyForQuery of the batch that re-bound or closed these portals: if it failed,
        the server may still hold the old, protected portals -- take their records back."""
        failed = self._batch_error
        for portal, old, count in changes[::-1]:  # not reversed(): mypyc 2.4 fails on it here
            pending = self._portal_unsettled.get(portal)
            if pending is not None and pending[0] is old:
                del self._portal_unsettled[portal]
            if not failed:
                continue
            d, text, is_cursor, _ = old
            if not is_cursor:
                self._portals[portal] = (d, text)
                self._portal_changes += 1
            key = self._portal_key(portal)
            if self._counts.get(key, 0) < count:
                self._counts[key] = count

    def _declare_sent(self, d: StatementDecision, run: _StatementRun) -> None:
        """A DECLARE was sent. Over a name that holds a protected cursor or portal the server
        refuses it (42P05) or skips it and keeps the old one: the new decision is recorded
        only when it succeeds (see _finish_run)."""
        assert d.cursor is not None
        old = self._portal_record(d.cursor.encode(self.codec, "replace"))
        if old is not None and old[0].protected:
            run.declare_pending = True
            run.declare_over = self._portal_changes
            run.declare_view = self.view  # the rules it was rewritten under
            return
        self.cursors[d.cursor] = d
        self._cursor_views[d.cursor] = self.view
        self._counts.pop(("cursor", d.cursor), None)

    def _deny_runs(self, analysis: Analysis, denied: StatementDecision, out: Output) -> None:
        run = _StatementRun(denied, self.clock(), denied=True, source=self._source)
        if self.count_statement is not None:
            self.count_statement("blocked", denied.kind)
        self._audit(out, run, "blocked", error=denied.message)

    def fast_query(self, frame: bytes) -> bytes | None:
        """The shell's hot path: ``frame`` is exactly one complete Query message. Returns what
        to send upstream for it, with its slot tracked here: ``frame`` itself for a single
        pass-through statement, or Bind/Describe/Execute/Sync of pgveil's prepared statement
        for a repeat of a memoised protected SELECT (:class:`_ProtectedQuery`). None when
        :meth:`from_client` must handle it."""
        plain = self._plain_kind
        # (a COPY is never a plain kind: it reaches _client_message, which tracks its window)
        if self._cbuf or self._batch_changes or self._copy_window or self._extended_open or \
                self._held_client is not None or self._skip_till_sync:
            return None
        op = self.operator
        if op is not None:
            # OperatorState.stale(), inlined: this runs for every pass-through statement
            epoch, control = op.epoch_ref, op.control
            if epoch is None or epoch[0] != op.epoch_seen or (
                    control is not None and control.generation != op.generation_seen):
                self.view = op.current()
        # memo by the raw text with digits zeroed (see Analyzer.plain_kind), per view: in
        # UTF-8 a digit byte is only ever a digit
        memo = self._plain_memo
        if memo is not None and self._plain_memo_view is self.view:
            key = frame.translate(_ZERO_DIGIT_BYTES)
            kind = memo.get(key)
        else:
            key, kind = None, None
        if kind is None:
            protected = self._protected_memo
            if protected:
                if key is None:
                    key = frame.translate(_ZERO_DIGIT_BYTES)
                entry = protected.get(key)
                if entry is not None:
                    return self._run_protected(frame, entry)
            if plain is None:
                return None
            try:
                sql = frame[5:-1].decode(self.codec)
            except (UnicodeDecodeError, LookupError):
                return None
            kind = plain(sql, self.view)
            if not kind:
                self._plain_miss = (frame, sql, kind)  # _on_query need not look again
                return None
            if self.codec == "utf-8" and self._plain_memoizable is not None:
                if self._plain_memo_view is not self.view or len(memo or ()) >= PLAIN_MEMO_SIZE:
                    memo = self._plain_memo = {} if self._plain_memoizable(self.view) else None
                    self._plain_memo_view = self.view
                if memo is not None:
                    memo[key if key is not None else frame.translate(_ZERO_DIGIT_BYTES)] = kind
        keyed = self._keyed_count
        if keyed is not None:  # count_statement("allowed", kind) without its call
            counted = self._allowed_keys.get(kind)
            if counted is None:
                counted = self._allowed_keys[kind] = keyed[0]("allowed", kind)
            keyed[1](counted)
        elif self.count_statement is not None:
            self.count_statement("allowed", kind)
        self.state = _BUSY
        self._slots.append(_Slot("query", started=self.clock()))
        return frame

    def _run_protected(self, frame: bytes, entry: _ProtectedQuery) -> bytes | None:
        """A memo hit of :meth:`fast_query`: the Bind batch that runs ``entry``'s prepared
        statement with ``frame``'s literals, or None (the general path decides) when the entry
        does not hold for this text or something live (hours, quota, audit) must be checked.
        (The memo is emptied whenever the server forgets pgveil's statements.)"""
        started = time.perf_counter()
        view = self.view
        if entry.view is not view or self._slots:
            return None
        original = entry.original
        spans = entry.spans
        if len(spans) == 1:  # the common lookup: one literal
            a, b, quoted = spans[0]
            if frame[:a] != original[:a] or frame[b:] != original[b:]:
                return None  # outside the literals: the very bytes of the original only
            value = frame[a + 1:b - 1].replace(b"\'\'", b"\'") if quoted else frame[a:b]
            pieces = entry.pieces
            sent = pieces[0] + value + pieces[1]
        else:
            prev = 0
            for a, b, _ in spans:
                if frame[prev:a] != original[prev:a]:
                    return None
                prev = b
            if frame[prev:] != original[prev:]:
                return None
            parts = []
            for (a, b, quoted), piece in zip(spans, entry.pieces, strict=False):
                parts.append(piece)
                parts.append(frame[a + 1:b - 1].replace(b"\'\'", b"\'") if quoted
                             else frame[a:b])
            parts.append(entry.pieces[-1])
            sent = b"".join(parts)
        limits = view.limits
        if limits.hours is not None or not self.audit_available() or (
                limits.quota_rows is not None and self.operator is not None
                and self.operator.quota_exceeded(
                    view, max(1, entry.decision.lookup_values)) is not None):
            return None  # _policy_gate decides (and explains a denial)
        now = self.clock()
        run = self._quota_start(_StatementRun(
            entry.decision, now, source=frame[5:-1].decode("ascii"), form=entry.form))
        self._slots.append(_Slot("query", runs=[run], started=now, converted=True))
        self.state = _BUSY
        if self._on_memo_hit is not None:
            self._on_memo_hit(time.perf_counter() - started)
        return sent

    def _memo_protected(self, frame: bytes, form: ServerForm, run: _StatementRun) -> None:
        """Remember a simple Query just sent as pgveil's prepared statement (``run`` its only
        statement) so that a repeat with other literals of the same lengths skips analysis.
        Only for ASCII UTF-8 texts (byte and character offsets agree), literals whose type
        cannot change with their digits (a quoted string, a point number, an integer of at
        most 9 digits: always int4), SELECTs without cursor or PREPARE bookkeeping, views
        whose sensitive names hold no digit, and records whose text the shell redacts."""
        d = run.decision
        name = self._server_statements.get((form.sql, form.types))
        if name is None or self._audit_form is None or self.codec != "utf-8" or \
                d.kind != "select" or d.action is not Action.REWRITE or d.cursor or \
                d.prepared or len(form.spans) != len(form.types) or not frame.isascii() or \
                self._plain_memoizable is None or not self._plain_memoizable(self.view):
            return
        spans: list[tuple[int, int, bool]] = []
        values: list[bytes] = []
        for (a, b), oid in zip(form.spans, form.types, strict=True):
            a, b = a + 5, b + 5
            literal = frame[a:b]
            quoted = literal[:1] == b"'"
            if quoted:
                ok = oid == 0
            elif literal.isdigit():
                ok = oid == 23 and len(literal) <= 9
            else:
                ok = oid == 1700
            if not ok:
                return
            spans.append((a, b, quoted))
            values.append(literal[1:-1].replace(b"''", b"'") if quoted else literal)
        audit_form = self._audit_form(self._audit_fields(run, self._decision_name(d)),
                                      self.lex.standard_conforming_strings)
        if audit_form is None:
            return
        # the Bind around the values: every length in it is the same for a text of this key
        body = [b"\x00" + name + b"\x00\x00\x00" + _PARAM_COUNT.pack(len(values))]
        for v in values:
            body[-1] += _U32.pack(len(v))
            body.append(b"")
        body[-1] += b"\x00\x00"  # results in text format
        length = sum(len(p) for p in body) + sum(len(v) for v in values) + 4
        pieces = [b"B" + _U32.pack(length) + body[0], *body[1:]]
        pieces[-1] += _DESCRIBE_PORTAL + _EXECUTE_ALL + _SYNC
        memo = self._protected_memo
        if len(memo) >= PLAIN_MEMO_SIZE:
            memo.clear()
        memo[frame.translate(_ZERO_DIGIT_BYTES)] = _ProtectedQuery(
            self.view, frame, tuple(spans), tuple(pieces), d, audit_form)

    def fast_batch(self, data: bytes) -> bool:
        """The shell's hot path for the extended protocol: ``data`` is exactly Bind,
        [Describe,] Execute, Sync of one portal of a statement parsed under the rules in
        force, either with no decision to track (pass-through) or a protected SELECT whose
        live checks (hours, quota, audit) cannot refuse it now. True when it is, with the
        slots the general path would have made; the caller forwards ``data`` unchanged."""
        if self._cbuf or self._plain_kind is None or self._batch_changes or self._copy_window \
                or self._batch_lookups or self._held_client is not None or self._skip_till_sync:
            return False
        n = len(data)
        unpack = _U32.unpack_from
        end_b = 1 + unpack(data, 1)[0]
        if end_b < 12 or end_b > n:
            return False
        pos = end_b
        if pos + 5 <= n and data[pos] == 0x44:  # Describe
            pos += 1 + unpack(data, pos + 1)[0]
        if pos + 5 > n or data[pos] != 0x45:
            return False
        end_e = pos + 1 + unpack(data, pos + 1)[0]
        if end_e + 5 != n or data[end_e] != 0x53 or unpack(data, end_e + 1)[0] != 4:
            return False
        zero = data.find(b"\x00", 5, end_b)
        if zero < 0:
            return False
        portal = data[5:zero]
        stmt_end = data.find(b"\x00", zero + 1, end_b)
        if stmt_end < 0 or data.find(b"\x00", pos + 5, end_e) != pos + 5 + len(portal) or \
                data[pos + 5:pos + 5 + len(portal)] != portal:
            return False  # Execute of another portal
        stmt = data[zero + 1:stmt_end]
        if len(portal) > NAME_BYTES or len(stmt) > NAME_BYTES:
            return False  # the general path refuses them (_check_name_lengths)
        if self._copy_statements and stmt in self._copy_statements:
            return False  # an Execute that may start COPY FROM STDIN (_client_message)
        entry = self._statements.get(stmt)
        if entry is None and stmt.startswith(SERVER_STATEMENT_PREFIX):
            return False
        parsed = self._parsed.get(stmt)
        if entry is None and parsed is None and not self.view.unrestricted:
            return False  # a name pgveil has no record of: the general path refuses it
        op = self.operator
        view = op.current() if op is not None else self.view
        if parsed is not None and op is not None and view.policy_version != parsed[2]:
            return False  # re-decided by the general path
        if self._portal_unsettled or (portal and self.cursors):
            return False
        old = self._portals.get(portal) if self._portals else None
        if old is not None and old[0].protected:
            return False  # the general path keeps it until the server answers the Bind
        if self._copy_portals:
            self._copy_portals.discard(portal)
        if not portal:
            self._unnamed_binds += 1
        if entry is None:
            self._portals.pop(portal, None)
            self._portal_changes += 1
            self._slots.append(_Slot("execute"))
        else:
            d = entry[0]
            limits = view.limits
            if d.kind != "select" or not d.protected or d.cursor or d.prepared or \
                    self._audit_form is None or limits.hours is not None or \
                    not self.audit_available() or (
                        limits.quota_rows is not None and op is not None
                        and op.quota_exceeded(view, max(1, d.lookup_values)) is not None):
                return False
            key = self._portal_key(portal)
            self._portals[portal] = entry
            self._portal_views[portal] = view
            self._portal_changes += 1
            self._counts.pop(key, None)
            run = self._quota_start(_StatementRun(d, self.clock(), counter_key=key,
                                                  source=entry[1]))
            run.binding = self._unnamed_binds if not portal else 0
            self._slots.append(_Slot("execute", runs=[run]))
        self._slots.append(_Slot("sync", started=self.clock()))
        self._extended_open = False
        self.state = _BUSY
        return True

    def _on_query(self, frame: bytes, out: Output) -> None:
        raw = frame[5:-1]
        if self._plain_miss is None or self._plain_miss[0] is not frame:
            # the hot path, unless the shell already asked it about this frame
            self._plain_miss = None
            sent = self.fast_query(frame)
            if sent is not None:
                out.to_server.append(sent)
                return
        miss, self._plain_miss = self._plain_miss, None
        if miss is not None and miss[0] is frame:
            analysis = self._analyze_sql(raw, miss[1], sensitive=miss[2] == "")
        else:
            analysis = self._analyze_sql(raw)
        prefix: list[str] = []
        denied = analysis.denied or self._refresh_prepared(analysis, prefix)
        if prefix and denied is None:  # EXECUTE now reads the re-prepared statements' decisions
            analysis = self._analyze_sql(raw)
            denied = analysis.denied
        before: tuple[StatementDecision, ...] = ()
        if denied is not None and not prefix:
            before = _statements_before(analysis.statements, denied)
            if before:
                # PostgreSQL runs the statements ahead of a failing one (BEGIN, an INSERT) and
                # only then fails: so does pgveil, with the same live checks they would meet
                first = Analysis(sql="", statements=before)
                gate = self._policy_gate(first) or self._prepare_collision(first)
                if gate is not None:
                    denied, before = gate, ()
        denied = denied or self._policy_gate(analysis) or self._prepare_collision(analysis)
        slot = _Slot("query", started=self.clock())
        if prefix and denied is None:
            # DEALLOCATE + PREPARE under the current rules, ahead of the client's statements;
            # their two CommandCompletes are pgveil's, not the client's
            for _ in prefix:
                slot.runs.append(_StatementRun(_HIDDEN, self.clock(), hidden=True))
            analysis = Analysis(sql="; ".join(prefix) + "; " + analysis.sql,
                                statements=analysis.statements, cached=analysis.cached,
                                rewrite_seconds=analysis.rewrite_seconds)
            analysis = _force_changed(analysis)
        self.state = ProtocolState.BUSY
        if denied is not None:
            self._deny_runs(analysis, denied, out)
            ahead = b""
            if before:
                self._track_statements(slot, before, len(analysis.statements))
                ahead = self._encode_sql("; ".join(st.sql for st in before) + "; ")
            run = _StatementRun(denied, self.clock(), denied=True)
            slot.runs.append(run)
            self._slots.append(slot)
            sql = raise_sql(denied.sqlstate or DENY_SQLSTATE, denied.message)
            out.to_server.append(_frame(b"Q", ahead + sql.encode("utf-8") + b"\x00"))
            return
        if not self.audit_all and not any(
                st.tables or st.cursor or st.prepared or _is_deallocate(st)
                for st in analysis.statements):
            # the common case (nothing protected, no cursor/prepare bookkeeping): no per-
            # statement tracking, so results flow through with no attribution work
            if self.count_statement is not None:
                for st in analysis.statements:
                    self.count_statement("rewritten" if st.action is Action.REWRITE
                                         else "allowed", st.kind)
            self._slots.append(_Slot("query", started=self.clock()))
            if analysis.changed:
                out.to_server.append(_frame(b"Q", self._encode_sql(analysis.sql) + b"\x00"))
            else:
                out.to_server.append(frame)
            return
        nothing_pending = not self._slots
        tx_before = self.tx
        single = len(analysis.statements) == 1
        self._track_statements(slot, analysis.statements, len(analysis.statements))
        self._slots.append(slot)
        form = analysis.server_form if self.server_prepare and single and not prefix else None
        if form is not None and nothing_pending and self._send_prepared(form, slot, out):
            self._memo_protected(frame, form, slot.runs[0])
            return
        if analysis.changed:
            out.to_server.append(_frame(b"Q", self._encode_sql(analysis.sql) + b"\x00"))
        else:
            out.to_server.append(frame)
        if form is not None and nothing_pending and tx_before is not TxStatus.FAILED and \
                analysis.statements[0].kind == "select":
            self._prepare_upstream(form, out, in_block=tx_before is TxStatus.IN_TRANSACTION)

    def _track_statements(self, slot: _Slot, statements: Sequence[StatementDecision],
                          total: int) -> None:
        """A run in ``slot`` for each of these statements of a simple Query whose text holds
        ``total`` statements, with the PREPARE / DECLARE bookkeeping their answers settle."""
        now = self.clock()
        single = total == 1
        source = self._source
        sources = None if single else _split_sources(source, total)
        for i, st in enumerate(statements):
            key = None
            declare = bool(st.cursor and st.kind == "declare")
            if st.cursor and not declare:
                key = ("cursor", st.cursor)
            text = source if single else (sources[i] if sources else st.sql)
            if st.prepared and st.kind == "prepare":
                self._record_prepare(st, text)
            run = self._quota_start(_StatementRun(st, now, counter_key=key, source=text))
            if declare:
                self._declare_sent(st, run)
            slot.runs.append(run)

    # ------------------------------------------------------------------ server-side prepare
    def _send_prepared(self, form: ServerForm, slot: _Slot, out: Output) -> bool:
        """Send the simple Query whose analysis is ``form`` as Bind/Describe/Execute/Sync of
        the statement prepared for its shape, when there is one. The client sees what the
        Query would have produced: RowDescription, rows, CommandComplete, ReadyForQuery
        (the BindComplete is dropped); errors and the transaction status are the same."""
        name = self._server_statements.get((form.sql, form.types))
        if name is None:
            return False
        try:
            values = [v.encode(self.codec) for v in form.values]
        except (UnicodeEncodeError, LookupError):
            return False
        body = [b"\x00", name, b"\x00\x00\x00", _PARAM_COUNT.pack(len(values))]
        for v in values:
            body.append(_U32.pack(len(v)))
            body.append(v)
        body.append(b"\x00\x00")
        out.to_server.append(_frame(b"B", b"".join(body)) + _DESCRIBE_PORTAL + _EXECUTE_ALL
                             + _SYNC)
        slot.converted = True
        return True

    def _prepare_upstream(self, form: ServerForm, out: Output, in_block: bool) -> None:
        """After a rewritten SELECT sent as text, prepare its shape upstream with a
        Parse+Sync of pgveil's own: the next Query of this shape runs it. Outside a
        transaction block the Parse runs in its own implicit transaction; inside one it is
        wrapped in a savepoint that is always rolled back to and released, so a failed Parse
        (a parameter type PostgreSQL cannot infer) cannot abort the client's transaction
        (prepared statements are not transactional: a good one survives the rollback)."""
        key = (form.sql, form.types)
        if key in self._server_statements or key in self._server_failed or \
                len(self._server_statements) >= MAX_SERVER_STATEMENTS:
            return
        try:
            text = form.sql.encode(self.codec)
        except (UnicodeEncodeError, LookupError):
            self._server_failed.add(key)
            return
        self._server_seq += 1
        name = SERVER_STATEMENT_PREFIX + str(self._server_seq).encode()
        types = b"".join(_U32.pack(t) for t in form.types)
        parse = _frame(b"P", name + b"\x00" + text + b"\x00"
                       + _PARAM_COUNT.pack(len(form.types)) + types) + _SYNC
        if in_block:
            out.to_server.append(_SAVEPOINT + parse + _ROLLBACK_TO_SAVEPOINT)
            self._slots.append(_Slot("hidden", prepare_key=key, hidden_z=3))
        else:
            out.to_server.append(parse)
            self._slots.append(_Slot("hidden", prepare_key=key))
        self._pending_prepare[key] = name

    def _hidden_message(self, mtype: int, frame: bytes) -> None:
        """A response to pgveil's own Parse+Sync: nothing of it reaches the client."""
        slot = self._slots[0]
        key = slot.prepare_key
        assert key is not None
        if mtype == 0x31:  # ParseComplete
            name = self._pending_prepare.pop(key, None)
            if name is not None:
                self._server_statements[key] = name
        elif mtype == 0x45:  # ErrorResponse: this shape stays a text Query here
            self._pending_prepare.pop(key, None)
            self._server_failed.add(key)
            fields = parse_error_fields(frame[5:])
            log.debug("preparing a rewritten shape upstream failed (%s: %s); it is sent as "
                      "text", fields.get("C"), fields.get("M"))
        elif mtype == 0x5A:  # a ReadyForQuery of ours
            status = _TX_BY_BYTE.get(frame[5]) if len(frame) == 6 else None
            if status is not None:
                self.tx = status
            slot.hidden_z -= 1
            if slot.hidden_z <= 0:
                self._slots.popleft()
                self.state = ProtocolState.BUSY if self._slots else ProtocolState.READY

    def _statements_dropped(self, tag: bytes) -> None:
        """CommandComplete of DISCARD ... / DEALLOCATE ...: after DISCARD ALL or DEALLOCATE
        ALL the server holds none of the client's prepared statements either (a single
        DEALLOCATE is settled by its run, see _settle_prepared)."""
        if self._server_statements:
            self._forget_server_statements()
        if tag in (b"DISCARD ALL", b"DEALLOCATE ALL"):
            self._forget_deallocated("DEALLOCATE ALL")
            self._parsed = {k: v for k, v in self._parsed.items() if not k}

    def _forget_server_statements(self) -> None:
        """The server dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL): ours
        too. They are prepared again when their shapes come back."""
        self._server_statements.clear()
        self._pending_prepare.clear()
        self._protected_memo.clear()  # its entries run those statements

    def _refresh_prepared(self, analysis: Analysis, prefix: list[str]) -> StatementDecision | None:
        """For each EXECUTE of a SQL-level prepared statement decided under rules that have
        changed since (a reload, a grant), re-analyse its PREPARE and queue DEALLOCATE + the new
        PREPARE into ``prefix``. Returns a denial when the statement is no longer allowed."""
        for st in analysis.statements:
            name = st.prepared
            if st.kind != "execute" or not name:
                continue
            version = self._prepared_version.get(name)
            if version is None or version == self.view.policy_version:
                continue
            source = self._prepared_source.get(name, "")
            fresh = self._analyze_sql(source.encode(self.codec, "replace"))
            new = fresh.statements[0] if len(fresh.statements) == 1 else None
            if fresh.denied is not None or new is None or new.kind != "prepare":
                return fresh.denied or StatementDecision(
                    action=Action.DENY, sql=source, kind="execute",
                    message=f"prepared statement {name} can no longer be re-prepared")
            quoted = '"' + name.replace('"', '""') + '"'
            prefix += [f"DEALLOCATE {quoted}", fresh.sql.strip().rstrip(";")]
            self.prepared[name] = new
            self._prepared_version[name] = self.view.policy_version
        return None

    def _prepare_collision(self, analysis: Analysis) -> StatementDecision | None:
        """A PREPARE (SQL) of a name that holds a protected statement: PostgreSQL refuses it
        (42P05) and keeps the old statement, so recording the new decision would make pgveil
        run the old, protected statement under the new one's rules (no row cap, EXPLAIN
        ANALYZE allowed). Refused here, like PostgreSQL would."""
        for st in analysis.statements:
            if st.kind == "prepare" and st.prepared:
                old = self.prepared.get(st.prepared)
                if old is not None and old.protected and not st.protected:
                    return StatementDecision(
                        action=Action.DENY, sql=st.sql, kind="prepare", prepared=st.prepared,
                        sqlstate="42P05", reasons=("prepared statement name in use",),
                        message=f'prepared statement "{st.prepared}" already exists')
        return None

    def _record_prepare(self, st: StatementDecision, text: str) -> None:
        """A SQL-level PREPARE: ``EXECUTE name`` and a protocol Bind of ``name`` run its
        statement under its decision. The Bind's runs carry it as kind ``execute``: what they
        run is the prepared statement, not the PREPARE (a failed run must not read as a failed
        PREPARE, see _settle_prepared)."""
        name = st.prepared
        assert name is not None
        key = name.encode(self.codec, "replace")
        # what the name held: PostgreSQL keeps it when it refuses this PREPARE (42P05)
        self._prepare_before[name] = (st, self.prepared.get(name),
                                      self._prepared_version.get(name),
                                      self._prepared_source.get(name), self._statements.get(key))
        self.prepared[name] = st
        self._prepared_version[name] = self.view.policy_version
        self._prepared_source[name] = text
        self._statements[key] = (replace(st, kind="execute"), text)

    def _settle_prepared(self, d: StatementDecision, error: str | None, text: str) -> None:
        """The server answered a PREPARE or DEALLOCATE: a failed PREPARE created nothing (drop
        the decision recorded when it was sent), a DEALLOCATE is forgotten only once done (or
        when the statement did not exist): until then the old decision stays in force. A
        PREPARE sent with the extended protocol (drivers such as asyncpg send every text that
        way) is recorded once it succeeded."""
        if d.kind == "prepare" and d.prepared and error is None:
            if self.prepared.get(d.prepared) is not d:
                self._record_prepare(d, text)
            before = self._prepare_before.get(d.prepared)
            if before is not None and before[0] is d:
                del self._prepare_before[d.prepared]
        elif d.kind == "prepare" and d.prepared and error is not None:
            before = self._prepare_before.get(d.prepared)
            if self.prepared.get(d.prepared) is d and before is not None and before[0] is d:
                # it created nothing: the name holds what it held before (a refused duplicate
                # PREPARE leaves PostgreSQL's statement in place)
                del self._prepare_before[d.prepared]
                key = d.prepared.encode(self.codec, "replace")
                for table, value in ((self.prepared, before[1]),
                                     (self._prepared_version, before[2]),
                                     (self._prepared_source, before[3])):
                    if value is None:
                        table.pop(d.prepared, None)
                    else:
                        table[d.prepared] = value
                if before[4] is None:
                    self._statements.pop(key, None)
                else:
                    self._statements[key] = before[4]
        elif _is_deallocate(d) and (error is None or error.startswith("26000")):
            self._forget_deallocated(d.sql)

    def _forget_deallocated(self, text: str) -> None:
        m = _DEALLOCATE.match(text)
        if m is None:
            return
        name = m.group(2)
        if name.lower() == "all":
            self.prepared.clear()
            self._prepared_version.clear()
            self._statements = {k: v for k, v in self._statements.items() if not k}
            return
        name = name[1:-1].replace('""', '"') if name.startswith('"') else \
            name.translate(_ASCII_LOWER)
        self.prepared.pop(name, None)
        self._prepared_version.pop(name, None)
        self._statements.pop(name.encode(self.codec, "replace"), None)

    def _reprepare(self, name: bytes, parsed: tuple[str, bytes, str], out: Output) -> bool:
        """Re-analyse a prepared statement under the current view before its Bind. Returns
        False when it is now denied (the Bind was replaced by a server-side error)."""
        source, rest, _ = parsed
        analysis = self._analyze_sql(source.encode(self.codec, "replace"))
        denied = analysis.denied or self._policy_gate(analysis)
        if denied is not None or len(analysis.statements) != 1:
            denied = denied or StatementDecision(action=Action.DENY, sql=source, kind="other",
                                                 message="statement no longer allowed")
            self._deny_runs(analysis, denied, out)
            # Keep what we know of it: the server still holds the statement prepared under
            # the old rules, and forgetting it would let the next Bind run it as if it were
            # no one's (unaudited, uncapped). Its old policy version makes every Bind decide
            # again -- and refuse again.
            self._send_raise(denied, out)
            return False
        st = analysis.statements[0]
        before = self._statement_state(name)
        self._remember_statement(name, st, source, rest)
        sql = self._encode_sql(analysis.sql) if analysis.changed else \
            source.encode(self.codec, "replace")
        out.to_server.append(_frame(b"C", b"S" + name + b"\x00"))
        out.to_server.append(_frame(b"P", name + b"\x00" + sql + b"\x00" + rest))
        self._swallow += 2  # the CloseComplete and ParseComplete the client did not ask for
        # skipped (an earlier error in the batch), the old statement and its old policy
        # version come back, so the next Bind re-prepares it again
        self._sent_change(0x33, None, None)
        self._sent_change(0x31, name, before)
        return True

    def _send_raise(self, denied: StatementDecision, out: Output) -> None:
        """Parse+Bind+Execute of the unnamed statement: the server raises our error at once and
        then skips the client's remaining batch messages until Sync, as it would for any failed
        Parse or Bind."""
        sql = raise_sql(denied.sqlstate or DENY_SQLSTATE, denied.message).encode()
        before = self._statement_state(b"")
        self._forget_statement(b"")  # the server's unnamed statement is now this raise
        out.to_server.append(_frame(b"P", b"\x00" + sql + b"\x00\x00\x00"))
        out.to_server.append(_frame(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00"))
        out.to_server.append(_frame(b"E", b"\x00\x00\x00\x00\x00"))
        self._sent_change(0x31, b"", before)
        slot = _Slot("execute", runs=[_StatementRun(denied, self.clock(), denied=True)])
        # the client asked for none of the raise's ParseComplete and BindComplete (PostgreSQL
        # answers a failed Parse with the error alone): they come while this slot is the head
        slot.injected = 2
        self._slots.append(slot)

    # -- statement changes the server has not answered (see _StatementChange) ---------------
    def _statement_state(self, name: bytes) -> tuple[Any, ...]:
        """What pgveil records under a statement name, to put back with _restore_statement."""
        key = name.decode(self.codec, "replace") if name else None
        return (self._parsed.get(name), self._statements.get(name),
                self.prepared.get(key) if key is not None else None)

    def _restore_statement(self, name: bytes, state: tuple[Any, ...]) -> None:
        parsed, decision, prepared = state
        for table, value in ((self._parsed, parsed), (self._statements, decision)):
            if value is None:
                table.pop(name, None)
            else:
                table[name] = value
        if name:
            key = name.decode(self.codec, "replace")
            if prepared is None:
                self.prepared.pop(key, None)
            else:
                self.prepared[key] = prepared

    def _forget_statement(self, name: bytes) -> None:
        self._restore_statement(name, (None, None, None))

    def _sent_change(self, answer: int, name: bytes | None, before: tuple[Any, ...] | None
                     ) -> None:
        change = _StatementChange(answer, name, before)
        self._changes.append(change)
        self._batch_changes.append(change)

    def _take_batch_changes(self) -> list[_StatementChange] | None:
        if not self._batch_changes:
            return None
        changes, self._batch_changes = self._batch_changes, []
        return changes

    def _change_answered(self, mtype: int) -> None:
        """A ParseComplete or CloseComplete (the client's or pgveil's): the oldest change still
        waiting happened on the server."""
        changes = self._changes
        while changes and changes[0].settled:
            changes.popleft()
        if not changes:
            return
        change = changes.popleft()
        change.settled = True
        if change.answer != mtype:  # answers come in order: this would be a bug of ours
            log.warning("statement change answered by %r, expected %r", chr(mtype),
                        chr(change.answer))

    def _settle_changes(self, changes: list[_StatementChange]) -> None:
        """ReadyForQuery of the batch that sent ``changes``: the server skipped (or refused)
        every one it did not answer, so pgveil takes them back, newest first."""
        for change in reversed(changes):
            if not change.settled:
                change.settled = True
                if change.name is not None and change.before is not None:
                    self._restore_statement(change.name, change.before)
        changes_left = self._changes
        while changes_left and changes_left[0].settled:
            changes_left.popleft()

    def _remember_statement(self, name: bytes, st: StatementDecision | None, source: str,
                            rest: bytes) -> None:
        """Record a prepared statement's decision. Protocol-level and SQL-level prepared
        statements share one namespace on the server: keep both views of it in step, so
        `EXECUTE name` of a wire-parsed statement and a wire Bind of a SQL-PREPAREd one are
        both attributed to the right decision."""
        self._parsed[name] = (source, rest, self.view.policy_version)
        key = name.decode(self.codec, "replace")
        if st is not None and (st.protected or st.cursor or st.prepared or self.audit_all):
            self._statements[name] = (st, source)
        else:
            self._statements.pop(name, None)
        if name:  # every one: SQL EXECUTE of a name pgveil never saw is refused (analyze)
            if st is not None:
                self.prepared[key] = st
            else:
                self.prepared.pop(key, None)

    def _refuse_own_name(self, name: bytes, what: str, out: Output) -> bool:
        """Parse, Bind or Close of one of pgveil's own statements (``pgveil_N``, see
        upstream.prepare_rewritten): refused. Its hot path binds them by name, so a client that
        closed one and parsed its own text under the name would have that text run in place of
        the rewritten statement, past the row cap and the audit record."""
        if not name.startswith(SERVER_STATEMENT_PREFIX):
            return False
        denied = StatementDecision(
            action=Action.DENY, sql="", kind="execute",
            reasons=("pgveil's own prepared statement",),
            message=f"prepared statement names beginning with "
                    f"{SERVER_STATEMENT_PREFIX.decode()} belong to pgveil; clients cannot "
                    f"{what} them")
        self._deny_runs(Analysis(sql="", statements=(denied,)), denied, out)
        self._send_raise(denied, out)
        return True

    def _on_parse(self, frame: bytes, out: Output) -> None:
        payload = frame[5:]
        name, pos = _cstr(payload, 0)
        if self._refuse_own_name(name, "prepare", out):
            return
        raw, pos2 = _cstr(payload, pos)
        if _MAY_COPY_IN.search(raw) is not None:
            self._copy_statements.add(name)
        elif self._copy_statements:
            self._copy_statements.discard(name)
        rest = payload[pos2:]
        analysis = self._analyze_sql(raw)
        if len(analysis.statements) > 1 and not analysis.denied:
            analysis = Analysis(sql=analysis.sql, statements=(StatementDecision(
                action=Action.DENY, sql=analysis.sql, kind="other",
                tables=tuple(t for s in analysis.statements for t in s.tables),
                message="cannot insert multiple commands into a prepared statement"),))
        denied = analysis.denied or self._policy_gate(analysis)
        if denied is not None:
            # never sent: the server keeps what it holds under ``name`` (the unnamed statement
            # becomes our raise, see _send_raise)
            self._deny_runs(analysis, denied, out)
            self._send_raise(denied, out)
            return
        st = analysis.statements[0] if analysis.statements else None
        held = self._statements.get(name) if name else None
        if held is not None and held[0].protected and (st is None or not st.protected):
            # PostgreSQL refuses a named Parse of an existing name (42P05) and keeps the old
            # statement: recording this one would run the old, protected statement under the
            # new one's rules (no row cap, EXPLAIN ANALYZE EXECUTE allowed)
            collision = StatementDecision(
                action=Action.DENY, sql="", kind="prepare", sqlstate="42P05",
                reasons=("prepared statement name in use",),
                message=f'prepared statement "{name.decode(self.codec, "replace")}" already '
                        "exists")
            self._deny_runs(Analysis(sql="", statements=(collision,)), collision, out)
            self._send_raise(collision, out)
            return
        before = self._statement_state(name)
        self._remember_statement(name, st, self._source, rest)
        if analysis.changed:
            sql = self._encode_sql(analysis.sql)
            out.to_server.append(_frame(b"P", name + b"\x00" + sql + b"\x00" + rest))
        else:
            out.to_server.append(frame)
        self._sent_change(0x31, name, before)

    # ------------------------------------------------------------------ server side
    def from_server(self, data: bytes, skip: int = 0) -> Output:
        """Feed bytes PostgreSQL sent; returns what to send where (see from_client).
        ``skip``: leading bytes :meth:`plain_response` already accounted for (they are
        forwarded with the rest)."""
        out = Output()
        if self._sbuf:
            self._sbuf += data
            if len(self._sbuf) < self._sbuf_need:
                return out
            buf = bytes(self._sbuf)
            self._sbuf.clear()
        else:
            buf = data
        n = len(buf)
        start = 0
        slots = self._slots
        to_client = out.to_client
        unpack = _U32.unpack_from
        if skip:
            pos = skip
        else:
            pos = self.plain_response(buf)
        if self.hold_protected:
            self._refresh_holding()

        def flush(chunk: bytes) -> None:
            held = self._holding
            if held is None or held.held is None:
                to_client.append(chunk)
                return
            held.held.append(chunk)
            held.held_bytes += len(chunk)
            if held.held_bytes > HOLD_LIMIT:  # too big to hold: stream the rest (documented)
                to_client.extend(held.held)
                held.held = None
                self._holding = None

        while n - pos >= 5:
            mtype = buf[pos]
            end = pos + 1 + unpack(buf, pos + 1)[0]
            if end > n:
                break
            if slots and slots[0].kind == "hidden" and mtype != 0x53:  # pgveil's Parse+Sync
                if pos > start:
                    flush(buf[start:pos])
                self._hidden_message(mtype, buf[pos:end])
                start = pos = end
                if self.hold_protected:
                    self._refresh_holding()
                continue
            if (mtype == 0x31 or mtype == 0x33) and self._changes:  # Parse/CloseComplete
                self._change_answered(mtype)
            if mtype == 0x44:  # DataRow: the hot path
                if slots:
                    head = slots[0]
                    runs = head.runs
                    run = runs[head.index] if head.index < len(runs) else None
                    if run is not None and self._drop_server:
                        # a statement PostgreSQL ran after one pgveil stopped at max_rows:
                        # counted for its record, never sent (the client was told the
                        # request failed)
                        run.rows += 1
                        if pos > start:
                            flush(buf[start:pos])
                        start = end
                    elif run is not None:
                        run.rows += 1
                        limit = run.decision.row_limit
                        over_limit = limit is not None and run.rows + (
                            self._counts.get(run.counter_key, 0)
                            if run.counter_key else 0) > limit
                        if run.rows > run.room and not run.capped and not over_limit:
                            self._claim_quota(run)
                        if run.capped or over_limit or run.rows > run.room:
                            if pos > start:
                                flush(buf[start:pos])
                            start = end
                            if not run.capped:
                                run.capped = True
                                run.quota_capped = not over_limit
                                out.cancel = True
                                self.capped_run = run
                            run.rows -= 1
                    elif self._drop_server:
                        if pos > start:
                            flush(buf[start:pos])
                        start = end
            elif mtype == 0x41:  # NotificationResponse
                if not self._notification_allowed(buf[pos:end]):
                    if pos > start:
                        flush(buf[start:pos])
                    start = end
            elif mtype == 0x4E and self._drop_traces and _is_trace(buf, pos, end):
                if pos > start:  # a LOG or DEBUG message (see __init__): dropped
                    flush(buf[start:pos])
                start = end
            elif mtype in _SERVER_WATCHED or (
                    mtype in (0x64, 0x63) and self.state is ProtocolState.COPY_OUT):
                frame = buf[pos:end]
                holding = self._holding
                if holding is not None:  # rows so far belong to the held result
                    if pos > start:
                        flush(buf[start:pos])
                    start = pos
                mark = len(to_client)
                self._server_message(mtype, frame, out)
                if holding is not None and holding.done and holding.held is not None:
                    # the held statement ended: its result (with what this message produced)
                    # goes out only once its audit record is durable
                    emitted = to_client[mark:]
                    del to_client[mark:]
                    if holding.event is not None:
                        holding.event.held = True
                    to_client.append(HeldResult(holding.held + emitted, WITHHELD_RESULT,  # type: ignore[arg-type]
                                                holding.event))
                    holding.held = None
                    start = end
                elif len(to_client) == mark + 1 and to_client[mark] is frame:
                    to_client.pop()
                else:
                    if pos > start:
                        to_client.insert(mark, buf[start:pos])
                    start = end
                if (mtype == 0x47 or mtype == 0x57) and holding is not None and \
                        holding.held is not None and not holding.done:
                    # COPY FROM STDIN: the client sends the data the statement waits for only
                    # once it has the CopyInResponse. What is held so far goes out now; the
                    # completion is still held for the record.
                    if end > start:
                        flush(buf[start:end])
                        start = end
                    to_client.extend(holding.held)
                    holding.held = []
                    holding.held_bytes = 0
                if self.hold_protected:
                    self._refresh_holding()
            elif self._drop_server or (self._swallow and mtype in (0x31, 0x33)) or (
                    mtype == 0x32 and slots and slots[0].converted) or (
                    (mtype == 0x31 or mtype == 0x32) and slots and slots[0].injected):
                if self._drop_server:
                    pass
                elif (mtype == 0x31 or mtype == 0x32) and slots and slots[0].injected:
                    slots[0].injected -= 1
                elif mtype != 0x32:
                    self._swallow -= 1
                if pos > start:
                    flush(buf[start:pos])
                start = end
            pos = end
        if pos > start:
            flush(buf[start:pos] if start or pos < n else buf)
        if pos < n:
            self._sbuf += buf[pos:]
            self._sbuf_need = 1 + _U32.unpack_from(buf, pos + 1)[0] if n - pos >= 5 else 5
        return out

    def _notification_allowed(self, frame: bytes) -> bool:
        """May the operator receive this NotificationResponse? Channels are database-wide:
        any session may NOTIFY a whole raw row on one. LISTEN of an unlisted channel is denied,
        but a session can still be subscribed without one (a DBA's function with a static
        LISTEN in PL/pgSQL), so a masked operator's notifications are filtered here too: only
        channels matching the policy's ``listen_channels`` reach the client."""
        view = self.operator.current() if self.operator is not None else self.view
        if view.unrestricted:
            return True
        end = frame.find(b"\x00", 9)
        if end < 0:
            return False
        channel = frame[9:end].decode("utf-8", "replace")
        if any(fnmatchcase(channel, pattern) for pattern in view.limits.listen):
            return True
        if channel not in self._dropped_channels:
            self._dropped_channels.add(channel)
            log.info("notifications on channel %r are not delivered to %s: the policy does not "
                     "list it in listen_channels", channel, view.login)
        return False

    def plain_response(self, buf: bytes) -> int:
        """The hot path for server bytes (the shell's, and the start of :meth:`from_server`):
        consume the leading frames of ``buf`` that answer statements without runs
        (pass-through: nothing to count, hold or attribute) and return how many bytes that
        was. Those frames are forwarded unchanged; only the slot bookkeeping that
        ``_server_message`` would do is done here. Anything unusual (an error,
        ParameterStatus, COPY, a slot with runs, pgveil's own injected statements) stops it:
        the rest goes to :meth:`from_server` with ``skip``."""
        slots = self._slots
        if self._sbuf or not slots or self._drop_server or self._swallow or \
                self._abort_after_cap or self.state is not _BUSY or self._changes or \
                self._portal_unsettled or self._copy_window:
            return 0
        head = slots[0]
        if head.runs or head.kind not in _PLAIN_SLOTS or head.barrier:
            return 0
        n = len(buf)
        unpack = _U32.unpack_from
        plain = self._plain_server
        pos = 0
        while n - pos >= 5:
            mtype = buf[pos]
            end = pos + 1 + unpack(buf, pos + 1)[0]
            if end > n:
                break
            if mtype in plain:
                pos = end
                continue
            kind = head.kind
            if mtype == 0x43 or mtype == 0x73 or mtype == 0x49:  # C, s, I: completions
                if mtype == 0x43 and buf[pos + 5] == 0x44 and \
                        buf[pos + 5:pos + 8] in (b"DIS", b"DEA"):
                    self._statements_dropped(buf[pos + 5:end - 1])  # DISCARD / DEALLOCATE
                if kind == "execute":
                    slots.popleft()
                elif kind != "query":
                    return pos
            elif mtype == 0x5A and (kind == "query" or kind == "sync"):  # ReadyForQuery
                tx = _TX_BY_BYTE.get(buf[pos + 5]) if end - pos == 6 else None
                if tx is None:
                    return pos
                self.tx = tx
                self._batch_error = False  # (set by an error answered in an earlier read)
                slots.popleft()
                if head.started and self.observe_duration is not None:
                    self.observe_duration(self.clock() - head.started)
                self.state = _BUSY if slots else _READY
            else:
                return pos
            pos = end
            if not slots or slots[0].runs or slots[0].kind not in _PLAIN_SLOTS or \
                    slots[0].barrier:
                return pos
            head = slots[0]
        return pos

    def protected_response(self, buf: bytes) -> tuple[bytes, Any, int, float] | None:
        """The hot path for the whole result of one protected SELECT: ``buf`` holds every
        message answering the head slot -- a simple Query pgveil ran as its prepared statement
        (:meth:`fast_query`), or an Execute and its Sync -- up to and including the final
        ReadyForQuery, with nothing unusual in it (no error, notice, parameter change or row
        beyond the cap). Returns (the bytes for the client, the audit form, rows, duration in
        ms) after the bookkeeping the general path would do; the shell submits the record and
        holds the bytes until it is durable. None: nothing was touched, use from_server."""
        slots = self._slots
        if self._sbuf or self._drop_server or self._swallow or self._abort_after_cap or \
                not slots or self._changes or self._copy_window:
            return None
        head = slots[0]
        runs = head.runs
        if len(runs) != 1 or head.index:
            return None
        run = runs[0]
        form = run.form
        kind = head.kind
        if kind == "execute":
            if len(slots) != 2 or slots[1].kind != "sync" or slots[1].barrier:
                return None
            prelude = _EXECUTE_PRELUDE
        elif kind == "query" and head.converted and form is not None and len(slots) == 1:
            prelude = _QUERY_PRELUDE
        else:
            return None
        if run.rows or run.held or run.held_bytes or run.denied or run.hidden or run.done:
            return None
        d = run.decision
        if d.kind != "select" or d.cursor or d.prepared:
            return None  # a PREPARE, DECLARE, EXECUTE ...: settled by the general path
        n = len(buf)
        if not d.tables or n < 11 or buf[n - 6] != 0x5A or \
                buf[n - 5:n - 1] != b"\x00\x00\x00\x05":
            return None
        tx = _TX_BY_BYTE.get(buf[n - 1])
        if tx is None:
            return None
        start = 0
        if head.converted:  # pgveil's BindComplete, not the client's
            if buf[:5] != _BIND_COMPLETE:
                return None
            start = 5
        last = n - 6
        unpack = _U32.unpack_from
        pos, rows, mtype = start, 0, 0
        while pos < last:
            mtype = buf[pos]
            end = pos + 1 + unpack(buf, pos + 1)[0]
            if mtype == 0x44:
                rows += 1
            elif mtype == 0x43:  # CommandComplete: the last message before ReadyForQuery
                if end != last:
                    return None
            elif mtype not in prelude:
                return None
            pos = end
        if pos != last or mtype != 0x43:
            return None
        limit = d.row_limit
        if limit is not None and rows + (self._counts.get(run.counter_key, 0)
                                         if run.counter_key is not None else 0) > limit:
            return None  # the general path caps it
        if rows > run.room:
            self._claim_quota(run)
            if rows > run.room:
                return None  # the general path stops it at the quota
        name = "rewritten" if d.action is _REWRITE else "allowed"
        if form is None:
            form = self._form_for(run, name)
            if form is None:
                return None
        now = self.clock()
        run.rows, run.done, run.held = rows, True, None
        if self._holding is run:
            self._holding = None
        if run.counter_key is not None and (not run.binding
                                            or run.binding == self._unnamed_binds):
            self._counts[run.counter_key] = self._counts.get(run.counter_key, 0) + rows
        if self.operator is not None:
            if run.reserved:
                self._release_run(run)
            self.operator.add_rows(_quota_charge(d, rows))
        keyed = self._keyed_count
        if keyed is not None:  # count_statement(name, kind) without its call
            counted = self._run_keys.get((name, d.kind))
            if counted is None:
                counted = self._run_keys[(name, d.kind)] = keyed[0](name, d.kind)
            keyed[1](counted)
        elif self.count_statement is not None:
            self.count_statement(name, d.kind)
        self.tx = tx
        self._batch_error = False
        slots.popleft()
        started = slots.popleft().started if kind == "execute" else head.started
        if tx is _IDLE and self._portals and not self._bound_in_batch:
            self._portals.clear()  # the transaction ended: so did every portal
            self._portal_views.clear()
            self._portal_changes += 1
        if started and self.observe_duration is not None:
            self.observe_duration(now - started)
        self.state = _READY
        return (buf[start:] if start else buf), form, rows, round((now - run.started) * 1000, 3)

    def _refresh_holding(self) -> None:
        """Which run's output is being held (strict durability): the current run of the head
        slot, if it reads a protected table and is neither denied nor pgveil's own."""
        run = None
        if self._slots:
            head = self._slots[0]
            if head.index < len(head.runs):
                run = head.runs[head.index]
        if run is None or run.denied or run.hidden or run.done or not run.decision.protected:
            self._holding = None
            return
        if run is not self._holding:
            if run.held is None and run.held_bytes == 0:
                run.held = []
            self._holding = run if run.held is not None else None

    def _current_run(self) -> tuple[_Slot | None, _StatementRun | None]:
        while self._slots:
            head = self._slots[0]
            if head.kind == "sync":
                return head, None
            if head.index < len(head.runs):
                return head, head.runs[head.index]
            if head.kind == "execute" and not head.runs:
                return head, None
            return head, None
        return None, None

    def _finish_run(self, slot: _Slot, run: _StatementRun | None, out: Output,
                    error: str | None = None, blocked: bool = False,
                    withheld: bool = False) -> None:
        if run is not None and run is self.capped_run:
            self.capped_run = None  # finished: a cancel sent now could hit the next statement
        if run is not None:
            run.done = True
            # withheld: PostgreSQL completed it (after a statement stopped at max_rows), only
            # the client was not told -- what it created or dropped on the server stands
            succeeded = error is None or withheld
            if run.declare_pending and succeeded:  # the name was free after all
                d = run.decision
                self.cursors[d.cursor] = d  # type: ignore[index]
                if run.declare_view is not None:
                    self._cursor_views[d.cursor] = run.declare_view  # type: ignore[index]
                self._counts.pop(("cursor", d.cursor), None)  # type: ignore[arg-type]
                # so the portal of that name bound before it was closed (SQL CLOSE) -- unless a
                # portal record changed meanwhile: a Bind sent after the DECLARE is answered
                # after it, and the server may well hold that portal
                if run.declare_over == self._portal_changes:
                    name = d.cursor.encode(self.codec, "replace")  # type: ignore[union-attr]
                    if self._portals.pop(name, None) is not None:
                        self._portal_changes += 1
            if not run.denied and not run.hidden:
                self._settle_prepared(run.decision, None if succeeded else error, run.source)
            if run.counter_key is not None and (not run.binding
                                                or run.binding == self._unnamed_binds):
                self._counts[run.counter_key] = self._counts.get(run.counter_key, 0) + run.rows
            if not run.denied:
                name = "failed" if error and not withheld else self._decision_name(run.decision)
                if run.capped or blocked:  # a policy denial, not a failure of the statement
                    name = "blocked"
                self._audit(out, run, name, error=error)
                if self.count_statement is not None:
                    self.count_statement(name, run.decision.kind)
            slot.index += 1

    def _server_message(self, mtype: int, frame: bytes, out: Output) -> None:
        slot, run = self._current_run()
        if mtype == 0x5A:  # ReadyForQuery
            status = frame[5:6].decode()
            self.tx = TxStatus(status)
            self.state = ProtocolState.READY
            # pop up to and including the slot this ReadyForQuery closes
            barrier = False
            while self._slots:
                s = self._slots.popleft()
                barrier = s.barrier
                if self._reserved:
                    for r in s.runs:
                        if r.reserved:  # ended without a completion (an error before it)
                            self._release_run(r)
                if s.changes:
                    self._settle_changes(s.changes)
                if s.portal_changes is not None:
                    self._settle_portals(s.portal_changes)
                if s.kind in ("sync", "query", "inject"):
                    if s.started and self.observe_duration is not None:
                        self.observe_duration(self.clock() - s.started)
                    break
            window = self._copy_window
            if window and not self._copy_open and \
                    not any(s.opens_copy == window for s in self._slots):
                self._copy_window = self._copy_stray = 0  # its statement ended without COPY
            if self._abort_after_cap:
                self._abort_after_cap = False
                if status == "T" and all(s.kind == "hidden" for s in self._slots):
                    # The capped statement completed before our cancel landed, so the server's
                    # transaction is still good while the client got an error: make PostgreSQL
                    # fail it too (its error is swallowed; its ReadyForQuery says 'E').
                    msg = "row limit exceeded: transaction aborted by pgveil"
                    out.to_server.append(_frame(b"Q", raise_sql(DENY_SQLSTATE, msg)
                                                .encode("utf-8") + b"\x00"))
                    self._slots.append(_Slot("inject"))
                    self._slots[-1].barrier = barrier  # the held bytes wait for it instead
                    self._drop_server = True
                    self.state = ProtocolState.BUSY
                    return
            # the batch failed for the client: an error, or one pgveil put in (max_rows)
            failed = self._batch_error or self._drop_server
            self._drop_server = False
            self._swallow = 0
            self._batch_error = False
            if status == "I" and not self._slots and not self._bound_in_batch and \
                    not self._batch_portals:
                # the transaction ended, and with it every portal (WITH HOLD cursors are
                # SQL-level: self.cursors keeps them)
                self._portals.clear()
                self._portal_views.clear()
                self._portal_changes += 1
                self._portal_unsettled.clear()
            if not self._slots:
                self.state = ProtocolState.READY
            else:
                self.state = ProtocolState.BUSY
            if barrier:  # our own Sync (_hold_behind_sync): the client's bytes go now
                self._release_held(failed, out)
                return
            out.to_client.append(frame)
            return
        if mtype == 0x53:
            # ParameterStatus: recorded and passed on even while the rest of a request is
            # dropped (a SET next to a statement stopped at max_rows still took effect: the
            # lexer must read what follows as the server will, and so must the client)
            self._parameter_status(frame)
            out.to_client.append(frame)
            return
        if self._drop_server:
            if mtype == 0x43 and frame[5:8] in (b"DIS", b"DEA"):
                self._statements_dropped(frame[5:-1])  # DISCARD ALL / DEALLOCATE ALL ran
            if slot is not None and slot.kind in ("execute", "query") and \
                    mtype in (0x43, 0x49, 0x45, 0x73):
                if run is not None and not run.done and not run.denied and not run.hidden \
                        and mtype != 0x73:
                    # PostgreSQL ran a statement of the request after one pgveil stopped at
                    # max_rows (a pipelined batch runs on to its Sync): the client, told the
                    # request failed, gets none of it, but what it did happened -- audited
                    if mtype == 0x45:
                        fields = parse_error_fields(frame[5:])
                        note = f"{fields.get('C', '')}: {fields.get('M', '')}"
                    else:
                        note = WITHHELD_AFTER_CAP
                    self._finish_run(slot, run, out, error=note, withheld=mtype != 0x45)
                elif run is not None and slot.kind == "query":
                    slot.index += 1
                if slot.kind == "execute":
                    self._slots.popleft()
            return
        if mtype in (0x43, 0x73, 0x49):  # CommandComplete, PortalSuspended, EmptyQueryResponse
            if mtype == 0x43 and frame[5:8] in (b"DIS", b"DEA"):
                self._statements_dropped(frame[5:-1])  # DISCARD ALL / DEALLOCATE [ALL]
            if run is not None and run.capped:
                out.to_client.append(self._row_limit_error(run))
                self._finish_run(slot, run, out, error="row limit exceeded")  # type: ignore[arg-type]
                self._after_synthesized_error(slot)
                self._abort_after_cap = True
                return
            if run is not None and run.hidden:
                slot.index += 1  # type: ignore[union-attr]
                return
            if run is not None:
                tag = run.decision.command_tag
                if tag is not None and mtype == 0x43 and frame[5:12] == b"SELECT ":
                    # a data change pgveil wrapped into a SELECT (rewriters.analyze.cap_inside)
                    frame = _frame(b"C", tag.encode() + frame[11:])
                self._finish_run(slot, run, out)  # type: ignore[arg-type]
                if mtype == 0x43 and run.decision.kind == "copy" and \
                        self.state in (ProtocolState.COPY_IN, ProtocolState.COPY_OUT):
                    self.state = ProtocolState.BUSY
            elif slot is not None and slot.kind == "execute":
                slot.index += 1
            if slot is not None and slot.kind == "execute":
                self._slots.popleft()
            out.to_client.append(frame)
            return
        if mtype == 0x45:  # ErrorResponse
            self._batch_error = True
            if self.state is ProtocolState.COPY_IN:  # PostgreSQL left COPY mode
                self._copy_window = self._copy_open = 0
            fields = parse_error_fields(frame[5:])
            if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                self.server_fatal = True  # the server said why it ends the session
            if slot is not None and slot.converted and fields.get("C") in ("0A000", "26000"):
                # "cached plan must not change result type" after DDL: prepare afresh next
                # time. Our statement is gone (26000): something between pgveil and
                # PostgreSQL does not keep session state (a transaction-pooling PgBouncer):
                # stop preparing on this connection.
                self._forget_server_statements()
                if fields.get("C") == "26000":
                    self.server_prepare = False
                    log.warning("a statement pgveil prepared upstream disappeared; sending "
                                "rewritten statements as text on this connection (is a "
                                "transaction-pooling proxy between pgveil and PostgreSQL? "
                                "set upstream.prepare_rewritten: false)")
            if run is not None and run.capped:
                out.to_client.append(self._row_limit_error(run))
                self._finish_run(slot, run, out, error="row limit exceeded")  # type: ignore[arg-type]
            elif run is not None and run.denied:
                # our own DO-raise: forward without the PL/pgSQL context noise
                out.to_client.append(error_message(
                    fields.get("C", DENY_SQLSTATE), fields.get("M", ""),
                    hint=fields.get("H")))
                slot.index += 1  # type: ignore[union-attr]
            else:
                check = _check_failure(fields, run.decision.checks) \
                    if run is not None and run.decision.checks else None
                if check is not None:  # a check pgveil wrote into the statement: a denial
                    if run is not None:
                        self._finish_run(slot, run, out,  # type: ignore[arg-type]
                                         error=check, blocked=True)
                    out.to_client.append(error_message(DENY_SQLSTATE, check))
                else:
                    if run is not None:
                        self._finish_run(slot, run, out,  # type: ignore[arg-type]
                                         error=f"{fields.get('C', '')}: {fields.get('M', '')}")
                    out.to_client.append(self._scrub_error(frame, fields))
            if slot is not None:
                slot.failed = True
                # after an error the server skips the rest: drop our remaining executes
                if slot.kind == "execute":
                    while self._slots and self._slots[0].kind == "execute":
                        self._slots.popleft()
                elif slot.kind == "query":
                    for skipped in slot.runs[slot.index:]:  # a PREPARE skipped made nothing
                        if skipped.decision.kind == "prepare" and not skipped.denied:
                            self._settle_prepared(skipped.decision, "skipped", skipped.source)
                    slot.index = len(slot.runs)
            return
        if mtype == 0x47:  # CopyInResponse
            self.state = ProtocolState.COPY_IN
            self._copy_began(slot)
        elif mtype == 0x48:  # CopyOutResponse
            self.state = ProtocolState.COPY_OUT
        elif mtype == 0x57:  # CopyBothResponse
            self.state = ProtocolState.COPY_BOTH
        elif mtype == 0x64 and run is not None and self.state is ProtocolState.COPY_OUT:
            run.rows += 1
        elif mtype == 0x63 and self.state is ProtocolState.COPY_OUT:  # CopyDone
            self.state = ProtocolState.BUSY
        out.to_client.append(frame)

    def _copy_began(self, slot: _Slot | None) -> None:
        """CopyInResponse: PostgreSQL now reads the client's stream in COPY mode. The Syncs the
        client sent after the COPY statement (before its CopyDone/CopyFail) are ignored there:
        they get no ReadyForQuery, so their slots go. A Query/Parse/Bind/Execute sent in that
        stretch fails the COPY and is consumed without an answer of its own: rather than
        guess what PostgreSQL made of it, the session ends."""
        window = slot.opens_copy if slot is not None else 0
        later = list(self._slots)[1:]
        if not window:  # a COPY pgveil did not foresee
            if later:
                raise ProtocolViolation("requests pipelined behind an unforeseen COPY FROM "
                                        "STDIN")
            self._copy_epoch += 1
            self._copy_window = self._copy_open = self._copy_epoch
            return
        if self._copy_stray == window:
            raise ProtocolViolation("statements sent inside COPY FROM STDIN data")
        if any(s.in_copy == window for s in later):
            kept = [s for s in self._slots if s.in_copy != window or s is slot]
            self._slots.clear()
            self._slots.extend(kept)
        if self._copy_window == window:  # the client has not ended the data yet
            self._copy_open = window

    def _scrub_error(self, frame: bytes, fields: dict[str, str]) -> bytes:
        """PostgreSQL's DETAIL of integrity and data errors quotes the raw row or key values
        ("Failing row contains (3, 李超, 18600314187, …)", "Key (id)=(1) already exists"), read
        below the mask. Restricted roles get the error without that detail."""
        detail = fields.get("D")
        if detail is None or self.view.unrestricted:
            return frame
        code = fields.get("C", "")
        if not (code.startswith(("22", "23")) or "Failing row contains" in detail
                or "Key (" in detail):
            return frame
        keep = {k: v for k, v in fields.items() if k != "D"}
        keep["D"] = "detail withheld by pgveil: it would show values the policy masks"
        body = b"".join(k.encode() + v.encode("utf-8") + b"\x00" for k, v in keep.items())
        return _frame(b"E", body + b"\x00")

    def _row_limit_error(self, run: _StatementRun) -> bytes:
        what = ", ".join(run.decision.tables) or "protected data"
        if run.quota_capped and self.operator is not None:
            return error_message(
                DENY_SQLSTATE, self.operator.quota_message(self.view),
                detail=f"the statement read more rows of {what} than the quota had left; "
                       "rows beyond it were not sent",
                hint="ask for a grant that lifts the quota")
        limit = run.decision.row_limit
        return error_message(
            DENY_SQLSTATE, f"row limit of {limit} exceeded for role {self.view.role}",
            detail=f"the statement read more than {limit} rows of {what}; "
                   "rows beyond the limit were not sent",
            hint="narrow the query with a WHERE clause or LIMIT, or ask for a grant")

    def _after_synthesized_error(self, slot: _Slot | None) -> None:
        """We replaced a successful completion with an error: the client now expects the rest of
        the batch (extended) or the rest of the query (simple) to be skipped."""
        if slot is None:
            return
        slot.failed = True
        if slot.kind == "execute":
            self._slots.popleft()
            # the server will still answer the client's remaining batch messages: drop them
            self._drop_server = True
        elif slot.kind == "query":
            self._drop_server = True  # the rest of its runs are still audited as they end

    def _parameter_status(self, frame: bytes) -> None:
        payload = frame[5:]
        name, pos = _cstr(payload, 0)
        value, _ = _cstr(payload, pos)
        self._on_parameter(name.decode("latin-1"), value.decode("latin-1"))

    def _on_parameter(self, name: str, value: str) -> None:
        self.parameters[name] = value
        if name == "client_encoding":
            self.lex = LexSettings(self.lex.standard_conforming_strings, value)
            self.codec = python_codec(value) or "utf-8"
        elif name == "standard_conforming_strings":
            self.lex = LexSettings(value == "on", self.lex.client_encoding)


def _is_deallocate(st: StatementDecision) -> bool:
    return st.kind == "utility" and _DEALLOCATE.match(st.sql) is not None


class ProtocolViolation(Exception):
    """The client sent bytes that are not a valid protocol 3.0 message stream."""


_HIDDEN = StatementDecision(action=Action.FORWARD, sql="", kind="utility")
HOLD_LIMIT = 16 * 1024 * 1024  # bytes of one statement's result held for strict durability
WITHHELD_RESULT = error_response(
    "ERROR", DENY_SQLSTATE, "result withheld: its audit record could not be written",
    hint="audit.durability: strict releases no result without its record; the audit sink is "
         "failing (see pgveil's log and pgveil_audit_failures_total)")


def _force_changed(analysis: Analysis) -> Analysis:
    """Mark an analysis as changed so its SQL (with pgveil's prefix) is what gets sent."""
    if analysis.changed:
        return analysis
    first, *rest = analysis.statements
    import dataclasses

    return dataclasses.replace(analysis, statements=(
        dataclasses.replace(first, action=Action.REWRITE), *rest))


def _statements_before(statements: Sequence[StatementDecision], denied: StatementDecision
                       ) -> tuple[StatementDecision, ...]:
    """The statements of a simple Query ahead of its (first) refused one, when they may run:
    none is refused, and none is an EXECUTE (a SQL-level prepared statement may need preparing
    again under rules changed since, which _on_query does only for a request it forwards)."""
    for i, st in enumerate(statements):
        if st is denied:
            ahead = tuple(statements[:i])
            ok = all(a.action is not Action.DENY and a.kind != "execute" for a in ahead)
            return ahead if ok else ()
    return ()


def _split_sources(sql: str, count: int) -> list[str] | None:
    """The client's text of each statement of a multi-statement Query (for audit records),
    split with the rewriter's lexer; None when the split does not match the analysis."""
    from rewriters.lexer import split_statements

    try:
        spans = split_statements(sql)
    except Exception:  # noqa: BLE001 - fall back to the decision's text
        return None
    texts = [sql[sp.start:sp.end].strip() for sp in spans]
    texts = [t for t in texts if t and t != ";"]
    return texts if len(texts) == count else None


def _within_hours(hours: tuple[str, str], tz: str, now: float) -> bool:
    import datetime
    import zoneinfo

    local = datetime.datetime.fromtimestamp(now, zoneinfo.ZoneInfo(tz)).time()
    start = datetime.time.fromisoformat(hours[0])
    end = datetime.time.fromisoformat(hours[1])
    if start <= end:
        return start <= local < end
    return local >= start or local < end
