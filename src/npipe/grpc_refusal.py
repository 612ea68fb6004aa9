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
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # h2 is imported when a responder is first made (the front door
    import h2.errors  # imports this module; most of its callers are never refused)

__all__ = [
    "MAX_READ",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "StatusResponder",
    "percent_encode",
]

# gRPC status codes (grpc/doc/statuscodes.md), as numbers: no grpcio needed here.
UNAVAILABLE = 14
PERMISSION_DENIED = 7
UNAUTHENTICATED = 16

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
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
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
        self._conn.send_headers(stream_id, headers, end_stream=True)
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
