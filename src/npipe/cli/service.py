"""What every long-running ``npipe`` command shares: readiness for systemd, stopping on
SIGINT/SIGTERM, and options from a TOML file and the environment.

Readiness follows sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``
(a path, or ``@name`` in the abstract namespace). Nothing is sent without it.

Options, for the commands that take ``--config FILE`` (serve-asgi, serve-grpc, forward,
expose), come from, first to last: the command line, the environment (``--foo-bar`` as
``NPIPE_FOO_BAR``, as ``--user`` already comes from ``NPIPE_USER``), the file (the key
``foo-bar`` or ``foo_bar``), the built-in default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npipe.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ENV_PREFIX = "NPIPE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# -- readiness (sd_notify) -------------------------------------------------------------


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``READY=1``) to the service manager; False if there is none.

    A manager that set NOTIFY_SOCKET but cannot be reached is an error worth a line in
    the log, not a reason to stop serving: the OSError is left to the caller's logging.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):  # abstract namespace
        target = "\0" + target[1:]
    elif not target.startswith("/"):
        raise ConfigError(f"NOTIFY_SOCKET={target!r}: only a path or @name is supported")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto("\n".join(states).encode(), target)
    return True


def ready(status: str = "") -> bool:
    """Tell the service manager the command is ready (its pipe claimed, its port bound)."""
    states = [f"MAINPID={os.getpid()}", "READY=1"]
    if status:
        states.append(f"STATUS={status}")
    return notify(*states)


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


# -- stopping --------------------------------------------------------------------------


async def until_stop_signal() -> signal.Signals:
    """Wait on the running loop for SIGINT or SIGTERM; return which came."""
    loop = asyncio.get_running_loop()
    came: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not came.done():
            came.set_result(sig)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await came
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


# -- configuration ---------------------------------------------------------------------


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

    ``parser`` is the subcommand's parser and ``argv`` the arguments it was given (to
    tell an option the user typed from one left at its default).
    """
    file_values = _read_config(args.config) if getattr(args, "config", None) else {}
    known = {
        action.dest: action for action in parser._actions
        if action.dest not in ("help", "config_parser")
    }
    for key in file_values:
        if key not in known or key == "config":
            raise ConfigError(f"{args.config}: unknown option {key!r}")
    given = _given_on_command_line(parser, argv)
    for dest, action in known.items():
        if dest in given or dest == "config":
            continue
        env_name = ENV_PREFIX + dest.upper()
        if env_name in os.environ and _env_configurable(action):
            setattr(args, dest, _from_env(action, env_name, os.environ[env_name]))
        elif dest in file_values:
            setattr(args, dest, _from_file(action, str(args.config), dest, file_values[dest]))


def require(args: argparse.Namespace, *dests: str) -> None:
    """A positional that a config file may give instead must be there after all."""
    for dest in dests:
        if getattr(args, dest, None) in (None, [], ""):
            raise ConfigError(f"missing {dest.upper()} (on the command line or in --config)")


# Options whose environment variable already means something else to npipe: only the
# dial options --user and --domain read NPIPE_USER/NPIPE_DOMAIN (SMB credentials), and
# those are parsed by their own code; the rest here would clash with the test harness or
# the library's own variables.
_NOT_FROM_ENV = {"debug", "pipe_dir"}


def _env_configurable(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.dest not in _NOT_FROM_ENV


def _read_config(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return {key.replace("-", "_"): value for key, value in raw.items()}


def _given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    given: set[str] = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                given.add(action.dest)
    # Positionals: argparse leaves them None (nargs="?") or [] when absent.
    return given


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
            return not isinstance(action, argparse._StoreFalseAction)
        if low in _FALSE:
            return isinstance(action, argparse._StoreFalseAction)
        raise ConfigError(f"{name}={value!r}: use 1/0, true/false, yes/no")
    if _is_list(action):
        return [_convert(action, name, v.strip()) for v in value.split(",") if v.strip()]
    return _convert(action, name, value)


def _from_file(action: argparse.Action, path: str, key: str, value: Any) -> Any:
    where = f"{path}: {key}"
    if _is_flag(action):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
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
