"""One open remote pipe as an asyncio transport.

Reading: READs are kept posted so that data the server has is never waiting for the
client to ask. One READ stays posted while the pipe is quiet; every READ that comes back
full (Samba returns at most 65,535 bytes per pipe READ) doubles the number in flight, up
to ``MAX_READS``, and short ones shrink it again. Completions are delivered in the order
the READs were sent. ``pause_reading()`` (a full StreamReader) stops posting new ones.

Request and answer: after a short answer to a write the next READ waits
``QUIET_READ_DELAY`` (after data the server sends unasked it goes out at once). A
write in that moment (the reader asking again, the usual request/response rhythm) goes
out as FSCTL_PIPE_TRANSCEIVE, which writes and returns the answer in one exchange: one
request and one response where a WRITE and a READ take two of each. A server that
refuses TRANSCEIVE (Windows, on byte-mode pipes) gets a WRITE instead, from then on.

Writing: ``write()`` never waits for reads. Data goes out in WRITEs of at most
``max_write`` bytes with up to ``WRITE_WINDOW`` bytes in flight; beyond ``HIGH_WATER``
bytes queued or in flight the protocol is paused (``drain()`` waits).

Closing: ``close()`` sends what is queued, then CANCELs what can never finish by
itself (a TRANSCEIVE still waiting for its answer, the READs posted) and sends CLOSE
(CANCELs and CLOSE in one TCP send). A TRANSCEIVE is not waited for: a server that
answers only once its client has gone would wait for the CLOSE forever, and the client
for the answer. Samba never answers a pipe READ after CLOSE (nor CANCEL), so those are
forgotten, not kept. ``CLOSE_TIMEOUT`` after ``close()`` the pipe ends locally whatever
the server did (WRITEs it never took, a CLOSE it never answered): their late answers,
if any, are dropped. ``abort()`` drops what is queued, cancels what is in flight, sends
CLOSE and ends the pipe at once. The pipe's end (its server closed: PIPE_BROKEN and
friends) is EOF, then ``connection_lost(None)``; a lost connection is
``connection_lost(ConnectionLost)``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable
from typing import Any

from npipe.errors import ConnectionLost
from npipe.smb import status as st
from npipe.smb.native import wire
from npipe.smb.native.connection import SmbConnection
from npipe.smb.native.core import Outgoing, Response

log = logging.getLogger("npipe.smb")

READ_SIZE = 65536
# The READ a quiet pipe keeps posted asks for less: Samba allocates the whole length
# for a pending READ (~67 KB for 64 KiB) and never frees one still pending at CLOSE.
# One that comes back full grows the window of 64 KiB READs as any full READ does.
IDLE_READ_SIZE = 8192
# READs posted on a quiet pipe. One: a second would wait on every idle pipe and be
# left behind at CLOSE (Samba never answers it); two measured no faster for gRPC.
MIN_READS = 1
MAX_READS = 32
MAX_WRITE = 1 << 20
# After a short answer, how long the next READ waits for the reader to write first: a
# write that finds no READ posted goes out as FSCTL_PIPE_TRANSCEIVE, its answer coming
# back in the same exchange (one SMB round trip instead of a WRITE and a READ).
# 0: no wait, the READ goes out on the loop's next turn (a write the reader makes in
# the same turn it is woken still finds the pipe quiet and goes as a TRANSCEIVE).
QUIET_READ_DELAY = 0.001
# Wait so after data the client did not ask for too (no write since the last data):
# off, as measured by bench/server_push.py (docs/benchmarks.md), since the wait would
# delay each message of a server that pushes several within QUIET_READ_DELAY.
QUIET_READ_AFTER_PUSH = False
TRANSCEIVE_OUTPUT = 65536
# Larger writes go as WRITEs: smbd reads a TRANSCEIVE's answer only once its write is
# done, so an echoing server blocked on a full socket would never let it finish.
TRANSCEIVE_MAX_INPUT = 16384
WRITE_WINDOW = 4 << 20
HIGH_WATER = 8 << 20
LOW_WATER = 2 << 20
# The end of the pipe's byte stream: its server closed (a TRANSCEIVE on such a pipe
# answers CONNECTION_DISCONNECTED on Samba).
END_STATUSES = st.EOF_STATUSES | {0xC000020C, 0xC000020D}
# A server that will not TRANSCEIVE on this pipe (Windows, byte-mode pipes).
TRANSCEIVE_REFUSED = {0xC00000AD, 0xC00000BB, 0xC0000010, 0xC000019C}  # PIPE_STATE, ...
# The longest close() takes: after this the pipe ends locally, answered or not.
CLOSE_TIMEOUT = 5.0
# How long the CLOSE may take once a TRANSCEIVE was cancelled for it. Samba 4.17
# ignores the CANCEL and answers the CLOSE only after the TRANSCEIVE, i.e. when the
# pipe's server answers: a server waiting for its client to go never does.
CLOSE_AFTER_CANCEL_TIMEOUT = 0.5


class RemotePipe(asyncio.Transport):
    """An open pipe on a :class:`SmbConnection`; set a protocol with :meth:`set_protocol`."""

    def __init__(
        self, link: SmbConnection, file_id: bytes, name: str, *,
        first_read: EarlyRead | None = None, message_mode: bool = False,
    ) -> None:
        super().__init__()
        # Message mode: the protocol gets each READ's data as a part of a message
        # (``message_part_received(data, last)``), every READ asks for a whole message
        # (Samba ends a short READ with SUCCESS, so only a READ of 64 KiB tells where a
        # message ends), and no TRANSCEIVE (one message out, whatever comes back). The
        # cost: the READ a quiet message pipe keeps posted asks for 64 KiB, which Samba
        # allocates in full and keeps if the pipe closes with it pending (see
        # IDLE_READ_SIZE).
        self.message_mode = message_mode
        self.link = link
        self.file_id = file_id
        self.name = name
        self._protocol: asyncio.BaseProtocol | None = None
        self._loop = asyncio.get_running_loop()
        neg = link.core.negotiated
        assert neg is not None
        self._read_size = min(READ_SIZE, neg.max_read or READ_SIZE)
        self._max_write = max(1, min(MAX_WRITE, neg.max_write or MAX_WRITE))
        if not neg.large_mtu:
            self._read_size = min(self._read_size, 65536)
            self._max_write = min(self._max_write, 65536)
        self._read_body = wire.read_request(file_id, self._read_size)
        self._idle_read_size = self._read_size if message_mode else min(IDLE_READ_SIZE,
                                                                        self._read_size)
        self._idle_read_body = wire.read_request(file_id, self._idle_read_size)
        self._read_sizes: dict[int, int] = {}  # READ key -> the length it asked for
        self._reads: collections.deque[int] = collections.deque()  # READs in flight, in order
        self._results: dict[int, Response | BaseException] = {}
        self._read_ids: dict[int, int] = {}  # READ key -> message id, once sent
        self._window = MIN_READS
        self._reading_paused = False
        self._eof = False  # the server's end closed
        self._writes: collections.deque[bytes | memoryview] = collections.deque()
        self._queued = 0  # bytes in self._writes
        self._in_flight = 0  # bytes in WRITEs not yet answered
        self._writing_paused = False
        self._closing = False
        self._closed = False
        self._close_sent = False
        self._read_seq = 0
        self._reads_due = False
        self._read_timer: asyncio.TimerHandle | None = None
        self._asked = False  # written to since data last came: what comes is an answer
        self._transceives: dict[int, int] = {}  # key -> bytes written, of TRANSCEIVEs
        self._answered: set[int] = set()  # keys of TRANSCEIVEs answered, not yet delivered
        self._write_seq = 0
        self._write_ids: dict[int, int] = {}  # WRITE key -> message id, until answered
        self._close_timer: asyncio.TimerHandle | None = None
        self._close_id: int | None = None  # the CLOSE's message id, until answered
        self._first_read = first_read
        if first_read is not None and first_read.message_id is not None:
            # The READ sent with the CREATE: the first in flight.
            self._read_seq = 1
            self._reads.append(-1)
            self._read_ids[-1] = first_read.message_id
            self._read_sizes[-1] = self._idle_read_size
        link.pipes.add(self)

    # --- asyncio.Transport ----------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self.link.host, self.link.port)
        if name == "pipe":
            return self.name
        if name == "smb_dialect":
            neg = self.link.core.negotiated
            return neg.dialect_name if neg else default
        if name == "smb_security":
            return self.link.security
        return default

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return not self._reading_paused

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._post_reads()

    def get_write_buffer_size(self) -> int:
        return self._queued + self._in_flight

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (LOW_WATER, HIGH_WATER)

    def can_write_eof(self) -> bool:
        return False  # pipes have no half-close

    def write_eof(self) -> None:
        self.close()

    def start(self) -> None:
        """Begin reading (once the protocol is set)."""
        self._protocol.connection_made(self)  # type: ignore[union-attr]
        first, self._first_read = self._first_read, None
        if first is not None and self._reads and self._reads[0] == -1:
            first.attach(self._first_read_done)
        self._post_reads()

    def _first_read_done(self, result: Response | BaseException) -> None:
        self._read_ids.pop(-1, None)
        self._read_done(-1, result)

    # --- reading --------------------------------------------------------------------

    def _post_reads(self) -> None:
        self._reads_due = False
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        link = self.link
        wanted = self._window - len(self._reads)
        if (wanted <= 0 or self._reading_paused or self._eof or self._closing
                or link.error is not None):
            return
        link.cork()  # several READs: one TCP send
        try:
            idle = self._window <= MIN_READS
            for _ in range(wanted):
                # The message id is known only when the request is built (maybe later,
                # when credits come back): a sequence number stands in for it until then.
                self._read_seq += 1
                key = -self._read_seq
                self._reads.append(key)
                self._read_sizes[key] = self._idle_read_size if idle else self._read_size
                slot = _ReadSlot(self, key, self._idle_read_body if idle else self._read_body)
                link.submit(slot.build, 1, slot.done)
        finally:
            link.uncork()

    def _read_done(self, key: int, result: Response | BaseException) -> None:
        reads = self._reads
        if reads and reads[0] == key and not self._results:
            reads.popleft()  # the usual case: answers come in the order asked
            self._deliver(result, self._read_sizes.pop(key, READ_SIZE), key)
            if self._closed:
                return
        else:
            self._results[key] = result
        while reads and reads[0] in self._results:
            first = reads.popleft()
            self._deliver(self._results.pop(first), self._read_sizes.pop(first, READ_SIZE),
                          first)
            if self._closed:
                return
        if self._reads_due:
            return
        self._reads_due = True
        asked, self._asked = self._asked, False
        if (QUIET_READ_DELAY > 0 and (asked or QUIET_READ_AFTER_PUSH)
                and self._window <= MIN_READS and not self._reads
                and self.link.transceive_ok and not self._in_flight):
            # A quiet request/response pipe, this the answer to a write: give the reader
            # a moment to ask again (a TRANSCEIVE then), then post a READ for whatever
            # else the server sends. Data nobody asked for (the server pushing) gets
            # the next READ at once.
            self._read_timer = self._loop.call_later(QUIET_READ_DELAY, self._post_reads)
        else:
            # The next READ goes out a moment later, so that a WRITE the reader makes in
            # answer to this data can leave in the same TCP send, after it.
            self._loop.call_soon(self._post_reads)

    def _deliver(self, result: Response | BaseException, asked: int, key: int) -> None:
        if self._eof or self._closed:
            return
        if isinstance(result, BaseException):
            self._lost(result)
            return
        status = result.status
        if status in (wire.STATUS_SUCCESS, wire.STATUS_BUFFER_OVERFLOW):
            try:
                if key in self._answered:
                    self._answered.discard(key)
                    data = wire.parse_ioctl(result.message)
                    if status == wire.STATUS_BUFFER_OVERFLOW:
                        asked = len(data)  # more waits: read on as after a full READ
                else:
                    data = wire.parse_read(result.message)
            except wire.ProtocolError as exc:
                self.link.abort(ConnectionLost(f"the SMB server sent a bad READ response: {exc}"))
                return
            if len(data) >= asked - 1:  # full (Samba gives 65,535 for 65,536)
                self._window = min(self._window * 2, MAX_READS)
                # More is on its way: ask for it before handing this on, so that the next
                # READ's round trip overlaps the protocol's work on this data (a loop
                # turn later cost ~75 us per 64 KiB echo, measured).
                self._post_reads()
            elif self._window > MIN_READS:
                self._window -= 1
            if self.message_mode:
                # One READ, one message or part of one: BUFFER_OVERFLOW (Windows) says
                # more of it follows; SUCCESS ends it (Samba: always, one message a READ).
                last = status == wire.STATUS_SUCCESS
                self._protocol.message_part_received(data, last)  # type: ignore[union-attr]
            elif data:
                self._protocol.data_received(data)  # type: ignore[union-attr]
            return
        if status in END_STATUSES:
            log.debug("pipe %s: end of stream (%#010x)", self.name, status)
            self._end_of_stream()
            return
        self._lost(ConnectionLost(f"reading pipe {self.name} failed: NTSTATUS {status:#010x}"))

    def _end_of_stream(self) -> None:
        self._eof = True
        self._protocol.eof_received()  # type: ignore[union-attr]  # pipes have no half-close: the pipe is done either way
        self._discard_reads()
        self.close()

    # --- writing ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._closed:
            return  # like a closed socket transport: dropped
        if not data:
            return
        if isinstance(data, bytearray):
            data = bytes(data)
        self._asked = True
        link = self.link
        if (self._reads_due and not self._reads and not self._writes and not self._in_flight
                and link.transceive_ok and not self.message_mode and self._window <= MIN_READS
                and not self._reading_paused
                and not self._eof and len(data) <= TRANSCEIVE_MAX_INPUT and link.error is None):
            self._transceive(data)
            return
        self._writes.append(data)
        self._queued += len(data)
        link.cork()
        try:
            if self._reads_due:
                self._post_reads()  # ahead of the WRITE: posted before its answer comes
            self._send_writes()
        finally:
            link.uncork()
        self._check_high_water()

    def _transceive(self, data: bytes | memoryview) -> None:
        """Write ``data`` and read the answer in one FSCTL_PIPE_TRANSCEIVE: it stands
        in the queue of READs (its answer comes first) and counts as a write in flight."""
        self._reads_due = False
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        link = self.link
        self._read_seq += 1
        key = -self._read_seq
        size = len(data)
        self._reads.append(key)
        self._read_sizes[key] = TRANSCEIVE_OUTPUT
        self._transceives[key] = size
        self._in_flight += size
        body = wire.ioctl_request(wire.FSCTL_PIPE_TRANSCEIVE, self.file_id, bytes(data),
                                  TRANSCEIVE_OUTPUT)
        slot = _ReadSlot(self, key, body, wire.IOCTL, max(size, TRANSCEIVE_OUTPUT))
        link.submit(slot.build, link.core.charge(max(size, TRANSCEIVE_OUTPUT)),
                    functools.partial(self._transceive_done, key, data))

    def _transceive_done(
        self, key: int, data: bytes | memoryview, result: Response | BaseException
    ) -> None:
        self._read_ids.pop(key, None)
        if key not in self._transceives:
            return  # given up on at close (its bytes no longer count as in flight)
        size = self._transceives.pop(key)
        if (isinstance(result, Response) and result.status in TRANSCEIVE_REFUSED
                and self.link.transceive_ok):
            # The server will not (Windows: byte-mode pipes): nothing was written. Send
            # it as a WRITE and read as usual, from now on on this connection.
            log.debug("pipe %s: no FSCTL_PIPE_TRANSCEIVE (%#010x)", self.name, result.status)
            self.link.transceive_ok = False
            self._read_sizes.pop(key, None)
            if key in self._reads:
                self._reads.remove(key)
            self._in_flight -= size
            self._writes.appendleft(data)
            self._queued += size
            self._post_reads()
            self._send_writes()
            return
        self._in_flight -= size
        self._answered.add(key)
        self._read_done(key, result)
        if self._closed:
            return
        if self._writing_paused and self.get_write_buffer_size() <= LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()  # type: ignore[union-attr]
        if self._closing and not self._writes_pending():
            self._send_close()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _send_writes(self) -> None:
        link = self.link
        core = link.core
        while self._writes and self._in_flight < WRITE_WINDOW and link.error is None:
            data = self._writes.popleft()
            if len(data) > self._max_write:
                view = memoryview(data)
                self._writes.appendleft(view[self._max_write:])
                data = view[: self._max_write]
            size = len(data)
            self._queued -= size
            self._in_flight += size
            self._write_seq += 1
            head = wire.write_request_head(self.file_id, size)
            link.submit(
                functools.partial(self._build_write, self._write_seq, head, size, data),
                core.charge(size),
                functools.partial(self._write_done, self._write_seq, size),
            )

    def _build_write(self, key: int, head: bytes, size: int, data: bytes | memoryview
                     ) -> Outgoing:
        out = self.link.core.request(wire.WRITE, head, payload=size, data=data)
        self._write_ids[key] = out.message_id
        return out

    def _writes_pending(self) -> bool:
        """WRITEs queued or unanswered (a TRANSCEIVE's bytes do not count: close()
        does not wait for its answer)."""
        return bool(self._writes) or self._in_flight > sum(self._transceives.values())

    def _write_done(self, key: int, size: int, result: Response | BaseException) -> None:
        if self._write_ids.pop(key, None) is None and self._closed:
            return  # given up on when the pipe ended
        self._in_flight -= size
        if self._closed:
            return
        if isinstance(result, BaseException):
            self._lost(result)
            return
        if result.status != wire.STATUS_SUCCESS:
            if result.status in END_STATUSES:
                log.debug("pipe %s: closed by its server while writing", self.name)
                if not self._eof:
                    self._end_of_stream()
                return
            self._lost(ConnectionLost(
                f"writing pipe {self.name} failed: NTSTATUS {result.status:#010x}"
            ))
            return
        self._send_writes()
        if self._writing_paused and self.get_write_buffer_size() <= LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()  # type: ignore[union-attr]
        if self._closing and not self._writes_pending():
            self._send_close()

    def _check_high_water(self) -> None:
        if not self._writing_paused and self.get_write_buffer_size() > HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()  # type: ignore[union-attr]

    # --- closing ------------------------------------------------------------------

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if not self._closed:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._close_expired)
        if not self._writes_pending():
            self._send_close()

    def abort(self) -> None:
        self._writes.clear()
        self._queued = 0
        self._closing = True
        self._give_up_writes()
        self._send_close()
        self._finish(None)

    def _close_expired(self) -> None:
        """CLOSE_TIMEOUT after close(): end the pipe here, whatever the server does."""
        self._close_timer = None
        if self._closed:
            return
        log.debug("pipe %s: not closed after %g s; ending it locally", self.name, CLOSE_TIMEOUT)
        self._writes.clear()
        self._queued = 0
        self._give_up_writes()
        self._send_close()
        # Something of this pipe never finished (a TRANSCEIVE its server does not answer,
        # WRITEs it does not take, so a CLOSE behind them): Samba keeps the pipe, and its
        # server's end, until the SMB connection ends. A process that exits ends it; a
        # shared, long-lived one (the redirector's) must end it too, once its other
        # pipes are done, with a reset (Samba answers no LOGOFF then either).
        self.link.stuck = True
        self.link.retire(f"pipe {self.name} did not close in time, so the server "
                         "keeps it open until this connection ends")
        self._finish(None)

    def _give_up_writes(self) -> None:
        """Cancel and forget the WRITEs in flight (a server that does not take them)."""
        link = self.link
        link.cork()
        try:
            for mid in self._write_ids.values():
                link.cancel(mid)
                link.forget(mid)
        finally:
            link.uncork()
        self._write_ids.clear()
        self._in_flight = sum(self._transceives.values())

    def _discard_reads(self) -> None:
        """Cancel and forget the READs and TRANSCEIVEs in flight (see the module
        docstring)."""
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        link = self.link
        left = 0
        link.cork()  # the CANCELs, and the CLOSE after them, in one send
        try:
            for key in self._reads:
                mid = self._read_ids.pop(key, None)
                if mid is not None:
                    link.cancel(mid)
                    link.forget(mid)
                    left += 1
        finally:
            link.uncork()
        if left:
            link.abandoned(left)
        self._in_flight -= sum(self._transceives.values())
        self._transceives.clear()
        self._answered.clear()
        self._reads.clear()
        self._results.clear()
        self._read_sizes.clear()

    def _send_close(self) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        link = self.link
        stuck = bool(self._transceives)
        link.cork()
        try:
            self._discard_reads()
            if link.error is not None:
                self._finish(None)
                return
            link.submit(self._build_close, 1, self._close_done)
        finally:
            link.uncork()
        if stuck and self._close_timer is not None and not self._closed:
            log.debug("pipe %s: closed with a TRANSCEIVE unanswered", self.name)
            self._close_timer.cancel()
            self._close_timer = self._loop.call_later(
                min(CLOSE_AFTER_CANCEL_TIMEOUT, CLOSE_TIMEOUT), self._close_expired)

    def _build_close(self) -> Outgoing:
        out = self.link.core.request(wire.CLOSE, wire.close_request(self.file_id))
        self._close_id = out.message_id
        return out

    def _close_done(self, result: Response | BaseException) -> None:
        self._close_id = None
        if isinstance(result, BaseException):
            log.debug("pipe %s: CLOSE failed: %s", self.name, result)
        elif result.status != wire.STATUS_SUCCESS:
            log.debug("pipe %s: CLOSE answered %#010x", self.name, result.status)
        self._finish(None)

    def link_lost(self, error: BaseException) -> None:
        """The connection died: the pipe fails with ``error``."""
        self._lost(error)

    def _lost(self, error: BaseException) -> None:
        if self._closed:
            return
        self._closing = True
        self._close_sent = True
        self._writes.clear()
        self._discard_reads()
        lost = error if isinstance(error, ConnectionLost) else ConnectionLost(
            f"pipe {self.name}: {error}"
        )
        self._finish(lost)

    def _finish(self, error: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._close_id is not None:
            self.link.forget(self._close_id)  # a CLOSE not answered in time
            self._close_id = None
        if self._write_ids:
            self._give_up_writes()
        self.link.pipes.discard(self)
        self.link.release()
        protocol = self._protocol
        if protocol is not None:
            self._loop.call_soon(protocol.connection_lost, error)


class EarlyRead:
    """The READ compounded with a pipe's CREATE: holds its answer until the pipe starts."""

    __slots__ = ("_callback", "_result", "message_id")

    def __init__(self) -> None:
        self.message_id: int | None = None
        self._result: Response | BaseException | None = None
        self._callback: Callable[[Response | BaseException], None] | None = None

    def done(self, result: Response | BaseException) -> None:
        if self._callback is not None:
            self._callback(result)
        else:
            self._result = result

    def attach(self, callback: Callable[[Response | BaseException], None]) -> None:
        self._callback = callback
        if self._result is not None:
            result, self._result = self._result, None
            callback(result)


class _ReadSlot:
    """Ties a posted READ to its pipe: its message id once built, its completion."""

    __slots__ = ("body", "command", "key", "payload", "pipe")

    def __init__(self, pipe: RemotePipe, key: int, body: bytes, command: int = wire.READ,
                 payload: int = 0) -> None:
        self.pipe = pipe
        self.key = key
        self.body = body
        self.command = command
        self.payload = payload

    def build(self) -> Outgoing:
        pipe = self.pipe
        out = pipe.link.core.request(self.command, self.body, payload=self.payload)
        pipe._read_ids[self.key] = out.message_id
        return out

    def done(self, result: Response | BaseException) -> None:
        self.pipe._read_ids.pop(self.key, None)
        self.pipe._read_done(self.key, result)
