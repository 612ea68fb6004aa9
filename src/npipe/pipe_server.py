"""What a running pipe server is, on every platform: :class:`PipeServer`, the type
``npipe.start_server`` returns (served by Unix sockets in npipe.streams, by kernel pipes
in npipe.windows.pipes), and the stream limit both use."""

from __future__ import annotations

import abc
import socket
from pathlib import Path

from npipe.address import PipeAddress

# asyncio's default StreamReader limit; a full buffer pauses reading (backpressure).
DEFAULT_LIMIT = 64 * 1024


class PipeServer(abc.ABC):
    """A running pipe server; close it (or use ``async with``) to give up the name."""

    address: PipeAddress

    @property
    @abc.abstractmethod
    def path(self) -> Path:
        """Where it listens: its socket, or the Windows pipe's path."""

    @property
    @abc.abstractmethod
    def paths(self) -> list[Path]:
        """Everywhere it listens (with ``smb=True`` on Linux, Samba's np/ too)."""

    @property
    @abc.abstractmethod
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets, as ``asyncio.Server.sockets`` (none for a Windows pipe)."""

    @abc.abstractmethod
    def is_serving(self) -> bool:
        """Whether it accepts callers (not closed), as ``asyncio.Server.is_serving``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting and give up the name at once; connections go on."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """After close(): until the connections have ended."""

    @abc.abstractmethod
    async def serve_forever(self) -> None:
        """Until closed; cancelling it closes the server."""

    async def __aenter__(self) -> PipeServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


__all__ = ["DEFAULT_LIMIT", "PipeServer"]
