#!/usr/bin/env python3
"""Where a unary gRPC call's time goes across hosts, process by process (hop by hop).

On the two namespace hosts of cross_host.py (a private smbd on port 445 in the server's),
each client kind makes N sequential 100-byte unary calls (as the rounds of cross_host.py
do) while this script reads the CPU time every process in both namespaces spent (utime +
stime from /proc), and prints, per call: the p50 latency and the CPU of each hop

    client      the calling process (grpcio; with NPIPE_REDIRECTOR=off, also the relay
                to the SMB pipe and the SMB client)
    redirector  npipe's per-user redirector: the relay and the SMB client (encryption)
    smbd        Samba: SMB on TCP 445 <-> the np/ socket
    server      the server process: npipe's front door (identify, relay) and grpcio
    (tcp)       for grpc-tcp: grpcio alone on both sides, the anchor

The transports take turns, ``--rounds`` times; medians of the rounds. With ``--flame
DIR`` it also records py-spy flame graphs (SVG) of the client, redirector and server
processes of grpc-smb during one more turn (``py-spy`` on PATH or ``--py-spy``).

    python bench/hops.py                       # 3 rounds x 2000 calls
    python bench/hops.py --flame docs/flame    # and the flame graphs

Needs what cross_host.py needs (root, smbd, grpcio).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from machine import header, machine_info
from testbed import START_TIMEOUT_S, Child, Testbed, check_prerequisites, interruptible

CROSS_HOST = Path(__file__).resolve().parent / "cross_host.py"
KINDS = ("grpc-tcp", "grpc-tls", "grpc-smb", "grpc-smb-inproc")
ROLES = ("client", "redirector", "smbd", "server")
TICK = os.sysconf("SC_CLK_TCK")


def processes(namespaces: list[str]) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) of every process in ``namespaces``."""
    out: dict[int, tuple[str, float]] = {}
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              check=False).stdout.split()
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            out[int(pid)] = (role(argv), (int(fields[11]) + int(fields[12])) / TICK)
    return out


def role(argv: list[bytes]) -> str:
    text = b" ".join(argv)
    if b"npipe.redirector" in text:
        return "redirector"
    if b"--client" in text:
        return "client"
    if b"smbd" in argv[0]:
        return "smbd"
    if b"--server" in text:
        return "server"
    return "other"


def turn(client: Child, namespaces: list[str], calls: int) -> dict[str, Any]:
    before = processes(namespaces)
    us = client.ask(f"lat {calls}", 120 + calls * 0.01)["us"]
    after = processes(namespaces)
    cpu = dict.fromkeys((*ROLES, "other"), 0.0)
    for pid, (who, seconds) in after.items():
        cpu[who] += seconds - before.get(pid, (who, 0.0))[1]
    return {"p50": statistics.median(us),
            "cpu_us": {k: v * 1e6 / calls for k, v in cpu.items()}}


def flame(py_spy: str, pids: dict[str, int], seconds: float, out: Path) -> list[Path]:
    """py-spy record each of ``pids`` (role -> pid) for ``seconds``, at once."""
    out.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for who, pid in pids.items():
        path = out / f"flame-grpc-smb-{who}.svg"
        procs.append(subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
             "--rate", "250", "--nonblocking", "--format", "flamegraph", "-o", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        files.append(path)
    for proc in procs:
        _, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode:
            print(f"py-spy failed: {err.strip()[-500:]}", file=sys.stderr)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--flame", metavar="DIR", type=Path, help="write py-spy flame graphs here")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    p.add_argument("--json", metavar="FILE", type=Path)
    args = p.parse_args(argv)
    why = check_prerequisites()
    if why:
        print(why, file=sys.stderr)
        return 2
    info = machine_info()
    print(header(info))
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    with interruptible(), Testbed() as tb:
        servers = tb.start_servers(["grpc-pipe", "grpc-tcp", "grpc-tls"])
        namespaces = [tb.hosts.client_ns, tb.hosts.server_ns]
        clients: dict[str, Child] = {}
        for kind in KINDS:
            ready = servers[{"grpc-tcp": "grpc-tcp", "grpc-tls": "grpc-tls"}.get(
                kind, "grpc-pipe")][1]
            extra = []
            if "ca" in ready:
                ca_file = tb.workdir / "hops-ca.pem"
                ca_file.write_text(ready["ca"])
                extra = ["--ca", str(ca_file)]
            clients[kind] = tb.spawn(f"client {kind}", "client",
                                     [str(CROSS_HOST), "--client", kind, "--target",
                                      tb.target(kind, ready), "--warmup", "300", *extra])
            clients[kind].reply(START_TIMEOUT_S + 30)
        for r in range(args.rounds):
            for kind in KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]:
                results[kind].append(turn(clients[kind], namespaces, args.calls))
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(
                f"{k} {results[k][-1]['p50']:.0f}us" for k in KINDS), file=sys.stderr)
        flames: list[Path] = []
        if args.flame:
            # the grpc-smb client and the pipe's server (each kind is a process of its
            # own), and the user's redirector, which relays grpc-smb's pipe
            pids = {"client": clients["grpc-smb"].pid, "server": servers["grpc-pipe"][0].pid}
            pids.update((who, pid) for pid, (who, _) in processes(namespaces).items()
                        if who == "redirector")
            calls = args.calls * 3
            seconds = max(5.0, calls * 0.0012)
            started = time.monotonic()
            done: list[Path] = []  # (py-spy records in a thread while the calls run)
            spy = threading.Thread(target=lambda: done.extend(
                flame(args.py_spy, pids, seconds, args.flame)))
            spy.start()
            time.sleep(0.5)
            while time.monotonic() - started < seconds:
                clients["grpc-smb"].ask(f"lat {args.calls}", 120)
            spy.join()
            flames = done
        for c in clients.values():
            c.stop()
    table(results)
    if flames:
        print("flame graphs: " + ", ".join(str(f) for f in flames))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    return 0


def table(results: dict[str, list[dict[str, Any]]]) -> None:
    print("unary 100 B echo, sequential; medians of the rounds; CPU in us per call")
    print(f"{'transport':<17}{'p50 us':>8}" + "".join(f"{r:>12}" for r in (*ROLES, "other"))
          + f"{'total':>9}")
    for kind, rounds in results.items():
        if not rounds:
            continue
        p50 = statistics.median(r["p50"] for r in rounds)
        cpu = {k: statistics.median(r["cpu_us"][k] for r in rounds)
               for k in (*ROLES, "other")}
        print(f"{kind:<17}{p50:>8.0f}" + "".join(f"{cpu[k]:>12.0f}" for k in cpu)
              + f"{sum(cpu.values()):>9.0f}")


if __name__ == "__main__":
    sys.exit(main())
