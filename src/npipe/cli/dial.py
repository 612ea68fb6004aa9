"""The options of every command that opens a pipe (health, call, http, forward, relay), and
its ADDRESS positional, which each command declares itself: required, or (forward, whose
--config file may give it) optional."""

from __future__ import annotations

import argparse

ADDRESS_HELP = r"NAME, \\.\pipe\NAME, //HOST/pipe/NAME (over SMB) or unix:/path"


def dial_options() -> argparse.ArgumentParser:
    """A parent parser: --timeout, --server-user and the SMB options."""
    dial = argparse.ArgumentParser(add_help=False)
    dial.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    dial.add_argument(
        "--server-user", metavar="USER",
        help="trust a local pipe served by USER (by default only by you or root)",
    )
    smb = dial.add_argument_group("remote pipes (SMB)")
    smb.add_argument("--user", help=r"SMB user, DOMAIN\user or user@REALM (default $NPIPE_USER,"
                     " else the Kerberos cache)")
    smb.add_argument("--domain", help="SMB domain (default $NPIPE_DOMAIN)")
    smb.add_argument("--auth", choices=["negotiate", "ntlm", "kerberos"], help="default negotiate")
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
