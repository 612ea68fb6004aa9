"""What users install: the built wheel and sdist, in clean virtual environments.

``pip install npipe`` (the core) has no grpcio, hypercorn or httpx, and its gRPC and HTTP
parts say in one line which extra to install; ``npipe[grpc]`` runs the demo (the
README's first thing); the sdist builds and installs too; both carry the LICENSE.

The wheel and sdist are built with ``python -m build`` from a copy of the checkout (its
build backend comes from the package index, as for any user); the venvs install from
pip's cache and index (PIP_FIND_LINKS where a machine sets it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from npipe.testing.netns import skip_or_fail

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# What the extras bring and the core must not (distribution names).
NOT_IN_CORE = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf",
               "hypercorn", "httpx", "httpcore", "h2")
# Not copied into the build: caches, earlier builds, a local venv, git's own files.
IGNORED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                 ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                 ".hypothesis")


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


def _run(*args: str | Path, timeout: float = 300,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # The venvs import what they installed: not this checkout's src/, nor a user site.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_ROOT_USER_ACTION="ignore", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONNOUSERSITE="1")
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The checkout's wheel and sdist, built as a user or a release would build them."""
    try:
        import build  # noqa: F401  (the test extra's)
    except ImportError:
        skip_or_fail("python -m build is not installed (pip install '.[test]')")
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    out = tmp / "out"
    # sdist first, then the wheel from the sdist: what the sdist lacks, the wheel lacks.
    r = _run(sys.executable, "-m", "build", "--outdir", out, source)
    if r.returncode != 0:
        skip_or_fail(f"python -m build failed (no package index for its setuptools?): "
                     f"{r.stderr.strip().splitlines()[-1:]}")
    wheels = list(out.glob(f"npipe-{VERSION}-*.whl"))
    sdists = list(out.glob(f"npipe-{VERSION}.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return Dist(wheels[0], sdists[0])


def _venv(where: Path, *install: str | Path) -> Path:
    """A clean venv at ``where`` with ``install`` pip-installed; its bin directory."""
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    bin_dir = where / ("Scripts" if sys.platform == "win32" else "bin")
    r = _run(bin_dir / "python", "-m", "pip", "install", "-q", *install)
    if r.returncode != 0:
        skip_or_fail(f"pip could not install {install} (no package index?): "
                     f"{r.stderr.strip().splitlines()[-1:]}")
    return bin_dir


def _installed(bin_dir: Path) -> set[str]:
    r = _run(bin_dir / "python", "-c",
             "import importlib.metadata as m\n"
             "print('\\n'.join(d.metadata['Name'] for d in m.distributions()))")
    assert r.returncode == 0, r.stderr
    return {re.sub(r"[-_.]+", "-", name).lower() for name in r.stdout.split()}


def _size_mb(where: Path) -> float:
    return sum(p.stat().st_size for p in where.rglob("*") if p.is_file()) / 1e6


def test_wheel_and_sdist_carry_the_license_and_say_what_they_need(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = wheel.namelist()
        info = f"npipe-{VERSION}.dist-info"
        metadata = wheel.read(f"{info}/METADATA").decode()
        licenses = [n for n in names if n.startswith(f"{info}/licenses/")]
        assert licenses == [f"{info}/licenses/LICENSE"], names
        assert wheel.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
        assert "npipe/py.typed" in names and "npipe/examples/buy/buy.proto" in names
    assert "License-Expression: MIT" in metadata
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    core = sorted(r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip()
                  for r in requires if "extra ==" not in r)
    assert core == ["cryptography", "pyspnego", "tomli"], requires
    for extra in ("grpc", "http", "all", "smbprotocol", "test"):
        assert f"Provides-Extra: {extra}" in metadata
    with tarfile.open(dist.sdist) as sdist:
        top = f"npipe-{VERSION}"
        members = sdist.getnames()
        assert f"{top}/LICENSE" in members and f"{top}/pyproject.toml" in members
        assert f"{top}/src/npipe/extras.py" in members


CORE_PROBE = """
import importlib.metadata as m, json, npipe, npipe.blocking, npipe.connection, npipe.bridges
import npipe.cli
assert npipe.__version__ == m.version("npipe")
assert npipe.Credentials.__module__ == "npipe.smb.credentials"
out = {}
for module in ("npipe.grpc", "npipe.http", "npipe.examples.buy.service"):
    try:
        __import__(module)
    except ImportError as e:
        out[module] = [type(e).__name__, str(e)]
# Not only imported: a byte pipe and a message pipe carry bytes with the core alone.
import threading
from npipe import connection
with npipe.create_server("pkgcore") as server:
    def echo():
        conn, _caller = server.accept()
        with conn:
            conn.sendall(conn.recv(100))
    threading.Thread(target=echo).start()
    with npipe.connect("pkgcore", timeout=10) as sock:
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
with connection.Listener("pkgmsg") as listener:
    def reply():
        with listener.accept() as conn:
            conn.send_bytes(conn.recv_bytes()[::-1])
    threading.Thread(target=reply).start()
    with connection.Client("pkgmsg") as conn:
        conn.send_bytes(b"abc")
        assert conn.recv_bytes() == b"cba"
print(json.dumps(out))
"""


def test_core_install_has_no_grpc_or_http_and_says_which_extra(
    dist: Dist, tmp_path: Path, pipe_dir: Path,
) -> None:
    """``pip install npipe``: raw streams, blocking sockets and message pipes import;
    gRPC and HTTP are not installed, and asking for them says what to install."""
    bin_dir = _venv(tmp_path / "core", dist.wheel)
    installed = _installed(bin_dir)
    assert not installed & set(NOT_IN_CORE), installed & set(NOT_IN_CORE)
    assert {"npipe", "cryptography", "pyspnego"} <= installed
    print(f"core install: {len(installed)} distributions, {_size_mb(tmp_path / 'core'):.0f} MB")

    r = _run(bin_dir / "python", "-c", CORE_PROBE, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    refused = json.loads(r.stdout)
    assert refused == {
        "npipe.grpc": ["MissingExtra", "npipe.grpc needs the grpc extra: "
                       "pip install 'npipe[grpc]'"],
        "npipe.http": ["MissingExtra", "npipe.http needs the http extra: "
                       "pip install 'npipe[http]'"],
        "npipe.examples.buy.service": ["MissingExtra", "the Buy example needs the grpc "
                                       "extra: pip install 'npipe[grpc]'"],
    }

    npipe = bin_dir / "npipe"
    for command, extra in [(["serve-grpc", "--pipe", "x", "mod:fn"], "grpc"),
                           (["demo"], "grpc"), (["call", "x", "a.B/C"], "grpc"),
                           (["http", "x", "/"], "http"), (["serve-asgi", "mod:app"], "http")]:
        r = _run(npipe, *command, timeout=60)
        assert (r.returncode, r.stdout) == (2, ""), (command, r)
        assert r.stderr == (f"npipe {command[0]} needs the {extra} extra: "
                            f"pip install 'npipe[{extra}]'\n"), command
    r = _run(npipe, "--version", timeout=60)
    assert (r.returncode, r.stdout) == (0, f"npipe {VERSION}\n"), r
    r = _run(npipe, "ls", timeout=60)  # a command of the core runs
    assert r.returncode == 0 and "no pipes in" in r.stdout, r


def test_grpc_extra_runs_the_demo(dist: Dist, tmp_path: Path, pipe_dir: Path) -> None:
    """``pip install 'npipe[grpc]'`` (here from the wheel) serves the example on a pipe
    and calls it through it, and brings no HTTP server."""
    bin_dir = _venv(tmp_path / "grpc", f"{dist.wheel}[grpc]")
    installed = _installed(bin_dir)
    assert {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf"} <= installed
    assert not installed & {"hypercorn", "httpx", "httpcore"}, installed
    r = _run(bin_dir / "npipe", "demo", "--pipe", "pkgdemo", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bought 3 x 'apple' for 30 (caller: " in r.stdout, r.stdout
    r = _run(bin_dir / "npipe", "http", "x", "/", timeout=60)
    assert (r.returncode, r.stderr) == (2, "npipe http needs the http extra: "
                                           "pip install 'npipe[http]'\n"), r


def test_sdist_installs(dist: Dist, tmp_path: Path) -> None:
    """The sdist builds (its own wheel) and installs; the command runs."""
    bin_dir = _venv(tmp_path / "sdist", dist.sdist)
    r = _run(bin_dir / "npipe", "--version", timeout=60)
    assert (r.returncode, r.stdout) == (0, f"npipe {VERSION}\n"), r
    r = _run(bin_dir / "python", "-c", "import npipe.connection, npipe.blocking",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_version_is_the_installed_distributions() -> None:
    """``npipe --version`` of the installed package, as pip knows it."""
    from importlib import metadata

    import npipe

    r = subprocess.run([sys.executable, "-m", "npipe", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"npipe {metadata.version('npipe')}\n"), r
    assert npipe.__version__ == metadata.version("npipe") == VERSION

