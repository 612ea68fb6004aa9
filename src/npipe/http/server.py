r"""Serve an ASGI or WSGI app on a pipe with hypercorn, one pipe connection per HTTP
connection.

npipe.start_server accepts, applies the ACL and knows the caller; each accepted
reader/writer goes straight to hypercorn's per-connection server (TCPServer), which
speaks HTTP/1.1, and HTTP/2 with prior knowledge (h2c), on a plain connection: no relay
hop. What hypercorn's ``worker_serve`` does around it is done here too: the ASGI
lifespan (startup before the pipe is claimed, shutdown last) and the graceful stop (stop
accepting, close idle keep-alive connections, give requests in flight up to
``config.graceful_timeout`` seconds, then cancel what is left).

Hypercorn internals relied on (pinned in pyproject.toml, checked by
tests/test_http_server.py): ``hypercorn.asyncio.tcp_server.TCPServer(app, loop, config,
context, state, reader, writer)``, ``hypercorn.asyncio.lifespan.Lifespan``,
``hypercorn.asyncio.worker_context.WorkerContext`` and ``hypercorn.app_wrappers.ASGIWrapper``.

The caller's identity is ``scope["extensions"]["npipe.caller"]`` (a :class:`npipe.Caller`)
in every http and websocket scope.

WSGI apps (:func:`serve_wsgi`: Flask, Django, ...) go through hypercorn's own
``hypercorn.app_wrappers.WSGIWrapper`` (it reads the whole request body, up to
``config.wsgi_max_body_size``, then runs the app on a thread; each chunk of the response
waits until the connection has taken it): npipe gives it a bounded thread pool of its own
(``max_workers``) and the caller as ``environ["npipe.caller"]``. A WSGI app has no
lifespan and no websockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import io
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from npipe.extras import imports_of

with imports_of("http", "npipe.http"):
    from hypercorn.app_wrappers import ASGIWrapper, WSGIWrapper
    from hypercorn.asyncio.lifespan import Lifespan
    from hypercorn.asyncio.statsd import StatsdLogger
    from hypercorn.asyncio.tcp_server import TCPServer
    from hypercorn.asyncio.worker_context import WorkerContext
    from hypercorn.config import Config
    from hypercorn.typing import AppWrapper, ASGIFramework, LifespanState, Scope, WSGIFramework

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress
from npipe.errors import ConfigError
from npipe.http import CALLER_EXTENSION
from npipe.identity import Caller
from npipe.pipe_server import PipeServer
from npipe.streams import caller, start_server

log = logging.getLogger("npipe.http")

# After the graceful timeout, how long cancelled connections get to finish closing.
_CANCEL_GRACE = 2.0
# Threads running a WSGI app's requests at once (more requests wait for one).
DEFAULT_WSGI_WORKERS = 10


class WrongAppKind(ConfigError, TypeError):
    """An ASGI app given where a WSGI app is served, or the reverse."""


def app_kind(app: object) -> Literal["asgi", "wsgi"] | None:
    """What ``app`` is, as far as can be told without calling it: "asgi" (an async
    callable, or one that takes (scope, receive, send)), "wsgi" (a sync callable that
    takes (environ, start_response): a Flask or Django app object is one), or None."""
    if not callable(app):
        return None
    if inspect.isroutine(app) or isinstance(app, functools.partial):
        call: object = app
    else:  # an object: its class's __call__ (Flask, Starlette, Django's handlers)
        call = next((vars(k)["__call__"] for k in type(app).__mro__ if "__call__" in vars(k)),
                    app)
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call):
        return "asgi"
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):
        return None
    takes = [n for n in (2, 3) if _binds(signature, n)]
    if takes == [2]:
        return "wsgi"
    if takes == [3]:
        return "asgi"
    return None


def _binds(signature: inspect.Signature, n: int) -> bool:
    try:
        signature.bind(*range(n))
    except TypeError:
        return False
    return True


def check_app(app: object, kind: Literal["asgi", "wsgi"], what: str = "app") -> None:
    """Raise WrongAppKind if ``app`` is clearly not a ``kind`` app (or not callable)."""
    if not callable(app):
        raise WrongAppKind(f"{what} is not an {kind.upper()} app (not callable)")
    found = app_kind(app)
    if found == kind or found is None:
        return
    if found == "wsgi":
        raise WrongAppKind(
            f"{what} is a WSGI app (a sync callable taking (environ, start_response), as "
            "Flask and Django apps are): serve it with npipe.http.serve_wsgi")
    raise WrongAppKind(
        f"{what} is an ASGI app (an async callable taking (scope, receive, send)): serve "
        "it with npipe.http.serve_asgi")


class CallerWrapper:
    """hypercorn's app wrapper for one connection: adds its caller to each scope."""

    def __init__(self, app: AppWrapper, who: Caller | None) -> None:
        self.app = app
        self.caller = who

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[..., Any],
        send: Callable[..., Any],
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        if scope["type"] in ("http", "websocket"):
            extensions: dict[str, Any] = dict(scope.get("extensions") or {})
            extensions[CALLER_EXTENSION] = self.caller
            scope = {**scope, "extensions": extensions}  # type: ignore[assignment]
        await self.app(scope, receive, send, sync_spawn, call_soon)


class WsgiWorkers:
    """The bounded thread pool a WSGI app's requests run on, and how many run now."""

    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ConfigError(f"max_workers must be 1 or more, not {max_workers}")
        self.max_workers = max_workers
        self.executor = ThreadPoolExecutor(max_workers, thread_name_prefix="npipe-wsgi")
        self.busy = 0
        self._lock = threading.Lock()

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        def counted() -> Any:
            with self._lock:
                self.busy += 1
            try:
                return func(*args)
            finally:
                with self._lock:
                    self.busy -= 1

        return await asyncio.get_running_loop().run_in_executor(self.executor, counted)


class WsgiCallerWrapper(WSGIWrapper):
    """hypercorn's WSGIWrapper for one connection: its requests run on ``executor`` (not
    the loop's default executor) with the caller in ``environ["npipe.caller"]``."""

    def __init__(self, app: WSGIFramework, max_body_size: int, who: Caller | None,
                 workers: WsgiWorkers) -> None:
        super().__init__(app, max_body_size)
        self.caller = who
        self.workers = workers

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[..., Any],
        send: Callable[..., Any],
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        await super().__call__(scope, receive, send, self.workers.run, call_soon)

    def run_app(self, environ: dict[str, Any], send: Callable[[dict[str, Any]], Any]) -> None:
        """hypercorn's run_app, with the caller in the environ, the length of a body that
        came without one, WSGI's write(), and a response with an empty body started all
        the same (hypercorn's would send a body without a start: a 500 for every empty
        200/204)."""
        environ[CALLER_EXTENSION] = self.caller
        # hypercorn has read the whole body: say how long it is, also when it came chunked
        # (HTTP/1.1) or without a content-length (HTTP/2), which frameworks (Werkzeug)
        # would otherwise read as empty.
        body_input = environ["wsgi.input"]
        if "CONTENT_LENGTH" not in environ and isinstance(body_input, io.BytesIO):
            length = body_input.getbuffer().nbytes
            if length:
                environ["CONTENT_LENGTH"] = str(length)
        environ["wsgi.input_terminated"] = True
        status_code = 500
        headers: list[tuple[bytes, bytes]] = []
        started = False
        response_started = False

        def start_response(status: str, response_headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            nonlocal status_code, headers, response_started
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            status_code = int(status.split(" ", 1)[0])
            headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                       for name, value in response_headers]
            response_started = True
            return write

        def start() -> None:
            nonlocal started
            if not started:
                if not response_started:
                    raise RuntimeError("WSGI app did not call start_response")
                send({"type": "http.response.start", "status": status_code,
                      "headers": headers})
                started = True

        def write(data: bytes) -> None:  # WSGI's legacy write()
            start()
            send({"type": "http.response.body", "body": bytes(data), "more_body": True})

        body: Iterable[bytes] = self.app(environ, start_response)
        try:
            for chunk in body:
                if chunk:
                    start()
                    send({"type": "http.response.body", "body": bytes(chunk),
                          "more_body": True})
            start()
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


class _Connections:
    """The connections being served, and how many there have been."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.accepted = 0
        self.closing = False

    def add(self, task: asyncio.Task[Any]) -> None:
        self.accepted += 1
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class AsgiServer:
    """An ASGI app served on a pipe (from :func:`serve_asgi`).

    ``close()`` stops accepting at once and gives up the name; ``wait_closed()`` then
    lets requests in flight finish (up to ``config.graceful_timeout``), closes the rest
    and runs the lifespan shutdown. ``serve_forever()`` waits until closed (cancelling
    it closes gracefully); ``async with`` closes gracefully on exit.
    """

    def __init__(
        self,
        pipe: PipeServer,
        config: Config,
        context: WorkerContext,
        lifespan: Lifespan | None,
        lifespan_task: asyncio.Task[None] | None,
        connections: _Connections,
    ) -> None:
        self.pipe = pipe
        self.config = config
        self._context = context
        self._lifespan = lifespan
        self._lifespan_task = lifespan_task
        self._connections = connections
        self._closing = False
        self._closed = asyncio.Event()
        self._shutdown: asyncio.Task[None] | None = None

    @property
    def address(self) -> PipeAddress:
        """The pipe served."""
        return self.pipe.address

    @property
    def path(self) -> Path:
        """Its socket (give it to ``curl --unix-socket``)."""
        return self.pipe.path

    @property
    def paths(self) -> list[Path]:
        """Everywhere it listens (with ``smb=True``, Samba's np/ too)."""
        return self.pipe.paths

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets, as ``asyncio.Server.sockets``."""
        return self.pipe.sockets

    @property
    def connections(self) -> int:
        """HTTP connections being served now."""
        return len(self._connections.tasks)

    @property
    def accepted(self) -> int:
        """HTTP connections served since the start (each is one pipe connection)."""
        return self._connections.accepted

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def is_serving(self) -> bool:
        """Whether it accepts callers (not closing)."""
        return not self._closing and self.pipe.is_serving()

    def close(self) -> None:
        """Stop accepting and give up the pipe's name; idle connections close at once."""
        if self._closing:
            return
        self._closing = True
        self._connections.closing = True
        self.pipe.close()
        self._shutdown = asyncio.get_running_loop().create_task(self._graceful_shutdown())

    async def wait_closed(self) -> None:
        """After close(): wait until every connection has ended and the lifespan shut down."""
        if self._shutdown is not None:
            await asyncio.shield(self._shutdown)

    async def aclose(self) -> None:
        """:meth:`close`, then :meth:`wait_closed`."""
        self.close()
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` or cancelled; then close and wait for the
        connections (graceful shutdown)."""
        try:
            await self._closed.wait()
        finally:
            self.close()
            await self.wait_closed()

    async def _graceful_shutdown(self) -> None:
        try:
            # Idle keep-alive connections end now; busy ones once their request is done.
            await self._context.terminated.set()
            pending = set(self._connections.tasks)
            if pending:
                _done, late = await asyncio.wait(pending, timeout=self.config.graceful_timeout)
                if late:
                    log.warning("pipe %s: %d connection(s) still busy after the graceful "
                                "timeout (%g s): closed", self.address, len(late),
                                self.config.graceful_timeout)
                    for task in late:
                        task.cancel()
                    await asyncio.wait(late, timeout=_CANCEL_GRACE)
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self.pipe.wait_closed(), _CANCEL_GRACE)
        finally:
            await self._after_connections()
            self._closed.set()

    async def _after_connections(self) -> None:
        await _end_lifespan(self._lifespan, self._lifespan_task)

    async def __aenter__(self) -> AsgiServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class WsgiServer(AsgiServer):
    """A WSGI app served on a pipe (from :func:`serve_wsgi`): :class:`AsgiServer`'s API.

    Its requests run on ``executor`` (``max_workers`` threads). A request still running
    after the graceful timeout cannot be stopped (it is a thread): its connection is
    closed, and the thread is left to finish on its own (``busy_workers`` counts them).
    """

    def __init__(self, *args: Any, workers: WsgiWorkers, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers

    @property
    def busy_workers(self) -> int:
        """Threads running a request now (after close: those the grace left behind)."""
        return self.workers.busy

    async def _after_connections(self) -> None:
        self.workers.executor.shutdown(wait=False, cancel_futures=True)


async def serve_asgi(
    app: ASGIFramework,
    address: str | PipeAddress,
    *,
    acl: Acl = OWNER_ONLY,
    pipe_dir: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
    smb: bool = False,
    max_connections: int | None = None,
    config: Config | None = None,
) -> AsgiServer:
    """Run the app's lifespan startup, then serve it on the pipe; returns once the pipe
    is claimed (connectable). The options are start_server's; ``config`` is hypercorn's
    (its timeouts, h11/h2 limits, graceful_timeout, logging; its binds are ignored).
    A WSGI app (Flask, Django) raises WrongAppKind at once: serve it with serve_wsgi."""
    check_app(app, "asgi")
    config = config if config is not None else Config()
    config.set_statsd_logger_class(StatsdLogger)
    loop = asyncio.get_running_loop()
    wrapped = ASGIWrapper(app)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, loop, lifespan_state)
    lifespan_task = loop.create_task(lifespan.handle_lifespan())
    try:
        await lifespan.wait_for_startup()
        if lifespan_task.done() and (error := lifespan_task.exception()) is not None:
            raise error
    except BaseException:
        lifespan_task.cancel()
        with contextlib.suppress(BaseException):
            await lifespan_task
        raise

    def per_connection(who: Caller | None) -> AppWrapper:
        return CallerWrapper(wrapped, who)

    try:
        pipe, context, connections = await _serve_connections(
            per_connection, config, lifespan_state, address, acl=acl, pipe_dir=pipe_dir,
            dotnet=dotnet, smb=smb, max_connections=max_connections,
        )
    except BaseException:
        await _end_lifespan(lifespan, lifespan_task)
        raise
    return AsgiServer(pipe, config, context, lifespan, lifespan_task, connections)


async def serve_wsgi(
    app: WSGIFramework,
    address: str | PipeAddress,
    *,
    acl: Acl = OWNER_ONLY,
    pipe_dir: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
    smb: bool = False,
    max_connections: int | None = None,
    max_workers: int = DEFAULT_WSGI_WORKERS,
    config: Config | None = None,
) -> WsgiServer:
    """Serve a WSGI app (Flask, Django, ...) on the pipe through hypercorn's WSGI
    support; returns once the pipe is claimed. Requests run on ``max_workers`` threads
    (default 10; more requests wait for a free one), each with its caller in
    ``environ["npipe.caller"]``. The other options are serve_asgi's; a request body is
    read whole before the app runs, up to ``config.wsgi_max_body_size`` (hypercorn's
    16 MiB by default; more is answered 400). An ASGI app raises WrongAppKind at once."""
    check_app(app, "wsgi")
    workers = WsgiWorkers(max_workers)
    config = config if config is not None else Config()
    config.set_statsd_logger_class(StatsdLogger)

    def per_connection(who: Caller | None) -> AppWrapper:
        return WsgiCallerWrapper(app, config.wsgi_max_body_size, who, workers)

    try:
        pipe, context, connections = await _serve_connections(
            per_connection, config, {}, address, acl=acl, pipe_dir=pipe_dir, dotnet=dotnet,
            smb=smb, max_connections=max_connections,
        )
    except BaseException:
        workers.executor.shutdown(wait=False)
        raise
    return WsgiServer(pipe, config, context, None, None, connections, workers=workers)


async def _serve_connections(
    per_connection: Callable[[Caller | None], AppWrapper],
    config: Config,
    lifespan_state: LifespanState,
    address: str | PipeAddress,
    **options: Any,
) -> tuple[PipeServer, WorkerContext, _Connections]:
    """start_server, each connection handed to hypercorn's TCPServer with the app made
    for its caller."""
    loop = asyncio.get_running_loop()
    max_requests = None  # config.max_requests restarts workers; a pipe server has none
    context = WorkerContext(max_requests)
    connections = _Connections()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if connections.closing:  # accepted just before close()
            return
        task = asyncio.current_task()
        if task is not None:
            connections.add(task)
        app_for_caller = per_connection(caller(writer))
        await TCPServer(app_for_caller, loop, config, context, lifespan_state, reader, writer)

    pipe = await start_server(on_connect, address, **options)
    return pipe, context, connections


async def _end_lifespan(lifespan: Lifespan | None, task: asyncio.Task[None] | None) -> None:
    if lifespan is None or task is None:
        return
    try:
        await lifespan.wait_for_shutdown()
    except Exception:
        log.exception("the ASGI lifespan shutdown failed")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


__all__ = [
    "CALLER_EXTENSION", "DEFAULT_WSGI_WORKERS", "AsgiServer", "CallerWrapper", "WrongAppKind",
    "WsgiCallerWrapper", "WsgiServer", "WsgiWorkers", "app_kind", "check_app", "serve_asgi",
    "serve_wsgi",
]
