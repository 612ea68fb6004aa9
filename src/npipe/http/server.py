r"""Serve an ASGI app on a pipe with hypercorn, one pipe connection per HTTP connection.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.lifespan import Lifespan
from hypercorn.asyncio.statsd import StatsdLogger
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.typing import AppWrapper, ASGIFramework, LifespanState, Scope

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress
from npipe.identity import Caller
from npipe.pipe_server import PipeServer
from npipe.streams import caller, start_server

log = logging.getLogger("npipe.http")

CALLER_EXTENSION = "npipe.caller"
# After the graceful timeout, how long cancelled connections get to finish closing.
_CANCEL_GRACE = 2.0


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


class _Connections:
    """The connections being served, and how many there have been."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.accepted = 0

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
        lifespan: Lifespan,
        lifespan_task: asyncio.Task[None],
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
        return self.pipe.address

    @property
    def path(self) -> Path:
        return self.pipe.path

    @property
    def paths(self) -> list[Path]:
        return self.pipe.paths

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
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
        return self._closing

    def is_serving(self) -> bool:
        return not self._closing and self.pipe.is_serving()

    def close(self) -> None:
        """Stop accepting and give up the pipe's name; idle connections close at once."""
        if self._closing:
            return
        self._closing = True
        self.pipe.close()
        self._shutdown = asyncio.get_running_loop().create_task(self._graceful_shutdown())

    async def wait_closed(self) -> None:
        """After close(): wait until every connection has ended and the lifespan shut down."""
        if self._shutdown is not None:
            await asyncio.shield(self._shutdown)

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def serve_forever(self) -> None:
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
            await _end_lifespan(self._lifespan, self._lifespan_task)
            self._closed.set()

    async def __aenter__(self) -> AsgiServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


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
    (its timeouts, h11/h2 limits, graceful_timeout, logging; its binds are ignored)."""
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

    max_requests = None  # config.max_requests restarts workers; a pipe server has none
    context = WorkerContext(max_requests)
    connections = _Connections()
    server: AsgiServer | None = None

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server is not None and server.closing:  # accepted just before close()
            return
        task = asyncio.current_task()
        if task is not None:
            connections.add(task)
        app_for_caller = CallerWrapper(wrapped, caller(writer))
        await TCPServer(app_for_caller, loop, config, context, lifespan_state, reader, writer)

    try:
        pipe = await start_server(
            on_connect, address, acl=acl, pipe_dir=pipe_dir, dotnet=dotnet, smb=smb,
            max_connections=max_connections,
        )
    except BaseException:
        await _end_lifespan(lifespan, lifespan_task)
        raise
    server = AsgiServer(pipe, config, context, lifespan, lifespan_task, connections)
    return server


async def _end_lifespan(lifespan: Lifespan, task: asyncio.Task[None]) -> None:
    try:
        await lifespan.wait_for_shutdown()
    except Exception:
        log.exception("the ASGI lifespan shutdown failed")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


__all__ = ["CALLER_EXTENSION", "AsgiServer", "CallerWrapper", "serve_asgi"]
