"""Shared helpers for the gRPC-over-pipe tests (test_grpc_*.py).

Everything here uses real grpcio on both ends through real pipes. The service is
``t.Svc``, made of generic handlers on raw bytes, so no proto is needed:

=========  ================  ==================================================
method     kind              behaviour
=========  ================  ==================================================
Echo       unary-unary       returns the request; records the peer string
Whoami     unary-unary       JSON of ``npipe.grpc.caller(context)`` (or null)
Count      unary-stream      request ``b"N"`` -> ``b"0"`` ... ``b"N-1"``
Concat     stream-unary      joins the requests
Bidi       stream-stream     answers each request ``r`` with ``b"re:" + r``
Sleep      unary-unary       waits ``float(request)`` seconds or until inactive
Abort      unary-unary       request ``b"CODE_NAME:details"`` -> abort with it
Meta       unary-unary       records invocation metadata, sends initial and
                             trailing metadata, returns the custom keys as JSON
Forever    unary-stream      streams until the call ends; records cancellation
=========  ================  ==================================================

``Probe`` collects what the handlers saw, so tests can assert on the server side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import npipe
import npipe.grpc
from npipe.acl import OWNER_ONLY
from npipe.samba.smbd import ensure_unix_user

SERVICE = "t.Svc"
MiB = 1024 * 1024
BIG_LIMIT = 16 * MiB
BIG_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", BIG_LIMIT),
    ("grpc.max_receive_message_length", BIG_LIMIT),
]
# Custom metadata the Meta handler sends back.
INITIAL_MD = (("x-initial", "first"), ("x-initial-bin", b"\x00\xffinit"))
TRAILING_MD = (("x-trailing", "last"), ("x-trailing-bin", b"\x01\x02trail"))

# Bound on every wait in these tests: far below pytest-timeout's 120 s.
WAIT = 10.0

TEST_USERS = ("npipe-t1", "npipe-t2", "npipe-t3")


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


# --- environment ------------------------------------------------------------------------


def require_root() -> None:
    """Skip a test that needs root (switching uids); fail instead when CI=true."""
    if os.geteuid() == 0:
        return
    reason = "needs root to run clients and servers as other users (npipe-t1, npipe-t2)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so this must not be skipped", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def temp_pipe_dir() -> Iterator[Path]:
    """A short private directory under /tmp (a socket path must stay under 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="np", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def make_traversable(directory: Path) -> None:
    """Let other users reach sockets in ``directory`` (not list it): mode 0711.

    /tmp itself is already traversable by everyone (1777); it is checked, not changed.
    """
    os.chmod(directory, 0o711)
    parent_mode = os.stat(directory.parent).st_mode
    assert parent_mode & 0o001, f"{directory.parent} is not traversable by other users"


@dataclass(frozen=True)
class TestUser:
    __test__ = False  # not a test class, whatever pytest thinks of the name

    name: str
    uid: int
    gid: int


def ensure_test_users() -> dict[str, TestUser]:
    """Create npipe-t1, npipe-t2 and npipe-t3 (no home directory) if they do not exist
    yet; the suite removes the ones it created when it ends (tests/suite_accounts.py)."""
    users = {}
    for name in TEST_USERS:
        ensure_unix_user(name)  # (records what it creates in $NPIPE_TEST_ACCOUNTS_FILE)
        pw = pwd.getpwnam(name)
        users[name] = TestUser(name, pw.pw_uid, pw.pw_gid)
    return users


# --- the service --------------------------------------------------------------------------


@dataclass
class Probe:
    """What the server-side handlers saw (filled from grpcio's worker threads)."""

    peers: list[str] = field(default_factory=list)
    callers: list[npipe.Caller | None] = field(default_factory=list)
    metadata: list[tuple[tuple[str, Any], ...]] = field(default_factory=list)
    handled: list[str] = field(default_factory=list)  # method names, in call order
    # Forever: its context, whether it started, whether its loop ran out (the generator
    # may instead be left suspended at a yield), whether the termination callback ran
    # (add_callback / add_done_callback), and whether the handler was cancelled (aio).
    stream_context: Any = None
    stream_started: threading.Event = field(default_factory=threading.Event)
    stream_ended: threading.Event = field(default_factory=threading.Event)
    terminated: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sleep_ended: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, name: str, context: Any) -> None:
        with self.lock:
            self.handled.append(name)
            self.peers.append(context.peer())


def caller_json(who: npipe.Caller | None) -> bytes:
    if who is None:
        return b"null"
    fields = {
        "transport": who.transport, "uid": who.uid, "gid": who.gid, "pid": who.pid,
        "user": who.user, "groups": list(who.groups), "name": who.name,
    }
    return json.dumps(fields).encode()


def _meta_reply(context: Any, probe: Probe) -> bytes:
    md = tuple((m.key, m.value) for m in context.invocation_metadata())
    with probe.lock:
        probe.metadata.append(md)
    custom = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in md if k.startswith("x-")}
    return json.dumps(custom, sort_keys=True).encode()


def _abort_args(request: bytes) -> tuple[grpc.StatusCode, str]:
    code, _, details = request.decode().partition(":")
    return grpc.StatusCode[code], details


def sync_handler(probe: Probe) -> grpc.GenericRpcHandler:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        probe.note("Echo", context)
        return request

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        probe.note("Whoami", context)
        who = npipe.grpc.caller(context)
        with probe.lock:
            probe.callers.append(who)
        return caller_json(who)

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        probe.note("Count", context)
        for i in range(int(request)):
            yield str(i).encode()

    def concat(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        probe.note("Concat", context)
        return b"".join(requests)

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        probe.note("Bidi", context)
        for r in requests:
            yield b"re:" + r

    def sleep(request: bytes, context: grpc.ServicerContext) -> bytes:
        probe.note("Sleep", context)
        until = time.monotonic() + float(request)
        try:
            while context.is_active() and time.monotonic() < until:
                time.sleep(0.005)
        finally:
            probe.sleep_ended.set()
        return b"slept"

    def abort(request: bytes, context: grpc.ServicerContext) -> bytes:
        probe.note("Abort", context)
        context.abort(*_abort_args(request))  # raises
        raise AssertionError("context.abort returned")

    def meta(request: bytes, context: grpc.ServicerContext) -> bytes:
        probe.note("Meta", context)
        reply = _meta_reply(context, probe)
        context.send_initial_metadata(INITIAL_MD)
        context.set_trailing_metadata(TRAILING_MD)
        return reply

    def forever(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        probe.note("Forever", context)

        context.add_callback(probe.terminated.set)
        probe.stream_context = context
        probe.stream_started.set()
        i = 0
        try:
            while context.is_active():
                yield str(i).encode()
                i += 1
                time.sleep(0.005)
        finally:
            probe.stream_ended.set()

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Concat": grpc.stream_unary_rpc_method_handler(concat),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "Abort": grpc.unary_unary_rpc_method_handler(abort),
        "Meta": grpc.unary_unary_rpc_method_handler(meta),
        "Forever": grpc.unary_stream_rpc_method_handler(forever),
    })


def aio_handler(probe: Probe) -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        probe.note("Echo", context)
        return request

    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        probe.note("Whoami", context)
        who = npipe.grpc.caller(context)
        with probe.lock:
            probe.callers.append(who)
        return caller_json(who)

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        probe.note("Count", context)
        for i in range(int(request)):
            yield str(i).encode()

    async def concat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        probe.note("Concat", context)
        return b"".join([r async for r in requests])

    async def bidi(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        probe.note("Bidi", context)
        async for r in requests:
            yield b"re:" + r

    async def sleep(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        probe.note("Sleep", context)
        try:
            await asyncio.sleep(float(request))  # cancelled when the call ends
        finally:
            probe.sleep_ended.set()
        return b"slept"

    async def abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        probe.note("Abort", context)
        await context.abort(*_abort_args(request))  # raises
        raise AssertionError("context.abort returned")

    async def meta(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        probe.note("Meta", context)
        reply = _meta_reply(context, probe)
        await context.send_initial_metadata(INITIAL_MD)
        context.set_trailing_metadata(TRAILING_MD)
        return reply

    async def forever(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        probe.note("Forever", context)

        # (context.cancelled() is still False in the done callback in grpcio 1.85, even
        # without npipe; the handler's CancelledError is the reliable sign of a cancel.)
        context.add_done_callback(lambda _ctx: probe.terminated.set())
        probe.stream_context = context
        probe.stream_started.set()
        i = 0
        try:
            while not context.done():
                yield str(i).encode()
                i += 1
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        finally:
            probe.stream_ended.set()

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Concat": grpc.stream_unary_rpc_method_handler(concat),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "Abort": grpc.unary_unary_rpc_method_handler(abort),
        "Meta": grpc.unary_unary_rpc_method_handler(meta),
        "Forever": grpc.unary_stream_rpc_method_handler(forever),
    })


# --- servers -------------------------------------------------------------------------------


def record_backends(server: Any) -> list[Path]:
    """Note the unix: addresses that npipe makes ``server`` listen on (its backends).

    Wraps the instance's add_insecure_port, so tests can check that a backend socket
    and the private directory around it go away with the pipe, wherever npipe puts them.
    """
    seen: list[Path] = []
    add = server.add_insecure_port

    def recording(address: str) -> int:
        if address.startswith("unix:"):
            seen.append(Path(urllib.parse.unquote(address[len("unix:"):])))
        return add(address)

    server.add_insecure_port = recording
    return seen


def backend_leftovers(backends: list[Path], pipe_dir: Path) -> list[Path]:
    """Backend sockets, or private directories holding them, that still exist."""
    left = [b for b in backends if os.path.lexists(b)]
    left += [b.parent for b in backends if b.parent != pipe_dir and os.path.lexists(b.parent)]
    return left


@dataclass
class Served:
    server: Any  # grpc.Server or grpc.aio.Server
    port: npipe.grpc.PipePort
    probe: Probe
    pipe_dir: Path
    name: str
    backends: list[Path]  # where grpcio itself listens (see record_backends)

    @property
    def path(self) -> Path:
        return self.port.path

    def leftovers(self) -> list[Path]:
        return backend_leftovers(self.backends, self.pipe_dir)


@contextlib.contextmanager
def serve(
    pipe_dir: Path,
    name: str = "svc",
    *,
    acl: npipe.Acl = OWNER_ONLY,
    options: list[tuple[str, Any]] | None = None,
    max_workers: int = 32,
    setup: Callable[[grpc.Server], None] | None = None,
) -> Iterator[Served]:
    """A started sync grpc.Server with ``t.Svc`` on pipe ``name``; stopped on exit.

    ``setup(server)`` may add more services or ports before the pipe port is added.
    """
    probe = Probe()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    server.add_generic_rpc_handlers((sync_handler(probe),))
    if setup is not None:
        setup(server)
    backends = record_backends(server)
    port = npipe.grpc.add_pipe_port(server, name, acl=acl, pipe_dir=pipe_dir)
    server.start()
    try:
        yield Served(server, port, probe, pipe_dir, name, backends)
    finally:
        server.stop(0).wait(WAIT)


@contextlib.asynccontextmanager
async def aio_serve(
    pipe_dir: Path,
    name: str = "svc",
    *,
    acl: npipe.Acl = OWNER_ONLY,
    options: list[tuple[str, Any]] | None = None,
) -> AsyncIterator[Served]:
    """A started grpc.aio.Server with ``t.Svc`` on pipe ``name``; stopped on exit."""
    probe = Probe()
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((aio_handler(probe),))
    backends = record_backends(server)
    port = npipe.grpc.add_pipe_port(server, name, acl=acl, pipe_dir=pipe_dir)
    await server.start()
    try:
        yield Served(server, port, probe, pipe_dir, name, backends)
    finally:
        await asyncio.wait_for(server.stop(0), WAIT)


def run_async(coro_fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run an async scenario in a fresh loop, bounded by ``timeout`` seconds."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


async def await_event(event: threading.Event, timeout: float = WAIT) -> bool:
    """Wait for ``event`` without blocking the loop (an aio server may need to run)."""
    deadline = time.monotonic() + timeout
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return event.is_set()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --- other processes and other users --------------------------------------------------------

# The child imports everything first and only then becomes the target user: this
# interpreter may live where other users cannot read it (pyenv under /root, 0700).
# setgroups/setgid/setuid as root change the real, effective and saved ids, so the
# kernel (SO_PEERCRED, socket ownership) sees exactly that user from then on.
# The child also has this module (as grpc_support) for the t.Svc handlers.
_PRELUDE = f"""\
import errno, grp, json, os, pwd, socket, sys, threading, time
from concurrent import futures
import concurrent.futures.thread  # futures loads its executors lazily
import grpc, grpc.aio
import npipe, npipe.grpc
from npipe.identity import Caller
sys.path.insert(0, {os.fspath(Path(__file__).resolve().parent)!r})
import grpc_support
# Load what grpcio imports lazily while the interpreter's files are still readable.
import grpc._channel, grpc._server, grpc._interceptor, grpc._utilities
grpc.server(futures.ThreadPoolExecutor(max_workers=1)).stop(None)
with grpc.insecure_channel("unix:/nonexistent/warm-up") as _warm:
    try:
        _warm.unary_unary("/warm/Up")(b"", timeout=1)
    except grpc.RpcError as _e:
        _e.code(), _e.details()
_uid, _gid = int(sys.argv[1]), int(sys.argv[2])
_groups = [int(g) for g in sys.argv[3].split(",") if g]
if _uid >= 0:
    os.setgroups(_groups)
    os.setgid(_gid)
    os.setuid(_uid)
    assert os.getresuid() == (_uid,) * 3 and os.getresgid() == (_gid,) * 3
    assert sorted(os.getgroups()) == sorted(_groups)
def result(value):
    print("RESULT " + json.dumps(value), flush=True)
"""


def _child_argv(body: str, user: TestUser | None, groups: tuple[int, ...] = ()) -> list[str]:
    script = _PRELUDE + textwrap.dedent(body)
    uid, gid = (user.uid, user.gid) if user else (-1, -1)
    return [sys.executable, "-c", script, str(uid), str(gid), ",".join(map(str, groups))]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NPIPE_PIPE_DIR", None)  # every child names its pipe_dir explicitly
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ChildResult:
    pid: int
    returncode: int
    stdout: str
    stderr: str
    result: Any  # the value passed to result(...) in the child, or None

    def check(self) -> Any:
        assert self.returncode == 0, f"child failed ({self.returncode}):\n{self.stderr}"
        return self.result


def run_python(
    body: str,
    user: TestUser | None = None,
    *,
    groups: tuple[int, ...] = (),
    timeout: float = 30.0,
) -> ChildResult:
    """Run ``body`` in a new Python process (as ``user`` if given, else as this user).

    ``user`` gets exactly the supplementary ``groups`` (none by default). The body may
    call ``result(value)`` to hand a JSON value back.
    """
    proc = subprocess.Popen(
        _child_argv(body, user, groups), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, cwd="/", env=_child_env(),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child did not finish in {timeout}s:\n{out}\n{err}") from None
    value = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            value = json.loads(line[len("RESULT "):])
    return ChildResult(proc.pid, proc.returncode, out, err, value)


@dataclass
class Background:
    proc: subprocess.Popen[str]
    ready_line: str  # the line that started with ``ready``, without its newline


@contextlib.contextmanager
def background_python(
    body: str, user: TestUser | None = None, ready: str = "READY", timeout: float = 20.0
) -> Iterator[Background]:
    """Run ``body`` in a Python process until the block ends; wait for ``ready`` on stdout.

    The child should exit when its stdin closes (``sys.stdin.read()``). Its stderr goes
    to a file, so that a chatty child can never block on a full pipe.
    """
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            _child_argv(body, user), stdout=subprocess.PIPE, stderr=errors,
            stdin=subprocess.PIPE, text=True, cwd="/", env=_child_env(),
        )
        assert proc.stdout is not None and proc.stdin is not None

        def stderr_text() -> str:
            errors.seek(0)
            return errors.read()

        try:
            deadline = time.monotonic() + timeout
            line = ""
            while not line.startswith(ready):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    raise AssertionError(f"child not {ready} in {timeout}s:\n{stderr_text()}")
                line = proc.stdout.readline()
                if not line:
                    proc.wait(timeout=WAIT)
                    raise AssertionError(f"child exited early:\n{stderr_text()}")
            yield Background(proc, line.rstrip("\n"))
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


# A client body for run_python: call Whoami on pipe NAME in DIR and report the outcome.
# Format with name=, pipe_dir=, server_user= (Python literals) and payload=.
WHOAMI_CLIENT = """
    outcome = {{"pid": os.getpid(), "uid": os.getuid()}}
    try:
        chan = npipe.grpc.channel({name!r}, pipe_dir={pipe_dir!r}, server_user={server_user!r})
    except npipe.NpipeError as e:
        outcome["error"] = type(e).__name__
        outcome["message"] = str(e)
    else:
        with chan:
            try:
                reply = chan.unary_unary("/t.Svc/Whoami")({payload!r}, timeout=10)
                outcome["caller"] = json.loads(reply)
            except grpc.RpcError as e:
                outcome["code"] = e.code().name
                outcome["details"] = e.details()
    result(outcome)
"""


def whoami_client(
    name: str, pipe_dir: Path | None, server_user: str | int | None = None, payload: bytes = b""
) -> str:
    """The client body; ``pipe_dir=None`` looks the name up as any client would (its own
    pipe directory, the machine-wide names, .NET's)."""
    return WHOAMI_CLIENT.format(
        name=name, pipe_dir=None if pipe_dir is None else str(pipe_dir),
        server_user=server_user, payload=payload,
    )


# --- servers and clients of the machine-wide namespace, as real users --------------------

# Serve t.Svc on NAME with ACL (a Python expression) until stdin closes; no pipe_dir:
# the user's defaults, as a service would run. Prints READY and the pipe's path, or
# FAILED and the error's type and message; at the end HANDLED and the methods it ran.
NAMESPACE_SERVER = """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    probe = grpc_support.Probe()
    server.add_generic_rpc_handlers((grpc_support.sync_handler(probe),))
    try:
        port = npipe.grpc.add_pipe_port(server, {name!r}, acl={acl})
    except npipe.NpipeError as e:
        print("SERVER FAILED", type(e).__name__, str(e), flush=True)
        sys.stdin.read()
        raise SystemExit(0)
    server.start()
    print("SERVER READY", port.path, flush=True)
    sys.stdin.read()
    server.stop(0).wait(5)
    print("HANDLED", json.dumps(probe.handled), flush=True)
"""


def serve_as(
    user: TestUser, name: str, acl: str = "npipe.Acl()"
) -> contextlib.AbstractContextManager[Background]:
    """A server as ``user``; its ready_line says READY (and the path) or FAILED."""
    return background_python(NAMESPACE_SERVER.format(name=name, acl=acl), user=user,
                             ready="SERVER ")


def ready_path(server: Background) -> Path:
    """The socket path a :func:`serve_as` server listens on (it must have started)."""
    words = server.ready_line.split(" ", 2)
    assert words[1] == "READY", server.ready_line
    return Path(words[2])


def call_by_name(user: TestUser, name: str, server_user: str | None) -> dict[str, object]:
    """Call Whoami on NAME by name alone (no pipe_dir) as ``user``: the outcome."""
    outcome = run_python(whoami_client(name, None, server_user), user=user).check()
    assert isinstance(outcome, dict)
    return outcome
