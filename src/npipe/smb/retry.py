"""How opening a remote pipe retries, the same for every backend.

A busy pipe is tried again (after FSCTL_PIPE_WAIT where the server has it, else after a
doubling pause) until the deadline; a missing one, or one whose socket nobody listens
on (a dead server's), only for ``MISSING_GRACE`` (1 s, as npipe.windows waits for a
missing local pipe: its server may be between instances or restarting), then
PipeNotFound, rather than the whole timeout for a name nobody serves; a session that
went away is replaced at most twice; a CREATE not answered in time retires its
connection and ends the open with PipeBusy; anything else ends the open with the npipe
error for its status.
:func:`open_with_retries` drives that loop over a backend's connections and CREATEs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol, TypeVar

from npipe.address import PipeAddress
from npipe.errors import ConnectionLost, NpipeError, PipeBusy
from npipe.smb import status as st
from npipe.smb.credentials import Credentials

RETRY_FIRST = 0.05
RETRY_MAX = 1.0
# A CREATE of a missing pipe takes ~75 ms on Samba: the last attempt may end a little
# after the deadline rather than be cut short.
CREATE_MIN_TIMEOUT = 2.0
MAX_RECONNECTS = 2
# How long a missing pipe, or one without a server, is tried again (at most the timeout).
MISSING_GRACE = 1.0

PipeWait = Callable[[float], Awaitable[int | None]]


class OpenRetry:
    """The retry state of one open of ``address`` that must end within ``timeout``."""

    def __init__(
        self,
        address: PipeAddress,
        credentials: Credentials,
        timeout: float,
        missing_grace: float | None = None,
    ) -> None:
        self.address = address
        self.credentials = credentials
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        start = self._loop.time()
        self.deadline = start + timeout
        grace = MISSING_GRACE if missing_grace is None else missing_grace
        self.grace = min(grace, timeout)
        self.missing_deadline = start + self.grace
        self._delay = RETRY_FIRST
        self._reconnects = 0
        self._last_status = st.STATUS_OBJECT_NAME_NOT_FOUND

    def create_timeout(self) -> float:
        """How long the next CREATE may take."""
        return max(self.deadline - self._loop.time(), CREATE_MIN_TIMEOUT)

    def stuck(self, create_timeout: float) -> PipeBusy:
        """The error for a CREATE that was not answered in time."""
        return PipeBusy(
            f"pipe {self.address} did not answer within {create_timeout:g} s (its server "
            "accepted the connection but did not complete the handshake)"
        )

    @staticmethod
    def connection_gone(status: int | None, alive: bool) -> bool:
        """Whether a CREATE that failed with ``status`` calls for a new connection."""
        return status not in st.RETRY_STATUSES and (
            status in st.CONNECTION_GONE_STATUSES or not alive
        )

    def reconnect(self, where: str, detail: str) -> None:
        """Count a replaced connection; ConnectionLost once it keeps happening."""
        self._reconnects += 1
        if self._reconnects > MAX_RECONNECTS or self._loop.time() >= self.deadline:
            raise ConnectionLost(f"the SMB connection to {where} keeps failing: {detail}")

    async def wait(self, status: int | None, detail: str, pipe_wait: PipeWait | None) -> None:
        """After a CREATE refused with ``status``: raise its error if waiting cannot
        help, or the final PipeNotFound / PipeBusy once the deadline (for a missing pipe
        or one without a server: the grace) has passed; else
        wait (FSCTL_PIPE_WAIT with ``pipe_wait``, then a pause) and return to try again."""
        if status is None or status not in st.RETRY_STATUSES:
            raise st.create_error(status, self.address, self.credentials, detail)
        self._last_status = status
        # Busy: until the deadline. Missing or without a server: only for the grace.
        until = self.deadline if self._kind == st.BUSY else self.missing_deadline
        remaining = until - self._loop.time()
        if remaining <= 0:
            raise self._gave_up()
        if pipe_wait is not None and await pipe_wait(remaining) == st.STATUS_SUCCESS:
            return
        remaining = until - self._loop.time()
        if remaining <= 0:
            raise self._gave_up()
        await asyncio.sleep(min(self._delay, remaining))
        self._delay = min(self._delay * 2, RETRY_MAX)

    @property
    def _kind(self) -> str:
        return st.RETRY_STATUSES[self._last_status]

    def _gave_up(self) -> NpipeError:
        kind = self._kind
        tried = self.timeout if kind == st.BUSY else self.grace
        return st.gave_up_error(kind, self.address, tried)


class Refused(NamedTuple):
    """A CREATE that failed: its NTSTATUS (None without one), the detail for the errors,
    ``short`` for the log line that retires a connection (default: ``detail``), and the
    error to raise as is when waiting cannot help (else one is made from the status)."""

    status: int | None
    detail: str
    short: str | None = None
    error: BaseException | None = None


class Retryable(Protocol):
    """What :func:`open_with_retries` asks of a connection."""

    @property
    def where(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    @property
    def pipe_wait(self) -> bool:
        """Whether to ask FSCTL_PIPE_WAIT (until the server says it cannot)."""
        ...

    def retire(self, why: str) -> None: ...


C = TypeVar("C", bound=Retryable)
T = TypeVar("T")


async def open_with_retries(
    address: PipeAddress,
    credentials: Credentials,
    timeout: float,
    *,
    connect: Callable[[float], Awaitable[C]],
    create: Callable[[C, float], Awaitable[T | Refused | None]],
    pipe_wait: Callable[[C], PipeWait],
    missing_grace: float | None = None,
) -> T:
    """Open the pipe, retrying a busy one until ``timeout``, a missing one (or one
    without a server) for ``missing_grace`` seconds (default MISSING_GRACE; 0 looks once).

    ``connect(deadline)``: the shared connection to use, by the loop's time ``deadline``;
    ``create(connection, timeout)``: one CREATE, whose result is the open pipe, a
    :class:`Refused`, or None if it was not answered in time; ``pipe_wait(connection)``:
    FSCTL_PIPE_WAIT for the pipe there (asked while ``connection.pipe_wait``)."""
    retry = OpenRetry(address, credentials, timeout, missing_grace)
    while True:
        connection = await connect(retry.deadline)
        create_timeout = retry.create_timeout()
        result = await create(connection, create_timeout)
        if result is None:
            connection.retire("a CREATE was not answered (the pipe's server may be stuck)")
            raise retry.stuck(create_timeout)
        if not isinstance(result, Refused):
            return result
        if retry.connection_gone(result.status, connection.alive):
            connection.retire(f"the session is gone ({result.short or result.detail})")
            retry.reconnect(connection.where, result.detail)
            continue
        if result.error is not None:
            raise result.error
        waiter = pipe_wait(connection) if connection.pipe_wait else None
        await retry.wait(result.status, result.detail, waiter)
