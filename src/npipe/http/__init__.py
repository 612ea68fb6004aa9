r"""HTTP over pipes: httpx transports (client) and hypercorn (server).

Client::

    with httpx.Client(transport=npipe.http.Transport(r"\\host\pipe\api"),
                      base_url="http://api") as client:
        client.get("/items")

Server (asyncio)::

    server = await npipe.http.serve_asgi(app, "api", acl=npipe.Acl.parse("group:ops"))
    await server.serve_forever()
    # a WSGI app (Flask, Django): serve_wsgi(app, "api", max_workers=10)

The app sees its caller as ``scope["extensions"]["npipe.caller"]`` (WSGI:
``environ["npipe.caller"]``). httpx and hypercorn
are imported when a name here is first used, not by ``import npipe`` (or npipe.http);
without them (``pip install 'npipe[http]'``) ``import npipe.http`` raises
:class:`npipe.extras.MissingExtra`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from npipe.extras import require

if TYPE_CHECKING:
    from npipe.http.server import (
        AsgiServer,
        WrongAppKind,
        WsgiServer,
        serve_asgi,
        serve_wsgi,
    )
    from npipe.http.transport import AsyncTransport, Transport

# Said at once (not at the first name used): the whole module is the http extra's.
require("http", "npipe.http")

CALLER_EXTENSION = "npipe.caller"
"""The ASGI scope extension (``scope["extensions"][CALLER_EXTENSION]``) and WSGI environ
key that hold the :class:`npipe.Caller` of the request's connection."""

_WHERE = {
    "Transport": "npipe.http.transport",
    "AsyncTransport": "npipe.http.transport",
    "serve_asgi": "npipe.http.server",
    "AsgiServer": "npipe.http.server",
    "serve_wsgi": "npipe.http.server",
    "WsgiServer": "npipe.http.server",
    "WrongAppKind": "npipe.http.server",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'npipe.http' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "CALLER_EXTENSION", "AsgiServer", "AsyncTransport", "Transport", "WrongAppKind",
    "WsgiServer", "serve_asgi", "serve_wsgi",
]
