"""Byte-level tests of the sans-IO protocol codec: bytes in, messages out, no sockets.

Three sources of truth for the bytes:

* messages hand-built from the PostgreSQL "Message Formats" documentation (``_msg`` below
  computes only the length word; every field is spelled out);
* sequences built the same way (a simple-query response, an extended-protocol batch, COPY);
* traffic captured once from real clients talking to PostgreSQL 15.18 (psycopg2 over the simple
  protocol with COPY/NOTIFY/errors, psycopg 3 over the extended protocol with binary values,
  and a hand-driven session with NegotiateProtocolVersion, FunctionCall and PortalSuspended),
  stored below as the recorded read chunks, in order.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import time
import zlib

import pytest

from proxy import protocol as P
from proxy.protocol import (
    AuthenticationCleartextPassword,
    AuthenticationGSS,
    AuthenticationGSSContinue,
    AuthenticationKerberosV5,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationSCMCredential,
    AuthenticationSSPI,
    AuthResponse,
    BackendKeyData,
    Bind,
    BindComplete,
    CancelRequest,
    Close,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    Describe,
    EmptyQueryResponse,
    ErrorResponse,
    Execute,
    FieldDescription,
    Flush,
    FrameBuffer,
    FunctionCall,
    FunctionCallResponse,
    GSSENCRequest,
    GSSResponse,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PasswordMessage,
    PortalSuspended,
    ProtocolError,
    Query,
    ReadyForQuery,
    RowDescription,
    SASLInitialResponse,
    SASLResponse,
    Side,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
    TransactionStatus,
)


def i16(v: int) -> bytes:
    return v.to_bytes(2, "big", signed=True)


def i32(v: int) -> bytes:
    return v.to_bytes(4, "big", signed=True)


def _msg(type_byte: bytes, payload: bytes) -> bytes:
    """Type byte + Int32 length (counting itself, not the type byte) + payload."""
    return type_byte + i32(len(payload) + 4) + payload


def _auth(code: int, extra: bytes = b"") -> bytes:
    return _msg(b"R", i32(code) + extra)


# ---------------------------------------------------------------------------------------------
# Every message type, hand-built from the documentation
# ---------------------------------------------------------------------------------------------

FRONTEND_CASES: list[tuple[bytes, object]] = [
    (_msg(b"Q", b"SELECT 1;\0"), Query(b"SELECT 1;")),
    (
        _msg(b"P", b"stmt1\0SELECT $1, $2\0" + i16(2) + i32(23) + i32(0)),
        Parse("stmt1", b"SELECT $1, $2", (23, 0)),
    ),
    (_msg(b"P", b"\0SELECT 1\0" + i16(0)), Parse("", b"SELECT 1", ())),
    (
        _msg(
            b"B",
            b"portal\0stmt1\0"
            + i16(2)
            + i16(0)
            + i16(1)  # param formats: text, binary
            + i16(3)
            + i32(2)
            + b"42"
            + i32(-1)  # NULL
            + i32(0)  # empty string, not NULL
            + i16(1)
            + i16(1),  # result formats: all binary
        ),
        Bind("portal", "stmt1", (0, 1), (b"42", None, b""), (1,)),
    ),
    (_msg(b"B", b"\0\0" + i16(0) + i16(0) + i16(0)), Bind("", "")),
    (_msg(b"D", b"Sstmt1\0"), Describe("S", "stmt1")),
    (_msg(b"D", b"P\0"), Describe("P", "")),
    (_msg(b"E", b"\0" + i32(0)), Execute("", 0)),
    (_msg(b"E", b"p1\0" + i32(100)), Execute("p1", 100)),
    (_msg(b"C", b"Sstmt1\0"), Close("S", "stmt1")),
    (_msg(b"C", b"Pp1\0"), Close("P", "p1")),
    (_msg(b"H", b""), Flush()),
    (_msg(b"S", b""), Sync()),
    (_msg(b"d", b"1\tone\n"), CopyData(b"1\tone\n")),
    (_msg(b"c", b""), CopyDone()),
    (_msg(b"f", b"client gave up\0"), CopyFail("client gave up")),
    (
        _msg(b"F", i32(1317) + i16(1) + i16(0) + i16(2) + i32(3) + b"abc" + i32(-1) + i16(0)),
        FunctionCall(1317, (0,), (b"abc", None), 0),
    ),
    (_msg(b"X", b""), Terminate()),
    (_msg(b"p", b"md5abcdef\0"), AuthResponse(b"md5abcdef\0")),
]

# The 'p' family, decoded by the caller who knows which authentication request was sent.
AUTH_RESPONSE_CASES: list[tuple[bytes, object]] = [
    (_msg(b"p", b"secret\0"), PasswordMessage(b"secret")),
    (
        _msg(b"p", b"SCRAM-SHA-256\0" + i32(11) + b"n,,n=,r=abc"),
        SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
    ),
    (_msg(b"p", b"SCRAM-SHA-256\0" + i32(-1)), SASLInitialResponse("SCRAM-SHA-256", None)),
    (_msg(b"p", b"c=biws,r=abc,p=xyz"), SASLResponse(b"c=biws,r=abc,p=xyz")),
    (_msg(b"p", b"\x60\x82token"), GSSResponse(b"\x60\x82token")),
]

BACKEND_CASES: list[tuple[bytes, object]] = [
    (_auth(0), AuthenticationOk()),
    (_auth(2), AuthenticationKerberosV5()),
    (_auth(3), AuthenticationCleartextPassword()),
    (_auth(5, b"\x01\x02\x03\x04"), AuthenticationMD5Password(b"\x01\x02\x03\x04")),
    (_auth(6), AuthenticationSCMCredential()),
    (_auth(7), AuthenticationGSS()),
    (_auth(8, b"gss-token"), AuthenticationGSSContinue(b"gss-token")),
    (_auth(9), AuthenticationSSPI()),
    (
        _auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
        AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
    ),
    (_auth(11, b"r=abc,s=c2FsdA==,i=4096"), AuthenticationSASLContinue(b"r=abc,s=c2FsdA==,i=4096")),
    (_auth(12, b"v=c2lnbmF0dXJl"), AuthenticationSASLFinal(b"v=c2lnbmF0dXJl")),
    (_msg(b"K", i32(4242) + i32(-559038737)), BackendKeyData(4242, -559038737)),
    (_msg(b"2", b""), BindComplete()),
    (_msg(b"3", b""), CloseComplete()),
    (_msg(b"C", b"INSERT 0 5\0"), CommandComplete("INSERT 0 5")),
    (_msg(b"d", b"\x00\x01binary"), CopyData(b"\x00\x01binary")),
    (_msg(b"c", b""), CopyDone()),
    (_msg(b"G", b"\x00" + i16(2) + i16(0) + i16(0)), CopyInResponse(0, (0, 0))),
    (_msg(b"H", b"\x01" + i16(1) + i16(1)), CopyOutResponse(1, (1,))),
    (_msg(b"W", b"\x00" + i16(0)), CopyBothResponse(0, ())),
    (
        _msg(b"D", i16(3) + i32(1) + b"7" + i32(-1) + i32(0)),
        DataRow((b"7", None, b"")),
    ),
    (_msg(b"D", i16(0)), DataRow(())),
    (_msg(b"I", b""), EmptyQueryResponse()),
    (
        _msg(b"E", b"SERROR\0VERROR\0C42501\0Mpermission denied for table t\0\0"),
        ErrorResponse(
            (("S", "ERROR"), ("V", "ERROR"), ("C", "42501"), ("M", "permission denied for table t"))
        ),
    ),
    (
        _msg(b"N", b"SWARNING\0VWARNING\0C01000\0Mcareful\0Dsome detail\0\0"),
        NoticeResponse(
            (
                ("S", "WARNING"),
                ("V", "WARNING"),
                ("C", "01000"),
                ("M", "careful"),
                ("D", "some detail"),
            )
        ),
    ),
    (_msg(b"V", i32(2) + b"42"), FunctionCallResponse(b"42")),
    (_msg(b"V", i32(-1)), FunctionCallResponse(None)),
    (
        _msg(b"v", i32(196608) + i32(1) + b"_pq_.compression\0"),
        NegotiateProtocolVersion(196608, ("_pq_.compression",)),
    ),
    (_msg(b"n", b""), NoData()),
    (_msg(b"A", i32(77) + b"chan\0hello\0"), NotificationResponse(77, "chan", "hello")),
    (_msg(b"t", i16(2) + i32(23) + b"\xff\xff\xff\xff"), ParameterDescription((23, 4294967295))),
    (_msg(b"S", b"client_encoding\0UTF8\0"), ParameterStatus("client_encoding", "UTF8")),
    (_msg(b"1", b""), ParseComplete()),
    (_msg(b"s", b""), PortalSuspended()),
    (_msg(b"Z", b"I"), ReadyForQuery(TransactionStatus.IDLE)),
    (_msg(b"Z", b"T"), ReadyForQuery(TransactionStatus.IN_TRANSACTION)),
    (_msg(b"Z", b"E"), ReadyForQuery(TransactionStatus.FAILED)),
    (
        _msg(
            b"T",
            i16(2)
            + b"id\0"
            + i32(16390)
            + i16(1)
            + i32(23)
            + i16(4)
            + i32(-1)
            + i16(0)
            + b"balance\0"
            + i32(16390)
            + i16(3)
            + i32(1700)
            + i16(-1)
            + i32(917510)
            + i16(1),
        ),
        RowDescription(
            (
                FieldDescription("id", 16390, 1, 23, 4, -1, 0),
                FieldDescription("balance", 16390, 3, 1700, -1, 917510, 1),
            )
        ),
    ),
]


def _ids(cases: list[tuple[bytes, object]]) -> list[str]:
    return [f"{type(m).__name__}-{i}" for i, (_, m) in enumerate(cases)]


@pytest.mark.parametrize(("raw", "expected"), FRONTEND_CASES, ids=_ids(FRONTEND_CASES))
def test_frontend_message_round_trip(raw: bytes, expected: object) -> None:
    message = P.decode_frontend(raw[0], raw[5:])
    assert message == expected
    assert message.encode() == raw
    assert P.decode_frontend_frame(raw) == expected
    assert type(expected).decode(raw[5:]) == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize(("raw", "expected"), AUTH_RESPONSE_CASES, ids=_ids(AUTH_RESPONSE_CASES))
def test_auth_response_family_round_trip(raw: bytes, expected: object) -> None:
    generic = P.decode_frontend(raw[0], raw[5:])
    assert isinstance(generic, AuthResponse)
    assert generic.encode() == raw
    redecode = {
        PasswordMessage: generic.as_password,
        SASLInitialResponse: generic.as_sasl_initial,
        SASLResponse: generic.as_sasl,
        GSSResponse: generic.as_gss,
    }[type(expected)]
    message = redecode()
    assert message == expected
    assert message.encode() == raw


@pytest.mark.parametrize(("raw", "expected"), BACKEND_CASES, ids=_ids(BACKEND_CASES))
def test_backend_message_round_trip(raw: bytes, expected: object) -> None:
    message = P.decode_backend(raw[0], raw[5:])
    assert message == expected
    assert message.encode() == raw
    assert P.decode_backend_frame(raw) == expected


def test_every_message_class_is_covered() -> None:
    """The case tables above name every decoder the dispatch tables know."""
    covered = {type(m) for _, m in FRONTEND_CASES + AUTH_RESPONSE_CASES + BACKEND_CASES}
    frontend = {d.__self__ for d in P.FRONTEND_DECODERS.values()}  # type: ignore[attr-defined]
    backend = {
        d.__self__  # type: ignore[attr-defined]
        for t, d in P.BACKEND_DECODERS.items()
        if t != ord("R")
    }
    auth = {d.__self__ for d in P._AUTH_CLASSES.values()}  # type: ignore[attr-defined]
    assert frontend | backend | auth <= covered
    assert {PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse} <= covered


def test_message_fields_and_helpers() -> None:
    err = ErrorResponse.decode(b"SERREUR\0VERROR\0C22012\0Mdivision by zero\0Dd\0Hh\0Fint.c\0\0")
    assert (err.severity, err.sqlstate, err.message, err.detail, err.hint) == (
        "ERROR",
        "22012",
        "division by zero",
        "d",
        "h",
    )
    assert err.get("F") == "int.c" and err.get("W") is None
    assert CommandComplete("INSERT 0 5").rows == 5
    assert CommandComplete("INSERT 0 5").command == "INSERT"
    assert CommandComplete("CREATE TABLE").rows is None
    assert CommandComplete("CREATE TABLE").command == "CREATE TABLE"
    startup = StartupMessage(P.PROTOCOL_3_0, {"user": "alice"})
    assert startup.database == "alice" and startup.user == "alice" and startup.minor_version == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        Query(b"x").sql = b"y"  # type: ignore[misc]


def test_sql_keeps_raw_bytes_in_any_client_encoding() -> None:
    sql = "SELECT '张三'".encode("gbk")
    raw = _msg(b"Q", sql + b"\0")
    q = P.decode_frontend(raw[0], raw[5:])
    assert isinstance(q, Query)
    assert q.sql == sql and q.encode() == raw
    assert q.text(P.python_encoding("GBK")) == "SELECT '张三'"
    with pytest.raises(UnicodeDecodeError):
        q.text("utf-8")  # strict: undecodable SQL is an error, not a guess
    parse = Parse("s", "SELECT 'é'".encode("latin-1"))
    assert Parse.decode(parse.encode()[5:]).text(P.python_encoding("LATIN1")) == "SELECT 'é'"
    # Non-UTF-8 names survive as surrogate escapes and re-encode exactly.
    raw_status = _msg(b"S", b"name\0\xff\xfe\0")
    status = P.decode_backend(raw_status[0], raw_status[5:])
    assert status.encode() == raw_status
    with pytest.raises(ProtocolError) as info:
        P.python_encoding("MULE_INTERNAL")
    assert info.value.sqlstate == "0A000"


# ---------------------------------------------------------------------------------------------
# Malformed payloads: always ProtocolError, never struct.error/IndexError
# ---------------------------------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes, bytes]] = [
    ("frontend", b"Q", b"SELECT 1"),  # no terminator
    ("frontend", b"Q", b"SELECT 1\0\0"),  # two terminators
    ("frontend", b"Q", b"SEL\0ECT\0"),  # embedded NUL
    ("frontend", b"P", b"s\0SELECT 1\0" + i16(2) + i32(23)),  # fewer types than counted
    ("frontend", b"B", b"\0\0" + i16(0) + i16(1) + i32(-2) + i16(0)),  # length -2
    ("frontend", b"B", b"\0\0" + i16(0) + i16(1) + i32(10) + b"abc" + i16(0)),  # overrun
    ("frontend", b"B", b"\0\0" + i16(0) + i16(0) + i16(0) + b"x"),  # trailing byte
    ("frontend", b"D", b"Xname\0"),  # bad describe kind
    ("frontend", b"C", b"S"),  # missing name
    ("frontend", b"E", b"\0" + i16(0)),  # short max_rows
    ("frontend", b"S", b"x"),  # Sync with payload
    ("frontend", b"X", b"\0"),
    ("backend", b"R", b""),
    ("backend", b"R", i32(99)),  # unknown authentication code
    ("backend", b"R", i32(5) + b"\x01\x02"),  # short MD5 salt
    ("backend", b"R", i32(10) + b"SCRAM-SHA-256\0"),  # mechanism list unterminated
    ("backend", b"R", i32(0) + b"x"),
    ("backend", b"K", i32(1)),
    ("backend", b"Z", b"X"),  # unknown transaction status
    ("backend", b"Z", b""),
    ("backend", b"D", i16(1) + i32(-5)),
    ("backend", b"D", i16(2) + i32(1) + b"a"),
    ("backend", b"D", i16(1) + i32(1) + b"ab"),
    ("backend", b"D", b"\x00"),
    ("backend", b"T", i16(1) + b"id\0" + i32(0)),
    ("backend", b"E", b"SERROR\0"),  # no final terminator
    ("backend", b"E", b"SERROR"),
    ("backend", b"v", i32(196608) + i32(-1)),
    ("backend", b"v", i32(196608) + i32(2) + b"_pq_.a\0"),
    ("backend", b"t", i16(1)),
    ("backend", b"V", i32(4) + b"ab"),
    ("backend", b"G", b""),
]


@pytest.mark.parametrize(("side", "type_byte", "payload"), MALFORMED)
def test_malformed_payload_raises_protocol_error(
    side: str, type_byte: bytes, payload: bytes
) -> None:
    decode = P.decode_frontend if side == "frontend" else P.decode_backend
    with pytest.raises(ProtocolError) as info:
        decode(type_byte[0], payload)
    assert info.value.sqlstate == "08P01"


def test_auth_family_malformed() -> None:
    with pytest.raises(ProtocolError):
        AuthResponse(b"no terminator").as_password()
    with pytest.raises(ProtocolError):
        AuthResponse(b"SCRAM-SHA-256\0" + i32(5) + b"abc").as_sasl_initial()
    with pytest.raises(ProtocolError):
        AuthResponse(b"SCRAM-SHA-256\0" + i32(-3)).as_sasl_initial()


def test_unknown_type_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        P.decode_frontend(ord("Z"), b"I")  # a backend-only type sent by a client
    with pytest.raises(ProtocolError):
        P.decode_backend(ord("Q"), b"x\0")
    with pytest.raises(ProtocolError):
        P.decode_backend(0, b"")


def test_truncations_and_extensions_never_escape_as_other_errors() -> None:
    """Every prefix and one-byte extension of every valid payload: a ProtocolError, or a
    message that re-encodes to exactly those bytes."""
    cases = [("frontend", raw) for raw, _ in FRONTEND_CASES] + [
        ("backend", raw) for raw, _ in BACKEND_CASES
    ]
    for side, raw in cases:
        decode = P.decode_frontend if side == "frontend" else P.decode_backend
        payload = raw[5:]
        for candidate in [payload[:i] for i in range(len(payload))] + [payload + b"\0"]:
            try:
                message = decode(raw[0], candidate)
            except ProtocolError:
                continue
            assert message.encode() == _msg(raw[:1], candidate)


def test_random_payloads_never_escape_as_other_errors() -> None:
    rng = random.Random(5432)
    decoders = [(t, P.decode_frontend) for t in P.FRONTEND_TYPES] + [
        (t, P.decode_backend) for t in P.BACKEND_TYPES
    ]
    for _ in range(3000):
        t, decode = rng.choice(decoders)
        payload = bytes(rng.choice(b"\0\0\0\x01\xffSPab") for _ in range(rng.randrange(0, 24)))
        if t == ord("R") and rng.random() < 0.8:
            payload = i32(rng.choice([0, 3, 5, 8, 10, 11, 12])) + payload
        try:
            message = decode(t, payload)
        except ProtocolError:
            continue
        assert message.encode() == _msg(bytes([t]), payload)


def test_mutated_valid_payloads_never_escape_as_other_errors() -> None:
    rng = random.Random(15)
    cases = [(raw, P.decode_frontend) for raw, _ in FRONTEND_CASES] + [
        (raw, P.decode_backend) for raw, _ in BACKEND_CASES
    ]
    for _ in range(4000):
        raw, decode = rng.choice(cases)
        payload = bytearray(raw[5:])
        if not payload:
            continue
        for _ in range(rng.randrange(1, 3)):
            payload[rng.randrange(len(payload))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        try:
            message = decode(raw[0], bytes(payload))
        except ProtocolError:
            continue
        assert message.encode() == _msg(raw[:1], bytes(payload))


def test_encode_refuses_nul_in_strings() -> None:
    with pytest.raises(ValueError):
        Describe("S", "a\0b").encode()
    with pytest.raises(ValueError):
        Query(b"SELECT 1\0; DROP TABLE t").encode()
    with pytest.raises(ValueError):
        ParameterStatus("x", "y\0z").encode()


# ---------------------------------------------------------------------------------------------
# Sequences: simple query, extended batch, COPY; framing across arbitrary chunk boundaries
# ---------------------------------------------------------------------------------------------

SIMPLE_QUERY_RESPONSE = [
    _msg(
        b"T",
        i16(2)
        + b"n\0"
        + i32(0)
        + i16(0)
        + i32(23)
        + i16(4)
        + i32(-1)
        + i16(0)
        + b"label\0"
        + i32(0)
        + i16(0)
        + i32(25)
        + i16(-1)
        + i32(-1)
        + i16(0),
    ),
    _msg(b"D", i16(2) + i32(1) + b"1" + i32(5) + b"row 1"),
    _msg(b"D", i16(2) + i32(1) + b"2" + i32(-1)),
    _msg(b"C", b"SELECT 2\0"),
    _msg(b"Z", b"I"),
]

EXTENDED_BATCH = [
    _msg(b"P", b"\0SELECT name FROM t WHERE id = $1\0" + i16(1) + i32(23)),
    _msg(b"B", b"\0\0" + i16(1) + i16(1) + i16(1) + i32(4) + i32(7) + i16(1) + i16(0)),
    _msg(b"D", b"P\0"),
    _msg(b"E", b"\0" + i32(0)),
    _msg(b"S", b""),
]

EXTENDED_RESPONSE = [
    _msg(b"1", b""),
    _msg(b"2", b""),
    _msg(b"T", i16(1) + b"name\0" + i32(16400) + i16(2) + i32(25) + i16(-1) + i32(-1) + i16(0)),
    _msg(b"D", i16(1) + i32(5) + b"alice"),
    _msg(b"C", b"SELECT 1\0"),
    _msg(b"Z", b"T"),
]

COPY_IN = (
    [_msg(b"Q", b"COPY t FROM STDIN\0")],
    [_msg(b"G", b"\x00" + i16(2) + i16(0) + i16(0))],
    [_msg(b"d", b"1\tone\n"), _msg(b"d", b"2\t\\N\n"), _msg(b"c", b"")],
    [_msg(b"C", b"COPY 2\0"), _msg(b"Z", b"I")],
)

COPY_OUT = [
    _msg(b"H", b"\x00" + i16(2) + i16(0) + i16(0)),
    _msg(b"d", b"1\tone\n"),
    _msg(b"d", b"2\t\\N\n"),
    _msg(b"c", b""),
    _msg(b"C", b"COPY 2\0"),
    _msg(b"Z", b"I"),
]

SEQUENCES = [
    ("simple-query-response", Side.BACKEND, SIMPLE_QUERY_RESPONSE),
    ("extended-batch", Side.FRONTEND, EXTENDED_BATCH),
    ("extended-response", Side.BACKEND, EXTENDED_RESPONSE),
    ("copy-in-frontend", Side.FRONTEND, COPY_IN[0] + COPY_IN[2]),
    ("copy-in-backend", Side.BACKEND, COPY_IN[1] + COPY_IN[3]),
    ("copy-out", Side.BACKEND, COPY_OUT),
]


def _chunkings(stream: bytes, rng: random.Random) -> list[list[bytes]]:
    """Whole, one byte at a time, and several random splittings (including empty chunks)."""
    out = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
    for _ in range(20):
        cuts = sorted(rng.randrange(0, len(stream) + 1) for _ in range(rng.randrange(1, 12)))
        bounds = [0, *cuts, len(stream)]
        out.append([stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    return out


def _decode(side: Side, frame: bytes) -> object:
    if side is Side.FRONTEND:
        return P.decode_frontend_frame(frame)
    return P.decode_backend_frame(frame)


@pytest.mark.parametrize(("name", "side", "frames"), SEQUENCES, ids=[s[0] for s in SEQUENCES])
def test_sequence_framing_any_chunking(name: str, side: Side, frames: list[bytes]) -> None:
    stream = b"".join(frames)
    rng = random.Random(name)
    for chunks in _chunkings(stream, rng):
        fb = FrameBuffer(side)
        got = [frame for chunk in chunks for frame in fb.feed(chunk)]
        assert [f for _, f in got] == frames
        assert [t for t, _ in got] == [f[0] for f in frames]
        assert fb.buffered == 0
    for frame in frames:
        assert _decode(side, frame).encode() == frame  # type: ignore[attr-defined]


def test_simple_query_response_content() -> None:
    msgs = [_decode(Side.BACKEND, f) for f in SIMPLE_QUERY_RESPONSE]
    assert [type(m) for m in msgs] == [
        RowDescription,
        DataRow,
        DataRow,
        CommandComplete,
        ReadyForQuery,
    ]
    assert [f.name for f in msgs[0].fields] == ["n", "label"]  # type: ignore[attr-defined]
    assert msgs[2] == DataRow((b"2", None))
    assert msgs[3].rows == 2  # type: ignore[attr-defined]
    batch = [_decode(Side.FRONTEND, f) for f in EXTENDED_BATCH]
    assert batch == [
        Parse("", b"SELECT name FROM t WHERE id = $1", (23,)),
        Bind("", "", (1,), (b"\x00\x00\x00\x07",), (0,)),
        Describe("P", ""),
        Execute("", 0),
        Sync(),
    ]


def test_large_message_in_many_chunks() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB of CopyData
    frame = _msg(b"d", body)
    fb = FrameBuffer(Side.FRONTEND)
    got = []
    for i in range(0, len(frame), 4096):
        got.extend(fb.feed(frame[i : i + 4096]))
        if i + 4096 < len(frame):
            assert fb.buffered == i + 4096  # held, not parsed, until complete
    assert got == [(ord("d"), frame)]
    assert CopyData.decode(frame[5:]).encode() == frame


def test_feed_accepts_bytearray_and_memoryview() -> None:
    fb = FrameBuffer(Side.FRONTEND)
    assert fb.feed(bytearray(b"S\x00\x00")) == []
    assert fb.feed(memoryview(b"\x00\x04H\x00\x00\x00\x04")) == [
        (ord("S"), P.SYNC),
        (ord("H"), P.FLUSH),
    ]


# ---------------------------------------------------------------------------------------------
# Limits: oversize, short and unknown messages
# ---------------------------------------------------------------------------------------------


def test_oversize_message_rejected_at_the_header() -> None:
    fb = FrameBuffer(Side.FRONTEND, max_message_size=1000)
    assert fb.feed(_msg(b"Q", b"x" * 995 + b"\0")) != []  # length 1000: allowed
    with pytest.raises(ProtocolError) as info:
        fb.feed(b"Q" + i32(1001))  # only the header has arrived
    assert info.value.sqlstate == "08P01"
    with pytest.raises(ProtocolError):
        fb.feed(P.SYNC)  # the stream is dead after a violation


def test_default_limit_is_64_mib() -> None:
    fb = FrameBuffer(Side.BACKEND)
    assert fb.feed(b"D" + i32(64 * 1024 * 1024) + b"\0\0") == []
    with pytest.raises(ProtocolError):
        FrameBuffer(Side.BACKEND).feed(b"D" + i32(64 * 1024 * 1024 + 1))


@pytest.mark.parametrize("length", [-1, 0, 3, -(2**31)])
def test_short_length_rejected(length: int) -> None:
    with pytest.raises(ProtocolError):
        FrameBuffer(Side.FRONTEND).feed(b"Q" + i32(length) + b"xxxx")


@pytest.mark.parametrize(
    ("side", "type_byte"),
    [
        (Side.FRONTEND, b"Z"),
        (Side.FRONTEND, b"T"),
        (Side.FRONTEND, b"\0"),
        (Side.BACKEND, b"Q"),
        (Side.BACKEND, b"X"),
        (Side.BACKEND, b"\xff"),
    ],
)
def test_unknown_type_rejected_by_framer(side: Side, type_byte: bytes) -> None:
    fb = FrameBuffer(side)
    with pytest.raises(ProtocolError) as info:
        fb.feed(type_byte + i32(4))
    assert "message type" in info.value.message


def test_violation_after_good_frames_in_one_chunk() -> None:
    fb = FrameBuffer(Side.FRONTEND)
    with pytest.raises(ProtocolError):
        fb.feed(P.SYNC + b"?" + i32(4))


# ---------------------------------------------------------------------------------------------
# Startup phase
# ---------------------------------------------------------------------------------------------

STARTUP = (
    i32(4 + 4 + 5 + 6 + 9 + 5 + 17 + 5 + 1)
    + i32(196608)
    + b"user\0alice\0"
    + b"database\0bank\0"
    + b"application_name\0psql\0"
    + b"\0"
)


def test_startup_packets_round_trip() -> None:
    assert len(STARTUP) == int.from_bytes(STARTUP[:4], "big")
    msg = P.decode_startup(STARTUP)
    assert msg == StartupMessage(
        196608, {"user": "alice", "database": "bank", "application_name": "psql"}
    )
    assert list(msg.params) == ["user", "database", "application_name"]  # type: ignore[union-attr]
    assert msg.encode() == STARTUP
    assert P.startup_message({"user": "alice", "database": "bank", "application_name": "psql"}) == (
        STARTUP
    )

    ssl = bytes.fromhex("00000008 04d2162f")
    gss = bytes.fromhex("00000008 04d21630")
    cancel = bytes.fromhex("00000010 04d2162e") + i32(1234) + i32(-5678)
    assert P.decode_startup(ssl) == SSLRequest() and SSLRequest().encode() == ssl == P.SSL_REQUEST
    assert P.decode_startup(gss) == GSSENCRequest() and GSSENCRequest().encode() == gss
    assert P.decode_startup(cancel) == CancelRequest(1234, -5678)
    assert CancelRequest(1234, -5678).encode() == cancel == P.cancel_request(1234, -5678)


@pytest.mark.parametrize(
    ("packet", "sqlstate"),
    [
        (STARTUP[:-1], "08P01"),  # length word disagrees
        (i32(8) + i32(196608), "08P01"),  # no terminator
        (i32(13) + i32(196608) + b"user\0", "08P01"),  # name without value
        (i32(22) + i32(196608) + b"user\0a\0user\0b\0\0", "08P01"),  # duplicate user
        (i32(9) + i32(131072) + b"\0", "0A000"),  # protocol 2.0
        (i32(12) + i32(80877103) + b"abcd", "08P01"),  # SSLRequest with a body
        (i32(12) + i32(80877102) + i32(1), "08P01"),  # short CancelRequest
        (i32(4), "08P01"),
    ],
)
def test_bad_startup_packets(packet: bytes, sqlstate: str) -> None:
    with pytest.raises(ProtocolError) as info:
        P.decode_startup(packet)
    assert info.value.sqlstate == sqlstate


def test_startup_framing_then_regular_messages() -> None:
    query = _msg(b"Q", b"SELECT 1\0")
    stream = STARTUP + _msg(b"p", b"secret\0") + query + P.TERMINATE
    expected = [
        (0, STARTUP),
        (ord("p"), _msg(b"p", b"secret\0")),
        (ord("Q"), query),
        (ord("X"), P.TERMINATE),
    ]
    for chunks in _chunkings(stream, random.Random(1)):
        fb = FrameBuffer(Side.FRONTEND, startup=True)
        assert fb.in_startup
        got = [frame for chunk in chunks for frame in fb.feed(chunk)]
        assert got == expected
        assert not fb.in_startup


def test_ssl_request_pauses_until_resume() -> None:
    fb = FrameBuffer(Side.FRONTEND, startup=True)
    assert fb.feed(P.SSL_REQUEST) == [(0, P.SSL_REQUEST)]
    assert fb.paused and fb.buffered == 0  # nothing smuggled ahead of the TLS handshake
    # The server said 'N'; the client goes on in plaintext, possibly in pieces.
    assert fb.feed(STARTUP[:10]) == []
    assert fb.buffered == 10
    assert fb.resume() == []
    assert fb.feed(STARTUP[10:] + P.SYNC) == [(0, STARTUP), (ord("S"), P.SYNC)]


def test_bytes_sent_after_ssl_request_are_visible() -> None:
    """A client that sends data right behind SSLRequest (CVE-2021-23214 style) is detectable."""
    fb = FrameBuffer(Side.FRONTEND, startup=True)
    frames = fb.feed(P.SSL_REQUEST + _msg(b"Q", b"SELECT 1\0"))
    assert frames == [(0, P.SSL_REQUEST)]
    assert fb.paused and fb.buffered == len(_msg(b"Q", b"SELECT 1\0"))


def test_gssenc_then_ssl_then_startup() -> None:
    fb = FrameBuffer(Side.FRONTEND, startup=True)
    assert fb.feed(P.GSSENC_REQUEST + P.SSL_REQUEST) == [(0, P.GSSENC_REQUEST)]
    assert fb.resume() == [(0, P.SSL_REQUEST)]
    assert fb.paused
    assert fb.resume() == []
    assert fb.feed(STARTUP) == [(0, STARTUP)]


def test_cancel_request_framing() -> None:
    cancel = P.cancel_request(99, 12345)
    fb = FrameBuffer(Side.FRONTEND, startup=True)
    assert fb.feed(cancel[:7]) == []
    assert fb.feed(cancel[7:]) == [(0, cancel)]
    assert fb.paused


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 2**31 - 1, -8])
def test_startup_length_limits(length: int) -> None:
    fb = FrameBuffer(Side.FRONTEND, startup=True)
    with pytest.raises(ProtocolError) as info:
        fb.feed(i32(length) + i32(196608))
    assert info.value.message == "invalid length of startup packet"


def test_startup_length_at_limit_is_accepted() -> None:
    params = b"user\0" + b"u" * (10000 - 4 - 4 - 5 - 2) + b"\0\0"
    packet = i32(10000) + i32(196608) + params
    assert len(packet) == 10000
    fb = FrameBuffer(Side.FRONTEND, startup=True)
    assert fb.feed(packet) == [(0, packet)]
    assert P.decode_startup(packet).encode() == packet  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# Builders and constants
# ---------------------------------------------------------------------------------------------


def test_error_response_builder_matches_postgres_layout() -> None:
    raw = P.error_response("ERROR", "42501", "permission denied", detail="d", hint="h")
    assert raw == _msg(b"E", b"SERROR\0VERROR\0C42501\0Mpermission denied\0Dd\0Hh\0\0")
    err = ErrorResponse.decode(raw[5:])
    assert (err.severity, err.sqlstate, err.message) == ("ERROR", "42501", "permission denied")
    fatal = P.error_response("FATAL", "08P01", "bad\0message")  # NUL cannot split a field
    assert ErrorResponse.decode(fatal[5:]).message == "badmessage"
    gbk = P.error_response("ERROR", "42501", "拒绝", encoding="gbk")
    assert "拒绝".encode("gbk") in gbk
    notice = P.notice_response("masked", severity="WARNING", sqlstate="01000")
    assert notice == _msg(b"N", b"SWARNING\0VWARNING\0C01000\0Mmasked\0\0")


def test_builders_and_constants() -> None:
    assert P.ready_for_query("I") == _msg(b"Z", b"I") == P.READY_IDLE
    assert P.ready_for_query(TransactionStatus.IN_TRANSACTION) == _msg(b"Z", b"T")
    assert P.ready_for_query("E") == _msg(b"Z", b"E")
    assert P.backend_key_data(7, 9) == _msg(b"K", i32(7) + i32(9))
    assert P.auth_ok() == _auth(0)
    assert P.auth_sasl(["SCRAM-SHA-256"]) == _auth(10, b"SCRAM-SHA-256\0\0")
    assert P.auth_sasl_continue(b"r=x") == _auth(11, b"r=x")
    assert P.auth_sasl_final(b"v=x") == _auth(12, b"v=x")
    assert P.auth_md5_password(b"abcd") == _auth(5, b"abcd")
    assert P.auth_cleartext_password() == _auth(3)
    assert P.parameter_status("TimeZone", "UTC") == _msg(b"S", b"TimeZone\0UTC\0")
    assert P.query(b"SELECT 1") == _msg(b"Q", b"SELECT 1\0")
    assert P.parse("s", b"SELECT $1", [23]) == _msg(b"P", b"s\0SELECT $1\0" + i16(1) + i32(23))
    assert P.bind("", "s", [b"1", None]) == _msg(
        b"B", b"\0s\0" + i16(0) + i16(2) + i32(1) + b"1" + i32(-1) + i16(0)
    )
    assert P.execute() == _msg(b"E", b"\0" + i32(0))
    assert P.describe("P") == _msg(b"D", b"P\0")
    assert P.close("S", "s") == _msg(b"C", b"Ss\0")
    assert P.password_message(b"pw") == _msg(b"p", b"pw\0")
    assert P.sasl_initial_response("SCRAM-SHA-256", b"n,,") == _msg(
        b"p", b"SCRAM-SHA-256\0" + i32(3) + b"n,,"
    )
    assert P.sasl_response(b"c=biws") == _msg(b"p", b"c=biws")
    assert P.command_complete("SELECT 3") == _msg(b"C", b"SELECT 3\0")
    assert P.data_row([b"a", None]) == _msg(b"D", i16(2) + i32(1) + b"a" + i32(-1))
    assert (
        P.row_description([FieldDescription("x")])
        == RowDescription((FieldDescription("x", 0, 0, 25, -1, -1, 0),)).encode()
    )
    constants = {
        P.SYNC: Sync(),
        P.FLUSH: Flush(),
        P.TERMINATE: Terminate(),
        P.COPY_DONE: CopyDone(),
        P.PARSE_COMPLETE: ParseComplete(),
        P.BIND_COMPLETE: BindComplete(),
        P.CLOSE_COMPLETE: CloseComplete(),
        P.NO_DATA: NoData(),
        P.EMPTY_QUERY_RESPONSE: EmptyQueryResponse(),
        P.PORTAL_SUSPENDED: PortalSuspended(),
        P.AUTH_OK: AuthenticationOk(),
    }
    for raw, message in constants.items():
        assert raw == _msg(raw[:1], raw[5:]) and message.encode() == raw  # type: ignore[attr-defined]
    assert P.sync() == P.SYNC and P.flush() == P.FLUSH and P.terminate() == P.TERMINATE


# ---------------------------------------------------------------------------------------------
# Real traffic captured from PostgreSQL 15.18 (see module docstring)
# ---------------------------------------------------------------------------------------------

_CAPTURE = (
    "eNrtWkl25DgOvYvXtSAxcNj2oi+RrxYaQvc/Qn+AosRwyBG2s172ohyeJA4AiBmgf/369fbft7/egn8k4hfbU9bMSTPhSZKm"
    "BV940y1znjgw1iVJEXMxEf5iLUbwlG5pxlPMIQfsqYl9VU1buil+sGL1texrBHjI3kN4+/uvX2//ASlKjRjMt8+kLKwkUVZa"
    "8Vwk0srEyunYaGfo60HM0w32oZButNCSbrzSkonXtNGsygH75sSCGSzPMtNmh9Mqq6ZcdRKcVqesD/TqssOevwMOa5PUlJhz"
    "wmojtnBNN7BxSguzxCTKTLIQ2MgBRDOvolJlAqwqs5iIVEUnLpllSpQBjTPoYDA+82pHTRV/BSKsnB44B4kBKORYc878Pb58"
    "4yCBV6gb5J1UNiHsrAwceUoTQ0WgIaAEuDIONWtOq5Rkn1ULF4wuOcvKVRREm7aWrFAszPH6IKVDBRZwZzUO5ZwATgTqqBqA"
    "EN9GuJp2TnLLFegqFBUTbEZRwQw25QIiSZtgTFhmFjAqygTurh1bKF3hlHetXr9uHMde22H7FOwU7MBfjGzJYEDCWAn5S+Iy"
    "7MFhHAvkAojVDBmGXnGCDQYQZBXReq4nsAJwE/bA7A0Ldrlhw8hj4pNeoy2ZMDd7x1pAwRM+I3ajDCtK2hwWu8u4AQddrq+2"
    "3l1Obg5ndzPqeMGdzL7rNuyZZd+TofGAvownBacbVlMj333sU0iVnSY11cPuw+k90tVmAL9R9QnOM93vaX8xVhv9HOGjbvhd"
    "KFAROzMMz7hD49wKE5ldJoR30MiR7uTlWLjDBW3RdNU5boY8nTr2sTM/oPEgoYj9Jl12+SaHt7bzNkkafHu7kAm40eSlk+82"
    "nTOqmDbnFNbJ3C3RdyzLVIPOdCvwYN1opB4+SuM+ZuFAZcEPq8CPQ14SlXePHsgEveEXnijkJS93axaPWGCCK/9NDdLCE09N"
    "8U5YprBgoh8Qown+b0M8CaaYdiAzCjerrYnZzBI+s0A88HJUbeUY1WQPsYs7oVu4+HjEk23/7A55J/dyfd2Gj6+/I/tzOGSn"
    "LJYe/O2FY5dBZyfHvuuDHfSwg17s4IcdfOzoc+u9uG3PU/0I27sNEZFqzC9Ee7JjC5VMsOavNY1vAhniyyzR3lazdFhw7XYG"
    "8cKDQcEmFz44KWlXIXgGkzPCT2KzVGrjCE0O4z7ZeXYUBEuBlw4kZIpJOFJGvAduT27Mh6spMSgWjPsbWTRrNm47FUYARUdM"
    "Ip6xVrFaGsSRJbs6ZmP2AM6ZcvcOtoT+5WwZkBkSk6UGi+1wqfBVCIhmf3g0h9kdEUZMQRf/rbuLcVuCsgMW3mcKfd5laDml"
    "jAc3hlsYNWecjQo+GM+Wcbhboz63h57Vg5CFs9pyVjvRLoFszH6hXDRBsYAeDFGTAwgt5i2dt51RSes5s7skI7/60RAx4dMj"
    "jc7hoGEewQ+0zSPwPU8/UmRznR2dB7x3qF6dqXiyrLAHMQ1y5KsGf4pQlMVGjfkEFE10eDOxEnlEyciDLCY9nCfGB9A7wBc0"
    "gXLkJ5ZeNsyn+3XmGCNuI77u6uY9ud8/B9wk3TmAHXWPSBPUteoCSFPqjJYrmRykuH4/pVvv6Va3351mj3wj1eWa6oPYaST2"
    "GK1XZH+L2rARCiR6iBonhbXDv4ZTTq5h7KeSbBUTfCb0HM57zolmsbwHOYYi3UT9AohwRxEQNzFZTen2opL8KjjTOSu4kCvC"
    "SsxpYB55IGAVVDuWQFWJnr8m2bL+sUryDxwElaQY5QuIRP1n4ZZDmjkmy74RgZHfFnhHq2RxVFSSSMutwgQ15mJQqyJhxREF"
    "UYURiwSuzWPey0oSFSLCHExSiyKFhYqgCAapYuQq1FSRXIP4ouwFbsIBjSyEaKsnUUIX2IfIBNaA6+C1HfOnkvypJH8qya9W"
    "knAgJdx4qtdhq3t3P/xYK5CAMUMtSLPnnovPkM0c6U4b43N1A9mJfl92CXUmd+S2bFjARzgJdERdFKZQ78RDuRbHki14wOsF"
    "TagnOH1MaI6KTo5KTY6qdPNyo0logb2ucLvb5+rHzpJPVqh7LfQbtSnxcIL3LPqwbvwwDe7It+fa4MY1tazqlF3ULtnYJRuH"
    "n12irg8+9o9LjhzspyRnO8qoSgd3aSC33O9CxfNljnZQ01myXhU7d9MnJJVHSBeoHzorX+DEh3rmqXg8eyCfO/sVxZ6HIySu"
    "CJByXerdLXjuqeRBN6e7nhQS+BZ+rA60QOvZ9GK1M3xlscaGF3HQYaRurtlf1+Lz/Vta3Jfl8KLvAi3X0KKJrJ4bLGfkAfH0"
    "5LioSBFvNm/F7XUNBW8CVIszwOYRcW8eRI+iumcgI5beSkC6ytULKTrXI1209oZaitoxt9bkM/+S1HsijESBw3t5dhN/av2X"
    "8A/J2eHuMIwa//2o8Tse5x+2s59T/ytP/aTNwHNPpX6vzWDMzFE3smvKbPk1/MDinkWb32hWeLAqp16EDYlJc6UvQf2f2hJW"
    "yaAQTih6yVJueN3C1sWGH4OnE5RrBaVwEIxmlflFW+Kr4FAkzqmg7Ch2S8tWKlfvWsITwylbEYxiEa5fshXQ0x9rS/yBgyDo"
    "psk6AYAS7V4hT96G2IQUNT/Uo6ZZbpiJmLe7ZrYGhBS77vb7aAZ9EK/k5O0I2OKEgddtibRh90pbWmFjVtreEF9X8AYI7S4e"
    "GolyzFovsliBRRtwWB/Cbk0KzaJMSFEW2lBxYXfrzz9tS6TXbYmfRsRPI+Jf0IhYI5XZXNfE1+G8m2q7fsu3aYyop2WnEaqX"
    "geZ4LE1+BnUPL0itx/h7hBCLg3yNp54XtM/LEgipsfrhQv5L1+UPjZf98vwuiyjKO7Ye4aB4nplbNQG8BtcF3GoCvzBMe8Fj"
    "/9vjrqv2K5N3cOls0USYjuFp2N7xbb+zPhKqOYdhFX0wfl7kFQ1tZhjp53qW+h/tlWmo2nJP06KPfvbC/wJqav888Nhm+DCJ"
    "ux6nzC928rP07/iHADmfnrcY9Ju3VX//D9coBEI="
)


def _sessions() -> list[list[tuple[str, bytes]]]:
    raw = json.loads(zlib.decompress(base64.b64decode("".join(_CAPTURE))))
    return [[(d, bytes.fromhex(h)) for d, h in session] for session in raw]


def _replay(session: list[tuple[str, bytes]], split: random.Random | None) -> list[object]:
    """Frame and decode one recorded session; check every frame re-encodes exactly."""
    front = FrameBuffer(Side.FRONTEND, startup=True)
    back = FrameBuffer(Side.BACKEND)
    sasl_step = 0
    messages: list[object] = []
    for direction, chunk in session:
        pieces = [chunk]
        if split is not None:
            cuts = sorted(split.randrange(0, len(chunk) + 1) for _ in range(3))
            bounds = [0, *cuts, len(chunk)]
            pieces = [chunk[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        fb = front if direction == "F" else back
        for piece in pieces:
            for type_byte, frame in fb.feed(piece):
                message: object
                if type_byte == P.STARTUP_FRAME:
                    message = P.decode_startup(frame)
                elif direction == "F":
                    message = P.decode_frontend_frame(frame)
                    if isinstance(message, AuthResponse):  # we know the server asked for SASL
                        message = message.as_sasl_initial() if sasl_step == 0 else message.as_sasl()
                        sasl_step += 1
                else:
                    message = P.decode_backend_frame(frame)
                assert message.encode() == frame  # type: ignore[attr-defined]
                messages.append(message)
    assert front.buffered == 0 and back.buffered == 0
    return messages


def test_captured_sessions_round_trip_exactly() -> None:
    sessions = _sessions()
    assert len(sessions) == 3
    seen: set[type] = set()
    for session in sessions:
        messages = _replay(session, None)
        assert messages == _replay(session, random.Random(len(session)))
        seen |= {type(m) for m in messages}
        assert isinstance(messages[0], StartupMessage)
        assert messages[0].user == "teller_sz01"
    assert {
        NegotiateProtocolVersion,
        AuthenticationSASL,
        SASLInitialResponse,
        SASLResponse,
        AuthenticationSASLFinal,
        BackendKeyData,
        ParameterStatus,
        Query,
        Parse,
        Bind,
        Describe,
        Execute,
        Close,
        Sync,
        RowDescription,
        DataRow,
        CommandComplete,
        ErrorResponse,
        NoticeResponse,
        NotificationResponse,
        CopyInResponse,
        CopyOutResponse,
        CopyData,
        CopyDone,
        EmptyQueryResponse,
        FunctionCall,
        FunctionCallResponse,
        ParameterDescription,
        NoData,
        PortalSuspended,
        CloseComplete,
        Terminate,
    } <= seen


def test_captured_extended_protocol_details() -> None:
    messages = _replay(_sessions()[1], None)
    bind = next(m for m in messages if isinstance(m, Bind))
    assert bind.params == (b"\x00)", "äbc".encode(), None)  # binary int2 41, text, NULL
    assert bind.param_formats == (1, 0, 0)
    err = next(m for m in messages if isinstance(m, ErrorResponse))
    assert err.sqlstate == "42P01" and "no_such_table" in err.message
    statuses = [m.status for m in messages if isinstance(m, ReadyForQuery)]
    assert TransactionStatus.IN_TRANSACTION in statuses


def test_captured_stream_one_byte_at_a_time() -> None:
    session = _sessions()[0]
    backend = b"".join(chunk for d, chunk in session if d == "B")
    whole = FrameBuffer(Side.BACKEND).feed(backend)
    fb = FrameBuffer(Side.BACKEND)
    bytewise = [f for i in range(len(backend)) for f in fb.feed(backend[i : i + 1])]
    assert bytewise == whole and len(whole) > 40


# ---------------------------------------------------------------------------------------------
# Throughput guard (a loose bound: catches quadratic or per-byte regressions, not noise)
# ---------------------------------------------------------------------------------------------


def _framing_benchmark(count: int) -> float:
    """Microseconds per message to frame ``count`` DataRows arriving in 64 KiB reads."""
    row = P.data_row([b"12345", b"hello world", None, b"2024-01-01"])
    stream = row * count
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    fb = FrameBuffer(Side.BACKEND)
    start = time.perf_counter()
    framed = 0
    for chunk in chunks:
        framed += len(fb.feed(chunk))
    elapsed = time.perf_counter() - start
    assert framed == count
    return elapsed / count * 1e6


def test_framing_throughput_guard() -> None:
    assert _framing_benchmark(20_000) < 20.0  # measured ~0.8 µs/message on the 2-core dev box


if __name__ == "__main__":
    print(f"FrameBuffer: {_framing_benchmark(100_000):.3f} µs/message (100k DataRows)")
