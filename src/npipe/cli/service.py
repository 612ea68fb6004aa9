"""What every long-running ``npipe`` command shares: readiness for systemd, stopping on
SIGINT/SIGTERM, and options from a TOML file and the environment.

Readiness follows sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``
(a path, or ``@name`` in the abstract namespace). Nothing is sent without it.

Options, for the commands that take ``--config FILE`` (serve-asgi, serve-grpc, forward,
expose), come from, first to last: the command line, the environment (``--foo-bar`` as
``NPIPE_FOO_BAR``, as ``--user`` already comes from ``NPIPE_USER``), the file (the key
``foo-bar`` or ``foo_bar``), the built-in default. A repeatable option (``--acl``) takes a
comma-separated list from the environment and a TOML array (or one string) from the file;
a positional (MODULE:APP) comes from the file only, by its name (``app = "web:app"``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress, parse_address
from npipe.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("npipe.service")

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
if sys.platform != "win32":
    # A closed terminal sends SIGHUP: a graceful stop too, so that the pipe's name goes
    # with its server (SIGHUP's default, dying at once, left the socket behind).
    STOP_SIGNALS += (signal.SIGHUP,)
ENV_PREFIX = "NPIPE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# -- readiness (sd_notify) -------------------------------------------------------------


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``READY=1``) to the service manager; False if there is none.

    A manager that set NOTIFY_SOCKET but cannot be reached is worth a warning in the log,
    not a reason to stop serving (sd_notify(3) reports it and goes on too): False then.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or sys.platform == "win32":  # (Windows: the service host, see ready())
        return False
    if target.startswith("@"):  # abstract namespace
        target = "\0" + target[1:]
    elif not target.startswith("/"):  # e.g. vsock:CID:PORT (systemd 254+): not ours to speak
        log.warning("NOTIFY_SOCKET=%r: only a path or @name is supported", target)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(states).encode(), target)
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", target.lstrip("\0"), e)
        return False
    return True


# Set once the command serves: what the Windows service host (cli/winservice_host.py)
# waits for before it reports RUNNING.
READY = threading.Event()


def ready(status: str = "") -> bool:
    """Tell the service manager the command is ready (its pipe claimed, its port bound):
    systemd through $NOTIFY_SOCKET; on Windows, the service host (npipe service run)."""
    READY.set()
    states = [f"MAINPID={os.getpid()}", "READY=1"]
    if status:
        states.append(f"STATUS={status_text(status)}")
    return notify(*states)


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status_text(status)}"] if status else []))


def status_text(text: str) -> str:
    r"""``text`` as systemd can show it: one line, and no backslashes, which systemd 252
    drops from STATUS= (``\\.\pipe\shop`` showed as ``\.pipeshop``); a pipe address
    keeps its meaning as ``//./pipe/shop``, a form npipe reads too."""
    return " ".join(text.replace("\\", "/").split())


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def announce_ready(status: str) -> None:
    """What every serve-* command says once it serves: one line on stderr, ``npipe:
    serving WHAT on ADDRESS``, and the same words as the service manager's status."""
    print(f"npipe: {status}", file=sys.stderr, flush=True)
    ready(status)


def announce_stopping(status: str) -> None:
    """The serve-* commands' one line when a signal stops them (``npipe: SIGTERM: stopping,
    ... get Ns``), also the service manager's status."""
    print(f"npipe: {status}", file=sys.stderr, flush=True)
    stopping(status)


# -- stopping --------------------------------------------------------------------------


async def watch_stop_signals() -> asyncio.Future[signal.Signals]:
    """Put the SIGINT/SIGTERM handlers in place now, before a (slow) start, so that a
    signal during it or right after READY=1 is a graceful stop rather than a kill; await
    the result for the signal."""
    stop = asyncio.ensure_future(until_stop_signal())
    await asyncio.sleep(0)  # the handlers are installed when the task first runs
    return stop


async def until_stop_signal() -> signal.Signals:
    """Wait on the running loop for SIGINT or SIGTERM; return which came.

    The handlers that were there before come back afterwards, so a second signal during
    the graceful stop acts as it would have without this (by default: at once).
    """
    loop = asyncio.get_running_loop()
    came: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not came.done():
            came.set_result(sig)

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if sys.platform == "win32":
        # No loop.add_signal_handler on Windows: a plain handler that wakes the loop
        # (the service host stops a command with SIGINT too).
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda num, _frame: loop.call_soon_threadsafe(
                on_signal, signal.Signals(num)))
    else:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await came
    finally:
        for sig in STOP_SIGNALS:
            if sys.platform != "win32":
                loop.remove_signal_handler(sig)  # (this resets it to the default)
            if before[sig] is not None:
                signal.signal(sig, before[sig])


# -- configuration ---------------------------------------------------------------------


def add_service_options(parser: argparse.ArgumentParser, *, grace: float, what: str) -> None:
    """--grace (how long ``what`` may still take after SIGINT/SIGTERM) and --config: the
    options of every long-running command."""
    parser.add_argument("--grace", type=seconds, default=grace, metavar="S",
                        help=f"on SIGINT/SIGTERM, seconds {what} may still take to finish "
                        f"(default {grace:g})")
    add_config_option(parser)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE",
        help="read options from this TOML file (keys are the long options: pipe = \"api\"); "
        "NPIPE_<OPTION> in the environment overrides it, the command line overrides both",
    )
    parser.set_defaults(config_parser=parser)


def apply_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> None:
    """Fill what the command line left unset from the environment, then from --config.

    ``parser`` is the subcommand's parser and ``argv`` the whole command line (to tell
    an option the user typed from one left at its default).
    """
    file_values = read_config(args.config) if getattr(args, "config", None) else {}
    known = {
        action.dest: action for action in parser._actions
        if action.dest not in ("help", "config", "config_parser", argparse.SUPPRESS)
    }
    for key in file_values:
        if key not in known:
            raise ConfigError(f"{args.config}: unknown option {key.replace('_', '-')!r}")
    given = _given_on_command_line(parser, args, argv)
    for dest, action in known.items():
        if dest in given:
            continue
        env_name = ENV_PREFIX + dest.upper()
        if env_name in os.environ and _env_configurable(action):
            setattr(args, dest, _from_env(action, env_name, os.environ[env_name]))
        elif dest in file_values:
            setattr(args, dest, _from_file(action, str(args.config), dest, file_values[dest]))


def require(args: argparse.Namespace, *dests: str) -> None:
    """A positional that a config file may give instead must be there after all."""
    parser = getattr(args, "config_parser", None)
    for dest in dests:
        if getattr(args, dest, None) in (None, [], ""):
            name = _metavar(parser, dest)
            raise ConfigError(
                f"missing {name} (on the command line, or {dest.replace('_', '-')} = ... "
                "in the --config file)"
            )


def _metavar(parser: argparse.ArgumentParser | None, dest: str) -> str:
    for action in parser._actions if parser is not None else ():
        if action.dest == dest:
            if action.option_strings:
                return max(action.option_strings, key=len)
            if isinstance(action.metavar, str):
                return action.metavar
    return dest.upper()


# Options whose environment variable already means something else to npipe: only the
# dial options --user and --domain read NPIPE_USER/NPIPE_DOMAIN (SMB credentials), and
# those are parsed by their own code; the rest here would clash with the test harness or
# the library's own variables.
_NOT_FROM_ENV = {"debug", "pipe_dir"}


def _env_configurable(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.dest not in _NOT_FROM_ENV


def read_config(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest in values:  # max-connections and max_connections: which one was meant?
            raise ConfigError(f"{path}: {key!r} is given twice (with - and with _)")
        values[dest] = value
    return values


def _given_on_command_line(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> set[str]:
    """The dests the command line set, found by parsing the subcommand's part again with
    every default suppressed: argparse's own reading, abbreviations (--max-conn),
    ``--opt=value``, ``-dVALUE`` and positionals included."""
    command = getattr(args, "command", None)
    words = list(argv)
    rest = words[words.index(command) + 1:] if command in words else words
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        # The top-level parse accepted these words already, so this one cannot fail.
        seen, _ = parser.parse_known_args(rest)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(seen)) - set(parser._defaults)


# A flag's key names its dest and gives the dest's value: ``cache = false`` (or
# NPIPE_CACHE=0) for ``--no-cache`` (dest cache, store_false), ``smb = true`` for ``--smb``.
def _is_flag(action: argparse.Action) -> bool:
    return isinstance(
        action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                 argparse.BooleanOptionalAction)
    )


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")


def _from_env(action: argparse.Action, name: str, value: str) -> Any:
    if _is_flag(action):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{name}={value!r}: use 1/0, true/false, yes/no")
    if _is_list(action):
        return [_convert(action, name, v.strip()) for v in value.split(",") if v.strip()]
    return _convert(action, name, value)


def _from_file(action: argparse.Action, path: str, key: str, value: Any) -> Any:
    where = f"{path}: {key.replace('_', '-')}"
    if _is_flag(action):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if _is_list(action):
        items = value if isinstance(value, list) else [value]
        return [_convert(action, where, _scalar(where, v)) for v in items]
    return _convert(action, where, _scalar(where, value))


def _scalar(where: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where} must be a string or a number, not {value!r}")
    return str(value)


def _convert(action: argparse.Action, where: str, value: str) -> Any:
    convert = action.type if callable(action.type) else str
    try:
        result = convert(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{where}: {value!r} is not valid: {e}") from e
    if action.choices is not None and result not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {sorted(action.choices)}")
    return result


# -- the options of every command that serves a pipe ----------------------------------

ACL_HELP = ("who may connect besides you (comma-separated, repeatable): user:NAME, "
            "user:DOMAIN\\NAME, user:NAME@REALM, group:NAME, uid:N, gid:N, sid:S-1-..., "
            "everyone (default: only you)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more (and finite)")
    return value


def add_pipe_server_options(parser: argparse.ArgumentParser) -> None:
    """--smb, --acl, --dotnet, --max-connections: the same for serve-grpc, serve-asgi and
    expose (and in their --config files)."""
    parser.add_argument("--smb", action="store_true",
                        help="also serve SMB clients (\\\\HOST\\pipe\\NAME) through Samba")
    parser.add_argument("--acl", action="append", metavar="ENTRIES", help=ACL_HELP)
    parser.add_argument("--dotnet", action="store_true",
                        help="also listen where .NET clients look (/tmp/CoreFxPipe_NAME)")
    parser.add_argument("--max-connections", type=positive_int, metavar="N",
                        help="callers served at once (more wait); default from the fd limit")


def pipe_acl(args: argparse.Namespace) -> Acl:
    return Acl.parse(",".join(args.acl)) if args.acl else OWNER_ONLY


def served_pipe(name: str, option: str) -> PipeAddress:
    """The local pipe a command serves; a remote address is a usage error."""
    address = parse_address(name)
    if address.is_remote:
        raise ConfigError(f"{option} {name}: a server serves a local pipe NAME "
                          "(--smb makes it reachable as \\\\HOST\\pipe\\NAME)")
    return address
