"""The cross-host benchmark's report: the results of the rounds, their summary, the
tables, the targets and the plot.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc_local import percentile
from transports import (
    GRPC_TRANSPORTS,
    MIB,
    RAW_BYTES,
    RAW_TRANSPORTS,
    SIZE_LABELS,
    SIZES,
    TARGETS,
    TRANSPORTS,
    UNARY_BYTES,
)


@dataclass
class Result:
    latencies: list[list[float]] = field(default_factory=list)  # per round, us
    # size -> per round, MB/s
    throughputs: dict[int, list[list[float]]] = field(default_factory=dict)

    def p50s(self) -> list[float]:
        return [percentile(r, 50) for r in self.latencies]

    def p99s(self) -> list[float]:
        return [percentile(r, 99) for r in self.latencies]

    def mbps(self, size: int) -> list[float]:
        return [statistics.median(r) for r in self.throughputs.get(size, []) if r]



def summarize(results: dict[str, Result]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for t, res in results.items():
        spec = TRANSPORTS[t]
        row: dict[str, Any] = {
            "p50_us": statistics.median(res.p50s()),
            "p99_us": statistics.median(res.p99s()),
            "p50_us_rounds": [round(x, 1) for x in res.p50s()],
            "p99_us_rounds": [round(x, 1) for x in res.p99s()],
            "mb_s": {s: statistics.median(res.mbps(s)) for s in spec.sizes if res.mbps(s)},
            "mb_s_rounds": {s: [float(f"{x:.4g}") for x in res.mbps(s)] for s in spec.sizes},
        }
        base = results.get(spec.lat_vs) if spec.lat_vs else None
        if base is not None:
            row["vs"] = spec.lat_vs
            row["p50_ratio"] = row["p50_us"] / statistics.median(base.p50s())
            row["p99_ratio"] = row["p99_us"] / statistics.median(base.p99s())
            row["p50_ratio_rounds"] = [
                round(a / b, 3) for a, b in zip(res.p50s(), base.p50s(), strict=True)
            ]
        base = results.get(spec.tput_vs) if spec.tput_vs else None
        if base is not None:
            row["tput_vs"] = spec.tput_vs
            row["mb_s_ratio"] = {  # this / tput_vs, per size
                s: row["mb_s"][s] / statistics.median(base.mbps(s))
                for s in row["mb_s"] if base.mbps(s)
            }
            row["mb_s_ratio_rounds"] = {
                s: [round(a / b, 3) for a, b in zip(res.mbps(s), base.mbps(s), strict=True)]
                for s in row["mb_s_ratio"]
            }
        base = results.get(spec.also_vs) if spec.also_vs else None
        if base is not None:  # the second anchor (TLS for the encrypted pipes)
            row["also_vs"] = spec.also_vs
            row["also_p50_ratio"] = row["p50_us"] / statistics.median(base.p50s())
            row["also_p99_ratio"] = row["p99_us"] / statistics.median(base.p99s())
            row["also_p50_ratio_rounds"] = [
                round(a / b, 3) for a, b in zip(res.p50s(), base.p50s(), strict=True)
            ]
            row["also_mb_s_ratio"] = {
                s: row["mb_s"][s] / statistics.median(base.mbps(s))
                for s in row["mb_s"] if base.mbps(s)
            }
        summary[t] = row
    return summary


def _mb(value: float) -> str:
    return f"{value:>7.{0 if value >= 100 else 1 if value >= 10 else 2}f}"


def _x(value: float | None, width: int = 6) -> str:
    return f"{value:>{width - 1}.2f}x" if value is not None else f"{'-':>{width}}"


def format_grpc_table(summary: dict[str, dict[str, Any]], names: list[str]) -> str:
    head = (f"{'gRPC':<19} {'p50 us':>8} {'p99 us':>8} {'MB/s':>8}   {'vs':<10} "
            f"{'p50':>6} {'p99':>6} {'MB/s':>6}   {'p50 ratio per round':<19}")
    lines = [head, "-" * len(head)]
    for t in names:
        row = summary[t]
        mb = row["mb_s"].get(MIB)
        line = (f"{t:<19} {row['p50_us']:>8.0f} {row['p99_us']:>8.0f} "
                + (f"{mb:>8.0f}" if mb is not None else f"{'-':>8}"))
        if "vs" in row:
            per = row["p50_ratio_rounds"]
            line += (f"   {row['vs']:<10} {_x(row['p50_ratio'])} {_x(row['p99_ratio'])} "
                     f"{_x(row.get('mb_s_ratio', {}).get(MIB))}   "
                     f"{min(per):.2f}-{max(per):.2f}x")
        lines.append(line)
        if "also_vs" in row:  # a line of its own: the same row against the second anchor
            per = row["also_p50_ratio_rounds"]
            lines.append(f"{'':<19} {'':>8} {'':>8} {'':>8}   {row['also_vs']:<10} "
                         f"{_x(row['also_p50_ratio'])} {_x(row['also_p99_ratio'])} "
                         f"{_x(row['also_mb_s_ratio'].get(MIB))}   "
                         f"{min(per):.2f}-{max(per):.2f}x")
    return "\n".join(lines)


def summarize_threads(threads: dict[str, dict[str, list[dict[str, Any]]]]
                      ) -> dict[str, dict[str, dict[str, Any]]]:
    """Per transport and cell: the median calls/s over rounds, the per-round values, the
    errors summed and, against grpc-tcp and grpc-tls, the ratio of the medians and the
    range of the per-round ratios (the transports of a cell take turns in every round)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for t, cells in threads.items():
        out[t] = {}
        for cell, rs in cells.items():
            per = [r["calls_s"] for r in rs]
            row: dict[str, Any] = {"calls_s": statistics.median(per), "calls_s_rounds": per,
                                   "errors": sum(r["errors"] for r in rs)}
            for key in ("smb_connections", "pipes"):
                if key in rs[-1]:
                    row[key] = rs[-1][key]
            for base in ("grpc-tcp", "grpc-tls"):
                if base == t or base not in threads or (t == "grpc-tcp"):
                    continue
                bper = [r["calls_s"] for r in threads[base][cell]]
                row[f"vs_{base}"] = row["calls_s"] / statistics.median(bper)
                row[f"vs_{base}_rounds"] = [round(a / b, 3) for a, b in
                                            zip(per, bper, strict=True)]
            out[t][cell] = row
    return out


def format_threads(tsum: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    head = (f"{'threads':<8} {'channels':>8} {'callers':>7}  {'transport':<17} {'calls/s':>8} "
            f"{'/tcp':>6} {'/tls':>6}   {'/tcp per round':<14} {'/tls per round':<14} "
            f"{'errors':>6}")
    lines = [f"sync grpcio channels called from threads (thread i on channel i % channels; "
             f"each channel its own pipe or HTTP/2 connection), {args.mt_calls} unary calls "
             f"({UNARY_BYTES} B) per cell and turn, split over the callers; median of "
             f"{args.mt_rounds} round(s), the transports taking turns in each", head,
             "-" * len(head)]
    cells = list(next(iter(tsum.values()))) if tsum else []

    def rng(v: list[float] | None) -> str:
        return f"{min(v):.2f}-{max(v):.2f}x" if v else "-"

    for cell in cells:
        ch, _, n = cell.partition("x")
        for t, rows in tsum.items():
            row = rows[cell]
            lines.append(
                f"{'':<8} {ch:>8} {n:>7}  {t:<17} {row['calls_s']:>8.0f} "
                f"{_x(row.get('vs_grpc-tcp'))} {_x(row.get('vs_grpc-tls'))}   "
                f"{rng(row.get('vs_grpc-tcp_rounds')):<14} "
                f"{rng(row.get('vs_grpc-tls_rounds')):<14} {row['errors']:>6}")
    pipes = {f"{t} {cell}": (r["smb_connections"], r["pipes"])
             for t, rows in tsum.items() for cell, r in rows.items() if "pipes" in r}
    if pipes:
        last = list(pipes.items())[-1]
        lines.append(f"(SMB connections, pipes open in the client after the last cell: "
                     f"{last[0]}: {last[1][0]}, {last[1][1]})")
    return "\n".join(lines)


def format_raw_tables(summary: dict[str, dict[str, Any]], names: list[str]) -> str:
    head = (f"{'raw 64 B echo':<19} {'p50 us':>8} {'p99 us':>8}   {'vs':<18} "
            f"{'p50':>6} {'p99':>6}   {'p50 ratio per round':<19}")
    lines = [head, "-" * len(head)]
    for t in names:
        row = summary[t]
        line = f"{t:<19} {row['p50_us']:>8.0f} {row['p99_us']:>8.0f}"
        if "vs" in row:
            per = row["p50_ratio_rounds"]
            line += (f"   {row['vs']:<18} {_x(row['p50_ratio'])} {_x(row['p99_ratio'])}   "
                     f"{min(per):.2f}-{max(per):.2f}x")
        lines.append(line)
    # Throughput by size; npipe rows compared with TCP (this / tcp), the other SMB
    # clients with npipe (npipe / this: how many times faster npipe is).
    labels = [SIZE_LABELS[s] for s in SIZES]
    head = (f"{'raw echo MB/s':<19} " + " ".join(f"{x:>7}" for x in labels)
            + f"   {'ratio':<24} " + " ".join(f"{x:>6}" for x in labels))
    lines += ["", head, "-" * len(head)]
    for t in names:
        row = summary[t]
        if not TRANSPORTS[t].sizes:
            continue
        line = f"{t:<19} " + " ".join(
            _mb(row["mb_s"][s]) if s in row["mb_s"] else f"{'-':>7}" for s in SIZES)
        ratio = row.get("mb_s_ratio")
        if ratio:
            base = row["tput_vs"]
            if base == "tcp":
                what, vals = f"this / {base}", [ratio.get(s) for s in SIZES]
            else:
                what = f"{base} / this"
                vals = [1 / ratio[s] if s in ratio else None for s in SIZES]
            line += f"   {what:<24} " + " ".join(_x(v) for v in vals)
        lines.append(line)
    return "\n".join(lines)


def format_concurrency(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    head = (f"{'concurrency':<19} {'calls':>6} {'errors':>6} {'total s':>8} {'calls/s':>8} "
            f"{'p50 ms':>7} {'max ms':>7}   {'runs: total s':<20}")
    lines = [f"{args.channels} grpc.aio channels x {args.per_channel} concurrent unary "
             f"calls ({UNARY_BYTES} B), all at once; median of {args.conc_runs} run(s), "
             "errors summed", head, "-" * len(head)]
    for kind, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        med = statistics.median(secs)
        calls = rs[0]["calls"]
        p50s = [r["p50_ms"] for r in rs if r["p50_ms"] is not None]
        maxs = [r["max_ms"] for r in rs if r["max_ms"] is not None]
        line = (f"{kind:<19} {calls:>6} {sum(r['errors'] for r in rs):>6} {med:>8.2f} "
                f"{calls / med:>8.0f} "
                + (f"{statistics.median(p50s):>7.1f} {max(maxs):>7.1f}" if p50s else
                   f"{'-':>7} {'-':>7}")
                + "   " + " ".join(f"{s:.2f}" for s in secs))
        lines.append(line)
        last = rs[-1]
        if "smb_connections" in last:
            lines.append(f"{'':<19} {last['channels']} channels on {last['smb_connections']} "
                         f"SMB connection(s), {last['pipes']} pipes open "
                         f"({last.get('security', '?')})")
        kinds = collections.Counter[str]()
        for r in rs:
            kinds.update(r.get("error_kinds") or {})
        if kinds:
            lines.append(f"{'':<19} errors: {dict(kinds)}")
    return "\n".join(lines)


def check_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, row, base, metric, bound in TARGETS:
        if row not in summary or base not in summary:
            continue
        s, b = summary[row], summary[base]
        if metric == "p50":
            value = s["p50_us"] / b["p50_us"]
            met, shown = value <= bound, f"{value:.2f}x (<= {bound:g}x)"
        elif metric == "mb_s":
            if MIB not in s["mb_s"] or MIB not in b["mb_s"]:
                continue
            value = s["mb_s"][MIB] / b["mb_s"][MIB]
            met, shown = value >= bound, f"{value:.0%} (>= {bound:.0%})"
        else:  # speedup: latency row/base, throughput base/row, for each size both have
            lat = s["p50_us"] / b["p50_us"]
            sizes = [z for z in SIZES if z in s["mb_s"] and z in b["mb_s"]]
            tput = {z: b["mb_s"][z] / s["mb_s"][z] for z in sizes}
            value = min([lat, *tput.values()])
            met = value >= bound
            shown = (f"p50 {lat:.1f}x, MB/s " + " ".join(
                f"{SIZE_LABELS[z]} {tput[z]:.1f}x" for z in sizes) + f" (>= {bound:g}x)")
        out.append({"target": label.strip(), "row": row, "base": base, "metric": metric,
                    "value": round(value, 3), "bound": bound, "met": met, "shown": shown,
                    "label": label})
    return out


# Plot colours: one per protection level / client, shared by gRPC, raw and the floors.
COLORS = {
    "grpc-tcp": "black", "tcp": "black", "grpc-tls": "tab:gray",
    "grpc-smb": "tab:blue", "npipe": "tab:blue", "smb2-echo": "tab:blue",
    "grpc-smb-signed": "tab:green", "npipe-signed": "tab:green",
    "smb2-echo-signed": "tab:green",
    "grpc-smb-unsigned": "tab:red", "npipe-unsigned": "tab:red",
    "smb2-echo-unsigned": "tab:red",
    "grpc-smbprotocol": "tab:purple", "smbprotocol": "tab:purple",
    "smbprotocol-signed": "tab:pink", "impacket": "tab:brown",
    "minimal": "tab:cyan", "minimal-signed": "tab:olive", "minimal-unsigned": "tab:orange",
}


def _style(t: str) -> str:
    """Dashed: the floors (TCP, bare SMB2 ECHO); dotted: the minimal client; solid: the
    clients measured."""
    if t.startswith("minimal"):
        return ":"
    return "--" if t.startswith(("smb2-echo", "tcp", "grpc-tcp", "grpc-tls")) else "-"


def plot_cdf(ax: Any, results: dict[str, Result], names: list[str], title: str) -> None:
    for t in names:
        pooled = sorted(x for rnd in results[t].latencies for x in rnd)
        if not pooled:
            continue
        ys = [(i + 1) / len(pooled) for i in range(len(pooled))]
        p50 = statistics.median(results[t].p50s())
        ax.plot(pooled, ys, _style(t), color=COLORS.get(t), label=f"{t} ({p50:.0f})",
                linewidth=1.4)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", linewidth=0.6, alpha=0.5)
    ax.axhline(0.99, color="grey", linewidth=0.6, alpha=0.5)
    ax.set_xlabel("round trip, us, log scale")
    ax.set_ylabel("fraction of round trips")
    ax.set_title(title, fontsize=10)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=7, title="transport (median p50, us)", title_fontsize=7)


def write_plot(path: str, results: dict[str, Result], info: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(2, 2, figsize=(15, 10), dpi=100)
    plot_cdf(axes[0][0], results, [t for t in GRPC_TRANSPORTS if t in results],
             f"gRPC unary, {UNARY_BYTES} B: latency CDF")
    plot_cdf(axes[0][1], results, [t for t in RAW_TRANSPORTS if t in results],
             f"raw {RAW_BYTES}-byte echo (smb2-echo: bare SMB2 ECHO; tcp: no SMB): CDF")
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax = axes[1][0]
    for t in RAW_TRANSPORTS:
        if t not in results or not TRANSPORTS[t].sizes:
            continue
        sizes = [s for s in TRANSPORTS[t].sizes if results[t].mbps(s)]
        meds = [statistics.median(results[t].mbps(s)) for s in sizes]
        lo = [m - min(results[t].mbps(s)) for s, m in zip(sizes, meds, strict=True)]
        hi = [max(results[t].mbps(s)) - m for s, m in zip(sizes, meds, strict=True)]
        ax.errorbar(sizes, meds, yerr=[lo, hi], marker="o", capsize=3, label=t,
                    linestyle=_style(t), color=COLORS.get(t))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(SIZES), [SIZE_LABELS[s] for s in SIZES])
    ax.yaxis.set_major_formatter(fmt)
    ax.set_xlabel("echo size (one echo at a time), log scale")
    ax.set_ylabel("MB/s, log scale (median of rounds; bars: min-max)")
    ax.set_title("raw echo throughput by message size", fontsize=10)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    names = [t for t in GRPC_TRANSPORTS if t in results and results[t].mbps(MIB)]
    meds = [statistics.median(results[t].mbps(MIB)) for t in names]
    lo = [m - min(results[t].mbps(MIB)) for t, m in zip(names, meds, strict=True)]
    hi = [max(results[t].mbps(MIB)) - m for t, m in zip(names, meds, strict=True)]
    bars = ax.bar(names, meds, yerr=[lo, hi], capsize=4, alpha=0.85,
                  color=[COLORS.get(t, "tab:blue") for t in names])
    ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    if "grpc-tcp" in names:
        ax.axhline(0.6 * meds[names.index("grpc-tcp")], color="tab:red", linewidth=1,
                   linestyle=":", label="60% of grpc-tcp (target)")
        ax.legend(fontsize=8)
    ax.set_ylabel("MB/s (median of rounds; bars: min-max)")
    ax.set_title("gRPC client stream of 1 MiB messages", fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    for label in ax.get_xticklabels():
        label.set_ha("right")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"commit {info.get('commit', '?')} on {info.get('hostname', '?')} | two network "
        f"namespaces over veth, Samba smbd {info.get('samba', '?')} | "
        f"{info['cpu_model']}, {info['nproc']} CPUs, Linux {info['kernel']}, "
        f"Python {info['python']}, grpcio {info['grpcio']}, {info['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


def report(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Result],
           client_info: dict[str, Any], server_stats: dict[str, Any],
           conc: dict[str, list[dict[str, Any]]],
           threads: dict[str, dict[str, list[dict[str, Any]]]], elapsed: float) -> int:
    summary = summarize(results)
    tsum = summarize_threads(threads)
    grpc_names = [t for t in GRPC_TRANSPORTS if t in results]
    raw_names = [t for t in RAW_TRANSPORTS if t in results]
    print()
    if grpc_names:
        print(format_grpc_table(summary, grpc_names))
        print()
    if raw_names:
        print(format_raw_tables(summary, raw_names))
        print()
    if conc:
        print(format_concurrency(conc, args))
        print()
    if tsum:
        print(format_threads(tsum, args))
        print()
    for t in args.names:
        negotiated = client_info.get(t) or {}
        extra = ", ".join(f"{v}" for v in negotiated.values())
        print(f"  {t:<19} {TRANSPORTS[t].description}" + (f" [{extra}]" if extra else ""))
    pipe_stats = server_stats.get("grpc-pipe")
    if pipe_stats:
        print(f"\n  grpc-pipe handler: caller() known on {pipe_stats['caller_checked']} of "
              f"{pipe_stats['calls']} calls (last: {pipe_stats['caller']})")
    targets = check_targets(summary)
    conc_errors = (sum(r["errors"] for rs in conc.values() for r in rs)
                   + sum(r["errors"] for cells in tsum.values() for r in cells.values()))
    if targets or conc:
        print("\ntargets:")
        for tg in targets:
            print(f"  {tg['label']:<34} {tg['row']:>18} vs {tg['base']:<18} "
                  f"{'met   ' if tg['met'] else 'MISSED'} {tg['shown']}")
        if "grpc-smb-many" in conc:
            rs = conc["grpc-smb-many"]
            print(f"  {'concurrent calls, errors':<34} {'grpc-smb-many':>18}    {'':<18} "
                  f"{'met   ' if not conc_errors else 'MISSED'} {conc_errors} errors in "
                  f"{sum(r['calls'] for r in rs)} calls (must be 0)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"({elapsed:.0f} s; load at the end {[round(x, 2) for x in load] if load else '?'})")
    if args.json:
        raw = {
            "machine": info,
            "config": {k: getattr(args, k) for k in
                       ("rounds", "calls", "streams", "msgs", "echoes", "warmup", "channels",
                        "per_channel", "conc_runs", "mt_channels", "mt_callers", "mt_calls",
                        "mt_rounds")},
            "negotiated": client_info,
            "summary": summary,
            "targets": targets,
            "concurrency": conc,
            "threads": {"summary": tsum, "raw": threads},
            "server_stats": server_stats,
            "raw": {t: {"latency_us": res.latencies,
                        "mb_s": {str(s): v for s, v in res.throughputs.items()}}
                    for t, res in results.items()},
        }
        Path(args.json).write_text(json.dumps(raw, separators=(",", ":")) + "\n")
        print(f"raw numbers written to {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, results, info)
    if conc_errors:
        print(f"FAILED: {conc_errors} concurrent call(s) failed", file=sys.stderr)
        return 1
    return 0


