"""Two hosts on one machine for the Samba tests: network namespaces joined by a veth link.

    with two_hosts() as hosts:
        run_in(hosts.server_ns, ["ip", "addr"])
        PrivateSmbd(d, port=445, interfaces=hosts.server_if, netns=hosts.server_ns)

The server namespace has 198.18.0.1/30, the client 198.18.0.2/30 (the benchmarking
range, RFC 2544), each with ``lo`` up; both namespaces and the link are removed on exit,
also when the body fails. Needs root and iproute2.

Also a small SMB client (smbprotocol) the tests use in this process or, as
``python netns.py ...``, inside a namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

SERVER_IP = "198.18.0.1"
CLIENT_IP = "198.18.0.2"
PREFIX_LEN = 30
SAMBA_TOOLS = ("smbd", "smbpasswd", "testparm", "smbcontrol")
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
# The Debian package that brings each tool on both Debian 12 and 13 (`samba` and
# `samba-tool` come with samba-ad-dc on Debian 13, with samba on Debian 12).
TOOL_PACKAGES = {
    "smbd": "samba", "smbcontrol": "samba", "smbpasswd": "samba-common-bin",
    "testparm": "samba-common-bin", "ip": "iproute2", "samba": "samba-ad-dc",
    "samba-tool": "samba-ad-dc", "winbindd": "winbind", "kinit": "krb5-user",
    "klist": "krb5-user", "unshare": "util-linux", "ss": "iproute2", "tshark": "tshark",
}
_counter = itertools.count(1)


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN_PATH)


def require_root_and_samba(*more_tools: str) -> None:
    """Skip unless root with Samba and iproute2 (and ``more_tools``); fail when CI=true."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (smbd, network namespaces)")
    missing = [t for t in (*SAMBA_TOOLS, "ip", *more_tools) if tool(t) is None]
    if missing:
        packages = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
        reasons.append(
            f"{', '.join(missing)} not found (scripts/test installs them: "
            f"apt-get install {' '.join(packages)})"
        )
    if not reasons:
        return
    reason = "; ".join(reasons)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so this must not be skipped", pytrace=False)
    pytest.skip(reason)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = tool("ip") or "ip"
    done = subprocess.run([ip, *args], capture_output=True, text=True, timeout=15)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _netns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    return [tool("ip") or "ip", "netns", "exec", ns, *argv]


def run_in(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` inside namespace ``ns`` (30 s timeout unless given)."""
    kw.setdefault("timeout", 30)
    return subprocess.run(_netns_exec(ns, argv), **kw)


def popen_in(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` inside namespace ``ns``; the caller waits for it."""
    return subprocess.Popen(_netns_exec(ns, argv), **kw)


@dataclass(frozen=True)
class Hosts:
    server_ns: str
    client_ns: str
    server_if: str  # the veth end in the server namespace
    client_if: str
    server_ip: str = SERVER_IP
    client_ip: str = CLIENT_IP


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Server and client namespaces joined by a veth pair; everything removed at exit."""
    tag = f"{os.getpid()}" if (n := next(_counter)) == 1 else f"{os.getpid()}-{n}"
    hosts = Hosts(f"npsrv-{tag}", f"npcli-{tag}", f"npvs{tag}"[:15], f"npvc{tag}"[:15])
    # A run that died with this pid may have left these behind: they are ours by name.
    _remove(hosts)
    try:
        _ip("netns", "add", hosts.server_ns)
        _ip("netns", "add", hosts.client_ns)
        _ip("link", "add", hosts.server_if, "type", "veth", "peer", "name", hosts.client_if)
        _ip("link", "set", hosts.server_if, "netns", hosts.server_ns)
        _ip("link", "set", hosts.client_if, "netns", hosts.client_ns)
        for ns, ifname, address in ((hosts.server_ns, hosts.server_if, hosts.server_ip),
                                    (hosts.client_ns, hosts.client_if, hosts.client_ip)):
            _ip("-n", ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _wait_link(hosts)
        yield hosts
    finally:
        _remove(hosts)


def _wait_link(hosts: Hosts, timeout: float = 10.0) -> None:
    """Until the veth carries packets (its carrier can lag `link set up` a little)."""
    deadline = time.monotonic() + timeout
    while True:
        done = run_in(hosts.client_ns, ["ping", "-c", "1", "-W", "1", hosts.server_ip],
                      capture_output=True) if tool("ping") else None
        if done is None:
            state = _ip("-n", hosts.client_ns, "-o", "link", "show", hosts.client_if).stdout
            if "LOWER_UP" in state:
                return
        elif done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the veth link {hosts.client_if} did not come up")
        time.sleep(0.05)


def _remove(hosts: Hosts) -> None:
    # Deleting a namespace deletes the veth end in it, and with it the peer.
    for ns in (hosts.server_ns, hosts.client_ns):
        _ip("netns", "del", ns, check=False)
    for ifname in (hosts.server_if, hosts.client_if):  # if it was never moved
        _ip("link", "del", ifname, check=False)


# --- a small SMB client ------------------------------------------------------------

STATUS_SUCCESS = 0


def smb_login(host: str, port: int, user: str, password: str) -> int:
    """Log on and connect to IPC$: 0, or the NTSTATUS that refused it."""
    from smbprotocol.exceptions import SMBResponseException

    try:
        with _ipc(host, port, user, password):
            return STATUS_SUCCESS
    except SMBResponseException as e:
        return int(e.status)


def smb_pipe_echo(
    host: str, port: int, user: str, password: str, pipe: str, data: bytes,
    timeout: float = 10.0,
) -> bytes | int:
    """Open ``pipe`` on IPC$, write ``data``, read as many bytes back; the bytes read, or
    the NTSTATUS with which the open failed."""
    from smbprotocol.exceptions import SMBResponseException
    from smbprotocol.open import (
        CreateDisposition,
        CreateOptions,
        FilePipePrinterAccessMask,
        ImpersonationLevel,
        Open,
        ShareAccess,
    )

    with _ipc(host, port, user, password) as tree:
        handle = Open(tree, pipe)
        try:
            handle.create(
                ImpersonationLevel.Impersonation,
                FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
                0,
                ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
                CreateDisposition.FILE_OPEN,
                CreateOptions.FILE_NON_DIRECTORY_FILE,
            )
        except SMBResponseException as e:
            return int(e.status)
        try:
            handle.write(data, 0)
            got = b""
            deadline = time.monotonic() + timeout
            while len(got) < len(data) and time.monotonic() < deadline:
                got += handle.read(0, len(data) - len(got))
            return got
        finally:
            handle.close()


@contextlib.contextmanager
def _ipc(host: str, port: int, user: str, password: str) -> Iterator[Any]:
    from smbprotocol.connection import Connection
    from smbprotocol.session import Session
    from smbprotocol.tree import TreeConnect

    # SMB 3.1.1 requires a signed TREE_CONNECT: leave require_signing at True.
    connection = Connection(uuid.uuid4(), host, port)
    connection.connect(timeout=10)
    try:
        session = Session(connection, user, password, require_encryption=False)
        session.connect()
        tree = TreeConnect(session, rf"\\{host}\IPC$")
        tree.connect()
        yield tree
    finally:
        connection.disconnect(close=True)


def main(argv: Sequence[str]) -> int:
    """``netns.py login HOST PORT USER PASSWORD`` or ``... echo HOST PORT USER PASSWORD
    PIPE DATA``: prints ``status 0x...`` or ``data HEX``."""
    command, host, port, user, password, *rest = argv
    if command == "login":
        print(f"status {smb_login(host, int(port), user, password):#010x}")
    else:
        pipe, data = rest
        result = smb_pipe_echo(host, int(port), user, password, pipe, data.encode())
        print(f"status {result:#010x}" if isinstance(result, int) else f"data {result.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
