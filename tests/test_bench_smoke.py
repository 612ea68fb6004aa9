"""Smoke test: the local benchmark runs end to end in --quick mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "grpc_local.py"


def test_bench_quick_prints_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"transport", "tcp", "unix", "npipe"} <= rows, proc.stdout
    assert "npipe/unix = " in proc.stdout
