#!/usr/bin/env python3
"""Cross-host benchmark: gRPC and raw pipe I/O between two network namespaces, through smbd.

Two "hosts" on one machine (network namespaces joined by a veth link: server 198.18.0.1,
client 198.18.0.2), a private smbd on port 445 in the server's, and side by side in one
run:

* gRPC, unary latency (p50, p99) of a 100-byte echo and the throughput (MB/s, 10^6
  bytes/s) of a client stream of 1 MiB messages, for
  - ``grpc-tcp``: plain grpcio over TCP on the link (server on 198.18.0.1:PORT);
  - ``grpc-smb``: grpcio through the SMB pipe with npipe's native client, default
    security (encrypted where the server can: SMB 3.1.1 here);
  - ``grpc-smb-signed``: the same with ``encrypt=False`` (signed only);
  - ``grpc-smb-unsigned``: the same on an unsigned SMB 2.1 connection (a benchmark-only
    ``Options(sign=False, dialects=(0x0210,))``; smbd does not require signing);
  - ``grpc-smbprotocol``: the same through the smbprotocol backend, default security;
* raw bytes against one npipe raw echo server behind smbd: the round trip of a 64-byte
  echo (p50, p99) and the throughput of echoes of 64 B, 4 KiB, 64 KiB and 1 MiB, for
  - ``smb2-echo`` / ``-signed`` / ``-unsigned``: a bare SMB2 ECHO (``link.echo()``) on
    a native connection, the floor for a pipe round trip at that protection;
  - ``minimal`` / ``-signed`` / ``-unsigned``: the floor of a pipe round trip, the least
    asyncio driver around npipe's sans-I/O core: one FSCTL_PIPE_TRANSCEIVE per round
    trip, nothing posted ahead, no bridge (``smb_clients.MinimalClient``);
  - ``npipe`` / ``npipe-signed`` / ``npipe-unsigned``: ``npipe.open_connection``
    (default / ``encrypt=False`` / the unsigned SMB 2.1 options above);
  - ``smbprotocol`` / ``smbprotocol-signed``: smbprotocol's Connection, Session,
    TreeConnect and Open used directly, a round trip being one ``SMB2IOCTLRequest`` with
    FSCTL_PIPE_TRANSCEIVE; encrypted / signed only;
  - ``impacket``: impacket's SMBConnection, ``transactNamedPipe``; up to 64 KiB;
  - ``tcp``: an asyncio TCP echo on the link, the floor the wire itself sets;
* concurrency: 50 ``npipe.grpc.aio_channel`` channels (50 pipes on one SMB connection)
  x 20 concurrent unary calls, 1,000 calls at once; errors (must be 0) and the total
  time, next to the same over TCP (``grpc-smb-many``, ``grpc-tcp-many``).

Every server runs in the server namespace and every client in the client namespace, each
in a process of its own (``--server KIND`` and ``--client KIND`` modes of this script).
A client connects once, warms up and then answers commands on stdin, one JSON line each
(``lat N``: N round trips, their times in us; ``tput SIZE N``: a gRPC stream of N
messages of SIZE bytes, or N echoes of SIZE bytes, in MB/s; ``conc N``: N concurrent
calls on each channel). The orchestrator interleaves the transports as grpc_local.py
does: each round is cut into slices and the order rotates every slice, so noise from
elsewhere on the machine lands on all of them alike; the tables show the median over
rounds of each round's p50, p99 and median MB/s, and ratios between those medians.

    python bench/cross_host.py                  # 5 rounds, about 5 minutes on 2 CPUs
    python bench/cross_host.py --quick          # smoke run, about 20 s
    python bench/cross_host.py --json out.json --plot out.png

Needs root (network namespaces, smbd), Samba's smbd and smbpasswd, iproute2, grpcio,
smbprotocol and impacket (matplotlib for --plot). Namespaces, smbd, its files and the SMB
user it created are removed at the end, also on failure or Ctrl-C. Exit status 1 if a
concurrent call failed.
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc_local import SERVICE, _rotated, bench_service, percentile
from machine import header, machine_info
from smb_clients import (
    BenchClient,
    ImpacketClient,
    LoopClient,
    MinimalClient,
    SmbprotocolClient,
    security,
    smbprotocol_algorithm,
    timed,
)

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
# Echo sizes of the raw throughput runs; a turn is --echoes x the factor echoes.
SIZES = (64, 4096, 65536, MIB)
SIZE_FACTOR = {64: 16, 4096: 16, 65536: 4, MIB: 1}
SIZE_LABELS = {64: "64 B", 4096: "4 KiB", 65536: "64 KiB", MIB: "1 MiB"}
SMB_2_1 = 0x0210
SERVER_WORKERS = 4
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 60.0
# A command is given this long plus per-op slack: a stuck transport fails the run.
COMMAND_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Transport:
    """One client kind: its server, what it is, what its numbers are compared with."""

    server: str  # the server kind it talks to
    description: str
    sizes: tuple[int, ...] = ()  # throughput runs (message or echo sizes)
    lat_vs: str | None = None  # p50/p99 ratio: this / lat_vs
    tput_vs: str | None = None  # throughput ratio: this / tput_vs, per size
    security: str | None = None  # what the client must have negotiated (checked)


TRANSPORTS: dict[str, Transport] = {
    "grpc-tcp": Transport("grpc-tcp", "grpcio, TCP 198.18.0.1:PORT across the link", (MIB,)),
    "grpc-smb": Transport(
        "grpc-pipe", "grpcio via npipe.grpc.channel('//198.18.0.1/pipe/...'), native, default",
        (MIB,), "grpc-tcp", "grpc-tcp", "encrypted"),
    "grpc-smb-signed": Transport(
        "grpc-pipe", "the same, encrypt=False", (MIB,), "grpc-tcp", "grpc-tcp", "signed"),
    "grpc-smb-unsigned": Transport(
        "grpc-pipe", "the same on an unsigned SMB 2.1 connection (benchmark-only Options)",
        (MIB,), "grpc-tcp", "grpc-tcp", "unsigned"),
    "grpc-smbprotocol": Transport(
        "grpc-pipe", "the same through smb_backend='smbprotocol', default security",
        (MIB,), "grpc-tcp", "grpc-tcp", "encrypted"),
    "tcp": Transport("raw-tcp", "asyncio TCP echo across the link (the wire's floor; no SMB)",
                     SIZES),
    "smb2-echo": Transport("raw-pipe", "bare SMB2 ECHO, link.echo(), native, default",
                           security="encrypted"),
    "smb2-echo-signed": Transport("raw-pipe", "the same, encrypt=False", security="signed"),
    "smb2-echo-unsigned": Transport("raw-pipe", "the same, unsigned SMB 2.1",
                                    security="unsigned"),
    # The floor: the least asyncio driver around npipe's sans-I/O core (smb_clients.py).
    "minimal": Transport("raw-pipe", "minimal asyncio client: 1 TRANSCEIVE per round trip, "
                         "npipe's core builds the messages", SIZES, "smb2-echo", "npipe",
                         "encrypted"),
    "minimal-signed": Transport("raw-pipe", "the same, signed only", SIZES, "smb2-echo-signed",
                                "npipe-signed", "signed"),
    "minimal-unsigned": Transport("raw-pipe", "the same, unsigned SMB 2.1", SIZES,
                                  "smb2-echo-unsigned", "npipe-unsigned", "unsigned"),
    "npipe": Transport("raw-pipe", "npipe.open_connection('//198.18.0.1/pipe/...'), default",
                       SIZES, "minimal", "tcp", "encrypted"),
    "npipe-signed": Transport("raw-pipe", "the same, encrypt=False", SIZES,
                              "minimal-signed", "tcp", "signed"),
    "npipe-unsigned": Transport("raw-pipe", "the same, unsigned SMB 2.1 (native Options)",
                                SIZES, "minimal-unsigned", "tcp", "unsigned"),
    "smbprotocol": Transport(
        "raw-pipe", "smbprotocol, SMB2IOCTLRequest FSCTL_PIPE_TRANSCEIVE, require_encryption",
        SIZES, "npipe", "npipe", "encrypted"),
    "smbprotocol-signed": Transport(
        "raw-pipe", "the same, require_encryption=False", SIZES, "npipe-signed",
        "npipe-signed", "signed"),
    # impacket encrypts whenever the server can (AES-128-CCM, the only cipher it offers).
    # A 1 MiB WRITE would wait for READs that impacket's sync calls cannot post meanwhile.
    "impacket": Transport("raw-pipe", "impacket SMBConnection.transactNamedPipe",
                          SIZES[:-1], "npipe", "npipe", "encrypted"),
}
GRPC_TRANSPORTS = tuple(t for t in TRANSPORTS if t.startswith("grpc"))
RAW_TRANSPORTS = tuple(t for t in TRANSPORTS if not t.startswith("grpc"))
ALL_TRANSPORTS = tuple(TRANSPORTS)
# The concurrency run: many aio channels, each its own pipe (or TCP connection).
CONC_TRANSPORTS = {"grpc-smb-many": "grpc-pipe", "grpc-tcp-many": "grpc-tcp"}
CLIENT_KINDS = ALL_TRANSPORTS + tuple(CONC_TRANSPORTS)

# The targets: (label, row, base, metric, bound); metric "p50" is row/base (<= bound),
# "mb_s" is row/base (>= bound), "speedup" is base/row per size and p50 row/base (>= bound).
TARGETS = (
    ("gRPC unary p50 / TCP", "grpc-smb", "grpc-tcp", "p50", 1.5),
    ("gRPC 1 MiB stream / TCP", "grpc-smb", "grpc-tcp", "mb_s", 0.6),
    ("  signed: unary p50 / TCP", "grpc-smb-signed", "grpc-tcp", "p50", 1.5),
    ("  signed: 1 MiB stream / TCP", "grpc-smb-signed", "grpc-tcp", "mb_s", 0.6),
    ("npipe 64 B echo p50 / SMB2 ECHO", "npipe", "smb2-echo", "p50", 1.5),
    ("  signed", "npipe-signed", "smb2-echo-signed", "p50", 1.5),
    ("  unsigned", "npipe-unsigned", "smb2-echo-unsigned", "p50", 1.5),
    ("smbprotocol / npipe", "smbprotocol", "npipe", "speedup", 5.0),
    ("  signed", "smbprotocol-signed", "npipe-signed", "speedup", 5.0),
    ("impacket / npipe", "impacket", "npipe", "speedup", 5.0),
)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def unsigned_options() -> Any:
    """Native client options for an unsigned SMB 2.1 connection (benchmarks only)."""
    from npipe.smb.native import Options

    return Options(sign=False, dialects=(SMB_2_1,))


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
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    emit(ready)
    async with server:
        await done
    emit({"stats": {**stats, "callers": sorted(stats["callers"])}})


# ================================================================== clients (client ns)


def _native_link_info(link: Any) -> dict[str, Any]:
    neg = link.core.negotiated
    return {"dialect": neg.dialect_name if neg else "?", "security": link.security}


def _native_info() -> dict[str, Any]:
    """What this process's (only) native SMB connection negotiated. Reads the backend's
    registry of shared connections, which is private: informational only."""
    from npipe.smb.native import client as native

    with contextlib.suppress(Exception):
        for links in list(native._links.values()):
            for task in list(links.values()):
                if task.done() and not task.cancelled() and task.exception() is None:
                    return _native_link_info(task.result())
    return {}


def _smbprotocol_backend_info() -> dict[str, Any]:
    """What the smbprotocol backend's shared connection negotiated (private registry)."""
    from npipe.smb import smbprotocol_backend as backend

    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = backend.connections()[0]
        out = {"dialect": info.dialect, "security": security(info.signed, info.encrypted, None)}
        with backend._registry_lock:
            link = next(iter(backend._links.values())).result()
        out["security"] = security(info.signed, info.encrypted,
                                    smbprotocol_algorithm(link.conn, info.encrypted))
    return out


class GrpcClient(BenchClient):
    def __init__(self, kind: str, target: str) -> None:
        import grpc

        import npipe.grpc

        self.kind = kind
        self.bridge: Any = None
        if kind == "grpc-tcp":
            self.channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
        elif kind == "grpc-smb-unsigned":
            # npipe.grpc.channel() cannot take native Options: a bridge of our own.
            from npipe.address import parse_address
            from npipe.smb import PipeBridge
            from npipe.smb.native import NativeClient

            client = NativeClient(unsigned_options())
            address, creds = parse_address(target), credentials()

            async def attach(sock: Any) -> None:
                await client.attach(address, sock, credentials=creds, encrypt=False,
                                    allow_smb2=True)

            self.bridge = PipeBridge(attach, description=address.posix())
            self.channel = grpc.insecure_channel(
                self.bridge.target, options=[("grpc.default_authority", "localhost")])
        else:
            self.channel = npipe.grpc.channel(
                target, credentials=credentials(),
                encrypt=False if kind == "grpc-smb-signed" else None,
                smb_backend="smbprotocol" if kind == "grpc-smbprotocol" else "native",
            )
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT_S)
        self.echo = self.channel.unary_unary(ECHO, _registered_method=True)
        self.upload = self.channel.stream_unary(UPLOAD, _registered_method=True)
        self.payload = os.urandom(UNARY_BYTES)

    def info(self) -> dict[str, Any]:
        if self.kind == "grpc-tcp":
            return {}
        if self.kind == "grpc-smbprotocol":
            return _smbprotocol_backend_info()
        return _native_info()

    def lat(self, n: int) -> list[float]:
        payload, echo = self.payload, self.echo

        def one() -> None:
            if len(echo(payload, timeout=CALL_TIMEOUT_S)) != UNARY_BYTES:
                raise AssertionError("short echo")

        return timed(one, n)

    def tput(self, size: int, n: int) -> list[float]:
        msg = os.urandom(size)
        t0 = time.perf_counter()
        reply = self.upload(iter([msg] * n), timeout=CALL_TIMEOUT_S)
        elapsed = time.perf_counter() - t0
        moved = int.from_bytes(reply, "little")
        if moved != n * size:
            raise AssertionError(f"server counted {moved} bytes, sent {n * size}")
        return [moved / elapsed / 1e6]

    def close(self) -> None:
        self.channel.close()
        if self.bridge is not None:
            self.bridge.close()


class AsyncEchoClient(LoopClient):
    """npipe.open_connection (or the native client with unsigned options), or plain TCP."""

    def __init__(self, kind: str, target: str) -> None:
        super().__init__()
        self.kind = kind
        self.reader, self.writer = self.run(self._open(target))
        self.payload = os.urandom(RAW_BYTES)

    async def _open(self, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.kind == "tcp":
            host, _, port = target.rpartition(":")
            return await asyncio.open_connection(host, int(port))
        if self.kind == "npipe-unsigned":
            from npipe.address import parse_address
            from npipe.smb.native import NativeClient

            return await NativeClient(unsigned_options()).open_pipe(
                parse_address(target), credentials=credentials(), encrypt=False,
                allow_smb2=True)
        import npipe

        return await npipe.open_connection(
            target, credentials=credentials(),
            encrypt=None if self.kind == "npipe" else False, smb_backend="native",
        )

    def info(self) -> dict[str, Any]:
        link = getattr(self.writer.transport, "link", None)  # a native RemotePipe's
        return _native_link_info(link) if link is not None else {}

    def lat(self, n: int) -> list[float]:
        return self.run(self._lat(n))

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

    def tput(self, size: int, n: int) -> list[float]:
        return self.run(self._tput(size, n))

    async def _tput(self, size: int, n: int) -> list[float]:
        msg = os.urandom(size)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.writer.write(msg)
            _, got = await asyncio.wait_for(
                asyncio.gather(self.writer.drain(), self.reader.readexactly(size)),
                CALL_TIMEOUT_S,
            )
            out.append(size / (time.perf_counter() - t0) / 1e6)
            if got != msg:
                raise AssertionError(f"the {size}-byte echo differs")
        return out

    async def aclose(self) -> None:
        self.writer.close()
        await asyncio.wait_for(self.writer.wait_closed(), 5)


class Smb2EchoClient(LoopClient):
    """A bare SMB2 ECHO on an unshared native connection: the floor of a pipe round trip."""

    def __init__(self, kind: str, host: str) -> None:
        super().__init__()
        import npipe.smb.native

        self.link = self.run(npipe.smb.native.connect(
            host, 445, credentials=credentials(),
            encrypt=None if kind == "smb2-echo" else False,
            options=unsigned_options() if kind == "smb2-echo-unsigned" else None,
            allow_smb2=kind == "smb2-echo-unsigned",
        ))

    def info(self) -> dict[str, Any]:
        return _native_link_info(self.link)

    def lat(self, n: int) -> list[float]:
        return self.run(self._lat(n))

    async def _lat(self, n: int) -> list[float]:
        echo = self.link.echo
        clock = time.perf_counter_ns
        out = []
        for _ in range(n):
            t0 = clock()
            await echo()
            out.append((clock() - t0) / 1000.0)
        return out

    async def aclose(self) -> None:
        await self.link.close()


class ConcurrencyClient(LoopClient):
    """``channels`` grpc.aio channels, each with a subchannel (a pipe or a TCP connection)
    of its own; ``conc(k)`` makes k concurrent unary calls on each, all at once."""

    def __init__(self, kind: str, target: str, channels: int) -> None:
        super().__init__()
        self.kind = kind
        self.channels = self.run(self._open(target, channels))
        self.stubs = [c.unary_unary(ECHO, _registered_method=True) for c in self.channels]
        self.payload = os.urandom(UNARY_BYTES)

    async def _open(self, target: str, n: int) -> list[Any]:
        import grpc

        import npipe.grpc

        # Without a subchannel pool per channel, channels to one target share a connection.
        opts = [("grpc.use_local_subchannel_pool", 1)]
        if self.kind == "grpc-tcp-many":
            chans = [grpc.aio.insecure_channel(target, options=[*opts, ("grpc.enable_http_proxy",
                                                                        0)]) for _ in range(n)]
        else:
            chans = [npipe.grpc.aio_channel(target, options=opts, credentials=credentials(),
                                            smb_backend="native") for _ in range(n)]
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), START_TIMEOUT_S)
                               for c in chans))
        return chans

    def info(self) -> dict[str, Any]:
        if self.kind == "grpc-tcp-many":
            return {"channels": len(self.channels)}
        from npipe.smb import get_client

        conns = get_client("native").connections()
        return {**_native_info(), "channels": len(self.channels), "smb_connections": len(conns),
                "pipes": sum(c.pipes for c in conns)}

    def lat(self, n: int) -> list[float]:
        """n sequential calls, round robin over the channels (the warm-up)."""
        return self.run(self._lat(n))

    async def _lat(self, n: int) -> list[float]:
        clock = time.perf_counter_ns
        out = []
        for i in range(n):
            t0 = clock()
            await self.stubs[i % len(self.stubs)](self.payload, timeout=CALL_TIMEOUT_S)
            out.append((clock() - t0) / 1000.0)
        return out

    def conc(self, per_channel: int) -> dict[str, Any]:
        return self.run(self._conc(per_channel))

    async def _conc(self, per_channel: int) -> dict[str, Any]:
        import grpc

        errors: collections.Counter[str] = collections.Counter()
        times: list[float] = []
        payload = self.payload

        async def one(stub: Any) -> None:
            t0 = time.perf_counter()
            try:
                if await stub(payload, timeout=CALL_TIMEOUT_S) != payload:
                    errors["wrong reply"] += 1
                    return
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] += 1
                return
            times.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(stub) for stub in self.stubs for _ in range(per_channel)))
        elapsed = time.perf_counter() - t0
        out = {"calls": len(self.stubs) * per_channel, "errors": sum(errors.values()),
               "error_kinds": dict(errors), "seconds": round(elapsed, 4),
               "p50_ms": round(percentile(times, 50) * 1e3, 2) if times else None,
               "max_ms": round(max(times) * 1e3, 2) if times else None}
        return {**out, **self.info()}

    async def aclose(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)


def make_client(kind: str, target: str, channels: int) -> BenchClient:
    if kind in CONC_TRANSPORTS:
        return ConcurrencyClient(kind, target, channels)
    if kind in GRPC_TRANSPORTS:
        return GrpcClient(kind, target)
    if kind in ("tcp", "npipe", "npipe-signed", "npipe-unsigned"):
        return AsyncEchoClient(kind, target)
    if kind.startswith("smb2-echo"):
        return Smb2EchoClient(kind, target)
    if kind.startswith("minimal"):
        return MinimalClient(target, USER, PASSWORD, RAW_PIPE,
                             {"minimal": "encrypted", "minimal-signed": "signed",
                              "minimal-unsigned": "unsigned"}[kind], CALL_TIMEOUT_S)
    if kind in ("smbprotocol", "smbprotocol-signed"):
        return SmbprotocolClient(target, USER, PASSWORD, RAW_PIPE, kind == "smbprotocol",
                                 START_TIMEOUT_S)
    if kind == "impacket":
        return ImpacketClient(target, USER, PASSWORD, RAW_PIPE, START_TIMEOUT_S)
    raise ValueError(f"unknown client {kind}")


def client_main(kind: str, target: str, warmup: int, channels: int) -> int:
    """Connect, warm up, say ready, then answer commands until stdin ends."""
    try:
        client = make_client(kind, target, channels)
        client.lat(warmup)
        for size in TRANSPORTS[kind].sizes if kind in TRANSPORTS else ():
            client.tput(size, 2)
        info = client.info()
        want = TRANSPORTS[kind].security if kind in TRANSPORTS else None
        if want and not str(info.get("security", "")).startswith(want):
            raise AssertionError(f"expected a {want} connection, got {info}")
    except Exception as e:
        emit({"error": f"{type(e).__name__}: {e}"})
        return 1
    emit({"ready": True, "info": info})
    status = 0
    for line in sys.stdin:
        command, *args = line.split()
        try:
            if command == "lat":
                emit({"us": [round(x, 1) for x in client.lat(int(args[0]))]})
            elif command == "tput":
                emit({"mb_s": [round(x, 2) for x in client.tput(int(args[0]), int(args[1]))]})
            elif command == "conc" and isinstance(client, ConcurrencyClient):
                emit(client.conc(int(args[0])))
            else:
                emit({"error": f"unknown command {line.strip()!r}"})
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
    missing = [t for t in ("smbd", "smbpasswd", "ip") if shutil.which(t) is None
               and shutil.which(t, path="/usr/sbin:/sbin") is None]
    if os.geteuid() != 0 or missing:
        return ("needs root, smbd and smbpasswd (apt-get install samba) and ip (iproute2)"
                + (f"; missing: {', '.join(missing)}" if missing else ""))
    return None


class Testbed:
    """Two namespaces, a private smbd with the bench user in the server's, a work
    directory; starts this script's servers and clients in them. Everything is removed
    on exit, also on failure: children first, then smbd, the namespaces, the directory
    and the Unix account if it was created here."""

    def __init__(self, prefix: str = "npxb") -> None:
        from npipe.testing import netns

        self.netns = netns
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.children: list[Child] = []
        self.made_user = not _user_exists(USER)
        self._stack = contextlib.ExitStack()
        self.smbd: Any = None

    def __enter__(self) -> Testbed:
        from npipe.samba.smbd import PrivateSmbd

        try:
            self.hosts = self._stack.enter_context(self.netns.two_hosts())
            self.smbd = PrivateSmbd(self.workdir / "smbd", port=445,
                                    interfaces=self.hosts.server_if,
                                    users={USER: PASSWORD}, netns=self.hosts.server_ns)
            self._stack.enter_context(self.smbd)
            self._stack.callback(self._stop_all)  # before smbd stops and the namespaces go
        except BaseException:
            self.__exit__(None, None, None)
            raise
        print(f"# smbd {self.smbd.addresses} in {self.hosts.server_ns}; clients in "
              f"{self.hosts.client_ns} ({self.hosts.client_ip})", file=sys.stderr, flush=True)
        self.env = {**os.environ, "NPIPE_SAMBA_NP_DIR": str(self.smbd.np_dir),
                    "NPIPE_PIPE_DIR": str(self.workdir / "pipes"), "PYTHONUNBUFFERED": "1"}
        for name in ("NPIPE_USER", "NPIPE_PASSWORD", "NPIPE_SMB_BACKEND"):
            self.env.pop(name, None)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
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
        child = Child(name, self.netns, ns, [sys.executable, *argv], self.env,
                      self.workdir / f"{name.replace(' ', '-')}.log")
        self.children.append(child)
        return child

    def start_servers(self, kinds: list[str]) -> dict[str, tuple[Child, dict[str, Any]]]:
        """This script's servers, all started before waiting (their imports overlap)."""
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


@dataclass
class Result:
    latencies: list[list[float]] = field(default_factory=list)  # per round, us
    # size -> per round, MB/s
    throughputs: dict[int, list[list[float]]] = field(default_factory=dict)

    def p50s(self) -> list[float]:
        return [percentile(r, 50) for r in self.latencies]

    def p99s(self) -> list[float]:
        return [percentile(r, 99) for r in self.latencies]

    def mbps(self, size: int) -> list[float]:
        return [statistics.median(r) for r in self.throughputs.get(size, []) if r]


def turn_size(args: argparse.Namespace, transport: str, size: int) -> int:
    """Messages in one gRPC stream, or echoes in one raw throughput turn."""
    return int(args.msgs if transport in GRPC_TRANSPORTS else args.echoes * SIZE_FACTOR[size])


def run_rounds(clients: dict[str, Child], args: argparse.Namespace) -> dict[str, Result]:
    """Round-robin: latency slices with a rotating order, then throughput turns."""
    names = list(clients)
    results = {t: Result() for t in names}
    slices = max(1, min(10, args.calls))
    turn = 0
    for r in range(args.rounds):
        lat: dict[str, list[float]] = {t: [] for t in names}
        mbs: dict[str, dict[int, list[float]]] = {
            t: {s: [] for s in TRANSPORTS[t].sizes} for t in names}
        for s in range(slices):
            n = args.calls // slices + (1 if s < args.calls % slices else 0)
            for t in _rotated(names, turn):
                lat[t] += clients[t].ask(f"lat {n}", COMMAND_TIMEOUT_S + n * 0.05)["us"]
            turn += 1
        for _ in range(args.streams):
            for t in _rotated(names, turn):
                for size in TRANSPORTS[t].sizes:
                    n = turn_size(args, t, size)
                    mbs[t][size] += clients[t].ask(
                        f"tput {size} {n}", COMMAND_TIMEOUT_S + n * size / MIB)["mb_s"]
            turn += 1
        for t in names:
            results[t].latencies.append(lat[t])
            for size, values in mbs[t].items():
                results[t].throughputs.setdefault(size, []).append(values)
        line = "  ".join(
            f"{t} {results[t].p50s()[-1]:.0f}/{results[t].p99s()[-1]:.0f}us"
            + (f" {results[t].mbps(MIB)[-1]:.0f}MB/s" if results[t].mbps(MIB) else "")
            for t in names
        )
        print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    return results


def run_concurrency(tb: Testbed, servers: dict[str, tuple[Child, dict[str, Any]]],
                    args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The concurrent calls, ``--conc-runs`` times per transport, alternating."""
    clients: dict[str, Child] = {}
    for kind, server_kind in CONC_TRANSPORTS.items():
        if server_kind not in servers:
            continue
        target = tb.target(kind, servers[server_kind][1])
        clients[kind] = tb.spawn(
            f"client {kind}", "client",
            [str(SCRIPT), "--client", kind, "--target", target, "--warmup",
             str(args.channels * 2), "--channels", str(args.channels)])
        clients[kind].reply(START_TIMEOUT_S + args.channels)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in clients}
    for i in range(args.conc_runs):
        for kind in _rotated(list(clients), i):
            runs[kind].append(clients[kind].ask(f"conc {args.per_channel}",
                                                COMMAND_TIMEOUT_S + args.per_channel))
            last = runs[kind][-1]
            print(f"concurrency {i + 1}/{args.conc_runs}: {kind} {last['calls']} calls in "
                  f"{last['seconds']:.2f} s, {last['errors']} errors", file=sys.stderr,
                  flush=True)
    for c in clients.values():
        c.stop()
    return runs


def summarize(results: dict[str, Result]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for t, res in results.items():
        spec = TRANSPORTS[t]
        row: dict[str, Any] = {
            "p50_us": statistics.median(res.p50s()),
            "p99_us": statistics.median(res.p99s()),
            "p50_us_rounds": [round(x, 1) for x in res.p50s()],
            "p99_us_rounds": [round(x, 1) for x in res.p99s()],
            "mb_s": {s: statistics.median(res.mbps(s)) for s in spec.sizes if res.mbps(s)},
            "mb_s_rounds": {s: [float(f"{x:.4g}") for x in res.mbps(s)] for s in spec.sizes},
        }
        base = results.get(spec.lat_vs) if spec.lat_vs else None
        if base is not None:
            row["vs"] = spec.lat_vs
            row["p50_ratio"] = row["p50_us"] / statistics.median(base.p50s())
            row["p99_ratio"] = row["p99_us"] / statistics.median(base.p99s())
            row["p50_ratio_rounds"] = [
                round(a / b, 3) for a, b in zip(res.p50s(), base.p50s(), strict=True)
            ]
        base = results.get(spec.tput_vs) if spec.tput_vs else None
        if base is not None:
            row["tput_vs"] = spec.tput_vs
            row["mb_s_ratio"] = {  # this / tput_vs, per size
                s: row["mb_s"][s] / statistics.median(base.mbps(s))
                for s in row["mb_s"] if base.mbps(s)
            }
            row["mb_s_ratio_rounds"] = {
                s: [round(a / b, 3) for a, b in zip(res.mbps(s), base.mbps(s), strict=True)]
                for s in row["mb_s_ratio"]
            }
        summary[t] = row
    return summary


def _mb(value: float) -> str:
    return f"{value:>7.{0 if value >= 100 else 1 if value >= 10 else 2}f}"


def _x(value: float | None, width: int = 6) -> str:
    return f"{value:>{width - 1}.2f}x" if value is not None else f"{'-':>{width}}"


def format_grpc_table(summary: dict[str, dict[str, Any]], names: list[str]) -> str:
    head = (f"{'gRPC':<19} {'p50 us':>8} {'p99 us':>8} {'MB/s':>8}   {'vs':<10} "
            f"{'p50':>6} {'p99':>6} {'MB/s':>6}   {'p50 ratio per round':<19}")
    lines = [head, "-" * len(head)]
    for t in names:
        row = summary[t]
        mb = row["mb_s"].get(MIB)
        line = (f"{t:<19} {row['p50_us']:>8.0f} {row['p99_us']:>8.0f} "
                + (f"{mb:>8.0f}" if mb is not None else f"{'-':>8}"))
        if "vs" in row:
            per = row["p50_ratio_rounds"]
            line += (f"   {row['vs']:<10} {_x(row['p50_ratio'])} {_x(row['p99_ratio'])} "
                     f"{_x(row.get('mb_s_ratio', {}).get(MIB))}   "
                     f"{min(per):.2f}-{max(per):.2f}x")
        lines.append(line)
    return "\n".join(lines)


def format_raw_tables(summary: dict[str, dict[str, Any]], names: list[str]) -> str:
    head = (f"{'raw 64 B echo':<19} {'p50 us':>8} {'p99 us':>8}   {'vs':<18} "
            f"{'p50':>6} {'p99':>6}   {'p50 ratio per round':<19}")
    lines = [head, "-" * len(head)]
    for t in names:
        row = summary[t]
        line = f"{t:<19} {row['p50_us']:>8.0f} {row['p99_us']:>8.0f}"
        if "vs" in row:
            per = row["p50_ratio_rounds"]
            line += (f"   {row['vs']:<18} {_x(row['p50_ratio'])} {_x(row['p99_ratio'])}   "
                     f"{min(per):.2f}-{max(per):.2f}x")
        lines.append(line)
    # Throughput by size; npipe rows compared with TCP (this / tcp), the other SMB
    # clients with npipe (npipe / this: how many times faster npipe is).
    labels = [SIZE_LABELS[s] for s in SIZES]
    head = (f"{'raw echo MB/s':<19} " + " ".join(f"{x:>7}" for x in labels)
            + f"   {'ratio':<24} " + " ".join(f"{x:>6}" for x in labels))
    lines += ["", head, "-" * len(head)]
    for t in names:
        row = summary[t]
        if not TRANSPORTS[t].sizes:
            continue
        line = f"{t:<19} " + " ".join(
            _mb(row["mb_s"][s]) if s in row["mb_s"] else f"{'-':>7}" for s in SIZES)
        ratio = row.get("mb_s_ratio")
        if ratio:
            base = row["tput_vs"]
            if base == "tcp":
                what, vals = f"this / {base}", [ratio.get(s) for s in SIZES]
            else:
                what = f"{base} / this"
                vals = [1 / ratio[s] if s in ratio else None for s in SIZES]
            line += f"   {what:<24} " + " ".join(_x(v) for v in vals)
        lines.append(line)
    return "\n".join(lines)


def format_concurrency(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    head = (f"{'concurrency':<19} {'calls':>6} {'errors':>6} {'total s':>8} {'calls/s':>8} "
            f"{'p50 ms':>7} {'max ms':>7}   {'runs: total s':<20}")
    lines = [f"{args.channels} grpc.aio channels x {args.per_channel} concurrent unary "
             f"calls ({UNARY_BYTES} B), all at once; median of {args.conc_runs} run(s), "
             "errors summed", head, "-" * len(head)]
    for kind, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        med = statistics.median(secs)
        calls = rs[0]["calls"]
        p50s = [r["p50_ms"] for r in rs if r["p50_ms"] is not None]
        maxs = [r["max_ms"] for r in rs if r["max_ms"] is not None]
        line = (f"{kind:<19} {calls:>6} {sum(r['errors'] for r in rs):>6} {med:>8.2f} "
                f"{calls / med:>8.0f} "
                + (f"{statistics.median(p50s):>7.1f} {max(maxs):>7.1f}" if p50s else
                   f"{'-':>7} {'-':>7}")
                + "   " + " ".join(f"{s:.2f}" for s in secs))
        lines.append(line)
        last = rs[-1]
        if "smb_connections" in last:
            lines.append(f"{'':<19} {last['channels']} channels on {last['smb_connections']} "
                         f"SMB connection(s), {last['pipes']} pipes open "
                         f"({last.get('security', '?')})")
        kinds = collections.Counter[str]()
        for r in rs:
            kinds.update(r.get("error_kinds") or {})
        if kinds:
            lines.append(f"{'':<19} errors: {dict(kinds)}")
    return "\n".join(lines)


def check_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, row, base, metric, bound in TARGETS:
        if row not in summary or base not in summary:
            continue
        s, b = summary[row], summary[base]
        if metric == "p50":
            value = s["p50_us"] / b["p50_us"]
            met, shown = value <= bound, f"{value:.2f}x (<= {bound:g}x)"
        elif metric == "mb_s":
            if MIB not in s["mb_s"] or MIB not in b["mb_s"]:
                continue
            value = s["mb_s"][MIB] / b["mb_s"][MIB]
            met, shown = value >= bound, f"{value:.0%} (>= {bound:.0%})"
        else:  # speedup: latency row/base, throughput base/row, for each size both have
            lat = s["p50_us"] / b["p50_us"]
            sizes = [z for z in SIZES if z in s["mb_s"] and z in b["mb_s"]]
            tput = {z: b["mb_s"][z] / s["mb_s"][z] for z in sizes}
            value = min([lat, *tput.values()])
            met = value >= bound
            shown = (f"p50 {lat:.1f}x, MB/s " + " ".join(
                f"{SIZE_LABELS[z]} {tput[z]:.1f}x" for z in sizes) + f" (>= {bound:g}x)")
        out.append({"target": label.strip(), "row": row, "base": base, "metric": metric,
                    "value": round(value, 3), "bound": bound, "met": met, "shown": shown,
                    "label": label})
    return out


# Plot colours: one per protection level / client, shared by gRPC, raw and the floors.
COLORS = {
    "grpc-tcp": "black", "tcp": "black",
    "grpc-smb": "tab:blue", "npipe": "tab:blue", "smb2-echo": "tab:blue",
    "grpc-smb-signed": "tab:green", "npipe-signed": "tab:green",
    "smb2-echo-signed": "tab:green",
    "grpc-smb-unsigned": "tab:red", "npipe-unsigned": "tab:red",
    "smb2-echo-unsigned": "tab:red",
    "grpc-smbprotocol": "tab:purple", "smbprotocol": "tab:purple",
    "smbprotocol-signed": "tab:pink", "impacket": "tab:brown",
    "minimal": "tab:cyan", "minimal-signed": "tab:olive", "minimal-unsigned": "tab:orange",
}


def _style(t: str) -> str:
    """Dashed: the floors (TCP, bare SMB2 ECHO); dotted: the minimal client; solid: the
    clients measured."""
    if t.startswith("minimal"):
        return ":"
    return "--" if t.startswith(("smb2-echo", "tcp", "grpc-tcp")) else "-"


def plot_cdf(ax: Any, results: dict[str, Result], names: list[str], title: str) -> None:
    for t in names:
        pooled = sorted(x for rnd in results[t].latencies for x in rnd)
        if not pooled:
            continue
        ys = [(i + 1) / len(pooled) for i in range(len(pooled))]
        p50 = statistics.median(results[t].p50s())
        ax.plot(pooled, ys, _style(t), color=COLORS.get(t), label=f"{t} ({p50:.0f})",
                linewidth=1.4)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", linewidth=0.6, alpha=0.5)
    ax.axhline(0.99, color="grey", linewidth=0.6, alpha=0.5)
    ax.set_xlabel("round trip, us, log scale")
    ax.set_ylabel("fraction of round trips")
    ax.set_title(title, fontsize=10)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=7, title="transport (median p50, us)", title_fontsize=7)


def write_plot(path: str, results: dict[str, Result], info: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(2, 2, figsize=(15, 10), dpi=100)
    plot_cdf(axes[0][0], results, [t for t in GRPC_TRANSPORTS if t in results],
             f"gRPC unary, {UNARY_BYTES} B: latency CDF")
    plot_cdf(axes[0][1], results, [t for t in RAW_TRANSPORTS if t in results],
             f"raw {RAW_BYTES}-byte echo (smb2-echo: bare SMB2 ECHO; tcp: no SMB): CDF")
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax = axes[1][0]
    for t in RAW_TRANSPORTS:
        if t not in results or not TRANSPORTS[t].sizes:
            continue
        sizes = [s for s in TRANSPORTS[t].sizes if results[t].mbps(s)]
        meds = [statistics.median(results[t].mbps(s)) for s in sizes]
        lo = [m - min(results[t].mbps(s)) for s, m in zip(sizes, meds, strict=True)]
        hi = [max(results[t].mbps(s)) - m for s, m in zip(sizes, meds, strict=True)]
        ax.errorbar(sizes, meds, yerr=[lo, hi], marker="o", capsize=3, label=t,
                    linestyle=_style(t), color=COLORS.get(t))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(SIZES), [SIZE_LABELS[s] for s in SIZES])
    ax.yaxis.set_major_formatter(fmt)
    ax.set_xlabel("echo size (one echo at a time), log scale")
    ax.set_ylabel("MB/s, log scale (median of rounds; bars: min-max)")
    ax.set_title("raw echo throughput by message size", fontsize=10)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    names = [t for t in GRPC_TRANSPORTS if t in results and results[t].mbps(MIB)]
    meds = [statistics.median(results[t].mbps(MIB)) for t in names]
    lo = [m - min(results[t].mbps(MIB)) for t, m in zip(names, meds, strict=True)]
    hi = [max(results[t].mbps(MIB)) - m for t, m in zip(names, meds, strict=True)]
    bars = ax.bar(names, meds, yerr=[lo, hi], capsize=4, alpha=0.85,
                  color=[COLORS.get(t, "tab:blue") for t in names])
    ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    if "grpc-tcp" in names:
        ax.axhline(0.6 * meds[names.index("grpc-tcp")], color="tab:red", linewidth=1,
                   linestyle=":", label="60% of grpc-tcp (target)")
        ax.legend(fontsize=8)
    ax.set_ylabel("MB/s (median of rounds; bars: min-max)")
    ax.set_title("gRPC client stream of 1 MiB messages", fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    for label in ax.get_xticklabels():
        label.set_ha("right")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"commit {info.get('commit', '?')} on {info.get('hostname', '?')} | two network "
        f"namespaces over veth, Samba smbd {info.get('samba', '?')} | "
        f"{info['cpu_model']}, {info['nproc']} CPUs, Linux {info['kernel']}, "
        f"Python {info['python']}, grpcio {info['grpcio']}, {info['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("smbprotocol", "impacket", "npipe", "pyspnego", "cryptography"):
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


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind the cleanup instead of killing the run half-way."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    yield


def orchestrate(args: argparse.Namespace) -> int:
    why = check_prerequisites()
    if why:
        print(why, file=sys.stderr)
        return 2
    info = {**machine_info(), **versions()}
    print(header(info))
    print(f"# smbprotocol {info['smbprotocol']} | impacket {info['impacket']} | pyspnego "
          f"{info['pyspnego']} | cryptography {info['cryptography']} | npipe {info['npipe']}"
          " (the code in this work tree)")
    print(f"# {args.rounds} rounds x {args.calls} round trips per transport (gRPC {UNARY_BYTES} "
          f"B unary, raw {RAW_BYTES} B echo); throughput: {args.streams} turn(s) per round of "
          f"a gRPC client stream of {args.msgs} x 1 MiB, or of "
          + ", ".join(f"{args.echoes * SIZE_FACTOR[s]} x {SIZE_LABELS[s]}" for s in SIZES)
          + " echoes; medians of per-round values", flush=True)
    server_stats: dict[str, Any] = {}
    client_info: dict[str, Any] = {}
    conc: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    try:
        with interruptible(), Testbed() as tb:
            kinds = sorted({TRANSPORTS[t].server for t in args.names}
                           | ({"grpc-pipe", "grpc-tcp"} if args.channels else set()))
            servers = tb.start_servers(kinds)
            clients: dict[str, Child] = {}
            for t in args.names:
                target = tb.target(t, servers[TRANSPORTS[t].server][1])
                clients[t] = tb.spawn(f"client {t}", "client",
                                      [str(SCRIPT), "--client", t, "--target", target,
                                       "--warmup", str(args.warmup)])
                # One at a time: their SMB logons and warm-ups would skew each other.
                client_info[t] = clients[t].reply(START_TIMEOUT_S + args.warmup * 0.05)["info"]
            results = run_rounds(clients, args)
            for c in clients.values():
                c.stop()
            if args.channels:
                conc = run_concurrency(tb, servers, args)
            for kind, (s, _) in servers.items():
                server_stats[kind] = (s.stop() or {}).get("stats")
    except KeyboardInterrupt:
        print("interrupted: cleaned up", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    return report(args, info, results, client_info, server_stats, conc, elapsed)


def report(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Result],
           client_info: dict[str, Any], server_stats: dict[str, Any],
           conc: dict[str, list[dict[str, Any]]], elapsed: float) -> int:
    summary = summarize(results)
    grpc_names = [t for t in GRPC_TRANSPORTS if t in results]
    raw_names = [t for t in RAW_TRANSPORTS if t in results]
    print()
    if grpc_names:
        print(format_grpc_table(summary, grpc_names))
        print()
    if raw_names:
        print(format_raw_tables(summary, raw_names))
        print()
    if conc:
        print(format_concurrency(conc, args))
        print()
    for t in args.names:
        negotiated = client_info.get(t) or {}
        extra = ", ".join(f"{v}" for v in negotiated.values())
        print(f"  {t:<19} {TRANSPORTS[t].description}" + (f" [{extra}]" if extra else ""))
    pipe_stats = server_stats.get("grpc-pipe")
    if pipe_stats:
        print(f"\n  grpc-pipe handler: caller() known on {pipe_stats['caller_checked']} of "
              f"{pipe_stats['calls']} calls (last: {pipe_stats['caller']})")
    targets = check_targets(summary)
    conc_errors = sum(r["errors"] for rs in conc.values() for r in rs)
    if targets or conc:
        print("\ntargets:")
        for tg in targets:
            print(f"  {tg['label']:<34} {tg['row']:>18} vs {tg['base']:<18} "
                  f"{'met   ' if tg['met'] else 'MISSED'} {tg['shown']}")
        if "grpc-smb-many" in conc:
            rs = conc["grpc-smb-many"]
            print(f"  {'concurrent calls, errors':<34} {'grpc-smb-many':>18}    {'':<18} "
                  f"{'met   ' if not conc_errors else 'MISSED'} {conc_errors} errors in "
                  f"{sum(r['calls'] for r in rs)} calls (must be 0)")
    print(f"({elapsed:.0f} s)")
    if args.json:
        raw = {
            "machine": info,
            "config": {k: getattr(args, k) for k in
                       ("rounds", "calls", "streams", "msgs", "echoes", "warmup", "channels",
                        "per_channel", "conc_runs")},
            "negotiated": client_info,
            "summary": summary,
            "targets": targets,
            "concurrency": conc,
            "server_stats": server_stats,
            "raw": {t: {"latency_us": res.latencies,
                        "mb_s": {str(s): v for s, v in res.throughputs.items()}}
                    for t, res in results.items()},
        }
        Path(args.json).write_text(json.dumps(raw, separators=(",", ":")) + "\n")
        print(f"raw numbers written to {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, results, info)
    if conc_errors:
        print(f"FAILED: {conc_errors} concurrent call(s) failed", file=sys.stderr)
        return 1
    return 0


# ================================================================== main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (5)")
    p.add_argument("--calls", type=int, default=1500,
                   help="round trips (unary calls or echoes) per transport per round (1500)")
    p.add_argument("--streams", type=int, default=3,
                   help="throughput turns per transport per round (3)")
    p.add_argument("--msgs", type=int, default=64, help="1 MiB messages per gRPC stream (64)")
    p.add_argument("--echoes", type=int, default=8,
                   help="1 MiB echoes per raw turn (8); x4 of 64 KiB, x16 of 4 KiB and 64 B")
    p.add_argument("--warmup", type=int, default=100, help="round trips before measuring (100)")
    p.add_argument("--channels", type=int, default=50,
                   help="concurrency run: grpc.aio channels (50; 0: no concurrency run)")
    p.add_argument("--per-channel", type=int, default=20,
                   help="concurrency run: concurrent calls per channel (20)")
    p.add_argument("--conc-runs", type=int, default=3, help="concurrency runs (3)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few seconds per transport")
    p.add_argument("--transports", default=",".join(ALL_TRANSPORTS),
                   help=f"comma-separated, from {', '.join(ALL_TRANSPORTS)}")
    p.add_argument("--json", metavar="FILE", help="write raw numbers and the summary as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a plot (needs matplotlib)")
    # Internal: the processes the orchestrator starts inside the namespaces.
    p.add_argument("--server", choices=("grpc-tcp", "grpc-pipe", "raw-tcp", "raw-pipe"),
                   help=argparse.SUPPRESS)
    p.add_argument("--client", choices=CLIENT_KINDS, help=argparse.SUPPRESS)
    p.add_argument("--host", default="198.18.0.1", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.streams, args.msgs, args.echoes, args.warmup = (
            2, 100, 1, 4, 1, 20)
        args.conc_runs = 1
    names = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in names if t not in ALL_TRANSPORTS]
    if unknown:
        p.error(f"unknown transport(s): {', '.join(unknown)}")
    if min(args.rounds, args.calls, args.streams, args.msgs, args.echoes, args.per_channel,
           args.conc_runs) < 1 or args.channels < 0:
        p.error("--rounds, --calls, --streams, --msgs, --echoes, --per-channel and "
                "--conc-runs must be at least 1, --channels at least 0")
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
        return client_main(args.client, args.target, args.warmup, args.channels)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
