#!/usr/bin/env python3
"""The cross-host test bed: two "hosts" on one machine (network namespaces joined by a veth
link, npipe.testing.netns), a private smbd with the bench user in the server's, and the
pipe server apps the benchmarks measure, each a process in a namespace spoken to in JSON
lines. Shared by cross_host.py and soak.py.

    python bench/testbed.py --server KIND [--host 198.18.0.1]

serves KIND (grpc-tcp, grpc-tls, grpc-pipe, raw-tcp, raw-pipe) until stdin closes: it
prints ``{"ready": true, "port"|"pipe": ...}`` when serving (grpc-tls adds ``"ca"``, its
throwaway certificate, PEM) and ``{"stats": ...}`` at the end.
``Testbed.start_servers`` starts them in the server namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from npipe.testing.netns import SmbSite, missing_prerequisites, popen_in, smb_site

SCRIPT = Path(__file__).resolve()

USER = "npbench"
PASSWORD = "Bench-Passw0rd-7"
GRPC_PIPE = "benchgrpc"
RAW_PIPE = "benchraw"
SERVER_WORKERS = 4
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SERVER_KINDS = ("grpc-tcp", "grpc-tls", "grpc-pipe", "raw-tcp", "raw-pipe")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def until_stdin_closes() -> None:
    """A server's wait: the orchestrator stops it by closing its stdin."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    try:
        await done
    finally:
        loop.remove_reader(sys.stdin.fileno())


def credentials() -> Any:
    from npipe.smb.credentials import Credentials

    return Credentials(USER, PASSWORD)


def rss_kib(pid: int | str = "self") -> int:
    """A process's resident set size (VmRSS), KiB; 0 if it is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ================================================================== servers (server ns)


def self_signed_certificate(ip: str) -> tuple[bytes, bytes]:
    """A throwaway key and self-signed certificate (PEM) for ``ip`` (an IP SAN), made at
    run time with ``cryptography``: the TLS anchor's server identity, which its client
    trusts as its only root. ECDSA P-256, as a current TLS server would use."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"npipe bench {ip}")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def serve(kind: str, host: str) -> int:
    """Serve ``kind`` until stdin closes; print {"ready": ...}, then the stats at the end."""
    if kind.startswith("grpc"):
        return _serve_grpc(kind, host)
    asyncio.run(_serve_raw(kind, host))
    return 0


def _serve_grpc(kind: str, host: str) -> int:
    from concurrent import futures

    import grpc
    from grpc_local import bench_service

    import npipe
    import npipe.grpc

    handler, stats = bench_service(check_caller=kind == "grpc-pipe")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS))
    server.add_generic_rpc_handlers((handler,))
    if kind == "grpc-tcp":
        port = server.add_insecure_port(f"{host}:0")
        if port == 0:
            raise OSError(f"grpcio could not listen on {host}")
        ready: dict[str, Any] = {"ready": True, "port": port}
    elif kind == "grpc-tls":
        key_pem, cert_pem = self_signed_certificate(host)
        port = server.add_secure_port(
            f"{host}:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
        if port == 0:
            raise OSError(f"grpcio could not listen on {host}")
        ready = {"ready": True, "port": port, "ca": cert_pem.decode()}
    else:
        npipe.grpc.add_pipe_port(server, GRPC_PIPE, smb=True,
                                 acl=npipe.Acl.allow(users=[USER]))
        ready = {"ready": True, "pipe": GRPC_PIPE}
    server.start()
    emit(ready)
    sys.stdin.read()  # until the orchestrator closes it
    server.stop(None).wait(STOP_TIMEOUT_S)
    emit({"stats": stats})
    return 0


async def _serve_raw(kind: str, host: str) -> None:
    import npipe

    stats: dict[str, Any] = {"connections": 0, "bytes": 0, "callers": set()}

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        if kind == "raw-pipe":
            stats["callers"].add(str(npipe.caller(writer)).split(" from ")[0])
        try:
            while data := await reader.read(65536):
                stats["bytes"] += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    if kind == "raw-tcp":
        server: Any = await asyncio.start_server(echo, host, 0)
        ready: dict[str, Any] = {"ready": True, "port": server.sockets[0].getsockname()[1]}
    else:
        server = await npipe.start_server(echo, RAW_PIPE, smb=True,
                                          acl=npipe.Acl.allow(users=[USER]))
        ready = {"ready": True, "pipe": RAW_PIPE}
    emit(ready)
    async with server:
        await until_stdin_closes()
    emit({"stats": {**stats, "callers": sorted(stats["callers"])}})


# ================================================================== the bed (orchestrator)


class Child:
    """A server or client process in a namespace, spoken to in JSON lines."""

    def __init__(self, name: str, ns: str, argv: list[str], env: dict[str, str],
                 log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = popen_in(
                ns, argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, start_new_session=True,  # Ctrl-C is the orchestrator's to handle
            )
        self._buf = b""

    @property
    def pid(self) -> int:
        return int(self.proc.pid)  # `ip netns exec` execs the command: the same process

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").strip().splitlines()
            return "\n".join(f"    {line}" for line in text[-lines:])
        return ""

    def reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout:g} s\n{self.tail()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.proc.poll()
                    raise RuntimeError(f"{self.name} exited (status {self.proc.returncode})"
                                       f"\n{self.tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}\n{self.tail()}")
        return msg

    def ask(self, command: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.reply(timeout)

    def stop(self) -> dict[str, Any] | None:
        """Close stdin (the signal to stop), read a last line if any, and reap; kill if it
        does not exit in time."""
        last = None
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                last = self.reply(STOP_TIMEOUT_S)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return last


def check_prerequisites() -> str | None:
    """Why this machine cannot run the cross-host benchmarks, or None."""
    return missing_prerequisites()


class Testbed:
    """Two namespaces, a private smbd with the bench user in the server's, a work
    directory (npipe.testing.netns.smb_site); starts the servers and clients in them.
    Everything is removed on exit, also on failure: children first, then smbd, the
    namespaces, the directory and the Unix account if it was created here."""

    def __init__(self, prefix: str = "npxb") -> None:
        self.prefix = prefix
        self.children: list[Child] = []
        self.made_user = not _user_exists(USER)
        self._stack = contextlib.ExitStack()
        self.smbd: Any = None

    def __enter__(self) -> Testbed:
        try:
            self.site: SmbSite = self._stack.enter_context(
                smb_site({USER: PASSWORD}, prefix=self.prefix))
            self.hosts, self.smbd, self.workdir = self.site.hosts, self.site.smbd, self.site.workdir
            self._stack.callback(self._stop_all)  # before smbd stops and the namespaces go
        except BaseException:
            self.__exit__(None, None, None)
            raise
        print(f"# smbd {self.smbd.addresses} in {self.hosts.server_ns}; clients in "
              f"{self.hosts.client_ns} ({self.hosts.client_ip})", file=sys.stderr, flush=True)
        self.env = self.site.server_env(PYTHONUNBUFFERED="1")
        for name in ("NPIPE_USER", "NPIPE_PASSWORD", "NPIPE_SMB_BACKEND"):
            self.env.pop(name, None)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()
        finally:
            if self.made_user and _user_exists(USER):
                userdel = shutil.which("userdel") or shutil.which("userdel", path="/usr/sbin")
                if userdel:
                    subprocess.run([userdel, USER], capture_output=True, timeout=30)

    def _stop_all(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()

    def spawn(self, name: str, side: str, argv: list[str]) -> Child:
        """Start ``python argv...`` in the server or client namespace."""
        ns = self.hosts.server_ns if side == "server" else self.hosts.client_ns
        child = Child(name, ns, [sys.executable, *argv], self.env,
                      self.workdir / f"{name.replace(' ', '-')}.log")
        self.children.append(child)
        return child

    def start_servers(self, kinds: list[str]) -> dict[str, tuple[Child, dict[str, Any]]]:
        """The servers (``testbed.py --server KIND``), all started before waiting (their
        imports overlap)."""
        servers = {kind: self.spawn(f"server {kind}", "server",
                                    [str(SCRIPT), "--server", kind, "--host",
                                     self.hosts.server_ip])
                   for kind in kinds}
        return {kind: (s, s.reply(START_TIMEOUT_S)) for kind, s in servers.items()}

    def target(self, transport: str, ready: dict[str, Any]) -> str:
        server_ip = str(self.hosts.server_ip)
        if "port" in ready:
            return f"{server_ip}:{ready['port']}"
        if transport.startswith(("smbprotocol", "impacket", "smb2-echo", "minimal")):
            return server_ip
        return f"//{server_ip}/pipe/{ready['pipe']}"

    def smbd_rss_kib(self) -> int:
        """The resident memory of smbd and every process it started, KiB."""
        pid = self.smbd.pid if self.smbd is not None else None
        return sum(rss_kib(p) for p in _process_tree(pid)) if pid else 0


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rpartition(")")[2].split()[1])
                children[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: unwind (every finally: and exit runs); later ones are ignored
    so that they cannot cut the cleanup short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind the cleanup instead of killing the run half-way."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--server", required=True, choices=SERVER_KINDS, help="what to serve")
    p.add_argument("--host", default="198.18.0.1", help="the address TCP servers listen on")
    args = p.parse_args(argv)
    return serve(args.server, args.host)


if __name__ == "__main__":
    sys.exit(main())
