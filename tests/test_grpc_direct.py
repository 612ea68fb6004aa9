"""add_pipe_port(caller_identity=False): grpcio's own socket under the pipe's name."""

from __future__ import annotations

import os
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import npipe.grpc
from npipe import Acl, ConfigError, PipeInUse


def _server(seen: list[object]) -> grpc.Server:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(npipe.grpc.caller(context))
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handlers = {"E": grpc.unary_unary_rpc_method_handler(echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    return server


def test_direct_pipe_serves_without_identity(pipe_dir: Path, fresh_machine_dir: Path) -> None:
    # Published machine-wide where that directory exists (made here for root), with its
    # backend socket beside it (a hard link: the same file system); else the pipe dir.
    where = fresh_machine_dir / f".u{os.geteuid()}" if fresh_machine_dir.exists() else pipe_dir
    seen: list[object] = []
    server = _server(seen)
    port = npipe.grpc.add_pipe_port(server, "Fast", caller_identity=False)
    server.start()
    try:
        assert port.path == where / "fast"
        assert stat.S_ISSOCK(os.lstat(port.path).st_mode)
        assert stat.S_IMODE(os.lstat(port.path).st_mode) == 0o600  # the kernel's ACL
        with npipe.grpc.channel("fast") as ch:
            assert ch.unary_unary("/t.S/E")(b"ping", timeout=10) == b"ping"
        assert seen == [None]  # no front door, no caller
        other = _server([])
        with pytest.raises(PipeInUse):
            npipe.grpc.add_pipe_port(other, "fast", caller_identity=False)
        other.stop(None)
    finally:
        server.stop(None).wait()
    assert not port.path.exists()
    assert [p for d in {pipe_dir, where} for p in d.iterdir()] == []  # lock files included
    assert not os.path.lexists(fresh_machine_dir / "fast")


def test_direct_pipe_refuses_an_acl(pipe_dir: Path) -> None:
    server = _server([])
    with pytest.raises(ConfigError, match="caller_identity=True"):
        npipe.grpc.add_pipe_port(
            server, "x", acl=Acl.allow(users=[12345]), caller_identity=False
        )
    server.stop(None)
    assert not (pipe_dir / "x").exists()
