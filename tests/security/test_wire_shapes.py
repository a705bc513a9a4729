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
