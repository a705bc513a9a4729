"""The asyncio shell: sockets, TLS, startup/authentication relay, and byte pumping.

This is the only place (with the metrics/audit/catalog I/O) that touches asyncio. Per client:

1. ``ClientConnection`` (an asyncio Protocol — cheaper per message than streams) reads the
   startup packet: SSLRequest → 'S' + TLS handshake (or 'N'), GSSENCRequest → 'N',
   CancelRequest → forwarded to the right upstream backend, StartupMessage → continue.
2. The operator is resolved from login, client address and application_name (once per
   connection; later SET ROLE / application_name changes change nothing), an upstream connection
   is opened (TLS per ``upstream.tls``), and authentication is relayed (``auth.mode:
   passthrough``) or terminated at pgveil (``scram``/``userlist``, see ``proxy.auth``).
3. The client gets pgveil's own BackendKeyData; the real one is kept for cancels.
4. From then on every chunk of bytes goes through ``proxy.session.Session`` (pure), and the
   shell performs what it returns: write to either side, cancel upstream, submit audit records
   (holding client output while strict-durability records are in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from proxy.protocol import NegotiateProtocolVersion
from proxy.session import WITHHELD_RESULT, HeldResult, Output, Session, error_message
from rewriters.compiled import DEBUG_SETTINGS, ROLE_SETTINGS
from rewriters.policy import PolicyError

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("pgveil.server")

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 196608
MAX_STARTUP = 10000
CAP_CANCEL_DELAY = 0.05  # seconds a statement over its row cap may take to finish by itself

_I32 = struct.Struct("!I")


def fatal(sqlstate: str, message: str, hint: str | None = None) -> bytes:
    return error_message(sqlstate, message, severity="FATAL", hint=hint)



def postgres_application_name(raw: str) -> str:
    """application_name as PostgreSQL 15 keeps it: bytes outside printable ASCII become
    ``?`` and the value is cut at 63 bytes (NAMEDATALEN - 1). Operators are matched, and
    audit records written, on what the server will report, not on an unbounded client
    string (a 9000-character name made every record of its session 15 times larger)."""
    data = raw.encode("utf-8", "surrogateescape")[:63]
    return bytes(c if 32 <= c <= 126 else 63 for c in data).decode("ascii")


class ClientGone(Exception):
    pass


class _Reader:
    """Buffered reads for the startup phase, fed by a Protocol's data_received."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.eof = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def feed_eof(self) -> None:
        self.eof = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _need(self, n: int) -> None:
        while len(self.buf) < n:
            if self.eof:
                raise ClientGone("connection closed")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter

    async def read_startup(self) -> bytes:
        await self._need(4)
        length = _I32.unpack_from(self.buf, 0)[0]
        if length < 8 or length > MAX_STARTUP:
            raise ValueError(f"invalid startup packet length {length}")
        await self._need(length)
        packet = bytes(self.buf[:length])
        del self.buf[:length]
        return packet

    async def read_message(self, max_size: int = 1 << 26) -> tuple[int, bytes]:
        await self._need(5)
        mtype = self.buf[0]
        length = _I32.unpack_from(self.buf, 1)[0]
        if length < 4 or length > max_size:
            raise ValueError(f"invalid message length {length}")
        await self._need(1 + length)
        frame = bytes(self.buf[:1 + length])
        del self.buf[:1 + length]
        return mtype, frame

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data


def parse_startup_params(packet: bytes) -> dict[str, str]:
    parts = packet[8:].split(b"\x00")
    params: dict[str, str] = {}
    for i in range(0, len(parts) - 1, 2):
        if not parts[i]:
            break
        params[parts[i].decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
    return params


def build_startup(params: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items())
    body = struct.pack("!I", PROTOCOL_3) + body + b"\x00"
    return struct.pack("!I", len(body) + 4) + body


class _HeldBytes:
    """A protected result held until its audit record is written (strict durability), and
    the completion the audit trail resolves for that record: the trail calls ``set_result``
    (written) or ``set_exception`` (it cannot be) -- the part of the Future interface it uses
    -- and the connection sends what it holds at once, without a Future and its callback
    round through the event loop."""

    __slots__ = ("conn", "data", "error", "state")
    WAITING: Final = 0
    WRITTEN: Final = 1
    FAILED: Final = 2

    def __init__(self, data: bytes, conn: ClientConnection):
        self.data = data
        self.conn = conn
        self.state = self.WAITING
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.state != self.WAITING

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return self.error

    def set_result(self, _result: object) -> None:
        if not self.state:
            self.state = self.WRITTEN
            self.conn._release()

    def set_exception(self, exc: BaseException) -> None:
        if not self.state:
            self.state, self.error = self.FAILED, exc
            self.conn._release()


class UpstreamProtocol(asyncio.Protocol):
    """The pgveil → PostgreSQL leg; hands bytes to its ClientConnection."""

    def __init__(self, client: ClientConnection):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.reader = _Reader()
        self.relaying = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.relaying:
            client = self.client
            session = client.session
            skip = 0
            if session is not None:
                if not client._pending:
                    # hot path: results of pass-through statements, forwarded as they came
                    try:
                        skip = session.plain_response(data)
                    except Exception:  # noqa: BLE001 - the general path reports it
                        skip = 0
                    if skip == len(data):
                        transport = client.transport
                        if transport is not None and not transport.is_closing():
                            transport.write(data)
                        return
                if not skip:
                    # hot path: the whole result of one protected SELECT
                    try:
                        done = session.protected_response(data)
                    except Exception:  # noqa: BLE001 - the general path reports it
                        done = None
                    if done is not None:
                        client.protected_result(*done)
                        return
            client.from_server(data, skip)
        else:
            self.reader.feed(data)

    def eof_received(self) -> bool | None:
        return False

    def channel_binding(self) -> bytes | None:
        """tls-server-end-point data of PostgreSQL's certificate, when this leg is TLS."""
        return _peer_binding(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.feed_eof()
        self.client.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.client.pause_reading_client()

    def resume_writing(self) -> None:
        self.client.resume_reading_client()


class ClientConnection(asyncio.Protocol):
    """One client session (see module docstring)."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.transport: asyncio.Transport | None = None
        self.reader = _Reader()
        self.upstream: UpstreamProtocol | None = None
        self.session: Session | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer: str = ""
        self.peer_ip: str | None = None
        self.tls = False
        self.closed = False
        self.backend_key: tuple[int, int] | None = None  # upstream (pid, secret)
        self.our_key: tuple[int, int] | None = None
        # client output waiting for audit records (strict durability): bytes, HeldResults
        # and barriers, in order
        self._pending: deque[Any] = deque()
        self._watched: set[asyncio.Future[None]] = set()
        self._last_activity = time.monotonic()
        self._track_idle = runtime.config.listen.idle_timeout > 0  # the idle reaper's input
        self._paused_for: set[str] = set()  # why reading the client is paused
        self._resuming = False  # a _resume_client is due (the session stopped after a slice)
        self._counted = False
        self.over_capacity = False
        # the audit error of statements still running when the connection ends (Session.abandon)
        self._ended_because = "the session ended before the statement completed"

    def channel_binding(self) -> bytes | None:
        """tls-server-end-point data of pgveil's own certificate, when the client is on TLS."""
        if not self.tls or self.rt.server_cert_der is None:
            return None
        from proxy.scram import tls_server_end_point

        try:
            return tls_server_end_point(self.rt.server_cert_der)
        except ValueError:
            return None

    # ----------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        else:
            self.peer_ip, self.peer = None, "local"
        # over capacity: still answer SSLRequest, so the client can read our error (libpq
        # reports an error sent during the SSL exchange obscurely)
        self.over_capacity = self.rt.connection_count >= self.rt.config.listen.max_connections
        self.rt.connection_opened(self)
        self._counted = True
        self.task = asyncio.get_running_loop().create_task(self._startup())

    def data_received(self, data: bytes) -> None:
        if self._track_idle:
            self._last_activity = time.monotonic()
        session = self.session
        if session is not None:
            # hot path: one whole Query of a pass-through statement, forwarded as it came
            first = data[0]
            try:
                if first == 0x51 and len(data) == 1 + _I32.unpack_from(data, 1)[0]:
                    sent = session.fast_query(data)
                elif first == 0x42 and len(data) >= 20 and session.fast_batch(data):
                    sent = data
                else:
                    sent = None
            except Exception:  # a bug in a hot path: the general path decides (and reports)
                log.exception("hot path failed for %s; using the general path", self.peer)
                sent = None
            if sent is not None:
                up = self.upstream
                if up is not None and up.transport is not None:
                    up.transport.write(sent)
                return
            self._feed(session, data)
        else:
            self.reader.feed(data)

    def _feed(self, session: Session, data: bytes) -> None:
        """The general path: ``data`` through the session. When the session stops after a
        long analysis (Output.resume), reading pauses and the rest is taken up on a later
        turn of the loop, so that one client's pipeline of long statements does not hold
        every other connection."""
        try:
            out = session.from_client(data)
        except Exception as exc:  # a malformed stream: end the session cleanly
            log.warning("client %s sent an invalid message stream: %s", self.peer, exc)
            self.send_client(fatal("08P01", f"invalid frontend message: {exc}"))
            self.close()
            return
        self._perform(out)  # schedules the rest when out.resume
        if not out.resume and self._resuming:
            self._resuming = False
            self.resume_reading_client("analysis")

    def _resume_later(self) -> None:
        """The session stopped after a long analysis (Output.resume), answering the client
        (_feed) or releasing bytes it held for the server's answer (from_server): pause
        reading the client and take up the rest on a later turn of the loop."""
        if self.closed:
            return
        if not self._resuming:
            self._resuming = True
            self.pause_reading_client("analysis")
        asyncio.get_running_loop().call_soon(self._resume_client)

    def _resume_client(self) -> None:
        session = self.session
        if session is not None and not self.closed:
            self._feed(session, b"")

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.feed_eof()
        self._ended_because = ("the client disconnected before the statement completed; "
                               "its outcome is unknown")
        was_busy = self.session is not None and bool(self.session._slots)
        if was_busy and self.backend_key is not None:
            # the client vanished mid-query: don't leave PostgreSQL working for nobody
            self.rt.spawn(self.rt.send_cancel(self.backend_key))
        self.close()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            with contextlib.suppress(Exception):
                self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            with contextlib.suppress(Exception):
                self.upstream.transport.resume_reading()

    def pause_reading_client(self, why: str = "upstream") -> None:
        """Stop reading the client (``why``: PostgreSQL is not reading us, or the session is
        still working through what it has); reading resumes when every reason has passed."""
        if not self._paused_for:
            if self.transport is not None:
                with contextlib.suppress(Exception):
                    self.transport.pause_reading()
        self._paused_for.add(why)

    def resume_reading_client(self, why: str = "upstream") -> None:
        self._paused_for.discard(why)
        if not self._paused_for and self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    # ----------------------------------------------------------- relay
    def from_server(self, data: bytes, skip: int = 0) -> None:
        """Server bytes through the session (``skip``: leading bytes the hot path in
        UpstreamProtocol.data_received already accounted for)."""
        session = self.session
        if session is None:
            return
        try:
            out = session.from_server(data, skip)
        except Exception as exc:
            log.exception("error handling server data for %s", self.peer)
            self.rt.metrics.upstream_errors.inc()
            self.send_client(fatal("XX000", f"pgveil internal error: {exc}"))
            self.close()
            return
        self._perform(out)

    def protected_result(self, data: bytes, form: Any, rows: int, duration_ms: float) -> None:
        """Session.protected_response's result: submit its audit record and send ``data``,
        with strict durability only once the record is written."""
        if not self.rt.strict_audit:
            self.rt.submit_form(form, rows, duration_ms)
            if self._pending:
                self._pending.append(data)
                self._release()
            else:
                self.send_client(data)
            return
        held = _HeldBytes(data, self)
        if self.rt.submit_form(form, rows, duration_ms, held) is None:
            held.state = _HeldBytes.WRITTEN  # no trail: nothing to wait for
        self._pending.append(held)
        if held.state or len(self._pending) > 1:
            self._release()

    def _perform(self, out: Output) -> None:
        up = self.upstream
        if out.to_server and up is not None and up.transport is not None:
            if len(out.to_server) == 1:
                up.transport.write(out.to_server[0])
            else:
                up.transport.writelines(out.to_server)
        if out.audit:
            scs = self.session is None or self.session.lex.standard_conforming_strings
            for ev in out.audit:
                ev.future = self.rt.submit_audit(ev.fields, scs)
                if ev.future is not None and self.rt.strict_audit and not ev.held:
                    # strict: what follows waits for this record (a HeldResult waits itself)
                    self._pending.append(_Barrier(ev.future))
        if out.to_client:
            if self._pending:
                self._pending.extend(out.to_client)
                self._release()
            elif len(out.to_client) == 1 and isinstance(out.to_client[0], bytes):
                self.send_client(out.to_client[0])
            else:
                self._pending.extend(out.to_client)
                self._release()
        if out.cancel and self.backend_key is not None and self.session is not None:
            # Most capped statements finish on their own within moments; cancelling those would
            # race with the client's next statement. Cancel only one still running shortly after.
            run = self.session.capped_run
            asyncio.get_running_loop().call_later(CAP_CANCEL_DELAY, self._cancel_if_running, run)
        if out.resume:
            self._resume_later()
        if out.close:
            self.close()

    def _cancel_if_running(self, run: object) -> None:
        if run is not None and self.session is not None and self.session.capped_run is run \
                and self.backend_key is not None and not self.closed:
            self.rt.spawn(self.rt.send_cancel(self.backend_key))

    def _release(self, _: object = None) -> None:
        """Send queued client output in order, stopping at the first item whose audit record
        is not yet durable (strict durability); resumed by that record's future."""
        pending = self._pending
        batch: list[bytes] = []
        while pending:
            item = pending[0]
            kind = type(item)
            if kind is bytes:
                batch.append(item)
            elif kind is _HeldBytes:
                if not item.state:
                    break  # released by the trail (item.set_result / set_exception)
                if item.state == _HeldBytes.WRITTEN or \
                        self.rt.config.audit.on_failure == "allow":
                    batch.append(item.data)
                else:
                    batch.append(WITHHELD_RESULT)
            else:
                fut = item.event.future if isinstance(item, HeldResult) and item.event \
                    else getattr(item, "future", None)
                if fut is not None and not fut.done():
                    if fut not in self._watched:
                        self._watched.add(fut)
                        fut.add_done_callback(self._audit_done)
                    break
                ok = fut is None or (not fut.cancelled() and fut.exception() is None)
                if not ok and self.rt.config.audit.on_failure == "allow":
                    ok = True  # the trail counted the failure; results are not withheld
                if isinstance(item, HeldResult):
                    batch.extend(item.data if ok else [item.failure])
            pending.popleft()
        if batch:
            self._send_client_many(batch)

    def _audit_done(self, fut: asyncio.Future[None]) -> None:
        self._watched.discard(fut)
        self._release()

    def send_client(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _send_client_many(self, chunks: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            else:
                self.transport.writelines(chunks)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self._ended_because = ("the connection to PostgreSQL was lost before the statement "
                               "completed; its outcome is unknown")
        if self.session is not None and not self.session.server_fatal:
            # (after PostgreSQL's own FATAL -- terminated, idle timeout -- the client has
            # the reason already: a second error would hide it from drivers that keep the last)
            self.rt.metrics.upstream_errors.inc()
            self.send_client(fatal(
                "08006", "the connection to the PostgreSQL server was lost",
                hint="pgveil is still running; reconnect when the database is back"))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._counted:
            self.rt.connection_closed(self)
        if self.our_key is not None:  # the session's cancel key ends with it
            self.rt.cancel_keys.pop(self.our_key, None)
        if self.session is not None:
            try:
                ended = self.session.abandon(self._ended_because)
                for ev in ended.audit:
                    self.rt.submit_audit(ev.fields, self.session.lex.standard_conforming_strings)
            except Exception:  # noqa: BLE001 - the transports below must close regardless
                log.exception("recording the statements of an ended session failed")
        if self.upstream is not None and self.upstream.transport is not None:
            with contextlib.suppress(Exception):
                if not self.upstream.transport.is_closing():
                    self.upstream.transport.write(b"X\x00\x00\x00\x04")
                self.upstream.transport.close()
        if self.transport is not None:
            self.transport.close()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def idle_for(self) -> float:
        return time.monotonic() - self._last_activity

    # ----------------------------------------------------------- startup
    async def _startup(self) -> None:
        timeout = self.rt.config.listen.startup_timeout
        try:
            await asyncio.wait_for(self._negotiate(), timeout)
        except asyncio.TimeoutError:
            log.info("closing %s: startup not completed within %g s", self.peer, timeout)
            self.send_client(fatal("08006", f"pgveil: startup not completed within {timeout:g} s "
                                            "(listen.startup_timeout)"))
            self.close()
        except ClientGone:
            self.close()
        except asyncio.CancelledError:
            self.close()
        except ValueError as exc:
            self.send_client(fatal("08P01", f"invalid startup packet: {exc}"))
            self.close()
        except Exception as exc:  # never let one client's failure take the server down
            log.exception("startup failed for %s", self.peer)
            self.send_client(fatal("XX000", f"pgveil: {exc}"))
            self.close()

    async def _negotiate(self) -> None:
        tls_mode = self.rt.client_tls_mode
        while True:
            packet = await self.reader.read_startup()
            code = _I32.unpack_from(packet, 4)[0]
            if code == SSL_REQUEST:
                if self.tls or tls_mode == "disable" or self.rt.server_ssl is None:
                    self.send_client(b"N")
                    continue
                if self.reader.buf:
                    raise ValueError("data received before TLS handshake")
                self.send_client(b"S")
                loop = asyncio.get_running_loop()
                assert self.transport is not None
                new = await loop.start_tls(self.transport, self, self.rt.server_ssl,
                                           server_side=True)
                self.transport = new  # type: ignore[assignment]
                self.tls = True
                continue
            if code == GSSENC_REQUEST:
                self.send_client(b"N")
                continue
            if code == CANCEL_REQUEST:
                if len(packet) == 16:
                    pid, key = struct.unpack_from("!II", packet, 8)
                    await self.rt.handle_cancel(pid, key)
                self.close()
                return
            if code >> 16 != 3:  # PostgreSQL's words and SQLSTATE
                self.send_client(fatal(
                    "0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                             "server supports 3.0 to 3.0"))
                self.close()
                return
            break
        if tls_mode == "require" and not self.tls:
            self.send_client(fatal("28000", "pgveil requires TLS (tls.mode: require)",
                                    hint="connect with sslmode=require"))
            self.close()
            return
        if self.over_capacity:
            self.send_client(fatal("53300", "sorry, too many clients already (pgveil "
                                   "listen.max_connections)"))
            self.close()
            return
        params = parse_startup_params(packet)
        self._negotiate_version(code, params)
        await self._login(packet, params)

    def _negotiate_version(self, code: int, params: dict[str, str]) -> None:
        """pgveil speaks protocol 3.0 on both legs. A client asking for a newer minor version
        or for ``_pq_.`` extensions is told so (NegotiateProtocolVersion, before the
        authentication exchange, where PostgreSQL would send it) and settles on 3.0; the
        options never reach PostgreSQL, whose own 'v' the authentication relay would not
        expect."""
        options = [k for k in params if k.startswith("_pq_.")]
        for k in options:
            del params[k]
        if code & 0xFFFF or options:
            self.send_client(NegotiateProtocolVersion(PROTOCOL_3, tuple(options)).encode())

    async def _login(self, packet: bytes, params: dict[str, str]) -> None:
        user = params.get("user", "")
        database = params.get("database", user)
        application = postgres_application_name(params.get("application_name", ""))
        if not user:
            self.send_client(fatal("28000", "no PostgreSQL user name specified in startup "
                                    "packet"))
            self.close()
            return
        try:
            role, unrestricted = self.rt.role_of(user, self.peer_ip, application)
        except LookupError as exc:
            self.send_client(fatal("28000", str(exc)))
            self.close()
            return
        refused = None if unrestricted else refused_startup_setting(params)
        if refused is not None:
            effect = ("would make the backend a replication sender, streaming rows by "
                      "commands that are not SQL" if refused.startswith("replication=") else
                      "would switch the database role or send the rewritten statements' "
                      "internals to the client")
            self.send_client(fatal(
                "42501", f"startup setting {refused!r} {effect}, escaping the policy for "
                f"role {role}"))
            self.close()
            return
        upstream = await self.rt.authenticator.login(self, params, self._connect_upstream)
        if upstream is None:
            self.close()
            return
        self.upstream = upstream
        # Only now, PostgreSQL having accepted the login to ``database``, is its catalog read:
        # before, the name is an unauthenticated client's claim (a name per connection would
        # leave a catalog watcher each).
        try:
            view = await self.rt.operator_view(user, self.peer_ip, application, database)
        except LookupError as exc:  # the policy was reloaded in between
            self.send_client(fatal("28000", str(exc)))
            self.close()
            return
        except PolicyError as exc:  # a mask that cannot apply to this database's columns
            log.warning("refused %s (login %r, database %r): the policy does not apply: %s",
                        self.peer, user, database, "; ".join(exc.errors))
            self.send_client(fatal("F0000", f"pgveil: the policy cannot be applied to database "
                                            f"{database!r}: {'; '.join(exc.errors)}"))
            self.close()
            return
        if unrestricted and not view.unrestricted and refused_startup_setting(params):
            # a reload made the role masked while the login was checked: the settings the
            # backend now runs with were allowed for the old role only
            self.send_client(fatal("42501", f"startup setting refused for role {view.role} "
                                            "(the policy changed during the login)"))
            self.close()
            return
        await self._finish_startup(upstream, view, params, database, application, user)

    async def _connect_upstream(self, params: dict[str, str]) -> UpstreamProtocol | None:
        """Open the upstream leg (TLS per upstream.tls) and send the StartupMessage."""
        cfg = self.rt.config.upstream
        loop = asyncio.get_running_loop()
        proto = UpstreamProtocol(self)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: proto, cfg.host, cfg.port), cfg.connect_timeout)
            if cfg.tls != "disable":
                transport.write(struct.pack("!II", 8, SSL_REQUEST))
                await asyncio.wait_for(proto.reader._need(1), cfg.connect_timeout)
                answer = bytes(proto.reader.buf[:1])
                del proto.reader.buf[:1]
                if answer == b"S":
                    ctx = self.rt.upstream_ssl
                    secured = await loop.start_tls(
                        transport, proto, ctx,
                        server_hostname=cfg.host if cfg.tls == "verify-full" else None,
                        ssl_handshake_timeout=cfg.connect_timeout)
                    if secured is None:  # the loop closed the connection during the handshake
                        raise ConnectionError("TLS handshake with PostgreSQL did not complete")
                    transport = secured
                    proto.transport = transport
                elif cfg.tls in ("require", "verify-ca", "verify-full"):
                    raise ConnectionError("upstream PostgreSQL refused TLS (upstream.tls: "
                                          f"{cfg.tls})")
            self.upstream = proto
            assert proto.transport is not None
            proto.transport.write(build_startup(params))
            # a server (or something in between) that accepts and never answers: the client
            # gets an error, not a wait as long as its own patience
            try:
                await asyncio.wait_for(proto.reader._need(1), cfg.connect_timeout)
            except asyncio.TimeoutError:
                raise ConnectionError(f"no answer to the startup message within "
                                      f"{cfg.connect_timeout:g} s") from None
        except (OSError, asyncio.TimeoutError, ConnectionError, ClientGone, ssl.SSLError) as exc:
            self.rt.metrics.upstream_errors.inc()
            log.warning("cannot reach upstream %s:%s: %s", cfg.host, cfg.port, exc)
            self.send_client(fatal(
                "08006", f"pgveil cannot connect to the PostgreSQL server at "
                f"{cfg.host}:{cfg.port}: {exc or type(exc).__name__}",
                hint="the database may be down or restarting; retry shortly"))
            self.close()
            return None
        return proto

    async def _finish_startup(self, upstream: UpstreamProtocol, view: Any,
                              params: dict[str, str], database: str, application: str,
                              user: str) -> None:
        """Relay ParameterStatus/BackendKeyData until ReadyForQuery, then switch to relaying."""
        parameters: dict[str, str] = {}
        chunks: list[bytes] = []
        while True:
            mtype, frame = await upstream.reader.read_message()
            if mtype == 0x4B:  # BackendKeyData: keep the real one, hand out ours
                pid, key = struct.unpack_from("!II", frame, 5)
                self.backend_key = (pid, key)
                self.our_key = self.rt.register_cancel_key(self.backend_key)
                chunks.append(b"K" + struct.pack("!III", 12, *self.our_key))
                continue
            if mtype == 0x53:  # ParameterStatus
                name, _, rest = frame[5:].partition(b"\x00")
                parameters[name.decode()] = rest.split(b"\x00")[0].decode("utf-8", "replace")
            chunks.append(frame)
            if mtype == 0x45:  # ErrorResponse during startup (e.g. database does not exist)
                self._send_client_many(chunks)
                self.close()
                return
            if mtype == 0x5A:
                break
        from rewriters.model import LexSettings

        lex = LexSettings(parameters.get("standard_conforming_strings", "on") == "on",
                          parameters.get("client_encoding", "UTF8"))
        identity = {
            "session": secrets.token_hex(4), "operator": user, "role": view.role,
            "client": self.peer, "application": application, "database": database,
        }
        self.session = self.rt.new_session(view, lex, identity, database, self.peer_ip)
        self.session.parameters.update(parameters)
        upstream.relaying = True
        leftover = upstream.reader.take()
        self._send_client_many(chunks)
        pending = self.reader.take()
        if leftover:
            self.from_server(leftover)
        if pending:
            self.data_received(pending)


# Settings a masked role may not choose at startup, as a startup parameter of their own or
# inside ``options`` (-c name=value); rewriters.verify refuses the same through SET/set_config.
_GUARDED_SETTINGS = tuple(sorted(ROLE_SETTINGS | DEBUG_SETTINGS))
# the values of the ``replication`` startup key that keep a normal backend (parse_bool_with_len)
_NOT_REPLICATION = ("false", "off", "no", "0", "f", "n", "of", "fa", "fal", "fals")


def refused_startup_setting(params: dict[str, str]) -> str | None:
    """The startup parameter (``name=value``) that would escape the policy, or None.

    ``replication`` (anything PostgreSQL does not read as false) makes the backend a WAL
    sender: ``START_REPLICATION`` streams every change of every table, ``BASE_BACKUP`` the
    data files, ``CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT`` hands out a snapshot -- raw
    rows through commands that are not SQL and name no table.
    """
    for key, value in params.items():
        low = _setting_name(key)
        if low in _GUARDED_SETTINGS:
            return f"{key}={value}"
        if key == "replication" and value.strip().lower() not in _NOT_REPLICATION:
            return f"{key}={value}"
        if low == "options":
            # PostgreSQL splits options on unescaped whitespace, drops the backslashes and
            # reads "-" in a name as "_" (-c debug-print-plan=on, --debug_print_pl\an=on)
            packed = _setting_name(value)
            if "authorization=" in packed or any(f"{s}=" in packed for s in _GUARDED_SETTINGS):
                return value
    return None


def _setting_name(text: str) -> str:
    return "".join(text.split()).replace("\\", "").replace("-", "_").lower()


class _Barrier:
    """Client output after this point waits for an audit record (no result of its own)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]):
        self.future = future


def _peer_binding(transport: asyncio.BaseTransport | None) -> bytes | None:
    if transport is None:
        return None
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return None
    der = obj.getpeercert(binary_form=True)
    if not der:
        return None
    from proxy.scram import tls_server_end_point

    try:
        return tls_server_end_point(der)
    except ValueError:
        return None


def make_server_ssl(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def make_upstream_ssl(mode: str, ca: str | None) -> ssl.SSLContext:
    if mode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = mode == "verify-full"
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def random_key() -> tuple[int, int]:
    return (secrets.randbelow(1 << 30) + 1, secrets.randbits(32))


def spawn_holder() -> tuple[set[asyncio.Task[Any]], Callable[[Any], asyncio.Task[Any]]]:
    """Keep task references so they are not garbage-collected mid-flight (STYLE rule 7)."""
    tasks: set[asyncio.Task[Any]] = set()

    def finished(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        # a background task that dies (the idle reaper, a policy watcher) must say so at once,
        # not in a "never retrieved" warning at garbage collection, if ever
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_coro(), exc_info=task.exception())

    def spawn(coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(finished)
        return task

    return tasks, spawn


