"""Trust checks on local paths: symbolic links on the way, probes that must not hang."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_support import ensure_test_users, require_root

import npipe
from npipe.local.listener import claim, is_live
from npipe.local.paths import check_trusted_path


@contextlib.contextmanager
def _listener(path: Path, backlog: int = 16) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    sock.listen(backlog)
    try:
        yield sock
    finally:
        sock.close()


def _fill_backlog(path: Path) -> list[socket.socket]:
    """Connect until the listener's backlog is full (it never accepts)."""
    clients = []
    for _ in range(4096):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(os.fspath(path))
        except BlockingIOError:
            c.close()
            return clients
        clients.append(c)
    raise AssertionError("the backlog never filled")


def test_a_full_backlog_cannot_hang_a_liveness_probe_or_a_claim(pipe_dir: Path) -> None:
    pipe_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = pipe_dir / "busy"
    with _listener(path, backlog=0):
        clients = _fill_backlog(path)
        try:
            started = time.monotonic()
            assert is_live(path)  # busy is live
            with pytest.raises(npipe.PipeInUse):
                claim(path, pipe_dir)
            assert time.monotonic() - started < 2.0
        finally:
            for c in clients:
                c.close()


def test_a_dead_socket_is_not_live(pipe_dir: Path) -> None:
    pipe_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = pipe_dir / "dead"
    with _listener(path):
        assert is_live(path)
    assert not is_live(path)  # the file is still there, nobody listens
    assert not is_live(pipe_dir / "absent")


def test_a_symlinked_parent_that_another_user_planted_is_refused() -> None:
    """Walked with lstat: /tmp/LINK -> a root directory is refused when LINK is another
    user's (who could repoint it later: at a grpcio re-dial, say), though everything
    that LINK points at is root's. Resolving the path first would have hidden it."""
    require_root()
    other = ensure_test_users()["npipe-t1"]
    with tempfile.TemporaryDirectory(prefix="npt", dir="/tmp") as d:
        real = Path(d) / "real"
        real.mkdir(mode=0o755)
        link = Path(d + "-link")
        os.symlink(real, link)
        try:
            with _listener(real / "sock"):
                check_trusted_path(real / "sock", {0})  # the real path is trusted
                check_trusted_path(link / "sock", {0})  # so is a link that root made
                os.lchown(link, other.uid, other.gid)
                with pytest.raises(npipe.AccessDenied, match="symbolic link"):
                    check_trusted_path(link / "sock", {0})
        finally:
            link.unlink()


def test_a_directory_others_can_write_is_refused(pipe_dir: Path) -> None:
    pipe_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _listener(pipe_dir / "s"):
        check_trusted_path(pipe_dir / "s", {os.getuid(), 0})
        os.chmod(pipe_dir, 0o777)
        with pytest.raises(npipe.AccessDenied, match="can be changed by other users"):
            check_trusted_path(pipe_dir / "s", {os.getuid(), 0})
        os.chmod(pipe_dir, 0o1777)  # sticky: others cannot swap our socket
        check_trusted_path(pipe_dir / "s", {os.getuid(), 0})
