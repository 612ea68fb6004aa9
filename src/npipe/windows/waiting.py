"""How a client opens a pipe that is busy or not there yet (the policy, sans I/O).

WaitNamedPipeW (learn.microsoft.com): it waits until an instance is free or the time-out
passes, then fails with ERROR_SEM_TIMEOUT; "If no instances of the specified named pipe
exist, the WaitNamedPipe function returns immediately, regardless of the time-out
value"; and a TRUE return does not reserve the instance: the next CreateFile "may fail
because the instance was closed by the server or opened by another client". Hence a
loop, all of it bounded by one deadline:

- ERROR_PIPE_BUSY: wait with WaitNamedPipe for what is left of the time (in ms, never 0,
  which means the server's default, nor 0xFFFFFFFF, forever), then try again;
- ERROR_FILE_NOT_FOUND: no instance right now (a server between instances, or starting):
  try again with a short back-off for ``missing_grace`` seconds (default 1 s, so that a
  pipe nobody serves fails about as fast as on Linux; None: until the deadline);
- anything else: npipe's error for it, at once;
- at the deadline: npipe's error for the last failure (PipeBusy, PipeNotFound).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from npipe.windows.errors import ERROR_FILE_NOT_FOUND, ERROR_PIPE_BUSY, pipe_error

T = TypeVar("T")

NMPWAIT_USE_DEFAULT_WAIT = 0x0000_0000
NMPWAIT_WAIT_FOREVER = 0xFFFF_FFFF
MAX_WAIT_MS = NMPWAIT_WAIT_FOREVER - 1
FIRST_BACKOFF = 0.01
MAX_BACKOFF = 0.2
DEFAULT_MISSING_GRACE = 1.0


@dataclass(frozen=True)
class Wait:
    """Call WaitNamedPipe with ``ms``, then try to open again."""

    ms: int


@dataclass(frozen=True)
class Sleep:
    """Sleep ``seconds``, then try to open again."""

    seconds: float


class WaitPolicy:
    """The decisions of the loop above, fed the failures; the I/O is the caller's."""

    def __init__(
        self,
        timeout: float,
        *,
        path: str,
        clock: Callable[[], float],
        missing_grace: float | None = DEFAULT_MISSING_GRACE,
    ) -> None:
        if not timeout >= 0:
            raise ValueError(f"timeout must be 0 or more seconds, not {timeout!r}")
        self.path = path
        self.clock = clock
        self.start = clock()
        self.deadline = self.start + timeout
        grace = timeout if missing_grace is None else min(missing_grace, timeout)
        self.missing_deadline = self.start + grace
        self.backoff = FIRST_BACKOFF

    def after_failure(self, exc: OSError) -> Wait | Sleep:
        """What to do after ``try_open`` raised ``exc``; raises npipe's error to give up
        (from ``exc``), or ``exc`` itself if it carries no Windows error code."""
        code = getattr(exc, "winerror", None)
        if not isinstance(code, int):
            raise exc
        now = self.clock()
        if code == ERROR_PIPE_BUSY and now < self.deadline:
            ms = math.ceil((self.deadline - now) * 1000)
            return Wait(min(max(ms, 1), MAX_WAIT_MS))
        if code == ERROR_FILE_NOT_FOUND and now < self.missing_deadline:
            seconds = min(self.backoff, self.missing_deadline - now)
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
            return Sleep(seconds)
        raise pipe_error(code, self.path, opening=True, detail=exc.strerror) from exc

    def after_wait(self, available: bool) -> Sleep | None:
        """After WaitNamedPipe: try again at once if it saw a free instance; if it
        failed early (the pipe went away between the two calls), pause briefly so that
        the loop cannot spin."""
        if available or self.clock() >= self.deadline:
            return None
        seconds = min(self.backoff, max(self.deadline - self.clock(), 0.0))
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        return Sleep(seconds)


def open_with_wait(
    try_open: Callable[[], T],
    wait_named_pipe: Callable[[int], bool],
    timeout: float,
    *,
    path: str = "the pipe",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
    missing_grace: float | None = DEFAULT_MISSING_GRACE,
) -> T:
    """``try_open()`` (raising OSError with ``.winerror``) until it succeeds, by the
    policy above; ``wait_named_pipe(ms)`` is WaitNamedPipeW on the same path (False on
    time-out or failure)."""
    policy = WaitPolicy(timeout, path=path, clock=clock, missing_grace=missing_grace)
    while True:
        try:
            return try_open()
        except OSError as exc:
            step = policy.after_failure(exc)
        if isinstance(step, Wait):
            pause = policy.after_wait(wait_named_pipe(step.ms))
            if pause is not None:
                sleep(pause.seconds)
        else:
            sleep(step.seconds)


async def open_with_wait_async(
    try_open: Callable[[], T],
    wait_named_pipe: Callable[[int], Awaitable[bool]],
    timeout: float,
    *,
    path: str = "the pipe",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    missing_grace: float | None = DEFAULT_MISSING_GRACE,
) -> T:
    """:func:`open_with_wait` for the event loop: ``wait_named_pipe(ms)`` is awaited
    (WaitNamedPipeW blocks: run it in a thread, ``loop.run_in_executor``); the back-off
    sleeps on the loop. ``try_open`` must not block (CreateFileW on a pipe does not)."""
    policy = WaitPolicy(timeout, path=path, clock=clock, missing_grace=missing_grace)
    while True:
        try:
            return try_open()
        except OSError as exc:
            step = policy.after_failure(exc)
        if isinstance(step, Wait):
            pause = policy.after_wait(await wait_named_pipe(step.ms))
            if pause is not None:
                await sleep(pause.seconds)
        else:
            await sleep(step.seconds)
