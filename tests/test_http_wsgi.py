"""serve_wsgi and ``npipe serve-wsgi`` (issue 19): a real Flask app (and a settings-less
Django one) on a pipe, called through npipe's httpx transports, with the caller in
environ["npipe.caller"]; an app of the other kind refused at start-up, by serve-asgi
and serve-wsgi alike; the bounded thread pool; across hosts through Samba."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from grpc_support import ensure_test_users, require_root, run_python
from http_apps import ServerThread, pattern

import npipe
import npipe.http
from npipe.smb import BACKENDS, ENV_BACKEND

TESTS = Path(__file__).resolve().parent
NPIPE = [sys.executable, "-m", "npipe"]
MIB = 1024 * 1024
VERSIONS = {"h1": {"http1": True, "http2": False}, "h2": {"http1": False, "http2": True}}


class WsgiThread(ServerThread):
    """serve_wsgi(app, name, **options) on its own loop in a thread."""

    async def _start(self) -> Any:
        return await npipe.http.serve_wsgi(self.app, self.name, **self.options)


def flask_app() -> Any:
    import wsgi_apps

    return wsgi_apps.app


def client(name: str = "api", version: str = "h1", **options: Any) -> httpx.Client:
    return httpx.Client(transport=npipe.http.Transport(name, **VERSIONS[version], **options),
                        base_url="http://api", timeout=30)


def async_client(name: str = "api", version: str = "h1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=npipe.http.AsyncTransport(name, **VERSIONS[version]),
                             base_url="http://api", timeout=30)


@pytest.fixture
def flask_served(pipe_dir: Path) -> Iterator[WsgiThread]:
    with WsgiThread("api", flask_app()) as server:
        yield server


# --- a Flask app, locally -------------------------------------------------------------------


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_flask_sync_and_async_clients_and_the_caller(flask_served: WsgiThread,
                                                     version: str) -> None:
    with client(version=version) as c:
        assert c.get("/hello").text == "hello"
        who = c.get("/caller").json()
    assert who["uid"] == os.getuid() and who["pid"] == os.getpid()
    assert who["transport"] == "local" and who["thread"].startswith("npipe-wsgi")
    assert who["protocol"] == ("HTTP/2" if version == "h2" else "HTTP/1.1")

    async def run() -> tuple[str, dict[str, Any], list[str]]:
        async with async_client(version=version) as c:
            hello = (await c.get("/hello")).text
            who = (await c.get("/caller")).json()
            many = await asyncio.gather(*(c.get("/slow?s=0.1") for _ in range(8)))
            return hello, who, [r.text for r in many]

    hello, who, many = asyncio.run(run())
    assert hello == "hello" and who["uid"] == os.getuid() and many == ["done"] * 8


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_flask_streamed_request_body_and_large_response(flask_served: WsgiThread,
                                                        version: str) -> None:
    body = os.urandom(5 * MIB)

    def pieces() -> Iterator[bytes]:  # a chunked (h1) / streamed (h2) request body
        for i in range(0, len(body), 100_000):
            yield body[i:i + 100_000]

    with client(version=version) as c:
        got = c.post("/digest", content=pieces()).json()
        assert got["length"] == len(body) and got["reads"] > 1
        assert got["sha256"] == hashlib.sha256(body).hexdigest()
        assert c.post("/echo", content=b"x" * MIB).content == b"x" * MIB
        with c.stream("GET", f"/big?n={20 * MIB}") as response:
            received = b"".join(response.iter_bytes())
        assert received == pattern(20 * MIB)
        empty = c.get("/empty")
        assert empty.status_code == 204 and empty.content == b""


def test_a_wsgi_app_that_raises_is_a_500_and_the_server_goes_on(pipe_dir: Path) -> None:
    import wsgi_apps

    with WsgiThread("api", flask_app()), client() as c:
        assert c.get("/boom").status_code == 500
        assert c.get("/hello").text == "hello"
    with WsgiThread("api", wsgi_apps.bare), client() as c:
        assert c.get("/boom").status_code == 500
        assert c.get("/hello").text.startswith("bare ")
        assert c.get("/boom").status_code == 500
        assert c.get("/x").status_code == 200


def test_the_thread_pool_bounds_requests_at_once(pipe_dir: Path) -> None:
    """N workers, N+1 slow requests on their own connections: N run at once, the last
    waits for a free thread."""
    import wsgi_apps

    wsgi_apps._running["busiest"] = 0  # (the app is in this process: earlier tests' count)
    workers, seconds = 2, 1.0
    with WsgiThread("api", flask_app(), max_workers=workers) as served:
        took: dict[int, float] = {}

        def call(i: int) -> None:
            start = time.monotonic()
            with client() as c:
                assert c.get(f"/slow?s={seconds}").text == "done"
            took[i] = time.monotonic() - start

        threads = [threading.Thread(target=call, args=(i,)) for i in range(workers + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        with client() as c:
            busiest = c.get("/busiest").json()["busiest"]
        assert served.server.workers.max_workers == workers
    durations = sorted(took.values())
    assert len(durations) == workers + 1
    assert busiest == workers
    assert durations[-2] < 1.8 * seconds, durations  # the first N together
    assert durations[-1] >= 1.9 * seconds, durations  # the last one waited for a thread


def test_django_app(pipe_dir: Path) -> None:
    import django_app

    with WsgiThread("api", django_app.app), client() as c:
        got = c.get("/caller").json()
    assert got == {"framework": "django", "transport": "local", "uid": os.getuid(),
                   "name": got["name"]} and got["name"]


REQUEST_AS_USER = r"""
import asyncio, httpx, npipe, npipe.http
with httpx.Client(transport=npipe.http.Transport("wsgi"), base_url="http://api",
                  timeout=10) as c:
    sync = c.get("/caller").json()
async def run():
    async with httpx.AsyncClient(transport=npipe.http.AsyncTransport("wsgi"),
                                 base_url="http://api", timeout=10) as c:
        return (await c.get("/caller")).json()
result({"sync": sync, "async": asyncio.run(run())})
"""


@pytest.mark.root
def test_caller_in_environ_is_another_local_user(pipe_dir: Path) -> None:
    require_root()
    t2 = ensure_test_users()["npipe-t2"]
    os.chmod(pipe_dir.parent, 0o711)
    with WsgiThread("wsgi", flask_app(), acl=npipe.Acl.parse(f"user:{t2.name}")):
        got = run_python(REQUEST_AS_USER, t2).check()
    for who in (got["sync"], got["async"]):
        assert who["uid"] == t2.uid and who["user"] == t2.name and who["transport"] == "local"


# --- the other kind of app, refused at start-up ---------------------------------------------


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    pass


def test_library_refuses_the_other_kind_of_app(pipe_dir: Path) -> None:
    async def both() -> None:
        with pytest.raises(npipe.http.WrongAppKind, match="serve_wsgi"):
            await npipe.http.serve_asgi(flask_app(), "api")
        with pytest.raises(TypeError, match="serve_asgi"):
            await npipe.http.serve_wsgi(asgi_app, "api")
        with pytest.raises(npipe.ConfigError):
            await npipe.http.serve_wsgi(flask_app(), "api", max_workers=0)

    asyncio.run(both())
    assert not pipe_dir.exists() or not list(pipe_dir.iterdir())  # no pipe was claimed


@pytest.mark.parametrize(("command", "app", "names"), [
    ("serve-asgi", "wsgi_apps:app", "npipe serve-wsgi"),
    ("serve-asgi", "wsgi_apps:bare", "npipe serve-wsgi"),
    ("serve-asgi", "django_app:app", "npipe serve-wsgi"),
    ("serve-wsgi", "http_apps:app", "npipe serve-asgi"),
])
def test_cli_refuses_the_other_kind_of_app_before_serving(
    pipe_dir: Path, command: str, app: str, names: str,
) -> None:
    done = subprocess.run([*NPIPE, command, app, "--pipe", "svc"], cwd=TESTS,
                          capture_output=True, text=True, timeout=60)
    err = done.stderr.strip()
    assert done.returncode == 2, err
    assert len(err.splitlines()) == 1 and names in err and app in err, err
    assert "serving" not in err


# --- npipe serve-wsgi -----------------------------------------------------------------------


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[Any, str]]:
    import socket
    import tempfile

    d = tempfile.mkdtemp(prefix="npn", dir="/tmp")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(d)


def wait_for(sock: Any, state: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        message: str = sock.recv(4096).decode()
        if state in message.split("\n"):
            return message


def test_serve_wsgi_config_ready_caller_and_graceful_sigterm(pipe_dir: Path,
                                                              tmp_path: Path) -> None:
    cfg = tmp_path / "web.toml"
    cfg.write_text('app = "wsgi_apps:app"\npipe = "web"\ngrace = 10\nworkers = 3\n')
    with notify_socket() as (notify, notify_path):
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        proc = subprocess.Popen([*NPIPE, "serve-wsgi", "--config", str(cfg)], cwd=TESTS,
                                env=env, stderr=subprocess.PIPE, text=True)
        try:
            message = wait_for(notify, "READY=1", 30)
            assert f"MAINPID={proc.pid}" in message.split("\n")
            assert "STATUS=serving wsgi_apps:app on pipe web" in message.split("\n")
            with client("web") as c:
                assert c.get("/hello").text == "hello"
                who = c.get("/caller").json()
                assert who["uid"] == os.getuid() and who["pid"] == os.getpid()
                assert c.get("/boom").status_code == 500
                with c.stream("GET", f"/big?n={8 * MIB}") as r:
                    assert b"".join(r.iter_bytes()) == pattern(8 * MIB)
            got: dict[str, Any] = {}

            def slow() -> None:
                with client("web") as c:
                    got["reply"] = c.get("/slow?s=1.5").text

            worker = threading.Thread(target=slow)
            worker.start()
            time.sleep(0.5)
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
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.stderr.close()
        assert "serving wsgi_apps:app on pipe web" in err


def test_serve_wsgi_abandons_a_request_past_the_grace(pipe_dir: Path) -> None:
    proc = subprocess.Popen([*NPIPE, "serve-wsgi", "wsgi_apps:app", "--pipe", "web",
                             "--grace", "0.5", "--workers", "1"], cwd=TESTS,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("npipe: serving wsgi_apps:app")
        worker = threading.Thread(target=lambda: _ignore(client("web"), "/slow?s=60"))
        worker.start()
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0  # the stop asked for was done; the request is logged
        assert time.monotonic() - start < 6
        assert "1 request still running 0.5s after SIGINT: abandoned" in proc.stderr.read()
        worker.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def _ignore(c: httpx.Client, path: str) -> None:
    with c, contextlib.suppress(httpx.HTTPError):
        c.get(path)


# --- across hosts: the Flask app behind Samba ------------------------------------------------

ALICE, PASSWORD = "npws-alice", "Pipe-Passw0rd!"

REMOTE_CLIENT = r"""
import asyncio, hashlib, json, os, sys
import httpx, npipe, npipe.http, npipe.smb

address = sys.argv[1]
out = {}
for version, flags in (("h1", {}), ("h2", {"http1": False, "http2": True})):
    with httpx.Client(transport=npipe.http.Transport(address, **flags),
                      base_url="http://api", timeout=60) as c:
        who = c.get("/caller").json()
        body = os.urandom(3 * 1024 * 1024)
        digest = c.post("/digest", content=iter([body[:1000000], body[1000000:]])).json()
        big = c.get("/big?n=4194304").content
        out["sync-" + version] = {
            "who": who, "digest_ok": digest["sha256"] == hashlib.sha256(body).hexdigest(),
            "big": len(big), "boom": c.get("/boom").status_code,
            "hello": c.get("/hello").text}

    async def run_async():
        async with httpx.AsyncClient(transport=npipe.http.AsyncTransport(address, **flags),
                                     base_url="http://api", timeout=60) as c:
            who = (await c.get("/caller")).json()
            replies = await asyncio.gather(*(c.get("/slow?s=0.2") for _ in range(6)))
            return {"who": who, "slow": [r.text for r in replies]}

    out["async-" + version] = asyncio.run(run_async())
out["backend"] = type(npipe.smb.get_client()).__module__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def site() -> Iterator[Any]:
    from npipe.testing.netns import require_root_and_samba, smb_site

    require_root_and_samba()
    with smb_site({ALICE: PASSWORD}, prefix="npw") as bed:
        yield bed


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ENV_BACKEND, request.param)
    return str(request.param)


@pytest.mark.root
def test_flask_across_hosts_through_samba(site: Any, backend: str) -> None:
    from npipe.testing.netns import popen_in, run_in

    argv = [*NPIPE, "serve-wsgi", "wsgi_apps:app", "--pipe", "remoteweb", "--smb",
            "--acl", f"user:{ALICE}", "--grace", "2"]
    proc = popen_in(site.hosts.server_ns, argv, env=site.server_env(), cwd=str(TESTS),
                    stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("npipe: serving wsgi_apps:app on"), line + proc.stderr.read()
        env = {**os.environ, "NPIPE_USER": ALICE, "NPIPE_PASSWORD": PASSWORD}
        done = run_in(site.hosts.client_ns,
                      [sys.executable, "-c", REMOTE_CLIENT, site.address("remoteweb")],
                      env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()
    assert out["backend"].startswith(f"npipe.smb.{backend}"), out["backend"]
    for version in ("h1", "h2"):
        sync, asynchronous = out[f"sync-{version}"], out[f"async-{version}"]
        for who in (sync["who"], asynchronous["who"]):
            assert who["transport"] == "smb" and who["account"] == ALICE, who
            assert who["protocol"] == ("HTTP/2" if version == "h2" else "HTTP/1.1")
        assert sync["digest_ok"] and sync["big"] == 4 * MIB
        assert sync["boom"] == 500 and sync["hello"] == "hello"
        assert asynchronous["slow"] == ["done"] * 6
