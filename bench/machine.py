"""What every benchmark records about the code and the machine it measured.

``machine_info()`` is printed as the first line of every run (``header()``) and stored
under ``"machine"`` in every ``--json`` file: the commit of the code under test (and
whether the work tree had changes), the host, CPU, kernel, Debian release, Python,
grpcio and Samba versions, the date and the load at the start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The checked-out commit (short), '+dirty' if tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head.strip() + ("+dirty" if dirty else "")


def git_branch() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--abbrev-ref", "HEAD"],
                              capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    return "?"


def samba_version() -> str:
    smbd = shutil.which("smbd") or shutil.which("smbd", path="/usr/sbin:/sbin")
    if smbd is None:
        return "-"
    with contextlib.suppress(Exception):
        out = subprocess.run([smbd, "-V"], capture_output=True, text=True, timeout=10).stdout
        return out.split()[-1]
    return "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _debian() -> str:
    with contextlib.suppress(OSError):
        return Path("/etc/debian_version").read_text().strip()
    return "-"


def _dist(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def machine_info() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "commit": git_commit(),
        "branch": git_branch(),
        "hostname": socket.gethostname(),
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "debian": _debian(),
        "python": platform.python_version(),
        "grpcio": _dist("grpcio"),
        "samba": samba_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
    }


def header(info: dict[str, Any]) -> str:
    """The first line of a run's output: the code and the machine."""
    return (f"# commit {info['commit']} ({info['branch']}) | host {info['hostname']} | "
            f"{info['cpu_model']} | nproc {info['nproc']} | Linux {info['kernel']} | "
            f"Debian {info['debian']} | Python {info['python']} | grpcio {info['grpcio']} | "
            f"Samba {info['samba']} | {info['date']} | load {info['loadavg_at_start']}")
