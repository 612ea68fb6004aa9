"""The process-wide I/O thread for remote pipes, and the idle timeout.

Every grpcio bridge (:class:`~npipe.unix_bridge.PipeBridge`) and every synchronous user of
the SMB client runs on ONE asyncio event loop in one daemon thread, ``npipe-io``,
started the first time something needs it. The native backend shares its connections
per event loop, so all of them share one connection per host, port, identity and
security options. (asyncio users who open pipes in their own loop share connections
within that loop.) After a fork the child starts its own thread when it needs one.

Bridges and connections that nothing uses are closed after :func:`idle_timeout`
seconds: 60 by default, ``$NPIPE_SMB_IDLE_TIMEOUT``, or :func:`set_idle_timeout`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from npipe.errors import ConfigError

log = logging.getLogger("npipe.smb")

T = TypeVar("T")

DEFAULT_IDLE_TIMEOUT = 60.0
ENV_IDLE_TIMEOUT = "NPIPE_SMB_IDLE_TIMEOUT"
THREAD_NAME = "npipe-io"
# How long exit waits for the loop to wind down (the thread is a daemon: never longer).
SHUTDOWN_TIMEOUT = 2.0

_idle_timeout: float | None = None


def idle_timeout() -> float:
    """Seconds an unused bridge or connection stays open before it is closed."""
    if _idle_timeout is not None:
        return _idle_timeout
    text = os.environ.get(ENV_IDLE_TIMEOUT)
    if not text:
        return DEFAULT_IDLE_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            f"${ENV_IDLE_TIMEOUT} must be a number of seconds, not {text!r}"
        ) from None
    if not value >= 0:
        raise ConfigError(f"${ENV_IDLE_TIMEOUT} must be >= 0, not {text!r}")
    return value


def set_idle_timeout(seconds: float | None) -> None:
    """Set the idle timeout for this process (None: back to the default / environment)."""
    global _idle_timeout
    if seconds is not None and not seconds >= 0:
        raise ValueError(f"idle timeout must be >= 0, not {seconds!r}")
    _idle_timeout = seconds


def sweep_interval() -> float:
    """How often idle bridges and connections are looked for (at least once a second,
    so that a changed idle timeout soon applies to timers already set)."""
    return min(max(idle_timeout() / 4, 0.05), 1.0)


class _IoThread:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None


_io = _IoThread()
_io_lock = threading.Lock()


def get_loop() -> asyncio.AbstractEventLoop:
    """The shared I/O loop, running in its own thread (started now if it is not)."""
    with _io_lock:
        loop = _io.loop
        if loop is not None and not loop.is_closed():
            return loop
        loop = asyncio.new_event_loop()
        started = threading.Event()
        thread = threading.Thread(
            target=_run, args=(loop, started), name=THREAD_NAME, daemon=True
        )
        thread.start()
        started.wait()
        _io.loop, _io.thread = loop, thread
        return loop


def running() -> asyncio.AbstractEventLoop | None:
    """The shared I/O loop if it is running (never starts it)."""
    loop = _io.loop
    return loop if loop is not None and loop.is_running() else None


def in_io_thread() -> bool:
    return _io.thread is threading.current_thread()


def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(started.set)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT))
        except Exception:  # pragma: no cover - best effort at exit
            log.debug("the I/O loop did not wind down cleanly", exc_info=True)
        finally:
            loop.close()


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the shared loop and wait for its result (not from the loop itself)."""
    if in_io_thread():
        coro.close()
        raise RuntimeError("npipe.ioloop.run() called from the I/O thread itself")
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise


def call(fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
    """Call ``fn(*args)`` in the I/O thread and return its result (directly if already there)."""
    if in_io_thread():
        return fn(*args)

    async def call_it() -> T:
        return fn(*args)

    return run(call_it(), timeout)


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Schedule ``fn(*args)`` in the I/O thread (starting it if needed); do not wait."""
    get_loop().call_soon_threadsafe(fn, *args)


def shutdown(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Stop the I/O thread (at exit; a later user starts a new one)."""
    with _io_lock:
        loop, thread = _io.loop, _io.thread
        _io.loop = _io.thread = None
    if loop is None or thread is None or loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # closed meanwhile
        loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join(timeout)


def _forget_after_fork() -> None:
    # The thread did not survive the fork; its loop's selector is shared with the
    # parent. Leave both alone (never closed here) and start afresh on demand.
    global _io_lock
    _io_lock = threading.Lock()
    _io.loop = _io.thread = None


if hasattr(os, "register_at_fork"):  # (not on Windows)
    os.register_at_fork(after_in_child=_forget_after_fork)
# Registered when npipe.smb is first imported, before close_bridges: atexit runs in
# reverse order, so the bridges close first and the loop stops after them.
atexit.register(shutdown)

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "ENV_IDLE_TIMEOUT",
    "call",
    "call_soon",
    "get_loop",
    "idle_timeout",
    "in_io_thread",
    "run",
    "running",
    "set_idle_timeout",
    "shutdown",
]
