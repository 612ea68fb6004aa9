"""npipe.connection on Windows: the stdlib's own AF_PIPE Listener and Client.

CPython's ``multiprocessing.connection`` already speaks message-mode named pipes on
Windows (PIPE_TYPE_MESSAGE | PIPE_READMODE_MESSAGE, one WriteFile per message,
ERROR_MORE_DATA gathered into one message), so npipe hands over to it: npipe's
Connection only adds its API's limits and ``caller`` (None here: the stdlib does not
say who connected). The pipes get the stdlib's default security descriptor (its
creator, SYSTEM and Administrators, plus Everyone read on older Windows); an ACL other
than the owner-only default is refused rather than silently widened or ignored.
``Client(r"\\\\HOST\\pipe\\NAME")`` opens a remote pipe the same way (CreateFile on
the UNC path: Windows' SMB client, with this logon's credentials). Written and
type-checked, never run here.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
from typing import Any

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress
from npipe.errors import ConfigError, MessageTooLarge, UnsupportedPlatform
from npipe.identity import Caller


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
        try:
            data = self.conn.recv_bytes(limit)
        except OSError as e:
            if "bad message length" in str(e):
                raise MessageTooLarge(f"bad message length: a message over this "
                                      f"connection's limit of {limit} bytes") from e
            raise
        return bytes(data)

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
        self._listener = mpc.Listener(pipe_path(addr), family="AF_PIPE")

    def accept(self) -> tuple[StdlibTransport, Caller | None]:
        return StdlibTransport(self._listener.accept()), None

    def close(self) -> None:
        self._listener.close()


def windows_client(addr: PipeAddress) -> StdlibTransport:
    return StdlibTransport(mpc.Client(pipe_path(addr), family="AF_PIPE"))
