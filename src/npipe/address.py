"""Pipe addresses: one parser and formatter used everywhere (sans I/O).

Accepted forms::

    \\\\.\\pipe\\NAME          a local pipe (Windows spelling)
    \\\\HOST\\pipe\\NAME       a pipe on HOST, reached over SMB (IPC$)
    //./pipe/NAME           the shell-friendly spellings of the two above
    //HOST/pipe/NAME
    NAME                    a bare name: a local pipe
    unix:/abs/path          a Unix domain socket by path

HOST may carry a port (``HOST:4445``, ``[::1]:4445``) for SMB servers that do not
listen on 445; UNC has no syntax for that, so it is an npipe extension.
Pipe names are case-insensitive, as on Windows; :attr:`PipeAddress.key` is the
folded form used to find the pipe.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass
from typing import Literal

from npipe.errors import AddressError

# Windows limits a pipe name to 256 characters (CreateNamedPipe, MSDN).
MAX_NAME_LENGTH = 256
# struct sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS and the BSDs, one of
# them the NUL.
MAX_UNIX_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103
# A DNS name is at most 253 characters (RFC 1035 2.3.4), a label 63.
MAX_HOST_LENGTH = 253
SMB_PORT = 445

Kind = Literal["local", "remote", "unix"]

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
_UNC = re.compile(r"(?:\\\\|//)(?P<host>[^\\/]*)[\\/](?P<share>[^\\/]*)[\\/](?P<name>.*)\Z", re.S)


@dataclass(frozen=True)
class PipeAddress:
    """Where a pipe is: a local pipe NAME, a pipe NAME on HOST, or a Unix socket path."""

    kind: Kind
    name: str = ""
    host: str = ""
    port: int = SMB_PORT
    path: str = ""

    @property
    def is_local(self) -> bool:
        r"""A pipe on this host (``NAME``, ``\\.\pipe\NAME``)."""
        return self.kind == "local"

    @property
    def is_remote(self) -> bool:
        r"""A pipe on another host, reached over SMB (``\\HOST\pipe\NAME``)."""
        return self.kind == "remote"

    @property
    def key(self) -> str:
        """The case-folded pipe name under which the pipe is found."""
        return self.name.lower()

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"\\\\{self._host_part()}\\pipe\\{self.name}"

    def posix(self) -> str:
        """The shell-friendly spelling (no backslashes to quote)."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"//{self._host_part()}/pipe/{self.name}"

    def _host_part(self) -> str:
        if self.kind == "local":
            return "."
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SMB_PORT else f"{host}:{self.port}"


def local(name: str) -> PipeAddress:
    """The address of the local pipe NAME."""
    return PipeAddress("local", name=validate_name(name))


def parse_address(text: str | PipeAddress) -> PipeAddress:
    """Parse any accepted spelling; raise :class:`AddressError` naming the bad part."""
    if isinstance(text, PipeAddress):
        return text
    if not isinstance(text, str):
        raise AddressError(f"a pipe address is a string, not {type(text).__name__}")
    if not text:
        raise AddressError("empty pipe address: give a pipe NAME, \\\\.\\pipe\\NAME, "
                           "\\\\HOST\\pipe\\NAME or unix:/path")
    if text.startswith("unix:"):
        return PipeAddress("unix", path=validate_unix_path(text[len("unix:"):]))
    if text.startswith(("\\\\", "//")):
        return _parse_unc(text)
    if text.startswith(("\\", "/")) or "\\" in text or "/" in text:
        raise AddressError(
            f"unknown pipe address form {text!r}: use NAME, \\\\.\\pipe\\NAME, "
            "//HOST/pipe/NAME or unix:/abs/path"
        )
    return local(text)


def _parse_unc(text: str) -> PipeAddress:
    m = _UNC.match(text)
    if m is None:
        raise AddressError(f"incomplete pipe address {text!r}: expected \\\\HOST\\pipe\\NAME")
    if m["share"].lower() != "pipe":
        raise AddressError(
            f"{m['share']!r} in {text!r} is not 'pipe': only named pipes are addressed here"
        )
    name = validate_name(m["name"])
    host, port = _parse_host(m["host"], text)
    if host == ".":
        if port != SMB_PORT:
            raise AddressError(f"a local pipe has no port: {text!r}")
        return PipeAddress("local", name=name)
    return PipeAddress("remote", name=name, host=host, port=port)


def _parse_host(part: str, text: str) -> tuple[str, int]:
    if not part:
        raise AddressError(f"missing host in {text!r}: use '.' for this machine")
    host, port = part, SMB_PORT
    if part.startswith("["):
        end = part.find("]")
        if end < 0:
            raise AddressError(f"unclosed '[' in host {part!r} of {text!r}")
        host, rest = part[1:end], part[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise AddressError(f"unexpected {rest!r} after host {part!r} in {text!r}")
            port = _parse_port(rest[1:], text)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{host!r} in {text!r} is not an IPv6 address") from None
        return host, port
    if part.count(":") == 1:
        host, port_text = part.split(":")
        port = _parse_port(port_text, text)
    elif ":" in part:
        try:
            return str(ipaddress.IPv6Address(part)), port
        except ValueError:
            raise AddressError(f"{part!r} in {text!r} is not a host or IPv6 address") from None
    if host == ".":
        return host, port
    if not _valid_hostname(host):
        raise AddressError(f"{host!r} in {text!r} is not a valid host name or address")
    return host, port


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise AddressError(f"port {text!r} in {whole!r} is not a number from 1 to 65535")
    return int(text)


def _valid_hostname(host: str) -> bool:
    if not host or len(host) > MAX_HOST_LENGTH:
        return False
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    return all(_LABEL.match(label) for label in host.rstrip(".").split("."))


def validate_name(name: str) -> str:
    """Check a pipe NAME against Windows' rules and the ones that keep it a single file name."""
    if not name:
        raise AddressError("empty pipe name")
    if len(name) > MAX_NAME_LENGTH:
        raise AddressError(
            f"pipe name of {len(name)} characters is longer than {MAX_NAME_LENGTH}"
        )
    for bad, why in (("\\", "a backslash"), ("/", "a slash"), ("\0", "a NUL character")):
        if bad in name:
            raise AddressError(f"pipe name {name!r} contains {why}")
    if ".." in name or name == ".":
        raise AddressError(f"pipe name {name!r} contains '..' or is '.'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise AddressError(f"pipe name {name!r} contains a control character")
    return name


def validate_unix_path(path: str) -> str:
    if not path.startswith("/"):
        raise AddressError(f"unix socket path {path!r} is not absolute")
    if "\0" in path:
        raise AddressError(f"unix socket path {path!r} contains a NUL character")
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        raise AddressError(
            f"unix socket path {path!r} is longer than {MAX_UNIX_PATH_BYTES} bytes"
        )
    return path
