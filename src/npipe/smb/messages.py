"""Message-mode pipes over SMB (npipe.connection.Client to \\\\HOST\\pipe\\NAME)."""

from __future__ import annotations

from typing import Any

from npipe.address import PipeAddress
from npipe.errors import UnsupportedPlatform


def open_message_pipe(addr: PipeAddress, **dial: Any) -> Any:
    raise UnsupportedPlatform(
        f"{addr}: message pipes over SMB are not supported yet (npipe.connection.Client "
        "reaches local message pipes only)")
