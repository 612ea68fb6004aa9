"""Waiting for a pipe that a server in another process is starting."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from npipe.address import parse_address
from npipe.errors import PipeNotFound
from npipe.local.dial import find_socket
from npipe.local.listener import is_live


def wait_for_pipe(name: str, proc: subprocess.Popen[str] | None = None,
                  timeout: float = 30.0) -> Path:
    """The socket of local pipe ``name`` once something listens there, found as this
    process's clients find it (machine-wide name, pipe directory, .NET's path); fails if
    ``proc`` (its server) exits first or ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path = find_socket(parse_address(name))
            if is_live(path):
                return path
        except PipeNotFound:
            pass
        if proc is not None:
            assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"nothing serves pipe {name} after {timeout} s"
        time.sleep(0.05)
