"""One SMB connection driven by asyncio: TCP, NEGOTIATE, SESSION_SETUP, IPC$.

:class:`SmbConnection` is an :class:`asyncio.Protocol` around a :class:`~.core.Smb2Client`: it
sends what the core builds and hands each response to whoever waits for its message id,
as a callback (READ and WRITE completions) or a future (everything else). Requests that
find too few credits wait in one FIFO queue, so the order on the wire is the order of
submission. When the connection dies, every waiter and every pipe on it fails with
:class:`~npipe.errors.ConnectionLost`.

A server that vanishes without closing the connection (switched off, a route gone)
sends no FIN: nothing would ever fail. ``Options.dead_peer_timeout`` bounds that wait
(:class:`Liveness`: an SMB ECHO when requests wait on a silent server, which must be
answered in time), and TCP keepalive with the same bound watches the connections that
have nothing outstanding.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import spnego

from npipe.errors import (
    AccessDenied,
    AuthenticationError,
    ConfigError,
    ConnectionLost,
    HostUnreachable,
    NegotiationTampered,
    says_exiting,
)
from npipe.smb import status as st
from npipe.smb.credentials import Credentials
from npipe.smb.native import wire
from npipe.smb.native.core import Options, Outgoing, Response, Smb2Client
from npipe.smb.native.crypto import CIPHER_NAMES, SIGNING_NAMES
from npipe.smb.native.negotiate import DIALECT_NAMES, SMB3_DIALECTS, SMB_3_0

log = logging.getLogger("npipe.smb")

Callback = Callable[[Response | BaseException], None]

# Samba never answers a pipe READ still pending at CLOSE and keeps it (its length plus
# ~4 KB in smbd) for the connection's life: after this many, new pipes go to a fresh
# connection, and the old one goes when its last pipe closes.
ABANDONED_READS_LIMIT = 256
# TCP keepalive probes before the kernel gives a connection up (see keepalive_settings).
KEEPALIVE_PROBES = 3


class Liveness:
    """When a connection sends an SMB ECHO, and when it is dead (sans-I/O: times in,
    decisions out).

    A connection is *waiting* while requests are outstanding, and a pipe always keeps a
    READ posted, so a quiet pipe is waiting all the time. Silence alone proves nothing
    then; so a waiting connection that has heard nothing from its server for
    ``timeout / 2`` sends an ECHO, and if nothing at all has come ``timeout / 2`` after
    that ECHO left, the server is dead: at most ``timeout`` of silence, counted from the
    last thing heard. Anything the server sends counts as an answer, so a busy connection
    whose server answers sends no ECHO; nor does one with nothing outstanding (TCP
    keepalive watches those, without SMB traffic).
    """

    ECHO = "echo"
    DEAD = "dead"

    __slots__ = ("echo_sent", "timeout")

    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"dead_peer_timeout must be positive, not {timeout!r}")
        self.timeout = timeout
        self.echo_sent: float | None = None  # when the unanswered ECHO left

    def poll(
        self, now: float, heard: float, waiting: bool, can_echo: bool = True
    ) -> tuple[str | None, float]:
        """What to do at ``now``, the server last heard from at ``heard``, ``waiting``
        as above: (``ECHO``, ``DEAD`` or None; when to poll next). ``can_echo`` False
        (no credit for one: the server holds them all) puts the ECHO off."""
        half = self.timeout / 2
        sent = self.echo_sent
        if sent is not None:
            if heard > sent:
                self.echo_sent = None  # answered (by the ECHO's response or anything)
            elif now >= sent + half:
                return self.DEAD, now
            else:
                return None, sent + half
        if not waiting:
            return None, now + half
        quiet_until = heard + half
        if now < quiet_until:
            return None, quiet_until
        if not can_echo:
            return None, now + half
        self.echo_sent = now
        return self.ECHO, now + half


def keepalive_settings(timeout: float) -> tuple[int, int, int]:
    """TCP keepalive for ``dead_peer_timeout``: idle seconds before the first probe, the
    seconds between probes, how many go unanswered before the kernel ends the
    connection. About ``timeout`` in all (whole seconds, at least one each)."""
    idle = max(1, round(timeout / 2))
    interval = max(1, round(timeout / 2 / KEEPALIVE_PROBES))
    return idle, interval, KEEPALIVE_PROBES


def set_keepalive(sock: socket.socket, timeout: float) -> None:
    """Turn TCP keepalive on with :func:`keepalive_settings`; options a system lacks
    (TCP_KEEPIDLE is TCP_KEEPALIVE on macOS) keep the system's values."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, probes = keepalive_settings(timeout)
    idle_option = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    for option, value in ((idle_option, idle),
                          (getattr(socket, "TCP_KEEPINTVL", None), interval),
                          (getattr(socket, "TCP_KEEPCNT", None), probes)):
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


class SmbConnection(asyncio.Protocol):
    """One TCP connection, one authenticated session, one IPC$ tree connect."""

    def __init__(self, host: str, port: int, options: Options | None = None) -> None:
        self.host = host
        self.port = port
        # A copy: setup adjusts it to the server (3.1.1 always signs), not the caller's.
        self.core = Smb2Client(dataclasses.replace(options) if options is not None else None)
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None  # why the connection is gone
        self.closed = False
        self.pipes: set[Any] = set()  # open pipes (npipe.smb.native.pipe.RemotePipe)
        self.encrypted = False
        self.pipe_wait = True  # until the server says it has no FSCTL_PIPE_WAIT (Samba)
        self.transceive_ok = True  # until the server refuses FSCTL_PIPE_TRANSCEIVE
        self.retired = False
        self.stuck = False  # a pipe's CLOSE went unanswered: end with a reset, not LOGOFF
        self.abandoned_reads = 0
        self._waiting: dict[int, Callback] = {}
        self._async_ids: dict[int, int] = {}
        self._queue: collections.deque[tuple[Callable[[], Outgoing], int, Callback]] = (
            collections.deque()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.user: str | None = None
        self._sock: socket.socket | None = None
        self._corked = 0
        self._out: list[bytes | bytearray | memoryview] = []
        self._clock: Callable[[], float] = time.monotonic  # the loop's, once it runs
        self.heard = self._clock()  # when the server last sent something
        self.echoes = 0  # ECHOs sent because the server was silent (for the tests)
        self._liveness: Liveness | None = None
        self._liveness_timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None  # close() once retired and idle

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A WRITE and the next READ leave back to back: without TCP_NODELAY the
            # second waits for the first's ACK (Nagle).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.core.options.dead_peer_timeout:
                set_keepalive(sock, self.core.options.dead_peer_timeout)

    def data_received(self, data: bytes) -> None:
        self.heard = self._clock()
        try:
            responses = self.core.receive(data)
        except wire.ProtocolError as exc:
            self.abort(ConnectionLost(f"the SMB server {self.where} sent a bad message: {exc}"))
            return
        # What the callbacks send (CLOSEs, WRITEs of a relay) leaves in one write.
        self.cork()
        try:
            self._dispatch(responses)
        finally:
            self.uncork()

    def _dispatch(self, responses: list[Response]) -> None:
        waiting = self._waiting
        for response in responses:
            header = response.header
            mid = header.message_id
            if header.status == wire.STATUS_PENDING and header.is_async:
                self._async_ids[mid] = header.async_id  # the final answer comes later
                continue
            callback = waiting.pop(mid, None)
            if callback is None:
                # A request its sender gave up on (a closed pipe's READ); nothing waits.
                continue
            if self._async_ids:
                self._async_ids.pop(mid, None)
            callback(response)
        if self._queue:
            self._flush_queue()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            why = f": {exc}" if exc else ""
            self.error = ConnectionLost(f"the SMB connection to {self.where} was lost{why}")
            if self.pipes or self._waiting:
                log.warning("%s", self.error)
        self._fail_all()

    # --- sending ------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return (
            self.error is None
            and self.transport is not None
            and not self.closed
            and self._loop is not None
            and not self._loop.is_closed()
        )

    @property
    def usable(self) -> bool:
        return self.alive and not self.retired

    @property
    def busy(self) -> bool:
        """Whether pipes are open on it."""
        return bool(self.pipes)

    def submit(self, build: Callable[[], Outgoing], charge: int, callback: Callback) -> None:
        """Send the request ``build`` makes as soon as ``charge`` credits are in hand;
        ``callback`` gets its final response, or the error that ends the connection."""
        if self.error is not None:
            callback(self.error)
            return
        if self._queue or not self.core.can_send(charge):
            self._queue.append((build, charge, callback))
            return
        self._send(build(), callback)

    def submit_many(
        self, build: Callable[[], Outgoing], charge: int, callbacks: list[Callback]
    ) -> None:
        """Like :meth:`submit` for a compound: one callback per request in it."""
        if self.error is not None:
            for callback in callbacks:
                callback(self.error)
            return
        self.submit(build, charge, _Many(callbacks))

    def _send(self, out: Outgoing, callback: Callback) -> None:
        ids = out.message_ids
        if isinstance(callback, _Many):
            for mid, each in zip(ids, callback.callbacks, strict=True):
                self._waiting[mid] = each
        elif ids:
            self._waiting[ids[-1]] = callback
            for mid in ids[:-1]:
                self._waiting[mid] = _ignore
        if self._corked:
            self._out.extend(out.parts)
        else:
            self._write(out.parts)

    def _write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        transport = self.transport
        assert transport is not None
        if len(parts) == 1:
            transport.write(parts[0])
        elif sum(len(p) for p in parts) <= 65536:
            transport.write(b"".join(parts))  # one send for small messages
        else:
            for part in parts:  # large ones without joining them first
                transport.write(part)

    def cork(self) -> None:
        """Hold what is sent until :meth:`uncork` (nests): one TCP send for several
        requests, e.g. the READ a pipe posts and the WRITE that follows it."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked and self._out:
            parts, self._out = self._out, []
            if self.error is None:
                self._write(parts)

    def _flush_queue(self) -> None:
        queue = self._queue
        while queue and self.core.can_send(queue[0][1]):
            build, _charge, callback = queue.popleft()
            self._send(build(), callback)

    def request(
        self,
        command: int,
        body: bytes,
        *,
        payload: int = 0,
        tree: bool = True,
        data: bytes | memoryview | None = None,
    ) -> asyncio.Future[Response]:
        """A future of the final response to one request."""
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        core = self.core
        self.submit(
            lambda: core.request(command, body, payload=payload, tree=tree, data=data),
            core.charge(payload),
            _resolver(future),
        )
        return future

    def forget(self, message_id: int) -> None:
        """Stop waiting for a request (its late response, if any, is dropped)."""
        self._waiting.pop(message_id, None)
        self._async_ids.pop(message_id, None)

    def cancel(self, message_id: int) -> None:
        """Ask the server to cancel a pending request (Samba ignores it for pipe READs)."""
        if not self.alive or message_id not in self._waiting:
            return
        out = self.core.cancel(message_id, self._async_ids.get(message_id))
        if self._corked:
            self._out.extend(out.parts)
        else:
            self._write(out.parts)

    # --- ending ----------------------------------------------------------------------

    def abort(self, error: BaseException, *, quiet: bool = False) -> None:
        """The connection cannot go on: fail everything on it with ``error`` (logged
        unless ``quiet``: its caller raises it)."""
        if self.error is None:
            self.error = error
            if not quiet:
                log.warning("%s", error)
        if self.transport is not None:
            self.transport.abort()
        self._fail_all()

    def _fail_all(self) -> None:
        error = self.error
        assert error is not None
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
            self._liveness_timer = None
        waiting, self._waiting = self._waiting, {}
        queue, self._queue = self._queue, collections.deque()
        for callback in waiting.values():
            callback(error)
        for _build, _charge, callback in queue:
            callback(error)
        for pipe in list(self.pipes):
            pipe.link_lost(error)

    async def close(self) -> None:
        """LOGOFF and disconnect (pipes still open on it end with ConnectionLost). A
        connection with a stuck pipe is reset instead: Samba answers no LOGOFF then, and
        lets go of the pipe (its server's end) only when the connection breaks off."""
        if not self.alive:
            return
        self.closed = True
        if not self.stuck:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.request(wire.LOGOFF, wire.small_request(), tree=False), 2.0)
        if self.error is None:
            self.error = ConnectionLost(f"the SMB connection to {self.where} was closed")
        assert self.transport is not None
        if self.stuck:
            log.info("resetting SMB connection to %s (a pipe on it was stuck)", self.where)
            self.transport.abort()
        else:
            self.transport.close()
        self._fail_all()

    def retire(self, why: str) -> None:
        """No new pipes here; disconnect once the open ones are closed."""
        if self.retired:
            return
        self.retired = True
        log.info("retiring SMB connection to %s: %s", self.where, why)
        if len(self.pipes) > 1:
            log.debug("SMB connection to %s: disconnects once these are closed: %s",
                      self.where, ", ".join(sorted(p.name for p in self.pipes)))
        self.release()

    def abandoned(self, count: int) -> None:
        """``count`` READs of a closed pipe will never be answered (Samba keeps each
        until the connection ends): at the limit, move on to a new connection."""
        self.abandoned_reads += count
        if self.abandoned_reads >= ABANDONED_READS_LIMIT:
            self.retire(f"{self.abandoned_reads} READs of closed pipes are left on the server")

    def release(self) -> None:
        if self.retired and not self.pipes and self.alive and self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close())

    # --- a server that went silent ----------------------------------------------------

    def _watch(self) -> None:
        """Start watching for a dead server (after setup: until then establish's timeout
        bounds everything)."""
        timeout = self.core.options.dead_peer_timeout
        if timeout and self._loop is not None and self._liveness is None:
            self._liveness = Liveness(timeout)
            self._check_liveness()

    def _check_liveness(self) -> None:
        self._liveness_timer = None
        liveness = self._liveness
        loop = self._loop
        if liveness is None or loop is None or not self.alive:
            return
        now = loop.time()
        action, wake = liveness.poll(
            now, self.heard, bool(self._waiting or self._queue),
            can_echo=not self._queue and self.core.can_send(1),
        )
        if action == Liveness.DEAD:
            self.abort(ConnectionLost(
                f"the SMB server {self.where} sent nothing for {now - self.heard:.1f} s, "
                f"not even an answer to an ECHO: the connection is taken for dead "
                f"(dead_peer_timeout {liveness.timeout:g} s)"
            ))
            return
        if action == Liveness.ECHO:
            self.echoes += 1
            log.debug("%s silent for %.1f s with requests outstanding: ECHO",
                      self.where, now - self.heard)
            core = self.core
            self.submit(lambda: core.request(wire.ECHO, wire.small_request(), tree=False), 1,
                        _ignore)
        self._liveness_timer = loop.call_at(wake, self._check_liveness)

    # --- setup -----------------------------------------------------------------------

    async def establish(
        self,
        credentials: Credentials,
        encrypt: bool | None,
        timeout: float,
        *,
        allow_smb2: bool = False,
    ) -> None:
        """Connect, negotiate, authenticate, connect IPC$; npipe errors on failure.

        SMB 3.x only unless ``allow_smb2`` (ConfigError for a 2.x server); below 3.1.1
        the negotiation is validated (FSCTL_VALIDATE_NEGOTIATE_INFO), on 3.1.1 preauth
        integrity covers it: a negotiation changed on the way ends in
        NegotiationTampered."""
        loop = self._loop = asyncio.get_running_loop()
        self._clock = loop.time
        self.user = credentials.principal
        deadline = loop.time() + timeout  # one timeout for connect and setup together
        try:
            await asyncio.wait_for(self._connect(loop), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or "timed out"
            raise HostUnreachable(f"cannot reach the SMB server {self.where}: {reason}") from None
        try:
            await asyncio.wait_for(self._setup(credentials, encrypt, allow_smb2),
                                   max(deadline - loop.time(), 0))
        # The caller hears of a failure here (the exception): not logged as well.
        except asyncio.TimeoutError:
            unreachable = HostUnreachable(
                f"{self.where} did not complete SMB setup within {timeout:g} s"
            )
            self.abort(unreachable, quiet=True)
            raise unreachable from None
        except NegotiationTampered as exc:
            tampered = NegotiationTampered(
                f"the SMB negotiation with {self.where} was tampered with (downgrade "
                f"attack?): {exc}; the connection is closed"
            )
            self.abort(tampered, quiet=True)
            raise tampered from None
        except wire.ProtocolError as exc:
            error = ConnectionLost(f"the SMB server {self.where} sent a bad message: {exc}")
            self.abort(error, quiet=True)
            raise error from None
        except BaseException as exc:
            self.abort(exc if isinstance(exc, Exception) else ConnectionLost("cancelled"),
                       quiet=True)
            raise
        self._watch()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        # The socket is ours (not made inside create_connection) so that drop() can close
        # it after its event loop is gone: asyncio.run() leaves transports open.
        infos = _literal_address(self.host, self.port) or await loop.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM)
        error: OSError | None = None
        for family, kind, proto, _name, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            await loop.create_connection(lambda: self, sock=sock)
            return
        raise error or OSError(f"no address for {self.host}")

    def drop(self) -> None:
        """Close the socket now, from any thread, even after the loop is closed."""
        if self._sock is not None:
            self._sock.close()
        if self.error is None:
            self.error = ConnectionLost(f"the SMB connection to {self.where} was dropped")

    async def _setup(
        self, credentials: Credentials, encrypt: bool | None, allow_smb2: bool
    ) -> None:
        core = self.core
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._send(core.negotiate(), _resolver(future))
        neg = core.negotiated_by(await future)
        if neg.dialect < SMB_3_0 and not allow_smb2:
            offered_smb3 = [DIALECT_NAMES[d] for d in core.options.dialects if d >= SMB_3_0]
            raise ConfigError(
                f"{self.where} negotiated SMB {neg.dialect_name}, but npipe requires SMB 3 "
                f"({', '.join(offered_smb3) or 'none offered'}): SMB 2 cannot encrypt and "
                "cannot detect a downgrade. Pass allow_smb2=True to accept an SMB 2 server "
                "(if this server does speak SMB 3, someone on the path rewrote the "
                "negotiation)"
            )
        if encrypt and neg.cipher is None:
            raise ConfigError(
                f"{self.where} cannot encrypt (SMB {neg.dialect_name}): encrypt=True requires "
                "SMB 3 with a cipher; pass encrypt=None to accept signing only"
            )
        if not core.options.sign and neg.dialect in SMB3_DIALECTS:
            # 3.1.1 servers refuse unsigned sessions; on 3.0 and 3.0.2 the signed
            # VALIDATE_NEGOTIATE_INFO is what detects a downgrade.
            core.options.sign = True
        await self._authenticate(credentials, neg.security_buffer)
        if encrypt or (encrypt is None and neg.cipher is not None and neg.dialect >= SMB_3_0):
            core.require_encryption()
        tree = await self.request(
            wire.TREE_CONNECT, wire.tree_connect_request(f"\\\\{self.host}\\IPC$"), tree=False
        )
        if tree.status == st.STATUS_ACCESS_DENIED:
            raise AccessDenied(f"{self.where} denies {credentials.describe()} access to IPC$")
        if tree.status != wire.STATUS_SUCCESS:
            raise ConnectionLost(
                f"{self.where} refused the IPC$ tree connect: NTSTATUS {tree.status:#010x}"
            )
        info = wire.parse_tree_connect(tree.message)
        if info.share_flags & wire.SHAREFLAG_ENCRYPT_DATA and not core.encrypt:
            core.require_encryption()
        core.tree_id = tree.header.tree_id
        if core.needs_validation:
            await self._validate_negotiate()
        self.encrypted = core.encrypt
        log.info(
            "SMB connection to %s as %s: dialect %s, %s",
            self.where, credentials.describe(), neg.dialect_name, self.security,
        )

    async def _validate_negotiate(self) -> None:
        """FSCTL_VALIDATE_NEGOTIATE_INFO (below 3.1.1): NegotiationTampered unless the
        server confirms what its NEGOTIATE response said (a server that saw another
        NEGOTIATE hangs up, as MS-SMB2 3.3.5.15.12 and Samba do)."""
        try:
            response = await self.request(wire.IOCTL, self.core.validate_negotiate())
        except ConnectionLost as exc:
            raise NegotiationTampered(
                f"the server hung up when asked to validate the negotiation ({exc})"
            ) from None
        if not self.core.validated_by(response):
            log.info("%s does not implement VALIDATE_NEGOTIATE_INFO (NTSTATUS %#010x)",
                     self.where, response.status)

    @property
    def security(self) -> str:
        core = self.core
        if core.encrypt and core.cipher is not None:
            return f"encrypted ({CIPHER_NAMES[core.cipher.cipher]})"
        if core.sign and core.signer is not None:
            return f"signed ({SIGNING_NAMES[core.signer.algorithm]})"
        return "unsigned"

    async def _authenticate(self, credentials: Credentials, server_token: bytes) -> bytes:
        core = self.core
        try:
            ctx = spnego.client(
                credentials.principal, credentials.password, hostname=self.host,
                service="cifs", protocol=credentials.auth_protocol,
            )
            token = await asyncio.to_thread(ctx.step, None)
        except Exception as exc:
            if says_exiting(exc):
                raise  # not an authentication failure (see npipe.errors.says_exiting)
            raise AuthenticationError(
                f"cannot authenticate {credentials.describe()} to {self.where}: "
                f"{st.auth_failure_reason(exc)}"
            ) from None
        while True:
            future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            self.submit(functools.partial(core.session_setup, token or b""), 1, _resolver(future))
            response = await future
            status = response.status
            if status == wire.STATUS_MORE_PROCESSING_REQUIRED:
                in_token = core.session_setup_continues(response)
                try:
                    token = await asyncio.to_thread(ctx.step, in_token)
                except Exception as exc:
                    raise AuthenticationError(
                        f"{self.where} did not accept {credentials.describe()}: "
                        f"{st.auth_failure_reason(exc)}"
                    ) from None
                continue
            if status != wire.STATUS_SUCCESS:
                error = st.auth_error(status, self.where, credentials)
                raise error or AuthenticationError(
                    f"{self.where} refused the session of {credentials.describe()}: "
                    f"NTSTATUS {status:#010x}"
                )
            final = wire.parse_session_setup(response.message).token
            if final and not ctx.complete:
                await asyncio.to_thread(ctx.step, final)  # Kerberos mutual authentication
            try:
                key = ctx.session_key
            except Exception as exc:
                raise AuthenticationError(
                    f"no session key from {credentials.describe()}: "
                    f"{st.auth_failure_reason(exc)}"
                ) from None
            flags = core.session_established(response, key)
            if flags & (wire.SESSION_FLAG_IS_GUEST | wire.SESSION_FLAG_IS_NULL):
                raise AuthenticationError(
                    f"{self.where} logged {credentials.describe()} on as a guest, which cannot "
                    "sign: the server does not know this user or password"
                )
            return key

    async def transceive(
        self, file_id: bytes, data: bytes, max_output: int = 65536
    ) -> tuple[bytes, bool]:
        """FSCTL_PIPE_TRANSCEIVE: write ``data`` and read the answer in one round trip
        (on a pipe with no READ pending). Returns the answer and whether more of it
        waits (STATUS_BUFFER_OVERFLOW: READ the rest)."""
        body = wire.ioctl_request(wire.FSCTL_PIPE_TRANSCEIVE, file_id, data, max_output)
        response = await self.request(wire.IOCTL, body, payload=max(len(data), max_output))
        if response.status not in (wire.STATUS_SUCCESS, wire.STATUS_BUFFER_OVERFLOW):
            raise _ioctl_error("FSCTL_PIPE_TRANSCEIVE", response.status)
        return (wire.parse_ioctl(response.message),
                response.status == wire.STATUS_BUFFER_OVERFLOW)

    async def peek(self, file_id: bytes, max_output: int = 4096) -> wire.PipePeek:
        """FSCTL_PIPE_PEEK: what the pipe holds, without taking it (Windows servers;
        released Samba answers STATUS_FS_DRIVER_REQUIRED: NotImplementedError)."""
        body = wire.ioctl_request(wire.FSCTL_PIPE_PEEK, file_id, b"", max_output)
        response = await self.request(wire.IOCTL, body, payload=max_output)
        if response.status not in (wire.STATUS_SUCCESS, wire.STATUS_BUFFER_OVERFLOW):
            raise _ioctl_error("FSCTL_PIPE_PEEK", response.status)
        return wire.parse_pipe_peek(wire.parse_ioctl(response.message))

    async def echo(self) -> None:
        """One SMB2 ECHO round trip."""
        response = await self.request(wire.ECHO, wire.small_request(), tree=False)
        wire.check_structure(response.message, 0, 4, "ECHO")


def _ioctl_error(name: str, status: int) -> Exception:
    if status in st.NO_PIPE_WAIT_STATUSES:
        return NotImplementedError(f"the server does not implement {name} ({status:#010x})")
    if status in st.EOF_STATUSES:
        return ConnectionLost(f"{name}: the pipe is closed ({status:#010x})")
    return ConnectionLost(f"{name} failed: NTSTATUS {status:#010x}")


def _resolver(future: asyncio.Future[Response]) -> Callback:
    def resolve(result: Response | BaseException) -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    return resolve


def _ignore(_result: Response | BaseException) -> None:
    pass


class _Many:
    """The callbacks of a compound's requests; called together only if it never left."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

    def __call__(self, result: Response | BaseException) -> None:
        for callback in self.callbacks:
            callback(result)


def _literal_address(host: str, port: int) -> list[tuple[Any, Any, int, str, Any]] | None:
    """getaddrinfo's answer for an IP literal, without its thread pool (which is gone
    while the interpreter exits, when grpcio may still re-dial through a bridge)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 0, "", (host, port, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (host, port))]
