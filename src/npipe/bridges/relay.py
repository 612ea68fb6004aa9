"""Copy bytes both ways between two stream pairs: the one core of forward, expose, relay.

Backpressure: each direction reads at most CHUNK bytes, writes them and waits for the
writer to drain before it reads again, so a slow receiver stops the reading from the
sender (the reader's own buffer is bounded by its ``limit``, the writer's by the
transport's high-water mark); nothing grows without bound.

End of stream: when one side's reader ends, the other side is half-closed
(``write_eof``) where both can do it, and the other direction goes on. An SMB pipe
cannot (``can_write_eof()`` is False): its end of stream means the whole pipe closed,
and an end of stream *towards* it can only be passed on by closing it; then the whole
connection ends (``keep_reading=True``, as for ``npipe relay``, instead keeps copying
the other way until that side ends too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("npipe.bridges")

CHUNK = 256 * 1024
# The StreamReader limit of a relayed connection: a read gets up to CHUNK of what has
# arrived while the last chunk was written (64 KiB, asyncio's default, halves the chunks
# and doubles the SMB WRITEs and the wake-ups per byte).
RELAY_LIMIT = 2 * CHUNK
# How long closing a side may take (flushing what is left) before it is abandoned.
CLOSE_TIMEOUT = 5.0


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


@dataclass
class Side:
    """One end of a relay: what is read from it, what is written to it, and its name in
    logs ("client", "pipe", ...)."""

    name: str
    reader: ByteReader
    writer: ByteWriter
    # False for a transport whose end of stream means it is gone altogether (a Samba
    # caller's socket, whatever can_write_eof() says).
    half_close: bool = True
    # True: its end of stream ends the relay (passed on first), whatever the other way
    # is doing (``npipe relay`` exits when the pipe's side ends).
    final: bool = False


@dataclass
class RelayStats:
    """What a relay moved: ``a_to_b`` and ``b_to_a`` bytes, for how long, how it ended."""

    a_to_b: int = 0
    b_to_a: int = 0
    started: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    ended: str = "running"

    @property
    def duration(self) -> float:
        """Seconds from the start to the end (to now while it runs)."""
        return (self.ended_at if self.ended_at is not None else time.monotonic()) - self.started


@dataclass
class _Outcome:
    src: Side
    dst: Side
    error: BaseException | None = None
    failed: Side | None = None  # which side the error came from


async def _pump(src: Side, dst: Side, stats: RelayStats, forward: bool) -> _Outcome:
    while True:
        try:
            data = await src.reader.read(CHUNK)
        except Exception as e:  # reset, ConnectionLost: the side is gone
            return _Outcome(src, dst, e, src)
        if not data:
            return _Outcome(src, dst)
        try:
            dst.writer.write(data)
            await dst.writer.drain()
        except Exception as e:
            return _Outcome(src, dst, e, dst)
        if forward:
            stats.a_to_b += len(data)
        else:
            stats.b_to_a += len(data)


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, OSError) and not e.errno else f"{type(e).__name__}: {text}"


def _can_write_eof(side: Side) -> bool:
    if not side.half_close:
        return False
    try:
        return side.writer.can_write_eof()
    except Exception:  # a transport already gone
        return False


async def relay(
    a: Side, b: Side, *, stats: RelayStats | None = None, keep_reading: bool = False
) -> RelayStats:
    """Copy ``a`` -> ``b`` and ``b`` -> ``a`` until both directions end (or one side
    fails or cannot half-close: see the module's docstring); close both sides; return
    the stats (also filled in as it goes, when given, for a caller that is cancelled).
    """
    stats = stats if stats is not None else RelayStats()
    tasks = {
        asyncio.create_task(_pump(a, b, stats, True)),
        asyncio.create_task(_pump(b, a, stats, False)),
    }
    finished: list[str] = []
    try:
        while tasks:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            end = ""
            for task in done:
                out = task.result()
                if out.error is not None:
                    assert out.failed is not None
                    log.debug("%s failed", out.failed.name, exc_info=out.error)
                    end = f"{out.failed.name} lost: {_describe(out.error)}"
                    break
                finished.append(out.src.name)
                # A side that cannot half-close (an SMB pipe) is gone once it ends.
                src_gone = out.src.final or not _can_write_eof(out.src)
                if _can_write_eof(out.dst):
                    try:
                        out.dst.writer.write_eof()
                    except Exception as e:
                        end = f"{out.dst.name} lost: {_describe(e)}"
                    else:
                        end = f"closed by {out.src.name}" if src_gone else ""
                elif not keep_reading:
                    end = f"closed by {out.src.name} ({out.dst.name} has no half-close)"
                elif src_gone:
                    end = f"closed by {out.src.name}"
                if end:
                    break
            if end:
                stats.ended = end
                break
        else:
            stats.ended = f"closed by {' then '.join(finished)}"
    except asyncio.CancelledError:
        stats.ended = "stopped"
        raise
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        stats.ended_at = time.monotonic()
        await asyncio.gather(_close(a.writer), _close(b.writer))
    return stats


async def _close(writer: ByteWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)


__all__ = ["CHUNK", "RELAY_LIMIT", "ByteReader", "ByteWriter", "RelayStats", "Side", "relay"]
