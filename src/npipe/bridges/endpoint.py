"""The non-pipe end of a bridge: ``tcp:HOST:PORT``, ``tcp:[V6]:PORT`` or ``unix:PATH``.

One parser for every command (``forward --listen``, ``expose --to``), so that the same
spelling works, and fails with the same one-line error, everywhere.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from npipe.errors import AddressError

FORMS = "tcp:HOST:PORT, tcp:[IPV6]:PORT or unix:PATH"


@dataclass(frozen=True)
class Endpoint:
    """A TCP address or a Unix socket path: the side of a bridge that is not the pipe
    (:func:`parse_endpoint` reads the spelling)."""
    kind: Literal["tcp", "unix"]
    host: str = ""  # tcp: a name or an address (IPv6 without brackets)
    port: int = 0  # tcp: 0 lets the kernel pick one when listening
    path: str = ""  # unix

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Reachable only from this host: a Unix socket, localhost, 127.0.0.0/8 or ::1."""
        if self.kind == "unix":
            return True
        if self.host.lower() in ("localhost", "localhost."):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # another host name: it may resolve to anything
            return False


def parse_endpoint(spec: str) -> Endpoint:
    """``tcp:HOST:PORT``, ``tcp:[V6]:PORT`` or ``unix:PATH``; AddressError naming the
    problem otherwise."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("tcp", "unix"):
        raise AddressError(f"bad endpoint {spec!r}: use {FORMS}")
    if kind == "unix":
        if not rest:
            raise AddressError(f"bad endpoint {spec!r}: unix: needs a socket path")
        if "\0" in rest:
            raise AddressError(f"bad endpoint {spec!r}: a path cannot contain NUL")
        return Endpoint("unix", path=rest)
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise AddressError(f"bad endpoint {spec!r}: use tcp:[IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"bad endpoint {spec!r}: {host!r} is not an IPv6 address")\
                from None
        port_text = tail[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise AddressError(f"bad endpoint {spec!r}: missing :PORT ({FORMS})")
        if ":" in host:
            raise AddressError(f"bad endpoint {spec!r}: write an IPv6 address in brackets, "
                               "tcp:[IPV6]:PORT")
    if not host:
        raise AddressError(f"bad endpoint {spec!r}: missing host (use 127.0.0.1 for this "
                           "host only, 0.0.0.0 for every interface)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"bad endpoint {spec!r}: the port must be a number 0-65535")
    return Endpoint("tcp", host=host, port=int(port_text))


__all__ = ["Endpoint", "parse_endpoint"]
