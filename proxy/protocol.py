"""Sans-IO codec for the PostgreSQL frontend/backend protocol, version 3.0.

Nothing here touches a socket: bytes go in, messages (or frames) come out, and messages turn
back into bytes. The proxy's asyncio shell owns the sockets and calls into this module.

Data flow through the proxy::

    socket bytes --> FrameBuffer.feed() --> [(type_byte, frame_bytes), ...]      (hot path)
                                                |
                     only for the types the session must inspect (Query, Parse, Bind,
                     RowDescription, ErrorResponse, ReadyForQuery, ...):
                                                v
                     decode_frontend(type, payload) / decode_backend(type, payload)
                                                |
                                                v
                     frozen dataclass message --> .encode() --> bytes --> socket

Frames that the session does not need to understand (DataRow, CopyData, ...) are forwarded as
the exact ``frame_bytes`` they arrived as, without decoding.

Design points:

* Every message is a frozen dataclass with ``decode(payload)`` (payload = the bytes after the
  5-byte type + length header; for startup packets, the bytes after the 4-byte length) and
  ``encode()`` (the full message). ``encode(decode(x)) == x`` byte for byte: decoders are
  strict (exactly one representation is accepted), so a message that the proxy inspected and
  one that PostgreSQL parses are the same message.
* SQL text (``Query.sql``, ``Parse.query``) is kept as raw ``bytes``: the client encoding may be
  anything (GBK, LATIN1 ...), and only the caller knows it. ``text(encoding)`` decodes it
  strictly, so undecodable SQL raises instead of being silently mangled (fail closed).
* Other wire strings (statement and portal names, column names, error fields, parameter names)
  are ``str`` decoded as UTF-8 with ``surrogateescape``: lossless for any byte sequence, so
  re-encoding is exact even when the bytes are not UTF-8.
* Any malformed input raises :class:`ProtocolError` (never ``struct.error`` or ``IndexError``);
  the caller answers it with a FATAL ErrorResponse built by :func:`error_response`.
* Decoders reject what PostgreSQL itself would reject as a protocol violation, plus one
  deliberate extra: duplicate startup parameters (PostgreSQL takes the last ``user``; a proxy
  that read the first would check the wrong login).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "ProtocolError",
    "TransactionStatus",
    "Side",
    "FrameBuffer",
    "decode_frontend",
    "decode_backend",
    "decode_frontend_frame",
    "decode_backend_frame",
    "decode_startup",
    "python_encoding",
]

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

PROTOCOL_3_0 = 196608  # (3 << 16) | 0
SSL_REQUEST_CODE = 80877103  # (1234 << 16) | 5679
GSSENC_REQUEST_CODE = 80877104  # (1234 << 16) | 5680
CANCEL_REQUEST_CODE = 80877102  # (1234 << 16) | 5678

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
MAX_STARTUP_PACKET_LENGTH = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH

STARTUP_FRAME = 0  # the "type byte" FrameBuffer reports for a startup-phase packet

PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
PROGRAM_LIMIT_EXCEEDED = "54000"

# Message types sent by the frontend (client) and by the backend (server). Several letters mean
# different things in each direction ('D' Describe / DataRow, 'S' Sync / ParameterStatus, ...).
FRONTEND_TYPES = b"QPBDECHSdcfFXp"
BACKEND_TYPES = b"RK23CdcGHWDIEVvnNAtS1sZT"

_TEXT = "utf-8"
_ERRORS = "surrogateescape"

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I32I32 = struct.Struct("!ii")
_i32_unpack_from = _I32.unpack_from
_pack_i32 = _I32.pack
_pack_i16 = _I16.pack
_pack_u16 = _U16.pack
_pack_u32 = _U32.pack


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue.

    ``sqlstate`` and ``message`` are what the caller puts in the FATAL ErrorResponse it sends
    before closing (``08P01`` protocol_violation in almost every case, as PostgreSQL does).
    """

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message


class TransactionStatus(str, enum.Enum):
    """The backend transaction status carried by ReadyForQuery."""

    IDLE = "I"
    IN_TRANSACTION = "T"
    FAILED = "E"


class Side(enum.Enum):
    """Which peer sent the bytes a :class:`FrameBuffer` parses."""

    FRONTEND = "frontend"  # client -> proxy
    BACKEND = "backend"  # server -> proxy


def python_encoding(pg_encoding: str) -> str:
    """Map a PostgreSQL ``client_encoding`` name to a Python codec name.

    Why: ``Query.text()`` needs the client's encoding to hand the SQL to the rewriter, and
    PostgreSQL's names (``UTF8``, ``WIN1252``, ``EUC_CN``) are not Python's. Unknown names raise
    ``ProtocolError`` (0A000): a proxy that cannot read the SQL must not guess.

    >>> python_encoding("UTF8"), python_encoding("gbk"), python_encoding("LATIN1")
    ('utf-8', 'gbk', 'latin-1')
    """
    key = pg_encoding.upper().replace("-", "").replace("_", "")
    try:
        return _PG_ENCODINGS[key]
    except KeyError:
        raise ProtocolError(
            FEATURE_NOT_SUPPORTED, f"client_encoding {pg_encoding!r} is not supported"
        ) from None


_PG_ENCODINGS: dict[str, str] = {
    "UTF8": "utf-8",
    "UNICODE": "utf-8",
    "SQLASCII": "ascii",
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3",
    "LATIN4": "iso8859-4",
    "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13",
    "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16",
    "ISO88595": "iso8859-5",
    "ISO88596": "iso8859-6",
    "ISO88597": "iso8859-7",
    "ISO88598": "iso8859-8",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUCCN": "gb2312",
    "EUCJP": "euc-jp",
    "EUCKR": "euc-kr",
    "EUCJIS2004": "euc-jis-2004",
    "GBK": "gbk",
    "GB18030": "gb18030",
    "BIG5": "big5",
    "SJIS": "shift-jis",
    "SHIFTJIS2004": "shift-jis-2004",
    "UHC": "cp949",
    "JOHAB": "johab",
}


# ---------------------------------------------------------------------------------------------
# Low-level readers and writers
# ---------------------------------------------------------------------------------------------


def _bad(what: str, detail: str = "") -> ProtocolError:
    suffix = f": {detail}" if detail else ""
    return ProtocolError(PROTOCOL_VIOLATION, f"invalid {what} message format{suffix}")


class _Reader:
    """A bounds-checked cursor over one message payload; every overrun is a ProtocolError."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def _need(self, n: int) -> int:
        pos = self.pos
        if n < 0 or pos + n > len(self.buf):
            raise _bad(self.what, "insufficient data left in message")
        self.pos = pos + n
        return pos

    def byte(self) -> int:
        return self.buf[self._need(1)]

    def int16(self) -> int:
        return int(_I16.unpack_from(self.buf, self._need(2))[0])

    def uint16(self) -> int:
        return int(_U16.unpack_from(self.buf, self._need(2))[0])

    def int32(self) -> int:
        return int(_I32.unpack_from(self.buf, self._need(4))[0])

    def uint32(self) -> int:
        return int(_U32.unpack_from(self.buf, self._need(4))[0])

    def raw(self, n: int) -> bytes:
        start = self._need(n)
        return self.buf[start : start + n]

    def cbytes(self) -> bytes:
        """A NUL-terminated string as raw bytes (terminator consumed, not returned)."""
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise _bad(self.what, "missing string terminator")
        value = self.buf[self.pos : end]
        self.pos = end + 1
        return value

    def cstr(self) -> str:
        return self.cbytes().decode(_TEXT, _ERRORS)

    def nullable(self) -> bytes | None:
        """An Int32 length (-1 = NULL) followed by that many bytes."""
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise _bad(self.what, f"invalid value length {n}")
        return self.raw(n)

    def rest(self) -> bytes:
        value = self.buf[self.pos :]
        self.pos = len(self.buf)
        return value

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise _bad(self.what, "trailing data after message")


def _cstr(value: str) -> bytes:
    raw = value.encode(_TEXT, _ERRORS)
    if b"\0" in raw:
        # An embedded NUL would end the string early and shift every later field.
        raise ValueError(f"NUL byte in protocol string {value!r}")
    return raw + b"\0"


def _cbytes(value: bytes) -> bytes:
    if b"\0" in value:
        raise ValueError("NUL byte in protocol string")
    return value + b"\0"


def _frame(type_byte: bytes, payload: bytes) -> bytes:
    return type_byte + _pack_i32(len(payload) + 4) + payload


def _nullable(value: bytes | None) -> bytes:
    return b"\xff\xff\xff\xff" if value is None else _pack_i32(len(value)) + value


def _int16_list(values: tuple[int, ...]) -> bytes:
    return _pack_u16(len(values)) + b"".join(_pack_i16(v) for v in values)


def _read_int16_list(r: _Reader) -> tuple[int, ...]:
    return tuple(r.int16() for _ in range(r.uint16()))


def _read_nullable_list(r: _Reader, count: int) -> tuple[bytes | None, ...]:
    return tuple(r.nullable() for _ in range(count))


def _empty(payload: bytes, what: str) -> None:
    if payload:
        raise _bad(what, "unexpected payload")


# ---------------------------------------------------------------------------------------------
# Messages sent by either side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopyData:
    """'d': a chunk of COPY data (both directions); forwarded untouched."""

    TYPE: ClassVar[bytes] = b"d"
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> CopyData:
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return _frame(b"d", self.data)


@dataclass(frozen=True, slots=True)
class CopyDone:
    """'c': end of COPY data (both directions)."""

    TYPE: ClassVar[bytes] = b"c"

    @classmethod
    def decode(cls, payload: bytes) -> CopyDone:
        _empty(payload, "CopyDone")
        return cls()

    def encode(self) -> bytes:
        return COPY_DONE


# ---------------------------------------------------------------------------------------------
# Frontend messages
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """'Q': a simple-protocol query string, possibly several statements.

    ``sql`` is the raw bytes in the client encoding; use :meth:`text` to read it.
    """

    TYPE: ClassVar[bytes] = b"Q"
    sql: bytes

    @classmethod
    def decode(cls, payload: bytes) -> Query:
        # Exactly one NUL, at the end: PostgreSQL reads up to the first NUL and then rejects
        # trailing bytes, so anything else is not a query PostgreSQL would run.
        if not payload or payload.find(b"\0") != len(payload) - 1:
            raise _bad("Query", "query string must be NUL-terminated once")
        return cls(payload[:-1])

    def encode(self) -> bytes:
        return _frame(b"Q", _cbytes(self.sql))

    def text(self, encoding: str = "utf-8") -> str:
        """The SQL decoded strictly (``UnicodeDecodeError`` on bytes invalid in ``encoding``)."""
        return self.sql.decode(encoding)


@dataclass(frozen=True, slots=True)
class Parse:
    """'P': create a prepared statement (extended protocol)."""

    TYPE: ClassVar[bytes] = b"P"
    name: str
    query: bytes
    param_types: tuple[int, ...] = ()

    @classmethod
    def decode(cls, payload: bytes) -> Parse:
        r = _Reader(payload, "Parse")
        name = r.cstr()
        query = r.cbytes()
        types = tuple(r.uint32() for _ in range(r.uint16()))
        r.end()
        return cls(name, query, types)

    def encode(self) -> bytes:
        return _frame(
            b"P",
            _cstr(self.name)
            + _cbytes(self.query)
            + _pack_u16(len(self.param_types))
            + b"".join(_pack_u32(t) for t in self.param_types),
        )

    def text(self, encoding: str = "utf-8") -> str:
        """The SQL decoded strictly (``UnicodeDecodeError`` on bytes invalid in ``encoding``)."""
        return self.query.decode(encoding)


@dataclass(frozen=True, slots=True)
class Bind:
    """'B': bind parameters to a prepared statement, creating a portal.

    ``params`` holds each value's raw bytes, ``None`` for SQL NULL (length -1 on the wire).
    """

    TYPE: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    @classmethod
    def decode(cls, payload: bytes) -> Bind:
        r = _Reader(payload, "Bind")
        portal = r.cstr()
        statement = r.cstr()
        param_formats = _read_int16_list(r)
        params = _read_nullable_list(r, r.uint16())
        result_formats = _read_int16_list(r)
        r.end()
        return cls(portal, statement, param_formats, params, result_formats)

    def encode(self) -> bytes:
        return _frame(
            b"B",
            b"".join(
                (
                    _cstr(self.portal),
                    _cstr(self.statement),
                    _int16_list(self.param_formats),
                    _pack_u16(len(self.params)),
                    *(_nullable(p) for p in self.params),
                    _int16_list(self.result_formats),
                )
            ),
        )


def _read_kind(r: _Reader, what: str) -> str:
    kind = r.byte()
    if kind not in (0x53, 0x50):  # 'S' statement, 'P' portal
        raise _bad(what, f"invalid subtype {kind!r}")
    return chr(kind)


@dataclass(frozen=True, slots=True)
class Describe:
    """'D': describe a prepared statement (kind 'S') or a portal (kind 'P')."""

    TYPE: ClassVar[bytes] = b"D"
    kind: str
    name: str

    @classmethod
    def decode(cls, payload: bytes) -> Describe:
        r = _Reader(payload, "Describe")
        kind = _read_kind(r, "Describe")
        name = r.cstr()
        r.end()
        return cls(kind, name)

    def encode(self) -> bytes:
        return _frame(b"D", self.kind.encode("ascii") + _cstr(self.name))


@dataclass(frozen=True, slots=True)
class Execute:
    """'E': run a portal; ``max_rows`` 0 means no limit."""

    TYPE: ClassVar[bytes] = b"E"
    portal: str = ""
    max_rows: int = 0

    @classmethod
    def decode(cls, payload: bytes) -> Execute:
        r = _Reader(payload, "Execute")
        portal = r.cstr()
        max_rows = r.int32()
        r.end()
        return cls(portal, max_rows)

    def encode(self) -> bytes:
        return _frame(b"E", _cstr(self.portal) + _pack_i32(self.max_rows))


@dataclass(frozen=True, slots=True)
class Close:
    """'C' (frontend): close a prepared statement (kind 'S') or a portal (kind 'P')."""

    TYPE: ClassVar[bytes] = b"C"
    kind: str
    name: str

    @classmethod
    def decode(cls, payload: bytes) -> Close:
        r = _Reader(payload, "Close")
        kind = _read_kind(r, "Close")
        name = r.cstr()
        r.end()
        return cls(kind, name)

    def encode(self) -> bytes:
        return _frame(b"C", self.kind.encode("ascii") + _cstr(self.name))


@dataclass(frozen=True, slots=True)
class Flush:
    """'H' (frontend): ask the server to send what it has buffered."""

    TYPE: ClassVar[bytes] = b"H"

    @classmethod
    def decode(cls, payload: bytes) -> Flush:
        _empty(payload, "Flush")
        return cls()

    def encode(self) -> bytes:
        return FLUSH


@dataclass(frozen=True, slots=True)
class Sync:
    """'S' (frontend): end of an extended-protocol batch; the server answers ReadyForQuery."""

    TYPE: ClassVar[bytes] = b"S"

    @classmethod
    def decode(cls, payload: bytes) -> Sync:
        _empty(payload, "Sync")
        return cls()

    def encode(self) -> bytes:
        return SYNC


@dataclass(frozen=True, slots=True)
class CopyFail:
    """'f': the frontend aborts a COPY FROM STDIN with an error message."""

    TYPE: ClassVar[bytes] = b"f"
    message: str

    @classmethod
    def decode(cls, payload: bytes) -> CopyFail:
        r = _Reader(payload, "CopyFail")
        message = r.cstr()
        r.end()
        return cls(message)

    def encode(self) -> bytes:
        return _frame(b"f", _cstr(self.message))


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """'F': the legacy fast-path function call (a way to run a function without SQL text)."""

    TYPE: ClassVar[bytes] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    @classmethod
    def decode(cls, payload: bytes) -> FunctionCall:
        r = _Reader(payload, "FunctionCall")
        oid = r.uint32()
        arg_formats = _read_int16_list(r)
        args = _read_nullable_list(r, r.uint16())
        result_format = r.int16()
        r.end()
        return cls(oid, arg_formats, args, result_format)

    def encode(self) -> bytes:
        return _frame(
            b"F",
            b"".join(
                (
                    _pack_u32(self.function_oid),
                    _int16_list(self.arg_formats),
                    _pack_u16(len(self.args)),
                    *(_nullable(a) for a in self.args),
                    _pack_i16(self.result_format),
                )
            ),
        )


@dataclass(frozen=True, slots=True)
class Terminate:
    """'X': the frontend closes the session."""

    TYPE: ClassVar[bytes] = b"X"

    @classmethod
    def decode(cls, payload: bytes) -> Terminate:
        _empty(payload, "Terminate")
        return cls()

    def encode(self) -> bytes:
        return TERMINATE


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """'p' as it arrives: the payload of a PasswordMessage-family message, undecoded.

    The five 'p' messages share one type byte; which one it is depends on the authentication
    request the server sent last, which only the caller knows. So ``decode_frontend`` returns
    this and the caller re-decodes with :meth:`as_password`, :meth:`as_sasl_initial`,
    :meth:`as_sasl` or :meth:`as_gss`.
    """

    TYPE: ClassVar[bytes] = b"p"
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> AuthResponse:
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return _frame(b"p", self.data)

    def as_password(self) -> PasswordMessage:
        return PasswordMessage.decode(self.data)

    def as_sasl_initial(self) -> SASLInitialResponse:
        return SASLInitialResponse.decode(self.data)

    def as_sasl(self) -> SASLResponse:
        return SASLResponse.decode(self.data)

    def as_gss(self) -> GSSResponse:
        return GSSResponse.decode(self.data)


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """'p' after AuthenticationCleartextPassword / MD5Password: the (hashed) password bytes."""

    TYPE: ClassVar[bytes] = b"p"
    password: bytes

    @classmethod
    def decode(cls, payload: bytes) -> PasswordMessage:
        r = _Reader(payload, "PasswordMessage")
        password = r.cbytes()
        r.end()
        return cls(password)

    def encode(self) -> bytes:
        return _frame(b"p", _cbytes(self.password))


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """'p' after AuthenticationSASL: the chosen mechanism and the client-first-message.

    ``data`` is ``None`` when the client sent length -1 (no initial response).
    """

    TYPE: ClassVar[bytes] = b"p"
    mechanism: str
    data: bytes | None

    @classmethod
    def decode(cls, payload: bytes) -> SASLInitialResponse:
        r = _Reader(payload, "SASLInitialResponse")
        mechanism = r.cstr()
        data = r.nullable()
        r.end()
        return cls(mechanism, data)

    def encode(self) -> bytes:
        return _frame(b"p", _cstr(self.mechanism) + _nullable(self.data))


@dataclass(frozen=True, slots=True)
class SASLResponse:
    """'p' after AuthenticationSASLContinue: the client-final-message."""

    TYPE: ClassVar[bytes] = b"p"
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> SASLResponse:
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return _frame(b"p", self.data)


@dataclass(frozen=True, slots=True)
class GSSResponse:
    """'p' during GSSAPI/SSPI authentication: an opaque token."""

    TYPE: ClassVar[bytes] = b"p"
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> GSSResponse:
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return _frame(b"p", self.data)


# ---------------------------------------------------------------------------------------------
# Backend messages: authentication
# ---------------------------------------------------------------------------------------------


def _auth_payload(code: int, extra: bytes = b"") -> bytes:
    return _frame(b"R", _pack_i32(code) + extra)


def _auth_body(payload: bytes, code: int, what: str) -> bytes:
    if len(payload) < 4 or _i32_unpack_from(payload, 0)[0] != code:
        raise _bad(what, "wrong authentication code")
    return payload[4:]


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    """'R' code 0: authentication succeeded."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 0

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationOk:
        _empty(_auth_body(payload, cls.CODE, "AuthenticationOk"), "AuthenticationOk")
        return cls()

    def encode(self) -> bytes:
        return AUTH_OK


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5:
    """'R' code 2: Kerberos V5 (no longer supported by PostgreSQL, decoded for completeness)."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 2

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationKerberosV5:
        _empty(
            _auth_body(payload, cls.CODE, "AuthenticationKerberosV5"), "AuthenticationKerberosV5"
        )
        return cls()

    def encode(self) -> bytes:
        return _auth_payload(self.CODE)


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    """'R' code 3: send the password in clear."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 3

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationCleartextPassword:
        body = _auth_body(payload, cls.CODE, "AuthenticationCleartextPassword")
        _empty(body, "AuthenticationCleartextPassword")
        return cls()

    def encode(self) -> bytes:
        return _auth_payload(self.CODE)


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    """'R' code 5: send md5(md5(password + user) + salt)."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 5
    salt: bytes

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationMD5Password:
        body = _auth_body(payload, cls.CODE, "AuthenticationMD5Password")
        if len(body) != 4:
            raise _bad("AuthenticationMD5Password", "salt must be 4 bytes")
        return cls(body)

    def encode(self) -> bytes:
        if len(self.salt) != 4:
            raise ValueError("MD5 salt must be 4 bytes")
        return _auth_payload(self.CODE, self.salt)


@dataclass(frozen=True, slots=True)
class AuthenticationSCMCredential:
    """'R' code 6: SCM credentials (removed from PostgreSQL, decoded for completeness)."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 6

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationSCMCredential:
        body = _auth_body(payload, cls.CODE, "AuthenticationSCMCredential")
        _empty(body, "AuthenticationSCMCredential")
        return cls()

    def encode(self) -> bytes:
        return _auth_payload(self.CODE)


@dataclass(frozen=True, slots=True)
class AuthenticationGSS:
    """'R' code 7: start GSSAPI authentication."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 7

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationGSS:
        _empty(_auth_body(payload, cls.CODE, "AuthenticationGSS"), "AuthenticationGSS")
        return cls()

    def encode(self) -> bytes:
        return _auth_payload(self.CODE)


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue:
    """'R' code 8: a GSSAPI or SSPI token from the server."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 8
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationGSSContinue:
        return cls(_auth_body(payload, cls.CODE, "AuthenticationGSSContinue"))

    def encode(self) -> bytes:
        return _auth_payload(self.CODE, self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI:
    """'R' code 9: start SSPI authentication."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 9

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationSSPI:
        _empty(_auth_body(payload, cls.CODE, "AuthenticationSSPI"), "AuthenticationSSPI")
        return cls()

    def encode(self) -> bytes:
        return _auth_payload(self.CODE)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    """'R' code 10: start SASL; lists the mechanisms the server accepts, in its preference."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 10
    mechanisms: tuple[str, ...]

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationSASL:
        r = _Reader(_auth_body(payload, cls.CODE, "AuthenticationSASL"), "AuthenticationSASL")
        mechanisms = []
        while True:
            name = r.cstr()
            if not name:
                break
            mechanisms.append(name)
        r.end()
        return cls(tuple(mechanisms))

    def encode(self) -> bytes:
        if not all(self.mechanisms):
            raise ValueError("empty SASL mechanism name")
        return _auth_payload(self.CODE, b"".join(_cstr(m) for m in self.mechanisms) + b"\0")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    """'R' code 11: a SASL challenge (for SCRAM, the server-first-message)."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 11
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationSASLContinue:
        return cls(_auth_body(payload, cls.CODE, "AuthenticationSASLContinue"))

    def encode(self) -> bytes:
        return _auth_payload(self.CODE, self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    """'R' code 12: SASL outcome data (for SCRAM, the server-final-message)."""

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 12
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationSASLFinal:
        return cls(_auth_body(payload, cls.CODE, "AuthenticationSASLFinal"))

    def encode(self) -> bytes:
        return _auth_payload(self.CODE, self.data)


AuthenticationMessage = (
    AuthenticationOk
    | AuthenticationKerberosV5
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSCMCredential
    | AuthenticationGSS
    | AuthenticationGSSContinue
    | AuthenticationSSPI
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)

_AUTH_CLASSES: dict[int, Callable[[bytes], AuthenticationMessage]] = {
    c.CODE: c.decode
    for c in (
        AuthenticationOk,
        AuthenticationKerberosV5,
        AuthenticationCleartextPassword,
        AuthenticationMD5Password,
        AuthenticationSCMCredential,
        AuthenticationGSS,
        AuthenticationGSSContinue,
        AuthenticationSSPI,
        AuthenticationSASL,
        AuthenticationSASLContinue,
        AuthenticationSASLFinal,
    )
}


def decode_authentication(payload: bytes) -> AuthenticationMessage:
    """Decode any 'R' message by its Int32 code."""
    if len(payload) < 4:
        raise _bad("Authentication", "missing code")
    code = _i32_unpack_from(payload, 0)[0]
    try:
        decoder = _AUTH_CLASSES[code]
    except KeyError:
        raise _bad("Authentication", f"unknown authentication code {code}") from None
    return decoder(payload)


# ---------------------------------------------------------------------------------------------
# Backend messages: everything else
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """'K': the process id and secret key a client needs to send a CancelRequest.

    Protocol 3.0 keys are 4 bytes; the proxy never lets a 3.2 (variable-length key) session
    through, so the key is an Int32 here.
    """

    TYPE: ClassVar[bytes] = b"K"
    pid: int
    secret_key: int

    @classmethod
    def decode(cls, payload: bytes) -> BackendKeyData:
        if len(payload) != 8:
            raise _bad("BackendKeyData", "expected 8 bytes")
        pid, key = _I32I32.unpack(payload)
        return cls(pid, key)

    def encode(self) -> bytes:
        return b"K\x00\x00\x00\x0c" + _I32I32.pack(self.pid, self.secret_key)


@dataclass(frozen=True, slots=True)
class ParseComplete:
    """'1': Parse succeeded."""

    TYPE: ClassVar[bytes] = b"1"

    @classmethod
    def decode(cls, payload: bytes) -> ParseComplete:
        _empty(payload, "ParseComplete")
        return cls()

    def encode(self) -> bytes:
        return PARSE_COMPLETE


@dataclass(frozen=True, slots=True)
class BindComplete:
    """'2': Bind succeeded."""

    TYPE: ClassVar[bytes] = b"2"

    @classmethod
    def decode(cls, payload: bytes) -> BindComplete:
        _empty(payload, "BindComplete")
        return cls()

    def encode(self) -> bytes:
        return BIND_COMPLETE


@dataclass(frozen=True, slots=True)
class CloseComplete:
    """'3': Close succeeded."""

    TYPE: ClassVar[bytes] = b"3"

    @classmethod
    def decode(cls, payload: bytes) -> CloseComplete:
        _empty(payload, "CloseComplete")
        return cls()

    def encode(self) -> bytes:
        return CLOSE_COMPLETE


@dataclass(frozen=True, slots=True)
class NoData:
    """'n': the described statement or portal returns no rows."""

    TYPE: ClassVar[bytes] = b"n"

    @classmethod
    def decode(cls, payload: bytes) -> NoData:
        _empty(payload, "NoData")
        return cls()

    def encode(self) -> bytes:
        return NO_DATA


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    """'I': the query string was empty (replaces CommandComplete)."""

    TYPE: ClassVar[bytes] = b"I"

    @classmethod
    def decode(cls, payload: bytes) -> EmptyQueryResponse:
        _empty(payload, "EmptyQueryResponse")
        return cls()

    def encode(self) -> bytes:
        return EMPTY_QUERY_RESPONSE


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    """'s': Execute stopped at its row limit; the portal can be executed again."""

    TYPE: ClassVar[bytes] = b"s"

    @classmethod
    def decode(cls, payload: bytes) -> PortalSuspended:
        _empty(payload, "PortalSuspended")
        return cls()

    def encode(self) -> bytes:
        return PORTAL_SUSPENDED


@dataclass(frozen=True, slots=True)
class CommandComplete:
    """'C' (backend): a statement finished; ``tag`` is e.g. ``SELECT 5`` or ``INSERT 0 1``."""

    TYPE: ClassVar[bytes] = b"C"
    tag: str

    @classmethod
    def decode(cls, payload: bytes) -> CommandComplete:
        r = _Reader(payload, "CommandComplete")
        tag = r.cstr()
        r.end()
        return cls(tag)

    def encode(self) -> bytes:
        return _frame(b"C", _cstr(self.tag))

    @property
    def command(self) -> str:
        """The command word(s), e.g. ``SELECT``, ``INSERT``, ``CREATE TABLE``."""
        parts = self.tag.split(" ")
        while parts and parts[-1].isdigit():
            parts.pop()
        return " ".join(parts)

    @property
    def rows(self) -> int | None:
        """The row count the tag reports (last number), or ``None`` if it has none."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else None


@dataclass(frozen=True, slots=True)
class _CopyResponse:
    """Shared layout of CopyInResponse / CopyOutResponse / CopyBothResponse."""

    TYPE: ClassVar[bytes] = b"?"
    format: int  # overall: 0 text, 1 binary
    column_formats: tuple[int, ...] = ()

    @classmethod
    def _read(cls, payload: bytes) -> tuple[int, tuple[int, ...]]:
        r = _Reader(payload, cls.__name__)
        fmt = r.byte()
        formats = _read_int16_list(r)
        r.end()
        return fmt, formats

    def encode(self) -> bytes:
        return _frame(self.TYPE, bytes((self.format,)) + _int16_list(self.column_formats))


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    """'G': the server is ready for COPY FROM STDIN data."""

    TYPE: ClassVar[bytes] = b"G"

    @classmethod
    def decode(cls, payload: bytes) -> CopyInResponse:
        return cls(*cls._read(payload))


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    """'H' (backend): COPY TO STDOUT data follows."""

    TYPE: ClassVar[bytes] = b"H"

    @classmethod
    def decode(cls, payload: bytes) -> CopyOutResponse:
        return cls(*cls._read(payload))


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    """'W': bidirectional copy (streaming replication)."""

    TYPE: ClassVar[bytes] = b"W"

    @classmethod
    def decode(cls, payload: bytes) -> CopyBothResponse:
        return cls(*cls._read(payload))


@dataclass(frozen=True, slots=True)
class DataRow:
    """'D' (backend): one result row; each value is raw bytes or ``None`` for NULL."""

    TYPE: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    @classmethod
    def decode(cls, payload: bytes) -> DataRow:
        # Hand-rolled rather than _Reader: rows are the most numerous messages on the wire.
        size = len(payload)
        if size < 2:
            raise _bad("DataRow", "missing column count")
        count = (payload[0] << 8) | payload[1]
        pos = 2
        values: list[bytes | None] = []
        append = values.append
        for _ in range(count):
            if pos + 4 > size:
                raise _bad("DataRow", "insufficient data left in message")
            n = _i32_unpack_from(payload, pos)[0]
            pos += 4
            if n == -1:
                append(None)
                continue
            end = pos + n
            if n < 0 or end > size:
                raise _bad("DataRow", f"invalid value length {n}")
            append(payload[pos:end])
            pos = end
        if pos != size:
            raise _bad("DataRow", "trailing data after message")
        return cls(tuple(values))

    def encode(self) -> bytes:
        return _frame(b"D", _pack_u16(len(self.values)) + b"".join(map(_nullable, self.values)))


@dataclass(frozen=True, slots=True)
class _FieldsMessage:
    """Shared layout of ErrorResponse / NoticeResponse: (code letter, value) pairs, in order."""

    TYPE: ClassVar[bytes] = b"?"
    fields: tuple[tuple[str, str], ...]

    @classmethod
    def _read(cls, payload: bytes) -> tuple[tuple[str, str], ...]:
        r = _Reader(payload, cls.__name__)
        fields = []
        while True:
            code = r.byte()
            if code == 0:
                break
            fields.append((chr(code), r.cstr()))
        r.end()
        return tuple(fields)

    def encode(self) -> bytes:
        parts = []
        for code, value in self.fields:
            raw = code.encode("latin-1")
            if len(raw) != 1 or raw == b"\0":
                raise ValueError(f"invalid field code {code!r}")
            parts.append(raw + _cstr(value))
        parts.append(b"\0")
        return _frame(self.TYPE, b"".join(parts))

    def get(self, code: str, default: str | None = None) -> str | None:
        """The first value of field ``code`` (e.g. 'C' SQLSTATE, 'M' message, 'D' detail)."""
        for c, value in self.fields:
            if c == code:
                return value
        return default

    @property
    def severity(self) -> str:
        """The non-localized severity ('V', PostgreSQL 9.6+), else the localized one ('S')."""
        return self.get("V") or self.get("S") or ""

    @property
    def sqlstate(self) -> str:
        return self.get("C") or ""

    @property
    def message(self) -> str:
        return self.get("M") or ""

    @property
    def detail(self) -> str | None:
        return self.get("D")

    @property
    def hint(self) -> str | None:
        return self.get("H")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_FieldsMessage):
    """'E' (backend): an error; ends the current statement (and the session if FATAL)."""

    TYPE: ClassVar[bytes] = b"E"

    @classmethod
    def decode(cls, payload: bytes) -> ErrorResponse:
        return cls(cls._read(payload))


@dataclass(frozen=True, slots=True)
class NoticeResponse(_FieldsMessage):
    """'N': a notice or warning; may arrive at any time."""

    TYPE: ClassVar[bytes] = b"N"

    @classmethod
    def decode(cls, payload: bytes) -> NoticeResponse:
        return cls(cls._read(payload))


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    """'V': the result of a FunctionCall (``None`` for NULL)."""

    TYPE: ClassVar[bytes] = b"V"
    result: bytes | None

    @classmethod
    def decode(cls, payload: bytes) -> FunctionCallResponse:
        r = _Reader(payload, "FunctionCallResponse")
        result = r.nullable()
        r.end()
        return cls(result)

    def encode(self) -> bytes:
        return _frame(b"V", _nullable(self.result))


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """'v': the server supports only an older minor version and/or not these ``_pq_`` options."""

    TYPE: ClassVar[bytes] = b"v"
    # The docs call it the "newest minor version"; PostgreSQL actually sends the whole version
    # number (196608 for 3.0), so that is what is stored.
    newest_version: int
    unrecognized_options: tuple[str, ...] = ()

    @classmethod
    def decode(cls, payload: bytes) -> NegotiateProtocolVersion:
        r = _Reader(payload, "NegotiateProtocolVersion")
        minor = r.int32()
        count = r.int32()
        if count < 0:
            raise _bad("NegotiateProtocolVersion", "negative option count")
        options = tuple(r.cstr() for _ in range(count))
        r.end()
        return cls(minor, options)

    def encode(self) -> bytes:
        return _frame(
            b"v",
            _I32I32.pack(self.newest_version, len(self.unrecognized_options))
            + b"".join(_cstr(o) for o in self.unrecognized_options),
        )


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    """'A': a NOTIFY delivered to this session."""

    TYPE: ClassVar[bytes] = b"A"
    pid: int
    channel: str
    payload: str

    @classmethod
    def decode(cls, payload: bytes) -> NotificationResponse:
        r = _Reader(payload, "NotificationResponse")
        pid = r.int32()
        channel = r.cstr()
        text = r.cstr()
        r.end()
        return cls(pid, channel, text)

    def encode(self) -> bytes:
        return _frame(b"A", _pack_i32(self.pid) + _cstr(self.channel) + _cstr(self.payload))


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    """'t': the parameter type OIDs of a described prepared statement."""

    TYPE: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    @classmethod
    def decode(cls, payload: bytes) -> ParameterDescription:
        r = _Reader(payload, "ParameterDescription")
        oids = tuple(r.uint32() for _ in range(r.uint16()))
        r.end()
        return cls(oids)

    def encode(self) -> bytes:
        return _frame(
            b"t",
            _pack_u16(len(self.type_oids)) + b"".join(_pack_u32(o) for o in self.type_oids),
        )


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    """'S' (backend): a run-time parameter's current value (client_encoding, TimeZone, ...)."""

    TYPE: ClassVar[bytes] = b"S"
    name: str
    value: str

    @classmethod
    def decode(cls, payload: bytes) -> ParameterStatus:
        r = _Reader(payload, "ParameterStatus")
        name = r.cstr()
        value = r.cstr()
        r.end()
        return cls(name, value)

    def encode(self) -> bytes:
        return _frame(b"S", _cstr(self.name) + _cstr(self.value))


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """'Z': the server is idle and says what state the transaction is in."""

    TYPE: ClassVar[bytes] = b"Z"
    status: TransactionStatus

    @classmethod
    def decode(cls, payload: bytes) -> ReadyForQuery:
        if len(payload) != 1:
            raise _bad("ReadyForQuery", "expected 1 byte")
        try:
            return cls(TransactionStatus(chr(payload[0])))
        except ValueError:
            raise _bad("ReadyForQuery", f"unknown transaction status {payload!r}") from None

    def encode(self) -> bytes:
        return _READY[TransactionStatus(self.status)]


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 25  # text
    typlen: int = -1
    typmod: int = -1
    format: int = 0  # 0 text, 1 binary


_FIELD = struct.Struct("!IhIhih")


@dataclass(frozen=True, slots=True)
class RowDescription:
    """'T': the columns of the rows that follow."""

    TYPE: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    @classmethod
    def decode(cls, payload: bytes) -> RowDescription:
        r = _Reader(payload, "RowDescription")
        fields = []
        for _ in range(r.uint16()):
            name = r.cstr()
            start = r._need(_FIELD.size)
            fields.append(FieldDescription(name, *_FIELD.unpack_from(payload, start)))
        r.end()
        return cls(tuple(fields))

    def encode(self) -> bytes:
        parts = [_pack_u16(len(self.fields))]
        for f in self.fields:
            parts.append(_cstr(f.name))
            parts.append(
                _FIELD.pack(f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, f.format)
            )
        return _frame(b"T", b"".join(parts))


# ---------------------------------------------------------------------------------------------
# Startup-phase packets (no type byte)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first packet of a session: protocol version and ``name=value`` parameters.

    ``params`` keeps the client's order (``user``, ``database``, ``application_name``,
    ``options``, ``_pq_.*`` ...). Duplicate names are rejected (see the module docstring).
    """

    version: int
    params: dict[str, str]

    @classmethod
    def decode(cls, payload: bytes) -> StartupMessage:
        r = _Reader(payload, "startup packet")
        version = r.int32()
        if version >> 16 != 3:
            raise ProtocolError(
                FEATURE_NOT_SUPPORTED,
                f"unsupported frontend protocol {version >> 16}.{version & 0xFFFF}: "
                "server supports 3.0 to 3.0",
            )
        params: dict[str, str] = {}
        while True:
            name = r.cstr()
            if not name:
                break
            if name in params:
                raise _bad("startup packet", f"duplicate parameter {name!r}")
            params[name] = r.cstr()
        # PostgreSQL: "invalid startup packet layout: expected terminator as last byte"
        r.end()
        return cls(version, params)

    def encode(self) -> bytes:
        body = _pack_i32(self.version) + b"".join(
            _cstr(k) + _cstr(v) for k, v in self.params.items()
        )
        body += b"\0"
        return _pack_i32(len(body) + 4) + body

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def database(self) -> str | None:
        """The database name; PostgreSQL defaults it to the user name."""
        return self.params.get("database") or self.params.get("user")

    @property
    def minor_version(self) -> int:
        return self.version & 0xFFFF


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """Ask to upgrade the connection to TLS; the answer is one byte, 'S' or 'N'."""

    CODE: ClassVar[int] = SSL_REQUEST_CODE

    @classmethod
    def decode(cls, payload: bytes) -> SSLRequest:
        if len(payload) != 4 or _i32_unpack_from(payload, 0)[0] != cls.CODE:
            raise _bad("SSLRequest")
        return cls()

    def encode(self) -> bytes:
        return SSL_REQUEST


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """Ask to upgrade the connection to GSSAPI encryption; the answer is 'G' or 'N'."""

    CODE: ClassVar[int] = GSSENC_REQUEST_CODE

    @classmethod
    def decode(cls, payload: bytes) -> GSSENCRequest:
        if len(payload) != 4 or _i32_unpack_from(payload, 0)[0] != cls.CODE:
            raise _bad("GSSENCRequest")
        return cls()

    def encode(self) -> bytes:
        return GSSENC_REQUEST


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Sent on a fresh connection to cancel the query running in session (pid, secret_key)."""

    CODE: ClassVar[int] = CANCEL_REQUEST_CODE
    pid: int
    secret_key: int

    @classmethod
    def decode(cls, payload: bytes) -> CancelRequest:
        if len(payload) != 12 or _i32_unpack_from(payload, 0)[0] != cls.CODE:
            raise _bad("CancelRequest", "expected 16 bytes")
        pid, key = _I32I32.unpack_from(payload, 4)
        return cls(pid, key)

    def encode(self) -> bytes:
        return cancel_request(self.pid, self.secret_key)


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup(packet: bytes) -> StartupPacket:
    """Decode a whole startup-phase packet (its 4-byte length included).

    >>> decode_startup(bytes.fromhex("0000000804d2162f"))
    SSLRequest()
    """
    if len(packet) < 8 or _i32_unpack_from(packet, 0)[0] != len(packet):
        raise ProtocolError(PROTOCOL_VIOLATION, "invalid length of startup packet")
    if len(packet) > MAX_STARTUP_PACKET_LENGTH:
        raise ProtocolError(PROTOCOL_VIOLATION, "invalid length of startup packet")
    code = _i32_unpack_from(packet, 4)[0]
    payload = packet[4:]
    if code == SSL_REQUEST_CODE:
        return SSLRequest.decode(payload)
    if code == GSSENC_REQUEST_CODE:
        return GSSENCRequest.decode(payload)
    if code == CANCEL_REQUEST_CODE:
        return CancelRequest.decode(payload)
    return StartupMessage.decode(payload)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

FrontendMessage = (
    Query
    | Parse
    | Bind
    | Describe
    | Execute
    | Close
    | Flush
    | Sync
    | CopyData
    | CopyDone
    | CopyFail
    | FunctionCall
    | Terminate
    | AuthResponse
)

BackendMessage = (
    AuthenticationMessage
    | BackendKeyData
    | BindComplete
    | CloseComplete
    | CommandComplete
    | CopyData
    | CopyDone
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | DataRow
    | EmptyQueryResponse
    | ErrorResponse
    | NoticeResponse
    | FunctionCallResponse
    | NegotiateProtocolVersion
    | NoData
    | NotificationResponse
    | ParameterDescription
    | ParameterStatus
    | ParseComplete
    | PortalSuspended
    | ReadyForQuery
    | RowDescription
)

FRONTEND_DECODERS: dict[int, Callable[[bytes], FrontendMessage]] = {
    ord(c.TYPE): c.decode
    for c in (
        Query,
        Parse,
        Bind,
        Describe,
        Execute,
        Close,
        Flush,
        Sync,
        CopyData,
        CopyDone,
        CopyFail,
        FunctionCall,
        Terminate,
        AuthResponse,
    )
}

BACKEND_DECODERS: dict[int, Callable[[bytes], BackendMessage]] = {
    ord(b"R"): decode_authentication,
    **{
        ord(c.TYPE): c.decode
        for c in (
            BackendKeyData,
            BindComplete,
            CloseComplete,
            CommandComplete,
            CopyData,
            CopyDone,
            CopyInResponse,
            CopyOutResponse,
            CopyBothResponse,
            DataRow,
            EmptyQueryResponse,
            ErrorResponse,
            NoticeResponse,
            FunctionCallResponse,
            NegotiateProtocolVersion,
            NoData,
            NotificationResponse,
            ParameterDescription,
            ParameterStatus,
            ParseComplete,
            PortalSuspended,
            ReadyForQuery,
            RowDescription,
        )
    },
}

assert set(FRONTEND_DECODERS) == set(FRONTEND_TYPES)
assert set(BACKEND_DECODERS) == set(BACKEND_TYPES)


def decode_frontend(type_byte: int, payload: bytes) -> FrontendMessage:
    """Decode a message the client sent. 'p' gives an :class:`AuthResponse` to re-decode."""
    try:
        decoder = FRONTEND_DECODERS[type_byte]
    except KeyError:
        raise _unknown_type(type_byte, Side.FRONTEND) from None
    return decoder(payload)


def decode_backend(type_byte: int, payload: bytes) -> BackendMessage:
    """Decode a message the server sent."""
    try:
        decoder = BACKEND_DECODERS[type_byte]
    except KeyError:
        raise _unknown_type(type_byte, Side.BACKEND) from None
    return decoder(payload)


def decode_frontend_frame(frame: bytes) -> FrontendMessage:
    """Decode a whole frame as :class:`FrameBuffer` returns it (header included)."""
    return decode_frontend(frame[0], frame[5:])


def decode_backend_frame(frame: bytes) -> BackendMessage:
    """Decode a whole frame as :class:`FrameBuffer` returns it (header included)."""
    return decode_backend(frame[0], frame[5:])


def _unknown_type(type_byte: int, side: Side) -> ProtocolError:
    return ProtocolError(PROTOCOL_VIOLATION, f"invalid {side.value} message type {type_byte}")


# ---------------------------------------------------------------------------------------------
# Framing (hot path)
# ---------------------------------------------------------------------------------------------


class _Mode(enum.Enum):
    STARTUP = "startup"  # length-prefixed packets, no type byte
    REGULAR = "regular"  # type byte + length
    PAUSED = "paused"  # after SSLRequest / GSSENCRequest / CancelRequest: wait for resume()
    FAILED = "failed"  # a ProtocolError was raised; the stream is unusable


def _type_table(types: bytes) -> bytes:
    table = bytearray(256)
    for t in types:
        table[t] = 1
    return bytes(table)


_REGULAR = _Mode.REGULAR
_FRONTEND_TABLE = _type_table(FRONTEND_TYPES)
_BACKEND_TABLE = _type_table(BACKEND_TYPES)
_STARTUP_SPECIAL = (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE)

Frame = tuple[int, bytes]


class FrameBuffer:
    """Split a byte stream into whole protocol messages without decoding their payloads.

    ``feed(data)`` returns the complete frames now available as ``(type_byte, frame_bytes)``,
    where ``frame_bytes`` is the whole message, header included, ready to forward as is.
    Headers are checked as soon as they arrive: an unknown type, a length below 4 or above
    ``max_message_size`` raises :class:`ProtocolError` before the body is buffered.

    Startup mode (``startup=True``, for the client side of a fresh connection) reads
    length-prefixed packets with no type byte and reports them as ``(STARTUP_FRAME, packet)``:

    * after a StartupMessage the buffer switches to regular messages by itself and goes on
      parsing whatever followed it;
    * after an SSLRequest, GSSENCRequest or CancelRequest it pauses: further bytes are kept but
      not parsed until :meth:`resume`. Before starting TLS the caller must check that
      ``buffered == 0`` -- bytes sent ahead of the handshake would otherwise be treated as if
      they had come over TLS (the CVE-2021-23214 class of bug).

    Performance: a frame that arrives whole costs one ``unpack_from`` and one slice; a large
    message arriving in many reads is joined once, when complete (no quadratic re-copying).

    >>> fb = FrameBuffer(Side.FRONTEND)
    >>> fb.feed(b"Q\\x00\\x00\\x00\\x0dSELECT 1\\x00S\\x00\\x00")
    [(81, b'Q\\x00\\x00\\x00\\rSELECT 1\\x00')]
    >>> fb.feed(b"\\x00\\x04")
    [(83, b'S\\x00\\x00\\x00\\x04')]
    """

    __slots__ = ("_chunks", "_have", "_need", "_mode", "_valid", "_max", "_max_startup", "side")

    def __init__(
        self,
        side: Side = Side.FRONTEND,
        *,
        startup: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_startup_size: int = MAX_STARTUP_PACKET_LENGTH,
    ) -> None:
        self.side = side
        self._chunks: list[bytes] = []
        self._have = 0  # bytes held in _chunks
        self._need = 0  # bytes needed before parsing is worth retrying
        self._mode = _Mode.STARTUP if startup else _Mode.REGULAR
        self._valid = _FRONTEND_TABLE if side is Side.FRONTEND else _BACKEND_TABLE
        # The length field counts itself but not the type byte.
        self._max = max_message_size
        self._max_startup = max_startup_size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._have

    @property
    def in_startup(self) -> bool:
        """True while the next packet is a startup-phase packet (or the buffer is paused)."""
        return self._mode in (_Mode.STARTUP, _Mode.PAUSED)

    @property
    def paused(self) -> bool:
        return self._mode is _Mode.PAUSED

    def resume(self) -> list[Frame]:
        """Leave the pause after SSLRequest/GSSENCRequest and parse what was buffered.

        The next packet is again a startup-phase packet (a StartupMessage, or an SSLRequest
        after a refused GSSENCRequest).
        """
        if self._mode is not _Mode.PAUSED:
            raise RuntimeError("FrameBuffer is not paused")
        self._mode = _Mode.STARTUP
        data = b"".join(self._chunks)
        self._chunks = []
        self._have = 0
        return self.feed(data)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame that is now complete, in order."""
        frames: list[Frame] = []
        pos = 0
        # Fast path: regular mode, nothing pending, a bytes object -- the steady state.
        if self._have or self._mode is not _REGULAR or type(data) is not bytes:
            data, pos = self._slow_start(data, frames)
            if pos < 0:
                return frames
        append = frames.append
        valid = self._valid
        limit = self._max
        unpack = _i32_unpack_from
        n = len(data)
        while n - pos >= 5:
            t = data[pos]
            length = unpack(data, pos + 1)[0]
            if not valid[t] or length < 4 or length > limit:
                self._fail_header(t, length)
            end = pos + 1 + length
            if end > n:
                self._keep(data, pos, end - pos)
                return frames
            append((t, data[pos:end]))
            pos = end
        if pos < n:
            self._keep(data, pos, 5)
        return frames

    def _slow_start(self, data: bytes, frames: list[Frame]) -> tuple[bytes, int]:
        """Everything but the steady state: join pending bytes, startup packets, pauses.

        Returns the bytes to parse as regular messages and where to start, or a negative
        offset when there is nothing more to parse now.
        """
        if type(data) is not bytes:
            data = bytes(data)
        mode = self._mode
        if mode is _Mode.FAILED:
            raise ProtocolError(PROTOCOL_VIOLATION, "stream already failed")
        if mode is _Mode.PAUSED:
            if data:
                self._chunks.append(data)
                self._have += len(data)
            return data, -1
        if self._have:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return data, -1
            data = b"".join(self._chunks)
            self._chunks = []
            self._have = 0
        if mode is _Mode.STARTUP:
            pos = self._startup(data, frames)
            if self._mode is not _REGULAR:
                return data, -1
            return data, pos
        return data, 0

    def _keep(self, data: bytes, pos: int, need: int) -> None:
        rest = data[pos:] if pos else data
        self._chunks = [rest]
        self._have = len(rest)
        self._need = need

    def _fail_header(self, t: int, length: int) -> None:
        self._mode = _Mode.FAILED
        if not self._valid[t]:
            side = self.side.value
            raise ProtocolError(PROTOCOL_VIOLATION, f"invalid {side} message type {t}")
        if length < 4:
            raise ProtocolError(PROTOCOL_VIOLATION, f"invalid message length {length}")
        raise ProtocolError(
            PROTOCOL_VIOLATION,
            f"message of type {chr(t)!r} is {length} bytes, over the limit of {self._max}",
        )

    def _startup(self, data: bytes, frames: list[Frame]) -> int:
        """Take startup packets from ``data``; return the offset where parsing stopped."""
        pos = 0
        n = len(data)
        while self._mode is _Mode.STARTUP:
            if n - pos < 4:
                if pos < n:
                    self._keep(data, pos, 4)
                return n
            length = _i32_unpack_from(data, pos)[0]
            if length < 8 or length > self._max_startup:
                self._mode = _Mode.FAILED
                raise ProtocolError(PROTOCOL_VIOLATION, "invalid length of startup packet")
            end = pos + length
            if end > n:
                self._keep(data, pos, length)
                return n
            packet = data[pos:end]
            frames.append((STARTUP_FRAME, packet))
            pos = end
            code = _i32_unpack_from(packet, 4)[0]
            if code in _STARTUP_SPECIAL:
                self._mode = _Mode.PAUSED
                if pos < n:
                    self._keep(data, pos, 0)
                return n
            self._mode = _Mode.REGULAR
        return pos


# ---------------------------------------------------------------------------------------------
# Precomputed constant messages and builders
# ---------------------------------------------------------------------------------------------

SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"
COPY_DONE = b"c\x00\x00\x00\x04"
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
EMPTY_QUERY_RESPONSE = b"I\x00\x00\x00\x04"
PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
READY_IDLE = b"Z\x00\x00\x00\x05I"
READY_IN_TRANSACTION = b"Z\x00\x00\x00\x05T"
READY_FAILED = b"Z\x00\x00\x00\x05E"
_READY = {
    TransactionStatus.IDLE: READY_IDLE,
    TransactionStatus.IN_TRANSACTION: READY_IN_TRANSACTION,
    TransactionStatus.FAILED: READY_FAILED,
}
SSL_REQUEST = _I32I32.pack(8, SSL_REQUEST_CODE)
GSSENC_REQUEST = _I32I32.pack(8, GSSENC_REQUEST_CODE)
SSL_ACCEPT = b"S"  # single-byte answers to SSLRequest / GSSENCRequest
SSL_REJECT = b"N"


def _fields_message(
    type_byte: bytes,
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None,
    hint: str | None,
    extra: Iterable[tuple[str, str]],
    encoding: str,
) -> bytes:
    # PostgreSQL sends localized 'S' and non-localized 'V'; ours are never localized.
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    if detail is not None:
        fields.append((b"D", detail))
    if hint is not None:
        fields.append((b"H", hint))
    for code, value in extra:
        raw_code = code.encode("latin-1")
        if len(raw_code) != 1 or raw_code == b"\0":
            raise ValueError(f"invalid field code {code!r}")
        fields.append((raw_code, value))
    parts = []
    for field_code, value in fields:
        raw = value.encode(encoding, "replace").replace(b"\0", b"")
        parts.append(field_code + raw + b"\0")
    parts.append(b"\0")
    return _frame(type_byte, b"".join(parts))


def error_response(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
    *,
    extra: Iterable[tuple[str, str]] = (),
    encoding: str = "utf-8",
) -> bytes:
    """Build an ErrorResponse as PostgreSQL would (fields S, V, C, M, then D, H if given).

    ``encoding`` is the client's (Python codec name) so the client can read the text; NUL bytes
    are dropped (they would end a field early).

    >>> error_response("ERROR", "42501", "denied")[:1]
    b'E'
    """
    return _fields_message(b"E", severity, sqlstate, message, detail, hint, extra, encoding)


def notice_response(
    message: str,
    severity: str = "NOTICE",
    sqlstate: str = "00000",
    detail: str | None = None,
    hint: str | None = None,
    *,
    extra: Iterable[tuple[str, str]] = (),
    encoding: str = "utf-8",
) -> bytes:
    """Build a NoticeResponse (severity NOTICE, WARNING, INFO, ...)."""
    return _fields_message(b"N", severity, sqlstate, message, detail, hint, extra, encoding)


def ready_for_query(status: TransactionStatus | str) -> bytes:
    """ReadyForQuery for status 'I', 'T' or 'E' (precomputed)."""
    return _READY[TransactionStatus(status)]


def backend_key_data(pid: int, key: int) -> bytes:
    return BackendKeyData(pid, key).encode()


def cancel_request(pid: int, key: int) -> bytes:
    return _pack_i32(16) + _pack_i32(CANCEL_REQUEST_CODE) + _I32I32.pack(pid, key)


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    return StartupMessage(version, dict(params)).encode()


def auth_ok() -> bytes:
    return AUTH_OK


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return AuthenticationSASL(tuple(mechanisms)).encode()


def auth_sasl_continue(data: bytes) -> bytes:
    return AuthenticationSASLContinue(data).encode()


def auth_sasl_final(data: bytes) -> bytes:
    return AuthenticationSASLFinal(data).encode()


def auth_cleartext_password() -> bytes:
    return AuthenticationCleartextPassword().encode()


def auth_md5_password(salt: bytes) -> bytes:
    return AuthenticationMD5Password(salt).encode()


def password_message(password: bytes) -> bytes:
    return PasswordMessage(password).encode()


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    return SASLInitialResponse(mechanism, data).encode()


def sasl_response(data: bytes) -> bytes:
    return SASLResponse(data).encode()


def parameter_status(name: str, value: str) -> bytes:
    return ParameterStatus(name, value).encode()


def query(sql: bytes) -> bytes:
    """A simple-protocol Query; ``sql`` must already be in the client encoding."""
    return _frame(b"Q", _cbytes(sql))


def parse(name: str, sql: bytes, param_types: Iterable[int] = ()) -> bytes:
    return Parse(name, sql, tuple(param_types)).encode()


def bind(
    portal: str,
    statement: str,
    params: Iterable[bytes | None] = (),
    param_formats: Iterable[int] = (),
    result_formats: Iterable[int] = (),
) -> bytes:
    return Bind(
        portal, statement, tuple(param_formats), tuple(params), tuple(result_formats)
    ).encode()


def describe(kind: str, name: str = "") -> bytes:
    return Describe(kind, name).encode()


def close(kind: str, name: str = "") -> bytes:
    return Close(kind, name).encode()


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return Execute(portal, max_rows).encode()


def sync() -> bytes:
    return SYNC


def flush() -> bytes:
    return FLUSH


def terminate() -> bytes:
    return TERMINATE


def command_complete(tag: str) -> bytes:
    return CommandComplete(tag).encode()


def row_description(fields: Iterable[FieldDescription]) -> bytes:
    return RowDescription(tuple(fields)).encode()


def data_row(values: Iterable[bytes | None]) -> bytes:
    return DataRow(tuple(values)).encode()
