"""The ``npipe`` command: demo, health, call, ls.

Exit codes: 0 ok, 1 the call failed (gRPC status printed), 2 bad usage or address.
Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata

# gRPC's C core logs to stderr at INFO: absl writes everything there until a program
# initialises absl logging, which Python never does. A server that stops with calls
# cancelled, for one, makes every client print "Got goaway [2]". A command's stderr is
# for npipe's own one-line errors, so the core logs errors only unless the user sets
# GRPC_VERBOSITY (INFO or DEBUG bring the lines back). grpc reads it once, when it
# loads, so this comes before the first import of grpc in the CLI (the gRPC commands'
# modules import it when they run).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from npipe import extras
from npipe.cli import commands, service, winservice
from npipe.cli.bridges import add_bridge_parsers
from npipe.cli.dial import add_address, dial_options, in_cli_words
from npipe.cli.http import add_http_parsers
from npipe.cli.samba import add_samba_parser
from npipe.cli.usage import add_subcommands
from npipe.errors import AddressError, ConfigError, NpipeError, PipeInUse

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# A live server already serves the pipe's name: a service manager restarting the command
# cannot fix that (the units' RestartPreventExitStatus= names it with 2).
EXIT_IN_USE = 3

# The commands that need an extra (pyproject.toml's optional-dependencies). Without it
# they say, in one line, which to install (exit 2) before anything else runs.
COMMAND_EXTRAS = {
    "demo": "grpc", "health": "grpc", "call": "grpc", "serve-grpc": "grpc",
    "http": "http", "serve-asgi": "http", "serve-wsgi": "http",
}


def _common(top: bool) -> argparse.ArgumentParser:
    # Accepted before and after the subcommand; the subcommand's copy must not reset
    # what was given before it, hence SUPPRESS there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs",
        default=False if top else argparse.SUPPRESS,
    )
    common.add_argument(
        "--pipe-dir", metavar="DIR", help="where local pipes live (default: $NPIPE_PIPE_DIR, "
        "$XDG_RUNTIME_DIR/npipe or /tmp/npipe-UID)", default=None if top else argparse.SUPPRESS,
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common(top=False)

    parser = argparse.ArgumentParser(
        prog="npipe", description="gRPC, HTTP and byte streams over named pipes.",
        parents=[_common(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"npipe {_version()}")
    sub = add_subcommands(parser, dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo", parents=[common], help="serve the Buy example on a pipe and call it through it",
        description="Start MyService on a pipe, call Buy through the pipe, print both sides. "
        "With --serve, keep serving until interrupted.",
    )
    p.add_argument("--pipe", default="npipe-demo", help="pipe name (default npipe-demo)")
    p.add_argument("--id", default="apple", help="BuyRequest.id")
    p.add_argument("--quantity", type=int, default=3, help="BuyRequest.quantity")
    p.add_argument("--price", type=int, default=10, help="BuyRequest.price")
    p.add_argument("--serve", action="store_true", help="keep serving instead of exiting")
    p.add_argument("--acl", help="also allow (comma-separated): user:NAME (local), "
                   "user:DOMAIN\\NAME, user:NAME@REALM, group:NAME, uid:N, gid:N, "
                   "sid:S-1-..., everyone")
    p.add_argument(
        "--smb", action="store_true",
        help="go through SMB: start a private smbd on loopback (root), serve the pipe through "
        "it and call \\\\127.0.0.1\\pipe\\NAME",
    )
    p.add_argument("--smb-port", type=int, default=4445, help="the private smbd's port (4445)")
    p.set_defaults(func=commands.demo)

    p = sub.add_parser(
        "health", parents=[common, dial_options("health")],
        help="check a gRPC server's health over a pipe",
        description="Print the serving status (grpc.health.v1); exit 0 only when SERVING.",
    )
    add_address(p)
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.set_defaults(func=commands.health)

    p = sub.add_parser(
        "call", parents=[common, dial_options("call")],
        help="call a gRPC method with JSON (via reflection)",
        usage="npipe call ADDRESS package.Service/Method [-d JSON|@FILE|@-] [-H KEY:VALUE] "
              "[options]\n       npipe call ADDRESS list [SERVICE]\n"
              "       npipe call ADDRESS describe SYMBOL",
        description="Call package.Service/Method with a JSON request, found through server "
        "reflection; print the response(s) as JSON. 'list' prints the services (or a "
        "service's methods), 'describe' a service, method or message, as grpcurl does.",
    )
    add_address(p)
    p.add_argument("method", help="package.Service/Method, list or describe")
    p.add_argument("symbol", nargs="?", help="after list: a SERVICE; after describe: a SYMBOL")
    p.add_argument("-d", "--data", default="{}", help="request as JSON (a list for streams); "
                   "@FILE reads a file, @- (or @) standard input")
    p.add_argument(
        "-H", "--header", action="append", default=[], metavar="KEY:VALUE",
        help="request metadata (repeatable)",
    )
    p.set_defaults(func=commands.call)

    add_samba_parser(sub, [common])
    add_http_parsers(sub, common)
    if extras.missing("grpc"):  # (its module imports grpc; main() says what to install)
        sub.add_parser("serve-grpc", parents=[common],
                       help="serve a gRPC service on a pipe (needs npipe[grpc])")
    else:
        from npipe.cli import serve_grpc

        serve_grpc.add_parser(sub, [common])
    add_bridge_parsers(sub, common)
    winservice.add_parser(sub, [common], parse=lambda argv: build_parser().parse_args(argv),
                          main=lambda argv: main(argv))

    p = sub.add_parser(
        "ls", parents=[common], help="list local pipes",
        description="List the pipes in your pipe directory, the machine-wide names "
        "(/run/npipe) and .NET's pipes, with their owner, state and who they admit.",
    )
    p.add_argument("--prune", action="store_true",
                   help="first remove what dead servers left (as root: of every user)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object a pipe: "
                   "name, state, owner, admits, kind, path (the name) and socket")
    p.set_defaults(func=commands.ls)

    p = sub.add_parser(
        "path", parents=[common], help="print the socket of a local pipe",
        description="Print the Unix socket that local pipe NAME is served on, checked as "
        "npipe's clients check it, for curl --unix-socket, socat, grpc-go or .NET. Exit 1 "
        "if there is no such pipe (or it is served by someone you did not name).",
    )
    p.add_argument("name", metavar="NAME", help=r"NAME or \\.\pipe\NAME")
    p.add_argument("--server-user", metavar="USER",
                   help="trust a pipe served by USER (by default only by you or root)")
    p.set_defaults(func=commands.path)

    p = sub.add_parser(
        "setup", parents=[common], help="make the machine-wide pipe directory (root)",
        description="Create the machine-wide pipe directory (/run/npipe, or "
        "$NPIPE_MACHINE_DIR): root's, mode 1777, where pipes that admit other users are "
        "published. systemd-tmpfiles can do the same at boot (packaging/npipe.tmpfiles).",
    )
    p.set_defaults(func=commands.setup)
    return parser


# Commands that run once and end with one line when they fail: their log lines wait
# until the end, so that a warning the library logged about the very error the command
# then reports (a refused logon, a lost connection) is not printed twice.
ONE_SHOT = frozenset({"health", "call", "http", "relay"})


class _HeldLog(logging.Handler):
    """Holds log records (a few hundred at most) until ``hand_over``."""

    MOST = 200

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.MOST:
            self.records.append(record)

    def hand_over(self, to: logging.Handler, error: str = "") -> None:
        for record in self.records:
            if not error or record.getMessage() not in error:
                to.handle(record)
        self.records.clear()


def _version() -> str:
    try:
        return metadata.version("npipe")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (past the top level's options), if any."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--pipe-dir":
            skip = True  # its value
        elif not arg.startswith("-"):
            return arg
    return None


def missing_extra(argv: Sequence[str]) -> str:
    """The one-line error for a command whose extra is not installed ("" when it is)."""
    command = _command(argv)
    extra = COMMAND_EXTRAS.get(command or "")
    if command is None or extra is None or not extras.missing(extra):
        return ""
    return str(extras.MissingExtra(f"npipe {command}", extra))


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if missing := missing_extra(argv):
        print(missing, file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="npipe: %(levelname)s: %(message)s",
    )
    root = logging.getLogger()
    held = None
    if args.command in ONE_SHOT and not args.debug and root.handlers:
        held = _HeldLog()
        out = root.handlers[0]
        root.removeHandler(out)
        root.addHandler(held)
    error = ""
    try:
        code, error = _run(args, argv)
    finally:
        if held is not None:
            root.removeHandler(held)
            root.addHandler(out)
            held.hand_over(out, error)
    if error:
        print(error, file=sys.stderr)
    return code


def _run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[int, str]:
    """The command's exit status and its one-line error (empty when there is none)."""
    try:
        config_parser = getattr(args, "config_parser", None)
        if config_parser is not None:  # a long-running command: --config and NPIPE_*
            service.apply_config(config_parser, args, argv)
        return int(args.func(args)), ""
    except KeyboardInterrupt:
        return 130, ""
    except (AddressError, ConfigError, ValueError) as e:
        return _fail(args, f"npipe: {e}", EXIT_USAGE)
    except extras.MissingExtra as e:  # (one the command's own check did not know of)
        return _fail(args, f"npipe: {e}", EXIT_USAGE)
    except PipeInUse as e:
        return _fail(args, f"npipe: {e}", EXIT_IN_USE)
    except (NpipeError, OSError) as e:
        return _fail(args, f"npipe: {e}", EXIT_FAILED)
    except Exception as e:
        grpc = sys.modules.get("grpc")  # loaded if a call failed: it raised this
        if grpc is None or not isinstance(e, grpc.RpcError):
            raise
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        name = code.name if code is not None else "UNKNOWN"
        return _fail(args, f"npipe: call failed: {name}: {details}", EXIT_FAILED)


def _fail(args: argparse.Namespace, message: str, code: int) -> tuple[int, str]:
    if args.debug:
        logging.exception("failed")
    # One line, whatever the message holds (a server's text, an OS error's).
    return code, " ".join(in_cli_words(message).split())


if __name__ == "__main__":
    sys.exit(main())
