"""Pipe addresses as the paths Windows opens (sans I/O).

CreateNamedPipe: "The entire pipe name string can be up to 256 characters long. Pipe
names are not case sensitive." (learn.microsoft.com, CreateNamedPipeW, lpName). A server
always creates ``\\\\.\\pipe\\NAME``, so that form is what the limit is checked on.
"""

from __future__ import annotations

from npipe.address import SMB_PORT, PipeAddress, parse_address
from npipe.errors import AddressError

MAX_PIPE_PATH = 256
LOCAL_PREFIX = "\\\\.\\pipe\\"
# The name part that fits in MAX_PIPE_PATH after the local prefix.
MAX_WINDOWS_NAME = MAX_PIPE_PATH - len(LOCAL_PREFIX)


def is_local(address: PipeAddress | str) -> bool:
    """True for a pipe of this machine (``NAME``, ``\\\\.\\pipe\\NAME``)."""
    return parse_address(address).is_local


def pipe_path(address: PipeAddress | str) -> str:
    """``\\\\.\\pipe\\NAME`` for a local pipe, ``\\\\HOST\\pipe\\NAME`` for a remote one
    (what CreateFileW opens through the Windows SMB client)."""
    addr = parse_address(address)
    if addr.kind == "unix":
        raise AddressError(f"{addr} is a Unix socket, not a Windows named pipe")
    if len(addr.name) > MAX_WINDOWS_NAME:
        raise AddressError(
            f"pipe name of {len(addr.name)} characters is too long for Windows: "
            f"\\\\.\\pipe\\NAME may have {MAX_PIPE_PATH} characters, so NAME {MAX_WINDOWS_NAME}"
        )
    if addr.is_local:
        return LOCAL_PREFIX + addr.name
    if addr.port != SMB_PORT:
        raise AddressError(
            f"{addr.posix()}: the Windows SMB client reaches port {SMB_PORT} only; use "
            "npipe's own SMB client for another port (smb_backend=\"native\")"
        )
    return f"\\\\{unc_host(addr.host)}\\pipe\\{addr.name}"


def unc_host(host: str) -> str:
    """The host as UNC spells it: an IPv6 address as its ipv6-literal.net name (':' as
    '-', a zone's '%' as 's'), since ':' has no place in a UNC path."""
    if ":" not in host:
        return host
    return host.replace(":", "-").replace("%", "s") + ".ipv6-literal.net"
