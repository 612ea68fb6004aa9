#!/usr/bin/env python3
"""HTTP over pipes: requests per second of one ASGI app, and ``npipe forward``'s throughput.

Side by side in one run, the transports of each part taking turns within every round:

* **local**: the same app under hypercorn, ``unix`` on a plain Unix socket
  (hypercorn's own ``serve``) against ``pipe``, npipe.http.serve_asgi on a local pipe
  (npipe accepts, checks the caller, hands the connection to hypercorn: no relay hop).
  Target: pipe >= 0.95x unix.
* **remote** (root, Samba): across two network namespaces (bench/testbed.py), ``tcp``
  (hypercorn on 198.18.0.1:PORT) against ``smb``, serve_asgi(smb=True) behind smbd, called
  as //198.18.0.1/pipe/NAME with npipe's SMB client at its default security (SMB 3.1.1,
  encrypted). Target: smb >= 0.6x tcp.
* **forward** (same bed): bulk throughput (the client streams ``--mib`` MiB into an echo
  while reading it back) to a raw echo pipe behind smbd through
  ``npipe forward //198.18.0.1/pipe/NAME --listen tcp:127.0.0.1:0`` (the client speaks TCP
  to the forwarder in its own namespace) against npipe.open_connection to the same pipe.
  Target: forward >= 0.8x direct.

The app answers ``GET /`` with ``--body`` bytes; on a pipe it also reads the caller from
``scope["extensions"]["npipe.caller"]`` and fails with 500 without one (the run checks that
no request failed). The load client is the same for every transport: ``--connections``
keep-alive HTTP/1.1 connections, each sending its next request when the last answer is
in, parsed by the least code that checks status and Content-Length (so that the client
costs the same everywhere and little next to the server).

    python bench/http_rps.py                       # local, and remote + forward as root
    python bench/http_rps.py --quick               # a smoke run
    python bench/http_rps.py --parts local --rounds 9 --json /tmp/http.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from machine import header, machine_info
from testbed import (
    PASSWORD,
    USER,
    Testbed,
    check_prerequisites,
    credentials,
    emit,
    until_stdin_closes,
)

SCRIPT = Path(__file__).resolve()
PIPE = "benchhttp"
START_TIMEOUT_S = 60.0
MIB = 1 << 20
TARGETS = {"local": ("pipe", "unix", 0.95), "remote": ("smb", "tcp", 0.6),
           "forward": ("forward", "direct", 0.8)}

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


# ================================================================== the app and its servers


def make_app(body: bytes, need_caller: bool) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        ok = not need_caller or scope.get("extensions", {}).get("npipe.caller") is not None
        payload = body if ok else b"no caller"
        await send({"type": "http.response.start", "status": 200 if ok else 500,
                    "headers": [(b"content-length", str(len(payload)).encode()),
                                (b"content-type", b"application/octet-stream")]})
        await send({"type": "http.response.body", "body": payload})

    return app


async def serve(kind: str, where: str, body: int, user: str | None) -> None:
    """Serve the app as ``kind`` (unix: a socket path; tcp: a host; pipe/smb: a pipe name)
    until stdin closes."""
    import hypercorn.asyncio
    import hypercorn.config

    config = hypercorn.config.Config()
    config.accesslog = None
    config.errorlog = None
    # hypercorn closes a keep-alive connection after 1,000 requests by default; the load
    # client keeps its connections for the whole run (the same for every transport).
    config.keep_alive_max_requests = 1 << 30
    app = make_app(b"x" * body, need_caller=kind in ("pipe", "smb"))
    if kind in ("unix", "tcp"):
        config.bind = [f"unix:{where}" if kind == "unix" else f"{where}:0"]
        # hypercorn binds in serve(); bind here to learn the port, and listen, so that
        # clients may connect as soon as we say ready; hand hypercorn the socket.
        sockets = config.create_sockets()
        sock = sockets.insecure_sockets[0]
        sock.listen(config.backlog)
        config.bind = [f"fd://{sock.fileno()}"]
        ready: dict[str, Any] = {"ready": True, "address": where if kind == "unix" else
                                 f"{where}:{sock.getsockname()[1]}"}
        stop = asyncio.Event()
        task = asyncio.create_task(hypercorn.asyncio.serve(
            app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        emit(ready)
        await until_stdin_closes()
        stop.set()
        await task
        return
    import npipe
    import npipe.http

    acl = npipe.Acl.allow(users=[user]) if user else npipe.acl.OWNER_ONLY
    server = await npipe.http.serve_asgi(app, where, acl=acl, smb=kind == "smb", config=config)
    emit({"ready": True, "address": where})
    await until_stdin_closes()
    server.close()
    await server.wait_closed()


async def echo_pipe(name: str, user: str) -> None:
    import npipe

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(MIB):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await npipe.start_server(echo, name, smb=True, acl=npipe.Acl.allow(users=[user]))
    emit({"ready": True, "address": name})
    await until_stdin_closes()
    server.close()
    await server.wait_closed()


# ================================================================== the load client


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


async def _one_connection(open_: Opener, stop_at: float, counts: list[int]) -> None:
    reader, writer = await open_()
    try:
        while time.perf_counter() < stop_at:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                counts[1] += 1
            match = _LENGTH.search(head)
            if match is None:
                raise AssertionError(f"no content-length in {head[:200]!r}")
            await reader.readexactly(int(match.group(1)))
            counts[0] += 1
    finally:
        writer.close()


async def rps(open_: Opener, connections: int, seconds: float) -> dict[str, float]:
    """Requests per second with ``connections`` keep-alive connections for ``seconds``
    (connections opened before the clock starts? no: opening is part of a client's life,
    but it is one open per connection per turn, noise next to the turn's requests)."""
    counts = [0, 0]
    start = time.perf_counter()
    await asyncio.gather(*(_one_connection(open_, start + seconds, counts)
                           for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return {"rps": counts[0] / elapsed, "errors": counts[1]}


async def echo_throughput(open_: Opener, total: int, chunk: int) -> float:
    """MB/s of ``total`` bytes streamed through an echo: the client writes ``chunk``-sized
    pieces (waiting only for the transport to drain) while it reads the echo back, so
    the pipe is kept full, as a bulk transfer through a bridge keeps it."""
    reader, writer = await open_()
    data = os.urandom(chunk)
    try:
        start = time.perf_counter()

        async def send() -> None:
            for _ in range(total // chunk):
                writer.write(data)
                await writer.drain()

        async def receive() -> None:
            for _ in range(total // chunk):
                if await reader.readexactly(chunk) != data:
                    raise AssertionError("the echo differs")

        await asyncio.gather(send(), receive())
        return total / (time.perf_counter() - start) / 1e6
    finally:
        writer.close()


def opener(target: dict[str, Any]) -> Opener:
    kind, address = target["kind"], target["address"]

    async def open_() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if kind in ("unix", "pipe-socket"):
            return await asyncio.open_unix_connection(address, limit=MIB)
        if kind in ("tcp", "forward"):
            host, _, port = address.rpartition(":")
            return await asyncio.open_connection(host, int(port), limit=MIB)
        import npipe

        return await npipe.open_connection(address, limit=MIB, credentials=credentials())

    return open_


async def run_turns(targets: dict[str, dict[str, Any]], rounds: int, args: argparse.Namespace,
                    measure: str) -> dict[str, list[float]]:
    """Every round, each target takes one turn, in an order that rotates by round."""
    names = list(targets)
    results: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        await _measure(opener(targets[name]), args, measure, warm=True)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(await _measure(opener(targets[name]), args, measure))
    return results


async def _measure(open_: Opener, args: argparse.Namespace, measure: str,
                   warm: bool = False) -> float:
    if measure == "rps":
        got = await rps(open_, args.connections, 0.3 if warm else args.seconds)
        if got["errors"]:
            raise AssertionError(f"{got['errors']} requests failed (no caller?)")
        return got["rps"]
    return await echo_throughput(open_, (4 if warm else args.mib) * MIB, args.chunk)


def client_main(args: argparse.Namespace) -> int:
    """In the client namespace: run the turns for the targets given as JSON; print one line."""
    targets = json.loads(args.client)
    results = asyncio.run(run_turns(targets["targets"], args.rounds, args, targets["measure"]))
    emit({"results": results})
    return 0


# ================================================================== orchestration


class Proc:
    """A child speaking JSON lines on stdout (started directly, or in a namespace)."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str,
                 stop_signal: int | None = None) -> None:
        self.proc, self.name = proc, name
        self._buf = b""
        self._stop_signal = stop_signal  # None: it stops when its stdin closes

    def line(self, timeout: float) -> dict[str, Any]:
        import select

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()  # raw reads: a buffered reader hides data from select
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"{self.name}: no answer in {timeout:g} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self._stop_signal is not None:
                self.proc.send_signal(self._stop_signal)
            elif self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _spawn(argv: list[str], name: str, env: dict[str, str] | None = None,
           ns: str | None = None, log: Path | None = None) -> Proc:
    from npipe.testing.netns import popen_in

    cmd = [sys.executable, str(SCRIPT), *argv]
    with open(log or os.devnull, "wb") as err:  # (the child has its own copy)
        kwargs: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                                  "stderr": err, "env": env}
        proc = popen_in(ns, cmd, **kwargs) if ns else subprocess.Popen(cmd, **kwargs)
    return Proc(proc, name)


def local_part(args: argparse.Namespace, workdir: Path) -> dict[str, list[float]]:
    env = dict(os.environ, NPIPE_PIPE_DIR=str(workdir / "pipes"), PYTHONUNBUFFERED="1")
    servers = {
        "unix": _spawn(["--serve", "unix", "--where", str(workdir / "hypercorn.sock"),
                        "--body", str(args.body)], "unix", env, log=workdir / "unix.log"),
        "pipe": _spawn(["--serve", "pipe", "--where", PIPE, "--body", str(args.body)],
                       "pipe", env, log=workdir / "pipe.log"),
    }
    try:
        for s in servers.values():
            s.line(START_TIMEOUT_S)
        os.environ["NPIPE_PIPE_DIR"] = env["NPIPE_PIPE_DIR"]
        targets = {"pipe": {"kind": "pipe", "address": PIPE},
                   "unix": {"kind": "unix", "address": str(workdir / "hypercorn.sock")}}
        return asyncio.run(run_turns(targets, args.rounds, args, "rps"))
    finally:
        for s in servers.values():
            s.stop()


def remote_parts(args: argparse.Namespace, parts: list[str]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    with Testbed(prefix="nphb") as bed:
        ip = str(bed.hosts.server_ip)
        env = dict(bed.env)
        wd = bed.workdir
        procs: list[Proc] = []
        try:
            http = {
                "tcp": _spawn(["--serve", "tcp", "--where", ip, "--body", str(args.body)],
                              "tcp", env, bed.hosts.server_ns, wd / "http-tcp.log"),
                "smb": _spawn(["--serve", "smb", "--where", PIPE, "--body", str(args.body),
                               "--user", USER], "smb", env, bed.hosts.server_ns,
                              wd / "http-smb.log"),
                "echo": _spawn(["--echo-pipe", "benchecho", "--user", USER], "echo", env,
                               bed.hosts.server_ns, wd / "echo.log"),
            }
            procs += http.values()
            ready = {name: p.line(START_TIMEOUT_S) for name, p in http.items()}
            client_env = dict(env, NPIPE_USER=USER, NPIPE_PASSWORD=PASSWORD)
            if "remote" in parts:
                out["remote"] = _client(args, bed, client_env, "rps", {
                    "smb": {"kind": "smb", "address": f"//{ip}/pipe/{PIPE}"},
                    "tcp": {"kind": "tcp", "address": ready["tcp"]["address"]}})
            if "forward" in parts:
                fwd, port = _start_forward(bed, client_env, f"//{ip}/pipe/benchecho")
                procs.append(fwd)
                out["forward"] = _client(args, bed, client_env, "echo", {
                    "forward": {"kind": "forward", "address": f"127.0.0.1:{port}"},
                    "direct": {"kind": "smb", "address": f"//{ip}/pipe/benchecho"}})
        finally:
            for p in reversed(procs):
                p.stop()
    return out


def _start_forward(bed: Any, env: dict[str, str], address: str) -> tuple[Proc, int]:
    """``npipe forward`` in the client namespace, its log in a file (one line per
    connection); its port from the "listening on" line; stopped with SIGTERM."""
    from npipe.testing.netns import popen_in

    log = bed.workdir / "forward.log"
    npipe_cmd = [sys.executable, "-m", "npipe", "forward", address,
                 "--listen", "tcp:127.0.0.1:0"]
    with open(log, "wb") as err:
        proc = popen_in(bed.hosts.client_ns, npipe_cmd, env=env, stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=err)
    fwd = Proc(proc, "forward", stop_signal=signal.SIGTERM)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        match = re.search(rb"listening on tcp:127\.0\.0\.1:(\d+)", log.read_bytes())
        if match:
            return fwd, int(match.group(1))
        time.sleep(0.05)
    fwd.stop()
    raise RuntimeError(f"npipe forward did not start: {log.read_text(errors='replace')}")


def _client(args: argparse.Namespace, bed: Any, env: dict[str, str], measure: str,
            targets: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    argv = ["--client", json.dumps({"measure": measure, "targets": targets}),
            "--rounds", str(args.rounds), "--seconds", str(args.seconds),
            "--connections", str(args.connections), "--mib", str(args.mib),
            "--chunk", str(args.chunk)]
    client = _spawn(argv, f"client {measure}", env, bed.hosts.client_ns,
                    bed.workdir / f"client-{measure}.log")
    try:
        timeout = 120 + args.rounds * len(targets) * (args.seconds + 30)
        results: dict[str, list[float]] = client.line(timeout)["results"]
        return results
    finally:
        client.stop()


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace,
           info: dict[str, Any]) -> str:
    lines = [header(info),
             f"# {args.rounds} rounds; rps: {args.connections} keep-alive connections x "
             f"{args.seconds:g} s per turn, {args.body}-byte bodies; forward: {args.mib} MiB "
             f"streamed through an echo in {args.chunk // 1024} KiB writes per turn", ""]
    lines.append(f"{'part':8} {'transport':9} {'median':>10} {'p10-p90 over rounds':>24}  "
                 f"{'ratio (per-round p10-p90)':28} target")
    for part, per in results.items():
        this, base, target = TARGETS[part]
        unit = "req/s" if part != "forward" else "MB/s"
        for name, values in per.items():
            row = (f"{part:8} {name:9} {statistics.median(values):10.0f} "
                   f"{_pct(values, 10):11.0f}-{_pct(values, 90):<11.0f} {unit:5}")
            if name == this:
                ratios = [a / b for a, b in zip(per[this], per[base], strict=True)]
                ratio = statistics.median(per[this]) / statistics.median(per[base])
                verdict = "met" if ratio >= target else "MISSED"
                row += (f" {ratio:.2f}x {base} ({_pct(ratios, 10):.2f}-{_pct(ratios, 90):.2f})"
                        f"   >= {target}x: {verdict}")
            lines.append(row)
    return "\n".join(lines)


def _pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="local,remote,forward",
                   help="which parts (local, remote, forward; remote ones need root)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=2.0, help="per rps turn")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--body", type=int, default=100, help="response body bytes")
    p.add_argument("--mib", type=int, default=64, help="MiB echoed per forward turn")
    p.add_argument("--chunk", type=int, default=256 * 1024, help="echo chunk bytes")
    p.add_argument("--quick", action="store_true", help="a smoke run (3 short rounds)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results here")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--where", help=argparse.SUPPRESS)
    p.add_argument("--user", help=argparse.SUPPRESS)
    p.add_argument("--echo-pipe", help=argparse.SUPPRESS)
    p.add_argument("--client", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve, args.where, args.body, args.user))
        return 0
    if args.echo_pipe:
        asyncio.run(echo_pipe(args.echo_pipe, args.user))
        return 0
    if args.client:
        return client_main(args)
    if args.quick:
        args.rounds, args.seconds, args.mib = 3, 0.5, 8
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    info = machine_info()
    results: dict[str, dict[str, list[float]]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="nphttp-"))
    try:
        if "local" in parts:
            results["local"] = local_part(args, workdir)
        remote = [x for x in parts if x in ("remote", "forward")]
        if remote:
            why = check_prerequisites()
            if why:
                print(f"# remote parts skipped: {why}", file=sys.stderr)
            else:
                results.update(remote_parts(args, remote))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(results, args, info)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results,
                                               "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
