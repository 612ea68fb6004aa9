"""The kernel's word on who is at the other end of a Unix socket.

Linux: SO_PEERCRED (pid, uid, gid) and SO_PEERGROUPS. macOS (and the BSDs):
LOCAL_PEERCRED's ``struct xucred`` (uid and at most 16 groups, the first the effective
gid) and, on macOS, LOCAL_PEERPID. The macOS path is type-checked (mypy --platform
darwin) and run only by the macOS CI job.
"""

from __future__ import annotations

import socket
import struct
import sys

from npipe.identity import Caller

# Linux values; Python's socket module lacks SO_PEERGROUPS (Linux 4.13+).
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")
# <sys/un.h> of macOS: level SOL_LOCAL (0), LOCAL_PEERCRED (1), LOCAL_PEERPID (2).
_SOL_LOCAL = 0
_LOCAL_PEERCRED = getattr(socket, "LOCAL_PEERCRED", 0x001)
_LOCAL_PEERPID = 0x002
# struct xucred: u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]
# (native alignment: two bytes of padding after cr_ngroups; 76 bytes).
_XUCRED = struct.Struct("IIh16I")


def parse_xucred(raw: bytes) -> tuple[int, tuple[int, ...]]:
    """(uid, groups) from a ``struct xucred``; groups[0] is the effective gid."""
    _version, uid, ngroups, *groups = _XUCRED.unpack(raw[: _XUCRED.size].ljust(_XUCRED.size,
                                                                             b"\0"))
    return uid, tuple(groups[: max(0, min(ngroups, len(groups)))])


def _xucred(sock: socket.socket) -> tuple[int, tuple[int, ...]]:
    return parse_xucred(sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED.size))


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected (or listened on) ``sock`` (pid 0
    where the kernel does not say)."""
    if sys.platform.startswith("linux"):
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        return pid, uid, gid
    uid, groups = _xucred(sock)
    pid = 0
    if sys.platform == "darwin":
        pid = struct.unpack("i", sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID, 4))[0]
    return pid, uid, groups[0] if groups else -1


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (empty where the kernel does not say; at most 16
    on macOS and the BSDs, whose xucred holds no more)."""
    if not sys.platform.startswith("linux"):
        try:
            return _xucred(sock)[1]
        except OSError:
            return ()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw)


def peer_caller(sock: socket.socket) -> Caller:
    """The :class:`Caller` at the other end of a local socket."""
    pid, uid, gid = peer_credentials(sock)
    return Caller.local(pid, uid, gid, peer_groups(sock))
