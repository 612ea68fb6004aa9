"""What smbd answers a CREATE of each pipe with, seen through smbprotocol (an SMB
client other than npipe's): prints one JSON line per name.

    python create_probe.py HOST USER PASSWORD NAME...

``status`` is the CREATE's NTSTATUS; for a pipe that opened, the CREATE response's
AllocationSize, EndofFile and FileAttributes, what a first READ returned (``read``: hex,
or the NTSTATUS it failed with).
"""

from __future__ import annotations

import json
import sys
import uuid

from smbprotocol.connection import Connection
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect


def main(host: str, user: str, password: str, names: list[str]) -> None:
    connection = Connection(uuid.uuid4(), host, 445)
    connection.connect(timeout=10)
    try:
        session = Session(connection, user, password)
        session.connect()
        tree = TreeConnect(session, rf"\\{host}\IPC$")
        tree.connect()
        for name in names:
            print(json.dumps({"name": name, **probe(tree, name)}), flush=True)
    finally:
        connection.disconnect(close=True)


def probe(tree: TreeConnect, name: str) -> dict[str, object]:
    pipe = Open(tree, name)
    try:
        pipe.create(
            ImpersonationLevel.Impersonation,
            FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
            0,
            ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
            CreateDisposition.FILE_OPEN,
            CreateOptions.FILE_NON_DIRECTORY_FILE,
        )
    except SMBResponseException as e:
        return {"status": int(e.status)}
    seen: dict[str, object] = {
        "status": 0, "allocation_size": pipe.allocation_size, "end_of_file": pipe.end_of_file,
        "file_attributes": pipe.file_attributes,
    }
    try:
        seen["read"] = _read(pipe)
    finally:
        pipe.close()
    return seen


def _read(pipe: Open) -> str | int:
    """The data of a READ (hex), or the NTSTATUS it failed with."""
    try:
        return bytes(pipe.read(0, 100)).hex()
    except SMBResponseException as e:
        return int(e.status)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
