"""grpcio over pipes: serve on a pipe, dial a pipe, learn who called.

Generated stubs and servicers are used unchanged::

    server = grpc.server(ThreadPoolExecutor())
    buy_pb2_grpc.add_MyServiceServicer_to_server(MyService(), server)
    npipe.grpc.add_pipe_port(server, "shop")
    server.start()

    stub = buy_pb2_grpc.MyServiceStub(npipe.grpc.channel("shop"))

The pipe's socket speaks plain gRPC (HTTP/2 with prior knowledge), so any gRPC
client that dials ``unix:`` sockets reaches it too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import shutil
import socket
import sys
import threading
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npipe.extras import imports_of

with imports_of("grpc", "npipe.grpc"):
    import grpc
    import grpc.aio

from npipe import frontdoor, grpc_refusal
from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress, parse_address, validate_unix_path
from npipe.errors import ConfigError, PipeNotFound, UnsupportedPlatform
from npipe.identity import Caller
from npipe.local.claim import claim_pipe, claim_pipe_existing, place_for
from npipe.local.dial import check_server, connect_error, find_socket
from npipe.local.listener import BACKEND_SOCKET, ClaimedPath, private_dir
from npipe.local.paths import ensure_pipe_dir, pipe_dir, trusted_uids

if TYPE_CHECKING:  # loaded when first needed: a plain import loads no SMB or Samba code
    from npipe.smb.credentials import Credentials
    from npipe.unix_bridge import PipeBridge

ChannelOptions = Sequence[tuple[str, Any]]

__all__ = ["PipePort", "add_pipe_port", "aio_channel", "caller", "channel", "target"]


class PipePort:
    """A pipe that a grpcio server serves; given up when the server stops."""

    def __init__(self, address: PipeAddress, path: Path, close: Callable[[], None]) -> None:
        self.address = address
        self.path = path
        self._close = close

    def close(self) -> None:
        """Stop serving the pipe and give up its name (the server stopping does it too)."""
        self._close()


def add_pipe_port(
    server: grpc.Server | grpc.aio.Server,
    address: str | PipeAddress,
    *,
    acl: Acl = OWNER_ONLY,
    pipe_dir: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
    caller_identity: bool = True,
    smb: bool = False,
    max_connections: int | None = None,
) -> PipePort:
    """Serve ``server`` on a pipe (``grpc.Server`` or ``grpc.aio.Server``, before start()).

    Only the owner (and root) may connect unless ``acl`` allows more; the pipe is
    given up when the server stops. ``dotnet=True`` listens where .NET looks on Linux
    (``/tmp/CoreFxPipe_NAME``).

    ``caller_identity=False`` trades :func:`caller` for speed: grpcio's own socket is
    linked to the pipe's name, so calls cost exactly what a plain Unix socket costs
    (the front door's relay costs ~10% of a small call on a busy 2-core machine, see
    docs/benchmarks.md). The kernel then enforces owner-only access (socket mode 0600)
    and :func:`caller` returns None; an ACL beyond the owner needs the front door.

    ``smb=True`` also serves the pipe to SMB clients (``\\\\HOST\\pipe\\NAME``) through
    Samba: a second front door listens in smbd's np/ directory, where the caller's
    authenticated account, domain and SIDs arrive with each open (see npipe.samba).

    The front door serves at most ``max_connections`` callers at once (default: a
    quarter of the process's descriptor limit, between 16 and 1024; see
    :func:`npipe.frontdoor.default_max_connections`), SMB callers and those still in
    their handshake included, so its relay threads stay under twice that. Callers past
    it *wait*: they are not accepted (the kernel's listen backlog holds them, their
    connect() having succeeded) until a connection ends; reaching the cap logs one
    warning, not one per caller. Without the front door there is no cap of npipe's.
    """
    addr = parse_address(address)
    if addr.is_remote:
        raise UnsupportedPlatform(f"{addr} is remote: a server serves local pipe names only")
    if not caller_identity and (acl != OWNER_ONLY or smb):
        raise ConfigError(
            "an ACL beyond the owner, or smb=True, needs caller_identity=True (the front door)"
        )
    if not caller_identity and max_connections is not None:
        raise ConfigError("max_connections needs caller_identity=True (the front door)")
    cap = frontdoor.check_max_connections(max_connections)
    if sys.platform == "win32":
        return _add_windows_pipe_port(server, addr, acl=acl, smb=smb, max_connections=cap)
    directory = _pipe_dir(pipe_dir)
    place = None if caller_identity else place_for(addr, directory=pipe_dir, dotnet=dotnet)
    # Without the front door grpcio's socket is hard-linked to the pipe's name, so it
    # must be on the same file system: beside it (in the pipe directory, or this user's
    # directory inside the machine-wide one).
    workdir = private_dir(place.path.parent if place and place.machine else directory)
    backend = workdir / BACKEND_SOCKET
    try:
        if place is not None:
            validate_unix_path(str(backend))
            _listen(server, backend)
            linked = claim_pipe_existing(backend, addr, place, dotnet=dotnet, private=workdir)
            port = PipePort(addr, linked.path, lambda: _release_direct(linked, workdir))
        else:
            claimed = claim_pipe(
                addr, acl=acl, directory=pipe_dir, dotnet=dotnet,
                private=workdir,
            )
            try:
                _listen(server, backend)
            except BaseException:
                claimed.release()
                raise
            slots = frontdoor.ConnectionSlots(cap, claimed.path)
            # A caller the ACL refuses is answered PERMISSION_DENIED for each call
            # (frontdoor.Refusal), not cut off: grpcio then reports why.
            identify = frontdoor.local_identify_answering(acl, claimed.path, addr)
            doors = [frontdoor.FrontDoor(claimed, backend, workdir, identify, slots)]
            if smb:
                from npipe.samba import np_listener as samba

                try:
                    smb_claimed = samba.claim_samba_pipe(addr, directory=pipe_dir, acl=acl)
                except BaseException:
                    claimed.release()
                    raise
                identify = samba.samba_identify(acl, smb_claimed.path, answer_as=addr.name)
                doors.append(
                    frontdoor.FrontDoor(smb_claimed, backend, workdir, identify, slots)
                )
            for door in doors:
                door.start()
            port = PipePort(addr, claimed.path, functools.partial(_close_all, doors))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    _close_with(server, port)
    return port


def _add_windows_pipe_port(
    server: grpc.Server | grpc.aio.Server, addr: PipeAddress, *, acl: Acl, smb: bool,
    max_connections: int,
) -> PipePort:
    """Windows: grpcio listens on an AF_UNIX socket in a directory only this user may
    enter, and a native pipe server on the I/O thread relays each admitted caller to
    it (always through the front door: there are no hard links to a pipe)."""
    if sys.platform != "win32":  # (and mypy checks the rest as Windows code only)
        raise UnsupportedPlatform("Windows only")
    from npipe import ioloop
    from npipe.windows import pipes

    door = pipes.GrpcPipePort(pipes.private_directory("npipe-grpc-"), frontdoor._callers)
    try:
        if server.add_insecure_port(pipes.unix_target(door.backend)) == 0:
            raise OSError(f"grpcio could not listen on {door.backend}")
        door.server = ioloop.run(pipes.start_pipe_server(
            door.relay, addr, acl=acl, remote=smb, max_connections=max_connections
        ))
    except BaseException:
        door.close()
        raise

    def close() -> None:
        if ioloop.running() is not None:
            ioloop.call(door.close, timeout=5)

    port = PipePort(addr, door.server.path, close)
    _close_with(server, port)
    return port


def _windows_dialer(
    addr: PipeAddress, server_user: str | int | None, credentials: Credentials | None,
    timeout: float, encrypt: bool | None, smb_backend: str | None, allow_smb2: bool,
) -> str:
    """Windows: the target of a private AF_UNIX listener whose connections each open the
    pipe natively (or through npipe's SMB client when its options ask for it)."""
    if sys.platform != "win32":  # (and mypy checks the rest as Windows code only)
        raise UnsupportedPlatform("Windows only")
    from npipe import ioloop
    from npipe.streams import windows_native
    from npipe.windows import pipes

    native = windows_native(addr, credentials, smb_backend, encrypt)
    key = (str(addr), str(server_user), native, id(credentials), encrypt, smb_backend,
           allow_smb2, timeout)
    with _checked_lock:
        dialer = _windows_dialers.get(key)
        if dialer is not None and not dialer.closed:
            return str(dialer.target)

        def opener() -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
            if native:
                return pipes.open_pipe_client(addr, server_user=server_user, timeout=timeout)
            from npipe import smb

            return smb.open_pipe(
                addr, credentials=credentials, timeout=timeout, encrypt=encrypt,
                backend=smb_backend, allow_smb2=allow_smb2,
            )

        dialer = _windows_dialers[key] = pipes.PipeDialer(opener, ioloop.get_loop(), str(addr))
        return str(dialer.target)


_windows_dialers: dict[tuple[object, ...], Any] = {}


def _close_all(doors: list[frontdoor.FrontDoor]) -> None:
    for door in doors:
        door.close()


def _listen(server: grpc.Server | grpc.aio.Server, backend: Path) -> None:
    if server.add_insecure_port(_grpc_unix_target(backend)) == 0:
        raise OSError(f"grpcio could not listen on {backend}")


def _release_direct(linked: ClaimedPath, workdir: Path) -> None:
    linked.release()
    shutil.rmtree(workdir, ignore_errors=True)


def caller(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> Caller | None:
    """Who made this call: the caller's identity inside a handler, None if not via a pipe."""
    return frontdoor.lookup(context.peer())


def target(
    address: str | PipeAddress,
    *,
    server_user: str | int | None = None,
    pipe_dir: str | os.PathLike[str] | None = None,
    credentials: Credentials | None = None,
    timeout: float = 10.0,
    encrypt: bool | None = None,
    smb_backend: str | None = None,
    allow_smb2: bool = False,
) -> str:
    """The grpcio target (``unix:/...``) for a pipe, after checking who serves it.

    A local pipe that is not served yet raises nothing: the target is then a private
    bridge that finds and checks the pipe on every connection, and answers
    UNAVAILABLE with the reason while it is missing (after a second). A call made
    with wait_for_ready=True waits for the pipe instead, until its deadline, but only
    through a channel of :func:`channel` or :func:`aio_channel`: they mark such calls
    for the bridge (metadata ``npipe-wait-for-ready``); grpcio itself does not say.
    A remote pipe is reached through an in-process bridge: a private Unix socket
    (0700 directory, only this user admitted) whose connections each open the pipe
    over SMB (see :func:`npipe.open_connection` for the SMB options).
    """
    return _dial(
        address, server_user=server_user, pipe_dir=pipe_dir, credentials=credentials,
        timeout=timeout, encrypt=encrypt, smb_backend=smb_backend, allow_smb2=allow_smb2,
    )[0]


# --- wait_for_ready on the wire --------------------------------------------------------
# A bridge in front of a pipe that is not there yet must tell a call that may wait for
# it (wait_for_ready=True: grpcio waits for a connection, and a status the bridge sends
# would be final) from one that must fail fast. grpcio does not put wait_for_ready on
# the wire, so npipe's channels add a metadata entry to such calls (the bridge reads
# the connection's first HEADERS: grpc_refusal.CallGate); the pipe's server sees it too.
_WAIT_FOR_READY = (grpc_refusal.WAIT_FOR_READY_KEY, "1")


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):  # (grpc has no types: hence the ignores)
    pass


def _marked(details: Any) -> Any:
    if not details.wait_for_ready:
        return details
    return _CallDetails(details.method, details.timeout,
                        (*(details.metadata or ()), _WAIT_FOR_READY), details.credentials,
                        details.wait_for_ready, getattr(details, "compression", None))


class _MarkWaitForReady(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Marks the calls made with wait_for_ready=True (sync channels)."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_marked(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_marked(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_marked(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_marked(details), requests)


def _aio_marked(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    if not details.wait_for_ready:
        return details
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
    metadata.add(*_WAIT_FOR_READY)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


# (one object per kind: grpc.aio files an interceptor under the first kind it is)
class _AioMarkUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_marked(details), request)


class _AioMarkUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_marked(details), request)


class _AioMarkStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_marked(details), requests)


class _AioMarkStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(
        self, continuation: Any, details: Any, requests: Any
    ) -> Any:
        return await continuation(_aio_marked(details), requests)


def _aio_mark_wait_for_ready() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that mark the calls made with wait_for_ready=True (grpc.aio)."""
    return [_AioMarkUnaryUnary(), _AioMarkUnaryStream(), _AioMarkStreamUnary(),
            _AioMarkStreamStream()]

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, requests: Any
    ) -> Any:
        return await continuation(_aio_marked(details), requests)


def _dial(
    address: str | PipeAddress,
    *,
    server_user: str | int | None = None,
    pipe_dir: str | os.PathLike[str] | None = None,
    credentials: Credentials | None = None,
    timeout: float = 10.0,
    encrypt: bool | None = None,
    smb_backend: str | None = None,
    allow_smb2: bool = False,
    pin: bool = True,
) -> tuple[str, PipeBridge | None, bool]:
    """:func:`target`, the bridge to hold with the channel if any (unpinned:
    ``pin=False``), and whether a bridge that waits for a missing pipe stands in front
    of it (its channels then mark their wait_for_ready calls)."""
    addr = parse_address(address)
    if sys.platform == "win32":
        where = _windows_dialer(
            addr, server_user, credentials, timeout, encrypt, smb_backend, allow_smb2
        )
        return where, None, False
    if addr.is_remote:
        from npipe.unix_bridge import bridge_for

        bridge = bridge_for(
            addr, credentials=credentials, timeout=timeout, encrypt=encrypt, backend=smb_backend,
            allow_smb2=allow_smb2, pin=pin,
        )
        return bridge.target, bridge, True
    try:
        path = find_socket(addr, server_user=server_user, directory=pipe_dir)
    except PipeNotFound:
        # Not served yet: grpcio channels are lazy, and so is this one. Its connections
        # find and check the pipe each time (see _resolving_bridge).
        bridge = _resolving_bridge(addr, server_user, pipe_dir, pin)
        return bridge.target, bridge, True
    if not _others_can_name(path):
        return _grpc_unix_target(path), None, False  # dialled directly: no bridge, no mark
    return _checked_bridge(path, server_user).target, None, True


# grpcio re-dials a target by path on its own, after a server restart, with no check of
# who listens there now. A socket in a directory where others can create names (/tmp,
# where .NET's pipes live: /tmp/CoreFxPipe_NAME) can be replaced by anyone once its
# server is gone, so grpcio dials such a pipe through a private relay that checks the
# listener (SO_PEERCRED) on every connection. Names found in the pipe directory or
# machine-wide resolve to a directory only their server's user can write: dialled directly.
_checked_bridges: dict[tuple[Path, frozenset[int]], PipeBridge] = {}  # by path, trusted uids
_checked_lock = threading.Lock()


def _others_can_name(path: Path) -> bool:
    return bool(os.stat(path.parent).st_mode & 0o022)  # (its owner was checked: trusted)


def _checked_bridge(path: Path, server_user: str | int | None) -> PipeBridge:
    from npipe.unix_bridge import PipeBridge

    key = (path, frozenset(trusted_uids(server_user)))
    with _checked_lock:
        bridge = _checked_bridges.get(key)
        if bridge is None or bridge.closed:
            attach = functools.partial(relay_checked, path, server_user,
                                       close_on_failure=False)
            bridge = _checked_bridges[key] = PipeBridge(attach, description=str(path))
        return bridge


# A channel made before its pipe is served dials a private bridge instead, whose every
# connection finds the pipe (find_socket: the same lookup and trust walk as at once)
# and checks its listener (relay_checked). A missing pipe is waited for by the bridge
# (PipeBridge._wait_for_the_pipe): a call made with wait_for_ready=True until its
# deadline, any other for a second, then answered UNAVAILABLE with the reason.
# Such a channel keeps its bridge (one relay hop, in this process's I/O thread) for its
# lifetime: re-dials never reach a socket nobody checked.
_resolving_bridges: dict[tuple[object, ...], PipeBridge] = {}


def _resolving_bridge(
    addr: PipeAddress, server_user: str | int | None,
    pipe_dir: str | os.PathLike[str] | None, pin: bool,
) -> PipeBridge:
    from npipe.unix_bridge import PipeBridge

    key = (addr.key, frozenset(trusted_uids(server_user)),
           None if pipe_dir is None else os.fspath(pipe_dir))
    with _checked_lock:
        bridge = _resolving_bridges.get(key)
        if bridge is None or bridge.closed:
            attach = functools.partial(relay_resolved, addr, server_user, pipe_dir)
            bridge = _resolving_bridges[key] = PipeBridge(
                attach, description=str(addr), pinned=pin)
        else:
            bridge.touch()
            if pin:
                bridge.pin()
        return bridge


async def relay_resolved(
    addr: PipeAddress, server_user: str | int | None,
    pipe_dir: str | os.PathLike[str] | None, sock: socket.socket, initial: bytes = b"",
) -> None:
    """Find pipe ``addr``, check who listens, and relay ``sock`` to it (``initial``
    first); a failure (PipeNotFound at once for a missing pipe) leaves ``sock`` open:
    the bridge answers grpcio on it, or waits for the pipe."""
    path = find_socket(addr, server_user=server_user, directory=pipe_dir)
    await relay_checked(path, server_user, sock, initial, close_on_failure=False)


async def relay_checked(
    path: Path, server_user: str | int | None, sock: socket.socket, initial: bytes = b"", *,
    close_on_failure: bool = True,
) -> None:
    """Connect to ``path``, check who listens there, and relay ``sock`` to it
    (``initial`` first: what was read from ``sock`` already)."""
    loop = asyncio.get_running_loop()
    out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    out.setblocking(False)
    try:
        try:
            await loop.sock_connect(out, os.fspath(path))
        except OSError as e:
            raise connect_error(e, path) from e
        check_server(out, path, server_user)
    except BaseException:
        from npipe.local.sockets import close_gently

        out.close()
        if close_on_failure:
            close_gently(sock)
        raise
    sock.setblocking(False)
    try:
        if initial:
            await loop.sock_sendall(out, initial)
        await asyncio.gather(_pump(loop, sock, out), _pump(loop, out, sock))
    finally:
        out.close()
        sock.close()


async def _pump(loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := await loop.sock_recv(src, frontdoor.RELAY_CHUNK):
            await loop.sock_sendall(dst, data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):  # one side broke: the other's reader sees the end too
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def channel(
    address: str | PipeAddress,
    *,
    options: ChannelOptions = (),
    compression: grpc.Compression | None = None,
    **dial: Any,
) -> grpc.Channel:
    """A grpcio channel to a pipe; generated stubs use it unchanged.

    ``dial`` takes :func:`target`'s options (server_user, pipe_dir, credentials, ...).
    A remote pipe's bridge stays open while the channel lives (then closes once unused
    for ``npipe.ioloop.idle_timeout()``).
    """
    where, bridge, gated = _dial(address, pin=False, **dial)
    ch = grpc.insecure_channel(where, options=_options(options), compression=compression)
    if gated:  # (still a grpc.Channel, a context manager as ever)
        ch = grpc.intercept_channel(ch, _MarkWaitForReady())
    if bridge is not None:
        bridge.hold(ch)
    return ch


def aio_channel(
    address: str | PipeAddress,
    *,
    options: ChannelOptions = (),
    compression: grpc.Compression | None = None,
    **dial: Any,
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to a pipe (a remote pipe's bridge: as :func:`channel`)."""
    where, bridge, gated = _dial(address, pin=False, **dial)
    interceptors = _aio_mark_wait_for_ready() if gated else None
    ch = grpc.aio.insecure_channel(where, options=_options(options), compression=compression,
                                   interceptors=interceptors)
    if bridge is not None:
        bridge.hold(ch)
    return ch


def _grpc_unix_target(path: Path) -> str:
    # grpcio parses targets as URIs: '?', '#' and '%' in a pipe name must be escaped.
    return "unix:" + urllib.parse.quote(os.fspath(path), safe="/")


def _options(options: ChannelOptions) -> list[tuple[str, Any]]:
    # .NET's Kestrel and others route by :authority; a pipe has no host, so say localhost.
    opts = list(options)
    if not any(k == "grpc.default_authority" for k, _ in opts):
        opts.append(("grpc.default_authority", "localhost"))
    return opts


def _pipe_dir(override: str | os.PathLike[str] | None) -> Path:
    return ensure_pipe_dir(pipe_dir(override))


def _close_with(server: grpc.Server | grpc.aio.Server, port: PipePort) -> None:
    """Give up the pipe when the server stops (or is collected).

    grpcio has no stop callback, so the instance's ``stop`` is wrapped; the front
    door stops accepting at once and live calls drain as grpcio's grace allows.
    """
    weakref.finalize(server, port.close)
    stop = server.stop
    if asyncio.iscoroutinefunction(stop):

        @functools.wraps(stop)
        async def astop(grace: float | None) -> None:
            port.close()
            await stop(grace)

        server.stop = astop
    else:

        @functools.wraps(stop)
        def sstop(grace: float | None) -> Any:
            port.close()
            return stop(grace)

        server.stop = sstop
