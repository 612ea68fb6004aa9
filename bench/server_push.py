"""Server-pushed latency and request/answer round trips through a remote pipe, with the
native client's wait before the next READ after a short answer (``QUIET_READ_DELAY``)
on and off.

    python bench/server_push.py                 # 7 rounds, about a minute
    python bench/server_push.py --rounds 2 --quick

A private smbd on loopback (127.0.0.1, a free port; not two network namespaces) serves
one pipe, ``push``, whose server (a process of its own, a raw Unix listener in smbd's
np/ directory that answers the named_pipe_auth handshake) speaks 64-byte messages:

* ``E``: echo it back (the request/answer round trip);
* ``P interval count``: answer ``A`` at once, then push ``count`` messages, one every
  ``interval`` seconds, each carrying ``time.monotonic_ns()`` taken just before its
  send. The client (same host, same CLOCK_MONOTONIC) takes each message's delay as its
  arrival time minus that stamp.

Measured per mode and round, the modes interleaved (the order rotates each round), each
slice on a fresh pipe of the one shared, encrypted SMB 3.1.1 connection. Modes: "wait
always" (``QUIET_READ_DELAY = 0.001`` after every short answer, as before this
benchmark), "wait off" (``QUIET_READ_DELAY = 0``) and "wait after a write" (1 ms only
after data that answers a write, ``QUIET_READ_AFTER_PUSH = False``: the default now).

* ``push@I``: the delays of server-pushed messages sent every I ms after an answer;
* ``rtt``: 64-byte request/answer round trips, the next request written as soon as the
  answer is read (same loop turn);
* ``rtt-hop``: the same, with a hop through a thread before each request (as a relay's
  local hop, e.g. gRPC's bridge, puts between an answer and the next request).

Prints per row the median over rounds of each round's median and p90, and the range of
the per-round medians (the spread); also how many requests went as FSCTL_PIPE_TRANSCEIVE.
Needs root, smbd and smbpasswd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from npipe.samba.npa import NpaRequestReader, build_reply
from npipe.samba.smbd import PrivateSmbd
from npipe.smb import get_client, open_pipe
from npipe.smb.credentials import Credentials
from npipe.smb.native import pipe as pipe_module

USER, PASSWORD = "npbench-push", "npbench-push-pw-1"
MSG = 64
WAIT_ON = 0.001
# mode -> (QUIET_READ_DELAY, QUIET_READ_AFTER_PUSH)
MODES = {"wait always": (WAIT_ON, True), "wait off": (0.0, False),
         "wait after a write": (WAIT_ON, False)}


# --- the pipe server (its own process) ------------------------------------------------


def _serve(path: str, ready: Any) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    ready.set()
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_session, args=(conn,), daemon=True).start()


def _recv_exactly(conn: socket.socket, buf: bytearray, n: int) -> bytes | None:
    while len(buf) < n:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _session(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    with contextlib.suppress(OSError), conn:
        reader = NpaRequestReader()
        request = None
        while request is None:
            data = conn.recv(65536)
            if not data:
                return
            request = reader.feed(data)
        conn.sendall(build_reply(request.level))
        buf = bytearray(reader.unused_data)
        while (msg := _recv_exactly(conn, buf, MSG)) is not None:
            if msg[:1] == b"E":
                conn.sendall(msg)
            elif msg[:1] == b"P":
                interval, count = struct.unpack_from("<dI", msg, 1)
                conn.sendall(b"A".ljust(MSG, b"."))
                start = time.monotonic()
                for i in range(count):
                    delay = start + (i + 1) * interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    conn.sendall(b"M" + struct.pack("<QI", time.monotonic_ns(), i)
                                 + b"." * (MSG - 13))


# --- the client -------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _push(address: str, interval: float, count: int) -> list[float]:
    reader, writer = await open_pipe(address, credentials=Credentials(USER, PASSWORD),
                                     backend="native")
    try:
        writer.write(b"E".ljust(MSG, b"."))  # the pipe's first exchange, as a warm-up
        await reader.readexactly(MSG)
        writer.write(b"P" + struct.pack("<dI", interval, count) + b"." * (MSG - 13))
        assert (await reader.readexactly(MSG))[:1] == b"A"
        delays = []
        for i in range(count):
            msg = await reader.readexactly(MSG)
            now = time.monotonic_ns()
            stamp, seq = struct.unpack_from("<QI", msg, 1)
            assert msg[:1] == b"M" and seq == i, (msg[:1], seq, i)
            delays.append((now - stamp) / 1000)
        return delays
    finally:
        writer.close()
        await writer.wait_closed()


async def _rtt(address: str, calls: int, hop: bool) -> list[float]:
    reader, writer = await open_pipe(address, credentials=Credentials(USER, PASSWORD),
                                     backend="native")
    loop = asyncio.get_running_loop()
    try:
        request = b"E".ljust(MSG, b".")
        out = []
        for _ in range(calls + 20):
            if hop:
                await loop.run_in_executor(None, _nothing)
            start = time.perf_counter_ns()
            writer.write(request)
            assert await reader.readexactly(MSG) == request
            out.append((time.perf_counter_ns() - start) / 1000)
        return out[20:]
    finally:
        writer.close()
        await writer.wait_closed()


def _nothing() -> None:
    pass


class Counter:
    """How many writes went as FSCTL_PIPE_TRANSCEIVE."""

    def __init__(self) -> None:
        self.transceives = 0
        original = pipe_module.RemotePipe._transceive

        def counting(pipe: Any, data: Any) -> None:
            self.transceives += 1
            original(pipe, data)

        pipe_module.RemotePipe._transceive = counting  # type: ignore[method-assign]


async def _run(address: str, rounds: int, quick: bool) -> dict[str, dict[str, list[Any]]]:
    pushes = [(0.0002, 40 if quick else 200), (0.001, 30 if quick else 100),
              (0.005, 20 if quick else 60), (0.05, 4 if quick else 12)]
    calls = 100 if quick else 400
    counter = Counter()
    # row -> mode -> per-round (median, p90, transceives per request)
    table: dict[str, dict[str, list[Any]]] = {}
    for r in range(rounds):
        order = list(MODES)[r % len(MODES):] + list(MODES)[:r % len(MODES)]
        for mode in order:
            pipe_module.QUIET_READ_DELAY, pipe_module.QUIET_READ_AFTER_PUSH = MODES[mode]
            for interval, count in pushes:
                delays = await _push(address, interval, count)
                row = f"push every {interval * 1000:g} ms"
                table.setdefault(row, {}).setdefault(mode, []).append(
                    (statistics.median(delays), _pct(delays, 0.9), None))
            for hop in (False, True):
                before = counter.transceives
                times = await _rtt(address, calls, hop)
                share = (counter.transceives - before) / (calls + 20)
                row = "request/answer, hop" if hop else "request/answer"
                table.setdefault(row, {}).setdefault(mode, []).append(
                    (statistics.median(times), _pct(times, 0.9), share))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    pipe_module.QUIET_READ_DELAY, pipe_module.QUIET_READ_AFTER_PUSH = WAIT_ON, False
    return table


def _machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(Path(__file__).parent), "status",
                            "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    smbd = subprocess.run(["smbd", "--version"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    return (f"# commit {commit}{' (modified)' if dirty else ''} | {model} | nproc "
            f"{os.cpu_count()} | Linux {platform.release()} | Python "
            f"{platform.python_version()} | {smbd} | load {load[0]:.1f} {load[1]:.1f} | "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def _report(table: dict[str, dict[str, list[Any]]]) -> str:
    lines = ["| row | mode | median µs | p90 µs | medians per round, µs | TRANSCEIVE share |",
             "|---|---|---:|---:|---|---:|"]
    for row, modes in table.items():
        for mode, per_round in modes.items():
            medians = [m for m, _p, _s in per_round]
            p90s = [p for _m, p, _s in per_round]
            shares = [s for _m, _p, s in per_round if s is not None]
            share = f"{statistics.mean(shares):.0%}" if shares else "-"
            lines.append(
                f"| {row} | {mode} | {statistics.median(medians):.0f} | "
                f"{statistics.median(p90s):.0f} | {min(medians):.0f}-{max(medians):.0f} | "
                f"{share} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer messages per slice")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("smbd") is None:
        sys.exit("needs root and Samba's smbd")
    work = Path(tempfile.mkdtemp(prefix="nppush", dir="/tmp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    smbd = PrivateSmbd(work / "smbd", port=port, bind_address="127.0.0.1",
                       users={USER: PASSWORD})
    server = None
    try:
        smbd.start()
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        server = ctx.Process(target=_serve, args=(str(smbd.np_dir / "push"), ready),
                             daemon=True)
        server.start()
        if not ready.wait(10):
            sys.exit("the pipe server did not start")
        header = _machine()
        print(header, flush=True)
        table = asyncio.run(_run(f"//127.0.0.1:{port}/pipe/push", args.rounds, args.quick))
        get_client("native").close_connections()
        print(f"# {args.rounds} rounds; loopback private smbd, SMB 3.1.1 encrypted "
              "(AES-128-GCM); 64-byte messages")
        print(_report(table))
    finally:
        if server is not None:
            server.kill()
        smbd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
