"""Small helpers for sockets that every layer uses."""

from __future__ import annotations

import contextlib
import socket


def close_gently(sock: socket.socket) -> None:
    """Close a connection so that its peer reads end of stream, not ECONNRESET.

    Linux resets a Unix (or TCP) connection closed with unread data in its receive
    queue; what the peer sent first (grpcio's preface) is read and dropped here.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        for _ in range(64):
            if not sock.recv(65536):
                break
    sock.close()
