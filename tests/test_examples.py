"""The readable examples in examples/buy run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from served import wait_for_pipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "buy"


def test_example_server_and_client(pipe_dir: Path) -> None:
    server = subprocess.Popen([sys.executable, str(EXAMPLES / "server.py")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_pipe("shop", server)
        client = [sys.executable, str(EXAMPLES / "client.py")]
        ok = subprocess.run([*client, "--id", "fig", "--quantity", "5", "--price", "3"],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith("bought 5 x 'fig' for 15 (caller: ")
        bad = subprocess.run([*client, "--quantity", "0"], capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode == 1
        assert bad.stdout.strip() == "Buy failed: INVALID_ARGUMENT: quantity must be positive"
    finally:
        server.terminate()
        server.wait(10)
