"""gRPC calls over a pipe: every call kind, big messages, deadlines, cancellation,
metadata, status codes, concurrency and the caller's identity (sync and grpc.aio)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_support import (
    BIG_OPTIONS,
    INITIAL_MD,
    SERVICE,
    TRAILING_MD,
    WAIT,
    MiB,
    aio_serve,
    await_event,
    method,
    run_async,
    run_python,
    serve,
    temp_pipe_dir,
    wait_until,
    whoami_client,
)

import npipe.grpc

ERROR_CODES = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]
REQUEST_MD = (("x-req", "abc"), ("x-req-bin", b"\x00\x01\xfe"))


@pytest.fixture
def pipe_dir() -> Iterator[Path]:
    with temp_pipe_dir() as d:
        yield d


def _me() -> dict[str, Any]:
    return {
        "transport": "local", "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
        "user": pwd.getpwuid(os.getuid()).pw_name,
    }


def _subset(caller: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    return {k: caller[k] for k in expected}


# --- the four call kinds, sync ------------------------------------------------------------


def test_unary_echo_round_trips_exact_bytes(pipe_dir: Path) -> None:
    payloads = [b"", b"hello", bytes(range(256)), b"\x00" * 1000]
    with serve(pipe_dir) as s, npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        echo = chan.unary_unary(method("Echo"))
        assert [echo(p, timeout=WAIT) for p in payloads] == payloads
        assert s.probe.handled == ["Echo"] * len(payloads)


def test_server_streaming_delivers_all_in_order(pipe_dir: Path) -> None:
    with serve(pipe_dir), npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        call = chan.unary_stream(method("Count"))(b"500", timeout=WAIT)
        assert list(call) == [str(i).encode() for i in range(500)]
        assert call.code() == grpc.StatusCode.OK
        assert list(chan.unary_stream(method("Count"))(b"0", timeout=WAIT)) == []


def test_client_streaming_joins_all_requests(pipe_dir: Path) -> None:
    parts = [f"part{i};".encode() for i in range(300)]
    with serve(pipe_dir), npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        concat = chan.stream_unary(method("Concat"))
        assert concat(iter(parts), timeout=WAIT) == b"".join(parts)
        assert concat(iter([]), timeout=WAIT) == b""


def test_bidi_streaming_interleaves(pipe_dir: Path) -> None:
    """Each answer arrives before the next request is sent: a real duplex stream."""
    requests: queue.Queue[bytes | None] = queue.Queue()

    def produce() -> Iterator[bytes]:
        while (item := requests.get(timeout=WAIT)) is not None:
            yield item

    with serve(pipe_dir), npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        call = chan.stream_stream(method("Bidi"))(produce(), timeout=WAIT)
        for i in range(20):
            requests.put(f"m{i}".encode())
            assert next(call) == f"re:m{i}".encode()
        requests.put(None)
        assert list(call) == []
        assert call.code() == grpc.StatusCode.OK


# --- the four call kinds, grpc.aio ----------------------------------------------------------


def test_aio_all_call_kinds(pipe_dir: Path) -> None:
    async def scenario() -> None:
        async with aio_serve(pipe_dir) as s, npipe.grpc.aio_channel(
            "svc", pipe_dir=pipe_dir
        ) as chan:
            assert await chan.unary_unary(method("Echo"))(b"aio", timeout=WAIT) == b"aio"

            got = [r async for r in chan.unary_stream(method("Count"))(b"200", timeout=WAIT)]
            assert got == [str(i).encode() for i in range(200)]

            async def parts() -> Any:
                for i in range(100):
                    yield f"p{i}".encode()

            joined = await chan.stream_unary(method("Concat"))(parts(), timeout=WAIT)
            assert joined == b"".join(f"p{i}".encode() for i in range(100))

            bidi = chan.stream_stream(method("Bidi"))(timeout=WAIT)
            for i in range(20):
                await bidi.write(f"m{i}".encode())
                assert await bidi.read() == f"re:m{i}".encode()
            await bidi.done_writing()
            assert await bidi.read() is grpc.aio.EOF
            assert await bidi.code() == grpc.StatusCode.OK
            assert s.probe.handled == ["Echo", "Count", "Concat", "Bidi"]

    run_async(scenario)


# --- big messages ---------------------------------------------------------------------------


def test_4mib_messages_both_ways(pipe_dir: Path) -> None:
    data = [os.urandom(4 * MiB) for _ in range(3)]
    with serve(pipe_dir, options=BIG_OPTIONS), npipe.grpc.channel(
        "svc", pipe_dir=pipe_dir, options=BIG_OPTIONS
    ) as chan:
        assert chan.unary_unary(method("Echo"))(data[0], timeout=WAIT) == data[0]
        joined = chan.stream_unary(method("Concat"))(iter(data[:2]), timeout=WAIT)
        assert len(joined) == 8 * MiB
        assert joined == data[0] + data[1]
        replies = list(chan.stream_stream(method("Bidi"))(iter(data), timeout=WAIT))
        assert replies == [b"re:" + d for d in data]


def test_aio_4mib_messages_both_ways(pipe_dir: Path) -> None:
    data = [os.urandom(4 * MiB) for _ in range(3)]

    async def scenario() -> None:
        async with aio_serve(pipe_dir, options=BIG_OPTIONS), npipe.grpc.aio_channel(
            "svc", pipe_dir=pipe_dir, options=BIG_OPTIONS
        ) as chan:
            assert await chan.unary_unary(method("Echo"))(data[0], timeout=WAIT) == data[0]
            bidi = chan.stream_stream(method("Bidi"))(timeout=WAIT)
            for d in data:
                await bidi.write(d)
                assert await bidi.read() == b"re:" + d
            await bidi.done_writing()
            assert await bidi.code() == grpc.StatusCode.OK

    run_async(scenario)


def test_channel_options_reach_grpcio(pipe_dir: Path) -> None:
    """Without the raised receive limit the same reply is refused: options are applied."""
    data = os.urandom(5 * MiB)
    with serve(pipe_dir, options=BIG_OPTIONS), npipe.grpc.channel(
        "svc", pipe_dir=pipe_dir
    ) as chan, pytest.raises(grpc.RpcError) as info:
        chan.unary_unary(method("Echo"))(data, timeout=WAIT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- deadlines and cancellation -------------------------------------------------------------


def test_deadline_exceeded_is_fast(pipe_dir: Path) -> None:
    with serve(pipe_dir) as s, npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            chan.unary_unary(method("Sleep"))(b"30", timeout=0.3)
        elapsed = time.monotonic() - start
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.25 <= elapsed < 2.5, elapsed
        # The handler saw the call end (is_active() turned False) long before 30 s.
        assert s.probe.sleep_ended.wait(WAIT)
        assert time.monotonic() - start < WAIT


def test_aio_deadline_exceeded_is_fast(pipe_dir: Path) -> None:
    async def scenario() -> None:
        async with aio_serve(pipe_dir) as s, npipe.grpc.aio_channel(
            "svc", pipe_dir=pipe_dir
        ) as chan:
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await chan.unary_unary(method("Sleep"))(b"30", timeout=0.3)
            elapsed = time.monotonic() - start
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.25 <= elapsed < 2.5, elapsed
            assert await await_event(s.probe.sleep_ended)

    run_async(scenario)


def test_client_cancel_reaches_server(pipe_dir: Path) -> None:
    with serve(pipe_dir) as s, npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        call = chan.unary_stream(method("Forever"))(b"", timeout=60)
        assert [next(call) for _ in range(3)] == [b"0", b"1", b"2"]
        assert s.probe.stream_started.is_set()
        cancelled_at = time.monotonic()
        assert call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED
        # add_callback ran and is_active() is False, within a bounded time.
        assert s.probe.terminated.wait(5.0), "server's add_callback never ran"
        ctx = s.probe.stream_context
        assert wait_until(lambda: not ctx.is_active(), 5.0)
        assert time.monotonic() - cancelled_at < 5.0


def test_aio_client_cancel_reaches_server(pipe_dir: Path) -> None:
    async def scenario() -> None:
        async with aio_serve(pipe_dir) as s, npipe.grpc.aio_channel(
            "svc", pipe_dir=pipe_dir
        ) as chan:
            call = chan.unary_stream(method("Forever"))(b"", timeout=60)
            assert [await call.read() for _ in range(3)] == [b"0", b"1", b"2"]
            assert call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED
            assert await await_event(s.probe.cancelled, 5.0), "handler never saw the cancel"
            assert await await_event(s.probe.terminated, 5.0), "add_done_callback never ran"
            assert s.probe.stream_ended.is_set()

    run_async(scenario)


# --- metadata --------------------------------------------------------------------------------


def _check_meta_reply(reply: bytes, seen: tuple[tuple[str, Any], ...]) -> None:
    assert json.loads(reply) == {"x-req": "abc", "x-req-bin": "0001fe"}
    assert ("x-req", "abc") in seen
    assert ("x-req-bin", b"\x00\x01\xfe") in seen


def test_metadata_both_ways(pipe_dir: Path) -> None:
    with serve(pipe_dir) as s, npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        reply, call = chan.unary_unary(method("Meta")).with_call(
            b"", metadata=REQUEST_MD, timeout=WAIT
        )
        _check_meta_reply(reply, s.probe.metadata[0])
        initial = tuple((m.key, m.value) for m in call.initial_metadata())
        trailing = tuple((m.key, m.value) for m in call.trailing_metadata())
    assert set(INITIAL_MD) <= set(initial)
    assert set(TRAILING_MD) <= set(trailing)


def test_aio_metadata_both_ways(pipe_dir: Path) -> None:
    async def scenario() -> None:
        async with aio_serve(pipe_dir) as s, npipe.grpc.aio_channel(
            "svc", pipe_dir=pipe_dir
        ) as chan:
            call = chan.unary_unary(method("Meta"))(b"", metadata=REQUEST_MD, timeout=WAIT)
            _check_meta_reply(await call, s.probe.metadata[0])
            initial = tuple(await call.initial_metadata())
            trailing = tuple(await call.trailing_metadata())
            assert set(INITIAL_MD) <= set(initial)
            assert set(TRAILING_MD) <= set(trailing)

    run_async(scenario)


# --- status codes ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ERROR_CODES, ids=lambda c: c.name)
def test_status_code_and_details_reach_client(pipe_dir: Path, code: grpc.StatusCode) -> None:
    details = f"failed on purpose with {code.name}: naïve ✓"
    with serve(pipe_dir) as s, npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        with pytest.raises(grpc.RpcError) as info:
            chan.unary_unary(method("Abort"))(f"{code.name}:{details}".encode(), timeout=WAIT)
        assert s.probe.handled == ["Abort"]
    assert info.value.code() == code
    assert info.value.details() == details


def test_aio_every_status_code(pipe_dir: Path) -> None:
    async def scenario() -> None:
        async with aio_serve(pipe_dir), npipe.grpc.aio_channel("svc", pipe_dir=pipe_dir) as chan:
            abort = chan.unary_unary(method("Abort"))
            for code in ERROR_CODES:
                details = f"aio {code.name} ✓"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await abort(f"{code.name}:{details}".encode(), timeout=WAIT)
                assert (info.value.code(), info.value.details()) == (code, details)

    run_async(scenario)


# --- concurrency -------------------------------------------------------------------------------


def test_200_concurrent_calls_on_one_channel(pipe_dir: Path) -> None:
    with serve(pipe_dir) as s, npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        echo = chan.unary_unary(method("Echo"))
        payloads = [f"call-{i}-".encode() * (i + 1) for i in range(200)]
        calls = [echo.future(p, timeout=30) for p in payloads]
        assert [c.result(timeout=30) for c in calls] == payloads
        assert all(c.code() == grpc.StatusCode.OK for c in calls)
        assert len(s.probe.handled) == 200
        # All 200 went over the channel's one connection through the pipe.
        assert len(set(s.probe.peers)) == 1


def test_aio_200_concurrent_calls_on_one_channel(pipe_dir: Path) -> None:
    async def scenario() -> None:
        async with aio_serve(pipe_dir) as s, npipe.grpc.aio_channel(
            "svc", pipe_dir=pipe_dir
        ) as chan:
            echo = chan.unary_unary(method("Echo"))
            payloads = [f"aio-{i}".encode() for i in range(200)]
            assert await asyncio.gather(*(echo(p, timeout=30) for p in payloads)) == payloads
            assert len(s.probe.handled) == 200

    run_async(scenario)


def test_50_clients_at_once(pipe_dir: Path) -> None:
    """50 channels, each its own connection, calling together from 50 threads."""
    n = 50
    barrier = threading.Barrier(n, timeout=WAIT)
    # Channels with equal arguments may share a connection; a local pool keeps them apart.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]

    def client(i: int) -> tuple[bytes, dict[str, Any]]:
        with npipe.grpc.channel("svc", pipe_dir=pipe_dir, options=own_connection) as chan:
            grpc.channel_ready_future(chan).result(timeout=WAIT)
            barrier.wait()
            echoed = chan.unary_unary(method("Echo"))(f"client-{i}".encode(), timeout=30)
            who = json.loads(chan.unary_unary(method("Whoami"))(b"", timeout=30))
            return echoed, who

    with serve(pipe_dir, max_workers=64) as s, futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(client, range(n), timeout=60))
        peers = set(s.probe.peers)
    assert [echoed for echoed, _ in results] == [f"client-{i}".encode() for i in range(n)]
    for _, who in results:
        assert _subset(who, _me()) == _me()
    assert len(peers) == n, "each client should have had its own connection"


# --- the caller --------------------------------------------------------------------------------


def test_caller_in_process(pipe_dir: Path) -> None:
    with serve(pipe_dir) as s, npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        who = json.loads(chan.unary_unary(method("Whoami"))(b"", timeout=WAIT))
        caller = s.probe.callers[0]
    assert _subset(who, _me()) == _me()
    assert who["name"] == _me()["user"]
    assert isinstance(caller, npipe.Caller)
    assert caller.uid == os.getuid() and caller.pid == os.getpid()
    assert set(caller.groups) <= set(os.getgroups()) | {os.getgid()}


def test_aio_caller_in_process(pipe_dir: Path) -> None:
    async def scenario() -> dict[str, Any]:
        async with aio_serve(pipe_dir), npipe.grpc.aio_channel("svc", pipe_dir=pipe_dir) as chan:
            return json.loads(await chan.unary_unary(method("Whoami"))(b"", timeout=WAIT))

    who = run_async(scenario)
    assert _subset(who, _me()) == _me()


def test_caller_pid_of_client_in_subprocess(pipe_dir: Path) -> None:
    with serve(pipe_dir) as s:
        child = run_python(whoami_client("svc", pipe_dir))
        outcome = child.check()
        assert len(s.probe.callers) == 1
    assert outcome["pid"] == child.pid != os.getpid()
    assert outcome["caller"]["pid"] == child.pid
    assert outcome["caller"]["uid"] == os.getuid()
    assert outcome["caller"]["user"] == _me()["user"]


def test_caller_is_none_off_the_pipe(pipe_dir: Path) -> None:
    """The same server on a plain unix: port (no front door) knows no caller."""
    plain = f"unix:{pipe_dir}/plain.sock"

    def add_plain_port(server: grpc.Server) -> None:
        assert server.add_insecure_port(plain) != 0

    with serve(pipe_dir, setup=add_plain_port):
        with grpc.insecure_channel(plain) as chan:
            assert chan.unary_unary(method("Whoami"))(b"", timeout=WAIT) == b"null"
        with npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
            who = json.loads(chan.unary_unary(method("Whoami"))(b"", timeout=WAIT))
    assert who["pid"] == os.getpid()


# --- health and reflection ----------------------------------------------------------------------


def test_health_and_reflection_over_pipe(pipe_dir: Path) -> None:
    health_servicer = health.HealthServicer()
    names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)

    def setup(server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(names, server)

    serving = health_pb2.HealthCheckResponse.SERVING
    with serve(pipe_dir, setup=setup), npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        for service in ("", SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
            assert reply.status == serving, service
        health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=WAIT)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=WAIT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        refl = reflection_pb2_grpc.ServerReflectionStub(chan)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=health.SERVICE_NAME),
        ]
        listed, described = list(refl.ServerReflectionInfo(iter(requests), timeout=WAIT))
    assert sorted(s.name for s in listed.list_services_response.service) == sorted(names)
    assert described.file_descriptor_response.file_descriptor_proto, described
