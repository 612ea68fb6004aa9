"""What each ``npipe`` subcommand does; the parser lives in ``npipe.cli``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import npipe
from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress, parse_address
from npipe.cli.dial import closed_before_answering
from npipe.errors import ConfigError, NpipeError
from npipe.local.paths import pipe_dir

if TYPE_CHECKING:  # the gRPC commands import it when they run: ls and setup need no grpc
    import grpc


def demo(args: argparse.Namespace) -> int:
    address = parse_address(args.pipe)
    acl = Acl.parse(args.acl) if args.acl else OWNER_ONLY
    if not args.smb:
        return _demo(args, address, acl, address, {})
    return _demo_over_smb(args, address, acl)


def _demo_over_smb(args: argparse.Namespace, address: PipeAddress, acl: Acl) -> int:
    """The demo through a private smbd on loopback: serve NAME, call //127.0.0.1/pipe/NAME."""
    import secrets
    import tempfile

    from npipe.samba.smbd import PrivateSmbd
    from npipe.smb.credentials import Credentials

    if os.geteuid() != 0:
        raise NpipeError("npipe demo --smb starts a private smbd and needs root")
    user, password = "npipe-demo", secrets.token_urlsafe(12)
    made_user = not _account_exists(user)  # PrivateSmbd makes the Unix account if missing
    workdir = tempfile.mkdtemp(prefix="npipe-demo-", dir="/tmp")
    try:
        smbd = PrivateSmbd(Path(workdir), port=args.smb_port, users={user: password})
        with smbd:
            os.environ["NPIPE_SAMBA_NP_DIR"] = str(smbd.np_dir)
            made = " (a Unix account made for the demo, removed at its end)" if made_user else ""
            print(f"private smbd on 127.0.0.1:{args.smb_port} (user {user}{made}, {workdir})")
            remote = parse_address(f"//127.0.0.1:{args.smb_port}/pipe/{address.name}")
            dial = {"credentials": Credentials(user, password)}
            return _demo(args, address, Acl.allow(users=[user]) if acl == OWNER_ONLY else acl,
                         remote, dial)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # smbd's passdb with the SMB user
        if made_user and _account_exists(user):
            _remove_account(user)


def _account_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _remove_account(name: str) -> None:
    """userdel the account the demo made; if that fails, say how to remove it."""
    import subprocess

    userdel = shutil.which("userdel") or shutil.which("userdel", path="/usr/sbin:/sbin")
    deadline = time.monotonic() + 10.0
    while userdel is not None:
        done = subprocess.run([userdel, name], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=30)
        # 1 or 10: another useradd/userdel holds /etc/passwd; 8: a process of the
        # account (smbd's, ending) is still there. Retried for a while.
        if done.returncode == 0 or done.returncode not in (1, 8, 10) or (
                time.monotonic() > deadline):
            break
        time.sleep(0.2)
    if _account_exists(name):
        print(f"npipe: the demo made the Unix account {name} and could not remove it: "
              f"userdel {name}", file=sys.stderr)


def _demo(
    args: argparse.Namespace,
    address: PipeAddress,
    acl: Acl,
    dial_address: PipeAddress,
    dial: dict[str, Any],
) -> int:
    import grpc

    import npipe.grpc
    from npipe.examples.buy import buy_pb2, buy_pb2_grpc, service

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service.add_to_server(server, service.MyService(lambda ctx: str(npipe.grpc.caller(ctx))))
    port = npipe.grpc.add_pipe_port(
        server, address, acl=acl, pipe_dir=args.pipe_dir, smb=args.smb
    )
    server.start()
    try:
        # Flushed: with --serve nothing else comes, and a pipe or log reading stdout
        # should see these lines at once, not at exit.
        print(f"serving buy.MyService on {address} (socket {port.path})", flush=True)
        if args.serve:
            print("press Ctrl-C to stop", flush=True)
            threading.Event().wait()
            return 0
        request = buy_pb2.BuyRequest(id=args.id, quantity=args.quantity, price=args.price)
        print(f"calling {dial_address}")
        with npipe.grpc.channel(dial_address, pipe_dir=args.pipe_dir, **dial) as channel:
            stub = buy_pb2_grpc.MyServiceStub(channel)  # type: ignore[no-untyped-call]
            print(f"request:  BuyRequest(id={request.id!r}, quantity={request.quantity}, "
                  f"price={request.price})")
            response = stub.Buy(request, timeout=10)
            print(f"response: BuyResponse(result={response.result!r})")
        return 0
    finally:
        server.stop(None)


def health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = _Deadline(args.timeout)
    with _grpc_errors(args), _channel(args, deadline) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=deadline.left()
            )
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # the health protocol's "unknown"
                raise
            print(f"SERVICE_UNKNOWN: the server knows no service {args.service!r}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def call(args: argparse.Namespace) -> int:
    from npipe.cli import reflection_call as rc

    metadata = []
    for header in args.header:
        key, sep, value = header.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"bad header {header!r}: use KEY:VALUE")
        metadata.append((key.strip().lower(), value.strip()))
    verb = args.method
    if verb == "describe" and not args.symbol:
        raise ValueError("describe needs a SYMBOL: a service, method, message or enum")
    if verb not in ("list", "describe") and args.symbol is not None:
        raise ValueError(f"unexpected {args.symbol!r} after the method (the request goes in -d)")
    data = "" if verb in ("list", "describe") else _call_data(args.data)
    deadline = _Deadline(args.timeout)
    with _grpc_errors(args), _channel(args, deadline) as channel:
        try:
            if verb == "list":
                names = (rc.list_methods(channel, args.symbol, deadline.left(), metadata=metadata)
                         if args.symbol else
                         rc.list_services(channel, deadline.left(), metadata=metadata))
                print("\n".join(names))
                return 0
            if verb == "describe":
                print(rc.describe(channel, args.symbol, deadline.left(), metadata=metadata))
                return 0
            responses = rc.call_json(
                channel, args.method, data, timeout=deadline.left(), metadata=metadata
            )
        except rc.NoReflection as e:
            raise NpipeError(f"pipe {args.address}: {e}") from None
    for response in responses:
        print(json.dumps(response, indent=2))
    return 0


def _call_data(data: str) -> str:
    """-d: JSON as given, or read from @FILE, or from standard input (@- or grpcurl's @)."""
    if not data.startswith("@"):
        return data
    source = data[1:]
    if source in ("", "-"):
        return sys.stdin.read()
    try:
        return Path(source).read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ConfigError(f"cannot read {source}: {reason}") from None


class _Deadline:
    """--timeout for the whole command: what is left of it (never quite nothing, so
    that a step that comes too late fails with its own timeout, not a usage error)."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self._end - time.monotonic(), 0.001)


# grpc's words when the pipe answered, but not as a gRPC server does.
_HTTP_STATUS = re.compile(r"Received http2 header with status: (\d+)")


def _not_grpc(address: object, e: grpc.RpcError) -> str | None:
    """One line that says what the pipe seems to speak, when it is not gRPC."""
    details = (e.details() if hasattr(e, "details") else None) or ""
    found = _HTTP_STATUS.search(details)
    if found is not None:  # an HTTP/2 answer without grpc-status: an HTTP server's
        return (f"pipe {address} answered like an HTTP server, not gRPC (HTTP status "
                f"{found.group(1)}): use npipe http")
    if "http1.x server" in details:
        return f"pipe {address} answered like an HTTP/1.1 server, not gRPC: use npipe http"
    if "Expected SETTINGS frame" in details:
        return f"pipe {address} does not answer like a gRPC server (its reply is not HTTP/2)"
    if "failed to connect" in details and any(
        closed in details for closed in ("Connection reset", "Broken pipe", "Socket closed")
    ):  # after the probe opened it: the server closed the connection at once
        return closed_before_answering(address)
    return None


@contextlib.contextmanager
def _grpc_errors(args: argparse.Namespace) -> Iterator[None]:
    import grpc

    try:
        yield
    except grpc.RpcError as e:
        message = _not_grpc(parse_address(args.address), e)
        if message is None:
            raise
        raise NpipeError(message) from e


async def _probe(address: PipeAddress, credentials: Any, args: argparse.Namespace,
                 timeout: float) -> None:
    _reader, writer = await npipe.open_connection(
        address, server_user=args.server_user, pipe_dir=args.pipe_dir,
        credentials=credentials, timeout=timeout, encrypt=args.encrypt,
        allow_smb2=args.allow_smb2,
    )
    writer.close()


def ls(args: argparse.Namespace) -> int:
    """The pipes this user can find: its own, the machine-wide names, .NET's; with
    --prune, first remove what dead servers left (as root: every user's)."""
    from npipe.local import reclaim
    from npipe.local.inventory import list_pipes

    if args.prune:
        removed = reclaim.reclaim_all() if os.geteuid() == 0 else reclaim.reclaim(args.pipe_dir)
        for path in removed:
            print(f"removed {path}")
    rows = list_pipes(args.pipe_dir)
    if args.json:
        print(json.dumps([_ls_json(row) for row in rows], indent=2))
        return 0
    if not rows:
        print(f"no pipes in {pipe_dir(args.pipe_dir)}")
        return 0
    print(f"{'NAME':24} {'STATE':5} {'OWNER':12} {'ADMITS':24} PATH")
    for row in rows:
        print(f"{row.name:24} {row.state:5} {row.owner:12} {row.admits:24} {row.path}")
    return 0


def _ls_json(row: Any) -> dict[str, Any]:
    """One pipe of ``npipe ls --json``: what the table shows, the socket on its own."""
    name_path = str(row.path).split(" -> ")[0]
    return {
        "name": row.name, "state": row.state, "owner": row.owner, "admits": row.admits,
        "kind": row.where, "path": name_path,
        "socket": str(row.socket) if row.socket is not None else None,
    }


def path(args: argparse.Namespace) -> int:
    """The socket of local pipe NAME, checked as a client checks it before dialling."""
    from npipe.address import local

    address = parse_address(args.name)
    if address.is_remote or address.kind != "local":
        raise ConfigError(f"npipe path takes a local pipe name, not {args.name!r}")
    if os.name == "nt":  # a Windows pipe is dialled by its name
        print(local(address.name))
        return 0
    from npipe.local.dial import find_socket

    print(find_socket(address, server_user=args.server_user, directory=args.pipe_dir))
    return 0


def setup(args: argparse.Namespace) -> int:
    from npipe.local.namespace import make_machine_dir, usable_machine_dir

    if os.geteuid() != 0:
        raise NpipeError("npipe setup creates a root-owned directory and needs root")
    directory = make_machine_dir()
    assert usable_machine_dir() == directory
    print(f"machine-wide pipe directory {directory} (root, mode 1777)")
    return 0


def _channel(args: argparse.Namespace, deadline: _Deadline) -> grpc.Channel:
    import npipe.grpc
    from npipe.cli.dial import credentials as dial_credentials

    address = parse_address(args.address)
    credentials = dial_credentials(args, address)
    # grpcio reports any failure to reach the pipe as UNAVAILABLE; open it once first
    # so that the user hears why (no pipe, host, credentials, ACL). On the shared I/O
    # loop, so that a remote channel's bridge then uses the same SMB connection.
    from npipe import ioloop

    ioloop.run(_probe(address, credentials, args, args.timeout))  # the first step
    return npipe.grpc.channel(
        args.address,
        server_user=args.server_user,
        pipe_dir=args.pipe_dir,
        credentials=credentials,
        timeout=deadline.left(),
        encrypt=args.encrypt,
        allow_smb2=args.allow_smb2,
        # grpcurl's limit: responses up to 4 MiB are grpcio's default, allow more here.
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
