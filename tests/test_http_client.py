"""npipe.http.Transport / AsyncTransport against serve_asgi: local pipes (and curl as an
independent client), another local user, and a remote pipe through Samba across two
network namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from grpc_support import ensure_test_users, require_root, run_python
from http_apps import ServerThread, pattern

import npipe
import npipe.http
from npipe.http.network import AsyncPipeBackend, PipeBackend
from npipe.smb import BACKENDS, ENV_BACKEND

TESTS = Path(__file__).resolve().parent
MIB = 1024 * 1024
VERSIONS = {"h1": {"http1": True, "http2": False}, "h2": {"http1": False, "http2": True}}
WIRE = {"h1": "HTTP/1.1", "h2": "HTTP/2"}


@pytest.fixture
def served(pipe_dir: Path) -> Iterator[ServerThread]:
    with ServerThread("api") as server:
        yield server


def client(version: str = "h1", **options: Any) -> httpx.Client:
    timeout = options.pop("http_timeout", 30.0)
    return httpx.Client(transport=npipe.http.Transport("api", **VERSIONS[version], **options),
                        base_url="http://api", timeout=timeout)


def async_client(version: str = "h1", **options: Any) -> httpx.AsyncClient:
    timeout = options.pop("http_timeout", 30.0)
    return httpx.AsyncClient(
        transport=npipe.http.AsyncTransport("api", **VERSIONS[version], **options),
        base_url="http://api", timeout=timeout,
    )


def in_chain(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# --- the transports are httpx's, with npipe's pool -----------------------------------------


def test_transports_replace_httpx_pool_with_a_pipe_backed_one() -> None:
    """What subclassing relies on: httpx keeps its pool in ``_pool`` and handles requests
    through it (the functional tests below prove the latter)."""
    assert (0, 27) <= tuple(int(p) for p in httpx.__version__.split(".")[:2]) < (0, 29)
    sync = npipe.http.Transport("api")
    assert isinstance(sync._pool, httpcore.ConnectionPool)
    assert isinstance(sync._pool._network_backend, PipeBackend)
    both = npipe.http.AsyncTransport("api", http1=False, http2=True)
    assert isinstance(both._pool, httpcore.AsyncConnectionPool)
    assert isinstance(both._pool._network_backend, AsyncPipeBackend)
    assert (both._pool._http1, both._pool._http2) == (False, True)


def test_import_npipe_loads_no_http_libraries() -> None:
    probe = ("import sys, npipe, npipe.http; print(sorted(m for m in "
             "('httpx', 'httpcore', 'hypercorn', 'h2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


# --- local pipes ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_sync_get_post_and_caller(served: ServerThread, version: str) -> None:
    with client(version) as c:
        hello = c.get("/hello")
        echoed = c.post("/echo", content=b"ping \x00 bytes")
        who = c.get("/caller").json()
    assert (hello.status_code, hello.text, hello.http_version) == (200, "hello", WIRE[version])
    assert echoed.content == b"ping \x00 bytes"
    assert who["transport"] == "local" and who["uid"] == os.getuid()
    assert who["user"] == pwd.getpwuid(os.getuid()).pw_name and who["pid"] == os.getpid()
    assert who["http_version"] == ("2" if version == "h2" else "1.1")


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_async_get_post_and_caller(served: ServerThread, version: str) -> None:
    async def main() -> tuple[httpx.Response, httpx.Response, dict[str, Any]]:
        async with async_client(version) as c:
            return (await c.get("/hello"), await c.post("/echo", content=b"x" * 1000),
                    (await c.get("/caller")).json())

    hello, echoed, who = asyncio.run(main())
    assert (hello.text, hello.http_version) == ("hello", WIRE[version])
    assert echoed.content == b"x" * 1000
    assert who["uid"] == os.getuid() and who["pid"] == os.getpid()


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_large_bodies_both_ways(served: ServerThread, version: str) -> None:
    body = os.urandom(6 * MIB + 123)
    with client(version) as c:
        digest = c.post("/digest", content=body).json()
        big = c.get(f"/big?n={7 * MIB}").content

    async def main() -> tuple[bytes, bytes]:
        async with async_client(version) as c:
            echoed = (await c.post("/echo", content=body)).content
            return echoed, (await c.get(f"/big?n={5 * MIB}")).content

    echoed, big_async = asyncio.run(main())
    import hashlib

    assert digest == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert big == pattern(7 * MIB) and big_async == pattern(5 * MIB)
    assert echoed == body


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_streaming_response_arrives_chunk_by_chunk(served: ServerThread, version: str) -> None:
    with client(version) as c, c.stream("GET", "/stream?chunks=8") as response:
        start = time.monotonic()
        arrivals = [(line, time.monotonic() - start) for line in response.iter_lines()]
    assert [line for line, _ in arrivals] == [f"chunk {i}" for i in range(8)]
    # The server sleeps 50 ms between chunks: the first came long before the last.
    assert arrivals[-1][1] - arrivals[0][1] >= 0.25


def test_keep_alive_reuses_one_pipe_connection(served: ServerThread) -> None:
    with client("h1") as c:
        texts = [c.get("/hello").text for _ in range(25)]
    assert texts == ["hello"] * 25
    assert served.server.accepted == 1

    async def main() -> list[str]:
        async with async_client("h2") as c:
            return [(await c.get("/hello")).text for _ in range(25)]

    assert asyncio.run(main()) == ["hello"] * 25
    assert served.server.accepted == 2


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_concurrent_requests(served: ServerThread, version: str) -> None:
    async def main() -> list[str]:
        async with async_client(version) as c:
            replies = await asyncio.gather(*(c.get("/slow?s=0.3") for _ in range(40)))
            return [r.text for r in replies]

    start = time.monotonic()
    assert asyncio.run(main()) == ["done"] * 40
    assert time.monotonic() - start < 40 * 0.3 / 4  # they ran side by side
    if version == "h2":  # multiplexed on one connection
        assert served.server.accepted == 1
    else:  # one connection per request in flight
        assert served.server.accepted > 1


def test_read_timeout(served: ServerThread) -> None:
    slow = httpx.Timeout(10.0, read=0.5)
    with client("h1", http_timeout=slow) as c:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            c.get("/slow?s=5")
        assert time.monotonic() - start < 3

    async def main() -> None:
        async with async_client("h2", http_timeout=slow) as c:
            await c.get("/slow?s=5")

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(main())


def test_missing_pipe_is_a_connect_error_with_npipes_message(pipe_dir: Path) -> None:
    with client() as c, pytest.raises(httpx.ConnectError) as caught:
        c.get("/hello")
    cause = in_chain(caught.value, npipe.PipeNotFound)
    assert cause is not None and str(caught.value) == str(cause)
    assert "no pipe \\\\.\\pipe\\api" in str(caught.value)

    async def main() -> None:
        async with async_client() as c:
            await c.get("/hello")

    with pytest.raises(httpx.ConnectError) as caught_async:
        asyncio.run(main())
    assert in_chain(caught_async.value, npipe.PipeNotFound) is not None


def test_tls_is_refused_clearly(served: ServerThread) -> None:
    with client() as c, pytest.raises(httpx.ConnectError, match="TLS over a pipe"):
        c.get("https://api/hello")


@pytest.mark.parametrize("flag", [None, "--http2-prior-knowledge"])
def test_curl_straight_at_the_pipe_socket(served: ServerThread, flag: str | None) -> None:
    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("curl is not installed; CI=true", pytrace=False)
        pytest.skip("curl is not installed")
    argv = [curl, "-sS", "--unix-socket", str(served.server.path), *([flag] if flag else []),
            "http://api/caller"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    who = json.loads(done.stdout)
    assert who["http_version"] == ("2" if flag else "1.1")
    assert who["uid"] == os.getuid()
    body = os.urandom(3 * MIB)
    done_post = subprocess.run([*argv[:-1], "--data-binary", "@-", "http://api/digest"],
                               input=body, capture_output=True, timeout=30)
    assert json.loads(done_post.stdout)["length"] == len(body)


# --- another local user ---------------------------------------------------------------------

REQUEST_AS_USER = """
import httpx, npipe, npipe.http
try:
    with httpx.Client(transport=npipe.http.Transport("shared"), base_url="http://api",
                      timeout=10) as c:
        result({"ok": c.get("/caller").json()})
except httpx.HTTPError as e:
    result({"error": type(e).__name__, "message": str(e)})
"""


@pytest.mark.root
def test_acl_admits_one_local_user_and_refuses_another(pipe_dir: Path) -> None:
    require_root()
    users = ensure_test_users()
    t1, t2 = users["npipe-t1"], users["npipe-t2"]
    os.chmod(pipe_dir.parent, 0o711)  # others may reach the socket, not list the directory
    with ServerThread("shared", acl=npipe.Acl.parse(f"user:{t2.name}")) as served:
        admitted = run_python(REQUEST_AS_USER, t2).check()
        refused = run_python(REQUEST_AS_USER, t1).check()
        served_requests = served.server.accepted
    assert admitted["ok"]["uid"] == t2.uid and admitted["ok"]["user"] == t2.name
    # The client sees the refusal itself (the server's ACL note), before HTTP starts
    # (issue 22: no longer a connection closed without a word).
    assert refused.get("error") == "ConnectError", refused
    assert "its ACL does not admit you" in refused["message"], refused
    assert t1.name in refused["message"] and r"\\.\pipe\shared" in refused["message"]
    assert served_requests == 1  # only t2's connection reached hypercorn


# --- a remote pipe through Samba, from another network namespace -----------------------------

ALICE, BOB, PASSWORD = "npth-alice", "npth-bob", "Pipe-Passw0rd!"

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
        digest = c.post("/digest", content=body).json()
        big = c.get("/big?n=4194304").content
        out["sync-" + version] = {
            "who": who, "digest_ok": digest["sha256"] == hashlib.sha256(body).hexdigest(),
            "big": len(big), "hello": [c.get("/hello").text for _ in range(5)]}

    async def run_async():
        async with httpx.AsyncClient(transport=npipe.http.AsyncTransport(address, **flags),
                                     base_url="http://api", timeout=60) as c:
            who = (await c.get("/caller")).json()
            replies = await asyncio.gather(*(c.get("/slow?s=0.2") for _ in range(10)))
            echoed = (await c.post("/echo", content=b"y" * 2_000_000)).content
            return {"who": who, "slow": [r.text for r in replies],
                    "echo_ok": echoed == b"y" * 2_000_000}

    out["async-" + version] = asyncio.run(run_async())
out["backend"] = type(npipe.smb.get_client()).__module__
print(json.dumps(out))
"""

REMOTE_ERROR = r"""
import json, sys
import httpx, npipe, npipe.http
address = sys.argv[1]
try:
    with httpx.Client(transport=npipe.http.Transport(address, timeout=5),
                      base_url="http://api") as c:
        c.get("/hello")
    print(json.dumps({"ok": True}))
except httpx.HTTPError as e:
    seen, kinds = e, []
    while seen is not None:
        kinds.append(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    print(json.dumps({"error": type(e).__name__, "message": str(e), "chain": kinds}))
"""


@pytest.fixture(scope="module")
def site() -> Iterator[Any]:
    from npipe.testing.netns import require_root_and_samba, smb_site

    require_root_and_samba()
    with smb_site({ALICE: PASSWORD, BOB: PASSWORD}, prefix="nph") as bed:
        yield bed


@contextlib.contextmanager
def remote_server(site: Any, name: str) -> Iterator[subprocess.Popen[str]]:
    """``npipe serve-asgi http_apps:app --smb`` in the server namespace, for ALICE only."""
    from npipe.testing.netns import popen_in

    argv = [sys.executable, "-m", "npipe", "serve-asgi", "http_apps:app", "--pipe", name,
            "--smb", "--acl", f"user:{ALICE}", "--grace", "2"]
    proc = popen_in(site.hosts.server_ns, argv, env=site.server_env(), cwd=str(TESTS),
                    stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("npipe: serving http_apps:app on"), line + proc.stderr.read()
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def run_client(site: Any, script: str, address: str, user: str) -> dict[str, Any]:
    from npipe.testing.netns import run_in

    env = {**os.environ, "NPIPE_USER": user, "NPIPE_PASSWORD": PASSWORD}
    done = run_in(site.hosts.client_ns, [sys.executable, "-c", script, address], env=env,
                  capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The client runs with each SMB client backend ($NPIPE_SMB_BACKEND, inherited)."""
    monkeypatch.setenv(ENV_BACKEND, request.param)
    return str(request.param)


@pytest.mark.root
def test_remote_pipe_through_samba(site: Any, backend: str) -> None:
    address = "\\\\" + site.hosts.server_ip + "\\pipe\\remoteapi"
    with remote_server(site, "remoteapi"):
        out = run_client(site, REMOTE_CLIENT, address, ALICE)
        from npipe.testing.netns import run_in

        env = {**os.environ, "NPIPE_USER": ALICE, "NPIPE_PASSWORD": PASSWORD}
        cli = run_in(site.hosts.client_ns, [sys.executable, "-m", "npipe", "http", "--http2",
                                            site.address("remoteapi"), "/caller"],
                     env=env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["account"] == ALICE
    assert out["backend"].startswith(f"npipe.smb.{backend}"), out["backend"]
    for version in ("h1", "h2"):
        sync, asynchronous = out[f"sync-{version}"], out[f"async-{version}"]
        for who in (sync["who"], asynchronous["who"]):
            assert who["transport"] == "smb" and who["account"] == ALICE
            assert who["http_version"] == ("2" if version == "h2" else "1.1")
        assert sync["digest_ok"] and sync["big"] == 4 * MIB
        assert sync["hello"] == ["hello"] * 5
        assert asynchronous["slow"] == ["done"] * 10 and asynchronous["echo_ok"]


@pytest.mark.root
def test_remote_user_the_acl_refuses(site: Any) -> None:
    with remote_server(site, "private"):
        out = run_client(site, REMOTE_ERROR, site.address("private"), BOB)
    assert out.get("error") == "ConnectError", out
    assert "AccessDenied" in out["chain"] and "refused" in out["message"]
