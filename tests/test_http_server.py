"""serve_asgi and the ``npipe http`` / ``npipe serve-asgi`` commands: hypercorn's internals
we drive, the lifespan, graceful shutdown, readiness through a real NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_apps import ServerThread, pattern
from hypercorn.config import Config

import npipe
import npipe.http

TESTS = Path(__file__).resolve().parent
NPIPE = [sys.executable, "-m", "npipe"]


def config(**values: Any) -> Config:
    cfg = Config()
    for key, value in values.items():
        setattr(cfg, key, value)
    return cfg


def client(name: str = "api", **options: Any) -> httpx.Client:
    return httpx.Client(transport=npipe.http.Transport(name, **options),
                        base_url="http://api", timeout=30)


# --- hypercorn internals ----------------------------------------------------------------------


def test_hypercorn_internals_we_drive_have_not_changed() -> None:
    """serve_asgi replicates hypercorn.asyncio.run.worker_serve around TCPServer: if a
    release moves these, this fails before anything else does."""
    from hypercorn.app_wrappers import ASGIWrapper
    from hypercorn.asyncio.lifespan import Lifespan
    from hypercorn.asyncio.tcp_server import TCPServer
    from hypercorn.asyncio.worker_context import WorkerContext

    version = tuple(int(p) for p in importlib.metadata.version("hypercorn").split(".")[:2])
    assert (0, 17) <= version < (0, 19), version

    def params(fn: Any) -> list[str]:
        return list(inspect.signature(fn).parameters)

    assert params(TCPServer.__init__) == [
        "self", "app", "loop", "config", "context", "state", "reader", "writer"]
    assert inspect.iscoroutinefunction(TCPServer.run)
    assert params(Lifespan.__init__) == ["self", "app", "config", "loop", "lifespan_state"]
    for name in ("handle_lifespan", "wait_for_startup", "wait_for_shutdown"):
        assert inspect.iscoroutinefunction(getattr(Lifespan, name)), name
    assert params(WorkerContext.__init__) == ["self", "max_requests"]
    context = WorkerContext(None)
    assert inspect.iscoroutinefunction(context.terminated.set)
    assert params(ASGIWrapper.__call__) == [
        "self", "scope", "receive", "send", "sync_spawn", "call_soon"]
    cfg = Config()
    for name in ("graceful_timeout", "keep_alive_timeout", "read_timeout", "startup_timeout",
                 "shutdown_timeout"):
        assert hasattr(cfg, name), name


def cut_short(c: httpx.Client, path: str) -> object:
    """What a request the server gave up on got: hypercorn answers a cancelled app
    with 500 when it had not started its response (an error if the connection went)."""
    try:
        with c:
            return c.get(path).status_code
    except httpx.HTTPError as e:
        return type(e).__name__


# --- serve_asgi in process -------------------------------------------------------------------


def test_lifespan_runs_before_serving_and_after_closing(pipe_dir: Path) -> None:
    import http_apps

    before = dict(http_apps.LIFESPAN)
    with ServerThread("api") as served:
        with client() as c:
            seen = c.get("/lifespan").json()
        assert seen["startup"] == before["startup"] + 1
        assert seen["shutdown"] == before["shutdown"]
        assert seen["state"] == {"started_by": "lifespan"}  # lifespan state reaches requests
        served.close()
        assert http_apps.LIFESPAN["shutdown"] == before["shutdown"] + 1
        with pytest.raises(npipe.PipeNotFound):  # the name is given up
            from npipe.local.dial import find_socket

            find_socket(npipe.parse_address("api"))


async def failing_startup(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


def test_a_failed_startup_claims_no_pipe(pipe_dir: Path) -> None:
    with pytest.raises(Exception, match="no database"), ServerThread("api", failing_startup):
        pass
    assert not (pipe_dir / "api").exists()


def test_close_lets_requests_in_flight_finish(pipe_dir: Path) -> None:
    with ServerThread("api", config=config(graceful_timeout=10)) as served:
        idle = client()
        assert idle.get("/hello").text == "hello"  # now an idle keep-alive connection
        got: dict[str, Any] = {}

        def slow() -> None:
            with client() as c:
                got["reply"] = c.get("/slow?s=1").text

        worker = threading.Thread(target=slow)
        worker.start()
        served.wait_for_connections(2)
        start = time.monotonic()
        served.close()
        took = time.monotonic() - start
        worker.join(10)
        assert got["reply"] == "done"
        assert 0.5 < took < 5  # waited for the slow request, not for the idle connection
        with pytest.raises(httpx.ConnectError):  # no new connections
            client().get("/hello")
        with pytest.raises(httpx.HTTPError):  # the idle one was closed
            idle.get("/hello")
        idle.close()


def test_graceful_timeout_bounds_the_close(pipe_dir: Path) -> None:
    with ServerThread("api", config=config(graceful_timeout=0.5)) as served:
        failed: list[object] = []

        def slow() -> None:
            failed.append(cut_short(client(), "/slow?s=30"))

        worker = threading.Thread(target=slow)
        worker.start()
        served.wait_for_connections(1)
        start = time.monotonic()
        served.close()
        took = time.monotonic() - start
        worker.join(10)
    assert 0.4 < took < 4
    assert failed == [500]


def test_caller_extension_is_not_in_the_lifespan_scope(pipe_dir: Path) -> None:
    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(scope)
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with ServerThread("api", app), client() as c:
        assert c.get("/").status_code == 204
    lifespan, http = scopes[0], scopes[1]
    assert "npipe.caller" not in (lifespan.get("extensions") or {})
    who = http["extensions"][npipe.http.CALLER_EXTENSION]
    assert isinstance(who, npipe.Caller) and who.uid == os.getuid()


# --- npipe http ------------------------------------------------------------------------------


def run_npipe(*args: str, stdin: bytes | None = None, **kw: Any) -> subprocess.CompletedProcess[
        bytes]:
    return subprocess.run([*NPIPE, *args], input=stdin, capture_output=True, timeout=60, **kw)


@pytest.fixture
def served(pipe_dir: Path) -> Iterator[ServerThread]:
    with ServerThread("api") as server:
        yield server


def test_cli_http_get_prints_the_body(served: ServerThread) -> None:
    done = run_npipe("http", "api", "/big?n=300000")
    assert done.returncode == 0, done.stderr
    assert done.stdout == pattern(300000)


def test_cli_http_include_headers_and_http2(served: ServerThread) -> None:
    done = run_npipe("http", "-i", "api", "/hello")
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200") and "content-length: 5" in lines
    assert body == b"hello"
    done = run_npipe("http", "--http2", "api", "/caller")
    assert json.loads(done.stdout)["http_version"] == "2"


def test_cli_http_status_codes_and_fail(served: ServerThread) -> None:
    done = run_npipe("http", "api", "/status?code=503")
    assert (done.returncode, done.stdout) == (0, b"status 503")  # like curl without -f
    done = run_npipe("http", "-f", "api", "/status?code=404")
    assert (done.returncode, done.stdout) == (22, b"")
    assert b"404" in done.stderr
    done = run_npipe("http", "-f", "api", "/status?code=302")
    assert done.returncode == 0


def test_cli_http_data_method_and_headers(served: ServerThread, tmp_path: Path) -> None:
    done = run_npipe("http", "api", "/echo", "-d", "a=1&b=2")
    assert done.stdout == b"a=1&b=2"
    payload = os.urandom(200_000)
    (tmp_path / "body.bin").write_bytes(payload)
    done = run_npipe("http", "PUT", "api", "/digest", "--data-binary",
                     f"@{tmp_path / 'body.bin'}")
    assert json.loads(done.stdout)["length"] == len(payload)
    done = run_npipe("http", "api", "/echo", "-d", "@-", stdin=b"from stdin")
    assert done.stdout == b"from stdin"
    done = run_npipe("http", "api", "/headers", "-H", "X-Trace: abc", "-H",
                     "Content-Type: text/csv", "-d", "x")
    headers = json.loads(done.stdout)
    assert headers["x-trace"] == "abc" and headers["content-type"] == "text/csv"
    done = run_npipe("http", "api", "/big?n=1000", "-o", str(tmp_path / "out"))
    assert done.stdout == b"" and (tmp_path / "out").read_bytes() == pattern(1000)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["http", "a\\b\\c", "/x"], 2, "pipe address"),
    (["http", "api", "/x", "-H", "no colon"], 2, "bad header"),
    (["http", "api", "/x", "-H", "X-A: b\nc"], 2, "CR, LF"),
    (["http", "GE T", "api", "/x"], 2, "bad METHOD"),
    (["http", "nosuchpipe", "/x"], 1, "no pipe"),
])
def test_cli_http_errors_are_one_line(served: ServerThread, args: list[str], code: int,
                                      message: str) -> None:
    done = run_npipe(*args)
    assert done.returncode == code, done.stderr
    err = done.stderr.decode().strip()
    assert message in err and len(err.splitlines()) == 1, err


# --- npipe serve-asgi ------------------------------------------------------------------------


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    directory = tempfile.mkdtemp(prefix="npn", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def wait_for(sock: socket.socket, state: str, timeout: float) -> str:
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        message = sock.recv(4096).decode()
        if state in message.split("\n"):
            return message


def test_serve_asgi_ready_then_graceful_on_sigterm(pipe_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "api.toml"
    cfg.write_text('app = "http_apps:app"\npipe = "svc"\ngrace = 10\n')
    marker = tmp_path / "shutdown"
    with notify_socket() as (notify, notify_path):
        env = {**os.environ, "NOTIFY_SOCKET": notify_path, "HTTP_APPS_STARTUP_DELAY": "1",
               "HTTP_APPS_SHUTDOWN_MARKER": str(marker)}
        proc = subprocess.Popen([*NPIPE, "serve-asgi", "--config", str(cfg)], cwd=TESTS,
                                env=env, stderr=subprocess.PIPE, text=True)
        try:
            # During the lifespan startup: no READY yet, and no pipe to connect to.
            with pytest.raises(TimeoutError):
                wait_for(notify, "READY=1", 0.5)
            with pytest.raises(httpx.ConnectError), client("svc") as c:
                c.get("/hello")
            message = wait_for(notify, "READY=1", 30)
            assert f"MAINPID={proc.pid}" in message.split("\n")
            with client("svc") as c:  # connectable the moment READY=1 came
                assert c.get("/hello").text == "hello"
            got: dict[str, Any] = {}

            def slow() -> None:
                with client("svc") as c:
                    got["reply"] = c.get("/slow?s=1.5").text

            worker = threading.Thread(target=slow)
            worker.start()
            time.sleep(0.5)  # the request is in flight
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            wait_for(notify, "STOPPING=1", 10)
            assert proc.wait(15) == 0
            took = time.monotonic() - start
            worker.join(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert got["reply"] == "done" and took < 10
        assert marker.read_text() == "shutdown\n"  # the lifespan shutdown ran
        assert proc.stderr is not None
        assert "serving http_apps:app on pipe svc" in proc.stderr.read()
        proc.stderr.close()


def test_serve_asgi_exit_is_bounded_by_the_graceful_timeout(pipe_dir: Path) -> None:
    proc = subprocess.Popen([*NPIPE, "serve-asgi", "http_apps:app", "--pipe", "svc",
                             "--grace", "0.5"], cwd=TESTS,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("npipe: serving http_apps:app")
        failed: list[object] = []

        def slow() -> None:
            failed.append(cut_short(client("svc"), "/slow?s=60"))

        worker = threading.Thread(target=slow)
        worker.start()
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert time.monotonic() - start < 5
        worker.join(10)
        assert failed == [500]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.parametrize(("args", "message"), [
    (["serve-asgi", "--pipe", "svc"], "missing MODULE:APP"),
    (["serve-asgi", "http_apps:app"], "missing --pipe"),
    (["serve-asgi", "no_such_module:app", "--pipe", "svc"], "no module named"),
    (["serve-asgi", "http_apps:nothing", "--pipe", "svc"], "has no 'nothing'"),
    (["serve-asgi", "http_apps:app", "--pipe", "//host/pipe/x"], "serves a local pipe NAME"),
])
def test_serve_asgi_usage_errors(pipe_dir: Path, args: list[str], message: str) -> None:
    done = run_npipe(*args, cwd=TESTS)
    err = done.stderr.decode().strip()
    assert done.returncode == 2 and message in err and len(err.splitlines()) == 1, err


def test_websocket_scope_carries_the_caller(pipe_dir: Path) -> None:
    """A websocket connection (an independent client: the websockets library over the
    pipe's Unix socket) reaches the app with the caller in its scope, like HTTP."""
    from websockets.asyncio.client import unix_connect

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert scope["type"] == "websocket"
        who = scope["extensions"]["npipe.caller"]
        while True:
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
            elif message["type"] == "websocket.receive":
                await send({"type": "websocket.send",
                            "text": f"{who.user} uid={who.uid}: {message['text']}"})
            else:
                return

    async def main() -> list[str]:
        server = await npipe.http.serve_asgi(app, "ws")
        try:
            async with unix_connect(str(server.path), uri="ws://ws/chat") as ws:
                answers = []
                for text in ("one", "two"):
                    await ws.send(text)
                    answers.append(str(await ws.recv()))
                return answers
        finally:
            await server.aclose()

    me = f"{npipe.Caller.local(os.getpid(), os.getuid(), os.getgid()).user} uid={os.getuid()}"
    assert asyncio.run(main()) == [f"{me}: one", f"{me}: two"]
