"""Client authentication and the upstream login, in the three modes of SPEC §3.

* ``passthrough`` — pgveil relays the exchange (SCRAM, MD5, cleartext) and PostgreSQL decides.
  Channel binding cannot cross a proxy that terminates TLS, so SCRAM-SHA-256-PLUS is removed
  from what is relayed; the combination that then fails (a TLS client that could bind, a TLS
  upstream that offered PLUS) is detected and explained.
* ``scram`` — pgveil terminates SCRAM itself with the role's verifier read from PostgreSQL over
  the control connection (``auth.auth_query``, like PgBouncer's auth_query), recovers the
  ClientKey from the client's proof, and logs in upstream as the same role with that ClientKey.
  No passwords in pgveil's config; TLS works on both legs; SCRAM-SHA-256-PLUS is offered to TLS
  clients (bound to pgveil's certificate) and used upstream (bound to PostgreSQL's).
* ``userlist`` — the client is checked against a file of SCRAM verifiers, and pgveil logs in
  upstream with the mapped credentials from that file.

An authenticator's ``login`` returns a connected, authenticated upstream, or None after it has
sent the client a FATAL error.
"""

from __future__ import annotations

import logging
import os
import shlex
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import scram
from proxy.protocol import error_response

if TYPE_CHECKING:
    from proxy.server import ClientConnection, UpstreamProtocol

log = logging.getLogger("pgveil.auth")

Connect = Callable[[dict[str, str]], Awaitable["UpstreamProtocol | None"]]
_I32 = struct.Struct("!I")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def _fatal(sqlstate: str, message: str, hint: str | None = None) -> bytes:
    return error_response("FATAL", sqlstate, message, hint=hint)


def _auth_message(code: int, data: bytes = b"") -> bytes:
    body = _I32.pack(code) + data
    return b"R" + _I32.pack(len(body) + 4) + body


def _sasl_mechanisms(mechs: tuple[str, ...] | list[str]) -> bytes:
    return _auth_message(AUTH_SASL, b"".join(m.encode() + b"\x00" for m in mechs) + b"\x00")


def _password_failed(user: str) -> bytes:
    return _fatal("28P01", f'password authentication failed for user "{user}"')


def _split_sasl_initial(frame: bytes) -> tuple[str, bytes]:
    payload = frame[5:]
    end = payload.index(b"\x00")
    mech = payload[:end].decode("ascii", "replace")
    length = struct.unpack_from("!i", payload, end + 1)[0]
    data = payload[end + 5:end + 5 + length] if length >= 0 else b""
    return mech, data


def _gs2_flag(data: bytes) -> str:
    return chr(data[0]) if data else "n"


class PassthroughAuthenticator:
    """auth.mode passthrough (see module docstring)."""

    async def login(self, client: ClientConnection, params: dict[str, str],
                    connect: Connect) -> UpstreamProtocol | None:
        upstream = await connect(params)
        if upstream is None:
            return None
        assert upstream.transport is not None
        stripped_plus = False
        while True:
            mtype, frame = await upstream.reader.read_message()
            if mtype == 0x45:  # ErrorResponse (wrong password, no such database…): verbatim
                client.send_client(frame)
                return None
            if mtype != 0x52:  # not Authentication*: the exchange is over
                upstream.reader.buf[:0] = frame
                return upstream
            code = _I32.unpack_from(frame, 5)[0]
            if code == AUTH_OK:
                client.send_client(frame)
                return upstream
            if code == AUTH_SASL:
                mechs = [m.decode() for m in frame[9:].split(b"\x00") if m]
                if scram.SCRAM_SHA_256_PLUS in mechs:
                    stripped_plus = True
                    mechs.remove(scram.SCRAM_SHA_256_PLUS)
                frame = _sasl_mechanisms(mechs)
            client.send_client(frame)
            if code in (AUTH_CLEARTEXT, AUTH_MD5, 7, 8, 9, AUTH_SASL, AUTH_SASL_CONTINUE):
                rtype, reply = await client.reader.read_message(max_size=1 << 16)
                if rtype != 0x70:
                    client.send_client(_fatal("08P01", "expected a password message"))
                    return None
                if code == AUTH_SASL and stripped_plus and client.tls and \
                        _gs2_flag(_split_sasl_initial(reply)[1]) == "y":
                    client.send_client(_fatal(
                        "28000",
                        "SCRAM channel binding cannot cross pgveil in auth.mode passthrough: "
                        "the client can bind to its TLS connection to pgveil and PostgreSQL "
                        "offers SCRAM-SHA-256-PLUS on its own TLS connection, so PostgreSQL "
                        "would reject the login as a downgrade",
                        hint="use auth.mode: scram (pgveil terminates SCRAM and supports "
                             "channel binding), set upstream.tls: disable, or connect with "
                             "channel_binding=disable"))
                    return None
                upstream.transport.write(reply)


class _ScramTerminating:
    """Shared by ``scram`` and ``userlist``: run SCRAM with the client, then log in upstream."""

    def __init__(self) -> None:
        self._mock_secret = os.urandom(32)

    async def verifier_for(self, user: str) -> scram.ScramVerifier | None:
        raise NotImplementedError

    def upstream_credentials(self, user: str) -> tuple[str, str | None]:
        """(upstream login, password or None to reuse the recovered ClientKey)."""
        return user, None

    async def login(self, client: ClientConnection, params: dict[str, str],
                    connect: Connect) -> UpstreamProtocol | None:
        user = params.get("user", "")
        verifier = await self.verifier_for(user)
        known = verifier is not None
        if verifier is None:  # run a normal-looking exchange that cannot succeed
            verifier = scram.mock_verifier(user, self._mock_secret)
        binding = client.channel_binding()
        server = scram.ScramServer(verifier, binding)
        client.send_client(_sasl_mechanisms(server.mechanisms))
        try:
            rtype, frame = await client.reader.read_message(max_size=1 << 16)
            if rtype != 0x70:
                raise scram.ScramError("expected SASLInitialResponse", "08P01")
            mech, data = _split_sasl_initial(frame)
            first = server.handle_client_first(data, mech)
            client.send_client(_auth_message(AUTH_SASL_CONTINUE, first))
            rtype, frame = await client.reader.read_message(max_size=1 << 16)
            if rtype != 0x70:
                raise scram.ScramError("expected SASLResponse", "08P01")
            final = server.handle_client_final(frame[5:])
        except scram.ScramError as exc:
            if exc.sqlstate == "28P01" or not known:
                client.send_client(_password_failed(user))
            else:
                client.send_client(_fatal(exc.sqlstate, str(exc)))
            return None
        if not known or server.client_key is None:
            client.send_client(_password_failed(user))
            return None
        up_user, up_password = self.upstream_credentials(user)
        upstream_params = dict(params, user=up_user)
        upstream = await connect(upstream_params)
        if upstream is None:
            return None
        ok = await self._upstream_login(client, upstream, up_user, up_password,
                                        server.client_key, verifier)
        if not ok:
            return None
        client.send_client(_auth_message(AUTH_SASL_FINAL, final))
        client.send_client(_auth_message(AUTH_OK))
        return upstream

    async def _upstream_login(self, client: ClientConnection, upstream: UpstreamProtocol,
                              user: str, password: str | None, client_key: bytes,
                              verifier: scram.ScramVerifier) -> bool:
        assert upstream.transport is not None
        sc: scram.ScramClient | None = None
        while True:
            mtype, frame = await upstream.reader.read_message()
            if mtype == 0x45:
                client.send_client(frame)
                return False
            if mtype != 0x52:
                client.send_client(_fatal("08P01", "unexpected message during upstream login"))
                return False
            code = _I32.unpack_from(frame, 5)[0]
            if code == AUTH_OK:
                if sc is not None and not sc.server_verified and password is None:
                    log.debug("upstream SCRAM server signature not verifiable without "
                              "ServerKey; trusting the upstream TLS verification")
                return True
            if code == AUTH_SASL:
                mechs = [m.decode() for m in frame[9:].split(b"\x00") if m]
                cb = upstream.channel_binding()
                use_plus = cb is not None and scram.SCRAM_SHA_256_PLUS in mechs
                kwargs = dict(channel_binding=cb if use_plus else None,
                              client_supports_binding=cb is not None and not use_plus)
                if password is not None:
                    sc = scram.ScramClient(user, password=password, **kwargs)  # type: ignore[arg-type]
                else:
                    sc = scram.ScramClient(user, client_key=client_key, verifier=verifier,
                                           **kwargs)  # type: ignore[arg-type]
                first = sc.client_first()
                body = sc.mechanism.encode() + b"\x00" + _I32.pack(len(first)) + first
                upstream.transport.write(b"p" + _I32.pack(len(body) + 4) + body)
            elif code == AUTH_SASL_CONTINUE and sc is not None:
                try:
                    reply = sc.handle_server_first(frame[9:])
                except scram.ScramError as exc:
                    client.send_client(_fatal("28000", f"upstream SCRAM login failed: {exc}"))
                    return False
                upstream.transport.write(b"p" + _I32.pack(len(reply) + 4) + reply)
            elif code == AUTH_SASL_FINAL and sc is not None:
                try:
                    sc.handle_server_final(frame[9:])
                except scram.ScramError as exc:
                    client.send_client(_fatal("28000", f"upstream SCRAM login failed: {exc}"))
                    return False
            elif code == AUTH_CLEARTEXT and password is not None:
                body = password.encode() + b"\x00"
                upstream.transport.write(b"p" + _I32.pack(len(body) + 4) + body)
            else:
                client.send_client(_fatal(
                    "28000", f"PostgreSQL asked for authentication method {code}, which pgveil "
                    "cannot answer in this auth mode",
                    hint="the role needs a SCRAM-SHA-256 password (password_encryption = "
                         "scram-sha-256) for auth.mode scram"))
                return False


class ScramAuthenticator(_ScramTerminating):
    """auth.mode scram: verifiers come from PostgreSQL via auth_query on the control DSN."""

    def __init__(self, fetch_verifier: Callable[[str], Awaitable[str | None]]):
        super().__init__()
        self._fetch = fetch_verifier

    async def verifier_for(self, user: str) -> scram.ScramVerifier | None:
        try:
            text = await self._fetch(user)
        except Exception as exc:  # control DB down: fail the login, say why in the log
            log.error("auth_query failed for %s: %s", user, exc)
            return None
        if not text or not text.startswith("SCRAM-SHA-256$"):
            return None
        try:
            return scram.parse_verifier(text)
        except (ValueError, scram.ScramError):
            return None


class UserlistAuthenticator(_ScramTerminating):
    """auth.mode userlist: a file of ``"login" "SCRAM-SHA-256$…" ["upstream_login"
    "upstream_password"]`` lines (PgBouncer's userlist.txt shape, plus an optional mapping)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.entries: dict[str, tuple[str, str | None, str | None]] = {}
        self.load()

    def load(self) -> None:
        entries: dict[str, tuple[str, str | None, str | None]] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#") or line.startswith(";"):
                continue
            parts = shlex.split(line)
            if len(parts) not in (2, 4):
                raise ValueError(f"{self.path}:{number}: expected \"login\" \"verifier\" "
                                 "[\"upstream_login\" \"upstream_password\"]")
            entries[parts[0]] = (parts[1], parts[2] if len(parts) == 4 else None,
                                 parts[3] if len(parts) == 4 else None)
        self.entries = entries

    async def verifier_for(self, user: str) -> scram.ScramVerifier | None:
        entry = self.entries.get(user)
        if entry is None:
            return None
        try:
            return scram.parse_verifier(entry[0])
        except (ValueError, scram.ScramError):
            return None

    def upstream_credentials(self, user: str) -> tuple[str, str | None]:
        _, up_user, up_password = self.entries.get(user, ("", None, None))
        return (up_user or user), up_password
