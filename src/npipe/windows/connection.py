"""npipe.connection on Windows: the stdlib's own AF_PIPE Listener and Client.

CPython's ``multiprocessing.connection`` already speaks message-mode named pipes on
Windows (PIPE_TYPE_MESSAGE | PIPE_READMODE_MESSAGE, one WriteFile per message,
ERROR_MORE_DATA gathered into one message), so npipe hands over to it: npipe's
Connection only adds its API's limits and ``caller`` (the client's token, read from the
accepted pipe as npipe's pipe servers do). The pipes get the stdlib's default security
descriptor (its creator, SYSTEM and Administrators, plus Everyone read on older
Windows), and every accepted caller is checked against the owner-only ACL too; an ACL
other than that default is refused rather than silently widened or ignored (the
stdlib's Listener takes no security descriptor).
``Client(r"\\\\HOST\\pipe\\NAME")`` opens a remote pipe the same way (CreateFile on
the UNC path: Windows' SMB client, with this logon's credentials). Written and
type-checked, never run here.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import sys
from typing import Any

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress
from npipe.errors import ConfigError, MessageTooLarge, UnsupportedPlatform
from npipe.identity import Caller

log = logging.getLogger("npipe.connection")


def pipe_path(addr: PipeAddress) -> str:
    """The pipe's Windows path: ``\\\\.\\pipe\\NAME``, or ``\\\\HOST\\pipe\\NAME`` for a
    remote one (Windows' own SMB client opens it in message mode, with this logon's
    credentials)."""
    host = addr.host if addr.is_remote else "."
    return f"\\\\{host}\\pipe\\{addr.name}"


class StdlibTransport:
    """Whole messages over the stdlib's PipeConnection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def fileno(self) -> int:
        return int(self.conn.fileno())

    def send_message(self, data: memoryview) -> None:
        self.conn.send_bytes(data)

    def recv_message(self, limit: int | None) -> bytes:
        # Not the stdlib's recv_bytes(limit): over the limit it stops mid-message (the
        # rest would be read as the next message) and makes the connection unwritable.
        # The whole message is read and then refused, so the connection goes on.
        data = bytes(self.conn.recv_bytes())
        if limit is not None and len(data) > limit:
            raise MessageTooLarge(f"bad message length: a message of {len(data)} bytes, "
                                  f"over this connection's limit of {limit} bytes")
        return data

    def poll(self, timeout: float | None) -> bool:
        return bool(self.conn.poll(timeout))

    def close(self) -> None:
        self.conn.close()


class WindowsListener:
    """The stdlib's AF_PIPE listener (authkey is run by npipe.connection itself)."""

    def __init__(self, addr: PipeAddress, *, acl: Acl, smb: bool) -> None:
        if acl != OWNER_ONLY:
            raise UnsupportedPlatform("npipe.connection on Windows serves with the "
                                      "stdlib's default security (no acl= yet)")
        if smb:
            raise ConfigError("smb=True is for Samba; Windows serves SMB clients itself")
        self._addr = addr
        self._listener = mpc.Listener(pipe_path(addr), family="AF_PIPE")

    def accept(self) -> tuple[StdlibTransport, Caller | None]:
        if sys.platform != "win32":  # (mypy: the win32 modules' names are Windows' only)
            raise UnsupportedPlatform("the stdlib's AF_PIPE listener is Windows'")
        from npipe.windows import pipes, win32
        from npipe.windows.identity import acl_admits

        owner = win32.current_user_sid()
        while True:
            conn = self._listener.accept()
            try:
                who = pipes.pipe_client_caller(int(conn.fileno()))
            except OSError as e:
                log.warning("pipe %s: could not identify a caller (%s): closed", self._addr, e)
                conn.close()
                continue
            if acl_admits(OWNER_ONLY, who, owner):
                return StdlibTransport(conn), who
            log.warning("refused %s on pipe %s: not allowed by its ACL", who, self._addr)
            conn.close()

    def close(self) -> None:
        self._listener.close()


def windows_client(addr: PipeAddress) -> StdlibTransport:
    return StdlibTransport(mpc.Client(pipe_path(addr), family="AF_PIPE"))
