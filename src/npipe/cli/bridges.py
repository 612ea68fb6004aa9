"""``npipe forward``, ``npipe expose`` and ``npipe relay``: pipes <-> TCP, Unix sockets,
stdin/stdout (the library is npipe.bridges)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

from npipe.bridges.endpoint import parse_endpoint
from npipe.bridges.expose import start_expose
from npipe.bridges.forward import start_forward
from npipe.bridges.sockets import DEFAULT_UNIX_MODE
from npipe.cli import service
from npipe.cli.dial import add_address, closed_before_answering, dial_options
from npipe.errors import NpipeError

log = logging.getLogger("npipe.bridges")

DEFAULT_GRACE = 5.0
HALF_CLOSE = (
    "End of stream: where both sides can half-close (TCP, Unix sockets, local pipes) one "
    "side's end of stream is passed on and the other direction goes on. An SMB pipe "
    "(a remote pipe, or a caller through Samba) has no half-close: there an end of stream "
    "on either side closes the whole connection."
)


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 600") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mode between 000 and 777")
    return mode


def add_bridge_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add forward, expose and relay to the ``npipe`` subcommands."""
    p = sub.add_parser(
        "forward", parents=[common, dial_options("forward")],
        help="listen on TCP or a Unix socket and relay each connection to the pipe",
        description="Listen on --listen; each accepted connection opens its own instance "
        "of the pipe ADDRESS (local, or remote over SMB) and bytes are copied both ways. "
        "One log line per connection (peer, bytes each way, duration, how it ended). "
        + HALF_CLOSE,
    )
    add_address(p, optional=True)
    p.add_argument(
        "--listen", metavar="tcp:HOST:PORT|unix:PATH",
        help="where to listen: unix:PATH (its mode is --mode: yours alone by default), "
        "or tcp:127.0.0.1:PORT, tcp:[::1]:PORT, tcp:localhost:PORT (PORT 0: the kernel "
        "picks one; the log says which). A loopback port is open to every user of this "
        "host, who then reaches the pipe as you, with your SMB credentials: prefer unix: "
        "for a pipe that admits only you",
    )
    p.add_argument(
        "--allow-remote-listen", action="store_true",
        help="allow listening on a non-loopback address: whoever reaches it uses the pipe "
        "with this process's identity and SMB credentials",
    )
    p.add_argument("--mode", type=_mode, default=DEFAULT_UNIX_MODE,
                   help="the unix: socket's mode in octal (default 600: owner only)")
    p.add_argument("--max-connections", type=service.positive_int, metavar="N",
                   help="connections relayed at once (more wait to be accepted); default "
                   "from the fd limit")
    service.add_service_options(p, grace=DEFAULT_GRACE, what="open connections")
    p.set_defaults(func=forward)

    p = sub.add_parser(
        "expose", parents=[common],
        help="serve a pipe and relay each caller to a TCP or Unix socket",
        description="Serve the pipe NAME (the ACL is applied first); each caller gets its "
        "own connection to --to. One log line per connection naming the caller. "
        + HALF_CLOSE,
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="the pipe name to serve")
    p.add_argument("--to", metavar="tcp:HOST:PORT|unix:PATH", help="where callers go")
    service.add_pipe_server_options(p)
    p.add_argument("--connect-timeout", type=service.seconds, default=10.0,
                   help="seconds to reach --to (default 10)")
    service.add_service_options(p, grace=DEFAULT_GRACE, what="open connections")
    p.set_defaults(func=expose)

    p = sub.add_parser(
        "relay", parents=[common, dial_options("relay")],
        help="relay stdin/stdout to a pipe (ssh ProxyCommand, socat EXEC)",
        description="Copy stdin to the pipe ADDRESS and the pipe to stdout, binary-safe; "
        "logs go to stderr only. Exit 0 when the pipe's side ends, 1 (one line) if it cannot "
        "be opened or closes before sending anything while input waited for it (refused). "
        "End of stdin half-closes a local pipe; an SMB pipe has no half-close, so then the "
        "pipe is read on until its server ends it. Example: ssh -o "
        "ProxyCommand='npipe relay //HOST/pipe/ssh' HOST.",
    )
    add_address(p)
    p.set_defaults(func=relay)


def _show_connection_log(args: argparse.Namespace) -> None:
    # The per-connection lines are the point of a bridge: INFO shows without --debug.
    if not args.debug:
        log.setLevel(logging.INFO)


def _dial(args: argparse.Namespace, *, tty_prompt: bool = False) -> dict[str, Any]:
    from npipe.address import parse_address
    from npipe.cli.dial import credentials

    return {
        "server_user": args.server_user, "pipe_dir": args.pipe_dir,
        "credentials": credentials(args, parse_address(args.address), tty_prompt=tty_prompt),
        "timeout": args.timeout, "encrypt": args.encrypt, "allow_smb2": args.allow_smb2,
    }


async def _serve_until_stopped(status: str, bridge: Any, grace: float) -> int:
    stop = await service.watch_stop_signals()
    log.info("%s", status)
    service.ready(status)
    try:
        sig = await stop
    finally:
        stop.cancel()
    service.stopping(f"stopping on {sig.name}")
    log.info("stopping on %s, %d connection(s) open (grace %g s)", sig.name,
             bridge.connections, grace)
    await bridge.close(grace)
    return 0


def forward(args: argparse.Namespace) -> int:
    service.require(args, "address", "listen")
    listen_on = parse_endpoint(args.listen)
    _show_connection_log(args)
    dial = _dial(args)

    async def run() -> int:
        fwd = await start_forward(args.address, listen_on,
                                  allow_remote_listen=args.allow_remote_listen,
                                  mode=args.mode, max_connections=args.max_connections,
                                  **dial)
        return await _serve_until_stopped(
            f"listening on {fwd.endpoint}, forwarding to {fwd.address}", fwd, args.grace)

    return asyncio.run(run())


def expose(args: argparse.Namespace) -> int:
    service.require(args, "name", "to")
    target = parse_endpoint(args.to)
    service.served_pipe(args.name, "NAME")
    acl = service.pipe_acl(args)
    _show_connection_log(args)

    async def run() -> int:
        exp = await start_expose(
            args.name, target, acl=acl, smb=args.smb, dotnet=args.dotnet,
            max_connections=args.max_connections, pipe_dir=args.pipe_dir,
            connect_timeout=args.connect_timeout,
        )
        via = " (and via SMB)" if args.smb else ""
        return await _serve_until_stopped(
            f"serving pipe {exp.name}{via}, relaying to {target}", exp, args.grace)

    return asyncio.run(run())


def relay(args: argparse.Namespace) -> int:
    """Exit 0 when the pipe's side ends, 1 (one line) when the pipe cannot be opened or
    closes on us before it has said anything while we had something for it."""
    from npipe.address import parse_address

    address = parse_address(args.address)
    # stdin is the data: the password is asked for on the terminal, if there is one.
    dial = _dial(args, tty_prompt=True)
    stdin = _Counted()
    stats = asyncio.run(_relay(address, stdin, dial))
    if stats.b_to_a == 0 and (stats.ended.startswith("pipe lost")
                              or stdin.count > stats.a_to_b):
        # A local pipe whose ACL does not admit us closes the connection at once (unread
        # input makes that a reset); a normal session that ends without a word from the
        # pipe still ends with everything we sent taken.
        raise NpipeError(f"{closed_before_answering(address)}: {stats.ended}")
    return 0


class _Counted:
    """How many bytes stdin gave the relay (set by _relay's wrapped reader)."""

    count = 0


async def _relay(address: Any, counted: _Counted, dial: dict[str, Any]) -> Any:
    import npipe
    from npipe.bridges.relay import RELAY_LIMIT, Side
    from npipe.bridges.relay import relay as copy_both_ways
    from npipe.bridges.stdio import open_stdio

    pipe_reader, pipe_writer = await npipe.open_connection(address, limit=RELAY_LIMIT, **dial)
    try:
        reader, writer, transports = await open_stdio(RELAY_LIMIT)
    except BaseException:
        pipe_writer.close()
        raise

    class CountingReader:
        async def read(self, n: int = -1) -> bytes:
            data = await reader.read(n)
            counted.count += len(data)
            return data

    try:
        return await copy_both_ways(
            Side("stdin/stdout", CountingReader(), writer),
            # An SMB pipe has no half-close, whatever the backend says.
            Side("pipe", pipe_reader, pipe_writer, final=True,
                 half_close=not address.is_remote),
            keep_reading=True)
    finally:
        for transport in transports:
            with contextlib.suppress(Exception):
                transport.close()


__all__ = ["add_bridge_parsers"]
