"""Bypass attempts by the shape of the bytes, not the SQL: one statement in many TCP reads, a
message header cut in two, pipelined and half-sent messages, binary parameters for the exact
lookup, and binary result formats.

Why: pgveil's hot paths take a whole message in one read (``ClientConnection.data_received``);
everything else must reach the general path whole and be decided the same way. A teller of SZ01
must get masked values of SZ01 customers however the bytes arrive.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.harness.wire import SYNC, Wire, execute, msg, parse, query
from tests.security.conftest import LeakChecker, find_leaks

TELLER = "teller_sz01"


def send_in_pieces(wire: Wire, data: bytes, cuts: list[int]) -> None:
    """Send ``data`` cut at these offsets, pausing so that each piece is its own read."""
    bounds = [0, *cuts, len(data)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end > start:
            wire.sock.sendall(data[start:end])
            time.sleep(0.005)


@pytest.fixture
def wire(leak: LeakChecker) -> Iterator[Wire]:
    conn = leak.connect(TELLER)
    w = Wire(conn)
    w.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield w
        w.sock.sendall(query("select 1"))
        assert w.messages()[-1][0] == "Z"  # the session is still usable
    finally:
        w.sock.detach()
        conn.close()


def _values(answers: list[tuple[str, bytes]]) -> list[list[bytes | None]]:
    rows = []
    for kind, body in answers:
        if kind != "D":
            continue
        (count,), pos, row = struct.unpack_from("!H", body), 2, []
        for _ in range(count):
            (n,) = struct.unpack_from("!i", body, pos)
            pos += 4
            row.append(None if n < 0 else body[pos:pos + n])
            pos += max(n, 0)
        rows.append(row)
    return rows


def _assert_no_leak(leak: LeakChecker, answers: list[tuple[str, bytes]], typed: str) -> None:
    texts = [body.decode("utf-8", "replace") for _, body in answers]
    leaked = find_leaks(leak.secrets.forbidden(TELLER), texts, typed)
    assert not leaked, f"raw values reached the teller: {leaked[:5]}"


def _customer(leak: LeakChecker, branch: str) -> int:
    return min(c.id for c in leak.secrets.customers.values() if c.branch == branch)


def _bind_binary(stmt: bytes, *params: bytes, text_results: bool = True) -> bytes:
    """A Bind whose parameters are all in binary format (and results too, unless text)."""
    body = b"\x00" + stmt + b"\x00" + struct.pack("!HH", 1, 1) + struct.pack("!H", len(params))
    for p in params:
        body += struct.pack("!I", len(p)) + p
    body += struct.pack("!H", 0) if text_results else struct.pack("!HH", 1, 1)
    return msg(b"B", body)


def test_a_lookup_sent_one_byte_per_read_is_masked(leak: LeakChecker, wire: Wire) -> None:
    cid = _customer(leak, "SZ01")
    sql = f"select name, phone, id_number, email from customers where id = {cid}"
    data = query(sql)
    send_in_pieces(wire, data, list(range(1, len(data))))
    answers = wire.messages()
    rows = _values(answers)
    assert len(rows) == 1 and b"*" in (rows[0][1] or b"")
    _assert_no_leak(leak, answers, sql)


def test_a_header_cut_in_two_and_pipelined_queries(leak: LeakChecker, wire: Wire) -> None:
    sz = _customer(leak, "SZ01")
    gz = _customer(leak, "GZ01")
    first = query(f"select phone from customers where id = {sz}")
    second = query(f"select phone from customers where id = {gz}")  # out of scope: no row
    third = query("select id_number from customers order by id limit 3")
    data = first + second + third
    # two whole messages and 3 bytes of the third's header in one read, the rest later
    send_in_pieces(wire, data, [len(first) + len(second) + 3])
    answers = wire.messages(syncs=3)
    assert [k for k, _ in answers].count("Z") == 3
    rows = _values(answers)
    assert len(rows) == 1 + 0 + 3
    assert all(b"*" in (r[0] or b"") for r in rows)
    _assert_no_leak(leak, answers, "")


def test_an_extended_batch_split_inside_every_message(leak: LeakChecker, wire: Wire) -> None:
    sql = b"select name, phone, id_number from customers where level >= $1 order by id limit 5"
    messages = [parse(b"", sql), msg(b"B", b"\x00\x00" + struct.pack("!HHI", 0, 1, 1) + b"1"
                                     + struct.pack("!H", 0)),
                msg(b"D", b"P\x00"), execute(), SYNC]
    data, cuts, pos = b"".join(messages), [], 0
    for m in messages:
        cuts += [pos + 1, pos + 3, pos + len(m) - 1]  # inside the header and before the end
        pos += len(m)
    send_in_pieces(wire, data, sorted(set(c for c in cuts if 0 < c < len(data))))
    answers = wire.messages()
    rows = _values(answers)
    assert len(rows) == 5 and all(b"*" in (r[1] or b"") for r in rows)
    _assert_no_leak(leak, answers, "")


def test_binary_lookup_parameters_find_only_in_scope_and_stay_masked(
        leak: LeakChecker, wire: Wire) -> None:
    """The exact lookup by ID number with the value in binary format (text's binary form is
    its bytes): the teller finds the SZ01 customer whose number he typed, masked, and nothing
    of another branch."""
    sz = leak.secrets.customer(_customer(leak, "SZ01"))
    gz = leak.secrets.customer(_customer(leak, "GZ01"))
    stmt = b"select id, name, phone, id_number from customers where id_number = $1"
    wire.sock.sendall(parse(b"bl", stmt) + SYNC)
    assert wire.messages()[-1][0] == "Z"
    for who, expect in ((sz, 1), (gz, 0)):
        wire.sock.sendall(_bind_binary(b"bl", who.id_number.encode()) + execute() + SYNC)
        answers = wire.messages()
        rows = _values(answers)
        assert len(rows) == expect, answers
        if rows:
            assert rows[0][0] == str(who.id).encode()
            assert rows[0][3] != who.id_number.encode() and b"*" in (rows[0][3] or b"")
        _assert_no_leak(leak, answers, who.id_number)


def test_binary_result_formats_carry_masked_values(leak: LeakChecker, wire: Wire) -> None:
    stmt = b"select name, phone, id_number, email from customers where level >= $1 limit 20"
    wire.sock.sendall(parse(b"br", stmt) + SYNC)
    assert wire.messages()[-1][0] == "Z"
    # $1 as a binary int4, every result column in binary format
    bound = _bind_binary(b"br", struct.pack("!i", 1), text_results=False)
    wire.sock.sendall(bound + execute() + SYNC)
    answers = wire.messages()
    rows = _values(answers)
    assert len(rows) == 20 and all(b"*" in (r[1] or b"") for r in rows)
    _assert_no_leak(leak, answers, "")


def test_copy_into_the_filtered_table_is_denied_in_the_extended_protocol(
        wire: Wire) -> None:
    """COPY FROM STDIN sent as Parse/Bind/Execute: denied at the Parse like the simple Query,
    with nothing written, and the session in step afterwards."""
    copy = b"copy customers (name, phone, id_number, branch_id) from stdin"
    wire.sock.sendall(parse(b"", copy) + msg(b"B", b"\x00\x00" + struct.pack("!HHH", 0, 0, 0))
              + execute() + SYNC)
    answers = wire.messages()
    kinds = [k for k, _ in answers]
    assert "G" not in kinds, "the server entered COPY IN for the teller"
    errors = [body for k, body in answers if k == "E"]
    assert errors and b"C42501" in errors[0], answers


def test_copy_fail_of_an_allowed_copy_keeps_the_session_in_step(leak: LeakChecker,
                                                                wire: Wire) -> None:
    """A COPY the teller may run (into an unprotected table), abandoned with CopyFail: the
    server's error and ReadyForQuery reach the client, nothing is written, and the next
    protected read is still masked."""
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute("create table if not exists sec_copy_scratch (note text)")
        dba.execute("grant insert, select on sec_copy_scratch to public")
    try:
        wire.sock.sendall(query("copy sec_copy_scratch from stdin"))
        head = wire.sock.recv(65536)  # CopyInResponse
        assert head[:1] == b"G", head
        wire.sock.sendall(msg(b"d", b"first line\n") + msg(b"f", b"client gave up\x00"))
        answers = wire.messages()
        assert [k for k, _ in answers][-2:] == ["E", "Z"] and b"client gave up" in answers[-2][1]
        with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
            assert dba.execute("select count(*) from sec_copy_scratch").fetchone() == (0,)
    finally:
        with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
            dba.execute("drop table if exists sec_copy_scratch")
    cid = _customer(leak, "SZ01")
    wire.sock.sendall(query(f"select phone from customers where id = {cid}"))
    answers = wire.messages()
    rows = _values(answers)
    assert len(rows) == 1 and b"*" in (rows[0][0] or b"")
    _assert_no_leak(leak, answers, "")


@pytest.fixture
def copy_sink(leak: LeakChecker) -> Iterator[str]:
    """An unprotected table the teller may COPY into."""
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute("create table if not exists sec_copy_sink (note text)")
        dba.execute("grant insert, select on sec_copy_sink to public")
    yield "sec_copy_sink"
    with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
        dba.execute("drop table if exists sec_copy_sink")


def _capped_and_audited(leak: LeakChecker, wire: Wire, marker: str) -> None:
    """The next protected read is counted (stopped at max_rows 50) and audited."""
    wire.sock.sendall(query(f"select id as {marker}, phone from customers "
                            "where branch_id = 'SZ01'"))
    answers = wire.messages()
    rows = sum(1 for k, _ in answers if k == "D")
    errors = [body for k, body in answers if k == "E"]
    assert rows <= 50 and errors and b"C42501" in errors[0], (rows, errors)
    deadline = time.monotonic() + 5
    while marker not in leak.pgveil.audit_path.read_text(encoding="utf-8"):
        assert time.monotonic() < deadline, "no audit record for the read after the COPY"
        time.sleep(0.1)


def test_a_sync_inside_copy_data_is_not_a_request(leak: LeakChecker, wire: Wire,
                                                   copy_sink: str) -> None:
    """PostgreSQL ignores a Sync in COPY mode; counted as a request it left pgveil one
    ReadyForQuery behind, and the next read went out uncounted (666 rows past the 50-row cap)
    and unaudited."""
    wire.sock.sendall(query(f"copy {copy_sink} from stdin"))
    assert wire.sock.recv(65536)[:1] == b"G"
    wire.sock.sendall(msg(b"d", b"one\n") + SYNC + msg(b"c", b""))
    assert [k for k, _ in wire.messages()] == ["C", "Z"]
    _capped_and_audited(leak, wire, "after_sync_in_copy")


def test_an_extended_copy_with_its_sync_sent_ahead(leak: LeakChecker, wire: Wire,
                                                   copy_sink: str) -> None:
    """libpq's way: Parse/Bind/Execute/Sync, the data, CopyDone and another Sync. The first
    Sync falls inside the COPY and gets no ReadyForQuery."""
    wire.sock.sendall(parse(b"", f"copy {copy_sink} from stdin".encode())
                      + msg(b"B", b"\x00\x00" + struct.pack("!HHH", 0, 0, 0)) + execute() + SYNC)
    head = wire.sock.recv(65536)
    assert b"G" in head[:12], head  # ParseComplete, BindComplete, CopyInResponse
    wire.sock.sendall(msg(b"d", b"two\n") + msg(b"c", b"") + SYNC)
    assert [k for k, _ in wire.messages()] == ["C", "Z"]
    _capped_and_audited(leak, wire, "after_extended_copy")


def test_a_query_inside_copy_data_ends_the_session(leak: LeakChecker, copy_sink: str) -> None:
    """PostgreSQL fails the COPY on it and consumes it without an answer of its own; pgveil
    does not guess: FATAL 08P01, and nothing of the read is sent."""
    with leak.connect(TELLER) as conn:
        w = Wire(conn)
        try:
            w.sock.sendall(query(f"copy {copy_sink} from stdin"))
            assert w.sock.recv(65536)[:1] == b"G"
            w.sock.sendall(msg(b"d", b"three\n") + query("select id, phone from customers "
                                                         "where branch_id = 'SZ01'"))
            received = b""
            while chunk := w.sock.recv(65536):
                received += chunk
            assert received[:1] == b"E" and b"C08P01" in received and b"D\x00" not in received
        finally:
            w.sock.detach()


def test_a_denied_parse_is_answered_like_a_failed_one(wire: Wire) -> None:
    """PostgreSQL answers a failed Parse with the error alone: the ParseComplete and
    BindComplete of the statement pgveil raises the denial with are not the client's."""
    got = wire.batch(parse(b"denied_stmt", b"select * from customers"),
                     msg(b"D", b"Sdenied_stmt\x00"), SYNC)
    assert got.types == ["E", "Z"] and got.sqlstates == ["42501"], got
    # behind an allowed statement of the same batch, whose own completions stay in place
    bind_unnamed = msg(b"B", b"\x00\x00" + struct.pack("!HHH", 0, 0, 0))
    got = wire.batch(parse(b"", b"select 1"), bind_unnamed, execute(),
                     parse(b"", b"select * from customers"), bind_unnamed, execute(), SYNC)
    assert got.types == ["1", "2", "D", "C", "E", "Z"] and got.sqlstates == ["42501"], got


def test_a_terminated_backend_gives_one_error(leak: LeakChecker) -> None:
    """pg_terminate_backend: the client gets PostgreSQL's FATAL 57P01 and nothing of pgveil's
    (a second FATAL would hide the reason from drivers that keep the last error)."""
    with leak.connect(TELLER) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        w = Wire(conn)
        try:
            with psycopg.connect(leak.pg.dsn("dba"), autocommit=True) as dba:
                dba.execute("select pg_terminate_backend(%s)", (pid,))
            received = b""
            while chunk := w.sock.recv(65536):
                received += chunk
        finally:
            w.sock.detach()
    errors, pos = [], 0
    while pos + 5 <= len(received):
        end = pos + 1 + struct.unpack_from("!I", received, pos + 1)[0]
        if received[pos:pos + 1] == b"E":
            errors.append(received[pos + 5:end])
        pos = end
    assert len(errors) == 1 and b"C57P01" in errors[0], errors
