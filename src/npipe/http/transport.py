"""httpx transports whose connections are pipes.

They *are* httpx.HTTPTransport / AsyncHTTPTransport with one thing changed: the
httpcore connection pool they build is given npipe's network backend. Subclassing keeps
httpx's own request mapping, response streams and httpcore-to-httpx exception mapping
(all private to httpx) instead of a copy of them; what it relies on is the attribute
``_pool`` that both classes have had since httpx 0.18 (pinned in pyproject.toml and
checked by tests/test_http_client.py).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from npipe.extras import imports_of

with imports_of("http", "npipe.http"):
    import httpcore
    import httpx

from npipe.address import PipeAddress
from npipe.http.network import AsyncPipeBackend, PipeBackend, dial_options

if TYPE_CHECKING:
    from npipe.smb.credentials import Credentials

DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class Transport(httpx.HTTPTransport):
    r"""A sync httpx transport to one pipe: ``httpx.Client(transport=Transport(r"\\host\pipe\api"),
    base_url="http://api")``. The URL's host and port are not dialled (the host still
    goes out as the Host header); every connection opens the pipe.

    HTTP/1.1 by default; ``http2=True, http1=False`` speaks HTTP/2 with prior knowledge
    (h2c). The dial options are open_connection's; opening the pipe is bounded by httpx's
    connect timeout (and by ``timeout``), reads and writes by httpx's read/write
    timeouts. A pipe that cannot be opened raises httpx.ConnectError (ConnectTimeout)
    with npipe's message (PipeNotFound's, AccessDenied's, ...); npipe's exception is in
    its chain: ``e.__cause__`` is httpcore's error, whose ``__context__`` it is (httpcore's
    pool re-raises ``from None``).
    """

    def __init__(
        self,
        address: str | PipeAddress,
        *,
        http1: bool = True,
        http2: bool = False,
        server_user: str | int | None = None,
        pipe_dir: str | os.PathLike[str] | None = None,
        credentials: Credentials | None = None,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        allow_smb2: bool = False,
        smb_backend: str | None = None,
        limits: httpx.Limits = DEFAULT_LIMITS,
        retries: int = 0,
    ) -> None:
        options = dial_options(
            address, server_user=server_user, pipe_dir=pipe_dir, credentials=credentials,
            timeout=timeout, encrypt=encrypt, allow_smb2=allow_smb2, smb_backend=smb_backend,
        )
        # verify=False: no certificates to load; a pipe never does TLS (start_tls refuses).
        super().__init__(verify=False, trust_env=False, http1=http1, http2=http2,
                         limits=limits, retries=retries)
        self.address = options.address
        self._pool = httpcore.ConnectionPool(
            **_pool_options(limits, http1, http2, retries), network_backend=PipeBackend(options)
        )

    def __repr__(self) -> str:
        return f"<npipe.http.Transport {self.address}>"


class AsyncTransport(httpx.AsyncHTTPTransport):
    """The asyncio twin of :class:`Transport` (same options); connections are
    npipe.open_connection streams on the running loop."""

    def __init__(
        self,
        address: str | PipeAddress,
        *,
        http1: bool = True,
        http2: bool = False,
        server_user: str | int | None = None,
        pipe_dir: str | os.PathLike[str] | None = None,
        credentials: Credentials | None = None,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        allow_smb2: bool = False,
        smb_backend: str | None = None,
        limits: httpx.Limits = DEFAULT_LIMITS,
        retries: int = 0,
    ) -> None:
        options = dial_options(
            address, server_user=server_user, pipe_dir=pipe_dir, credentials=credentials,
            timeout=timeout, encrypt=encrypt, allow_smb2=allow_smb2, smb_backend=smb_backend,
        )
        super().__init__(verify=False, trust_env=False, http1=http1, http2=http2,
                         limits=limits, retries=retries)
        self.address = options.address
        self._pool = httpcore.AsyncConnectionPool(
            **_pool_options(limits, http1, http2, retries),
            network_backend=AsyncPipeBackend(options),
        )

    def __repr__(self) -> str:
        return f"<npipe.http.AsyncTransport {self.address}>"


def _pool_options(limits: httpx.Limits, http1: bool, http2: bool, retries: int) -> dict[str, Any]:
    """What httpx's own transports give their httpcore pool, but the network backend."""
    return {
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": http1,
        "http2": http2,
        "retries": retries,
    }


__all__ = ["AsyncTransport", "Transport"]
