#!/usr/bin/env python3
"""Does the server's front door cost calls/s by sharing grpcio's GIL? An experiment.

Across the two namespace hosts of cross_host.py (a private smbd on port 445 in the
server's), one sync gRPC channel called from 1, 8 and 32 threads (100-byte unary Echo),
against two servers of the same service, taking turns in every round:

    in-process   npipe.grpc.add_pipe_port(server, NAME, smb=True): the Samba front door
                 (NPA handshake, ACL, relay threads) runs in the grpcio server's process,
                 as npipe ships it
    own-process  a plain grpcio server on a Unix socket, and npipe.frontdoor.FrontDoor for
                 the Samba pipe in a second process, relaying to that socket: the same
                 relay code with a GIL of its own (bench-only: its callers' identities
                 stay in that process, so caller() would return None)

It prints calls/s per cell and round, and the per-round ratio own-process / in-process.

    python bench/frontdoor_process.py                  # 5 rounds x 6000 calls per cell
    python bench/frontdoor_process.py --rounds 3 --calls 3000

Needs what cross_host.py needs (root, smbd, grpcio).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

from machine import header, machine_info
from testbed import PASSWORD, USER, Testbed, check_prerequisites, interruptible

from npipe.testing.netns import run_in, serve_app

SCRIPT = Path(__file__).resolve()
SERVICE = "bench.Echo"
KINDS = ("in-process", "own-process")
PIPES = {"in-process": "benchdoorin", "own-process": "benchdoorout"}


def grpc_server() -> object:
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
    }),))
    return server


def serve(role: str, name: str, socket_path: str) -> None:
    """A server role; prints "ready", serves until stdin closes."""
    import npipe
    import npipe.grpc

    acl = npipe.Acl.allow(users=[USER])
    keep: object = None
    if role == "in-process":
        server = grpc_server()
        npipe.grpc.add_pipe_port(server, name, smb=True, acl=acl)  # type: ignore[arg-type]
        server.start()  # type: ignore[attr-defined]
        keep = server
    elif role == "grpc":
        server = grpc_server()
        server.add_insecure_port("unix:" + socket_path)  # type: ignore[attr-defined]
        server.start()  # type: ignore[attr-defined]
        keep = server
    else:  # "door": the Samba front door alone, relaying to the grpc role's socket
        from npipe import frontdoor
        from npipe.address import parse_address
        from npipe.local.listener import private_dir
        from npipe.samba import np_listener as samba

        addr = parse_address(name)
        claimed = samba.claim_samba_pipe(addr, acl=acl)
        identify = samba.samba_identify(acl, claimed.path, answer_as=addr.name)
        keep = frontdoor.FrontDoor(claimed, Path(socket_path), private_dir(), identify)
        keep.start()  # type: ignore[attr-defined]
    print("ready", flush=True)
    sys.stdin.read()
    del keep


def client(address: str, threads: int, calls: int) -> None:
    """``calls`` sequential-per-thread Echo calls from ``threads`` threads on one channel;
    prints calls/s."""
    import npipe.grpc

    with npipe.grpc.channel(address) as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        for _ in range(200):
            echo(b"x" * 100, timeout=30)
        workers = [threading.Thread(target=lambda: [echo(b"x" * 100, timeout=30)
                                                    for _ in range(calls // threads)])
                   for _ in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        print(f"{threads * (calls // threads) / (time.perf_counter() - start):.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=6000, help="calls per cell and turn")
    p.add_argument("--threads", default="1,8,32")
    p.add_argument("--serve", nargs=3, metavar=("ROLE", "NAME", "SOCKET"), help=argparse.SUPPRESS)
    p.add_argument("--client", nargs=3, metavar=("ADDRESS", "THREADS", "CALLS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    if args.client:
        client(args.client[0], int(args.client[1]), int(args.client[2]))
        return 0
    if why := check_prerequisites():
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    threads = [int(t) for t in args.threads.split(",")]
    print(header(machine_info()), flush=True)
    results: dict[tuple[int, str], list[float]] = {}
    with interruptible(), Testbed(prefix="npxd") as tb, contextlib.ExitStack() as stack:
        socket_path = str(tb.workdir / "grpc.sock")
        ns = tb.hosts.server_ns

        def start(role: str, name: str) -> None:
            stack.enter_context(serve_app(
                ns, [sys.executable, str(SCRIPT), "--serve", role, name, socket_path], tb.env))

        start("in-process", PIPES["in-process"])
        start("grpc", "-")
        start("door", PIPES["own-process"])
        env = {**os.environ, "NPIPE_USER": USER, "NPIPE_PASSWORD": PASSWORD,
               "KRB5CCNAME": f"FILE:{tb.workdir}/no-ccache"}
        for r in range(args.rounds):
            for i, n in enumerate(threads):
                order = KINDS if (r + i) % 2 == 0 else KINDS[::-1]
                for kind in order:
                    done = run_in(tb.hosts.client_ns,
                                  [sys.executable, str(SCRIPT), "--client",
                                   tb.site.address(PIPES[kind]), str(n), str(args.calls)],
                                  env=env, capture_output=True, text=True, timeout=600)
                    if done.returncode:
                        raise RuntimeError(f"{kind} x {n}: {done.stderr[-2000:]}")
                    results.setdefault((n, kind), []).append(
                        float(done.stdout.strip().splitlines()[-1]))
            line = "  ".join(f"{n}x {k} {results[(n, k)][-1]:.0f}" for n in threads
                             for k in KINDS)
            print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    print(f"\none channel, {args.calls} unary calls per cell and turn; calls/s, median over "
          f"{args.rounds} rounds [min-max]")
    print(f"{'threads':>8} {'in-process':>18} {'own-process':>18} {'own / in per round':>32}")
    for n in threads:
        cells = [results[(n, k)] for k in KINDS]
        ratios = [b / a for a, b in zip(*cells, strict=True)]
        print(f"{n:>8} " + " ".join(
            f"{statistics.median(c):>7.0f} [{min(c):.0f}-{max(c):.0f}]" for c in cells)
            + f"   {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
    print(f"(load at the end {[round(x, 2) for x in os.getloadavg()]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
