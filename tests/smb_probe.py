"""A small SMB client (smbprotocol) for the Samba harness tests: log on, or echo through
a pipe. The tests use it in this process or, as ``python smb_probe.py ...``, inside a
network namespace (npipe.testing.netns).
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

STATUS_SUCCESS = 0


def smb_login(host: str, port: int, user: str, password: str) -> int:
    """Log on and connect to IPC$: 0, or the NTSTATUS that refused it."""
    from smbprotocol.exceptions import SMBResponseException

    try:
        with _ipc(host, port, user, password):
            return STATUS_SUCCESS
    except SMBResponseException as e:
        return int(e.status)


def smb_pipe_echo(
    host: str, port: int, user: str, password: str, pipe: str, data: bytes,
    timeout: float = 10.0,
) -> bytes | int:
    """Open ``pipe`` on IPC$, write ``data``, read as many bytes back; the bytes read, or
    the NTSTATUS with which the open failed."""
    from smbprotocol.exceptions import SMBResponseException
    from smbprotocol.open import (
        CreateDisposition,
        CreateOptions,
        FilePipePrinterAccessMask,
        ImpersonationLevel,
        Open,
        ShareAccess,
    )

    with _ipc(host, port, user, password) as tree:
        handle = Open(tree, pipe)
        try:
            handle.create(
                ImpersonationLevel.Impersonation,
                FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
                0,
                ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
                CreateDisposition.FILE_OPEN,
                CreateOptions.FILE_NON_DIRECTORY_FILE,
            )
        except SMBResponseException as e:
            return int(e.status)
        try:
            handle.write(data, 0)
            got = b""
            deadline = time.monotonic() + timeout
            while len(got) < len(data) and time.monotonic() < deadline:
                got += handle.read(0, len(data) - len(got))
            return got
        finally:
            handle.close()


@contextlib.contextmanager
def _ipc(host: str, port: int, user: str, password: str) -> Iterator[Any]:
    from smbprotocol.connection import Connection
    from smbprotocol.session import Session
    from smbprotocol.tree import TreeConnect

    # SMB 3.1.1 requires a signed TREE_CONNECT: leave require_signing at True.
    connection = Connection(uuid.uuid4(), host, port)
    connection.connect(timeout=10)
    try:
        session = Session(connection, user, password, require_encryption=False)
        session.connect()
        tree = TreeConnect(session, rf"\\{host}\IPC$")
        tree.connect()
        yield tree
    finally:
        connection.disconnect(close=True)


def main(argv: Sequence[str]) -> int:
    """``smb_probe.py login HOST PORT USER PASSWORD`` or ``... echo HOST PORT USER PASSWORD
    PIPE DATA``: prints ``status 0x...`` or ``data HEX``."""
    command, host, port, user, password, *rest = argv
    if command == "login":
        print(f"status {smb_login(host, int(port), user, password):#010x}")
    else:
        pipe, data = rest
        result = smb_pipe_echo(host, int(port), user, password, pipe, data.encode())
        print(f"status {result:#010x}" if isinstance(result, int) else f"data {result.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
