#!/usr/bin/env python3
"""npipe.open_connection against the minimal SMB client, back-to-back echoes, in one process.

cross_host.py runs each client in a process of its own; on a 2-vCPU VM where a process
(and its smbd) lands then moves its figures by 10-20% from run to run. Here both clients
live in one process and take turns, each turn the echoes of cross_host.py's throughput
turn (128 x 64 B, 128 x 4 KiB, 32 x 64 KiB, 8 x 1 MiB, one at a time, against the same
npipe echo server behind smbd), so that their ratio per turn compares them under the
same conditions. ``--old-reads`` also runs npipe as it was before a READ that comes back
full posted the next one at once (the next READ then waited for a turn of the loop; a
bench-only patch), as a third client in the same turns.

    python bench/echo_turns.py                   # 12 turns
    python bench/echo_turns.py --old-reads

Needs what cross_host.py needs (root, smbd).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from machine import header, machine_info
from smb_clients import MinimalClient
from testbed import PASSWORD, RAW_PIPE, USER, Testbed, check_prerequisites, interruptible

from npipe.testing.netns import run_in

SCRIPT = Path(__file__).resolve()
SIZES = ((64, 128), (4096, 128), (65536, 32), (1 << 20, 8))
SLOW_S = 0.002  # an echo of at most 64 KiB that takes longer than this stalled


def old_reads() -> Callable[[bool], None]:
    """A switch between npipe as it is and npipe whose full READ's follow-up READ waits
    for the loop's next turn, as before (methods of RemotePipe swapped, bench-only)."""
    from npipe.smb.native import pipe

    deliver, post = pipe.RemotePipe._deliver, pipe.RemotePipe._post_reads

    def delivering(self: Any, *args: Any) -> None:
        self._bench_delivering = True
        try:
            deliver(self, *args)
        finally:
            self._bench_delivering = False

    def posting(self: Any) -> None:
        if not getattr(self, "_bench_delivering", False):
            post(self)  # (in _deliver: skipped; the call_soon after it posts)

    def switch(on: bool) -> None:
        pipe.RemotePipe._deliver, pipe.RemotePipe._post_reads = (  # type: ignore[method-assign]
            (delivering, posting) if on else (deliver, post))

    return switch


def client(address: str, host: str, turns: int, with_old: bool) -> None:
    import npipe

    minimal = MinimalClient(host, USER, PASSWORD, RAW_PIPE, "encrypted")
    loop = asyncio.new_event_loop()
    streams = {}
    kinds = ["npipe", "minimal"] + (["npipe-old-reads"] if with_old else [])
    set_old_reads = old_reads() if with_old else None
    for kind in kinds:
        if kind != "minimal":
            streams[kind] = loop.run_until_complete(
                npipe.open_connection(address, smb_backend="native"))

    def npipe_echo(kind: str) -> Callable[[bytes], Awaitable[bytes]]:
        reader, writer = streams[kind]

        async def echo(msg: bytes) -> bytes:
            writer.write(msg)
            got = await asyncio.wait_for(reader.readexactly(len(msg)), 60)
            await writer.drain()
            return got

        return echo

    async def minimal_echo(msg: bytes) -> bytes:
        return await asyncio.wait_for(minimal.echo(msg), 60)

    async def echo_turn(kind: str, echo: Callable[[bytes], Awaitable[bytes]]) -> dict[int, float]:
        out = {}
        for size, n in SIZES:
            msg, times = os.urandom(size), []
            for _ in range(n):
                t0 = time.perf_counter()
                got = await echo(msg)
                times.append(time.perf_counter() - t0)
                if got != msg:
                    raise AssertionError("the echo differs")
            out[size] = size / statistics.median(times) / 1e6
            slow[kind][size] += sum(t > SLOW_S for t in times)
        return out

    mbs: dict[str, list[dict[int, float]]] = {k: [] for k in kinds}
    slow = {k: dict.fromkeys((s for s, _ in SIZES), 0) for k in kinds}
    for turn in range(turns + 1):  # the first: warm-up
        for i in range(len(kinds)):
            kind = kinds[(turn + i) % len(kinds)]
            if kind == "minimal":
                got = minimal.run(echo_turn(kind, minimal_echo))
            else:
                if set_old_reads is not None:
                    set_old_reads(kind == "npipe-old-reads")
                got = loop.run_until_complete(echo_turn(kind, npipe_echo(kind)))
            if turn:
                mbs[kind].append(got)
    if set_old_reads is not None:
        set_old_reads(False)
    print(f"echo MB/s, median over {turns} turns; ratio: median of the per-turn ratios "
          "[min-max]")
    print(f"{'client':<16}" + "".join(f"{_size(s):>9}" for s, _ in SIZES))
    for kind in kinds:
        print(f"{kind:<16}" + "".join(
            f"{statistics.median(t[s] for t in mbs[kind]):>9.3g}" for s, _ in SIZES))
    print("echoes of 64 B to 64 KiB that took over 2 ms (warm-up turn included): " + ", ".join(
        f"{kind} " + " / ".join(str(slow[kind][s]) for s, _ in SIZES[:3]) for kind in kinds)
        + f" of {' / '.join(str(n * (turns + 1)) for _, n in SIZES[:3])}")
    for kind in (k for k in kinds if k != "minimal"):
        cells = []
        for size, _ in SIZES:
            ratios = [a[size] / b[size] for a, b in zip(mbs[kind], mbs["minimal"], strict=True)]
            cells.append(f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
        print(f"{kind} / minimal: " + ", ".join(
            f"{_size(s)} {c}" for (s, _), c in zip(SIZES, cells, strict=True)))


def _size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB" if size >= 1024 \
        else f"{size} B"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--old-reads", action="store_true")
    p.add_argument("--client", nargs=2, metavar=("ADDRESS", "HOST"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        client(args.client[0], args.client[1], args.turns, args.old_reads)
        return 0
    if why := check_prerequisites():
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    print(header(machine_info()), flush=True)
    with interruptible(), Testbed(prefix="npxe") as tb:
        tb.start_servers(["raw-pipe"])
        env = {**tb.env, "NPIPE_USER": USER, "NPIPE_PASSWORD": PASSWORD,
               "KRB5CCNAME": f"FILE:{tb.workdir}/no-ccache"}
        argv = [sys.executable, str(SCRIPT), "--turns", str(args.turns), "--client",
                tb.site.address(RAW_PIPE), str(tb.hosts.server_ip)]
        if args.old_reads:
            argv.insert(2, "--old-reads")
        done = run_in(tb.hosts.client_ns, argv, env=env, capture_output=True, text=True,
                      timeout=1800)
        print(done.stdout, end="")
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
    print(f"(load at the end {[round(x, 2) for x in os.getloadavg()]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
