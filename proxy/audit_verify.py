"""``pgveil audit verify``, ``pgveil audit search`` and ``pgveil keygen``.

Verification reads a log — one file, a rotated series, a directory, a glob, or the PostgreSQL
audit table — record by record, in order, and checks (see :mod:`proxy.audit` for the format):

1. each line: it is JSON whose last member is ``"hash"``, and that hash is the SHA-256 of the
   bytes before it (closed with ``}``) — the canonical JSON the writer produced; from the table
   the hash is recomputed over the canonical JSON of the stored record;
2. each chain (records are grouped by ``chain``, so workers sharing a file or table verify
   independently): ``seq`` increases by one and ``prev`` is the previous record's hash, across
   rotated files too; a chain begins with its signed ``start`` checkpoint (or, in the first
   file given, anywhere: older files may have been pruned — reported as *partial*);
3. each checkpoint: its Ed25519 signature (key given with ``--key``), that ``head`` is the
   hash before it and ``count`` the records since the previous checkpoint;
4. the end of each chain: records after the last checkpoint are an *unverified tail* (a forger
   who can write the file can re-hash them); they are reported, and verification FAILS as
   ``truncated-tail`` when the tail breaks the checkpoint cadence (more than ``every`` records,
   or a record ``seconds`` after the last checkpoint: a checkpoint that must have been there
   was cut and the tail re-hashed), when a file ends in a torn line that no later signed
   checkpoint acknowledges, when a segment that the chain restarts after (a new seq-0
   ``start`` under the same chain id) lacks its final checkpoint (its end was cut, or pgveil
   was killed and its file archived), or, with ``--closed``, when a chain lacks its final
   checkpoint.

The first failure is classified precisely, using a look-ahead of up to 512 records per chain:
``edited`` (content or hash changed; or a record whose hash was recomputed, found through its
successor), ``removed`` (a gap in ``seq``), ``reordered`` (a gap whose missing record comes
later), ``inserted`` (a duplicate ``seq``, a copy, a forged record or chain, a record after a
final checkpoint), ``bad-signature``, ``truncated-tail``. What stays undetectable without an
external anchor: cutting whole records after the last checkpoint of a chain that is still
being written (at most ``every`` records / ``seconds`` of them) — ship the log off the host
(PostgreSQL sink) or use ``--closed`` on archived logs. Earlier segments of a chain are no
longer written, so their ends are held to the ``--closed`` rule always.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import enum
import fcntl
import glob
import hashlib
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.audit import CHECKPOINT, GENESIS, checkpoint_message, record_hash
from proxy.audit_sinks import (
    base_of,
    format_ts,
    parse_ts,
    qualified,
    rotated_siblings,
    series_paths,
)
from proxy.keys import (
    KeyFileError,
    generate_keypair,
    key_fingerprint,
    load_public_key,
)

KeySpec = Path | str | Ed25519PublicKey | Sequence[Path | str | Ed25519PublicKey] | None
LOOKAHEAD = 512
CADENCE_SLACK = 1.0  # seconds of clock/rounding tolerance in the time rule
_HASH_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")  # fixed width: compares as text


class What(str, enum.Enum):
    """The kinds of damage ``verify`` reports."""

    EDITED = "edited"
    REMOVED = "removed"
    INSERTED = "inserted"
    REORDERED = "reordered"
    TRUNCATED_TAIL = "truncated-tail"
    BAD_SIGNATURE = "bad-signature"


@dataclass(frozen=True)
class VerifyError:
    """Where the log is broken: file, 1-based line (row for a table), the record's seq."""

    file: str
    line: int
    seq: int | None
    what: str
    message: str
    chain: str | None = None
    order: tuple[int, int] = (0, 0)  # (file index, line): sorts errors by position

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        who = f" (chain {self.chain}, seq {self.seq})" if self.chain is not None else ""
        return f"{where}{who}: {self.what}: {self.message}"


@dataclass(frozen=True)
class ChainSummary:
    chain: str
    first_seq: int
    last_seq: int
    records: int
    checkpoints: int
    unverified_tail: int  # statement records after the last (signed) checkpoint
    closed: bool  # ends with its final checkpoint
    partial: bool  # starts after seq 0 (older files not given)
    segments: int  # restarts under the same chain id without a resume


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # statement records (checkpoints not counted)
    chains: int
    checkpoints: int
    first_error: VerifyError | None
    errors: tuple[VerifyError, ...] = ()
    signed: bool = False  # signatures were checked with a public key
    key: str | None = None  # fingerprint of that key
    files: tuple[str, ...] = ()
    chain_summaries: tuple[ChainSummary, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        if self.first_error is not None:
            return f"FAIL {self.first_error}"
        sig = (f"signatures verified with key {self.key}" if self.signed
               else "signatures NOT checked (no --key): a forger could recompute the chain")
        return (f"OK {len(self.files)} file(s), {self.chains} chain(s), {self.records} records, "
                f"{self.checkpoints} checkpoints; {sig}")


# ---------------------------------------------------------------------------------------------
# Reading records.


@dataclass(slots=True)
class _Rec:
    """One parsed record, small enough to keep a window of them per chain."""

    order: tuple[int, int]
    file: str
    line: int
    chain: str
    seq: int
    prev: str
    hash: str
    ts: str
    first_file: bool  # in the first file of its series (a partial chain may start here)
    cp: dict[str, Any] | None = None  # the whole record for checkpoints


@dataclass(slots=True)
class _Bad:
    """A line that is not a record; acknowledged torn lines are excused."""

    order: tuple[int, int]
    file: str
    line: int
    sha256: str
    length: int
    at_eof: bool  # the last line of its file, without a newline
    message: str


def resolve_paths(specs: Iterable[str | Path]) -> list[Path]:
    """Files to read, in series order: a file (plus its rotated siblings when it is the current
    file), a rotated file alone, a directory (all ``*.jsonl`` in it) or a glob."""
    files: list[Path] = []
    for spec in specs:
        text = str(spec)
        p = Path(text)
        if any(ch in text for ch in "*?["):
            matched = [Path(m) for m in glob.glob(text)]
            if not matched:
                raise FileNotFoundError(f"no file matches {text}")
            files += [m for m in matched if m.is_file()]
        elif p.is_dir():
            files += [f for f in p.iterdir() if f.is_file() and f.name.endswith(".jsonl")
                      and not f.name.startswith(".")]
        elif p.is_file():
            if base_of(p)[1] == "~":
                files += [*rotated_siblings(p), p]
            else:
                files.append(p)
        else:
            siblings = rotated_siblings(p)
            if not siblings:
                raise FileNotFoundError(f"{text}: no such file")
            files += siblings
    return series_paths(files)


def _read_file(path: Path, index: int, first_file: bool) -> Iterator[_Rec | _Bad | VerifyError]:
    """Parse a file up to its size when opened, taken under a shared lock.

    A writer appends each group under an exclusive flock; taking the shared lock once (then
    releasing it) waits out a group being written, so a live log never shows a half-written
    last line that is merely still in flight.
    """
    name = str(path)
    with open(path, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        try:
            size = os.fstat(fh.fileno()).st_size
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        lineno = 0
        pos = 0
        for raw in fh:
            if pos >= size:
                break
            if pos + len(raw) > size:
                raw = raw[: size - pos]
            pos += len(raw)
            lineno += 1
            at_eof = not raw.endswith(b"\n")
            body = raw[:-1] if not at_eof else raw
            yield _parse_line(body, name, lineno, index, first_file, at_eof)


def _bad(body: bytes, name: str, lineno: int, index: int, at_eof: bool, message: str) -> _Bad:
    return _Bad((index, lineno), name, lineno, hashlib.sha256(body).hexdigest(), len(body),
                at_eof, message)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_line(body: bytes, name: str, lineno: int, index: int, first_file: bool,
                at_eof: bool) -> _Rec | _Bad | VerifyError:
    try:
        rec = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return _bad(body, name, lineno, index, at_eof, "not a JSON record (torn or damaged)")
    if at_eof:  # complete JSON but the newline is missing: the write was cut right there
        return _bad(body, name, lineno, index, at_eof, "last line has no newline (cut)")
    if not isinstance(rec, dict):
        return _bad(body, name, lineno, index, at_eof, "not a JSON object")
    m = _HASH_TAIL.search(body)
    err = _check_fields(rec, name, lineno, index)
    if err is not None:
        return err
    if m is None or m.group(1).decode() != rec["hash"]:
        return _error(name, lineno, index, rec, What.EDITED,
                      "the line does not end with its hash (not as pgveil wrote it)")
    digest = hashlib.sha256(body[: m.start()] + b"}").hexdigest()
    if digest != rec["hash"]:
        return _error(name, lineno, index, rec, What.EDITED,
                      "content does not match its hash (the record was altered)")
    return _rec(rec, name, lineno, index, first_file)


def _parse_stored(text: str, name: str, row: int) -> _Rec | VerifyError:
    """A record from the PostgreSQL table: jsonb reorders keys, so recompute the canonical hash."""
    try:
        rec = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return VerifyError(name, row, None, What.EDITED.value, "not JSON", order=(0, row))
    if not isinstance(rec, dict):
        return VerifyError(name, row, None, What.EDITED.value, "not a JSON object", order=(0, row))
    err = _check_fields(rec, name, row, 0)
    if err is not None:
        return err
    if record_hash(rec) != rec["hash"]:
        return _error(name, row, 0, rec, What.EDITED,
                      "content does not match its hash (the record was altered)")
    return _rec(rec, name, row, 0, True)


def _check_fields(rec: dict[str, Any], name: str, lineno: int, index: int) -> VerifyError | None:
    seq, chain, prev, h, ts = (rec.get(k) for k in ("seq", "chain", "prev", "hash", "ts"))
    problems = []
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        problems.append("seq")
    if not isinstance(chain, str) or not chain:
        problems.append("chain")
    if not isinstance(prev, str) or not _HEX64.match(prev):
        problems.append("prev")
    if not isinstance(h, str) or not _HEX64.match(h):
        problems.append("hash")
    if not isinstance(ts, str) or not _TS.match(ts):
        problems.append("ts")
    if problems:
        return _error(name, lineno, index, rec, What.EDITED,
                      f"not a pgveil audit record (bad {', '.join(problems)})")
    return None


def _error(name: str, lineno: int, index: int, rec: dict[str, Any], what: What,
           message: str) -> VerifyError:
    seq = rec.get("seq") if isinstance(rec.get("seq"), int) else None
    chain = rec.get("chain") if isinstance(rec.get("chain"), str) else None
    return VerifyError(name, lineno, seq, what.value, message, chain, (index, lineno))


def _rec(rec: dict[str, Any], name: str, lineno: int, index: int, first_file: bool) -> _Rec:
    return _Rec((index, lineno), name, lineno, rec["chain"], rec["seq"], rec["prev"],
                rec["hash"], rec["ts"], first_file,
                rec if rec.get("kind") == CHECKPOINT else None)


# ---------------------------------------------------------------------------------------------
# Checking chains.


@dataclass
class _Chain:
    name: str
    buf: deque[_Rec | VerifyError] = field(default_factory=deque)
    started: bool = False
    partial: bool = False
    expected: int = 0
    last_hash: str = GENESIS
    last_prev: str = GENESIS
    last: _Rec | None = None
    first_seq: int = 0
    records: int = 0
    checkpoints: int = 0
    since_cp: int = 0
    last_cp: dict[str, Any] | None = None
    late_after: str | None = None  # a tail record with ts >= this is late (time rule)
    over: _Rec | None = None  # first tail record beyond the count cadence
    late: _Rec | None = None  # first tail record beyond the time cadence
    closed: bool = False
    segments: int = 1
    starts: set[str] = field(default_factory=set)
    error: VerifyError | None = None


class _Verifier:
    def __init__(self, keys: Sequence[Ed25519PublicKey], *, closed: bool,
                 require_genesis: bool) -> None:
        self.keys = {key_fingerprint(k): k for k in keys}
        self.key = keys[0] if keys else None
        self.key_id = ", ".join(self.keys) if keys else None
        self.require_closed = closed
        self.require_genesis = require_genesis
        self.chains: dict[str, _Chain] = {}
        self.errors: list[VerifyError] = []
        self.bad: list[_Bad] = []
        self.acks: list[tuple[tuple[str, int], tuple[int, int]]] = []  # (sha, bytes), where
        self.notes: list[str] = []
        self.unsigned_seen = False

    # feeding
    def feed(self, item: _Rec | _Bad | VerifyError) -> None:
        if isinstance(item, VerifyError):
            st = self.chains.get(item.chain) if item.chain is not None else None
            if st is None:
                self.errors.append(item)
            elif st.error is None:
                st.buf.append(item)  # fails the chain in order, after what is buffered
            return
        if isinstance(item, _Bad):
            self.bad.append(item)
            return
        st = self.chains.get(item.chain)
        if st is None:
            st = self.chains[item.chain] = _Chain(item.chain)
        if st.error is not None:
            return
        st.buf.append(item)
        if len(st.buf) > LOOKAHEAD:
            self._safe_step(st, st.buf.popleft())

    def finish(self) -> None:
        for st in self.chains.values():
            while st.buf and st.error is None:
                self._safe_step(st, st.buf.popleft())
            if st.error is None:
                self._end_segment(st)
        # each acknowledgement excuses one torn line: the nearest one before it
        excused: set[int] = set()
        for key, where in self.acks:
            match = [i for i, b in enumerate(self.bad)
                     if (b.sha256, b.length) == key and b.order < where and i not in excused]
            if match:
                excused.add(match[-1])
        for i, bad in enumerate(self.bad):
            if i in excused:
                self.notes.append(f"{bad.file}:{bad.line}: torn line of {bad.length} bytes, "
                                  "acknowledged by a signed checkpoint (crash or full disk)")
                continue
            what = What.TRUNCATED_TAIL if bad.at_eof else What.EDITED
            self.errors.append(VerifyError(bad.file, bad.line, None, what.value, bad.message,
                                           None, bad.order))

    def _fail(self, st: _Chain, err: VerifyError) -> None:
        if st.error is None:
            st.error = err
            self.errors.append(err)
            st.buf.clear()

    def _err(self, st: _Chain, r: _Rec, what: What, message: str, seq: int | None = None) -> None:
        self._fail(st, VerifyError(r.file, r.line, r.seq if seq is None else seq, what.value,
                                   message, st.name, r.order))

    # the state machine
    def _safe_step(self, st: _Chain, r: _Rec | VerifyError) -> None:
        """A hostile file must produce a report, never a crash of the verifier."""
        try:
            self._step(st, r)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            if isinstance(r, _Rec):
                self._err(st, r, What.EDITED, f"malformed record fields ({exc})")
            else:  # pragma: no cover
                raise

    def _step(self, st: _Chain, r: _Rec | VerifyError) -> None:
        if isinstance(r, VerifyError):
            self._fail(st, r)
            return
        if not st.started:
            self._begin(st, r)
            return
        if r.seq == st.expected and r.prev == st.last_hash:
            self._accept(st, r)
            return
        if r.seq == 0 and r.prev == GENESIS and r.cp is not None:
            if r.hash in st.starts:
                self._err(st, r, What.INSERTED, "a copy of this chain's start checkpoint")
                return
            last = st.last
            if last is not None and r.ts < last.ts:
                # a chain restarts later than it stopped: a segment stamped earlier than the
                # one before it was moved (a partial first segment followed by the chain's
                # beginning hides whatever lay between them)
                self._err(st, r, What.REORDERED,
                          f"the chain restarts at seq 0 stamped {r.ts}, before the end of the "
                          f"segment before it ({last.file}:{last.line}, {last.ts}): segments "
                          "were moved")
                return
            self._end_segment(st, restart=r)
            if st.error is None:
                st.segments += 1
                self._begin(st, r)
            return
        ahead = [a for a in st.buf if isinstance(a, _Rec)]
        if r.seq > st.expected:
            later = next((a for a in ahead if a.seq == st.expected and a.prev == st.last_hash),
                         None)
            if later is not None:
                self._err(st, r, What.REORDERED,
                          f"seq {r.seq} comes before seq {st.expected} ({later.file}:{later.line})")
            else:
                missing = (f"seq {st.expected}" if r.seq == st.expected + 1
                           else f"seq {st.expected}..{r.seq - 1}")
                self._err(st, r, What.REMOVED,
                          f"{missing} missing: the chain jumps from seq {st.expected - 1} to "
                          f"{r.seq} here", seq=st.expected)
        elif r.seq < st.expected:
            last = st.last
            if (last is not None and r.seq == last.seq and r.prev == st.last_prev and ahead
                    and ahead[0].prev == r.hash):
                self._err(st, last, What.INSERTED,
                          f"forged record: the chain continues from the other seq {r.seq} "
                          f"({r.file}:{r.line}), not from this one")
            else:
                self._err(st, r, What.INSERTED,
                          f"seq {r.seq} again after seq {st.expected - 1} (a copied or forged "
                          "record)")
        else:  # right seq, wrong prev
            genuine = next((a for a in ahead if a.seq == r.seq and a.prev == st.last_hash), None)
            if genuine is not None or st.last is None:
                self._err(st, r, What.INSERTED,
                          "forged record: its prev does not match the record before it")
            else:
                self._err(st, st.last, What.EDITED,
                          f"record altered and re-hashed: the next record ({r.file}:{r.line}) "
                          "still names its original hash")

    def _begin(self, st: _Chain, r: _Rec) -> None:
        st.started = True
        if r.seq == 0 and r.prev == GENESIS:
            if r.cp is None or str(r.cp.get("reason", "")).split(",")[0] != "start":
                self._err(st, r, What.INSERTED,
                          "a chain must begin with its start checkpoint (forged chain?)")
                return
            st.starts.add(r.hash)
        elif r.first_file and not self.require_genesis:
            st.partial = True
            self.notes.append(f"chain {st.name} starts at seq {r.seq} ({r.file}:{r.line}): "
                              "its earlier records are in files not given (or pruned)")
        else:
            self._err(st, r, What.REMOVED,
                      f"chain first appears at seq {r.seq}: its earlier records are missing")
            return
        if st.segments == 1:
            st.first_seq = r.seq
        st.expected = r.seq  # _accept advances it
        st.last_hash = r.prev
        st.last_cp = st.late_after = st.over = st.late = None
        st.since_cp = 0
        st.closed = False
        self._accept(st, r)

    def _accept(self, st: _Chain, r: _Rec) -> None:
        cp = r.cp
        if cp is not None:
            if not self._check_checkpoint(st, r, cp):
                return
            st.checkpoints += 1
            st.since_cp = 0
            st.last_cp = cp
            st.over = st.late = None
            seconds = cp.get("seconds")
            st.late_after = None
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
                with contextlib.suppress(ValueError, OverflowError):
                    st.late_after = format_ts(parse_ts(r.ts)
                                              + timedelta(seconds=seconds + CADENCE_SLACK))
            reason = str(cp.get("reason", ""))
            if cp.get("final") is True:
                st.closed = True
            elif "resume" in reason.split(","):
                st.closed = False
            torn = cp.get("torn")
            for ack in torn if isinstance(torn, list) else ():
                if isinstance(ack, dict) and isinstance(ack.get("bytes"), int):
                    self.acks.append(((str(ack.get("sha256")), ack["bytes"]), r.order))
        else:
            if st.closed:
                self._err(st, r, What.INSERTED, "record after the chain's final checkpoint")
                return
            st.records += 1
            st.since_cp += 1
            every = st.last_cp.get("every") if st.last_cp else None
            if st.over is None and isinstance(every, int) and st.since_cp > every:
                st.over = r
            if st.late is None and st.late_after is not None and r.ts >= st.late_after:
                st.late = r
        st.expected = r.seq + 1
        st.last_prev = r.prev
        st.last_hash = r.hash
        st.last = r

    def _check_checkpoint(self, st: _Chain, r: _Rec, cp: dict[str, Any]) -> bool:
        if cp.get("head") != r.prev:
            self._err(st, r, What.EDITED, "checkpoint head is not the hash before it")
            return False
        count = cp.get("count")
        if st.last_cp is not None and count is not None and count != st.since_cp:
            self._err(st, r, What.EDITED, f"checkpoint says {count} records since the previous "
                      f"checkpoint; the file has {st.since_cp}")
            return False
        sig = cp.get("sig")
        if self.key is None:
            if not sig:
                self.unsigned_seen = True
            return True
        if not isinstance(sig, str) or not sig:
            self._err(st, r, What.BAD_SIGNATURE, "checkpoint is unsigned but a key was given")
            return False
        key = self.keys.get(str(cp.get("key"))) if len(self.keys) > 1 else self.key
        if key is None or cp.get("key") not in (None, *self.keys):
            self._err(st, r, What.BAD_SIGNATURE,
                      f"signed by key {cp.get('key')}, not by the given key {self.key_id}")
            return False
        try:
            key.verify(base64.b64decode(sig, validate=True), checkpoint_message(cp))
        except (InvalidSignature, ValueError):
            self._err(st, r, What.BAD_SIGNATURE,
                      "signature does not match: this checkpoint or a record before it was "
                      "altered and the chain re-hashed")
            return False
        return True

    def _end_segment(self, st: _Chain, *, restart: _Rec | None = None) -> None:
        """Apply the cadence rules to the records after the segment's last checkpoint, and
        check how it ends: a segment the chain restarts after (``restart``: its new seq-0
        start) is finished, so it must end with its final checkpoint; the last segment only
        with ``--closed``."""
        final = restart is None
        cp = st.last_cp
        if not final and self.key is not None and st.since_cp and st.last is not None:
            # the chain restarts at seq 0 after them: no later checkpoint of theirs can exist,
            # so no signature covers them (a writer that can resume always does, and its
            # resume checkpoint vouches for them)
            self._err(st, st.last, What.INSERTED,
                      f"{st.since_cp} record(s) after the last signed checkpoint before the "
                      "chain restarts at seq 0: no signature covers them (forged, or the "
                      "writer crashed and could not resume the chain)")
            return
        if st.over is not None and cp is not None:
            self._err(st, st.over, What.TRUNCATED_TAIL,
                      f"more than {cp.get('every')} records after the last checkpoint: a "
                      "checkpoint was cut away and the tail re-hashed")
        elif st.late is not None and cp is not None:
            self._err(st, st.late, What.TRUNCATED_TAIL,
                      f"record stamped over {cp.get('seconds')} s after the last checkpoint "
                      f"with no checkpoint in between: the tail was cut and re-hashed")
        elif cp is None and st.last is not None and self.key is not None:
            self._err(st, st.last, What.INSERTED,
                      "no signed checkpoint covers any record of this chain")
        elif final and self.require_closed and not st.closed and st.last is not None:
            self._err(st, st.last, What.TRUNCATED_TAIL,
                      "the chain ends without its final checkpoint (cut, or the writer crashed)")
        elif restart is not None and not st.closed and st.last is not None:
            # A clean stop always writes the final checkpoint, and a writer that finds its
            # chain resumes it instead of restarting, so an honest segment before a restart
            # ends closed. One that ends at an earlier checkpoint had its last records and
            # final checkpoint cut away -- the chain still links and the cadence holds up to
            # there, so nothing else shows it -- or pgveil was killed and its file archived
            # before it could resume. Both need explaining, even without --closed: the
            # segment is no longer being written, so its end is not the live-log gap.
            self._err(st, st.last, What.TRUNCATED_TAIL,
                      f"the segment ends without its closing checkpoint before the chain "
                      f"restarts at seq 0 ({restart.file}:{restart.line}): records were cut "
                      "from its end, or pgveil was killed and its log archived before it "
                      "could resume")

    # results
    def summaries(self) -> list[ChainSummary]:
        out = []
        for st in self.chains.values():
            last_seq = st.last.seq if st.last is not None else st.first_seq
            out.append(ChainSummary(st.name, st.first_seq, last_seq, st.records,
                                    st.checkpoints, st.since_cp, st.closed, st.partial,
                                    st.segments))
        return out


def verify_records(items: Iterable[_Rec | _Bad | VerifyError], *,
                   pub_key: KeySpec, files: Sequence[str] = (),
                   closed: bool = False, require_genesis: bool = False) -> VerifyResult:
    keys = _load_keys(pub_key)
    key = keys[0] if keys else None
    v = _Verifier(keys, closed=closed, require_genesis=require_genesis)
    for item in items:
        v.feed(item)
    v.finish()
    errors = sorted(v.errors, key=lambda e: e.order)
    sums = v.summaries()
    notes = list(v.notes)
    for s in sums:
        if s.unverified_tail:
            notes.append(f"chain {s.chain}: {s.unverified_tail} record(s) after the last "
                         f"checkpoint (seq ..{s.last_seq}) are protected by the hash chain only")
    if key is None:
        notes.append("signatures not checked: give --key DIR/audit.pub")
    elif v.unsigned_seen:  # pragma: no cover - with a key unsigned checkpoints are errors
        notes.append("unsigned checkpoints")
    return VerifyResult(
        ok=not errors, records=sum(s.records for s in sums), chains=len(sums),
        checkpoints=sum(s.checkpoints for s in sums),
        first_error=errors[0] if errors else None, errors=tuple(errors),
        signed=key is not None, key=v.key_id, files=tuple(files),
        chain_summaries=tuple(sums), notes=tuple(notes))


def _load_keys(spec: KeySpec) -> list[Ed25519PublicKey]:
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, Path, Ed25519PublicKey)) else list(spec)
    return [k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in items]


def verify_paths(paths: Sequence[Path | str], pub_key: KeySpec = None, *,
                 closed: bool = False, require_genesis: bool = False) -> VerifyResult:
    """Verify a file, a rotated series, a directory or a glob (see :func:`resolve_paths`)."""
    files = resolve_paths(paths)
    if not files:
        raise FileNotFoundError("no audit files found")

    def items() -> Iterator[_Rec | _Bad | VerifyError]:
        seen_bases: set[str] = set()
        for index, path in enumerate(files):
            base = str(base_of(path)[0])
            first = base not in seen_bases
            seen_bases.add(base)
            yield from _read_file(path, index, first)

    return verify_records(items(), pub_key=pub_key, files=[str(f) for f in files],
                          closed=closed, require_genesis=require_genesis)


async def fetch_table(dsn: str, table: str, query_tail: str = "ORDER BY chain, seq",
                      args: Sequence[Any] = ()) -> list[str]:
    """The records of the PostgreSQL audit table as JSON texts."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(f"SELECT record::text FROM {qualified(table)} {query_tail}",
                                *args)
        return [r[0] for r in rows]
    finally:
        await conn.close()


def verify_table(dsn: str, table: str, pub_key: KeySpec = None, *,
                 closed: bool = False) -> VerifyResult:
    """Verify the PostgreSQL sink (order is by chain and seq; reordering cannot exist there).

    Reads in keyset-paginated chunks so memory stays bounded on a large table. Must be called
    where no event loop is running (the CLI; tests use a thread).
    """
    return verify_records(_table_items(dsn, table), pub_key=pub_key, files=[table],
                          closed=closed)


def _table_items(dsn: str, table: str, chunk: int = 5000) -> Iterator[_Rec | VerifyError]:
    import asyncpg

    loop = asyncio.new_event_loop()
    try:
        conn = loop.run_until_complete(asyncpg.connect(dsn, timeout=10))
        try:
            query = (f"SELECT chain, seq, record::text FROM {qualified(table)} "
                     "WHERE (chain, seq) > ($1, $2) ORDER BY chain, seq LIMIT $3")
            after: tuple[str, int] = ("", -1)
            row_no = 0
            while True:
                rows = loop.run_until_complete(conn.fetch(query, after[0], after[1], chunk))
                for row in rows:
                    row_no += 1
                    yield _parse_stored(row[2], table, row_no)
                if len(rows) < chunk:
                    return
                after = (rows[-1][0], rows[-1][1])
        finally:
            loop.run_until_complete(conn.close())
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------------
# Search.


@dataclass(frozen=True)
class SearchFilter:
    login: str | None = None
    role: str | None = None
    table: str | None = None
    decisions: tuple[str, ...] = ()
    kind: str | None = None
    session: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    checkpoints: bool = False

    def matches(self, rec: dict[str, Any]) -> bool:
        if rec.get("kind") == CHECKPOINT and not self.checkpoints:
            return False
        if self.login is not None and rec.get("operator") != self.login:
            return False
        if self.role is not None and rec.get("role") != self.role:
            return False
        if self.decisions and rec.get("decision") not in self.decisions:
            return False
        if self.kind is not None and rec.get("kind") != self.kind:
            return False
        if self.session is not None and rec.get("session") != self.session:
            return False
        if self.table is not None and not any(
                table_matches(t, self.table) for t in rec.get("tables") or ()
                if isinstance(t, str)):
            return False
        if self.since is not None or self.until is not None:
            try:
                ts = parse_ts(str(rec.get("ts")))
            except ValueError:
                return False
            if self.since is not None and ts < self.since:
                return False
            if self.until is not None and ts >= self.until:
                return False
        return True


def table_matches(name: str, wanted: str) -> bool:
    """``customers`` matches ``public.customers``; a qualified name must match exactly."""
    name, wanted = name.lower(), wanted.lower()
    return name == wanted or ("." not in wanted and name.endswith("." + wanted))


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``1h``/``30m``/``2d``/``1w`` ago, or an ISO date/time (naive means UTC)."""
    m = _RELATIVE.match(text)
    if m:
        now = now or datetime.now(timezone.utc)
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"bad time {text!r}: use ISO (2026-11-23T09:00, +08:00 allowed) "
                         "or a relative age like 30m, 1h, 2d") from exc
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


def search_files(paths: Sequence[Path | str], flt: SearchFilter) -> Iterator[dict[str, Any]]:
    for path in resolve_paths(paths):
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except (ValueError, RecursionError):
                    continue
                if isinstance(rec, dict) and flt.matches(rec):
                    yield rec


async def search_table(dsn: str, table: str, flt: SearchFilter,
                       limit: int | None = None) -> list[dict[str, Any]]:
    """Filter in SQL (indexed ts) and again in Python, so both sinks answer alike."""
    conds = ["true"]
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if flt.since is not None:
        conds.append(f"ts >= {arg(flt.since)}")
    if flt.until is not None:
        conds.append(f"ts < {arg(flt.until)}")
    if flt.login is not None:
        conds.append(f"record->>'operator' = {arg(flt.login)}")
    if flt.role is not None:
        conds.append(f"record->>'role' = {arg(flt.role)}")
    if flt.decisions:
        conds.append(f"record->>'decision' = ANY({arg(list(flt.decisions))}::text[])")
    if flt.kind is not None:
        conds.append(f"record->>'kind' = {arg(flt.kind)}")
    if not flt.checkpoints:
        conds.append("record->>'kind' IS DISTINCT FROM 'checkpoint'")
    if flt.table is not None:
        t = arg(flt.table.lower())
        conds.append(
            "EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements_text(CASE WHEN "
            "pg_catalog.jsonb_typeof(record->'tables') = 'array' THEN record->'tables' ELSE "
            f"'[]'::jsonb END) AS x(n) WHERE lower(x.n) = {t} OR (strpos({t}, '.') = 0 AND "
            f"right(lower(x.n), length({t}) + 1) = '.' || {t}))")
    tail = f"WHERE {' AND '.join(conds)} ORDER BY ts, chain, seq"
    if limit is not None:
        tail += f" LIMIT {int(limit)}"
    texts = await fetch_table(dsn, table, tail, args)
    return [r for r in (json.loads(t) for t in texts) if flt.matches(r)]


# ---------------------------------------------------------------------------------------------
# The command line.

_VERIFY_EPILOG = """\
PATH may be the current log file (its rotated siblings are included, oldest first), one
rotated file, a directory (every *.jsonl in it) or a quoted glob.

exit status: 0 intact, 1 broken (the first broken record is printed), 2 usage error

examples:
  pgveil audit verify audit/pgveil-audit.jsonl --key keys/audit.pub
  pgveil audit verify 'archive/pgveil-audit.2026*.jsonl' --key keys/ --closed
  pgveil audit verify --dsn postgresql://audit@dbhost/audit --key keys/audit.pub
"""

_SEARCH_EPILOG = """\
examples:
  pgveil audit search audit/pgveil-audit.jsonl --login teller_sz01 --since 1h
  pgveil audit search audit/ --table customers --decision blocked --since 2026-11-23T09:00+08:00
  pgveil audit search --dsn postgresql://audit@dbhost/audit --role teller --json | jq .statement
"""

_KEYGEN_EPILOG = """\
The private key signs audit checkpoints (pgveil.yaml: audit.signing_key); give the public key
to whoever verifies the log. Keep old public keys: a log signed before a key change verifies
only with the key of its time.

example:
  pgveil keygen --out keys/
"""


def add_audit_arguments(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``keygen`` and ``audit verify|search`` to the top-level ``pgveil`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    keygen = subparsers.add_parser(
        "keygen", help="create the Ed25519 key pair that signs audit checkpoints",
        description="Create DIR/audit.key (private, mode 0600) and DIR/audit.pub.",
        epilog=_KEYGEN_EPILOG, formatter_class=fmt)
    keygen.add_argument("--out", "-o", metavar="DIR", default="keys",
                        help="directory for audit.key and audit.pub (default: keys)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(func=cmd_keygen)

    audit = subparsers.add_parser(
        "audit", help="verify or search the audit log",
        description="Work with the tamper-evident audit log (file or PostgreSQL table).",
        formatter_class=fmt)
    sub = audit.add_subparsers(dest="audit_command", metavar="{verify,search}")
    audit.set_defaults(func=lambda _args: (audit.print_help(), 2)[1])

    verify = sub.add_parser(
        "verify", help="check the hash chain and checkpoint signatures",
        description="Verify an audit log: report the first edited, removed, inserted or\n"
                    "reordered record, a bad signature, or a truncated tail.",
        epilog=_VERIFY_EPILOG, formatter_class=fmt)
    verify.add_argument("paths", nargs="*", metavar="PATH", help="log file(s), dir or glob")
    verify.add_argument("--key", "-k", metavar="PUB", action="append",
                        help="public key (DIR/audit.pub or DIR); repeat it for a log that spans "
                             "a key change; without it only the hash chain is checked")
    verify.add_argument("--dsn", help="verify the PostgreSQL audit table instead of files")
    verify.add_argument("--pg-table", default="pgveil.audit", metavar="SCHEMA.TABLE",
                        help="audit table for --dsn (default: pgveil.audit)")
    verify.add_argument("--closed", action="store_true",
                        help="the log is no longer written: every chain must end with its "
                             "final checkpoint (detects a cut tail)")
    verify.add_argument("--require-genesis", action="store_true",
                        help="fail when a chain starts mid-way (older files missing)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.add_argument("--all-errors", action="store_true",
                        help="list every broken chain, not only the first error")
    verify.set_defaults(func=cmd_verify)

    search = sub.add_parser(
        "search", help="find audit records by operator, role, table, time, decision",
        description="Print matching audit records as a table (default) or JSON lines.",
        epilog=_SEARCH_EPILOG, formatter_class=fmt)
    search.add_argument("paths", nargs="*", metavar="PATH", help="log file(s), dir or glob")
    search.add_argument("--dsn", help="search the PostgreSQL audit table instead of files")
    search.add_argument("--pg-table", default="pgveil.audit", metavar="SCHEMA.TABLE",
                        help="audit table for --dsn (default: pgveil.audit)")
    search.add_argument("--login", help="operator login")
    search.add_argument("--role", help="operator role")
    search.add_argument("--table", help="protected table (customers or public.customers)")
    search.add_argument("--decision", action="append",
                        choices=["allowed", "rewritten", "blocked", "failed"],
                        help="decision (repeatable)")
    search.add_argument("--kind", help="statement kind: select, update, copy, ...")
    search.add_argument("--session", help="session id")
    search.add_argument("--since", help="from this time: ISO, or an age like 30m, 1h, 2d")
    search.add_argument("--until", help="before this time: ISO, or an age like 10m")
    search.add_argument("--limit", type=int, help="at most this many records")
    search.add_argument("--checkpoints", action="store_true", help="include checkpoints")
    search.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    search.set_defaults(func=cmd_search)


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        key_path, pub_path = generate_keypair(args.out, overwrite=args.force)
    except FileExistsError as exc:
        print(f"pgveil keygen: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pgveil keygen: {exc}", file=sys.stderr)
        return 1
    fp = key_fingerprint(load_public_key(pub_path))
    print(f"private key: {key_path} (mode 0600) — set audit.signing_key to it")
    print(f"public key:  {pub_path} (fingerprint {fp}) — give it to the log's reviewers")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    key = [Path(k) for k in args.key] if args.key else None
    try:
        if args.dsn:
            result = verify_table(args.dsn, args.pg_table, key, closed=args.closed)
        elif args.paths:
            result = verify_paths(args.paths, key, closed=args.closed,
                                  require_genesis=args.require_genesis)
        else:
            print("pgveil audit verify: give a PATH or --dsn", file=sys.stderr)
            return 2
    except (FileNotFoundError, KeyFileError, ValueError) as exc:
        print(f"pgveil audit verify: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pgveil audit verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_result_json(result), ensure_ascii=False, indent=2))
        return 0 if result.ok else 1
    print(result.message)
    if not result.ok and getattr(args, "all_errors", False):
        for err in result.errors[1:]:
            print(f"     {err}")
    for s in result.chain_summaries:
        state = "closed" if s.closed else "open"
        extra = f", {s.unverified_tail} unverified tail record(s)" if s.unverified_tail else ""
        part = ", partial" if s.partial else ""
        seg = f", {s.segments} segments" if s.segments > 1 else ""
        print(f"  chain {s.chain}: seq {s.first_seq}..{s.last_seq}, {s.records} records, "
              f"{s.checkpoints} checkpoints, {state}{part}{seg}{extra}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0 if result.ok else 1


def _result_json(result: VerifyResult) -> dict[str, Any]:
    out = asdict(result)
    for err in [out["first_error"], *out["errors"]]:
        if err is not None:
            err.pop("order", None)
    out["message"] = result.message
    return out


def cmd_search(args: argparse.Namespace) -> int:
    try:
        flt = SearchFilter(
            login=args.login, role=args.role, table=args.table,
            decisions=tuple(args.decision or ()), kind=args.kind, session=args.session,
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
            checkpoints=args.checkpoints)
        if args.dsn:
            records: Iterable[dict[str, Any]] = asyncio.run(
                search_table(args.dsn, args.pg_table, flt, args.limit))
        elif args.paths:
            records = search_files(args.paths, flt)
        else:
            print("pgveil audit search: give a PATH or --dsn", file=sys.stderr)
            return 2
        shown = 0
        if not args.json:
            print(_ROW.format("ts", "operator", "role", "decision", "kind", "rows", "tables",
                              "statement"))
        for rec in records:
            if args.limit is not None and shown >= args.limit:
                break
            shown += 1
            if args.json:
                print(json.dumps(rec, ensure_ascii=False, sort_keys=True))
            else:
                print(_row(rec))
    except (FileNotFoundError, ValueError) as exc:
        print(f"pgveil audit search: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pgveil audit search: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"({shown} record{'s' if shown != 1 else ''})", file=sys.stderr)
    return 0


_ROW = "{:<27} {:<14} {:<10} {:<9} {:<8} {:>6}  {:<24} {}"


# C0 and C1 control characters (ESC, CSI, BEL ...) shown as \x.. escapes: a client chooses
# statement text, application names and column aliases, and raw escape sequences would let it
# erase or forge rows on the auditor's terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def _row(rec: dict[str, Any]) -> str:
    def s(v: Any) -> str:
        return "" if v is None else _printable(" ".join(str(v).split()))

    statement = s(rec.get("statement"))
    if len(statement) > 100:
        statement = statement[:97] + "..."
    tables = ",".join(str(t) for t in rec.get("tables") or ())
    return _ROW.format(s(rec.get("ts")), s(rec.get("operator")), s(rec.get("role")),
                       s(rec.get("decision")), s(rec.get("kind")), s(rec.get("rows")), tables,
                       statement)
