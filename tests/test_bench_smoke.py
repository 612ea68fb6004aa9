"""Smoke tests: the benchmarks run end to end in --quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from npipe.testing.netns import require_root_and_samba

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_quick_prints_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "grpc_local.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"transport", "tcp", "unix", "npipe"} <= rows, proc.stdout
    assert "npipe/unix = " in proc.stdout


@pytest.mark.timeout(240)
def test_cross_host_bench_quick(tmp_path: Path) -> None:
    """Every transport measured, 1,000 concurrent calls on 50 pipes without an error
    (about 25 s; root and smbd, like the other cross-host tests)."""
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
    assert len(raw["summary"]) == 18, sorted(raw["summary"])
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
    for table in ("gRPC ", "raw 64 B echo ", "raw echo MB/s ", "concurrency ", "targets:"):
        assert table in proc.stdout, proc.stdout


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


def test_http_bench_local_quick(tmp_path: Path) -> None:
    """The same ASGI app through a local pipe and a plain Unix socket, requests counted
    (the pipe's app checks it got a caller on every request: an error fails the run)."""
    stdout, raw = _http_bench(tmp_path, "local", 120)
    assert set(raw["results"]["local"]) == {"pipe", "unix"}
    assert all(v > 0 for values in raw["results"]["local"].values() for v in values)
    assert "x unix" in stdout and ">= 0.95x" in stdout, stdout


@pytest.mark.timeout(240)
def test_http_bench_remote_and_forward_quick(tmp_path: Path) -> None:
    """Across two namespaces: the app through a remote pipe and over TCP, and npipe
    forward's echo throughput next to the direct client's."""
    require_root_and_samba()
    stdout, raw = _http_bench(tmp_path, "remote,forward", 200)
    assert set(raw["results"]["remote"]) == {"smb", "tcp"}
    assert set(raw["results"]["forward"]) == {"forward", "direct"}
    assert "x tcp" in stdout and "x direct" in stdout, stdout
