"""Remote pipes over SMB2/3 with smbprotocol (pure Python; the slow, portable backend).

One TCP connection, session and IPC$ tree connect per (host, port, credentials,
encryption choice, allow_smb2) is shared by every pipe opened through it, in every
thread and event loop of the process (one process-wide :mod:`npipe.smb.registry`; a
connection that died is replaced on the next open; one without pipes that nobody asked
for in the idle timeout, :func:`npipe.ioloop.idle_timeout`, is closed, swept on the
shared I/O thread). Unlike the native backend it cannot share threads: smbprotocol blocks, so
each open pipe has two relay threads of its own (below), and each connection
smbprotocol's receive thread. Signing
is always required; encryption is on by default where the server can do it:

* ``encrypt=None`` (the default): encrypt if the negotiated dialect can (SMB 3.x with a
  cipher), else fall back to signing only.
* ``encrypt=True``: encryption is required; a server that cannot encrypt is refused
  with :class:`ConfigError`.
* ``encrypt=False``: signing only (the server may still insist on encryption, and then
  it is used).

Only SMB 3.x is accepted unless ``allow_smb2=True`` (ConfigError otherwise). Downgrade
protection, as in the native backend: below 3.1.1 smbprotocol's
VALIDATE_NEGOTIATE_INFO (``TreeConnect._verify_dialect_negotiate``) runs after the
IPC$ tree connect; on 3.1.1 smbprotocol derives the keys from the preauth hash but
checks the final SESSION_SETUP response's signature only on a session it will not
encrypt, so this module keeps that response (wrapping ``Connection.receive``) and
checks it. A mismatch in either ends in
:class:`NegotiationTampered`. What smbprotocol cannot do: it offers every dialect
whatever ``allow_smb2`` says (the 2.x choice is refused after NEGOTIATE), and a
server that answers VALIDATE_NEGOTIATE_INFO with a signed NOT_SUPPORTED is accepted.

Each open pipe is relayed to a connected stream socket by two daemon threads: one
keeps an SMB READ posted and copies what it returns to the socket; the other reads the
socket and issues SMB WRITEs. A WRITE does not wait for the pending READ (smbprotocol
sends from any thread and its receive thread completes requests by message id), so
the pipe is full duplex. :meth:`SmbprotocolClient.open_pipe` hands back asyncio streams
on the other end of a ``socketpair``; :meth:`SmbprotocolClient.attach` relays a socket
the caller already has (the bridge's accepted Unix connections), without a second hop.
Closing the local side (or ``write_eof()``: pipes have no half-close) CLOSEs the pipe;
the pipe's end (its server closed) or a lost connection ends the local stream with EOF,
the latter logged as :class:`ConnectionLost`.

Samba behaviours this module works around (Samba 4.17, seen here):

* An SMB2 READ pending on a pipe is never answered once the client CLOSEs the pipe,
  and SMB2 CANCEL does not touch it (IPC reads have no cancel function). The reader
  thread therefore gives up on it after a short grace and leaves the request behind
  (~9 KB in smbprotocol each); a connection is recycled after
  ``ABANDONED_READS_LIMIT`` of them.
* A pipe server that closes without answering the handshake makes the CREATE fail
  with STATUS_CONNECTION_DISCONNECTED or, if it did not read the request first,
  STATUS_CONNECTION_RESET: both mean "refused" (AccessDenied).
* A CREATE of a missing pipe takes ~75 ms to fail, so a retried open may end that much
  after its timeout.
* Data the client has not READ yet when the pipe's server closes its end is discarded:
  the READ fails with STATUS_PIPE_BROKEN. Servers should linger until the client
  closes (nothing here can recover those bytes).
* FSCTL_PIPE_WAIT answers STATUS_FS_DRIVER_REQUIRED: remembered per connection, after
  which a busy or missing pipe is handled by retrying the CREATE with backoff.
* A pipe server that accepts smbd's connection but never answers the handshake stalls
  that smbd process, and with it every pipe on the connection: a CREATE that times out
  retires the connection for new opens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from smbprotocol import Dialects
from smbprotocol.connection import Connection
from smbprotocol.exceptions import (
    SMBAuthenticationError,
    SMBConnectionClosed,
    SMBException,
    SMBResponseException,
)
from smbprotocol.header import Commands, Smb2Flags
from smbprotocol.ioctl import CtlCode, IOCTLFlags, SMB2IOCTLRequest
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
    SMB2ReadResponse,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect

from npipe import ioloop
from npipe.address import PipeAddress
from npipe.errors import (
    AccessDenied,
    AddressError,
    AuthenticationError,
    ConfigError,
    ConnectionLost,
    HostUnreachable,
    NegotiationTampered,
    NpipeError,
)
from npipe.local.messages import FRAGMENT as MESSAGE_FRAGMENT
from npipe.local.messages import LAST as MESSAGE_LAST
from npipe.local.messages import MORE as MESSAGE_MORE
from npipe.local.sockets import close_gently
from npipe.smb.credentials import Credentials
from npipe.smb.info import SmbConnectionInfo
from npipe.smb.registry import ConnectionRegistry
from npipe.smb.retry import PipeWait, Refused
from npipe.smb.status import (
    EOF_STATUSES as _EOF_STATUSES,
)
from npipe.smb.status import (
    NO_PIPE_WAIT_STATUSES as _NO_PIPE_WAIT_STATUSES,
)
from npipe.smb.status import (
    STATUS_ACCESS_DENIED,
    STATUS_IO_TIMEOUT,
    STATUS_PENDING,
    STATUS_SUCCESS,
    auth_error,
    auth_failure_reason,
)

log = logging.getLogger("npipe.smb")

T = TypeVar("T")

# A message-mode pipe's READ that returned part of a message (Windows; MS-SMB2 3.3.4.4).
STATUS_BUFFER_OVERFLOW = 0x80000005

# asyncio's default StreamReader limit; a full buffer pauses the relay (backpressure).
DEFAULT_LIMIT = 64 * 1024
# Samba returns at most 65,535 bytes per pipe READ; asking for more gains nothing.
READ_SIZE = 65536
# What the writer thread takes from the socket at once, and the largest WRITE it sends
# (16 credits; the negotiated max_write_size may be smaller).
SOCKET_CHUNK = 1 << 20
MAX_WRITE = 1 << 20
# How long a closing pipe waits for its pending READ to be answered (Windows answers
# at once; Samba never does), and for the CLOSE itself.
READ_GRACE = 1.0
CLOSE_TIMEOUT = 5.0
# smbprotocol keeps each unanswered READ (~9 KB) for the connection's lifetime: after
# this many closed pipes a connection takes no new pipes and goes once they are closed.
ABANDONED_READS_LIMIT = 1024
# Ask for more credits when fewer than this many are left; a pending READ holds one.
CREDIT_LOW_WATER = 256
CREDIT_EXTRA = 64
CREDIT_WAIT = 30.0

_DIALECTS = {
    Dialects.SMB_2_0_2: "2.0.2",
    Dialects.SMB_2_1_0: "2.1",
    Dialects.SMB_3_0_0: "3.0",
    Dialects.SMB_3_0_2: "3.0.2",
    Dialects.SMB_3_1_1: "3.1.1",
}

ConnectionKey = tuple[str, int, tuple[str | None, str | None, str, str | None], bool | None, bool]
_SESSION_SETUP = Commands.SMB2_SESSION_SETUP
_FLAG_SIGNED = Smb2Flags.SMB2_FLAGS_SIGNED


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, SMBResponseException):
        return int(exc.status)
    return None


def _status_text(exc: BaseException) -> str:
    status = _status(exc)
    if status is None:
        return str(exc)
    return f"NTSTATUS {status:#010x}"


class _SmbConnection:
    """One TCP connection + authenticated session + IPC$ tree connect."""

    def __init__(
        self, host: str, port: int, credentials: Credentials, encrypt: bool | None,
        allow_smb2: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self.encrypt = encrypt
        self.allow_smb2 = allow_smb2
        self.conn: Any = Connection(uuid.uuid4(), host, port, require_signing=True)
        self.session: Any = None
        self.tree: Any = None
        # Until the server says it cannot (Samba), try FSCTL_PIPE_WAIT on a busy pipe.
        self.pipe_wait = True
        self.retired = False
        self.aborted = False
        self.pipes = 0
        self.abandoned_reads = 0
        self._lock = threading.Lock()

    # --- setup ----------------------------------------------------------------------

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def establish(self, timeout: float) -> None:
        """Connect, negotiate, authenticate and connect IPC$ (blocking, ~timeout)."""
        deadline = time.monotonic() + timeout
        try:
            self.conn.connect(timeout=max(timeout, 0.1))
        except ValueError as exc:  # smbprotocol's wrapper of the socket error
            cause = exc.__cause__ or exc
            reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
            raise HostUnreachable(f"cannot reach the SMB server {self.where}: {reason}") from None
        except (SMBException, OSError) as exc:
            self._drop()
            raise HostUnreachable(
                f"{self.where} did not complete SMB negotiation within {timeout:g} s: {exc}"
            ) from None
        except Exception as exc:  # smbprotocol's parsers fail on malformed answers
            self._drop()
            raise ConnectionLost(
                f"the SMB server {self.where} sent a bad NEGOTIATE response: {exc}"
            ) from None
        if self.conn.dialect < Dialects.SMB_3_0_0 and not self.allow_smb2:
            self._drop()
            raise ConfigError(
                f"{self.where} negotiated SMB {self.dialect}, but npipe requires SMB 3 "
                "(3.0, 3.0.2, 3.1.1): SMB 2 cannot encrypt and cannot detect a downgrade. "
                "Pass allow_smb2=True to accept an SMB 2 server (if this server does speak "
                "SMB 3, someone on the path rewrote the negotiation)"
            )
        # A WRITE and the next READ go out back to back: without TCP_NODELAY the second
        # waits for the first's ACK (Nagle), which doubled the echo latency here.
        sock = getattr(self.conn.transport, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # smbprotocol waits forever for SESSION_SETUP and TREE_CONNECT answers: a
        # watchdog closes the transport at the deadline, which wakes the waiting thread.
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.01), self.abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            self._authenticate()
            self._connect_ipc()
            self._validate_negotiate()
        except NegotiationTampered as exc:
            self._drop()
            if self.aborted:
                raise HostUnreachable(
                    f"{self.where} did not complete SMB session setup within {timeout:g} s"
                ) from None
            raise NegotiationTampered(
                f"the SMB negotiation with {self.where} was tampered with (downgrade "
                f"attack?): {exc}; the connection is closed"
            ) from None
        except NpipeError:
            self._drop()
            raise
        except Exception as exc:
            self._drop()
            if self.aborted:
                raise HostUnreachable(
                    f"{self.where} did not complete SMB session setup within {timeout:g} s"
                ) from None
            raise ConnectionLost(f"SMB session setup with {self.where} failed: {exc}") from exc
        finally:
            watchdog.cancel()

    def _authenticate(self) -> None:
        conn = self.conn
        creds = self.credentials
        can_encrypt = bool(conn.supports_encryption)
        if self.encrypt and not can_encrypt:
            raise ConfigError(
                f"{self.where} cannot encrypt (SMB {self.dialect}): encrypt=True requires "
                "SMB 3 with a cipher; pass encrypt=None to accept signing only"
            )
        require_encryption = can_encrypt if self.encrypt is None else self.encrypt
        final: list[Any] = []
        receive = conn.receive

        def keep_final(request: Any, *args: Any, **kwargs: Any) -> Any:
            response = receive(request, *args, **kwargs)
            if (response["command"].get_value() == _SESSION_SETUP
                    and response["status"].get_value() == STATUS_SUCCESS):
                final.append(response)
            return response

        conn.receive = keep_final  # until the session is set up: see the module docstring
        self.session = Session(
            conn,
            creds.principal,
            creds.password,
            require_encryption=require_encryption,
            auth_protocol=creds.auth_protocol,
        )
        try:
            self.session.connect()
        except SMBAuthenticationError as exc:
            raise AuthenticationError(
                f"{self.where} did not accept {creds.describe()}: {_spnego_reason(exc)}"
            ) from None
        except SMBResponseException as exc:
            error = auth_error(int(exc.status), self.where, creds)
            if error is not None:
                raise error from None
            raise
        except SMBException as exc:
            if conn.dialect >= Dialects.SMB_3_1_1 and "signature could not be verified" in str(
                exc
            ):
                raise _preauth_mismatch() from None
            if "guest" in str(exc):
                raise AuthenticationError(
                    f"{self.where} logged {creds.describe()} on as a guest, which cannot "
                    "sign: the server does not know this user or password"
                ) from None
            raise
        finally:
            del conn.receive
        if conn.dialect >= Dialects.SMB_3_1_1 and final:
            self._check_preauth(final[-1])

    def _check_preauth(self, response: Any) -> None:
        """SMB 3.1.1: the final SESSION_SETUP response must be signed with keys that
        hash every NEGOTIATE and SESSION_SETUP message as this client saw them."""
        if not response["flags"].has_flag(_FLAG_SIGNED):
            raise NegotiationTampered("the final SESSION_SETUP response is not signed")
        try:
            self.conn.verify_signature(response, self.session.session_id, force=True)
        except SMBException:
            raise _preauth_mismatch() from None

    def _validate_negotiate(self) -> None:
        """Below 3.1.1: FSCTL_VALIDATE_NEGOTIATE_INFO (smbprotocol's; on 2.x too, where a
        real 2.x server answers a signed "not supported")."""
        if self.conn.dialect >= Dialects.SMB_3_1_1:
            return
        try:
            self.tree._verify_dialect_negotiate()
        except SMBResponseException as exc:
            raise NegotiationTampered(
                f"the server refused VALIDATE_NEGOTIATE_INFO ({_status_text(exc)})"
            ) from None
        except SMBException as exc:
            if "Secure negotiate failed" in str(exc):
                raise NegotiationTampered(f"the server validated other values: {exc}") from None
            raise NegotiationTampered(
                f"the server hung up when asked to validate the negotiation ({exc})"
            ) from None
        except (OSError, ValueError) as exc:
            raise NegotiationTampered(
                f"the server hung up when asked to validate the negotiation ({exc})"
            ) from None

    def _connect_ipc(self) -> None:
        self.tree = TreeConnect(self.session, f"\\\\{self.host}\\IPC$")
        try:
            # Validated by _validate_negotiate(), which tells its failures apart.
            self.tree.connect(require_secure_negotiate=False)
        except SMBResponseException as exc:
            if _status(exc) == STATUS_ACCESS_DENIED:
                raise AccessDenied(
                    f"{self.where} denies {self.credentials.describe()} access to IPC$"
                ) from None
            raise

    @property
    def dialect(self) -> str:
        d = self.conn.dialect
        return _DIALECTS.get(d, f"{d:#06x}") if d is not None else "?"

    # --- state ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        transport = self.conn.transport
        return (
            transport is not None
            and bool(transport.connected)
            and self.conn._t_exc is None
            and not self.aborted
        )

    @property
    def usable(self) -> bool:
        return self.alive and not self.retired

    @property
    def busy(self) -> bool:
        """Whether pipes are open on it."""
        return self.pipes > 0

    def abort(self) -> None:
        """Close the TCP connection now: every waiting thread wakes with an error."""
        self.aborted = True
        self._drop()

    def _drop(self) -> None:
        transport = self.conn.transport
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()

    def retire(self, why: str) -> None:
        """No new pipes here; disconnect once the open ones are closed."""
        with self._lock:
            if self.retired:
                return
            self.retired = True
            idle = self.pipes == 0
        log.info("retiring SMB connection to %s: %s", self.where, why)
        if idle:
            self._drop()

    def abandoned(self) -> None:
        """A closed pipe's READ will never be answered (Samba): count it, recycle at the limit."""
        with self._lock:
            self.abandoned_reads += 1
            full = self.abandoned_reads >= ABANDONED_READS_LIMIT
        if full:
            self.retire(f"{ABANDONED_READS_LIMIT} unanswered READs of closed pipes pile up")

    def acquire(self) -> None:
        with self._lock:
            self.pipes += 1

    def release(self) -> None:
        with self._lock:
            self.pipes -= 1
            idle = self.pipes == 0 and self.retired
        if idle:
            self._drop()
        else:
            _registry.schedule_sweep()  # idle from now on, perhaps

    def info(self) -> SmbConnectionInfo:
        session = self.session
        return SmbConnectionInfo(
            host=self.host,
            port=self.port,
            user=self.credentials.principal,
            dialect=self.dialect,
            signing_required=bool(self.conn.require_signing),
            signed=session is not None and session.signing_key is not None
            and bool(session.signing_required or session.encrypt_data),
            encrypted=session is not None and bool(session.encrypt_data),
            pipes=self.pipes,
            alive=self.alive,
            pipe_wait=self.pipe_wait,
        )

    # --- requests -------------------------------------------------------------------

    def send(self, message: Any, payload: int = 0) -> Any:
        """Send one request on the IPC$ tree, topping up credits when they run low.

        smbprotocol refuses (rather than waits) when the credit window is too small;
        responses return credits, so wait for them briefly.
        """
        conn = self.conn
        charge = 1 + max(0, payload - 1) // 65536 if conn.supports_multi_credit else 1
        deadline = time.monotonic() + CREDIT_WAIT
        pause = 0.001
        while True:
            with conn.sequence_lock:
                available = conn.sequence_window["high"] - conn.sequence_window["low"]
            credit_request = charge + CREDIT_EXTRA if available < CREDIT_LOW_WATER else None
            try:
                return conn.send(
                    message,
                    sid=self.session.session_id,
                    tid=self.tree.tree_connect_id,
                    credit_request=credit_request,
                )
            except SMBException as exc:
                if "credits" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def wait(
        self,
        request: Any,
        timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> bool:
        """Block until ``request`` has its final answer (True) or gives up (False).

        Gives up at ``timeout``, or ``READ_GRACE`` after ``stop`` is set (whoever sets
        it also sets the request's event to wake this). A dead connection counts as an
        answer: smbprotocol's receive() then raises its error.
        """
        conn = self.conn
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Checked before every wait: a stop set just before this request was sent
            # found nothing to wake.
            if stop is not None and stop.is_set():
                grace = time.monotonic() + READ_GRACE
                deadline = grace if deadline is None else min(deadline, grace)
                stop = None
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not request.response_event.wait(remaining):
                return False
            with request.response_event_lock:
                response = request.response
                if response is None or response["status"].get_value() != STATUS_PENDING:
                    return True
                if conn._t_exc is not None or not conn.transport.connected:
                    return True
                request.response_event.clear()

    def create_pipe(self, name: str, timeout: float) -> Any:
        """One CREATE of pipe ``name`` (blocking); raises smbprotocol's errors."""
        op = Open(self.tree, name)
        message, receive = op.create(
            ImpersonationLevel.Impersonation,
            FilePipePrinterAccessMask.FILE_READ_DATA | FilePipePrinterAccessMask.FILE_WRITE_DATA,
            0,
            ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
            CreateDisposition.FILE_OPEN,
            CreateOptions.FILE_NON_DIRECTORY_FILE,
            send=False,
        )
        request = self.send(message)
        if not self.wait(request, timeout=timeout):
            _cancel(request)
            raise _CreateTimeout()
        receive(request)
        return op

    def wait_for_pipe(self, name: str, timeout: float) -> int | None:
        """FSCTL_PIPE_WAIT: the NTSTATUS, or None when the server cannot do it."""
        encoded = name.encode("utf-16-le")
        # MS-FSCC 2.3.49; the timeout in the NT convention (negative: relative, 100 ns).
        ticks = -max(1, int(timeout * 10_000_000))
        ioctl = SMB2IOCTLRequest()
        ioctl["ctl_code"] = CtlCode.FSCTL_PIPE_WAIT
        ioctl["file_id"] = b"\xff" * 16
        ioctl["max_input_response"] = 0
        ioctl["max_output_response"] = 0
        ioctl["flags"] = IOCTLFlags.SMB2_0_IOCTL_IS_FSCTL
        ioctl["buffer"] = struct.pack("<qIBB", ticks, len(encoded), 1, 0) + encoded
        request = self.send(ioctl)
        if not self.wait(request, timeout=timeout + 1.0):
            _cancel(request)
            return STATUS_IO_TIMEOUT
        try:
            self.conn.receive(request)
        except SMBResponseException as exc:
            status = _status(exc)
            if status in _NO_PIPE_WAIT_STATUSES:
                self.pipe_wait = False
                log.debug("%s has no FSCTL_PIPE_WAIT (%#010x)", self.where, status)
                return None
            return status
        return STATUS_SUCCESS


def _preauth_mismatch() -> NegotiationTampered:
    return NegotiationTampered(
        "the SESSION_SETUP response's signature does not match the NEGOTIATE and "
        "SESSION_SETUP messages this client exchanged (SMB 3.1.1 preauth integrity)"
    )


class _CreateTimeout(Exception):
    """The CREATE was not answered in time."""


def _cancel(request: Any) -> None:
    with contextlib.suppress(Exception):
        request.cancel()


def _spnego_reason(exc: BaseException) -> str:
    text = str(exc)
    prefix = "Failed to authenticate with server: "
    text = text[len(prefix):] if text.startswith(prefix) else text
    return auth_failure_reason(Exception(text))


# --- the registry of shared connections --------------------------------------------

def _retire_idle(connection: _SmbConnection, limit: float) -> None:
    connection.retire(f"unused for {limit:g} s")  # no pipes: disconnects now


def _retire_dead(connection: _SmbConnection) -> None:
    connection.retire("the connection died")


def _call_later(delay: float, callback: Callable[[], None]) -> None:
    """Sweeps run on the I/O thread (npipe.ioloop)."""
    loop = ioloop.get_loop()
    ioloop.call_soon(loop.call_later, delay, callback)


# Process-wide: every thread and event loop shares these connections.
_registry: ConnectionRegistry[_SmbConnection] = ConnectionRegistry(
    _call_later, _retire_idle, replaced=_retire_dead
)


def _connection_key(
    address: PipeAddress, credentials: Credentials, encrypt: bool | None, allow_smb2: bool
) -> ConnectionKey:
    return (address.host.lower(), address.port, credentials.identity(), encrypt, allow_smb2)


def _set_up(
    address: PipeAddress, credentials: Credentials, encrypt: bool | None, allow_smb2: bool,
    timeout: float,
) -> concurrent.futures.Future[_SmbConnection]:
    """Set a new connection up in a thread."""
    host, port = address.host, address.port
    future: concurrent.futures.Future[_SmbConnection] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()  # waiters cannot cancel the shared setup

    def setup() -> None:
        connection = _SmbConnection(host, port, credentials, encrypt, allow_smb2)
        try:
            connection.establish(timeout)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            log.info(
                "SMB connection to %s as %s: dialect %s, %s",
                connection.where,
                credentials.describe(),
                connection.dialect,
                "encrypted" if connection.session.encrypt_data else "signed",
            )
            future.set_result(connection)

    threading.Thread(target=setup, name=f"npipe-smb-setup {host}:{port}", daemon=True).start()
    return future


def connections() -> list[SmbConnectionInfo]:
    """The shared connections set up so far (live or dead, not yet replaced)."""
    return [connection.info() for connection in _registry.connections()]


def close_connections() -> None:
    """Disconnect every shared connection now (their pipes see end of stream)."""
    for connection in _registry.clear():
        connection.abort()


# --- the relay between a pipe and a socket -----------------------------------------


class _Relay:
    """Two daemon threads copying between an open pipe and a connected socket."""

    def __init__(
        self, link: _SmbConnection, op: Any, sock: socket.socket, label: str,
        initial: bytes = b"",
    ) -> None:
        self.initial = initial  # written to the pipe before what the socket sends
        self.link = link
        self.op = op
        self.sock = sock
        self.label = label
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._running = 2
        self._pending_read: Any = None
        self._pending_write: Any = None

    def start(self) -> None:
        self.sock.setblocking(True)
        for target, role in ((self._read_loop, "read"), (self._write_loop, "write")):
            threading.Thread(
                target=target, name=f"npipe-smb-{role} {self.label}", daemon=True
            ).start()

    def _read_loop(self) -> None:
        """Keep one READ posted; copy its data to the socket; EOF on a broken pipe."""
        link = self.link
        try:
            while not self.stop.is_set():
                message, receive = self.op.read(0, READ_SIZE, send=False)
                request = link.send(message)
                self._pending_read = request
                if not link.wait(request, stop=self.stop):
                    link.abandoned()  # closing, and the server does not answer it (Samba)
                    return
                self._pending_read = None
                try:
                    data = receive(request)
                except SMBResponseException as exc:
                    if _status(exc) in _EOF_STATUSES:
                        log.debug("pipe %s: end of stream (%s)", self.label, _status_text(exc))
                        return
                    raise
                if not data:
                    return
                try:
                    self.sock.sendall(data)
                except OSError as exc:
                    log.debug("pipe %s: the local side went away: %s", self.label, exc)
                    return
        except Exception as exc:
            if not self.stop.is_set():
                self._lost(exc)
        finally:
            self._finish()

    def _write_loop(self) -> None:
        """Copy the socket to the pipe in WRITEs of at most MAX_WRITE bytes."""
        link = self.link
        limit = max(1, min(MAX_WRITE, int(link.conn.max_write_size or MAX_WRITE)))
        try:
            while True:
                try:
                    data, self.initial = self.initial or self.sock.recv(SOCKET_CHUNK), b""
                except OSError as exc:
                    log.debug("pipe %s: the local side went away: %s", self.label, exc)
                    return
                if not data:
                    return  # the local side closed (or shut down writing): close the pipe
                view = memoryview(data)
                for start in range(0, len(data), limit):
                    chunk = bytes(view[start : start + limit])
                    message, receive = self.op.write(chunk, send=False)
                    request = link.send(message, len(chunk))
                    self._pending_write = request
                    if not link.wait(request, stop=self.stop):
                        return
                    self._pending_write = None
                    try:
                        receive(request)
                    except SMBResponseException as exc:
                        if _status(exc) in _EOF_STATUSES:
                            log.debug(
                                "pipe %s: closed by its server while writing (%s)",
                                self.label,
                                _status_text(exc),
                            )
                            return
                        raise
        except Exception as exc:
            if not self.stop.is_set():
                self._lost(exc)
        finally:
            self._finish()

    def _lost(self, exc: BaseException) -> None:
        if isinstance(exc, SMBConnectionClosed) or not self.link.alive:
            err = ConnectionLost(f"the SMB connection to {self.link.where} was lost")
        else:
            err = ConnectionLost(f"pipe {self.label} failed: {exc}")
        log.warning("%s; the pipe's stream ends here", err)

    def _finish(self) -> None:
        """First thread out closes the pipe and the socket's directions; last closes it."""
        with self._lock:
            first = not self.stop.is_set()
            self.stop.set()
            self._running -= 1
            last = self._running == 0
        if first:
            # The local side sees end of stream after the data already relayed, and its
            # writes fail from now on; the other thread's recv() returns b"".
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self._close_pipe()
        if last:
            close_gently(self.sock)  # unread data would turn the peer's EOF into a reset

    def _close_pipe(self) -> None:
        link = self.link
        pending = [r for r in (self._pending_read, self._pending_write) if r is not None]
        try:
            if link.alive:
                for request in pending:
                    _cancel(request)
                message, receive = self.op.close(send=False)
                request = link.send(message)
                if link.wait(request, timeout=CLOSE_TIMEOUT):
                    with contextlib.suppress(SMBResponseException):
                        receive(request)
        except Exception as exc:
            log.debug("pipe %s: CLOSE failed: %s", self.label, exc)
        finally:
            for request in pending:
                request.response_event.set()  # its waiter now checks stop: grace, give up
            link.release()


class _MessageRelay(_Relay):
    """The same for a message-mode pipe and a SOCK_SEQPACKET socket in
    npipe.local.messages' record framing (see npipe.smb.messages): each READ's data is
    one record (MORE if the server said STATUS_BUFFER_OVERFLOW: the message goes on),
    each message from the socket one WRITE."""

    def _read_loop(self) -> None:
        link = self.link
        try:
            while not self.stop.is_set():
                # 64 KiB: Samba ends a short READ with SUCCESS, so only a READ that
                # takes a whole message (at most 65,535 bytes) tells where it ends.
                message, receive = self.op.read(0, READ_SIZE, send=False)
                request = link.send(message)
                self._pending_read = request
                if not link.wait(request, stop=self.stop):
                    link.abandoned()
                    return
                self._pending_read = None
                try:
                    data, last = receive(request), True
                except SMBResponseException as exc:
                    if _status(exc) == STATUS_BUFFER_OVERFLOW:  # (Windows) more follows
                        read = SMB2ReadResponse()
                        read.unpack(exc.header["data"].get_value())
                        data, last = read["buffer"].get_value(), False
                    elif _status(exc) in _EOF_STATUSES:
                        log.debug("pipe %s: end of stream (%s)", self.label, _status_text(exc))
                        return
                    else:
                        raise
                try:
                    self.sock.sendall((MESSAGE_LAST if last else MESSAGE_MORE) + data)
                except OSError as exc:
                    log.debug("pipe %s: the local side went away: %s", self.label, exc)
                    return
        except Exception as exc:
            if not self.stop.is_set():
                self._lost(exc)
        finally:
            self._finish()

    def _write_loop(self) -> None:
        link = self.link
        buf = bytearray(MESSAGE_FRAGMENT + 1)
        parts: list[bytes] = []
        try:
            while True:
                try:
                    n = self.sock.recv_into(buf)
                except OSError as exc:
                    log.debug("pipe %s: the local side went away: %s", self.label, exc)
                    return
                if not n:
                    return  # the local side closed: close the pipe
                parts.append(bytes(buf[1:n]))
                if buf[0] == MESSAGE_MORE[0]:
                    continue
                data = b"".join(parts)  # one message, one WRITE
                parts.clear()
                message, receive = self.op.write(data, send=False)
                request = link.send(message, len(data))
                self._pending_write = request
                if not link.wait(request, stop=self.stop):
                    return
                self._pending_write = None
                try:
                    receive(request)
                except SMBResponseException as exc:
                    if _status(exc) in _EOF_STATUSES:
                        return
                    raise
        except Exception as exc:
            if not self.stop.is_set():
                self._lost(exc)
        finally:
            self._finish()


# --- the client ---------------------------------------------------------------------


class SmbprotocolClient:
    """Opens remote pipes with smbprotocol; see the module docstring for the model."""

    name = "smbprotocol"

    async def open_pipe(
        self,
        address: PipeAddress,
        *,
        credentials: Credentials,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        limit: int = DEFAULT_LIMIT,
        allow_smb2: bool = False,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the remote pipe and return asyncio streams on it.

        Retries a missing or busy pipe until ``timeout`` (which bounds the whole open,
        connection setup included). Closing the writer closes the pipe; so does
        ``write_eof()`` (pipes have no half-close).
        """
        ours, theirs = socket.socketpair()
        try:
            await self.attach(
                address, theirs, credentials=credentials, timeout=timeout, encrypt=encrypt,
                allow_smb2=allow_smb2,
            )
            return await asyncio.open_connection(sock=ours, limit=limit)
        except BaseException:
            ours.close()
            raise

    async def attach(
        self,
        address: PipeAddress,
        sock: socket.socket,
        *,
        credentials: Credentials,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        allow_smb2: bool = False,
        close_on_failure: bool = True,
        initial: bytes = b"",
        missing_grace: float | None = None,
    ) -> None:
        """Open the remote pipe and relay it to ``sock`` (a connected stream socket),
        ``initial`` first (a missing pipe is retried only for ``missing_grace`` s if
        given: 0 looks once).

        Takes ownership of ``sock``: it is closed when the pipe ends, or at once if
        the open fails (unless ``close_on_failure=False``: then the caller closes it).
        """
        try:
            link, op = await self._open(address, credentials, timeout, encrypt, allow_smb2,
                                        missing_grace)
        except BaseException:
            if close_on_failure:
                close_gently(sock)
            raise
        _Relay(link, op, sock, address.posix(), initial).start()

    async def _open(
        self,
        address: PipeAddress,
        credentials: Credentials,
        timeout: float,
        encrypt: bool | None,
        allow_smb2: bool = False,
        missing_grace: float | None = None,
    ) -> tuple[_SmbConnection, Any]:
        if not address.is_remote:
            raise AddressError(f"{address} is not a remote pipe (\\\\HOST\\pipe\\NAME)")
        key = _connection_key(address, credentials, encrypt, allow_smb2)

        def start(remaining: float) -> concurrent.futures.Future[_SmbConnection]:
            return _set_up(address, credentials, encrypt, allow_smb2, remaining)

        async def create(
            connection: _SmbConnection, timeout: float
        ) -> tuple[_SmbConnection, Any] | Refused | None:
            try:
                op = await _in_thread(
                    _create_and_acquire,
                    connection,
                    address.name,
                    timeout,
                    cleanup=functools.partial(_close_unused, connection),
                )
            except _CreateTimeout:
                return None
            except Exception as exc:
                status = _status(exc)
                # An npipe error without a status (say, a lost connection) stands as is.
                error = exc if status is None and isinstance(exc, NpipeError) else None
                return Refused(status, str(exc), _status_text(exc), error)
            return connection, op

        def pipe_wait(connection: _SmbConnection) -> PipeWait:
            return functools.partial(_in_thread, connection.wait_for_pipe, address.name)

        return await _registry.open(key, address, credentials, timeout, start=start,
                                    create=create, pipe_wait=pipe_wait,
                                    missing_grace=missing_grace)

    async def attach_messages(
        self,
        address: PipeAddress,
        sock: socket.socket,
        *,
        credentials: Credentials,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        allow_smb2: bool = False,
    ) -> None:
        """Open the remote pipe and relay its messages to ``sock`` (SOCK_SEQPACKET,
        npipe.local.messages' records), which it then owns (closed if the open fails)."""
        try:
            link, op = await self._open(address, credentials, timeout, encrypt, allow_smb2)
        except BaseException:
            sock.close()
            raise
        _MessageRelay(link, op, sock, address.posix()).start()

    @staticmethod
    def connections() -> list[SmbConnectionInfo]:
        return connections()

    @staticmethod
    def close_connections() -> None:
        close_connections()


def _create_and_acquire(link: _SmbConnection, name: str, timeout: float) -> Any:
    op = link.create_pipe(name, timeout)
    link.acquire()
    return op


def _close_unused(link: _SmbConnection, op: Any) -> None:
    """A pipe opened for a caller that gave up (cancelled): close it again."""

    def close() -> None:
        with contextlib.suppress(Exception):
            op.close()
        link.release()

    threading.Thread(target=close, name="npipe-smb-close", daemon=True).start()


_background: set[asyncio.Future[Any]] = set()


def _settled(future: asyncio.Future[Any]) -> None:
    """A background future is done: let it go, its error seen (a caller that gave up
    has nobody to tell it to; a late result goes to its cleanup)."""
    _background.discard(future)
    if not future.cancelled():
        future.exception()


async def _in_thread(
    fn: Callable[..., T], *args: Any, cleanup: Callable[[T], None] | None = None
) -> T:
    """Run blocking smbprotocol work in a thread; if the caller is cancelled meanwhile,
    hand a late result to ``cleanup`` instead of leaking it."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    _background.add(future)  # asyncio keeps tasks weakly: held until done, even if abandoned
    future.add_done_callback(_settled)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if cleanup is not None:
            late_cleanup = cleanup

            def late(done: asyncio.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    late_cleanup(done.result())

            future.add_done_callback(late)
        raise


__all__ = [
    "SmbConnectionInfo",
    "SmbprotocolClient",
    "close_connections",
    "connections",
]
