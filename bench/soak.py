#!/usr/bin/env python3
"""Soak run: continuous gRPC calls and raw echoes through npipe's native SMB client,
across two network namespaces, watching the client's memory.

The test bed is cross_host.py's (testbed.py: server 198.18.0.1 with a private smbd,
client 198.18.0.2; a sync grpcio server behind ``npipe.grpc.add_pipe_port(..., smb=True)`` and
an npipe raw echo server). One client process does, all at once and without pause:

* gRPC unary calls (100 B) on ``--grpc-tasks`` concurrent loops, and a client stream of
  8 x 1 MiB every 2 s, on one ``npipe.grpc.aio_channel`` (native backend, default
  security); every 30 s a second channel is opened, used for 10 calls and closed;
* raw echoes on one pipe opened with ``npipe.open_connection``, sizes cycling through
  64 B (x8), 4 KiB (x4), 64 KiB (x2) and 1 MiB;
* every 0.5 s a pipe opened, one 64-byte echo, closed (the open/close path).

Every ``--sample`` seconds the client reports its RSS (VmRSS) and its counters; the
orchestrator adds the RSS of the two servers and of smbd (all its processes). At the end
it prints the client's RSS series (start, after the warm-up, end, max, least-squares
slope after the warm-up) and fails (exit 1) if the client's RSS grew by more than
``--max-growth`` (10%) from the end of the warm-up to the end, or if any call, echo or
open failed. The servers' and smbd's RSS are shown, not judged.

    python bench/soak.py                        # 10 minutes
    python bench/soak.py --minutes 1            # a short one
    python bench/soak.py --plot rss.png --json soak.json

Needs what cross_host.py needs (root, smbd, iproute2, grpcio; matplotlib for --plot).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from machine import header, machine_info
from testbed import (
    START_TIMEOUT_S,
    Child,
    Testbed,
    check_prerequisites,
    credentials,
    emit,
    interruptible,
    rss_kib,
)
from transports import ECHO, MIB, UNARY_BYTES, UPLOAD

SCRIPT = Path(__file__).resolve()
CALL_TIMEOUT_S = 30.0
RAW_SIZES = [64] * 8 + [4096] * 4 + [65536] * 2 + [MIB]
STREAM_EVERY_S = 2.0
STREAM_MSGS = 8
CHURN_EVERY_S = 0.5
CHANNEL_CHURN_EVERY_S = 30.0
ERROR_PAUSE_S = 1.0
MAX_ERRORS_KEPT = 20


# ================================================================== the client (client ns)


class SoakClient:
    def __init__(self, grpc_target: str, raw_target: str, grpc_tasks: int) -> None:
        self.grpc_target = grpc_target
        self.raw_target = raw_target
        self.grpc_tasks = grpc_tasks
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.stopping = False

    def failed(self, what: str, exc: BaseException) -> None:
        self.counts["errors"] += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {what}: {type(exc).__name__}: "
                               f"{exc}".splitlines()[0][:300])
        print(f"{what}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def channel(self) -> Any:
        import npipe.grpc

        return npipe.grpc.aio_channel(self.grpc_target, credentials=credentials(),
                                      smb_backend="native")

    async def forever(self, what: str, body: Any) -> None:
        """Run ``body()`` again and again; a failure is counted, then it starts over."""
        while not self.stopping:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.stopping:
                    return
                self.failed(what, exc)
                await asyncio.sleep(ERROR_PAUSE_S)

    async def grpc_unary(self, channel: Any) -> None:
        echo = channel.unary_unary(ECHO, _registered_method=True)
        payload = os.urandom(UNARY_BYTES)
        while not self.stopping:
            if await echo(payload, timeout=CALL_TIMEOUT_S) != payload:
                raise AssertionError("the reply differs")
            self.counts["grpc_calls"] += 1

    async def grpc_stream(self, channel: Any) -> None:
        upload = channel.stream_unary(UPLOAD, _registered_method=True)
        msg = os.urandom(MIB)
        while not self.stopping:
            reply = await upload(iter([msg] * STREAM_MSGS), timeout=CALL_TIMEOUT_S)
            if int.from_bytes(reply, "little") != STREAM_MSGS * MIB:
                raise AssertionError("the server counted the wrong number of bytes")
            self.counts["grpc_streams"] += 1
            await asyncio.sleep(STREAM_EVERY_S)

    async def grpc_churn(self) -> None:
        await asyncio.sleep(CHANNEL_CHURN_EVERY_S)
        channel = self.channel()
        try:
            echo = channel.unary_unary(ECHO, _registered_method=True)
            for _ in range(10):
                await echo(b"churn", timeout=CALL_TIMEOUT_S)
            self.counts["grpc_channels"] += 1
        finally:
            await channel.close()

    async def open_pipe(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        import npipe

        return await npipe.open_connection(self.raw_target, credentials=credentials(),
                                           smb_backend="native")

    async def raw_echo(self) -> None:
        reader, writer = await self.open_pipe()
        payloads = {size: os.urandom(size) for size in set(RAW_SIZES)}
        try:
            while not self.stopping:
                for size in RAW_SIZES:
                    writer.write(payloads[size])
                    _, got = await asyncio.wait_for(
                        asyncio.gather(writer.drain(), reader.readexactly(size)),
                        CALL_TIMEOUT_S)
                    if got != payloads[size]:
                        raise AssertionError(f"the {size}-byte echo differs")
                    self.counts["echoes"] += 1
                    self.counts["echo_bytes"] += size
        finally:
            writer.close()

    async def pipe_churn(self) -> None:
        await asyncio.sleep(CHURN_EVERY_S)
        reader, writer = await self.open_pipe()
        try:
            writer.write(b"x" * 64)
            if await asyncio.wait_for(reader.readexactly(64), CALL_TIMEOUT_S) != b"x" * 64:
                raise AssertionError("the echo differs")
            self.counts["pipe_opens"] += 1
        finally:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), CALL_TIMEOUT_S)

    async def sampler(self, every: float, started: float) -> None:
        while True:
            emit(self.sample(started))
            await asyncio.sleep(every)

    def sample(self, started: float) -> dict[str, Any]:
        return {"t": round(time.monotonic() - started, 2), "rss_kib": rss_kib(),
                **self.counts}

    async def run(self, every: float) -> int:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_stdin() -> None:
            if not os.read(sys.stdin.fileno(), 4096) and not done.done():
                done.set_result(None)

        channel = self.channel()
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
        loop.add_reader(sys.stdin.fileno(), on_stdin)
        started = time.monotonic()
        tasks = [loop.create_task(self.forever("grpc unary", lambda: self.grpc_unary(channel)))
                 for _ in range(self.grpc_tasks)]
        tasks += [
            loop.create_task(self.forever("grpc stream", lambda: self.grpc_stream(channel))),
            loop.create_task(self.forever("grpc channel churn", self.grpc_churn)),
            loop.create_task(self.forever("raw echo", self.raw_echo)),
            loop.create_task(self.forever("pipe churn", self.pipe_churn)),
            loop.create_task(self.sampler(every, started)),
        ]
        await done
        self.stopping = True
        await asyncio.sleep(1.0)  # calls in progress finish
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
        emit({"final": self.sample(started), "errors": self.errors})
        return 0


def client_main(args: argparse.Namespace) -> int:
    client = SoakClient(args.grpc_target, args.raw_target, args.grpc_tasks)
    return asyncio.run(client.run(args.sample))


# ================================================================== the orchestrator


def fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def series_summary(samples: list[dict[str, Any]], key: str, warmup_s: float,
                   sample_s: float) -> dict[str, Any]:
    """Start, after the warm-up, end (medians of a few samples), max, slope per minute
    after the warm-up (MiB), and the growth from after the warm-up to the end."""
    pts = [(s["t"], s[key] / 1024) for s in samples if s.get(key)]
    if not pts:
        return {}
    after = [p for p in pts if p[0] >= warmup_s] or pts[-1:]
    window = max(3, int(30 / sample_s))  # about 30 s of samples
    base = statistics.median(y for _, y in after[:window])
    end = statistics.median(y for _, y in pts[-window:])
    return {"start_mib": round(pts[0][1], 1), "after_warmup_mib": round(base, 1),
            "end_mib": round(end, 1), "max_mib": round(max(y for _, y in pts), 1),
            "slope_mib_per_min": round(fit_slope([(t / 60, y) for t, y in after]), 3),
            "growth": round((end - base) / base, 4) if base else 0.0}


def soak(args: argparse.Namespace) -> int:
    why = check_prerequisites()
    if why:
        print(why, file=sys.stderr)
        return 2
    info = machine_info()
    print(header(info), flush=True)
    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(120.0, 0.2 * duration)
    print(f"# soak: {args.minutes:g} min, warm-up {warmup:.0f} s, sample every {args.sample:g}"
          f" s | {info['cpu_model']} | nproc {info['nproc']} | Python {info['python']} | "
          f"grpcio {info['grpcio']} | Samba {info['samba']} | {info['date']} | load "
          f"{info['loadavg_at_start']}", flush=True)
    samples: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    try:
        with interruptible(), Testbed(prefix="npsoak") as tb:
            servers = tb.start_servers(["grpc-pipe", "raw-pipe"])
            client = tb.spawn("client soak", "client", [
                str(SCRIPT), "--client", "--sample", str(args.sample),
                "--grpc-tasks", str(args.grpc_tasks),
                "--grpc-target", tb.target("grpc-smb", servers["grpc-pipe"][1]),
                "--raw-target", tb.target("npipe", servers["raw-pipe"][1])])
            end = time.monotonic() + duration
            next_report = 60.0
            while time.monotonic() < end:
                sample = client.reply(START_TIMEOUT_S + 3 * args.sample)
                sample["servers_rss_kib"] = sum(rss_kib(s.pid) for s, _ in servers.values())
                sample["smbd_rss_kib"] = tb.smbd_rss_kib()
                samples.append(sample)
                if sample["t"] >= next_report or not samples[:-1]:
                    next_report = sample["t"] - sample["t"] % 60 + 60
                    print(_progress(sample), file=sys.stderr, flush=True)
            final = _finish(client)
            for s, _ in servers.values():
                s.stop()
    except KeyboardInterrupt:
        print("interrupted: cleaned up", file=sys.stderr)
        return 130
    return report(args, info, samples, final, warmup)


def _progress(s: dict[str, Any]) -> str:
    return (f"{s['t'] / 60:5.1f} min: client RSS {s['rss_kib'] / 1024:.1f} MiB, servers "
            f"{s['servers_rss_kib'] / 1024:.1f} MiB, smbd {s['smbd_rss_kib'] / 1024:.1f} MiB | "
            f"{s.get('grpc_calls', 0)} calls, {s.get('grpc_streams', 0)} streams, "
            f"{s.get('echoes', 0)} echoes, {s.get('pipe_opens', 0)} opens, "
            f"{s.get('errors', 0)} errors")


def _finish(client: Child) -> dict[str, Any]:
    """Close the client's stdin and read up to its final line."""
    assert client.proc.stdin is not None
    client.proc.stdin.close()
    final: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        while "final" not in final:
            final = client.reply(START_TIMEOUT_S)
    client.stop()
    return final if "final" in final else {}


def report(args: argparse.Namespace, info: dict[str, Any], samples: list[dict[str, Any]],
           final: dict[str, Any], warmup: float) -> int:
    last = final.get("final") or (samples[-1] if samples else {})
    secs = last.get("t", 0.0) or 1.0
    client = series_summary(samples, "rss_kib", warmup, args.sample)
    others = {k: series_summary(samples, k, warmup, args.sample)
              for k in ("servers_rss_kib", "smbd_rss_kib")}
    print()
    print(f"{'RSS, MiB':<22} {'start':>7} {'warm':>7} {'end':>7} {'max':>7} "
          f"{'MiB/min':>8} {'growth':>7}")
    for name, row in (("client", client), ("servers (grpc + raw)", others["servers_rss_kib"]),
                      ("smbd (all processes)", others["smbd_rss_kib"])):
        if row:
            print(f"{name:<22} {row['start_mib']:>7.1f} {row['after_warmup_mib']:>7.1f} "
                  f"{row['end_mib']:>7.1f} {row['max_mib']:>7.1f} "
                  f"{row['slope_mib_per_min']:>+8.3f} {row['growth']:>+7.1%}")
    print(f"(warm: median of ~30 s after the {warmup:.0f} s warm-up; end: of the last ~30 s; "
          "slope: least squares after the warm-up)")
    print()
    print(f"in {secs / 60:.1f} min: {last.get('grpc_calls', 0)} gRPC unary calls "
          f"({last.get('grpc_calls', 0) / secs:.0f}/s), {last.get('grpc_streams', 0)} streams "
          f"of {STREAM_MSGS} x 1 MiB, {last.get('grpc_channels', 0)} channels opened and "
          f"closed, {last.get('echoes', 0)} raw echoes ({last.get('echo_bytes', 0) / 1e6:.0f}"
          f" MB), {last.get('pipe_opens', 0)} pipes opened and closed; "
          f"{last.get('errors', 0)} errors")
    for line in final.get("errors", []):
        print(f"  {line}")
    problems = []
    if not final:
        problems.append("the client did not report at the end")
    if last.get("errors", 0):
        problems.append(f"{last['errors']} operations failed")
    if not client or client["growth"] > args.max_growth:
        problems.append(f"client RSS grew {client.get('growth', 0):.1%} after the warm-up "
                        f"(limit {args.max_growth:.0%})")
    if not last.get("grpc_calls") or not last.get("echoes"):
        problems.append("no progress")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "config": vars(args), "warmup_s": warmup, "client": client,
             **others, "final": final, "samples": samples}, separators=(",", ":")) + "\n")
        print(f"samples written to {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, samples, warmup, info)
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    print(f"OK: client RSS {client['growth']:+.1%} after the warm-up "
          f"(limit {args.max_growth:.0%}), no errors")
    return 0


def write_plot(path: str, samples: list[dict[str, Any]], warmup: float,
               info: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 7), dpi=100, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 2]})
    t = [s["t"] / 60 for s in samples]
    for key, label, style in (("rss_kib", "client (judged)", "-"),
                              ("servers_rss_kib", "gRPC + raw servers", "--"),
                              ("smbd_rss_kib", "smbd, all processes", ":")):
        ax.plot(t, [s.get(key, 0) / 1024 for s in samples], style, label=label)
    ax.axvspan(0, warmup / 60, color="grey", alpha=0.15, label="warm-up")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("soak: RSS over time", fontsize=10)
    for key, label in (("grpc_calls", "gRPC unary calls/s"), ("echoes", "raw echoes/s")):
        rates = [0.0] + [
            (b.get(key, 0) - a.get(key, 0)) / max(b["t"] - a["t"], 1e-9)
            for a, b in itertools.pairwise(samples)
        ]
        ax2.plot(t, rates, label=label)
    ax2.set_xlabel("minutes")
    ax2.set_ylabel("operations/s")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{info['cpu_model']}, {info['nproc']} CPUs, Python {info['python']}, "
                 f"grpcio {info['grpcio']}, Samba {info.get('samba', '?')}, {info['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long (10)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline (20%% of the run, at most 120)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples (5)")
    p.add_argument("--max-growth", type=float, default=0.10,
                   help="largest allowed client RSS growth after the warm-up (0.10 = 10%%)")
    p.add_argument("--grpc-tasks", type=int, default=4,
                   help="concurrent unary call loops on the gRPC channel (4)")
    p.add_argument("--json", metavar="FILE", help="write the samples and the summary as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot RSS over time (needs matplotlib)")
    # Internal: the client process in the client namespace.
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--grpc-target", help=argparse.SUPPRESS)
    p.add_argument("--raw-target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.sample <= 0 or args.grpc_tasks < 1:
        p.error("--minutes and --sample must be positive, --grpc-tasks at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        return client_main(args)
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
