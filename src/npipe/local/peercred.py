"""The kernel's word on who is at the other end of a Unix socket (Linux SO_PEERCRED)."""

from __future__ import annotations

import socket
import struct
import sys

from npipe.identity import Caller

# Linux values; Python's socket module lacks SO_PEERGROUPS (Linux 4.13+).
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected (or listened on) ``sock``."""
    if sys.platform.startswith("linux"):
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        return pid, uid, gid
    # BSDs and macOS: no pid, but getpeereid-like LOCAL_PEERCRED (struct xucred).
    local_peercred = getattr(socket, "LOCAL_PEERCRED", 0x001)
    raw = sock.getsockopt(0, local_peercred, 76)
    _version, uid, _ngroups, gid = struct.unpack_from("IIhI", raw)
    return 0, uid, gid


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (empty where the kernel does not say)."""
    if not sys.platform.startswith("linux"):
        return ()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw)


def peer_caller(sock: socket.socket) -> Caller:
    pid, uid, gid = peer_credentials(sock)
    return Caller.local(pid, uid, gid, peer_groups(sock))
