"""npipe's own SMB2/3 client for named pipes: a sans-I/O protocol core driven by asyncio.

* :mod:`.wire` - message layouts (header, request and response bodies, NetBIOS framing)
* :mod:`.negotiate` - NEGOTIATE with the 3.1.1 contexts
* :mod:`.crypto` - key derivation, signing, encryption
* :mod:`.core` - the connection's state machine: message ids, credits, security
* :mod:`.connection` - one connection driven by asyncio (setup, requests, teardown)
* :mod:`.pipe` - an open pipe as an asyncio transport (READs kept in flight)
* :mod:`.client` - the backend: shared connections, opening pipes, the socket relay

Written here rather than on smbprotocol because a pipe client lives on its hot path:
smbprotocol builds each message from per-field objects and waits on threads, which
cost ~0.7 ms per round trip; this one posts READs ahead and packs with ``struct``.
"""

from npipe.smb.native.client import NativeClient, connect
from npipe.smb.native.core import Options

__all__ = ["NativeClient", "Options", "connect"]
