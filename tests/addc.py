"""A Samba AD domain controller in a network namespace, and Kerberos clients of it.

    with two_hosts() as hosts, AdDc(workdir / "dc", hosts) as dc:
        dc.samba_tool("user", "create", "alice", PASSWORD)
        client = KerberosClient(workdir / "client", hosts)
        client.kinit(ccache, "alice", PASSWORD)
        client.run([sys.executable, "app.py"], ccache=ccache)

Every file lives under the given directories: the host's /etc/samba, /etc/krb5.conf and
/etc/hosts are never read for the DC nor changed. The DC runs in a pid namespace of its
own, so stopping it ends every process Samba forked. Needs root, Samba's AD DC packages
(samba, samba-ad-provision, samba-dsdb-modules, winbind), krb5-user and, for the Python
clients, PyPI's gssapi and krb5 (pyspnego's Kerberos).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npipe.testing.netns import Hosts, popen_in, require_root_and_samba, run_in, skip_or_fail, tool

REALM = "NPIPE.TEST"
WORKGROUP = "NPIPE"
DC_NAME = "dc1"
DC_FQDN = f"{DC_NAME}.{REALM.lower()}"
ADMIN_PASSWORD = "Adm1n-Passw0rd!"
AD_TOOLS = ("samba", "samba-tool", "winbindd", "kinit", "klist", "unshare", "ss")
KERBEROS_MODULES = ("gssapi", "krb5")  # pyspnego's Kerberos needs both
START_TIMEOUT = 30.0


def require_kerberos() -> None:
    """Skip unless the DC and Kerberos client can run here; fail when CI=true."""
    require_root_and_samba(*AD_TOOLS)
    missing = [m for m in KERBEROS_MODULES if importlib.util.find_spec(m) is None]
    if not Path("/usr/share/samba/setup").is_dir():  # samba-ad-provision
        missing.append("samba-ad-provision")
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed (scripts/test installs them)")


def _which(name: str) -> str:
    path = tool(name)
    if path is None:
        raise RuntimeError(f"{name} not found")
    return path


class AdDc:
    """``samba`` as the DC of REALM at ``hosts.server_ip``; a context manager."""

    def __init__(self, directory: Path, hosts: Hosts) -> None:
        self.dir = directory
        self.hosts = hosts
        self.conf = directory / "etc" / "smb.conf"
        self.np_dir = directory / "ncalrpc" / "np"
        self.log = directory / "samba.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AdDc:
        try:
            self.provision()
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def samba_tool(self, *args: str) -> str:
        done = subprocess.run([_which("samba-tool"), *args, "-s", str(self.conf)],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"samba-tool {args[:2]} failed: {done.stderr[-2000:]}")
        return done.stdout

    def provision(self) -> None:
        self.dir.mkdir(parents=True)
        # An empty config, so that nothing of the host's smb.conf leaks into the domain.
        empty = self.dir / "empty.conf"
        empty.touch()
        done = subprocess.run(
            [_which("samba-tool"), "domain", "provision", "-s", str(empty),
             f"--realm={REALM}", f"--domain={WORKGROUP}", "--server-role=dc",
             "--dns-backend=SAMBA_INTERNAL", f"--adminpass={ADMIN_PASSWORD}",
             "--use-rfc2307", f"--host-name={DC_NAME}", f"--host-ip={self.hosts.server_ip}",
             f"--targetdir={self.dir}"],
            capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"samba-tool domain provision failed: {done.stderr[-3000:]}")
        self.write_config()

    def write_config(self) -> None:
        """Our own smb.conf: every path under our directory, no NetBIOS, no DNS
        forwarder (provision copies the host's resolver), and no services we don't need."""
        d = self.dir
        self.conf.write_text(f"""[global]
\tnetbios name = {DC_NAME.upper()}
\tworkgroup = {WORKGROUP}
\trealm = {REALM}
\tserver role = active directory domain controller
\tidmap_ldb:use rfc2307 = yes
\tprivate dir = {d}/private
\tbinddns dir = {d}/bind-dns
\tcache directory = {d}/cache
\tlock directory = {d}
\tstate directory = {d}/state
\tpid directory = {d}/pid
\tncalrpc dir = {d}/ncalrpc
\tlog file = {d}/logs/%m.log
\tinterfaces = {self.hosts.server_if}
\tbind interfaces only = yes
\tdisable netbios = yes
\tdns forwarder =
\tserver services = -nbt -wrepl -ntp_signd -dnsupdate
""")

    def start(self) -> None:
        """``samba -F`` in the server namespace, in mount and pid namespaces of its own.

        smbd looks for winbindd only at the compiled-in /run/samba/winbindd: a tmpfs on
        /run gives this DC its own. Samba is pid 1 of its pid namespace, and unshare
        SIGKILLs it when unshare dies, which ends every process in that namespace.
        """
        for sub in ("pid", "logs", "ncalrpc", "cache"):
            (self.dir / sub).mkdir(exist_ok=True)
        script = 'mount -t tmpfs -o mode=0755 npipe-run /run && mkdir /run/samba && exec "$@"'
        argv = [_which("unshare"), "--mount", "--propagation", "private", "--pid", "--fork",
                "--kill-child", "--mount-proc", "sh", "-c", script, "sh",
                _which("samba"), "-F", "--no-process-group", "--debug-stdout",
                "-s", str(self.conf)]
        with self.log.open("wb") as out:
            self.proc = popen_in(self.hosts.server_ns, argv, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT)
        self._wait_listening({88, 445})  # the KDC and smbd

    def _wait_listening(self, ports: set[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"samba exited ({self.proc.returncode}): {self._log_tail()}")
            done = run_in(self.hosts.server_ns, [_which("ss"), "-Hltn"],
                          capture_output=True, text=True)
            listening = {int(line.split()[3].rpartition(":")[2])
                         for line in done.stdout.splitlines() if line.strip()}
            if ports <= listening and self.np_dir.is_dir():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"samba did not listen on {sorted(ports)}: "
                                   f"{self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to samba (unshare blocks SIGTERM while it waits for its child).

        unshare returns only once samba, the pid namespace's init, has been reaped, and
        the kernel reaps the namespace's other processes first: when the wait returns,
        nothing of this DC runs any more.
        """
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        samba = _child_pid(proc.pid)
        if samba is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(samba, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()  # and with it samba (--kill-child) and its namespace
            proc.wait(5)


def _child_pid(pid: int) -> int | None:
    """The one child of unshare --fork (our child, so its pid is not yet reused)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


class KerberosClient:
    """Runs programs in the client namespace with a krb5.conf of its own (KRB5_CONFIG)
    and an /etc/hosts that names the DC, bind-mounted in a private mount namespace."""

    def __init__(self, directory: Path, hosts: Hosts) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.hosts = hosts
        self.krb5_conf = directory / "krb5.conf"
        self.hosts_file = directory / "hosts"
        # No DNS here: the KDC by address, and no canonicalising of the names we dial.
        self.krb5_conf.write_text(f"""[libdefaults]
\tdefault_realm = {REALM}
\tdns_lookup_kdc = false
\tdns_lookup_realm = false
\trdns = false
\tdns_canonicalize_hostname = false

[realms]
\t{REALM} = {{
\t\tkdc = {hosts.server_ip}
\t}}

[domain_realm]
\t.{REALM.lower()} = {REALM}
\t{hosts.server_ip} = {REALM}
""")
        self.hosts_file.write_text(f"127.0.0.1 localhost\n"
                                   f"{hosts.server_ip} {DC_FQDN} {DC_NAME}\n")

    def env(self, ccache: Path) -> dict[str, str]:
        # Nothing from the caller's Kerberos or npipe credentials settings.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KRB5", "NPIPE_USER", "NPIPE_PASSWORD", "NPIPE_DOMAIN",
                                    "NPIPE_AUTH"))}
        return {**env, "KRB5_CONFIG": str(self.krb5_conf), "KRB5CCNAME": f"FILE:{ccache}"}

    def run(self, argv: Sequence[str], *, ccache: Path, timeout: float = 60,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        wrapped = [_which("unshare"), "--mount", "--propagation", "private",
                   "sh", "-c", script, str(self.hosts_file), *argv]
        return run_in(self.hosts.client_ns, wrapped, env=self.env(ccache),
                      capture_output=True, text=True, timeout=timeout, **kw)

    def kinit(self, ccache: Path, user: str, password: str) -> None:
        done = self.run([_which("kinit"), f"{user}@{REALM}"], ccache=ccache,
                        input=password + "\n", timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"kinit {user} failed: {done.stderr.strip()}")

    def tickets(self, ccache: Path) -> list[str]:
        """The service principals of the tickets in ``ccache`` (klist reads only the file)."""
        done = subprocess.run([_which("klist"), "-c", f"FILE:{ccache}"], capture_output=True,
                              text=True, timeout=30, env=self.env(ccache))
        lines = done.stdout.splitlines()
        # Ticket lines: "start date, time, end date, time, principal".
        return [line.split()[-1] for line in lines if line[:1].isdigit()]
