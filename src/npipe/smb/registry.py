"""The shared SMB connections of a backend, by key, and their idle retirement.

Both backends share one connection per key (host, port, identity, security choices)
between every pipe opened through it. A :class:`ConnectionRegistry` holds, for each
key, the pending or finished setup of that connection (an :class:`asyncio.Task` in the
native backend, a :class:`concurrent.futures.Future` in the smbprotocol one), hands it
out while it is usable, starts a new one when it is not, and closes a connection that
had no pipes (and no open in progress) for the idle timeout
(:func:`npipe.ioloop.idle_timeout`), checking every :func:`npipe.ioloop.sweep_interval`
while any connection is being set up or alive. A dead connection is kept (it still
shows in ``connections()``) until the next open replaces it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Generic, Protocol, TypeVar

from npipe import ioloop
from npipe.address import PipeAddress
from npipe.errors import HostUnreachable
from npipe.smb.credentials import Credentials
from npipe.smb.retry import PipeWait, Refused, Retryable, open_with_retries


class SharedConnection(Retryable, Protocol):
    """What the registry asks of a connection (and :func:`open_with_retries`)."""

    @property
    def busy(self) -> bool:
        """Whether pipes are open on it."""
        ...

    @property
    def alive(self) -> bool: ...

    @property
    def usable(self) -> bool:
        """Alive and not retired: it takes new pipes."""
        ...


C = TypeVar("C", bound=SharedConnection)
T = TypeVar("T")
Setup = asyncio.Future[C] | concurrent.futures.Future[C]
# call_later(delay, callback), from any thread that may touch the registry.
CallLater = Callable[[float, Callable[[], None]], object]


def established(setup: Setup[C]) -> C | None:
    """The connection a setup made, or None while it runs or if it failed."""
    if setup.done() and not setup.cancelled() and setup.exception() is None:
        return setup.result()
    return None


class ConnectionRegistry(Generic[C]):
    """Shared connections by key (thread-safe), with idle retirement.

    ``close_idle(connection, limit)`` closes a connection that was unused for ``limit``
    seconds (already taken out of the registry); ``replaced(connection)``, if given, is
    called on a connection that a new one replaces because it is no longer usable.
    """

    def __init__(
        self,
        call_later: CallLater,
        close_idle: Callable[[C, float], None],
        replaced: Callable[[C], None] | None = None,
    ) -> None:
        self._call_later = call_later
        self._close_idle = close_idle
        self._replaced = replaced
        self._lock = threading.Lock()
        self._setups: dict[Hashable, Setup[C]] = {}
        self._used: dict[Hashable, float] = {}  # when each was last handed out or had pipes
        self._opening: dict[Hashable, int] = {}  # opens in progress: not idle meanwhile
        self._sweeping = False

    def get(self, key: Hashable, start: Callable[[], Setup[C]]) -> Setup[C]:
        """The shared connection for ``key``: being set up, usable, or ``start()``-ed now
        (when there is none, or it failed, died or was retired)."""
        with self._lock:
            self._used[key] = time.monotonic()
            setup = self._setups.get(key)
            if setup is not None and setup.done():
                connection = established(setup)
                if connection is None or not connection.usable:
                    if connection is not None and self._replaced is not None:
                        self._replaced(connection)
                    setup = None
            if setup is None:
                setup = self._setups[key] = start()
        self.schedule_sweep()
        return setup

    async def connection(
        self,
        key: Hashable,
        start: Callable[[float], Setup[C]],
        address: PipeAddress,
        deadline: float,
    ) -> C:
        """Wait (until the loop's time ``deadline``) for the shared connection for
        ``key``; ``start(timeout)`` sets up a new one. HostUnreachable when late."""
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.05)
        setup = self.get(key, lambda: start(remaining))
        waiting = (
            asyncio.wrap_future(setup)
            if isinstance(setup, concurrent.futures.Future)
            else asyncio.shield(setup)  # waiters cannot cancel the shared setup
        )
        try:
            return await asyncio.wait_for(waiting, remaining)
        except asyncio.TimeoutError:
            raise HostUnreachable(
                f"no SMB session with {address.host}:{address.port} within {remaining:g} s"
            ) from None

    async def open(
        self,
        key: Hashable,
        address: PipeAddress,
        credentials: Credentials,
        timeout: float,
        *,
        start: Callable[[float], Setup[C]],
        create: Callable[[C, float], Awaitable[T | Refused | None]],
        pipe_wait: Callable[[C], PipeWait],
        missing_grace: float | None = None,
    ) -> T:
        """Open ``address`` on ``key``'s shared connection with
        :func:`~npipe.smb.retry.open_with_retries` (``start(timeout)`` sets up a new
        connection; ``create`` and ``pipe_wait`` as there)."""

        async def connect(deadline: float) -> C:
            return await self.connection(key, start, address, deadline)

        with self.opening(key):  # not idle while this opens
            return await open_with_retries(address, credentials, timeout, connect=connect,
                                           create=create, pipe_wait=pipe_wait,
                                           missing_grace=missing_grace)

    @contextlib.contextmanager
    def opening(self, key: Hashable) -> Iterator[None]:
        """An open on ``key``'s connection is in progress: it is not idle meanwhile."""
        with self._lock:
            self._opening[key] = self._opening.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._opening[key] -= 1
                if not self._opening[key]:
                    del self._opening[key]
                self._used[key] = time.monotonic()
            self.schedule_sweep()

    def connections(self) -> list[C]:
        """The connections set up so far (live or dead, not yet replaced)."""
        with self._lock:
            setups = list(self._setups.values())
        return [c for c in map(established, setups) if c is not None]

    def clear(self) -> list[C]:
        """Forget every connection; those set up so far, for the caller to close."""
        with self._lock:
            setups = list(self._setups.values())
            self._setups.clear()
            self._used.clear()
        return [c for c in map(established, setups) if c is not None]

    def schedule_sweep(self) -> None:
        """Look for idle connections in a while, unless a sweep is due already."""
        with self._lock:
            if self._sweeping or not self._setups:
                return
            self._sweeping = True
        self._call_later(ioloop.sweep_interval(), self.sweep)

    def sweep(self) -> None:
        """Close the connections with no pipes that nobody asked for in the idle
        timeout (an open in progress asked); again later while any may become idle."""
        now, limit = time.monotonic(), ioloop.idle_timeout()
        idle = []
        with self._lock:
            for key, setup in list(self._setups.items()):
                connection = established(setup)
                if connection is None:
                    continue
                if connection.busy or self._opening.get(key):
                    self._used[key] = now
                elif now - self._used.get(key, now) >= limit and connection.usable:
                    del self._setups[key]
                    self._used.pop(key, None)
                    idle.append(connection)
            self._sweeping = any(
                not s.done() or ((c := established(s)) is not None and c.alive)
                for s in self._setups.values()
            )
        for connection in idle:
            self._close_idle(connection, limit)
        if self._sweeping:
            self._call_later(ioloop.sweep_interval(), self.sweep)


__all__ = ["ConnectionRegistry", "SharedConnection", "established"]
