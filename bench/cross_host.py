#!/usr/bin/env python3
"""Cross-host benchmark: gRPC and raw pipe I/O between two network namespaces, through smbd.

Two "hosts" on one machine (network namespaces joined by a veth link: server 198.18.0.1,
client 198.18.0.2), a private smbd on port 445 in the server's, and side by side in one
run:

* gRPC, unary latency (p50, p99) of a 100-byte echo and the throughput (MB/s, 10^6
  bytes/s) of a client stream of 1 MiB messages, for
  - ``grpc-tcp``: plain grpcio over TCP on the link (server on 198.18.0.1:PORT);
  - ``grpc-tls``: grpcio over TLS on TCP, a throwaway self-signed certificate for
    198.18.0.1 (the anchor for an encrypted pipe: like with like);
  - ``grpc-smb``: grpcio through the SMB pipe with npipe's native client, default
    security (encrypted where the server can: SMB 3.1.1 here);
  - ``grpc-smb-signed``: the same with ``encrypt=False`` (signed only);
  - ``grpc-smb-unsigned``: the same on an unsigned SMB 2.1 connection (a benchmark-only
    ``Options(sign=False, dialects=(0x0210,))``; smbd does not require signing);
  - ``grpc-smbprotocol``: the same through the smbprotocol backend, default security;
* raw bytes against one npipe raw echo server behind smbd: the round trip of a 64-byte
  echo (p50, p99) and the throughput of echoes of 64 B, 4 KiB, 64 KiB and 1 MiB, for
  - ``smb2-echo`` / ``-signed`` / ``-unsigned``: a bare SMB2 ECHO (``link.echo()``) on
    a native connection, the floor for a pipe round trip at that protection;
  - ``minimal`` / ``-signed`` / ``-unsigned``: the floor of a pipe round trip, the least
    asyncio driver around npipe's sans-I/O core: one FSCTL_PIPE_TRANSCEIVE per round
    trip, nothing posted ahead, no bridge (``smb_clients.MinimalClient``);
  - ``npipe`` / ``npipe-signed`` / ``npipe-unsigned``: ``npipe.open_connection``
    (default / ``encrypt=False`` / the unsigned SMB 2.1 options above);
  - ``smbprotocol`` / ``smbprotocol-signed``: smbprotocol's Connection, Session,
    TreeConnect and Open used directly, a round trip being one ``SMB2IOCTLRequest`` with
    FSCTL_PIPE_TRANSCEIVE; encrypted / signed only;
  - ``impacket``: impacket's SMBConnection, ``transactNamedPipe``; up to 64 KiB;
  - ``tcp``: an asyncio TCP echo on the link, the floor the wire itself sets;
* threads: 1 and 8 sync channels (each a pipe instance, or an HTTP/2 connection) x 1, 8
  and 32 caller threads, calls/s for grpc-tcp, grpc-tls and the pipes, ratios to both;
* concurrency: 50 ``npipe.grpc.aio_channel`` channels (50 pipes on one SMB connection)
  x 20 concurrent unary calls, 1,000 calls at once; errors (must be 0) and the total
  time, next to the same over TCP (``grpc-smb-many``, ``grpc-tcp-many``).

Every server runs in the server namespace and every client in the client namespace, each
in a process of its own (``testbed.py --server KIND``; this script's ``--client KIND``).
A client connects once, warms up and then answers commands on stdin, one JSON line each
(``lat N``: N round trips, their times in us; ``tput SIZE N``: a gRPC stream of N
messages of SIZE bytes, or N echoes of SIZE bytes, in MB/s; ``conc N``: N concurrent
calls on each channel). The orchestrator interleaves the transports as grpc_local.py
does: each round is cut into slices and the order rotates every slice, so noise from
elsewhere on the machine lands on all of them alike; the tables show the median over
rounds of each round's p50, p99 and median MB/s, and ratios between those medians.

    python bench/cross_host.py                  # 5 rounds and the threads section, ~5 min
    python bench/cross_host.py --quick          # smoke run, about 20 s
    python bench/cross_host.py --json out.json --plot out.png

This script runs the rounds; the parts are modules of their own: testbed.py (the
namespaces, smbd and the server apps), transports.py (what is measured and judged),
npipe_clients.py and smb_clients.py (the clients), report.py (tables, targets, plot).

Needs root (network namespaces, smbd), Samba's smbd and smbpasswd, iproute2, grpcio,
smbprotocol and impacket (matplotlib for --plot). Namespaces, smbd, its files and the SMB
user it created are removed at the end, also on failure or Ctrl-C. Exit status 1 if a
concurrent call failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from grpc_local import _rotated
from machine import header, machine_info
from npipe_clients import client_main
from report import Result, report
from testbed import START_TIMEOUT_S, Child, Testbed, check_prerequisites, interruptible
from transports import (
    ALL_TRANSPORTS,
    CLIENT_KINDS,
    COMMAND_TIMEOUT_S,
    CONC_TRANSPORTS,
    GRPC_TRANSPORTS,
    MIB,
    RAW_BYTES,
    SIZE_FACTOR,
    SIZE_LABELS,
    SIZES,
    THREAD_TRANSPORTS,
    TRANSPORTS,
    UNARY_BYTES,
)

SCRIPT = Path(__file__).resolve()


def turn_size(args: argparse.Namespace, transport: str, size: int) -> int:
    """Messages in one gRPC stream, or echoes in one raw throughput turn."""
    return int(args.msgs if transport in GRPC_TRANSPORTS else args.echoes * SIZE_FACTOR[size])


def run_rounds(clients: dict[str, Child], args: argparse.Namespace) -> dict[str, Result]:
    """Round-robin: latency slices with a rotating order, then throughput turns."""
    names = list(clients)
    results = {t: Result() for t in names}
    slices = max(1, min(10, args.calls))
    turn = 0
    for r in range(args.rounds):
        lat: dict[str, list[float]] = {t: [] for t in names}
        mbs: dict[str, dict[int, list[float]]] = {
            t: {s: [] for s in TRANSPORTS[t].sizes} for t in names}
        for s in range(slices):
            n = args.calls // slices + (1 if s < args.calls % slices else 0)
            for t in _rotated(names, turn):
                lat[t] += clients[t].ask(f"lat {n}", COMMAND_TIMEOUT_S + n * 0.05)["us"]
            turn += 1
        for _ in range(args.streams):
            for t in _rotated(names, turn):
                for size in TRANSPORTS[t].sizes:
                    n = turn_size(args, t, size)
                    mbs[t][size] += clients[t].ask(
                        f"tput {size} {n}", COMMAND_TIMEOUT_S + n * size / MIB)["mb_s"]
            turn += 1
        for t in names:
            results[t].latencies.append(lat[t])
            for size, values in mbs[t].items():
                results[t].throughputs.setdefault(size, []).append(values)
        line = "  ".join(
            f"{t} {results[t].p50s()[-1]:.0f}/{results[t].p99s()[-1]:.0f}us"
            + (f" {results[t].mbps(MIB)[-1]:.0f}MB/s" if results[t].mbps(MIB) else "")
            for t in names
        )
        print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    return results


def run_concurrency(tb: Testbed, servers: dict[str, tuple[Child, dict[str, Any]]],
                    args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The concurrent calls, ``--conc-runs`` times per transport, alternating."""
    clients: dict[str, Child] = {}
    for kind, server_kind in CONC_TRANSPORTS.items():
        if server_kind not in servers:
            continue
        target = tb.target(kind, servers[server_kind][1])
        clients[kind] = tb.spawn(
            f"client {kind}", "client",
            [str(SCRIPT), "--client", kind, "--target", target, "--warmup",
             str(args.channels * 2), "--channels", str(args.channels)])
        clients[kind].reply(START_TIMEOUT_S + args.channels)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in clients}
    for i in range(args.conc_runs):
        for kind in _rotated(list(clients), i):
            runs[kind].append(clients[kind].ask(f"conc {args.per_channel}",
                                                COMMAND_TIMEOUT_S + args.per_channel))
            last = runs[kind][-1]
            print(f"concurrency {i + 1}/{args.conc_runs}: {kind} {last['calls']} calls in "
                  f"{last['seconds']:.2f} s, {last['errors']} errors", file=sys.stderr,
                  flush=True)
    for c in clients.values():
        c.stop()
    return runs


def run_threads(clients: dict[str, Child], args: argparse.Namespace
                ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The threads section: for each channels x callers cell, every transport of
    THREAD_TRANSPORTS that ran takes a turn (the order rotating), ``--mt-rounds`` times.
    Returns transport -> "CHANNELSxCALLERS" -> one result per round."""
    names = [t for t in THREAD_TRANSPORTS if t in clients]
    cells = [(ch, n) for ch in args.mt_channels for n in args.mt_callers]
    out: dict[str, dict[str, list[dict[str, Any]]]] = {
        t: {f"{ch}x{n}": [] for ch, n in cells} for t in names}
    turn = 0
    for r in range(args.mt_rounds):
        for ch, n in cells:
            for t in _rotated(names, turn):
                # the first turn of a channel count opens its channels (not timed)
                res = clients[t].ask(f"mt {ch} {n} {args.mt_calls}",
                                     COMMAND_TIMEOUT_S + args.mt_calls * 0.05 + ch * 10)
                out[t][f"{ch}x{n}"].append(res)
            turn += 1
        line = "  ".join(f"{t} " + "/".join(f"{out[t][f'{ch}x{n}'][-1]['calls_s']:.0f}"
                                             for ch, n in cells) for t in names)
        print(f"threads {r + 1}/{args.mt_rounds} (calls/s per cell): {line}", file=sys.stderr,
              flush=True)
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("smbprotocol", "impacket", "npipe", "pyspnego", "cryptography"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
    return out


def orchestrate(args: argparse.Namespace) -> int:
    why = check_prerequisites()
    if why:
        print(why, file=sys.stderr)
        return 2
    info = {**machine_info(), **versions()}
    print(header(info))
    print(f"# smbprotocol {info['smbprotocol']} | impacket {info['impacket']} | pyspnego "
          f"{info['pyspnego']} | cryptography {info['cryptography']} | npipe {info['npipe']}"
          " (the code in this work tree)")
    print(f"# {args.rounds} rounds x {args.calls} round trips per transport (gRPC {UNARY_BYTES} "
          f"B unary, raw {RAW_BYTES} B echo); throughput: {args.streams} turn(s) per round of "
          f"a gRPC client stream of {args.msgs} x 1 MiB, or of "
          + ", ".join(f"{args.echoes * SIZE_FACTOR[s]} x {SIZE_LABELS[s]}" for s in SIZES)
          + " echoes; medians of per-round values", flush=True)
    server_stats: dict[str, Any] = {}
    client_info: dict[str, Any] = {}
    conc: dict[str, list[dict[str, Any]]] = {}
    threads: dict[str, dict[str, list[dict[str, Any]]]] = {}
    started = time.monotonic()
    try:
        with interruptible(), Testbed() as tb:
            kinds = sorted({TRANSPORTS[t].server for t in args.names}
                           | ({"grpc-pipe", "grpc-tcp"} if args.channels else set()))
            servers = tb.start_servers(kinds)
            clients: dict[str, Child] = {}
            for t in args.names:
                ready = servers[TRANSPORTS[t].server][1]
                target = tb.target(t, ready)
                extra = []
                if "ca" in ready:  # the TLS server's throwaway certificate
                    ca_file = tb.workdir / f"{TRANSPORTS[t].server}-ca.pem"
                    ca_file.write_text(ready["ca"])
                    extra = ["--ca", str(ca_file)]
                clients[t] = tb.spawn(f"client {t}", "client",
                                      [str(SCRIPT), "--client", t, "--target", target,
                                       "--warmup", str(args.warmup), *extra])
                # One at a time: their SMB logons and warm-ups would skew each other.
                client_info[t] = clients[t].reply(START_TIMEOUT_S + args.warmup * 0.05)["info"]
            results = run_rounds(clients, args)
            if args.mt_rounds:
                threads = run_threads(clients, args)
            for c in clients.values():
                c.stop()
            if args.channels:
                conc = run_concurrency(tb, servers, args)
            for kind, (s, _) in servers.items():
                server_stats[kind] = (s.stop() or {}).get("stats")
    except KeyboardInterrupt:
        print("interrupted: cleaned up", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    return report(args, info, results, client_info, server_stats, conc, threads, elapsed)


# ================================================================== main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (5)")
    p.add_argument("--calls", type=int, default=1500,
                   help="round trips (unary calls or echoes) per transport per round (1500)")
    p.add_argument("--streams", type=int, default=3,
                   help="throughput turns per transport per round (3)")
    p.add_argument("--msgs", type=int, default=64, help="1 MiB messages per gRPC stream (64)")
    p.add_argument("--echoes", type=int, default=8,
                   help="1 MiB echoes per raw turn (8); x4 of 64 KiB, x16 of 4 KiB and 64 B")
    p.add_argument("--warmup", type=int, default=100, help="round trips before measuring (100)")
    p.add_argument("--channels", type=int, default=50,
                   help="concurrency run: grpc.aio channels (50; 0: no concurrency run)")
    p.add_argument("--per-channel", type=int, default=20,
                   help="concurrency run: concurrent calls per channel (20)")
    p.add_argument("--conc-runs", type=int, default=3, help="concurrency runs (3)")
    p.add_argument("--mt-channels", default="1,8",
                   help="threads section: sync channels per transport, a list (1,8)")
    p.add_argument("--mt-callers", default="1,8,32",
                   help="threads section: caller threads, a list (1,8,32)")
    # Short cells flatter the pipe: the slower start and tail of 32 threads weigh more
    # on the faster transport (1600 calls: TCP 3553 calls/s at 1 x 32; 8000: 4810).
    p.add_argument("--mt-calls", type=int, default=6000,
                   help="threads section: unary calls per cell and turn, split over the "
                        "callers (6000)")
    p.add_argument("--mt-rounds", type=int, default=3,
                   help="threads section: rounds over the cells (3; 0 skips the section)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few seconds per transport")
    p.add_argument("--transports", default=",".join(ALL_TRANSPORTS),
                   help=f"comma-separated, from {', '.join(ALL_TRANSPORTS)}")
    p.add_argument("--json", metavar="FILE", help="write raw numbers and the summary as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a plot (needs matplotlib)")
    # Internal: the client processes the orchestrator starts in the client namespace (the
    # servers are testbed.py's).
    p.add_argument("--client", choices=CLIENT_KINDS, help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--ca", help=argparse.SUPPRESS)  # a file: the TLS server's certificate
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.streams, args.msgs, args.echoes, args.warmup = (
            2, 100, 1, 4, 1, 20)
        args.conc_runs, args.mt_calls, args.mt_rounds = 1, 64, 1
    try:
        args.mt_channels = [int(x) for x in args.mt_channels.split(",") if x.strip()]
        args.mt_callers = [int(x) for x in args.mt_callers.split(",") if x.strip()]
    except ValueError:
        p.error("--mt-channels and --mt-callers take comma-separated whole numbers")
    if min([*args.mt_channels, *args.mt_callers, args.mt_calls, 1]) < 1 or args.mt_rounds < 0:
        p.error("--mt-channels, --mt-callers and --mt-calls must be at least 1, "
                "--mt-rounds at least 0")
    names = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in names if t not in ALL_TRANSPORTS]
    if unknown:
        p.error(f"unknown transport(s): {', '.join(unknown)}")
    if min(args.rounds, args.calls, args.streams, args.msgs, args.echoes, args.per_channel,
           args.conc_runs) < 1 or args.channels < 0:
        p.error("--rounds, --calls, --streams, --msgs, --echoes, --per-channel and "
                "--conc-runs must be at least 1, --channels at least 0")
    args.names = [t for t in ALL_TRANSPORTS if t in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        if not args.target:
            print("--client needs --target", file=sys.stderr)
            return 2
        ca_pem = Path(args.ca).read_text() if args.ca else None
        return client_main(args.client, args.target, args.warmup, args.channels, ca_pem)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
