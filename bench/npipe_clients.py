"""The clients of the cross-host benchmark that are npipe's own (and the gRPC and TCP
ones they are compared with): each connects once, warms up and then answers the
orchestrator's commands on stdin (``client_main``). The other SMB clients, and the
minimal one that sets the floor, are in smb_clients.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
import threading
import time
from typing import Any

from grpc_local import percentile
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
from testbed import PASSWORD, RAW_PIPE, START_TIMEOUT_S, USER, credentials, emit
from transports import (
    CALL_TIMEOUT_S,
    CONC_TRANSPORTS,
    ECHO,
    GRPC_TRANSPORTS,
    RAW_BYTES,
    SMB_2_1,
    TRANSPORTS,
    UNARY_BYTES,
    UPLOAD,
)


def unsigned_options() -> Any:
    """Native client options for an unsigned SMB 2.1 connection (benchmarks only)."""
    from npipe.smb.native import Options

    return Options(sign=False, dialects=(SMB_2_1,))



def _native_link_info(link: Any) -> dict[str, Any]:
    neg = link.core.negotiated
    return {"dialect": neg.dialect_name if neg else "?", "security": link.security}


def _native_info(want: str | None = None) -> dict[str, Any]:
    """What this process's (only) native SMB connection negotiated. Reads the backend's
    registry of shared connections, which is private: informational only. Relayed by
    the user's redirector (npipe.redirector), the connection is the redirector's."""
    from npipe.smb.native import client as native

    with contextlib.suppress(Exception):
        for registry in list(native._registries.values()):
            for connection in registry.connections():
                return _native_link_info(connection)
    return _redirector_info("native", want)


def _redirector_connections(backend: str, want: str | None) -> list[Any]:
    """The redirector's live connections of ``backend`` with the protection ``want``ed:
    this client's (the redirector serves the other client processes too)."""
    import npipe.redirector

    return [i for i in npipe.redirector.connections(backend) if i.alive
            and (want is None or security(i.signed, i.encrypted, None) == want)]


def _redirector_info(backend: str, want: str | None) -> dict[str, Any]:
    """What the redirector's connection of ``backend`` negotiated: the one with the
    protection ``want``ed, if there is one (the other clients' may be there too)."""
    import npipe.redirector

    infos = [i for i in npipe.redirector.connections(backend) if i.alive]
    for info in sorted(infos, key=lambda i: security(i.signed, i.encrypted, None) != want):
        return {"dialect": info.dialect, "security": security(info.signed, info.encrypted,
                                                              None) + " (by the redirector)"}
    return {}


def _smbprotocol_backend_info() -> dict[str, Any]:
    """What the smbprotocol backend's shared connection negotiated (private registry)."""
    from npipe.smb import smbprotocol_backend as backend

    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = backend.connections()[0]
        out = {"dialect": info.dialect, "security": security(info.signed, info.encrypted, None)}
        link = backend._registry.connections()[0]
        out["security"] = security(info.signed, info.encrypted,
                                    smbprotocol_algorithm(link.conn, info.encrypted))
    return out or _redirector_info("smbprotocol", "encrypted")


def _tls_probe(target: str, ca_pem: str) -> str:
    """The TLS version the grpc-tls server negotiates with a Python ``ssl`` client that
    offers h2 and trusts only its certificate (a check that the anchor is TLS 1.3)."""
    import socket
    import ssl

    host, _, port = target.rpartition(":")
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=START_TIMEOUT_S) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        return str(tls.version())


class GrpcClient(BenchClient):
    def __init__(self, kind: str, target: str, ca_pem: str | None = None) -> None:
        self.kind, self.target, self.ca_pem = kind, target, ca_pem
        self.bridge: Any = None
        self.channel = self._open_channel(())
        self.mt_channels: list[Any] = [self.channel]  # the threads section's channels
        self.echo = self.channel.unary_unary(ECHO, _registered_method=True)
        self.upload = self.channel.stream_unary(UPLOAD, _registered_method=True)
        self.payload = os.urandom(UNARY_BYTES)

    def _open_channel(self, options: tuple[tuple[str, Any], ...]) -> Any:
        import grpc

        import npipe.grpc

        kind, target = self.kind, self.target
        if kind == "grpc-smb-inproc":
            os.environ["NPIPE_REDIRECTOR"] = "off"
        if kind == "grpc-tcp":
            channel = grpc.insecure_channel(
                target, options=[*options, ("grpc.enable_http_proxy", 0)])
        elif kind == "grpc-tls":
            if not self.ca_pem:
                raise ValueError("grpc-tls needs the server's certificate (--ca)")
            channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=self.ca_pem.encode()),
                options=[*options, ("grpc.enable_http_proxy", 0)])
        elif kind == "grpc-smb-unsigned":
            # npipe.grpc.channel() cannot take native Options: a bridge of our own.
            from npipe.address import parse_address
            from npipe.smb.native import NativeClient
            from npipe.unix_bridge import PipeBridge

            client = NativeClient(unsigned_options())
            address, creds = parse_address(target), credentials()

            async def attach(sock: Any, initial: bytes) -> None:
                await client.attach(address, sock, credentials=creds, encrypt=False,
                                    allow_smb2=True, close_on_failure=False, initial=initial,
                                    missing_grace=0)

            if self.bridge is None:
                self.bridge = PipeBridge(attach, description=address.posix())
            channel = grpc.insecure_channel(
                self.bridge.target, options=[*options, ("grpc.default_authority", "localhost")])
        else:
            channel = npipe.grpc.channel(
                target, options=options, credentials=credentials(),
                encrypt=False if kind == "grpc-smb-signed" else None,
                smb_backend="smbprotocol" if kind == "grpc-smbprotocol" else "native",
            )
        grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
        return channel

    def info(self) -> dict[str, Any]:
        if self.kind == "grpc-tcp":
            return {}
        if self.kind == "grpc-tls":
            return {"security": f"TLS ({_tls_probe(self.target, self.ca_pem or '')} with a "
                                "Python ssl probe; grpcio's BoringSSL verifies the certificate)"}
        if self.kind == "grpc-smbprotocol":
            return _smbprotocol_backend_info()
        return _native_info(TRANSPORTS[self.kind].security)

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

    def mt(self, channels: int, callers: int, calls: int) -> dict[str, Any]:
        """``callers`` threads call Echo on ``channels`` sync channels (thread i on channel
        i % channels), ``calls`` calls in all, as many per thread; calls/s over the wall
        time from the threads' start (a barrier) to the last one's end."""
        import grpc

        # Each extra channel has a subchannel pool of its own: a pipe instance (or HTTP/2
        # connection) of its own; its first calls (the open, a warm-up) are not timed.
        while len(self.mt_channels) < channels:
            ch = self._open_channel((("grpc.use_local_subchannel_pool", 1),))
            stub = ch.unary_unary(ECHO, _registered_method=True)
            for _ in range(20):
                stub(self.payload, timeout=CALL_TIMEOUT_S)
            self.mt_channels.append(ch)
        stubs = [c.unary_unary(ECHO, _registered_method=True)
                 for c in self.mt_channels[:channels]]
        each = -(-calls // callers)
        payload = self.payload
        start = threading.Barrier(callers + 1)
        errors: list[str] = []  # (list.append is atomic under the GIL)

        def caller(i: int) -> None:
            stub = stubs[i % channels]
            start.wait()
            for _ in range(each):
                try:
                    if stub(payload, timeout=CALL_TIMEOUT_S) != payload:
                        errors.append("wrong reply")
                except grpc.RpcError as e:
                    errors.append(e.code().name)

        threads = [threading.Thread(target=caller, args=(i,), daemon=True)
                   for i in range(callers)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        out = {"channels": channels, "callers": callers, "calls": each * callers,
               "seconds": round(elapsed, 4), "calls_s": round(each * callers / elapsed, 1),
               "errors": len(errors), "error_kinds": dict(collections.Counter(errors))}
        if self.kind.startswith("grpc-smb"):
            from npipe.smb import get_client

            conns = get_client("native").connections() or _redirector_connections(
                "native", TRANSPORTS[self.kind].security)
            out |= {"smb_connections": len(conns), "pipes": sum(c.pipes for c in conns)}
        return out

    def close(self) -> None:
        for ch in self.mt_channels:
            ch.close()
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
            # Read the echo, then drain: the transport sends in the background, so this
            # cannot deadlock (a drain first could, over TCP: the echo fills both ways),
            # and it spares the two tasks and the future a gather of both would cost per
            # echo, which the minimal client does not pay either.
            self.writer.write(msg)
            got = await asyncio.wait_for(self.reader.readexactly(size), CALL_TIMEOUT_S)
            await self.writer.drain()
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

        conns = get_client("native").connections() or _redirector_connections(
            "native", "encrypted")
        return {**_native_info("encrypted"), "channels": len(self.channels),
                "smb_connections": len(conns),
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


def make_client(kind: str, target: str, channels: int,
                ca_pem: str | None = None) -> BenchClient:
    if kind in CONC_TRANSPORTS:
        return ConcurrencyClient(kind, target, channels)
    if kind in GRPC_TRANSPORTS:
        return GrpcClient(kind, target, ca_pem)
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


def client_main(kind: str, target: str, warmup: int, channels: int,
                ca_pem: str | None = None) -> int:
    """Connect, warm up, say ready, then answer commands until stdin ends."""
    try:
        client = make_client(kind, target, channels, ca_pem)
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
            elif command == "mt" and isinstance(client, GrpcClient):
                emit(client.mt(int(args[0]), int(args[1]), int(args[2])))
            else:
                emit({"error": f"unknown command {line.strip()!r}"})
        except Exception as e:
            emit({"error": f"{type(e).__name__}: {e}"})
            status = 1
            break
    with contextlib.suppress(Exception):
        client.close()
    return status


