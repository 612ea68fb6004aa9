#!/usr/bin/env python3
"""Cross-host benchmark: gRPC and raw pipe I/O between two network namespaces, through smbd.

Two "hosts" on one machine (network namespaces joined by a veth link: server 198.18.0.1,
client 198.18.0.2), a private smbd on port 445 in the server's, and side by side in one
run:

* gRPC, unary latency (p50, p99) of a 100-byte echo and the throughput (MB/s, 10^6
  bytes/s) of a client stream of 1 MiB messages, for
  - ``grpc-tcp``: plain grpcio over TCP on the link (server on 198.18.0.1:PORT);
  - ``grpc-smb``: grpcio through the SMB pipe with npipe, default security (signed,
    and encrypted where the server can: SMB 3.1.1 here);
  - ``grpc-smb-signed``: the same with ``encrypt=False`` (signed only);
* raw bytes, the round trip of a 64-byte echo (p50, p99) and the throughput of a
  1 MiB echo, all against one npipe raw echo server behind smbd, for
  - ``npipe`` / ``npipe-signed``: ``npipe.open_connection`` (default / ``encrypt=False``);
  - ``smbprotocol`` / ``smbprotocol-signed``: smbprotocol's Connection, Session,
    TreeConnect and Open used directly (WRITE, then READ), encrypted / signed only;
  - ``impacket``: impacket's SMBConnection (writeFile, then readFile); no 1 MiB echo;
  - ``tcp``: an asyncio TCP echo on the link, the floor the wire itself sets.

Every server runs in the server namespace and every client in the client namespace, each
in a process of its own (``--server KIND`` and ``--client KIND`` modes of this script).
A client connects once, warms up and then answers commands on stdin, one JSON line each
(``lat N``: N round trips, their times in us; ``tput N``: a stream of N x 1 MiB, or N
1 MiB echoes, in MB/s). The orchestrator interleaves the transports as grpc_local.py
does: each round is cut into slices and the order rotates every slice, so noise from
elsewhere on the machine lands on all of them alike; the tables show the median over
rounds of each round's p50, p99 and median MB/s, and ratios between those medians.

    python bench/cross_host.py                  # 5 rounds, about 3.5 minutes on 2 CPUs
    python bench/cross_host.py --quick          # smoke run, well under a minute
    python bench/cross_host.py --json out.json --plot out.png

Needs root (network namespaces, smbd), Samba's smbd and smbpasswd, iproute2, grpcio,
smbprotocol and impacket. Namespaces, smbd, its files and the SMB user it created are
removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import pwd
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc_local import SERVICE, _rotated, bench_service, machine_info, percentile

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()

USER = "npbench"
PASSWORD = "Bench-Passw0rd-7"
GRPC_PIPE = "benchgrpc"
RAW_PIPE = "benchraw"
# the service bench_service() serves (grpc_local.SERVICE)
ECHO = f"/{SERVICE}/Echo"
UPLOAD = f"/{SERVICE}/Upload"
UNARY_BYTES = 100
RAW_BYTES = 64
MIB = 1 << 20
SERVER_WORKERS = 4
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 60.0
# A command is given this long plus per-op slack: a stuck transport fails the run.
COMMAND_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0

GRPC_TRANSPORTS = ("grpc-tcp", "grpc-smb", "grpc-smb-signed")
RAW_TRANSPORTS = ("tcp", "npipe", "npipe-signed", "smbprotocol", "smbprotocol-signed",
                  "impacket")
ALL_TRANSPORTS = GRPC_TRANSPORTS + RAW_TRANSPORTS
GRPC_BASELINE = "grpc-tcp"
# Raw clients compared with smbprotocol used directly at the same protection.
# impacket encrypts whenever the server can (AES-128-CCM, the only cipher it offers).
RAW_PAIRS = {"npipe": "smbprotocol", "npipe-signed": "smbprotocol-signed",
             "impacket": "smbprotocol"}
NO_THROUGHPUT = {"impacket"}
DESCRIPTIONS = {
    "grpc-tcp": "grpcio, TCP 198.18.0.1:PORT across the link",
    "grpc-smb": "grpcio via npipe.grpc.channel('//198.18.0.1/pipe/...'), default security",
    "grpc-smb-signed": "the same, encrypt=False (signed only)",
    "tcp": "asyncio TCP echo across the link (the wire's floor; no SMB)",
    "npipe": "npipe.open_connection('//198.18.0.1/pipe/...'), default security",
    "npipe-signed": "the same, encrypt=False",
    "smbprotocol": "smbprotocol Open.write then Open.read, require_encryption=True",
    "smbprotocol-signed": "the same, require_encryption=False (signed)",
    "impacket": "impacket SMBConnection.writeFile then readFile",
}
# Which server each client talks to: (server kind, how to reach it).
SERVER_OF = {
    "grpc-tcp": "grpc-tcp", "grpc-smb": "grpc-pipe", "grpc-smb-signed": "grpc-pipe",
    "tcp": "raw-tcp", "npipe": "raw-pipe", "npipe-signed": "raw-pipe",
    "smbprotocol": "raw-pipe", "smbprotocol-signed": "raw-pipe", "impacket": "raw-pipe",
}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# ================================================================== servers (server ns)


def serve(kind: str, host: str) -> int:
    """Serve ``kind`` until stdin closes; print {"ready": ...}, then the stats at the end."""
    if kind.startswith("grpc"):
        return _serve_grpc(kind, host)
    asyncio.run(_serve_raw(kind, host))
    return 0


def _serve_grpc(kind: str, host: str) -> int:
    from concurrent import futures

    import grpc

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

    stats = {"connections": 0, "bytes": 0, "callers": []}

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        if kind == "raw-pipe":
            stats["callers"].append(str(npipe.caller(writer)))
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
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    emit(ready)
    async with server:
        await done
    emit({"stats": stats})


# ================================================================== clients (client ns)


class BenchClient:
    """One transport's client: ``lat(n)`` in us per round trip, ``tput(n)`` in MB/s."""

    def info(self) -> dict[str, Any]:
        return {}

    def lat(self, n: int) -> list[float]:
        raise NotImplementedError

    def tput(self, n: int) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _timed(op: Callable[[], None], n: int) -> list[float]:
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        op()
        out.append((clock() - t0) / 1000.0)
    return out


class GrpcClient(BenchClient):
    def __init__(self, kind: str, target: str) -> None:
        import grpc

        import npipe.grpc
        from npipe.smb.credentials import Credentials

        self.kind = kind
        if kind == "grpc-tcp":
            self.channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
        else:
            self.channel = npipe.grpc.channel(
                target, credentials=Credentials(USER, PASSWORD),
                encrypt=None if kind == "grpc-smb" else False,
            )
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT_S)
        self.echo = self.channel.unary_unary(ECHO, _registered_method=True)
        self.upload = self.channel.stream_unary(UPLOAD, _registered_method=True)
        self.payload = os.urandom(UNARY_BYTES)
        self.big = os.urandom(MIB)

    def info(self) -> dict[str, Any]:
        return _smb_link_info() if self.kind != "grpc-tcp" else {}

    def lat(self, n: int) -> list[float]:
        payload, echo = self.payload, self.echo

        def one() -> None:
            if len(echo(payload, timeout=CALL_TIMEOUT_S)) != UNARY_BYTES:
                raise AssertionError("short echo")

        return _timed(one, n)

    def tput(self, n: int) -> list[float]:
        big = self.big
        t0 = time.perf_counter()
        reply = self.upload(iter([big] * n), timeout=CALL_TIMEOUT_S)
        elapsed = time.perf_counter() - t0
        moved = int.from_bytes(reply, "little")
        if moved != n * MIB:
            raise AssertionError(f"server counted {moved} bytes, sent {n * MIB}")
        return [moved / elapsed / 1e6]

    def close(self) -> None:
        self.channel.close()


def _smb_link_info() -> dict[str, Any]:
    """What npipe's shared SMB connection negotiated (dialect, cipher, signing)."""
    from npipe.smb import smbprotocol_backend as backend

    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = backend.connections()[0]
        out = {"dialect": info.dialect, "signed": info.signed, "encrypted": info.encrypted}
        with backend._registry_lock:
            link = next(iter(backend._links.values())).result()
        out.update(_smbprotocol_algorithms(link.conn, info.encrypted))
    return out


def _smbprotocol_algorithms(conn: Any, encrypted: bool) -> dict[str, Any]:
    """The cipher (if this session encrypts) or the signing algorithm (if it only signs)."""
    from smbprotocol.connection import Ciphers, SigningAlgorithms

    if encrypted and conn.cipher_id:
        return {"cipher": _enum_name(Ciphers, conn.cipher_id)}
    if not encrypted and conn.signing_algorithm_id is not None:
        return {"signing": _enum_name(SigningAlgorithms, conn.signing_algorithm_id)}
    return {}


def _enum_name(cls: Any, value: int) -> str:
    for name in dir(cls):
        if not name.startswith("_") and getattr(cls, name) == value:
            return name
    return hex(value)


class AsyncEchoClient(BenchClient):
    """The asyncio clients (npipe.open_connection, plain TCP) on a loop of their own."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop()
        self.reader, self.writer = self.loop.run_until_complete(self._open(target))
        self.payload = os.urandom(RAW_BYTES)
        self.big = os.urandom(MIB)

    async def _open(self, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.kind == "tcp":
            host, _, port = target.rpartition(":")
            return await asyncio.open_connection(host, int(port))
        import npipe
        from npipe.smb.credentials import Credentials

        return await npipe.open_connection(
            target, credentials=Credentials(USER, PASSWORD),
            encrypt=None if self.kind == "npipe" else False,
        )

    def info(self) -> dict[str, Any]:
        return _smb_link_info() if self.kind != "tcp" else {}

    def lat(self, n: int) -> list[float]:
        return self.loop.run_until_complete(self._lat(n))

    async def _lat(self, n: int) -> list[float]:
        reader, writer, payload = self.reader, self.writer, self.payload
        clock = time.perf_counter_ns
        out = []
        for _ in range(n):
            t0 = clock()
            writer.write(payload)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(RAW_BYTES), CALL_TIMEOUT_S)
            out.append((clock() - t0) / 1000.0)
            if got != payload:
                raise AssertionError("the echo differs")
        return out

    def tput(self, n: int) -> list[float]:
        return self.loop.run_until_complete(self._tput(n))

    async def _tput(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.writer.write(self.big)
            _, got = await asyncio.wait_for(
                asyncio.gather(self.writer.drain(), self.reader.readexactly(MIB)),
                CALL_TIMEOUT_S,
            )
            out.append(MIB / (time.perf_counter() - t0) / 1e6)
            if got != self.big:
                raise AssertionError("the 1 MiB echo differs")
        return out

    def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.wait_for(self.writer.wait_closed(), 5))
        self.loop.close()


class SmbprotocolClient(BenchClient):
    """smbprotocol used directly: one Connection/Session/TreeConnect/Open, sync calls."""

    def __init__(self, kind: str, host: str) -> None:
        from smbprotocol.connection import Connection
        from smbprotocol.open import (
            CreateDisposition,
            CreateOptions,
            FilePipePrinterAccessMask,
            ImpersonationLevel,
            Open,
            ShareAccess,
        )
        from smbprotocol.session import Session
        from smbprotocol.tree import TreeConnect

        self.conn = Connection(uuid.uuid4(), host, 445)
        self.conn.connect(timeout=START_TIMEOUT_S)
        self.session = Session(self.conn, USER, PASSWORD,
                               require_encryption=kind == "smbprotocol")
        self.session.connect()
        self.tree = TreeConnect(self.session, rf"\\{host}\IPC$")
        self.tree.connect()
        self.op = Open(self.tree, RAW_PIPE)
        self.op.create(
            ImpersonationLevel.Impersonation,
            FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
            0,
            ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
            CreateDisposition.FILE_OPEN,
            CreateOptions.FILE_NON_DIRECTORY_FILE,
        )
        # A 1 MiB WRITE costs 16 credits: ask for a few more up front (SMB2 ECHO).
        self.conn.echo(sid=self.session.session_id, credit_request=64)
        self.payload = os.urandom(RAW_BYTES)
        self.big = os.urandom(MIB)

    def info(self) -> dict[str, Any]:
        from smbprotocol import Dialects

        names = {Dialects.SMB_2_0_2: "2.0.2", Dialects.SMB_2_1_0: "2.1",
                 Dialects.SMB_3_0_0: "3.0", Dialects.SMB_3_0_2: "3.0.2",
                 Dialects.SMB_3_1_1: "3.1.1"}
        return {"dialect": names.get(self.conn.dialect, hex(self.conn.dialect)),
                "signed": self.session.signing_key is not None,
                "encrypted": bool(self.session.encrypt_data),
                **_smbprotocol_algorithms(self.conn, bool(self.session.encrypt_data))}

    def _read_exactly(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            data = self.op.read(0, min(65536, n - got))
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def lat(self, n: int) -> list[float]:
        op, payload = self.op, self.payload

        def one() -> None:
            op.write(payload, 0)
            if self._read_exactly(RAW_BYTES) != payload:
                raise AssertionError("the echo differs")

        return _timed(one, n)

    def tput(self, n: int) -> list[float]:
        """The 1 MiB WRITE is sent without waiting; READs (one at a time) drain the echo,
        then the WRITE's answer is collected."""
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            message, receive = self.op.write(self.big, 0, send=False)
            request = self.conn.send(message, self.session.session_id,
                                     self.tree.tree_connect_id)
            got = self._read_exactly(MIB)
            receive(request)
            out.append(MIB / (time.perf_counter() - t0) / 1e6)
            if got != self.big:
                raise AssertionError("the 1 MiB echo differs")
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.op.close()
        self.conn.disconnect(close=True)


class ImpacketClient(BenchClient):
    def __init__(self, host: str) -> None:
        from impacket.smbconnection import SMBConnection

        self.smb = SMBConnection(host, host, sess_port=445, timeout=int(START_TIMEOUT_S))
        self.smb.login(USER, PASSWORD)
        self.tid = self.smb.connectTree("IPC$")
        self.fid = self.smb.openFile(self.tid, "\\" + RAW_PIPE, desiredAccess=0x12019F,
                                     creationOption=0x40, fileAttributes=0x80)
        self.payload = os.urandom(RAW_BYTES)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            inner = self.smb.getSMBServer()
            dialect = self.smb.getDialect()
            out["dialect"] = {0x202: "2.0.2", 0x210: "2.1", 0x300: "3.0", 0x302: "3.0.2",
                              0x311: "3.1.1"}.get(dialect, str(dialect))
            out["signed"] = bool(inner._Session["SigningActivated"])
            tree = inner._Session["TreeConnectTable"].get(self.tid, {})
            out["encrypted"] = bool(tree.get("EncryptData")) or bool(
                inner._Session["SessionFlags"] & 0x4)  # SMB2_SESSION_FLAG_ENCRYPT_DATA
            if out["encrypted"]:
                out["cipher"] = "AES_128_CCM"  # the only one impacket offers and uses
        return out

    def lat(self, n: int) -> list[float]:
        smb, tid, fid, payload = self.smb, self.tid, self.fid, self.payload

        def one() -> None:
            smb.writeFile(tid, fid, payload)
            got = b""
            while len(got) < RAW_BYTES:
                got += smb.readFile(tid, fid, 0, RAW_BYTES - len(got))
            if got != payload:
                raise AssertionError("the echo differs")

        return _timed(one, n)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.smb.closeFile(self.tid, self.fid)
        with contextlib.suppress(Exception):
            self.smb.close()


def make_client(kind: str, target: str) -> BenchClient:
    if kind in GRPC_TRANSPORTS:
        return GrpcClient(kind, target)
    if kind in ("tcp", "npipe", "npipe-signed"):
        return AsyncEchoClient(kind, target)
    if kind in ("smbprotocol", "smbprotocol-signed"):
        return SmbprotocolClient(kind, target)
    if kind == "impacket":
        return ImpacketClient(target)
    raise ValueError(f"unknown client {kind}")


def client_main(kind: str, target: str, warmup: int) -> int:
    """Connect, warm up, say ready, then answer ``lat N`` / ``tput N`` until stdin ends."""
    try:
        client = make_client(kind, target)
        client.lat(warmup)
        if kind not in NO_THROUGHPUT:
            client.tput(2)
    except Exception as e:
        emit({"error": f"{type(e).__name__}: {e}"})
        return 1
    emit({"ready": True, "info": client.info()})
    status = 0
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        try:
            if command == "lat":
                emit({"us": [round(x, 1) for x in client.lat(int(arg))]})
            elif command == "tput":
                emit({"mb_s": [round(x, 2) for x in client.tput(int(arg))]})
            else:
                emit({"error": f"unknown command {command!r}"})
        except Exception as e:
            emit({"error": f"{type(e).__name__}: {e}"})
            status = 1
            break
    with contextlib.suppress(Exception):
        client.close()
    return status


# ================================================================== the orchestrator


class Child:
    """A server or client process in a namespace, spoken to in JSON lines."""

    def __init__(self, name: str, netns: Any, ns: str, argv: list[str], env: dict[str, str],
                 log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = netns.popen_in(
                ns, argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, start_new_session=True,  # Ctrl-C is the orchestrator's to handle
            )
        self._buf = b""

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
        msg = json.loads(line)
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


@dataclass
class Result:
    latencies: list[list[float]] = field(default_factory=list)  # per round, us
    throughputs: list[list[float]] = field(default_factory=list)  # per round, MB/s

    def p50s(self) -> list[float]:
        return [percentile(r, 50) for r in self.latencies]

    def p99s(self) -> list[float]:
        return [percentile(r, 99) for r in self.latencies]

    def mbps(self) -> list[float]:
        return [statistics.median(r) for r in self.throughputs if r]


def run_rounds(clients: dict[str, Child], args: argparse.Namespace) -> dict[str, Result]:
    """Round-robin: unary/echo slices with a rotating order, then throughput turns."""
    names = list(clients)
    results = {t: Result() for t in names}
    slices = max(1, min(10, args.calls))
    turn = 0
    for r in range(args.rounds):
        lat: dict[str, list[float]] = {t: [] for t in names}
        mbs: dict[str, list[float]] = {t: [] for t in names}
        for s in range(slices):
            n = args.calls // slices + (1 if s < args.calls % slices else 0)
            for t in _rotated(names, turn):
                lat[t] += clients[t].ask(f"lat {n}", COMMAND_TIMEOUT_S + n * 0.05)["us"]
            turn += 1
        for _ in range(args.streams):
            for t in _rotated(names, turn):
                if t in NO_THROUGHPUT:
                    continue
                n = args.msgs if t in GRPC_TRANSPORTS else args.echoes
                mbs[t] += clients[t].ask(f"tput {n}", COMMAND_TIMEOUT_S + n)["mb_s"]
            turn += 1
        for t in names:
            results[t].latencies.append(lat[t])
            results[t].throughputs.append(mbs[t])
        line = "  ".join(
            f"{t} {results[t].p50s()[-1]:.0f}/{results[t].p99s()[-1]:.0f}us"
            + (f" {results[t].mbps()[-1]:.0f}MB/s" if results[t].mbps() else "")
            for t in names
        )
        print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    return results


def summarize(results: dict[str, Result]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for t, res in results.items():
        row: dict[str, Any] = {
            "p50_us": statistics.median(res.p50s()),
            "p99_us": statistics.median(res.p99s()),
            "mb_s": statistics.median(res.mbps()) if res.mbps() else None,
            "p50_us_rounds": [round(x, 1) for x in res.p50s()],
            "p99_us_rounds": [round(x, 1) for x in res.p99s()],
            "mb_s_rounds": [round(x, 1) for x in res.mbps()],
        }
        base_name = GRPC_BASELINE if t in GRPC_TRANSPORTS else RAW_PAIRS.get(t)
        base = results.get(base_name) if base_name and base_name != t else None
        if base is not None:
            row["vs"] = base_name
            row["p50_ratio"] = row["p50_us"] / statistics.median(base.p50s())
            row["p99_ratio"] = row["p99_us"] / statistics.median(base.p99s())
            row["p50_ratio_rounds"] = [
                round(a / b, 3) for a, b in zip(res.p50s(), base.p50s(), strict=True)
            ]
            if res.mbps() and base.mbps():
                row["mb_s_ratio"] = row["mb_s"] / statistics.median(base.mbps())
                row["mb_s_ratio_rounds"] = [
                    round(a / b, 3) for a, b in zip(res.mbps(), base.mbps(), strict=True)
                ]
        summary[t] = row
    return summary


def format_table(summary: dict[str, dict[str, Any]], names: list[str], title: str,
                 tput_label: str) -> str:
    head = (f"{title:<19} {'p50 us':>8} {'p99 us':>8} {tput_label:>8}   {'vs':<18} "
            f"{'p50':>6} {'p99':>6} {'MB/s':>6}   {'p50 ratio per round':<19}")
    lines = [head, "-" * len(head)]
    for t in names:
        if t not in summary:
            continue
        row = summary[t]
        mb = f"{row['mb_s']:>8.0f}" if row["mb_s"] is not None else f"{'-':>8}"
        ratios = ""
        if "vs" in row:
            per = row["p50_ratio_rounds"]
            mbr = f"{row['mb_s_ratio']:>5.2f}x" if "mb_s_ratio" in row else f"{'-':>6}"
            ratios = (f"{row['vs']:<18} {row['p50_ratio']:>5.2f}x {row['p99_ratio']:>5.2f}x "
                      f"{mbr}   {min(per):.2f}-{max(per):.2f}x")
        lines.append(f"{t:<19} {row['p50_us']:>8.0f} {row['p99_us']:>8.0f} {mb}   {ratios}")
    return "\n".join(lines)


def write_plot(path: str, results: dict[str, Result], info: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=100,
                             gridspec_kw={"width_ratios": [3, 6, 5]})
    ticker = matplotlib.ticker
    fmt = ticker.FuncFormatter(lambda v, _: f"{v:.0f}")

    def log_axis(ax: Any) -> None:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())

    groups = [
        (axes[0], [t for t in GRPC_TRANSPORTS if t in results],
         "gRPC unary, 100 B (box: quartiles, whiskers: p1-p99)"),
        (axes[1], [t for t in RAW_TRANSPORTS if t in results],
         "raw 64-byte echo through the pipe (tcp: no SMB)"),
    ]
    for ax, names, title in groups:
        if not names:
            ax.set_visible(False)
            continue
        pooled = [[x for rnd in results[t].latencies for x in rnd] for t in names]
        ax.boxplot(pooled, whis=(1, 99), showfliers=False)
        log_axis(ax)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=25, ha="right")
        for i, t in enumerate(names, start=1):
            p50 = statistics.median(results[t].p50s())
            ax.annotate(f"{p50:.0f}", (i, p50), xytext=(22, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.set_ylabel("round trip, us, log scale")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    ax = axes[2]
    names = [t for t in ALL_TRANSPORTS if t in results and results[t].mbps()]
    meds = [statistics.median(results[t].mbps()) for t in names]
    lo = [m - min(results[t].mbps()) for t, m in zip(names, meds, strict=True)]
    hi = [max(results[t].mbps()) - m for t, m in zip(names, meds, strict=True)]
    colors = ["tab:blue" if t in GRPC_TRANSPORTS else "tab:orange" for t in names]
    bars = ax.bar(names, meds, yerr=[lo, hi], capsize=4, color=colors, alpha=0.85)
    ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    log_axis(ax)
    ax.set_ylim(bottom=10)
    ax.set_ylabel("MB/s, log scale (median of rounds; bars: min-max)")
    ax.set_title("blue: gRPC client stream of 1 MiB msgs; orange: 1 MiB echo", fontsize=10)
    ax.tick_params(axis="x", rotation=25)
    for label in ax.get_xticklabels():
        label.set_ha("right")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(
        f"two network namespaces over veth, Samba smbd {info.get('samba', '?')} | "
        f"{info['cpu_model']}, {info['nproc']} CPUs, Linux {info['kernel']}, "
        f"Python {info['python']}, grpcio {info['grpcio']}, {info['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


def _samba_version() -> str:
    smbd = shutil.which("smbd") or shutil.which("smbd", path="/usr/sbin:/sbin")
    if smbd is None:
        return "?"
    with contextlib.suppress(Exception):
        out = subprocess.run([smbd, "-V"], capture_output=True, text=True, timeout=10).stdout
        return out.split()[-1]
    return "?"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("smbprotocol", "impacket", "npipe"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
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


def orchestrate(args: argparse.Namespace) -> int:
    missing = [t for t in ("smbd", "smbpasswd", "ip") if shutil.which(t) is None
               and shutil.which(t, path="/usr/sbin:/sbin") is None]
    if os.geteuid() != 0 or missing:
        print("needs root, smbd and smbpasswd (apt-get install samba) and ip (iproute2)"
              + (f"; missing: {', '.join(missing)}" if missing else ""), file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    netns = importlib.import_module("netns")  # two_hosts(), popen_in(): tests/netns.py
    from npipe.samba.smbd import PrivateSmbd

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    info = {**machine_info(), "samba": _samba_version(), **_versions()}
    print(f"# {info['cpu_model']} | nproc {info['nproc']} | Linux {info['kernel']} | "
          f"Python {info['python']} | grpcio {info['grpcio']} | smbprotocol "
          f"{info['smbprotocol']} | impacket {info['impacket']} | Samba {info['samba']} | "
          f"{info['date']} | load {info['loadavg_at_start']}")
    print(f"# {args.rounds} rounds x {args.calls} round trips per transport (gRPC {UNARY_BYTES} "
          f"B unary, raw {RAW_BYTES} B echo); throughput: {args.streams} x gRPC client stream "
          f"of {args.msgs} x 1 MiB, {args.streams} x {args.echoes} x 1 MiB echo; medians of "
          "per-round values", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="npxb", dir="/tmp"))
    made_user = not _user_exists(USER)
    children: list[Child] = []
    server_stats: dict[str, Any] = {}
    client_info: dict[str, Any] = {}
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            hosts = stack.enter_context(netns.two_hosts())
            smbd = PrivateSmbd(workdir / "smbd", port=445, interfaces=hosts.server_if,
                               users={USER: PASSWORD}, netns=hosts.server_ns)
            stack.enter_context(smbd)
            stack.callback(_stop_all, children)  # before smbd stops and the namespaces go
            print(f"# smbd {smbd.addresses} in {hosts.server_ns}; clients in "
                  f"{hosts.client_ns} ({hosts.client_ip})", file=sys.stderr, flush=True)
            env = {**os.environ, "NPIPE_SAMBA_NP_DIR": str(smbd.np_dir),
                   "NPIPE_PIPE_DIR": str(workdir / "pipes"), "PYTHONUNBUFFERED": "1"}
            env.pop("NPIPE_USER", None)
            env.pop("NPIPE_PASSWORD", None)
            kinds = sorted({SERVER_OF[t] for t in args.names})
            servers: dict[str, Child] = {}
            for kind in kinds:  # start them all, then wait: the imports overlap
                servers[kind] = Child(
                    f"server {kind}", netns, hosts.server_ns,
                    [sys.executable, str(SCRIPT), "--server", kind, "--host", hosts.server_ip],
                    env, workdir / f"server-{kind}.log")
                children.append(servers[kind])
            ready = {k: s.reply(START_TIMEOUT_S) for k, s in servers.items()}
            clients: dict[str, Child] = {}
            for t in args.names:
                target = _target(t, ready[SERVER_OF[t]], hosts.server_ip)
                clients[t] = Child(
                    f"client {t}", netns, hosts.client_ns,
                    [sys.executable, str(SCRIPT), "--client", t, "--target", target,
                     "--warmup", str(args.warmup)],
                    env, workdir / f"client-{t}.log")
                children.append(clients[t])
                # One at a time: their SMB logons and warm-ups would skew each other.
                client_info[t] = clients[t].reply(START_TIMEOUT_S + args.warmup * 0.05)["info"]
            results = run_rounds(clients, args)
            for c in clients.values():
                c.stop()
            for kind, s in servers.items():
                last = s.stop()
                server_stats[kind] = (last or {}).get("stats")
    except KeyboardInterrupt:
        print("interrupted: cleaned up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if made_user and _user_exists(USER):
            userdel = shutil.which("userdel") or shutil.which("userdel", path="/usr/sbin")
            if userdel:
                subprocess.run([userdel, USER], capture_output=True, timeout=30)
    elapsed = time.monotonic() - started
    report(args, info, results, client_info, server_stats, elapsed)
    return 0


def _stop_all(children: list[Child]) -> None:
    for child in reversed(children):
        with contextlib.suppress(Exception):
            child.stop()


def _target(transport: str, ready: dict[str, Any], server_ip: str) -> str:
    if "port" in ready:
        return f"{server_ip}:{ready['port']}"
    if transport in ("smbprotocol", "smbprotocol-signed", "impacket"):
        return server_ip
    return f"//{server_ip}/pipe/{ready['pipe']}"


def report(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Result],
           client_info: dict[str, Any], server_stats: dict[str, Any], elapsed: float) -> None:
    summary = summarize(results)
    grpc_names = [t for t in GRPC_TRANSPORTS if t in results]
    raw_names = [t for t in RAW_TRANSPORTS if t in results]
    print()
    if grpc_names:
        print(format_table(summary, grpc_names, "gRPC", "MB/s"))
        print()
    if raw_names:
        print(format_table(summary, raw_names, "raw echo", "1MiB MB/s"))
        print()
    for t in args.names:
        negotiated = client_info.get(t) or {}
        extra = ", ".join(f"{k} {v}" for k, v in negotiated.items())
        print(f"  {t:<19} {DESCRIPTIONS[t]}" + (f" [{extra}]" if extra else ""))
    pipe_stats = server_stats.get("grpc-pipe")
    if pipe_stats:
        print(f"\n  grpc-pipe handler: caller() known on {pipe_stats['caller_checked']} of "
              f"{pipe_stats['calls']} calls (last: {pipe_stats['caller']})")
    print()
    if "grpc-smb" in summary and "p50_ratio" in summary["grpc-smb"]:
        for t in ("grpc-smb", "grpc-smb-signed"):
            if t not in summary:
                continue
            row = summary[t]
            mbr = row.get("mb_s_ratio")
            print(f"{t}/grpc-tcp = {row['p50_ratio']:.2f}x p50 latency (target <= 1.5x), "
                  + (f"{mbr:.0%} of TCP's streaming throughput (target >= 60%)"
                     if mbr is not None else ""))
    print(f"({elapsed:.0f} s)")
    if args.json:
        raw = {
            "machine": info,
            "config": {k: getattr(args, k) for k in
                       ("rounds", "calls", "streams", "msgs", "echoes", "warmup")},
            "negotiated": client_info,
            "summary": summary,
            "server_stats": server_stats,
            "raw": {t: {"latency_us": res.latencies, "mb_s": res.throughputs}
                    for t, res in results.items()},
        }
        Path(args.json).write_text(json.dumps(raw, separators=(",", ":")) + "\n")
        print(f"raw numbers written to {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, results, info)


# ================================================================== main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (5)")
    p.add_argument("--calls", type=int, default=1500,
                   help="round trips (unary calls or echoes) per transport per round (1500)")
    p.add_argument("--streams", type=int, default=3,
                   help="throughput turns per transport per round (3)")
    p.add_argument("--msgs", type=int, default=64, help="1 MiB messages per gRPC stream (64)")
    p.add_argument("--echoes", type=int, default=8, help="1 MiB echoes per raw turn (8)")
    p.add_argument("--warmup", type=int, default=100, help="round trips before measuring (100)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few seconds per transport")
    p.add_argument("--transports", default=",".join(ALL_TRANSPORTS),
                   help=f"comma-separated, from {', '.join(ALL_TRANSPORTS)}")
    p.add_argument("--json", metavar="FILE", help="write raw numbers and the summary as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a plot (needs matplotlib)")
    # Internal: the processes the orchestrator starts inside the namespaces.
    p.add_argument("--server", choices=("grpc-tcp", "grpc-pipe", "raw-tcp", "raw-pipe"),
                   help=argparse.SUPPRESS)
    p.add_argument("--client", choices=ALL_TRANSPORTS, help=argparse.SUPPRESS)
    p.add_argument("--host", default="198.18.0.1", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.streams, args.msgs, args.echoes, args.warmup = (
            2, 100, 1, 4, 2, 20)
    names = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in names if t not in ALL_TRANSPORTS]
    if unknown:
        p.error(f"unknown transport(s): {', '.join(unknown)}")
    if min(args.rounds, args.calls, args.streams, args.msgs, args.echoes) < 1:
        p.error("--rounds, --calls, --streams, --msgs and --echoes must be at least 1")
    args.names = [t for t in ALL_TRANSPORTS if t in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.server:
        return serve(args.server, args.host)
    if args.client:
        if not args.target:
            print("--client needs --target", file=sys.stderr)
            return 2
        return client_main(args.client, args.target, args.warmup)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
