"""``forward``: listen on TCP or a Unix socket; each connection gets its own pipe instance.

Every accepted connection opens the pipe anew (``npipe.open_connection``: a local pipe,
or a remote one over SMB, where each open is a new instance, as each CreateFile is on
Windows) and is relayed to it. A pipe that cannot be opened closes that one connection,
with one line in the log; the forwarder goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import npipe
from npipe.address import PipeAddress, parse_address
from npipe.bridges.endpoint import Endpoint
from npipe.bridges.relay import RELAY_LIMIT, RelayStats, Side, relay
from npipe.bridges.sockets import DEFAULT_UNIX_MODE, Connections, Listener, listen, peer_name
from npipe.errors import ConfigError, NpipeError
from npipe.frontdoor import ConnectionSlots, check_max_connections

log = logging.getLogger("npipe.bridges")


class Forward:
    """A running forwarder; ``endpoint`` is where it listens (with the kernel's port)."""

    def __init__(self, address: PipeAddress, dial: dict[str, Any], limit: int,
                 max_connections: int) -> None:
        self.address = address
        self._dial = dial
        self._limit = limit
        self.slots = ConnectionSlots(max_connections, address, log)
        self._connections = Connections()
        self._listener: Listener | None = None

    @property
    def endpoint(self) -> Endpoint:
        """Where it listens (with ``tcp:HOST:0``, the port the kernel picked)."""
        assert self._listener is not None
        return self._listener.endpoint

    @property
    def connections(self) -> int:
        """Connections being relayed now."""
        return len(self._connections)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.track()
        peer = peer_name(writer)
        try:
            pipe_reader, pipe_writer = await npipe.open_connection(
                self.address, limit=self._limit, **self._dial
            )
        except Exception as e:
            log.warning("%s: cannot open pipe %s: %s; connection closed", peer, self.address, e)
            log.debug("open failed", exc_info=True)
            writer.close()
            return
        except asyncio.CancelledError:
            writer.close()
            raise
        stats = RelayStats()
        try:
            # An SMB pipe has no half-close, whatever the backend's transport says.
            await relay(Side("client", reader, writer),
                        Side("pipe", pipe_reader, pipe_writer,
                             half_close=not self.address.is_remote), stats=stats)
        finally:
            log.info("%s -> pipe %s: %d B to pipe, %d B from pipe, %.3f s, %s",
                     peer, self.address, stats.a_to_b, stats.b_to_a, stats.duration,
                     stats.ended)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, give open connections ``grace`` seconds, then end them."""
        if self._listener is not None:
            self._listener.close()
        await self._connections.finish(grace)


async def start_forward(
    address: str | PipeAddress,
    listen_on: Endpoint,
    *,
    allow_remote_listen: bool = False,
    mode: int = DEFAULT_UNIX_MODE,
    limit: int = RELAY_LIMIT,
    max_connections: int | None = None,
    **dial: Any,
) -> Forward:
    """Listen on ``listen_on`` and relay each connection to a new instance of the pipe
    ``address``; ``dial`` is passed to :func:`npipe.open_connection` (credentials,
    timeout, ...). Listening beyond loopback needs ``allow_remote_listen``.

    At most ``max_connections`` connections are relayed at once (default as for a pipe
    server: :func:`npipe.frontdoor.default_max_connections`); callers past it are not
    accepted, and wait in the listen backlog until a connection ends."""
    addr = parse_address(address)
    if not listen_on.is_loopback and not allow_remote_listen:
        raise ConfigError(
            f"{listen_on} is not a loopback address: anyone who can reach it would use the "
            "pipe with this process's identity and credentials; pass --allow-remote-listen "
            "(allow_remote_listen=True) if that is intended"
        )
    if listen_on.kind == "tcp" and _owner_only(addr, dial):
        # A TCP port on loopback is open to every user of this host: each of them then
        # reaches an owner-only pipe as this process's user. A unix: socket keeps its mode.
        log.warning(
            "pipe %s admits only its owner, but every user of this host can connect to %s "
            "and reach it as you: prefer --listen unix:PATH (mode %o by default)",
            addr, listen_on, DEFAULT_UNIX_MODE,
        )
    forward = Forward(addr, dial, limit, check_max_connections(max_connections))
    forward._listener = await listen(listen_on, forward._serve, slots=forward.slots,
                                     mode=mode, limit=limit)
    return forward


def _owner_only(addr: PipeAddress, dial: dict[str, Any]) -> bool:
    """Whether local pipe ``addr`` is served owner-only (its socket is its owner's alone);
    False for a remote pipe or one not served yet (nothing known)."""
    if addr.kind != "local":
        return False
    from npipe.local.dial import find_socket

    try:
        path = find_socket(addr, server_user=dial.get("server_user"),
                           directory=dial.get("pipe_dir"))
        return not os.stat(path).st_mode & 0o077
    except (NpipeError, OSError):
        return False


__all__ = ["Forward", "start_forward"]
