#!/usr/bin/env python3
"""The spread over rounds and runs: several ``--json`` files of one benchmark, one table.

    python bench/runs.py /tmp/cross-1.json /tmp/cross-2.json /tmp/cross-3.json
    python bench/runs.py /tmp/local-*.json

Works on the JSON of ``cross_host.py`` and of ``grpc_local.py``. For every transport:

* ``p50 us``: the median over runs of each run's value (itself the median over that
  run's rounds of each round's p50), then ``[p10-p90]`` and ``(min-max)`` over every
  round of every run (rounds x runs values);
* ``p99 us``: the median over runs, likewise;
* throughput (MB/s): the same for each size (cross-host raw echoes: 64 B to 1 MiB; gRPC
  and local: the 1 MiB stream);
* ratios against the transport each row is compared with (``vs`` in the run's summary,
  plus the pairs given with ``--pair A/B``): the ratio of the medians over runs, then
  p10-p90 and min-max of the per-round ratios. The transports of a run take turns in
  every slice of a round, so a round's ratio compares them under the same load: the
  per-round spread is the honest error bar; a cross-host row with a second anchor
  (``also_vs``: grpc-tls for the encrypted pipes) gets both ratios;
* cross-host's threads section (calls/s per channels x callers cell): the median over
  runs, and each transport's ratio to grpc-tcp and to grpc-tls with the spread of the
  per-round ratios.

The machines and commits of the runs are printed first; runs of different commits or
hosts are refused unless ``--mixed``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

CROSS_PAIRS = ("npipe/smb2-echo", "npipe-signed/smb2-echo-signed",
               "npipe-unsigned/smb2-echo-unsigned", "smbprotocol/minimal",
               "impacket/minimal", "smbprotocol-signed/minimal-signed")
SIZE_LABELS = {"64": "64 B", "4096": "4 KiB", "65536": "64 KiB", "1048576": "1 MiB"}


def pct(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..100)."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def spread(values: list[float], fmt: str) -> str:
    return (f"[{fmt.format(pct(values, 10))}-{fmt.format(pct(values, 90))}] "
            f"({fmt.format(min(values))}-{fmt.format(max(values))})")


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


class Run:
    """One JSON file, reduced to per-round values per transport."""

    def __init__(self, path: str) -> None:
        raw = json.loads(Path(path).read_text())
        self.path = path
        self.machine: dict[str, Any] = raw["machine"]
        self.summary: dict[str, dict[str, Any]] = raw["summary"]
        self.concurrency: dict[str, list[dict[str, Any]]] = raw.get("concurrency") or {}
        # cross_host.py's threads section: transport -> "CHANNELSxCALLERS" -> per round
        self.threads: dict[str, dict[str, list[dict[str, Any]]]] = (
            (raw.get("threads") or {}).get("raw") or {})
        self.kind = "local" if "p50_vs_unix" in next(iter(self.summary.values())) else "cross"
        self.p50: dict[str, list[float]] = {t: r["p50_us_rounds"] for t, r in self.summary.items()}
        self.p99: dict[str, list[float]] = {t: r["p99_us_rounds"] for t, r in self.summary.items()}
        self.mbps: dict[str, dict[str, list[float]]] = {}
        for t, r in self.summary.items():
            rounds = r["mb_s_rounds"]
            if isinstance(rounds, dict):
                self.mbps[t] = {str(s): v for s, v in rounds.items() if v}
            elif rounds:
                self.mbps[t] = {"1048576": rounds}

    def vs(self, t: str) -> tuple[str | None, str | None]:
        row = self.summary[t]
        if self.kind == "local":
            return ("unix", "unix") if t != "unix" else (None, None)
        return row.get("vs"), row.get("tput_vs")

    def also_vs(self, t: str) -> str | None:
        """The second anchor of a cross-host row (grpc-tls for the encrypted pipes)."""
        return self.summary[t].get("also_vs") if self.kind == "cross" else None


def per_round_ratios(runs: list[Run], a: str, b: str, key: str, size: str = "") -> list[float]:
    out = []
    for run in runs:
        if key == "p50":
            xs, ys = run.p50.get(a), run.p50.get(b)
        else:
            xs, ys = run.mbps.get(a, {}).get(size), run.mbps.get(b, {}).get(size)
        if xs and ys:
            out += [x / y for x, y in zip(xs, ys, strict=False) if y]
    return out


def table(runs: list[Run], pairs: list[str]) -> str:
    names = list(runs[0].summary)
    n_rounds = sum(len(r.p50[names[0]]) for r in runs)
    lines = [f"{len(runs)} runs, {n_rounds} rounds in all; values: median over runs "
             "[p10-p90 over all rounds] (min-max over all rounds)", ""]
    head = f"{'latency':<20} {'p50 us':>7} {'p50 spread over rounds':<26} {'p99 us':>7}"
    lines += [head, "-" * len(head)]
    for t in names:
        rounds = [x for r in runs for x in r.p50.get(t, [])]
        med = statistics.median(statistics.median(r.p50[t]) for r in runs if r.p50.get(t))
        p99 = statistics.median(statistics.median(r.p99[t]) for r in runs if r.p99.get(t))
        lines.append(f"{t:<20} {med:>7.0f} {spread(rounds, '{:.0f}'):<26} {p99:>7.0f}")
    lines += ["", f"{'throughput MB/s':<20} {'size':>6} {'median':>8} {'spread over rounds':<26}",
              "-" * 64]
    for t in names:
        for size in runs[0].mbps.get(t, {}):
            rounds = [x for r in runs for x in r.mbps.get(t, {}).get(size, [])]
            med = statistics.median(statistics.median(r.mbps[t][size]) for r in runs
                                    if r.mbps.get(t, {}).get(size))
            lines.append(f"{t:<20} {SIZE_LABELS.get(size, size):>6} {_num(med):>8} "
                         f"{spread(rounds, '{:.3g}'):<26}")
    # Ratios: what each run compares, then the extra pairs.
    want: list[tuple[str, str, str]] = []
    for t in names:
        lat_vs, tput_vs = runs[0].vs(t)
        if lat_vs:
            want.append((t, lat_vs, "p50"))
        if tput_vs:
            want.append((t, tput_vs, "mb_s"))
        also = runs[0].also_vs(t)
        if also and also in names:
            want += [(t, also, "p50"), (t, also, "mb_s")]
    for pair in pairs:
        a, _, b = pair.partition("/")
        if a in names and b in names and (a, b, "p50") not in want:
            want.append((a, b, "p50"))
            if runs[0].mbps.get(a) and runs[0].mbps.get(b) and runs[0].kind == "local":
                want.append((a, b, "mb_s"))
    head = (f"{'ratio':<40} {'size':>6} {'of medians':>10} {'per round: p10-p90 (min-max)':<28}"
            f" {'per run':<20}")
    lines += ["", head, "-" * len(head)]
    for a, b, key in want:
        sizes = [""] if key == "p50" else list(runs[0].mbps.get(a, {}))
        for size in sizes:
            ratios = per_round_ratios(runs, a, b, key, size)
            if not ratios:
                continue
            per_run = []
            for r in runs:
                xs = r.p50.get(a) if key == "p50" else r.mbps.get(a, {}).get(size)
                ys = r.p50.get(b) if key == "p50" else r.mbps.get(b, {}).get(size)
                if xs and ys:
                    per_run.append(statistics.median(xs) / statistics.median(ys))
            label = f"{a} / {b} ({'p50' if key == 'p50' else 'MB/s'})"
            lines.append(f"{label:<40} {SIZE_LABELS.get(size, size):>6} "
                         f"{statistics.median(per_run):>9.2f}x "
                         f"{spread(ratios, '{:.2f}'):<28} "
                         + " ".join(f"{x:.2f}" for x in per_run))
    conc: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        for kind, rs in r.concurrency.items():
            conc.setdefault(kind, []).extend(rs)
    if conc:
        head = (f"{'concurrency':<20} {'calls':>6} {'errors':>6} {'total s: median (min-max)':<27}"
                f" {'call p50 ms':>11} {'slowest ms':>10}")
        lines += ["", head, "-" * len(head)]
        for kind, rs in conc.items():
            secs = [x["seconds"] for x in rs]
            p50s = [x["p50_ms"] for x in rs if x.get("p50_ms") is not None]
            maxs = [x["max_ms"] for x in rs if x.get("max_ms") is not None]
            lines.append(
                f"{kind:<20} {sum(x['calls'] for x in rs):>6} {sum(x['errors'] for x in rs):>6} "
                f"{statistics.median(secs):.2f} ({min(secs):.2f}-{max(secs):.2f}){'':<13} "
                f"{statistics.median(p50s) if p50s else float('nan'):>11.0f} "
                f"{max(maxs) if maxs else float('nan'):>10.0f}")
    if runs[0].threads:
        lines += ["", threads_table(runs)]
    return "\n".join(lines)


def threads_table(runs: list[Run]) -> str:
    """cross_host.py's threads section over the runs: calls/s (the median over runs of
    each run's median over rounds) and, for every transport but grpc-tcp, the ratio to
    grpc-tcp and to grpc-tls: the median of the per-run ratios, then p10-p90 and min-max of
    the per-round ratios over every round of every run (a round's transports take turns)."""
    names = list(runs[0].threads)
    cells = list(runs[0].threads[names[0]])
    head = (f"{'threads':<7} {'ch':>3} {'callers':>7}  {'transport':<16} {'calls/s':>8}  "
            f"{'/tcp':>5} {'per round':<24} {'/tls':>5} {'per round':<24} {'errors':>6}")
    lines = [head, "-" * len(head)]

    def per_round(r: Run, t: str, cell: str) -> list[float]:
        return [x["calls_s"] for x in r.threads.get(t, {}).get(cell, [])]

    for cell in cells:
        ch, _, n = cell.partition("x")
        for t in names:
            med = statistics.median(statistics.median(per_round(r, t, cell)) for r in runs)
            errors = sum(x["errors"] for r in runs for x in r.threads.get(t, {}).get(cell, []))
            cols = []
            for base in ("grpc-tcp", "grpc-tls"):
                if t in ("grpc-tcp", base) or base not in names:
                    cols.append(f"{'-':>5} {'':<24}")
                    continue
                rounds = [a / b for r in runs for a, b in
                          zip(per_round(r, t, cell), per_round(r, base, cell), strict=False)]
                runs_ratio = statistics.median(
                    statistics.median(per_round(r, t, cell))
                    / statistics.median(per_round(r, base, cell)) for r in runs)
                cols.append(f"{runs_ratio:>4.2f}x {spread(rounds, '{:.2f}'):<24}")
            lines.append(f"{'':<7} {ch:>3} {n:>7}  {t:<16} {med:>8.0f}  " + " ".join(cols)
                         + f" {errors:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="+", help="--json files of cross_host.py or grpc_local.py")
    p.add_argument("--pair", action="append", default=[], metavar="A/B",
                   help="also the p50 ratio A / B (cross-host adds the floors and the "
                        "other clients against the minimal client)")
    p.add_argument("--mixed", action="store_true", help="accept runs of different commits")
    args = p.parse_args(argv)
    runs = [Run(f) for f in args.files]
    if len({r.kind for r in runs}) > 1:
        p.error("cross-host and local runs mixed")
    for r in runs:
        m = r.machine
        print(f"# {Path(r.path).name}: commit {m.get('commit', '?')} | host "
              f"{m.get('hostname', '?')} | {m.get('cpu_model')} | nproc {m.get('nproc')} | "
              f"Linux {m.get('kernel')} | Debian {m.get('debian', '?')} | Python "
              f"{m.get('python')} | Samba {m.get('samba', '?')} | {m.get('date')} | load "
              f"{m.get('loadavg_at_start')}")
    keys = {(r.machine.get("commit"), r.machine.get("hostname")) for r in runs}
    if len(keys) > 1 and not args.mixed:
        print(f"runs of different commits or hosts: {sorted(map(str, keys))} (--mixed)",
              file=sys.stderr)
        return 2
    pairs = args.pair + (list(CROSS_PAIRS) if runs[0].kind == "cross" else [])
    print()
    print(table(runs, pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
