#!/usr/bin/env python3
"""Local gRPC benchmark: grpcio over TCP loopback, over a Unix socket, and over an npipe pipe.

Measures, side by side in one run:

* unary latency (p50, p99) of a 100-byte request / 100-byte response call;
* streaming throughput (MB/s, 10^6 bytes/s) of a client stream of 1 MiB messages.

Every server runs in its own process (``multiprocessing`` "spawn": grpcio hangs after
fork), a sync ``grpc.server`` with a ThreadPoolExecutor; the client is this process.
The npipe handler calls ``npipe.grpc.caller(context)`` on every call and fails the call
if the caller is unknown, so the identity lookup is part of what is measured.

The transports are measured round-robin over several rounds (the order rotates each
round); each round gives a p50, a p99 and a median throughput per transport, and the
table shows the median over the rounds and the ratio to the plain Unix socket.

    python bench/grpc_local.py                  # 7 rounds, about a minute on 2 CPUs
    python bench/grpc_local.py --quick          # smoke run, a few seconds
    python bench/grpc_local.py --json out.json --plot out.png
    python bench/grpc_local.py --variants       # also the relay experiments (see README)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from machine import header, machine_info

SERVICE = "bench.Bench"
ECHO = f"/{SERVICE}/Echo"
UPLOAD = f"/{SERVICE}/Upload"
UNARY_BYTES = 100
STREAM_MSG_BYTES = 1 << 20
SERVER_WORKERS = 4
SERVER_LIFETIME_S = 1800.0  # a server left behind by a dead client stops by itself
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 60.0
PIPE_NAME = "bench"
BASELINE = "unix"

MAIN_TRANSPORTS = ("tcp", "unix", "npipe", "npipe-direct")
# Experiments on the front door's relay (not part of the default run; see bench/README.md).
VARIANTS = {
    "npipe-splice": "npipe, relay threads move bytes with os.splice (no copy to user space)",
    "npipe-64k": "npipe, RELAY_CHUNK = 64 KiB",
    "npipe-1m": "npipe, RELAY_CHUNK = 1 MiB",
    "npipe-si": "npipe, sys.setswitchinterval(0.0005) in the server (GIL hand-off)",
    "door-proc": "unix + the same FrontDoor in a separate process (no GIL sharing, no caller)",
}
DESCRIPTIONS = {
    "tcp": "grpcio, TCP 127.0.0.1",
    "unix": "grpcio, plain Unix socket",
    "npipe": "npipe local pipe (front door + caller())",
    "npipe-direct": "npipe local pipe, caller_identity=False (no relay, no caller())",
    **VARIANTS,
}


# --------------------------------------------------------------------------- server side


def _splice_copy(src: socket.socket, dst: socket.socket) -> None:
    """frontdoor._copy with os.splice through a kernel pipe instead of recv_into/sendall."""
    import fcntl

    from npipe import frontdoor

    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, frontdoor.RELAY_CHUNK)
        sfd, dfd = src.fileno(), dst.fileno()
        while n := os.splice(sfd, w, frontdoor.RELAY_CHUNK):
            while n:
                n -= os.splice(r, dfd, n)
    finally:
        os.close(r)
        os.close(w)


def _door_process(pipe_dir: str, backend: str, conn: Any) -> None:
    """Run npipe's FrontDoor alone in this process, in front of a plain Unix socket."""
    from npipe import frontdoor
    from npipe.address import parse_address
    from npipe.local.claim import claim_pipe
    from npipe.local.listener import private_dir

    claimed = claim_pipe(parse_address(PIPE_NAME), directory=pipe_dir)
    workdir = private_dir(Path(pipe_dir))
    door = frontdoor.FrontDoor(claimed, Path(backend), workdir, frontdoor.local_identify())
    door.start()
    conn.send("ready")
    with contextlib.suppress(EOFError, OSError):
        conn.poll(SERVER_LIFETIME_S)
    door.close(drop_connections=True)


def bench_service(check_caller: bool) -> tuple[grpc.GenericRpcHandler, dict[str, Any]]:
    """The benchmarked service (Echo, Upload) and the counts it keeps; with check_caller
    every call asks npipe.grpc.caller() and fails if the caller is unknown."""
    import npipe.grpc

    stats: dict[str, Any] = {"calls": 0, "caller_checked": 0, "caller": None}

    def who(context: grpc.ServicerContext) -> None:
        stats["calls"] += 1
        if not check_caller:
            return
        caller = npipe.grpc.caller(context)
        if caller is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"unknown caller {context.peer()}")
        stats["caller_checked"] += 1
        stats["caller"] = str(caller)

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        who(context)
        return request

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        who(context)
        total = 0
        for msg in requests:
            total += len(msg)
        return total.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )
    return handler, stats


def _serve(transport: str, workdir: str, conn: Any) -> None:
    """Server process: serve the bench service on ``transport`` until told to stop."""
    import npipe.grpc
    from npipe import frontdoor

    check_caller = transport.startswith("npipe") and transport != "npipe-direct"
    handler, stats = bench_service(check_caller)
    if transport == "npipe-splice":
        frontdoor._copy = _splice_copy
    elif transport == "npipe-64k":
        frontdoor.RELAY_CHUNK = 64 * 1024
    elif transport == "npipe-1m":
        frontdoor.RELAY_CHUNK = 1024 * 1024
    elif transport == "npipe-si":
        sys.setswitchinterval(0.0005)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS))
    server.add_generic_rpc_handlers((handler,))
    if transport == "tcp":
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise OSError("could not listen on 127.0.0.1")
        target: dict[str, str] = {"target": f"127.0.0.1:{port}"}
    elif transport in ("unix", "door-proc"):
        path = os.path.join(workdir, f"{transport}.sock")
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"could not listen on {path}")
        target = {"target": f"unix:{path}"}
    else:
        pipes = os.path.join(workdir, f"pipes-{transport}")
        npipe.grpc.add_pipe_port(
            server, PIPE_NAME, pipe_dir=pipes, caller_identity=transport != "npipe-direct"
        )
        target = {"pipe": PIPE_NAME, "pipe_dir": pipes}
    server.start()
    conn.send(target)
    with contextlib.suppress(EOFError, OSError):
        if conn.poll(SERVER_LIFETIME_S):
            conn.recv()
    server.stop(None)
    with contextlib.suppress(OSError):
        conn.send(stats)


@dataclass
class Server:
    transport: str
    process: Any
    conn: Any
    target: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    helper: Any = None  # the door-proc front door: (process, conn)

    def stop(self) -> None:
        if self.helper is not None:
            proc, conn = self.helper
            conn.close()
            proc.join(10)
        with contextlib.suppress(OSError, EOFError):
            self.conn.send("stop")
            if self.conn.poll(10):
                self.stats = self.conn.recv()
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


def start_servers(transports: list[str], workdir: str) -> dict[str, Server]:
    ctx = multiprocessing.get_context("spawn")
    servers: dict[str, Server] = {}
    for t in transports:  # start all first: the spawns overlap
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(t, workdir, child), daemon=True, name=f"srv-{t}")
        proc.start()
        servers[t] = Server(t, proc, parent)
    for t, srv in servers.items():
        if not srv.conn.poll(START_TIMEOUT_S):
            raise TimeoutError(f"the {t} server did not start in {START_TIMEOUT_S:.0f} s")
        srv.target = srv.conn.recv()
        if t == "door-proc":
            pipes = os.path.join(workdir, "pipes-door")
            parent, child = ctx.Pipe()
            backend = srv.target["target"].removeprefix("unix:")
            proc = ctx.Process(target=_door_process, args=(pipes, backend, child), daemon=True)
            proc.start()
            srv.helper = (proc, parent)
            if not parent.poll(START_TIMEOUT_S):
                raise TimeoutError("the front door process did not start")
            parent.recv()
            srv.target = {"pipe": PIPE_NAME, "pipe_dir": pipes}
    return servers


# --------------------------------------------------------------------------- client side


def open_channel(target: dict[str, str]) -> grpc.Channel:
    if "pipe" in target:
        import npipe.grpc

        return npipe.grpc.channel(target["pipe"], pipe_dir=target["pipe_dir"])
    # No HTTP proxy for loopback, whatever the environment says.
    return grpc.insecure_channel(target["target"], options=[("grpc.enable_http_proxy", 0)])


@dataclass
class Client:
    channel: grpc.Channel
    echo: Callable[..., bytes]
    upload: Callable[..., bytes]


def make_client(target: dict[str, str]) -> Client:
    chan = open_channel(target)
    grpc.channel_ready_future(chan).result(timeout=START_TIMEOUT_S)
    return Client(
        chan,
        chan.unary_unary(ECHO, _registered_method=True),
        chan.stream_unary(UPLOAD, _registered_method=True),
    )


def measure_latency(client: Client, calls: int) -> list[float]:
    """Wall time of ``calls`` sequential unary calls, in microseconds."""
    payload = os.urandom(UNARY_BYTES)
    out = []
    clock = time.perf_counter_ns
    echo = client.echo
    for _ in range(calls):
        t0 = clock()
        reply = echo(payload, timeout=CALL_TIMEOUT_S)
        out.append((clock() - t0) / 1000.0)
        if len(reply) != UNARY_BYTES:
            raise AssertionError(f"echo returned {len(reply)} bytes")
    return out


def measure_stream(client: Client, msgs: int, payload: bytes) -> float:
    """One client stream of ``msgs`` messages; returns MB/s of payload moved."""

    def gen() -> Iterator[bytes]:
        for _ in range(msgs):
            yield payload

    t0 = time.perf_counter()
    reply = client.upload(gen(), timeout=CALL_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    moved = int.from_bytes(reply, "little")
    if moved != msgs * len(payload):
        raise AssertionError(f"server counted {moved} bytes, sent {msgs * len(payload)}")
    return moved / elapsed / 1e6


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


@dataclass
class Result:
    latencies: list[list[float]] = field(default_factory=list)  # per round, microseconds
    throughputs: list[list[float]] = field(default_factory=list)  # per round, MB/s

    def p50s(self) -> list[float]:
        return [percentile(r, 50) for r in self.latencies]

    def p99s(self) -> list[float]:
        return [percentile(r, 99) for r in self.latencies]

    def mbps(self) -> list[float]:
        return [statistics.median(r) for r in self.throughputs]


def run(
    clients: dict[str, Client],
    rounds: int,
    calls: int,
    streams: int,
    msgs: int,
    warmup: int,
    slices: int = 10,
) -> dict[str, Result]:
    """Round-robin measurement.

    Within a round the transports take turns in small slices (``calls / slices`` unary
    calls, then one stream each), the order rotating every slice, so that a burst of
    noise from elsewhere on the machine lands on all of them alike.
    """
    payload = os.urandom(STREAM_MSG_BYTES)
    names = list(clients)
    for c in clients.values():  # first connection, HTTP/2 windows, thread pools
        measure_latency(c, warmup)
        measure_stream(c, max(1, msgs // 4), payload)
    results = {t: Result() for t in names}
    slices = max(1, min(slices, calls))
    turn = 0
    for r in range(rounds):
        lat: dict[str, list[float]] = {t: [] for t in names}
        mbs: dict[str, list[float]] = {t: [] for t in names}
        for s in range(slices):
            n = calls // slices + (1 if s < calls % slices else 0)
            for t in _rotated(names, turn):
                lat[t] += measure_latency(clients[t], n)
            turn += 1
        for _ in range(streams):
            for t in _rotated(names, turn):
                mbs[t].append(measure_stream(clients[t], msgs, payload))
            turn += 1
        for t in names:
            results[t].latencies.append(lat[t])
            results[t].throughputs.append(mbs[t])
        line = "  ".join(
            f"{t} {results[t].p50s()[-1]:.0f}/{results[t].p99s()[-1]:.0f}us "
            f"{results[t].mbps()[-1]:.0f}MB/s"
            for t in names
        )
        print(f"round {r + 1}/{rounds}: {line}", file=sys.stderr, flush=True)
    return results


def _rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


# --------------------------------------------------------------------------- reporting


def summarize(results: dict[str, Result]) -> dict[str, dict[str, Any]]:
    base = results.get(BASELINE)
    summary: dict[str, dict[str, Any]] = {}
    for t, res in results.items():
        row: dict[str, Any] = {
            "p50_us": statistics.median(res.p50s()),
            "p99_us": statistics.median(res.p99s()),
            "mb_s": statistics.median(res.mbps()),
            "p50_us_rounds": [round(x, 1) for x in res.p50s()],
            "p99_us_rounds": [round(x, 1) for x in res.p99s()],
            "mb_s_rounds": [round(x, 1) for x in res.mbps()],
        }
        if base is not None:
            b50, b99, bmb = base.p50s(), base.p99s(), base.mbps()
            row["p50_vs_unix"] = row["p50_us"] / statistics.median(b50)
            row["p99_vs_unix"] = row["p99_us"] / statistics.median(b99)
            row["mb_s_vs_unix"] = row["mb_s"] / statistics.median(bmb)
            # Paired per-round ratios: how much of the difference is round-to-round noise.
            row["p50_vs_unix_rounds"] = [
                round(a / b, 3) for a, b in zip(res.p50s(), b50, strict=True)
            ]
            row["mb_s_vs_unix_rounds"] = [
                round(a / b, 3) for a, b in zip(res.mbps(), bmb, strict=True)
            ]
        summary[t] = row
    return summary


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'transport':<13} {'p50 us':>8} {'p99 us':>8} {'MB/s':>8}   "
        f"{'p50/unix':>8} {'p99/unix':>8} {'MB/s/unix':>9}   {'p50/unix per round':<18}"
    )
    lines = [head, "-" * len(head)]
    for t, row in summary.items():
        ratios = ""
        if "p50_vs_unix" in row:
            per = row["p50_vs_unix_rounds"]
            ratios = (
                f"{row['p50_vs_unix']:>7.2f}x {row['p99_vs_unix']:>7.2f}x "
                f"{row['mb_s_vs_unix']:>8.2f}x   {min(per):.2f}-{max(per):.2f}x"
            )
        lines.append(
            f"{t:<13} {row['p50_us']:>8.1f} {row['p99_us']:>8.1f} {row['mb_s']:>8.0f}   {ratios}"
        )
    return "\n".join(lines)


def write_plot(path: str, results: dict[str, Result], info: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    names = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    pooled = [[x for rnd in results[t].latencies for x in rnd] for t in names]
    ax1.boxplot(pooled, whis=(1, 99), showfliers=False)
    ax1.set_yscale("log")
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.0f}")
    ax1.yaxis.set_major_formatter(fmt)
    ax1.yaxis.set_minor_formatter(fmt)
    ax1.set_xticks(range(1, len(names) + 1), names, rotation=20 if len(names) > 3 else 0)
    for i, t in enumerate(names, start=1):
        p50 = statistics.median(results[t].p50s())
        ax1.annotate(
            f"{p50:.0f}",
            (i, p50),
            xytext=(24, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax1.set_ylabel("latency, us, log scale")
    ax1.set_title("100-byte unary call (all rounds; box: quartiles, whiskers: p1-p99)", fontsize=10)
    ax1.grid(axis="y", which="both", alpha=0.3)
    meds = [statistics.median(results[t].mbps()) for t in names]
    lo = [m - min(results[t].mbps()) for t, m in zip(names, meds, strict=True)]
    hi = [max(results[t].mbps()) - m for t, m in zip(names, meds, strict=True)]
    bars = ax2.bar(names, meds, yerr=[lo, hi], capsize=4, color="tab:blue", alpha=0.8)
    ax2.bar_label(bars, fmt="%.0f", label_type="center", color="white", fontsize=9)
    ax2.set_ylabel("MB/s (median of rounds; bars: min-max)")
    ax2.set_title("client stream of 1 MiB messages", fontsize=10)
    ax2.grid(axis="y", alpha=0.3)
    if len(names) > 3:
        ax2.tick_params(axis="x", rotation=20)
    fig.suptitle(
        f"{info['cpu_model']}, {info['nproc']} CPUs, Linux {info['kernel']}, "
        f"Python {info['python']}, grpcio {info['grpcio']}, {info['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="round-robin rounds (default 7)")
    p.add_argument(
        "--calls", type=int, default=3000, help="unary calls per transport per round (3000)"
    )
    p.add_argument("--streams", type=int, default=5, help="streams per transport per round (5)")
    p.add_argument("--msgs", type=int, default=64, help="1 MiB messages per stream (64)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few seconds in all")
    p.add_argument(
        "--transports",
        default=",".join(MAIN_TRANSPORTS),
        help=f"comma-separated, from {', '.join([*MAIN_TRANSPORTS, *VARIANTS])}",
    )
    p.add_argument("--variants", action="store_true", help="add the relay experiments")
    p.add_argument("--json", metavar="FILE", help="write raw numbers and the summary as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a plot (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.streams, args.msgs = 2, 200, 1, 8
    names = [t.strip() for t in args.transports.split(",") if t.strip()]
    if args.variants:
        names += [v for v in VARIANTS if v not in names]
    unknown = [t for t in names if t not in DESCRIPTIONS]
    if unknown:
        p.error(f"unknown transport(s): {', '.join(unknown)}")
    if min(args.rounds, args.calls, args.streams, args.msgs) < 1:
        p.error("--rounds, --calls, --streams and --msgs must be at least 1")
    args.names = list(dict.fromkeys(names))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    print(header(info))
    print(
        f"# {args.rounds} rounds x {args.calls} unary calls ({UNARY_BYTES} B) and "
        f"{args.streams} x {args.msgs} x 1 MiB client streams per transport; "
        "medians of per-round values"
    )
    workdir = tempfile.mkdtemp(prefix="npb", dir="/tmp")  # short: sun_path is ~108 bytes
    servers: dict[str, Server] = {}
    clients: dict[str, Client] = {}
    try:
        started = time.monotonic()
        servers = start_servers(args.names, workdir)
        clients = {t: make_client(servers[t].target) for t in args.names}
        warmup = 20 if args.quick else 200
        results = run(clients, args.rounds, args.calls, args.streams, args.msgs, warmup)
        elapsed = time.monotonic() - started
    finally:
        for c in clients.values():
            c.channel.close()
        for srv in servers.values():
            srv.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    for t in args.names:
        stats = servers[t].stats
        identified = t.startswith("npipe") and t != "npipe-direct"
        if identified and stats.get("caller_checked") != stats.get("calls"):
            print(f"{t}: caller() was not known on every call: {stats}", file=sys.stderr)
            return 1
    summary = summarize(results)
    print()
    print(format_table(summary))
    print()
    for t in args.names:
        extra = ""
        if servers[t].stats.get("caller"):
            extra = f" (caller seen by the handler: {servers[t].stats['caller']})"
        print(f"  {t:<13} {DESCRIPTIONS[t]}{extra}")
    if BASELINE in summary and "npipe" in summary:
        r = summary["npipe"]
        print(
            f"\nnpipe/unix = {r['p50_vs_unix']:.2f}x p50 latency, {r['p99_vs_unix']:.2f}x p99, "
            f"{r['mb_s_vs_unix']:.2f}x throughput   ({elapsed:.0f} s)"
        )
    if args.json:
        raw = {
            "machine": info,
            "config": {
                "rounds": args.rounds,
                "calls": args.calls,
                "streams": args.streams,
                "msgs": args.msgs,
                "unary_bytes": UNARY_BYTES,
                "stream_msg_bytes": STREAM_MSG_BYTES,
                "server_workers": SERVER_WORKERS,
            },
            "summary": summary,
            "server_stats": {t: servers[t].stats for t in args.names},
            "raw": {
                t: {
                    "latency_us": [[round(x, 1) for x in rnd] for rnd in res.latencies],
                    "stream_mb_s": [[round(x, 1) for x in rnd] for rnd in res.throughputs],
                }
                for t, res in results.items()
            },
        }
        Path(args.json).write_text(json.dumps(raw, separators=(",", ":")) + "\n")
        print(f"raw numbers written to {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, results, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
