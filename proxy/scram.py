"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it: pure functions and two small
state machines, no I/O.

Why pgveil needs both ends of SCRAM: in ``auth.mode: scram`` the proxy *terminates* the
client's SCRAM exchange using the role's stored verifier (read from ``pg_authid``), and then
logs in *upstream* as the same role without knowing the password -- as PgBouncer does::

    client                         pgveil                                   PostgreSQL
      | client-first  ------------> ScramServer(verifier)
      | <------------ server-first  |
      | client-final  ------------> | ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)
      |                             | check SHA-256(ClientKey) == StoredKey
      | <------------ server-final  |
      |                             ScramClient(user, client_key=ClientKey) --> client-first
      |                             |  <-- server-first (same salt/iterations as the verifier)
      |                             |  ClientProof = ClientKey XOR HMAC(H(ClientKey), AuthMsg)
      |                             |  --> client-final; <-- server-final (checked if ServerKey
      |                             |      is known, i.e. a verifier was given)

The verifier format is PostgreSQL's ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``
(base64 fields). Passwords are normalized with SASLprep exactly as PostgreSQL does (and, like
PostgreSQL, used as raw bytes when SASLprep rejects them).

Channel binding: ``tls-server-end-point`` only (the type PostgreSQL implements), with the hash
of the server certificate from :func:`tls_server_end_point`.

All failures raise :class:`ScramError` carrying the SQLSTATE the proxy should report
(``28P01`` invalid_password for a wrong proof, ``08P01`` for malformed messages).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import stringprep
import unicodedata
from dataclasses import dataclass

__all__ = [
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "ScramError",
    "ScramVerifier",
    "ScramServer",
    "ScramClient",
    "parse_verifier",
    "make_verifier",
    "mock_verifier",
    "salted_password",
    "client_key_from_salted",
    "server_key_from_salted",
    "stored_key_from_client_key",
    "saslprep",
    "tls_server_end_point",
]

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
CBIND_TYPE = "tls-server-end-point"
DEFAULT_ITERATIONS = 4096
SALT_LENGTH = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
NONCE_LENGTH = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN (random bytes, then base64)

INVALID_PASSWORD = "28P01"
PROTOCOL_VIOLATION = "08P01"
INVALID_AUTHORIZATION = "28000"


class ScramError(Exception):
    """The SCRAM exchange failed; ``sqlstate`` is what to put in the ErrorResponse."""

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ScramError(f"malformed SCRAM message (invalid base64 in {what})") from None


def saslprep(password: str | bytes) -> bytes:
    """Normalize a password the way PostgreSQL's ``pg_saslprep`` does, to UTF-8 bytes.

    RFC 4013 SASLprep: map non-ASCII spaces to space, drop "commonly mapped to nothing"
    characters, NFKC-normalize, then reject prohibited and unassigned code points and bad bidi.
    PostgreSQL does not fail on a rejected password: it uses the raw bytes instead, so a
    password that is not valid UTF-8 or not SASLprep-clean still works. We do the same,
    because the verifier stored in pg_authid was computed that way.

    >>> saslprep("pencil"), saslprep("I\\u00adX"), saslprep("\\u2168")
    (b'pencil', b'IX', b'IX')
    """
    raw = password.encode("utf-8", "surrogateescape") if isinstance(password, str) else password
    if all(b < 0x80 for b in raw):
        return raw  # ASCII: PostgreSQL returns it unchanged (even control characters)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return raw
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,  # unassigned: prohibited for stored strings
    )
    for ch in normalized:
        if any(test(ch) for test in prohibited):
            return raw
    # Bidi rule (RFC 3454 section 6).
    has_ral = any(stringprep.in_table_d1(ch) for ch in normalized)
    if has_ral:
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            return raw
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            return raw
    return normalized.encode("utf-8")


def salted_password(password: str | bytes, salt: bytes, iterations: int) -> bytes:
    """SaltedPassword = Hi(SASLprep(password), salt, i) = PBKDF2-HMAC-SHA-256."""
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def client_key_from_salted(salted: bytes) -> bytes:
    return _hmac(salted, b"Client Key")


def server_key_from_salted(salted: bytes) -> bytes:
    return _hmac(salted, b"Server Key")


def stored_key_from_client_key(client_key: bytes) -> bytes:
    return _h(client_key)


@dataclass(frozen=True)
class ScramVerifier:
    """What PostgreSQL stores for a SCRAM password (``pg_authid.rolpassword``)."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        return (
            f"SCRAM-SHA-256${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    def __repr__(self) -> str:
        # Keep the keys out of logs: StoredKey/ServerKey are password-equivalent for SCRAM
        # impersonation of the server and for offline attacks.
        return f"ScramVerifier(iterations={self.iterations}, salt=<{len(self.salt)} bytes>)"


def parse_verifier(text: str) -> ScramVerifier:
    """Parse ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``.

    Anything else (an md5 hash, a plain password, a truncated string) raises ``ScramError``
    with SQLSTATE 28P01 so the caller fails the login rather than guessing.
    """
    try:
        scheme, iter_salt, keys = text.split("$")
        iter_text, salt_b64 = iter_salt.split(":")
        stored_b64, server_b64 = keys.split(":")
        iterations = int(iter_text)
    except ValueError:
        raise ScramError("not a SCRAM-SHA-256 verifier", INVALID_PASSWORD) from None
    if scheme != SCRAM_SHA_256 or iterations <= 0 or not iter_text.isdigit():
        raise ScramError("not a SCRAM-SHA-256 verifier", INVALID_PASSWORD)
    try:
        salt = base64.b64decode(salt_b64, validate=True)
        stored = base64.b64decode(stored_b64, validate=True)
        server = base64.b64decode(server_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError("invalid base64 in SCRAM verifier", INVALID_PASSWORD) from None
    if not salt or len(stored) != 32 or len(server) != 32:
        raise ScramError("invalid SCRAM verifier key length", INVALID_PASSWORD)
    return ScramVerifier(iterations, salt, stored, server)


def make_verifier(
    password: str | bytes, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """A verifier string as PostgreSQL 10+ stores it (for userlist files and tests)."""
    if salt is None:
        salt = os.urandom(SALT_LENGTH)
    salted = salted_password(password, salt, iterations)
    return ScramVerifier(
        iterations,
        salt,
        stored_key_from_client_key(client_key_from_salted(salted)),
        server_key_from_salted(salted),
    ).encode()


def mock_verifier(
    username: str, secret: bytes, iterations: int = DEFAULT_ITERATIONS
) -> ScramVerifier:
    """A verifier for a role that does not exist (or has no SCRAM password).

    Why: answering "no such user" at client-first would let anyone enumerate roles. Like
    PostgreSQL, we run the exchange with a salt derived deterministically from the user name
    and a per-process ``secret`` (so repeated attempts see the same salt), and keys that no
    proof can match, so the exchange always fails at the proof check.
    """
    salt = _hmac(secret, b"pgveil-mock-salt:" + username.encode("utf-8", "surrogateescape"))
    return ScramVerifier(iterations, salt[:SALT_LENGTH], os.urandom(32), os.urandom(32))


def tls_server_end_point(cert_der: bytes) -> bytes:
    """Channel-binding data for ``tls-server-end-point`` (RFC 5929 section 4.1).

    The hash of the DER certificate, using the certificate's signature hash algorithm, except
    that MD5 and SHA-1 are replaced by SHA-256. Certificates whose signature has no separate
    hash (Ed25519, Ed448) have no defined binding; PostgreSQL refuses them too, so we raise.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_der_x509_certificate(cert_der)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        raise ScramError("could not determine server certificate signature algorithm")
    if isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


# ---------------------------------------------------------------------------------------------
# Message parsing helpers
# ---------------------------------------------------------------------------------------------


def _ascii(data: bytes, what: str) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ScramError(f"malformed SCRAM message ({what} is not ASCII)") from None


def _attr(part: str, name: str) -> str:
    if len(part) < 2 or part[0] != name or part[1] != "=":
        raise ScramError(f"malformed SCRAM message (expected attribute {name!r})")
    return part[2:]


def _valid_nonce(nonce: str) -> bool:
    # RFC 5802: printable ASCII except ','.
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


def _saslname(user: str) -> str:
    return user.replace("=", "=3D").replace(",", "=2C")


def _new_nonce() -> str:
    return _b64(os.urandom(NONCE_LENGTH))


# ---------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------


class ScramServerState(enum.Enum):
    INITIAL = "initial"  # waiting for client-first
    CHALLENGED = "challenged"  # server-first sent, waiting for client-final
    DONE = "done"  # proof verified, server-final produced
    FAILED = "failed"


@dataclass(frozen=True)
class _Gs2:
    flag: str  # 'n', 'y' or 'p'
    header: bytes  # the gs2 header exactly as sent, e.g. b"n,,"


class ScramServer:
    """The server end of one SCRAM-SHA-256(-PLUS) exchange, verifying a client's proof.

    ``channel_binding`` is the ``tls-server-end-point`` data of *our* certificate when the
    client side is TLS (we then offer SCRAM-SHA-256-PLUS), else ``None``.

    ``mechanism`` given to :meth:`handle_client_first` is the one named in the client's
    SASLInitialResponse; it must agree with the gs2 flag, as PostgreSQL checks.

    After :meth:`handle_client_final` succeeds, :attr:`client_key` holds the ClientKey that
    the proxy uses to log in upstream.

    >>> server = ScramServer(parse_verifier(make_verifier("pw", b"salt" * 4)), None,
    ...                      server_nonce="SRV")
    >>> server.handle_client_first(b"n,,n=,r=abc")
    b'r=abcSRV,s=c2FsdHNhbHRzYWx0c2FsdA==,i=4096'
    """

    def __init__(
        self,
        verifier: ScramVerifier,
        channel_binding: bytes | None = None,
        *,
        server_nonce: str | None = None,
    ) -> None:
        self.verifier = verifier
        self.channel_binding = channel_binding
        self.state = ScramServerState.INITIAL
        self.client_key: bytes | None = None
        self._server_nonce = server_nonce if server_nonce is not None else _new_nonce()
        if not _valid_nonce(self._server_nonce):
            raise ValueError("server nonce must be printable ASCII without ','")
        self._gs2: _Gs2 | None = None
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = ""

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """What to list in AuthenticationSASL, in PostgreSQL's order."""
        if self.channel_binding is not None:
            return (SCRAM_SHA_256_PLUS, SCRAM_SHA_256)
        return (SCRAM_SHA_256,)

    def _fail(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> ScramError:
        self.state = ScramServerState.FAILED
        return ScramError(message, sqlstate)

    def handle_client_first(self, data: bytes, mechanism: str | None = None) -> bytes:
        """Read client-first-message; return server-first-message."""
        if self.state is not ScramServerState.INITIAL:
            raise self._fail("unexpected SCRAM client-first message")
        if mechanism is not None and mechanism not in self.mechanisms:
            raise self._fail(
                f"client selected an invalid SASL authentication mechanism {mechanism!r}"
            )
        text = _ascii_or_utf8(data)
        parts = text.split(",")
        if len(parts) < 4:
            raise self._fail("malformed SCRAM message (client-first too short)")
        flag_part, authzid = parts[0], parts[1]
        if flag_part == "n" or flag_part == "y":
            flag = flag_part
            if flag == "y" and self.channel_binding is not None:
                # The client supports binding and we offered -PLUS: someone stripped it.
                raise self._fail(
                    "SCRAM channel binding negotiation error: the client supports channel "
                    "binding but thinks the server does not; possible downgrade attack",
                    INVALID_AUTHORIZATION,
                )
        elif flag_part.startswith("p="):
            flag = "p"
            if flag_part[2:] != CBIND_TYPE:
                raise self._fail(f"unsupported SCRAM channel-binding type {flag_part[2:]!r}")
            if self.channel_binding is None:
                raise self._fail(
                    "the client selected SCRAM channel binding, but it is not supported here"
                )
        else:
            raise self._fail("malformed SCRAM message (unexpected channel-binding flag)")
        if mechanism == SCRAM_SHA_256_PLUS and flag != "p":
            raise self._fail("channel binding is required with SCRAM-SHA-256-PLUS")
        if mechanism == SCRAM_SHA_256 and flag == "p":
            raise self._fail(
                "the client selected SCRAM-SHA-256 without channel binding, but the SCRAM "
                "message includes channel binding data"
            )
        if authzid:
            raise self._fail("client uses authorization identity, but it is not supported")
        # parts[2] is n=<user>: PostgreSQL ignores it (the startup packet's user counts).
        _attr(parts[2], "n")
        client_nonce = _attr(parts[3], "r")
        if not _valid_nonce(client_nonce):
            raise self._fail("malformed SCRAM message (invalid client nonce)")
        for extension in parts[4:]:
            if extension.startswith("m="):
                raise self._fail("client requires an unsupported SCRAM extension")
        header_len = len(flag_part) + len(authzid) + 2
        self._gs2 = _Gs2(flag, data[:header_len])
        self._client_first_bare = data[header_len:]
        self._nonce = client_nonce + self._server_nonce
        v = self.verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}".encode()
        self.state = ScramServerState.CHALLENGED
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes:
        """Verify client-final-message; return server-final-message (``v=<signature>``)."""
        if self.state is not ScramServerState.CHALLENGED or self._gs2 is None:
            raise self._fail("unexpected SCRAM client-final message")
        text = _ascii(data, "client-final-message")
        parts = text.split(",")
        if len(parts) < 3:
            raise self._fail("malformed SCRAM message (client-final too short)")
        cbind = _unb64(_attr(parts[0], "c"), "channel binding")
        expected = self._gs2.header
        if self._gs2.flag == "p":
            assert self.channel_binding is not None
            expected += self.channel_binding
        if not hmac.compare_digest(cbind, expected):
            raise self._fail("SCRAM channel binding check failed", INVALID_AUTHORIZATION)
        if _attr(parts[1], "r") != self._nonce:
            raise self._fail("SCRAM nonce mismatch")
        proof = _unb64(_attr(parts[-1], "p"), "proof")
        if len(proof) != 32:
            raise self._fail("malformed SCRAM message (invalid proof length)")
        without_proof = data[: len(data) - len(parts[-1]) - 1]
        auth_message = b",".join((self._client_first_bare, self._server_first, without_proof))
        v = self.verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        if not hmac.compare_digest(_h(client_key), v.stored_key):
            raise self._fail("password authentication failed", INVALID_PASSWORD)
        self.client_key = client_key
        self.state = ScramServerState.DONE
        return b"v=" + _b64(_hmac(v.server_key, auth_message)).encode()


def _ascii_or_utf8(data: bytes) -> str:
    # client-first may carry a UTF-8 user name (n=...); everything else must be ASCII.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("malformed SCRAM message (not UTF-8)") from None


# ---------------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------------


class ScramClientState(enum.Enum):
    INITIAL = "initial"
    SENT_FIRST = "sent_first"
    SENT_FINAL = "sent_final"
    DONE = "done"
    FAILED = "failed"


class ScramClient:
    """The client end of one SCRAM-SHA-256(-PLUS) exchange.

    Give either ``password``, or ``client_key`` (recovered by :class:`ScramServer`), which is
    all a client needs to compute its proof. With ``client_key``:

    * pass the role's ``verifier`` when you have it: the server's salt and iteration count must
      then match it (a ClientKey is only valid for the salt it was derived with), and the
      server's signature is checked with its ServerKey;
    * without a verifier the server signature **cannot be checked** (ServerKey is derived from
      the password, not from ClientKey), so :meth:`handle_server_final` only checks the message
      shape. Server authenticity then rests on TLS certificate verification of the upstream.

    ``user`` goes in ``n=``; PostgreSQL ignores it (libpq sends an empty one).
    ``channel_binding`` = the server certificate's :func:`tls_server_end_point` data selects
    SCRAM-SHA-256-PLUS; ``client_supports_binding`` without data sends the 'y' flag (TLS is
    up but the server offered no -PLUS).
    """

    def __init__(
        self,
        user: str = "",
        password: str | bytes | None = None,
        client_key: bytes | None = None,
        *,
        verifier: ScramVerifier | None = None,
        channel_binding: bytes | None = None,
        client_supports_binding: bool = False,
        nonce: str | None = None,
    ) -> None:
        if (password is None) == (client_key is None):
            raise ValueError("give exactly one of password and client_key")
        if client_key is not None and len(client_key) != 32:
            raise ValueError("client_key must be 32 bytes")
        if (
            client_key is not None
            and verifier is not None
            and not hmac.compare_digest(_h(client_key), verifier.stored_key)
        ):
            raise ValueError("client_key does not match the verifier's StoredKey")
        self.user = user
        self.password = password
        self.client_key = client_key
        self.verifier = verifier
        self.channel_binding = channel_binding
        self.state = ScramClientState.INITIAL
        self._nonce = nonce if nonce is not None else _new_nonce()
        if not _valid_nonce(self._nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        if channel_binding is not None:
            self._gs2 = f"p={CBIND_TYPE},,".encode()
        elif client_supports_binding:
            self._gs2 = b"y,,"
        else:
            self._gs2 = b"n,,"
        self._client_first_bare = b""
        self._server_key: bytes | None = None
        self._auth_message = b""
        self.server_verified = False

    @property
    def mechanism(self) -> str:
        """What to name in the SASLInitialResponse."""
        return SCRAM_SHA_256_PLUS if self.channel_binding is not None else SCRAM_SHA_256

    def _fail(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> ScramError:
        self.state = ScramClientState.FAILED
        return ScramError(message, sqlstate)

    def client_first(self) -> bytes:
        """The client-first-message (the SASLInitialResponse data)."""
        if self.state is not ScramClientState.INITIAL:
            raise self._fail("client-first already sent")
        user = _saslname(self.user).encode("utf-8")
        self._client_first_bare = b"n=" + user + b",r=" + self._nonce.encode("ascii")
        self.state = ScramClientState.SENT_FIRST
        return self._gs2 + self._client_first_bare

    def handle_server_first(self, data: bytes) -> bytes:
        """Read server-first-message; return client-final-message (the SASLResponse data)."""
        if self.state is not ScramClientState.SENT_FIRST:
            raise self._fail("unexpected SCRAM server-first message")
        text = _ascii(data, "server-first-message")
        parts = text.split(",")
        if len(parts) < 3:
            raise self._fail("malformed SCRAM server-first message")
        if parts[0].startswith("m="):
            raise self._fail("server requires an unsupported SCRAM extension")
        nonce = _attr(parts[0], "r")
        salt = _unb64(_attr(parts[1], "s"), "salt")
        iter_text = _attr(parts[2], "i")
        if not iter_text.isdigit() or int(iter_text) <= 0:
            raise self._fail("invalid SCRAM iteration count")
        iterations = int(iter_text)
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise self._fail("SCRAM server nonce does not extend the client nonce")
        if not _valid_nonce(nonce) or not salt:
            raise self._fail("malformed SCRAM server-first message")

        if self.password is not None:
            salted = salted_password(self.password, salt, iterations)
            client_key = client_key_from_salted(salted)
            self._server_key = server_key_from_salted(salted)
        else:
            assert self.client_key is not None
            client_key = self.client_key
            if self.verifier is not None:
                if salt != self.verifier.salt or iterations != self.verifier.iterations:
                    raise self._fail(
                        "upstream SCRAM salt/iterations differ from the verifier the client "
                        "authenticated with (password changed?)",
                        INVALID_PASSWORD,
                    )
                self._server_key = self.verifier.server_key
        cbind = self._gs2 + (self.channel_binding or b"")
        without_proof = b"c=" + _b64(cbind).encode() + b",r=" + nonce.encode("ascii")
        self._auth_message = b",".join((self._client_first_bare, data, without_proof))
        signature = _hmac(_h(client_key), self._auth_message)
        proof = _xor(client_key, signature)
        self.state = ScramClientState.SENT_FINAL
        return without_proof + b",p=" + _b64(proof).encode()

    def handle_server_final(self, data: bytes) -> None:
        """Check server-final-message; raises ``ScramError`` on an error or bad signature.

        Sets :attr:`server_verified` when the signature could be checked (a password or a
        verifier was given); see the class docstring for the ClientKey-only case.
        """
        if self.state is not ScramClientState.SENT_FINAL:
            raise self._fail("unexpected SCRAM server-final message")
        text = _ascii(data, "server-final-message")
        if text.startswith("e="):
            raise self._fail(f"SCRAM authentication failed: {text[2:]}", INVALID_PASSWORD)
        signature = _unb64(_attr(text.split(",")[0], "v"), "server signature")
        if self._server_key is not None:
            expected = _hmac(self._server_key, self._auth_message)
            if not hmac.compare_digest(signature, expected):
                raise self._fail("invalid SCRAM server signature", INVALID_PASSWORD)
            self.server_verified = True
        elif len(signature) != 32:
            raise self._fail("malformed SCRAM server signature")
        self.state = ScramClientState.DONE
