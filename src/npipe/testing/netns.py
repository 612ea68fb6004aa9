"""Two hosts on one machine, for tests and benchmarks: network namespaces joined by a veth
link, a private smbd in the server's, and pipe server apps started there.

    with two_hosts() as hosts:
        run_in(hosts.server_ns, ["ip", "addr"])
        PrivateSmbd(d, port=445, interfaces=hosts.server_if, netns=hosts.server_ns)

    with smb_site({"alice": "Passw0rd!"}) as site:      # both of the above, and a work dir
        with site.serve([sys.executable, "server_app.py", ...]):   # prints "ready"
            run_in(site.hosts.client_ns, [...client..., site.address("shop")])

The server namespace has 198.18.0.1/30, the client 198.18.0.2/30 (the benchmarking
range, RFC 2544), each with ``lo`` up; both namespaces and the link are removed on exit,
also when the body fails. Needs root and iproute2 (and Samba for the site).
``require_root_and_samba`` skips a pytest test where that is missing (fails it when
CI=true); pytest is imported only there.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from npipe.samba.smbd import PrivateSmbd

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


def samba_version() -> tuple[int, int]:
    """(major, minor) of the installed smbd (``smbd -V``: "Version 4.22.11-Debian")."""
    import re

    out = subprocess.run([tool("smbd") or "smbd", "-V"], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r"Version (\d+)\.(\d+)", out)
    if found is None:
        raise RuntimeError(f"no version in smbd -V: {out!r}")
    return int(found[1]), int(found[2])


def missing_prerequisites(*more_tools: str) -> str | None:
    """Why the two hosts and smbd cannot run here (not root; Samba, iproute2 or
    ``more_tools`` missing, with the Debian packages that bring them), or None."""
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
    return "; ".join(reasons) or None


def require_root_and_samba(*more_tools: str) -> None:
    """Skip unless root with Samba and iproute2 (and ``more_tools``); fail when CI=true."""
    reason = missing_prerequisites(*more_tools)
    if reason is not None:
        skip_or_fail(reason)


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the running pytest test for ``reason``; fail it instead when CI=true (a CI
    machine must have every prerequisite). Imports pytest: call it from tests only."""
    import pytest

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
    # Deleting a namespace deletes the veth end in it, and with it the peer; but only
    # once no process is left in it (a client's redirector waits out its idle time).
    _stop_processes_in(hosts.server_ns, hosts.client_ns)
    for ns in (hosts.server_ns, hosts.client_ns):
        _ip("netns", "del", ns, check=False)
    for ifname in (hosts.server_if, hosts.client_if):  # if it was never moved
        _ip("link", "del", ifname, check=False)




def _stop_processes_in(*namespaces: str, grace: float = 5.0) -> None:
    """SIGTERM what still runs in ``namespaces``; SIGKILL what outlives ``grace``."""
    import signal

    def pids() -> set[int]:
        found: set[int] = set()
        for ns in namespaces:
            done = subprocess.run([tool("ip") or "ip", "netns", "pids", ns],
                                  capture_output=True, text=True, check=False)
            found |= {int(word) for word in done.stdout.split() if word.isdigit()}
        return found

    left = pids()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace
        while (left := pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not left:
            return


# --- a private smbd in the server namespace, and the pipe servers behind it -------------


def smbd_in(hosts: Hosts, directory: Path, users: Mapping[str, str]) -> PrivateSmbd:
    """A private smbd (not started) on port 445 in the server namespace, bound to its veth
    end only, with these SMB users (name -> password)."""
    return PrivateSmbd(directory, port=445, interfaces=hosts.server_if, users=users,
                       netns=hosts.server_ns)


def server_env(np_dir: Path, pipe_dir: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a pipe server app: its front door in smbd's
    ``np_dir`` (NPIPE_SAMBA_NP_DIR), its local pipes in ``pipe_dir``, plus ``extra``."""
    return {**os.environ, "NPIPE_SAMBA_NP_DIR": str(np_dir), "NPIPE_PIPE_DIR": str(pipe_dir),
            **extra}


@contextlib.contextmanager
def serve_app(ns: str, argv: Sequence[str], env: Mapping[str, str],
              stop_timeout: float = 15.0) -> Iterator[subprocess.Popen[str]]:
    """A server app in namespace ``ns`` that prints ``ready`` when it serves and stops
    when its stdin closes: started, waited for, and at exit stopped (stdin closed; killed
    if it has not exited after ``stop_timeout`` s)."""
    proc = popen_in(ns, argv, env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"server app did not start: {line!r} ({' '.join(argv)})")
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()


@dataclass
class SmbSite:
    """Two hosts, a private smbd on port 445 in the server's, and a work directory."""

    hosts: Hosts
    smbd: PrivateSmbd
    workdir: Path

    def address(self, name: str) -> str:
        """Pipe ``name`` on the server host, as a client on the other host dials it."""
        return f"//{self.hosts.server_ip}/pipe/{name}"

    def server_env(self, **extra: str) -> dict[str, str]:
        """The environment of a pipe server app behind this site's smbd."""
        return server_env(self.smbd.np_dir, self.workdir / "pipes", **extra)

    def serve(self, argv: Sequence[str],
              **env_extra: str) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
        """``argv``, a server app (see ``serve_app``), in the server namespace, behind
        this site's smbd."""
        return serve_app(self.hosts.server_ns, argv, self.server_env(**env_extra))


@contextlib.contextmanager
def smb_site(users: Mapping[str, str], prefix: str = "npx") -> Iterator[SmbSite]:
    """``two_hosts()``, smbd in the server namespace with ``users`` (see ``smbd_in``)
    and a work directory ``/tmp/PREFIX...`` (short: socket paths are limited to 107
    bytes); smbd stopped, the namespaces and the directory removed at exit."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        with two_hosts() as hosts, smbd_in(hosts, workdir / "smbd", users) as smbd:
            yield SmbSite(hosts, smbd, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
