"""Speaking for a pipe that cannot be reached: a gRPC status for every call, sans I/O.

grpcio dials only sockets, so npipe stands in front of every pipe that grpcio uses (the
server's front door, the client's bridge). When npipe knows that a connection will not
reach the service (the pipe's ACL refuses the caller, the remote pipe cannot be opened),
closing the socket would leave grpcio with "Socket closed" (UNAVAILABLE). Instead this
module answers the connection's HTTP/2 itself, the way h11 and h2 keep protocols apart
from I/O: feed it what the client sent (:meth:`StatusResponder.receive_data`), send
what it returns.

Every call that arrives gets a *trailers-only* response (``:status 200``,
``content-type: application/grpc``, ``grpc-status``, ``grpc-message``; gRPC's
PROTOCOL-HTTP2.md), and once the calls of a read are answered a GOAWAY says that this
connection takes no more: grpcio opens a new one for later calls, which is answered the
same way. The GOAWAY waits for a call: sent before one (or closing before the server's
SETTINGS), grpcio 1.85 reports "Socket closed" or re-dials at once without backoff
(seen here), and the reason is lost. A status so received is final for the call, also
for one made with ``wait_for_ready=True`` (which waits only for a connection).

So a bridge whose pipe is not there yet does not answer at once: a :class:`CallGate`
holds the connection and reads its first call's HEADERS; npipe's channels mark a
``wait_for_ready`` call (:data:`WAIT_FOR_READY_KEY`), which waits for the pipe, and
what grpcio sent meanwhile is relayed to the pipe once it is there.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # h2 is imported when a responder is first made (the front door
    import h2.errors  # imports this module; most of its callers are never refused)

__all__ = [
    "MAX_BUFFER",
    "MAX_READ",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "WAIT_FOR_READY_KEY",
    "CallGate",
    "StatusResponder",
    "percent_encode",
]

# gRPC status codes (grpc/doc/statuscodes.md), as numbers: no grpcio needed here.
UNAVAILABLE = 14
PERMISSION_DENIED = 7
UNAUTHENTICATED = 16
RESOURCE_EXHAUSTED = 8

# The metadata entry by which npipe's channels mark a call made with wait_for_ready=True
# (grpcio does not say so on the wire): a bridge in front of a pipe not served yet then
# waits for the pipe rather than answer UNAVAILABLE.
WAIT_FOR_READY_KEY = "npipe-wait-for-ready"

# The most a responder reads from a client before it gives up on it: a gRPC client's
# preface, SETTINGS, WINDOW_UPDATE and first HEADERS take a few hundred bytes; what
# follows (the request's DATA) is never needed. 64 KiB is one default HTTP/2 stream
# window (RFC 9113 section 6.9.2), the most a client may send before we grant more.
MAX_READ = 64 * 1024
# What a client's message may be for a header value (grpc-message), after encoding:
# HTTP/2 servers limit a header list to 8-16 KiB (nginx 4-8 KiB lines, Go's 1 MiB
# list); gRPC's C core warns past 8 KiB. A reason is one line: 1 KiB is ample.
MAX_MESSAGE = 1024


def percent_encode(message: str) -> str:
    """``grpc-message``'s encoding: UTF-8, then every byte outside printable ASCII
    (0x20-0x7E) and ``%`` itself as ``%XX`` (gRPC's PROTOCOL-HTTP2.md)."""
    out = []
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def one_line(message: str) -> str:
    """The reason as one line, at most MAX_MESSAGE characters once encoded."""
    line = " ".join(message.split())
    while len(percent_encode(line)) > MAX_MESSAGE:
        line = line[: max(0, len(line) - max(1, len(line) // 8) - 1)] + "\u2026"
    return line


class StatusResponder:
    """The server side of one HTTP/2 connection that answers every gRPC call with
    ``code`` and ``message``; no I/O.

    Send :meth:`data_to_send` at once (the server's preface), then for everything the
    client sends, send what :meth:`receive_data` returns; stop reading once
    :attr:`finished` (the GOAWAY is out: close the connection gently) or after
    MAX_READ bytes.
    """

    def __init__(self, code: int, message: str) -> None:
        self.code = int(code)
        self.message = one_line(message)
        self.answered = 0  # calls answered with the status
        self.bytes_received = 0
        self.finished = False
        import h2.config
        import h2.connection

        self._conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_inbound_headers=False,
        ))
        self._conn.initiate_connection()

    def data_to_send(self) -> bytes:
        return self._conn.data_to_send()

    def receive_data(self, data: bytes) -> bytes:
        """Take bytes the client sent; the bytes to send it in return."""
        if self.finished or not data:
            return b""
        import h2.errors
        import h2.events
        import h2.exceptions

        self.bytes_received += len(data)
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            # Not HTTP/2 (or not well formed): nothing to answer; say so and stop.
            self._goaway(0, b"", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return self._conn.data_to_send()
        last = 0
        reset = {event.stream_id for event in events
                 if isinstance(event, h2.events.StreamReset)}
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                if event.stream_id not in reset:  # (given up by the client: closed)
                    self._answer(event.stream_id)
                last = max(last, event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.finished = True  # the client is done
                return self._conn.data_to_send()
        if last:
            self._goaway(last, b"")
        return self._conn.data_to_send()

    def _answer(self, stream_id: int) -> None:
        import h2.errors
        import h2.exceptions

        headers = [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", str(self.code)),
            ("grpc-message", percent_encode(self.message)),
        ]
        try:
            self._conn.send_headers(stream_id, headers, end_stream=True)
        except h2.exceptions.ProtocolError:
            return  # closed already (a call the client gave up while a bridge waited)
        # The request's rest is not wanted (RFC 9113 section 8.1: a complete response
        # before the request is, then RST_STREAM NO_ERROR).
        # (The client may have ended its side too: the stream is closed already.)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        self.answered += 1

    def _goaway(self, last: int, debug: bytes, error: h2.errors.ErrorCodes | None = None) -> None:
        import h2.errors

        self._conn.close_connection(error_code=error or h2.errors.ErrorCodes.NO_ERROR,
                                    additional_data=debug or None, last_stream_id=last)
        self.finished = True


# --- holding a connection until its pipe is there, sans I/O -----------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An empty SETTINGS frame: the server's preface that promises nothing. grpcio sends a
# call's HEADERS only once the server's SETTINGS came; settings left empty leave
# nothing behind that the real server's own SETTINGS would have to undo.
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# The most a gate holds for the pipe. grpcio may send at most one connection window
# (64 KiB, RFC 9113 section 6.9.2: the gate grants no more) of DATA; HEADERS and the
# rest are small. Past this the gate gives up (RESOURCE_EXHAUSTED).
MAX_BUFFER = 1024 * 1024
_HEADERS, _RST_STREAM, _SETTINGS, _PING, _CONTINUATION = 0x1, 0x3, 0x4, 0x6, 0x9
_ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
# How long past a waiting call's deadline the gate keeps it (see hold_until).
DEADLINE_SLACK = 0.5
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class CallGate:
    """The first moments of a grpcio connection whose pipe is not there yet; no I/O.

    A bridge that cannot open its pipe sends :meth:`data_to_send` (an empty SETTINGS:
    grpcio then sends its calls) and feeds what grpcio sends to :meth:`receive_data`,
    sending back what it returns (PING acknowledgements). The gate reads the frames,
    decodes the calls' HEADERS (:attr:`headers`: the first call's) and keeps what must
    reach the pipe once it is there (:meth:`held`): everything grpcio sent, but the
    acknowledgement of the gate's own SETTINGS and the PINGs it answered itself. Open
    the pipe only :attr:`at_boundary` (no frame half read), and send it :meth:`held`
    first. :meth:`hold_until` says how long the connection's calls may wait. Bounded:
    :attr:`overflow` past MAX_BUFFER bytes, :attr:`malformed` for what is not HTTP/2.
    """

    def __init__(self, limit: int = MAX_BUFFER) -> None:
        self.limit = limit
        self.headers: list[tuple[str, str]] | None = None  # the first call's
        self.malformed = False
        self.overflow = False
        # The calls not given up by grpcio (no RST_STREAM): marked wait_for_ready, and
        # when their deadline passes (the clock of receive_data's ``now``; None: never).
        self.calls: dict[int, tuple[bool, float | None]] = {}
        self._held = bytearray()  # what the pipe will be sent
        self._pending = bytearray()  # a frame (or the preface) not yet complete
        self._preface = False
        self._acked = False  # the gate's SETTINGS acknowledged (the ACK kept back)
        self._block: tuple[int, bytearray] | None = None  # a header block, while it lasts
        self._decoder: Any = None  # HPACK: every block in order (its table is shared)

    def data_to_send(self) -> bytes:
        return EMPTY_SETTINGS

    @property
    def at_boundary(self) -> bool:
        return not self._pending and self._block is None

    @property
    def failed(self) -> bool:
        return self.malformed or self.overflow

    def held(self) -> bytes:
        """What grpcio sent that the pipe is to get (a frame half read included)."""
        return bytes(self._held + self._pending)

    def hold_until(self, grace_until: float) -> float | None:
        """Until when the connection may wait for its pipe: while a call made with
        wait_for_ready=True lives, the latest of their deadlines (None: one has none,
        until grpcio gives it up); else (no call, or only calls that must fail fast)
        ``grace_until``. grpcio multiplexes calls: all of them wait, or none."""
        marked = [deadline for wfr, deadline in self.calls.values() if wfr]
        if not marked:
            return grace_until
        if any(deadline is None for deadline in marked):
            return None
        # A little past the deadline: grpcio ends the call itself (DEADLINE_EXCEEDED,
        # its RST_STREAM), rather than get the gate's answer first.
        return max(d for d in marked if d is not None) + DEADLINE_SLACK

    def receive_data(self, data: bytes, now: float = 0.0) -> bytes:
        """Take bytes grpcio sent (at ``now``, for the calls' deadlines); the bytes to
        send it in return."""
        if self.failed or not data:
            return b""
        if len(self._held) + len(self._pending) + len(data) > self.limit:
            self.overflow = True
            return b""
        self._pending += data
        out = bytearray()
        if not self._preface:
            if len(self._pending) < len(PREFACE):
                if not PREFACE.startswith(self._pending):
                    self.malformed = True
                return b""
            if self._pending[: len(PREFACE)] != PREFACE:
                self.malformed = True
                return b""
            self._held += self._pending[: len(PREFACE)]
            del self._pending[: len(PREFACE)]
            self._preface = True
        while len(self._pending) >= 9 and not self.malformed:
            length = int.from_bytes(self._pending[:3], "big")
            if len(self._pending) < 9 + length:
                break
            frame = bytes(self._pending[: 9 + length])
            del self._pending[: 9 + length]
            kind, flags = frame[3], frame[4]
            stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
            if kind == _SETTINGS and flags & _ACK and not self._acked:
                self._acked = True  # acknowledges the gate's SETTINGS: not the pipe's
                continue
            if kind == _PING and not flags & _ACK and length == 8:
                out += b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + frame[9:]
                continue  # answered here; the pipe's server never sees it
            self._held += frame
            if kind == _RST_STREAM:
                self.calls.pop(stream, None)  # grpcio gave the call up (its deadline...)
            elif kind in (_HEADERS, _CONTINUATION):
                self._read_headers(kind, flags, stream, frame[9:], now)
        return bytes(out)

    def _read_headers(
        self, kind: int, flags: int, stream: int, payload: bytes, now: float
    ) -> None:
        if kind == _HEADERS and self._block is None:
            start, end = 0, len(payload)
            if flags & _PADDED:
                if not payload:
                    self.malformed = True
                    return
                start, end = 1, len(payload) - payload[0]
            if flags & _PRIORITY:
                start += 5
            if end < start:
                self.malformed = True
                return
            self._block = (stream, bytearray(payload[start:end]))
        elif kind == _CONTINUATION and self._block is not None and self._block[0] == stream:
            self._block[1].extend(payload)
        else:
            self.malformed = True  # (RFC 9113 section 6.10: nothing else in a block)
            return
        if not flags & _END_HEADERS:
            return
        import hpack

        block = bytes(self._block[1])
        self._block = None
        if self._decoder is None:
            self._decoder = hpack.Decoder()
        try:
            decoded = self._decoder.decode(block, raw=True)
        except Exception:
            self.malformed = True
            return
        headers = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
                   for k, v in decoded]
        if stream in self.calls or not any(k == ":path" for k, _ in headers):
            return  # trailers (a client's end of stream), not a call
        if self.headers is None:
            self.headers = headers
        wait = _timeout(headers)
        self.calls[stream] = (any(k == WAIT_FOR_READY_KEY for k, _ in headers),
                              None if wait is None else now + wait)

    @property
    def wait_for_ready(self) -> bool:
        """Whether the first call was made with wait_for_ready=True."""
        return any(name == WAIT_FOR_READY_KEY for name, _ in self.headers or ())

    @property
    def timeout(self) -> float | None:
        """The first call's ``grpc-timeout`` in seconds (None: no deadline)."""
        return _timeout(self.headers or [])


def _timeout(headers: list[tuple[str, str]]) -> float | None:
    for name, value in headers:
        if name == "grpc-timeout":
            value = value.strip()
            if 1 < len(value) <= 9 and value[:-1].isdigit() and value[-1] in _UNITS:
                return int(value[:-1]) * _UNITS[value[-1]]
    return None
