"""Remote pipes relayed by a per-user process, off the application's GIL.

A socket that npipe relays to a remote pipe (a gRPC channel's connection, a blocking
``npipe.connect``, the HTTP client's) is handed to the user's *redirector*: one process
per user (and network namespace) that opens the pipe with npipe's SMB client and
relays the bytes, shared by every npipe process of that user, as Windows' redirector
is shared by the whole machine. The application then spends no CPU and no GIL on the
relay: the bytes go from grpcio straight to the redirector.

``$NPIPE_REDIRECTOR`` chooses:

- ``shared`` (the default): the redirector; if it cannot start, the relay runs in this
  process (logged once);
- ``required``: the redirector, or RedirectorUnavailable;
- ``off``: in this process, on npipe's I/O thread (as before; always so on Windows,
  whose own redirector opens ``\\\\HOST\\pipe\\NAME``).

See :mod:`npipe.redirector.client` (asking it, starting it), :mod:`.service` (the
process) and :mod:`.protocol` (what they say).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from npipe.address import PipeAddress
from npipe.errors import ConfigError, RedirectorUnavailable
from npipe.local.sockets import close_gently
from npipe.smb.credentials import Credentials
from npipe.smb.info import SmbConnectionInfo

log = logging.getLogger("npipe.redirector")

ENV_MODE = "NPIPE_REDIRECTOR"
MODES = ("shared", "required", "off")
_warned = False


def mode() -> str:
    """``shared``, ``required`` or ``off`` (``$NPIPE_REDIRECTOR``; ``off`` on Windows)."""
    if sys.platform == "win32":
        return "off"
    text = (os.environ.get(ENV_MODE) or "shared").strip().lower()
    if text not in MODES:
        raise ConfigError(f"${ENV_MODE} must be one of {', '.join(MODES)}, not {text!r}")
    return text


async def attach(
    backend: str | None, address: PipeAddress, sock: socket.socket, *,
    credentials: Credentials, timeout: float, encrypt: bool | None, allow_smb2: bool,
    close_on_failure: bool = True, initial: bytes = b"", missing_grace: float | None = None,
    tied: bool = False,
) -> socket.socket | None:
    """Open the remote pipe and relay ``sock`` to it (see
    :meth:`npipe.smb.PipeClient.attach`), in the user's redirector or in this process
    (see :func:`mode`). ``tied``: return the connection that stands for the relay when
    the redirector relays it (see :func:`npipe.redirector.client.attach`)."""
    from npipe import smb

    try:  # (an unknown backend, a missing package or a bad mode fails here, at once)
        name = smb.backend_name(backend)
        here = smb.get_client(name)
        chosen = mode()
    except BaseException:
        if close_on_failure:
            close_gently(sock)
        raise
    if chosen != "off":
        from npipe.redirector import client

        try:
            return await client.attach(
                name, address, sock, credentials=credentials, timeout=timeout,
                encrypt=encrypt, allow_smb2=allow_smb2, close_on_failure=close_on_failure,
                initial=initial, missing_grace=missing_grace, tied=tied)
        except RedirectorUnavailable as e:
            if chosen == "required":
                raise
            global _warned
            if not _warned:
                _warned = True
                log.warning("%s; relaying remote pipes in this process instead", e)
    await here.attach(
        address, sock, credentials=credentials, timeout=timeout, encrypt=encrypt,
        allow_smb2=allow_smb2, close_on_failure=close_on_failure, initial=initial,
        missing_grace=missing_grace)
    return None


def connections(backend: str | None = None) -> list[SmbConnectionInfo]:
    """What the SMB connections of this user's redirector negotiated (``backend``:
    ``$NPIPE_SMB_BACKEND`` or native); [] if no redirector runs. A process's own
    connections (``npipe.open_pipe``, or with the redirector off) are
    ``npipe.smb.get_client(backend).connections()``."""
    from npipe import smb

    if mode() == "off":
        return []
    from npipe.redirector import client

    return client.connections(smb.backend_name(backend))


def close_connections(backend: str | None = None) -> None:
    """Disconnect every SMB connection of this user's redirector now, pipes and all
    (as ``npipe.smb.get_client(backend).close_connections()`` does in this process)."""
    from npipe import smb

    if mode() == "off":
        return
    from npipe.redirector import client

    client.connections(smb.backend_name(backend), close=True)


__all__ = ["RedirectorUnavailable", "attach", "close_connections", "connections", "mode"]
