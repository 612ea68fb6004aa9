"""The options of every command that opens a pipe (health, call, http, forward, relay), and
its ADDRESS positional, which each command declares itself: required, or (forward, whose
--config file may give it) optional. Also who to log on as over SMB: ``credentials``."""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys

from npipe.address import PipeAddress
from npipe.errors import ConfigError
from npipe.smb.credentials import ENV_AUTH_PROTOCOL, ENV_PASSWORD, ENV_USER, Credentials

ADDRESS_HELP = r"NAME, \\.\pipe\NAME, //HOST/pipe/NAME (over SMB) or unix:/path"

# What --timeout bounds, command by command.
TIMEOUT_HELP = {
    "health": "seconds for the whole check: opening the pipe and the server's answer "
              "(default 10)",
    "call": "seconds for the whole call: opening the pipe, server reflection and the "
            "response(s) (default 10)",
    "http": "seconds for the whole request: opening the pipe, sending the request and "
            "receiving the whole response, body included (default 10)",
    "forward": "seconds for opening the pipe, for each connection (default 10); a "
               "connection, once relayed, has no time limit",
    "relay": "seconds for opening the pipe (default 10); the relay, once started, has no "
             "time limit",
}

PASSWORD_HELP = (
    "with --user (or $NPIPE_USER), the password is asked for on the terminal; scripts "
    "give it with --password-file or $NPIPE_PASSWORD (never on the command line, which "
    "every user can read)"
)


def dial_options(command: str) -> argparse.ArgumentParser:
    """A parent parser: --timeout (saying what it bounds for ``command``), --server-user
    and the SMB options."""
    dial = argparse.ArgumentParser(add_help=False)
    dial.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                      help=TIMEOUT_HELP[command])
    dial.add_argument(
        "--server-user", metavar="USER",
        help="trust a local pipe served by USER (by default only by you or root)",
    )
    smb = dial.add_argument_group("remote pipes (SMB)", PASSWORD_HELP)
    smb.add_argument("--user", help=r"SMB user, DOMAIN\user or user@REALM (default $NPIPE_USER,"
                     " else the Kerberos cache)")
    smb.add_argument(
        "--password-file", metavar="FILE",
        help="read the password from the first line of FILE (which others may not read); "
        "default $NPIPE_PASSWORD, else asked for on the terminal",
    )
    smb.add_argument("--domain", help="SMB domain (default $NPIPE_DOMAIN)")
    smb.add_argument("--auth", choices=["negotiate", "ntlm", "kerberos"],
                     help="default negotiate; kerberos: the Kerberos cache, no password")
    smb.add_argument(
        "--encrypt", action=argparse.BooleanOptionalAction, default=None,
        help="require (or refuse) SMB encryption; by default encrypt where the server can",
    )
    smb.add_argument(
        "--allow-smb2", action="store_true",
        help="accept a server that speaks only SMB 2.x (no encryption; by default SMB 3 is "
        "required, so that nobody on the path can force a downgrade)",
    )
    return dial


def add_address(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """The pipe's ADDRESS, before the command's other positionals; ``optional``: for a
    command whose --config may give it (then check it with service.require)."""
    parser.add_argument("address", nargs="?" if optional else None, help=ADDRESS_HELP)


def closed_before_answering(address: object) -> str:
    """The one line for a pipe that closed the connection before any answer: what a
    local pipe does to a caller its ACL does not admit."""
    return (f"pipe {address} closed the connection before answering (refused by its ACL? "
            "its server's log says why)")


# The library's errors name its keyword arguments; a command's user types options.
_KEYWORDS_AS_OPTIONS = (("(server_user=...)", "(--server-user USER)"),
                        ("(server_user=..., --server-user)", "(--server-user USER)"))


def in_cli_words(message: str) -> str:
    """``message`` with the Python keywords it suggests replaced by the CLI's options."""
    for keyword, option in _KEYWORDS_AS_OPTIONS:
        message = message.replace(keyword, option)
    return message


def credentials(
    args: argparse.Namespace, address: PipeAddress, *, tty_prompt: bool = False
) -> Credentials | None:
    """Who to log on as to a remote ``address`` (None for a local pipe).

    The user: --user, else $NPIPE_USER (else nobody: the Kerberos cache). Its password:
    --password-file, else $NPIPE_PASSWORD (unless $NPIPE_USER names someone else: that
    is their password), else asked for on the terminal when stdin is one (or, with
    ``tty_prompt``, whenever this process has a terminal: relay's stdin is the data);
    else a ConfigError that says how to give it. ``--auth kerberos`` needs none.
    """
    if not address.is_remote:
        return None
    env_user = os.environ.get(ENV_USER) or None
    user = args.user or env_user
    auth = (args.auth or os.environ.get(ENV_AUTH_PROTOCOL) or "negotiate").lower()
    password = None
    if args.password_file is not None:
        if user is None:
            raise ConfigError(f"--password-file needs --user (or ${ENV_USER})")
        password = read_password_file(args.password_file)
    elif user is not None and auth != "kerberos":
        env_password = os.environ.get(ENV_PASSWORD)
        if env_password is not None and (args.user is None or env_user in (None, args.user)):
            password = env_password
        else:
            password = _ask(user, address, tty_prompt)
    return Credentials.resolve(user, password, args.domain, auth)


def read_password_file(path: str) -> str:
    """The first line of ``path`` without its line end; refused if others may read it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & stat.S_IROTH:
                raise ConfigError(
                    f"password file {path} is readable by others (mode {mode & 0o777:03o}): "
                    f"chmod o-r {path}"
                )
            first = f.readline(64 * 1024)
    except OSError as e:
        raise ConfigError(f"cannot read password file {path}: {e.strerror or e}") from e
    password = first.rstrip(b"\n").rstrip(b"\r").decode("utf-8", "surrogateescape")
    if not password:
        raise ConfigError(f"password file {path}: its first line is empty")
    return password


def _has_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _ask(user: str, address: PipeAddress, tty_prompt: bool) -> str:
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if os.name != "nt" and (interactive or tty_prompt):
        # getpass reads /dev/tty, and falls back to stdin without one: check first.
        interactive = _has_terminal()
    if not interactive:
        raise ConfigError(
            f"no password for {user} on {address.host}: give --password-file FILE or "
            f"${ENV_PASSWORD} (not on a terminal, so it cannot be asked for)"
        )
    try:
        return getpass.getpass(f"Password for {user} on {address.host}: ")
    except EOFError:
        raise ConfigError(f"no password for {user} on {address.host}") from None
