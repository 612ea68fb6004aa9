"""Smoke tests: the benchmarks run end to end in --quick mode and print their tables.

Not performance checks: whether a run meets a bench's targets is not asserted (a quick run
on a shared machine says nothing about that), only that the run works and its output has
the structure it should, with numbers where numbers belong."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from npipe.testing.netns import require_root_and_samba

BENCH = Path(__file__).resolve().parent.parent / "bench"


GRPC_ROW = re.compile(
    r"(?P<name>\S+) +(?P<p50>\d+\.\d) +(?P<p99>\d+\.\d) +(?P<mb_s>\d+) +"
    r"(?P<p50_r>\d+\.\d\d)x +(?P<p99_r>\d+\.\d\d)x +(?P<mb_s_r>\d+\.\d\d)x +"
    r"(?P<lo>\d+\.\d\d)-(?P<hi>\d+\.\d\d)x"
)


def test_bench_quick_runs_and_prints_its_table() -> None:
    """A smoke test, not a performance check: grpc_local.py --quick runs every transport
    and prints its table, a row of numbers for each, with the ratios to unix."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "grpc_local.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("transport ")]
    assert len(heads) == 1, proc.stdout
    head = heads[0]
    assert lines[head].split() == ["transport", "p50", "us", "p99", "us", "MB/s", "p50/unix",
                                   "p99/unix", "MB/s/unix", "p50/unix", "per", "round"]
    assert lines[head + 1] == "-" * len(lines[head]), proc.stdout
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        match = GRPC_ROW.fullmatch(line.rstrip())
        assert match, f"not a row of the table: {line!r}"
        rows[match["name"]] = match
    assert list(rows) == ["tcp", "unix", "npipe", "npipe-direct"], proc.stdout
    unix = rows["unix"]
    assert (unix["p50_r"], unix["p99_r"], unix["mb_s_r"]) == ("1.00", "1.00", "1.00")
    assert all(float(r["p50"]) <= float(r["p99"]) for r in rows.values()), proc.stdout
    npipe = rows["npipe"]
    assert (f"\nnpipe/unix = {npipe['p50_r']}x p50 latency, {npipe['p99_r']}x p99, "
            f"{npipe['mb_s_r']}x throughput   (") in proc.stdout, proc.stdout


@pytest.mark.timeout(240)
def test_cross_host_bench_quick(tmp_path: Path) -> None:
    """Every transport measured, 1,000 concurrent calls on 50 pipes without an error,
    the threads section's cells; the tables print and parse (about 40 s; root and smbd,
    like the other cross-host tests)."""
    require_root_and_samba()
    out = tmp_path / "cross-host.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "cross_host.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = json.loads(out.read_text())
    assert set(raw["summary"]) == set(raw["negotiated"]), raw["negotiated"]
    assert len(raw["summary"]) == 20, sorted(raw["summary"])
    neg = raw["negotiated"]
    for name in ("grpc-smb-unsigned", "npipe-unsigned", "smb2-echo-unsigned",
                 "minimal-unsigned"):
        assert neg[name] == {"dialect": "2.1", "security": "unsigned"}
    # The same security for every client compared with npipe: 3.1.1, encrypted by default.
    for name in ("npipe", "minimal", "smbprotocol", "impacket"):
        assert neg[name]["dialect"] == "3.1.1", neg
        assert neg[name]["security"].startswith("encrypted"), neg
    for name in ("npipe-signed", "minimal-signed", "smbprotocol-signed"):
        assert neg[name]["security"].startswith("signed"), neg
    assert raw["machine"]["commit"] not in ("", "?"), raw["machine"]
    assert raw["machine"]["samba"] not in ("", "-", "?"), raw["machine"]
    smb = raw["concurrency"]["grpc-smb-many"][0]
    assert (smb["calls"], smb["errors"]) == (1000, 0), smb
    assert (smb["smb_connections"], smb["pipes"]) == (1, 50), smb
    assert raw["concurrency"]["grpc-tcp-many"][0]["errors"] == 0
    for table in ("gRPC ", "raw 64 B echo ", "raw echo MB/s ", "concurrency ", "threads ",
                  "targets:"):
        assert table in proc.stdout, proc.stdout
    assert neg["grpc-tls"]["security"].startswith("TLS (TLSv1.3"), neg
    _check_cross_grpc_table(proc.stdout, raw["summary"])
    _check_threads_table(proc.stdout, raw["threads"])


HOPS_ROW = re.compile(r"(?P<name>grpc-\S+) +(?P<p50>\d+)" + r" +\d+" * 6)


@pytest.mark.timeout(240)
def test_hops_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    """hops.py (CPU per call by process) runs its four clients and prints a row of
    numbers for each: the redirector's column has CPU for grpc-smb only, the TCP
    clients spend none in smbd. Not a performance check."""
    require_root_and_samba()
    out = tmp_path / "hops.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "hops.py"), "--rounds", "1", "--calls", "400",
         "--json", str(out)],
        capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {m["name"]: m for line in proc.stdout.splitlines()
            if (m := HOPS_ROW.fullmatch(line.rstrip()))}
    assert list(rows) == ["grpc-tcp", "grpc-tls", "grpc-smb", "grpc-smb-inproc"], proc.stdout
    cpu = {name: rounds[0]["cpu_us"] for name, rounds in
           json.loads(out.read_text())["results"].items()}
    assert all(c["client"] > 0 and c["server"] > 0 for c in cpu.values()), cpu
    # (utime and stime are sampled at each clock tick: a process that woke once may be
    # charged a tick, so "none" is "less than half of the one that does the work")
    relayed = cpu["grpc-smb"]["redirector"]
    assert relayed > 0 and all(cpu[t]["redirector"] < relayed / 2 for t in cpu
                               if t != "grpc-smb"), cpu
    smbd = min(cpu["grpc-smb"]["smbd"], cpu["grpc-smb-inproc"]["smbd"])
    assert smbd > 0 and all(cpu[t]["smbd"] < smbd / 2 for t in ("grpc-tcp", "grpc-tls")), cpu


ECHO_TURNS_RATIO = re.compile(
    r"(?P<name>npipe(?:-old-reads)?) / minimal: 64 B (?P<r64>[\d.]+)x \[[\d.]+-[\d.]+\], "
    r"4 KiB [\d.]+x \[[\d.]+-[\d.]+\], 64 KiB [\d.]+x \[[\d.]+-[\d.]+\], "
    r"1 MiB [\d.]+x \[[\d.]+-[\d.]+\]")


@pytest.mark.timeout(240)
def test_echo_turns_bench_runs_and_prints_its_ratios() -> None:
    """echo_turns.py runs npipe, npipe with the old READ timing and the minimal client
    in one process and prints a ratio line for each npipe, and its stall counts. Not a
    performance check."""
    require_root_and_samba()
    proc = subprocess.run(
        [sys.executable, str(BENCH / "echo_turns.py"), "--turns", "1", "--old-reads"],
        capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [m["name"] for line in proc.stdout.splitlines()
             if (m := ECHO_TURNS_RATIO.fullmatch(line.rstrip()))]
    assert names == ["npipe", "npipe-old-reads"], proc.stdout
    assert "took over 2 ms" in proc.stdout and "minimal" in proc.stdout, proc.stdout


FRONTDOOR_ROW = re.compile(
    r" +(?P<threads>\d+) +(?P<inproc>\d+) \[\d+-\d+\] +(?P<own>\d+) \[\d+-\d+\]"
    r" +(?P<ratio>[\d.]+)x \[[\d.]+-[\d.]+\]")


@pytest.mark.timeout(240)
def test_frontdoor_process_bench_runs_and_prints_its_table() -> None:
    """frontdoor_process.py serves the same service with the Samba front door in and out
    of grpcio's process and prints a row per thread count. Not a performance check."""
    require_root_and_samba()
    proc = subprocess.run(
        [sys.executable, str(BENCH / "frontdoor_process.py"), "--rounds", "1", "--calls",
         "300", "--threads", "1,8"],
        capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [m for line in proc.stdout.splitlines() if (m := FRONTDOOR_ROW.fullmatch(line))]
    assert [int(m["threads"]) for m in rows] == [1, 8], proc.stdout
    assert all(int(m["inproc"]) > 0 and int(m["own"]) > 0 for m in rows), proc.stdout


# cross_host.py's gRPC table: a row per transport, its ratios to grpc-tcp; the encrypted
# pipes' rows are followed by a line of their ratios to grpc-tls.
CROSS_GRPC_ROW = re.compile(
    r"(?P<name>grpc-\S+) +(?P<p50>\d+) +(?P<p99>\d+) +(?P<mb_s>\d+)"
    r"(?:   (?P<vs>grpc-tcp) +(?P<p50_r>\d+\.\d\d)x +(?P<p99_r>\d+\.\d\d)x +"
    r"(?P<mb_s_r>\d+\.\d\d)x +(?P<lo>\d+\.\d\d)-(?P<hi>\d+\.\d\d)x)?"
)
CROSS_GRPC_ALSO = re.compile(
    r" {49}(?P<vs>grpc-tls) +(?P<p50_r>\d+\.\d\d)x +(?P<p99_r>\d+\.\d\d)x +"
    r"(?P<mb_s_r>\d+\.\d\d)x +(?P<lo>\d+\.\d\d)-(?P<hi>\d+\.\d\d)x"
)


def _table(stdout: str, first_word: str) -> list[str]:
    """The lines of the table whose header starts with ``first_word``, up to a blank."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_word])
    assert lines[head + 1] == "-" * len(lines[head]), stdout
    body = []
    for line in lines[head + 2:]:
        if not line.strip():
            break
        body.append(line.rstrip())
    return body


def _check_cross_grpc_table(stdout: str, summary: dict[str, Any]) -> None:
    rows: dict[str, Any] = {}
    also: dict[str, Any] = {}
    for line in _table(stdout, "gRPC"):
        match = CROSS_GRPC_ROW.fullmatch(line)
        if match:
            rows[match["name"]] = match
            continue
        match = CROSS_GRPC_ALSO.fullmatch(line)
        assert match and rows, f"not a row of the gRPC table: {line!r}"
        also[list(rows)[-1]] = match
    assert list(rows) == ["grpc-tcp", "grpc-tls", "grpc-smb", "grpc-smb-inproc",
                          "grpc-smb-signed", "grpc-smb-unsigned", "grpc-smbprotocol"], stdout
    assert rows["grpc-tcp"]["vs"] is None
    assert all(rows[t]["vs"] == "grpc-tcp" for t in list(rows)[1:]), stdout
    # Like with like: the encrypted pipes against TLS too, the others against TCP only.
    assert set(also) == {"grpc-smb", "grpc-smb-inproc", "grpc-smbprotocol"}, stdout
    for name, match in also.items():
        row = summary[name]
        assert match["p50_r"] == f"{row['also_p50_ratio']:.2f}", match.string
        ratio = row["p50_us"] / summary["grpc-tls"]["p50_us"]
        assert match["p50_r"] == f"{ratio:.2f}", (match.string, summary["grpc-tls"])
        assert float(match["lo"]) <= float(match["hi"]), match.string


THREADS_ROW = re.compile(
    r" {8} +(?P<channels>\d+) +(?P<callers>\d+)  (?P<name>grpc-\S+) +(?P<calls_s>\d+) +"
    r"(?:(?P<tcp>\d+\.\d\d)x|-) +(?:(?P<tls>\d+\.\d\d)x|-)   "
    r"(?:(?P<tcp_lo>\d+\.\d\d)-(?P<tcp_hi>\d+\.\d\d)x|-) +"
    r"(?:(?P<tls_lo>\d+\.\d\d)-(?P<tls_hi>\d+\.\d\d)x|-) +(?P<errors>\d+)"
)


def _check_threads_table(stdout: str, threads: dict[str, Any]) -> None:
    """The threads section: 1 and 8 channels x 1, 8 and 32 callers, calls/s for each
    transport, the pipes' ratios to TCP and TLS; what the JSON says; no errors; and the
    8-channel cells ran on 8 pipes of one SMB connection."""
    body = _table(stdout, "threads")
    rows = {}
    for line in body:
        if line.startswith("(SMB connections"):
            continue
        match = THREADS_ROW.fullmatch(line)
        assert match, f"not a row of the threads table: {line!r}"
        rows[match["channels"], match["callers"], match["name"]] = match
    names = ["grpc-tcp", "grpc-tls", "grpc-smb", "grpc-smb-inproc", "grpc-smb-signed"]
    assert list(rows) == [(ch, n, t) for ch in ("1", "8") for n in ("1", "8", "32")
                          for t in names], stdout
    summary = threads["summary"]
    for (ch, n, t), row in rows.items():
        cell = summary[t][f"{ch}x{n}"]
        assert row["calls_s"] == f"{cell['calls_s']:.0f}" and int(row["errors"]) == 0
        assert (row["tcp"] is None) == (t == "grpc-tcp"), row.string
        assert (row["tls"] is None) == (t in ("grpc-tcp", "grpc-tls")), row.string
        if row["tcp"] is not None:
            tcp = summary["grpc-tcp"][f"{ch}x{n}"]["calls_s"]
            assert row["tcp"] == f"{cell['calls_s'] / tcp:.2f}", row.string
    for t in ("grpc-smb", "grpc-smb-inproc", "grpc-smb-signed"):
        for n in ("1", "8", "32"):
            last = threads["raw"][t][f"8x{n}"][-1]
            assert (last["smb_connections"], last["pipes"]) == (1, 8), last


def _http_bench(tmp_path: Path, parts: str, timeout: float) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "http.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "http_rps.py"), "--quick", "--parts", parts,
         "--json", str(out)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw: dict[str, Any] = json.loads(out.read_text())
    assert raw["machine"]["commit"] not in ("", "?"), raw["machine"]
    return proc.stdout, raw


# http_rps.py's table: a header, then one row per part and transport; the row of the
# transport that has a target also gives its ratio to the other one and the verdict.
HTTP_HEADER = ("part     transport     median      p10-p90 over rounds  "
               "ratio (per-round p10-p90)    target")
HTTP_ROW = re.compile(
    r"(?P<part>\S+) +(?P<name>\S+) +(?P<median>\d+) +(?P<p10>\d+)-(?P<p90>\d+) +"
    r"(?P<unit>req/s|MB/s)"
    r"(?: +(?P<ratio>\d+\.\d\d)x (?P<base>\S+) \((?P<r10>\d+\.\d\d)-(?P<r90>\d+\.\d\d)\)"
    r"   >= (?P<target>\d+(?:\.\d+)?)x: (?P<verdict>met|MISSED))?"
)


def _check_http_table(stdout: str, raw: dict[str, Any],
                      parts: dict[str, tuple[str, str, str, float]]) -> None:
    """The table is there, with a well-formed row of numbers for each part's transports,
    and says what the JSON says: the medians, the ratio, and the verdict that follows
    from it. ``parts``: part -> (transport with a target, the other, unit, target).
    Whether a target is met is not checked (a --quick run on a busy machine says
    nothing about that): only that the verdict is there and agrees with the ratio."""
    lines = stdout.splitlines()
    assert HTTP_HEADER in lines, stdout
    body = [line.rstrip() for line in lines[lines.index(HTTP_HEADER) + 1:] if line.strip()]
    assert len(body) == 2 * len(parts), stdout
    rows = {}
    for line in body:
        match = HTTP_ROW.fullmatch(line)
        assert match, f"not a row of the table: {line!r}"
        rows[match["part"], match["name"]] = match
    assert set(rows) == {(part, name) for part, (this, base, _u, _t) in parts.items()
                         for name in (this, base)}, stdout
    for part, (this, base, unit, target) in parts.items():
        values = raw["results"][part]
        for name in (this, base):
            row = rows[part, name]
            assert row["unit"] == unit, row.string
            assert row["median"] == f"{statistics.median(values[name]):.0f}", row.string
            assert int(row["p10"]) <= int(row["median"]) <= int(row["p90"]), row.string
            assert (row["ratio"] is None) == (name == base), row.string
        row = rows[part, this]
        ratio = statistics.median(values[this]) / statistics.median(values[base])
        assert row["ratio"] == f"{ratio:.2f}", row.string
        assert float(row["r10"]) <= float(row["r90"]), row.string
        assert (row["base"], float(row["target"])) == (base, target), row.string
        assert row["verdict"] == ("met" if ratio >= target else "MISSED"), row.string


def test_http_bench_local_quick_runs_and_prints_its_table(tmp_path: Path) -> None:
    """A smoke test, not a performance check: http_rps.py --quick runs the same ASGI app
    through a local pipe and a plain Unix socket, counts requests (the pipe's app checks
    it got a caller on every request: an error fails the run) and prints its table."""
    stdout, raw = _http_bench(tmp_path, "local", 120)
    assert set(raw["results"]["local"]) == {"pipe", "unix"}
    assert all(v > 0 for values in raw["results"]["local"].values() for v in values)
    _check_http_table(stdout, raw, {"local": ("pipe", "unix", "req/s", 0.95)})


@pytest.mark.timeout(240)
def test_http_bench_remote_and_forward_quick_runs_and_prints_its_table(
    tmp_path: Path,
) -> None:
    """A smoke test, not a performance check: across two namespaces, the app through a
    remote pipe and over TCP, and npipe forward's echo throughput next to the direct
    client's; the run ends well and prints its table."""
    require_root_and_samba()
    stdout, raw = _http_bench(tmp_path, "remote,forward", 200)
    assert set(raw["results"]["remote"]) == {"smb", "tcp"}
    assert set(raw["results"]["forward"]) == {"forward", "direct"}
    assert all(v > 0 for part in ("remote", "forward")
               for values in raw["results"][part].values() for v in values)
    _check_http_table(stdout, raw, {"remote": ("smb", "tcp", "req/s", 0.6),
                                    "forward": ("forward", "direct", "MB/s", 0.8)})
