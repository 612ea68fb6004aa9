"""``npipe serve-grpc MODULE:FUNCTION --pipe NAME``: a gRPC service on a pipe, no main needed.

FUNCTION gets a fresh ``grpc.Server`` (a thread pool) and adds servicers to it, as generated
``add_XServicer_to_server`` helpers do; an ``async def`` FUNCTION gets a ``grpc.aio.Server``
instead. The command adds grpc.health.v1 (every service and the server as a whole SERVING)
and server reflection for the services FUNCTION added, serves the pipe, tells systemd it is
ready, and on SIGINT/SIGTERM reports NOT_SERVING, stops taking calls and gives the calls in
flight ``--grace`` seconds to finish.

The services FUNCTION added are learnt by watching the two public ways of adding them,
``add_generic_rpc_handlers`` (a ``grpc.ServiceRpcHandler`` names its service) and
``add_registered_method_handlers``, on this one server while FUNCTION runs.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import npipe.grpc
from npipe.acl import Acl
from npipe.address import PipeAddress
from npipe.cli import service
from npipe.cli.load import load_object
from npipe.errors import ConfigError, NpipeError

log = logging.getLogger("npipe.serve_grpc")

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the grace grpcio cancels the calls, but a handler that never looks at its context
# keeps its worker thread: wait this much longer, then leave without it.
ABANDON_AFTER = 2.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve-grpc", parents=list(parents),
        help="serve a gRPC service on a pipe (health and reflection added)",
        description="Import MODULE:FUNCTION (the current directory first on the path), call "
        "FUNCTION(server) to add servicers to a grpc.Server (a grpc.aio.Server if FUNCTION "
        "is async), add health checking and reflection for them, and serve it on --pipe "
        "until SIGINT/SIGTERM/SIGHUP; calls in flight then get --grace seconds to finish.",
    )
    p.add_argument("function", nargs="?", metavar="MODULE:FUNCTION",
                   help="e.g. npipe.examples.buy.serve:add_services")
    p.add_argument("--pipe", metavar="NAME", help=r"pipe name: NAME or \\.\pipe\NAME (required)")
    service.add_pipe_server_options(p)
    p.add_argument("--workers", type=service.positive_int, metavar="N",
                   help="threads running calls (sync FUNCTION; grpcio's default otherwise)")
    service.add_service_options(p, grace=10.0, what="calls in flight")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    service.require(args, "function", "pipe")
    address = service.served_pipe(args.pipe, "--pipe")
    acl = service.pipe_acl(args)
    function = load_object(args.function, "MODULE:FUNCTION")
    if not callable(function):
        raise ConfigError(f"{args.function!r} is not a function")
    if inspect.iscoroutinefunction(function):
        if args.workers is not None:
            log.warning("--workers is ignored: an async FUNCTION runs on a grpc.aio.Server")
        return asyncio.run(_serve_aio(args, function, address, acl))
    return asyncio.run(_serve(args, function, address, acl))


async def _serve(
    args: argparse.Namespace, function: Callable[[grpc.Server], Any],
    address: PipeAddress, acl: Acl,
) -> int:
    stop = await service.watch_stop_signals()
    executor = _CountingExecutor(max_workers=args.workers, thread_name_prefix="grpc-call")
    server = grpc.server(executor)
    names = _added_services(server, lambda: function(server), args.function)
    health_servicer = None
    if HEALTH not in names:
        health_servicer = health.HealthServicer()
        for name in _health_names(names):
            health_servicer.set(name, SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server, names)
    _add_pipe_port(server, args, address, acl)
    server.start()
    _ready(names, address)
    sig = await stop
    _stopping(sig, args.grace)
    if health_servicer is not None:
        for name in _health_names(names):
            health_servicer.set(name, NOT_SERVING)
    stopped = server.stop(args.grace)
    drained = asyncio.to_thread(_drain, stopped, executor)
    try:
        await asyncio.wait_for(drained, args.grace + ABANDON_AFTER)
    except asyncio.TimeoutError:
        # The pool's threads are joined at exit: one stuck in a call would hold the
        # process past systemd's TimeoutStopSec, so leave without it. The stop asked for
        # was carried out (exit 0: systemd calls it a success, not a failed unit); the
        # calls left behind are said here, in the journal.
        print(f"npipe: {service.plural(executor.running, 'call')} still running "
              f"{args.grace:g}s after {sig.name}: abandoned", file=sys.stderr, flush=True)
        os._exit(0)
    return 0


class _CountingExecutor(ThreadPoolExecutor):
    """A thread pool that knows how many jobs are running: grpcio runs each call's handler
    as one job, so that is the number of calls a stop past the grace abandons."""

    def __init__(self, max_workers: int | None, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.running = 0
        self._count_lock = threading.Lock()

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> Future[_T]:
        def counted() -> _T:
            with self._count_lock:
                self.running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count_lock:
                    self.running -= 1

        return super().submit(counted)


def _drain(stopped: threading.Event, executor: ThreadPoolExecutor) -> None:
    stopped.wait()  # grpcio: the grace is over, calls left are cancelled
    executor.shutdown(wait=True)  # handlers that ignore the cancellation: here


async def _serve_aio(
    args: argparse.Namespace, function: Callable[[grpc.aio.Server], Any],
    address: PipeAddress, acl: Acl,
) -> int:
    stop = await service.watch_stop_signals()
    server = grpc.aio.server()
    names = await _added_services_aio(server, function, args.function)
    health_servicer = None
    if HEALTH not in names:
        health_servicer = health.aio.HealthServicer()
        for name in _health_names(names):
            await health_servicer.set(name, SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server, names)
    _add_pipe_port(server, args, address, acl)
    await server.start()
    _ready(names, address)
    sig = await stop
    _stopping(sig, args.grace)
    if health_servicer is not None:
        for name in _health_names(names):
            await health_servicer.set(name, NOT_SERVING)
    try:
        await asyncio.wait_for(server.stop(args.grace), args.grace + ABANDON_AFTER)
    except asyncio.TimeoutError:
        # (grpc.aio does not say how many: its calls are tasks of its own)
        print(f"npipe: calls still running {args.grace:g}s after {sig.name}: abandoned",
              file=sys.stderr, flush=True)
    return 0


def _added_services(
    server: grpc.Server, add: Callable[[], Any], spec: str
) -> list[str]:
    names = _watch_additions(server)
    try:
        add()
    except Exception as e:
        raise NpipeError(f"{spec}(server) failed: {type(e).__name__}: {e}") from e
    finally:
        _unwatch(server)
    return _checked(names, spec)


async def _added_services_aio(
    server: grpc.aio.Server, function: Callable[[grpc.aio.Server], Any], spec: str
) -> list[str]:
    names = _watch_additions(server)
    try:
        await function(server)
    except Exception as e:
        raise NpipeError(f"{spec}(server) failed: {type(e).__name__}: {e}") from e
    finally:
        _unwatch(server)
    return _checked(names, spec)


def _watch_additions(server: grpc.Server | grpc.aio.Server) -> list[str]:
    names: list[str] = []
    add_generic = server.add_generic_rpc_handlers
    add_registered = server.add_registered_method_handlers

    def generic(handlers: Sequence[grpc.GenericRpcHandler]) -> Any:
        for handler in handlers:
            if isinstance(handler, grpc.ServiceRpcHandler):
                _note(names, handler.service_name())
        return add_generic(handlers)

    def registered(name: str, handlers: Any) -> Any:
        _note(names, name)
        return add_registered(name, handlers)

    server.add_generic_rpc_handlers = generic
    server.add_registered_method_handlers = registered
    return names


def _unwatch(server: grpc.Server | grpc.aio.Server) -> None:
    del server.add_generic_rpc_handlers
    del server.add_registered_method_handlers


def _note(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


def _checked(names: list[str], spec: str) -> list[str]:
    if not names:
        log.warning("%s added no service that names itself: only health and reflection "
                    "are known by name", spec)
    return names


def _health_names(names: list[str]) -> list[str]:
    return [health.OVERALL_HEALTH, *names]


def _add_reflection(server: grpc.Server | grpc.aio.Server, names: list[str]) -> None:
    # Imported here: every npipe command loads this module for its parser, and
    # reflection's descriptors cost ~15 ms of start-up (an ssh ProxyCommand pays it too).
    from grpc_reflection.v1alpha import reflection

    if reflection.SERVICE_NAME in names:
        return  # FUNCTION did it
    pool = descriptor_pool.Default()
    described = []
    for name in [*names, HEALTH]:
        try:
            pool.FindServiceByName(name)
        except KeyError:
            log.warning("reflection cannot describe %s: it is not in the protobuf "
                        "descriptor pool (not generated by protoc?)", name)
            continue
        described.append(name)
    reflection.enable_server_reflection([*described, reflection.SERVICE_NAME], server)


def _add_pipe_port(
    server: grpc.Server | grpc.aio.Server, args: argparse.Namespace,
    address: PipeAddress, acl: Acl,
) -> None:
    npipe.grpc.add_pipe_port(
        server, address, acl=acl, pipe_dir=args.pipe_dir, dotnet=args.dotnet, smb=args.smb,
        max_connections=args.max_connections,
    )


def _ready(names: list[str], address: PipeAddress) -> None:
    service.announce_ready(f"serving {', '.join(names) or 'gRPC'} on pipe {address.name}")


def _stopping(sig: signal.Signals, grace: float) -> None:
    service.announce_stopping(f"{sig.name}: stopping, calls in flight get {grace:g}s")
