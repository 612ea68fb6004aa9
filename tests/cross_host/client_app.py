"""Client-side checks run inside the client's network namespace; prints one JSON result.

    python client_app.py SCENARIO ADDRESS [ARG]

Credentials come from NPIPE_USER / NPIPE_PASSWORD.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import grpc

import npipe
import npipe.grpc
import npipe.smb

MB = 16 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", MB), ("grpc.max_send_message_length", MB)]


def channel(address: str, open_timeout: float = 10.0) -> grpc.Channel:
    """open_timeout: how long the bridge retries a missing or busy pipe per connection;
    NPIPE_TEST_ALLOW_SMB2=1 accepts an SMB 2.x server."""
    return npipe.grpc.channel(address, options=OPTIONS, timeout=open_timeout,
                              allow_smb2=os.environ.get("NPIPE_TEST_ALLOW_SMB2") == "1")


def smb_connections() -> list[npipe.smb.SmbConnectionInfo]:
    """The SMB connections of this process and of its user's redirector (where gRPC
    channels, npipe.connect and the HTTP client relay their pipes by default)."""
    import npipe.redirector

    return npipe.smb.get_client().connections() + npipe.redirector.connections()


def calls(address: str) -> dict[str, Any]:
    """Every call kind, 8 MiB messages, 100 concurrent calls on one channel."""
    with channel(address) as ch:
        who = json.loads(ch.unary_unary("/x.Svc/Whoami")(b"", timeout=30))
        assert ch.unary_unary("/x.Svc/Echo")(b"ping", timeout=30) == b"ping"
        counted = [int(m) for m in ch.unary_stream("/x.Svc/Count")(b"100", timeout=30)]
        joined = ch.stream_unary("/x.Svc/Concat")(iter([b"a", b"b", b"c"] * 10), timeout=30)
        flipped = list(ch.stream_stream("/x.Svc/Bidi")(iter([b"abc", b"xyz"]), timeout=30))
        big = bytes(range(256)) * (8 * 4096)  # 8 MiB
        big_ok = ch.unary_unary("/x.Svc/Echo")(big, timeout=60) == big
        echo = ch.unary_unary("/x.Svc/Echo")
        fs = [echo.future(str(i).encode(), timeout=60) for i in range(100)]
        concurrent_ok = all(f.result() == str(i).encode() for i, f in enumerate(fs))
    return {"who": who, "counted": counted == list(range(100)), "joined": joined == b"abc" * 10,
            "flipped": flipped == [b"cba", b"zyx"], "big": big_ok, "concurrent": concurrent_ok}


def clients(address: str, n: int = 20) -> dict[str, Any]:
    """n clients at once, each with its own channel (so its own pipe)."""
    results: list[bool] = [False] * n

    def one(i: int) -> None:
        payload = f"c{i}".encode()
        with channel(address) as ch:
            results[i] = ch.unary_unary("/x.Svc/Echo")(payload, timeout=60) == payload

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return {"ok": sum(results)}


def thousand(address: str, pipes: int = 50, per_pipe: int = 20) -> dict[str, Any]:
    """1,000 concurrent unary calls: 50 asyncio channels (50 pipe instances, all on one
    SMB connection) with 20 calls in flight on each. Counts the errors, and the SMB
    connections the bridge opened for them."""

    async def main() -> dict[str, Any]:
        # A local subchannel pool each: grpcio would otherwise share one connection.
        own = [*OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        channels = [npipe.grpc.aio_channel(address, options=own) for _ in range(pipes)]
        errors: list[str] = []

        async def call(ch: grpc.aio.Channel, i: int) -> bool:
            payload = f"call-{i}".encode() * 10
            try:
                return bool(await ch.unary_unary("/x.Svc/Echo")(payload, timeout=120) == payload)
            except grpc.RpcError as e:
                errors.append(e.code().name)
                return False

        start = time.monotonic()
        results = await asyncio.gather(*(
            call(ch, p * per_pipe + i) for p, ch in enumerate(channels) for i in range(per_pipe)
        ))
        elapsed = time.monotonic() - start
        live = [c for c in smb_connections() if c.alive]
        for ch in channels:
            await ch.close()
        return {"ok": sum(results), "errors": errors, "seconds": round(elapsed, 2),
                "connections": len(live), "pipes": sum(c.pipes for c in live)}

    return asyncio.run(main())


def error(address: str, timeout: str = "3") -> dict[str, Any]:
    """What opening the pipe raw gives (within ``timeout`` s): the npipe error type and
    message, and how long it took."""
    async def main() -> dict[str, Any]:
        start = time.monotonic()
        try:
            _reader, writer = await npipe.open_connection(address, timeout=float(timeout))
        except npipe.NpipeError as e:
            return {"error": type(e).__name__, "message": str(e),
                    "seconds": time.monotonic() - start}
        writer.close()
        return {"error": None, "seconds": time.monotonic() - start}

    return asyncio.run(main())


def auth_failures(address: str) -> dict[str, Any]:
    """Ways a program meets credentials the server does not accept, then exits: a raw
    open; opens given up on (cancelled) while the logon fails, so that the connection's
    setup outlives them; a gRPC call. Each error's type and message; what the process
    says on stderr at exit is the test's to check."""
    async def main() -> dict[str, Any]:
        errors: list[tuple[str, str]] = []
        try:
            await npipe.open_connection(address, timeout=5)
        except npipe.NpipeError as e:
            errors.append((type(e).__name__, str(e)))
        for delay in (0, 0.001, 0.005, 0.02):  # left behind at any step of the setup
            npipe.smb.get_client().close_connections()
            with contextlib.suppress(npipe.NpipeError, asyncio.TimeoutError):
                await asyncio.wait_for(npipe.open_connection(address, timeout=5), delay)
        return {"errors": errors}

    result = asyncio.run(main())
    with channel(address, open_timeout=3) as ch:
        try:
            ch.unary_unary("/x.Svc/Echo")(b"x", timeout=10)
            result["grpc"] = "OK"
        except grpc.RpcError as e:
            result["grpc"] = e.code().name
    # Left open on purpose: grpcio may still be reconnecting through the bridge at exit.
    npipe.grpc.channel(address).unary_unary("/x.Svc/Echo").future(b"y", timeout=10)
    return result


def grpc_error(address: str) -> dict[str, Any]:
    """What a gRPC call gives when the bridge cannot open the pipe: the status and
    details, what npipe logged about it (once), and how long it took (the default dial
    timeout, 10 s: a missing pipe must not be waited for)."""
    warnings = _npipe_warnings()
    with channel(address) as ch:
        start = time.monotonic()
        try:
            ch.unary_unary("/x.Svc/Echo")(b"x", timeout=30)
            return {"code": "OK"}
        except grpc.RpcError as e:
            return {"code": e.code().name, "details": e.details(), "warnings": warnings,
                    "took": time.monotonic() - start}


def wait_for_ready_deadline(address: str) -> dict[str, Any]:
    """A wait_for_ready call with a 2 s deadline on a pipe nobody serves: its status
    and how long it took."""
    with channel(address, open_timeout=1) as ch:
        start = time.monotonic()
        try:
            ch.unary_unary("/x.Svc/Echo")(b"x", timeout=2, wait_for_ready=True)
            return {"code": "OK"}
        except grpc.RpcError as e:
            return {"code": e.code().name, "took": time.monotonic() - start}


def late_server(address: str) -> dict[str, Any]:
    """A wait_for_ready call made before the server serves: started, then says
    STARTED on stdout, then waits for the call's outcome. The dial timeout (2 s) does
    not bound it: the server may come later."""
    with channel(address, open_timeout=2) as ch:
        call = ch.unary_unary("/x.Svc/Echo").future(b"late", timeout=60, wait_for_ready=True)
        print(json.dumps({"started": True}), flush=True)
        try:
            return {"reply": call.result().decode()}
        except grpc.RpcError as e:
            return {"code": e.code().name, "details": e.details()}


def raw(address: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        reader, writer = await npipe.open_connection(address)
        greeting = (await asyncio.wait_for(reader.readline(), 30)).decode().strip()
        writer.write(b"raw bytes")
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(9), 30)
        writer.close()
        return {"greeting": greeting, "echo": echoed.decode()}

    return asyncio.run(main())


def security(address: str) -> dict[str, Any]:
    """One call, which must succeed at once (smbd and the server app are ready), then
    what the SMB connection it went through negotiated (SmbConnectionInfo); npipe's
    warnings come back too (the bridge's reason for a pipe it could not open)."""

    warnings = _npipe_warnings()
    with channel(address) as ch:
        try:
            ok = ch.unary_unary("/x.Svc/Echo")(b"secure", timeout=30) == b"secure"
            error = None
        except grpc.RpcError as e:
            ok, error = False, f"{e.code().name}: {e.details()}"
        infos = [dataclasses.asdict(c) for c in smb_connections() if c.alive]
    return {"ok": ok, "error": error, "warnings": warnings, "connections": infos}


def _npipe_warnings() -> list[str]:
    """A list that collects what npipe's loggers say at WARNING and above from now on."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(f"{record.name}: {record.getMessage()}")

    logging.getLogger("npipe").addHandler(Keep(logging.WARNING))
    return said


def held_call(address: str) -> dict[str, Any]:
    """Call, then on each line from stdin: call once more (and say how it went), then
    keep calling until a call succeeds (recovery). A missing pipe is waited for 2 s, so
    the call (10 s deadline) ends UNAVAILABLE rather than DEADLINE_EXCEEDED."""
    with channel(address, open_timeout=2) as ch:
        echo = ch.unary_unary("/x.Svc/Echo")
        print(json.dumps({"called": echo(b"one", timeout=30) == b"one"}), flush=True)
        sys.stdin.readline()
        try:
            code = "OK" if echo(b"two", timeout=10) == b"two" else "WRONG"
        except grpc.RpcError as e:
            code = e.code().name
        print(json.dumps({"second": code}), flush=True)
        sys.stdin.readline()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if echo(b"again", timeout=5) == b"again":
                    return {"recovered": True}
            except grpc.RpcError:
                time.sleep(0.2)
        return {"recovered": False}


if __name__ == "__main__":
    scenario, address, *more = sys.argv[1:]
    result = globals()[scenario](address, *more)
    print(json.dumps(result), flush=True)
