"""``expose``: serve a pipe; each caller (admitted by the ACL) is relayed to a TCP or
Unix socket target, with one log line naming the caller."""

from __future__ import annotations

import asyncio
import logging
import os

import npipe
from npipe.acl import OWNER_ONLY, Acl
from npipe.bridges.endpoint import Endpoint
from npipe.bridges.relay import RELAY_LIMIT, RelayStats, Side, relay
from npipe.bridges.sockets import Connections, connect
from npipe.pipe_server import PipeServer

log = logging.getLogger("npipe.bridges")


class Expose:
    """A pipe being served; each caller is relayed to ``target``."""

    def __init__(self, name: str, target: Endpoint, connect_timeout: float, limit: int) -> None:
        self.name = name
        self.target = target
        self._timeout = connect_timeout
        self._limit = limit
        self._connections = Connections()
        self.server: PipeServer | None = None

    @property
    def connections(self) -> int:
        """Callers being relayed now."""
        return len(self._connections)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.track()
        who = npipe.caller(writer)
        try:
            target_reader, target_writer = await connect(
                self.target, timeout=self._timeout, limit=self._limit
            )
        except Exception as e:
            log.warning("caller %s on pipe %s: cannot reach %s; caller's connection closed",
                        who, self.name, e)
            return  # npipe closes the caller's side
        stats = RelayStats()
        # Samba hands over one socket per SMB open: its end of stream is the client's
        # close, and the client cannot see a half-close from us either.
        smb = who is not None and who.transport == "smb"
        try:
            await relay(Side("caller", reader, writer, half_close=not smb),
                        Side("target", target_reader, target_writer), stats=stats)
        finally:
            log.info("caller %s on pipe %s -> %s: %d B to target, %d B from target, "
                     "%.3f s, %s", who, self.name, self.target, stats.a_to_b, stats.b_to_a,
                     stats.duration, stats.ended)

    async def close(self, grace: float = 5.0) -> None:
        """Give up the pipe name, give open connections ``grace`` seconds, then end them."""
        if self.server is not None:
            self.server.close()
        await self._connections.finish(grace)
        if self.server is not None:
            await asyncio.wait([asyncio.ensure_future(self.server.wait_closed())],
                               timeout=grace)


async def start_expose(
    name: str,
    target: Endpoint,
    *,
    acl: Acl = OWNER_ONLY,
    smb: bool = False,
    dotnet: bool = False,
    max_connections: int | None = None,
    pipe_dir: str | os.PathLike[str] | None = None,
    connect_timeout: float = 10.0,
    limit: int = RELAY_LIMIT,
) -> Expose:
    """Serve pipe ``name`` (npipe.start_server: the ACL is applied before a caller is
    relayed) and relay each caller to a new connection to ``target``."""
    expose = Expose(name, target, connect_timeout, limit)
    expose.server = await npipe.start_server(
        expose._serve, name, acl=acl, pipe_dir=pipe_dir, dotnet=dotnet, smb=smb, limit=limit,
        max_connections=max_connections,
    )
    return expose


__all__ = ["Expose", "start_expose"]
