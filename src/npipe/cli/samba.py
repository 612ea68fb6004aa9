"""``npipe samba setup | run | link``: Samba's side of pipes from other hosts.

``setup`` reports where the system's smbd looks for pipes it does not serve itself (the
np directory) and the smb.conf settings that matter (and, with ``--apply``, creates the np
directory's parent); ``run`` runs a private smbd in the
foreground for demos and tests; ``link`` lets smbd reach a non-root user's pipe. All
print one-line errors and return 0 or 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from npipe.errors import NpipeError
from npipe.samba.config import (
    _SBIN_PATH,
    DEFAULT_CONF,
    ENV_CONF,
    ENV_NP_DIR,
    global_parameters,
    np_dir_from_conf,
)
from npipe.samba.smbd import INSTALL_HINT, PrivateSmbd

EXIT_OK, EXIT_FAILED = 0, 1
STOP_POLL = 0.2  # seconds between looks at the stop signal and at smbd


def add_samba_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    """Add ``samba`` with its subcommands ``setup``, ``run`` and ``link`` to ``sub``."""
    p = sub.add_parser(
        "samba", parents=parents, help="Samba: reach pipes from other hosts through smbd",
        description="Pipes from other hosts go through Samba: an SMB client opens pipe NAME "
        "on IPC$ and smbd connects to <ncalrpc dir>/np/<name>.",
    )
    samba_sub = p.add_subparsers(dest="samba_command", metavar="SUBCOMMAND", required=True)

    s = samba_sub.add_parser(
        "setup", parents=parents, help="show the system Samba's np directory and settings",
        description="Print the np directory the system's smbd uses and the smb.conf "
        "settings to check; change nothing unless --apply is given: then (as root) create "
        "the np directory's parent if it is missing (smbd creates np/ itself, root-owned "
        "0700). Exit 0 if all is in place, else 1.",
    )
    s.add_argument("--apply", action="store_true",
                   help="create the np directory's parent if it is missing (root)")
    s.add_argument(
        "--conf", type=Path, metavar="PATH",
        help=f"the smb.conf to read (default ${ENV_CONF} or Samba's own, {DEFAULT_CONF})",
    )
    s.set_defaults(func=setup)

    r = samba_sub.add_parser(
        "run", parents=parents, help="run a private smbd in the foreground (root)",
        description="Run an smbd of its own whose every file lives under --dir, until "
        "Ctrl-C or SIGTERM. Serve pipes by putting sockets in the np directory it prints.",
    )
    r.add_argument("--dir", type=Path, required=True, metavar="DIR",
                   help="directory for its config, databases, sockets and logs")
    r.add_argument("--port", type=_port, default=445, help="TCP port (default 445)")
    r.add_argument("--interfaces", default="lo",
                   help="smb.conf 'interfaces' to listen on (default lo)")
    r.add_argument("--bind-address", metavar="ADDR",
                   help="listen on this one address instead of --interfaces")
    r.add_argument("--netns", metavar="NS", help="run smbd in this network namespace")
    r.add_argument(
        "--user", dest="users", action="append", default=[], type=_user,
        metavar="NAME:PASSWORD",
        help="add an SMB user, creating the Unix user if missing (repeatable; the password "
        "is visible to local users in the process list: for demos and tests)",
    )
    r.add_argument(
        "--option", dest="options", action="append", default=[], type=_option,
        metavar="KEY=VALUE", help="another [global] smb.conf line, e.g. "
        "'server signing=mandatory' or 'smb encrypt=required' (repeatable)",
    )
    r.add_argument("--timeout", type=float, default=20.0,
                   help="seconds to wait for smbd to listen (default 20)")
    r.set_defaults(func=run)

    k = samba_sub.add_parser(
        "link", parents=parents, help="let smbd reach a pipe served by a non-root user (root)",
        description="smbd looks for pipe NAME at np/<name>, which only root may write: link "
        "it to the socket that USER's npipe server (add_pipe_port(..., smb=True)) listens "
        "on in USER's pipe directory.",
    )
    k.add_argument("name", help="the pipe name")
    who = k.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="the user whose npipe server serves NAME")
    who.add_argument("--target", type=Path, metavar="PATH", help="the socket to link to")
    who.add_argument("--remove", action="store_true", help="remove the link instead")
    k.add_argument("--conf", type=Path, metavar="PATH", help="the smb.conf to read")
    k.set_defaults(func=link)


def link(args: argparse.Namespace) -> int:
    from npipe.address import local
    from npipe.samba.np_listener import RESERVED_NAMES, samba_socket_name

    if os.geteuid() != 0:
        return _error("npipe samba link writes in smbd's np directory and needs root")
    addr = local(args.name)
    if addr.key in RESERVED_NAMES:
        return _error(f"pipe name {addr.name!r} belongs to Samba's own RPC services")
    np = np_dir_from_conf(args.conf)
    if not np.is_dir():
        return _error(f"{np} does not exist: start smbd once, it creates it")
    path = np / addr.key
    if os.path.lexists(path) and not path.is_symlink():
        return _error(f"{path} is not a link (a server of root's?): not touching it")
    if args.remove:
        if path.is_symlink():
            path.unlink()
        print(f"removed {path}")
        return EXIT_OK
    if args.user:
        target = _user_dir(args.user) / samba_socket_name(addr.key)
    else:
        target = _checked_target(args.target)
    tmp = path.with_name(f".{addr.key}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)  # atomic: smbd never sees the name missing
    print(f"{path} -> {target}")
    return EXIT_OK


def _user_dir(user: str) -> Path:
    """The directory root makes for USER's SMB-facing sockets (made here if missing):
    smbd, as root, follows the link into it, so no other user may ever create it."""
    import pwd

    from npipe.local.namespace import make_root_made_user_dir

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise NpipeError(f"unknown user {user!r}") from None
    return make_root_made_user_dir(pw.pw_uid, pw.pw_gid)


def _checked_target(target: Path) -> Path:
    """A --target is linked only inside a directory root made for a user (or root's own
    np/-style directories): anywhere else another user could one day create it."""
    from npipe.local.namespace import check_root_made_user_dir, root_made_parent

    target = Path(os.path.abspath(target))
    parent = target.parent
    if parent.parent == root_made_parent() and parent.name.isdigit():
        check_root_made_user_dir(int(parent.name))
        return target
    st = os.lstat(parent)
    if st.st_uid == 0 and not st.st_mode & 0o022 and _root_only_above(parent):
        return target
    raise NpipeError(
        f"will not link to {target}: another user could create it; use --user USER "
        f"(sockets in {root_made_parent()}/<uid>, which root makes) or a directory of root's"
    )


def _root_only_above(directory: Path) -> bool:
    return all(
        os.lstat(d).st_uid == 0 and not os.lstat(d).st_mode & 0o022
        for d in [directory, *directory.parents]
        if d != Path("/tmp")  # sticky: what root made in it stays root's
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} is out of range")
    return port


def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, not {text!r}")
    return name, password


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key.strip(), value.strip()


def _error(message: str) -> int:
    print(f"npipe: {message}", file=sys.stderr)
    return EXIT_FAILED


def _have(program: str) -> bool:
    return bool(shutil.which(program) or shutil.which(program, path=_SBIN_PATH))


# --- setup ---------------------------------------------------------------------------

# (parameter, is the value fine?, what to aim for)
_Check = tuple[str, Callable[[str], bool] | None, str]
_CHECKS: tuple[_Check, ...] = (
    ("server min protocol", lambda v: v.upper() not in ("CORE", "COREPLUS", "LANMAN1",
                                                        "LANMAN2", "NT1"),
     "SMB2_02 or later: no SMB1"),
    ("map to guest", lambda v: v.lower() == "never",
     "never: unknown names and bad passwords are refused, not made guests"),
    ("restrict anonymous", lambda v: v == "2", "2: no anonymous sessions"),
    ("server signing", None, "default (SMB 3.1.1 signs anyway) or mandatory"),
    ("server smb encrypt", None, "required or desired to keep pipe traffic private on the wire"),
    ("interfaces", None, "with 'bind interfaces only = yes': only the networks you mean"),
    ("bind interfaces only", None, "yes, with 'interfaces'"),
    ("rpc start on demand helpers", None,
     "yes: samba-dcerpcd serves Samba's built-in pipes; do not reuse their names"),
)


def setup(args: argparse.Namespace) -> int:
    if not _have("smbd"):
        return _error(f"smbd not found: {INSTALL_HINT}")
    conf = args.conf
    if conf is None and os.environ.get(ENV_CONF):
        conf = Path(os.environ[ENV_CONF])
    if conf is not None and not conf.is_file():
        return _error(f"no smb.conf at {conf}")
    shown_conf = conf or DEFAULT_CONF
    try:
        np_dir = np_dir_from_conf(conf)
    except NpipeError as e:
        return _error(str(e))
    source = f"${ENV_NP_DIR}" if os.environ.get(ENV_NP_DIR) else f"'ncalrpc dir' in {shown_conf}"
    print(f"smb.conf: {shown_conf}")
    print(f"np dir:   {np_dir}  (from {source})")
    print(f"          an SMB client's pipe NAME on IPC$ reaches {np_dir}/<name in lower case>")

    ok = _check_np_dir(np_dir, apply=args.apply)

    values = global_parameters(conf)
    if not values:
        print("(testparm gave no settings: cannot show the smb.conf lines to check)")
    else:
        print(f"\nsmb.conf [global] settings that matter for remote pipes ({shown_conf}):")
        for name, good, aim in _CHECKS:
            value = values.get(name, "")
            mark = "" if good is None else ("  ok" if good(value) else "  CHECK")
            print(f"  {name} = {value}{mark}\n      # {aim}")
    pid = _running_smbd(values)
    if pid is not None:
        print(f"\nsmbd is running (pid {pid}); it reads smb.conf changes on "
              "'smbcontrol smbd reload-config'")
    else:
        print("\nsmbd does not seem to be running (start it: systemctl start smbd)")
    return EXIT_OK if ok else EXIT_FAILED


def _check_np_dir(np_dir: Path, *, apply: bool) -> bool:
    parent = np_dir.parent
    if not parent.is_dir():
        if not apply or os.geteuid() != 0:
            print(f"npipe: {parent} does not exist: 'npipe samba setup --apply', as root, "
                  "creates it", file=sys.stderr)
            return False
        try:
            parent.mkdir(mode=0o755, parents=True)
        except OSError as e:
            print(f"npipe: cannot create {parent}: {e}", file=sys.stderr)
            return False
        print(f"created {parent} (root, 0755)")
    try:
        st = np_dir.lstat()
    except FileNotFoundError:
        print(f"{np_dir} does not exist yet: smbd creates it (root-owned, 0700) when it starts")
        return True
    except OSError as e:
        print(f"npipe: cannot inspect {np_dir}: {e}", file=sys.stderr)
        return False
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        print(f"npipe: {np_dir} is not a directory: smbd will not start; remove it",
              file=sys.stderr)
        return False
    if st.st_uid != 0 or mode != 0o700:
        print(f"npipe: {np_dir} is owned by uid {st.st_uid} with mode {mode:04o}: smbd refuses "
              f"to start unless it is root-owned 0700 (chown root:root {np_dir}; chmod 0700 "
              f"{np_dir})", file=sys.stderr)
        return False
    print(f"{np_dir} exists, root-owned, mode 0700: ok")
    return True


def _running_smbd(values: dict[str, str]) -> int | None:
    pid_dir = values.get("pid directory")
    if not pid_dir:
        return None
    try:
        pid = int((Path(pid_dir) / "smbd.pid").read_text().split()[0])
        os.kill(pid, 0)
    except PermissionError:
        return pid  # alive, someone else's
    except (OSError, ValueError, IndexError):
        return None
    return pid


# --- run -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return _error("npipe samba run needs root: smbd runs as root")
    if not _have("smbd"):
        return _error(f"smbd not found: {INSTALL_HINT}")
    if args.netns and not _have("ip"):
        return _error("ip not found: install Debian's iproute2 package")
    try:
        server = PrivateSmbd(
            args.dir, port=args.port, interfaces=args.interfaces,
            bind_address=args.bind_address, users=dict(args.users),
            extra=dict(args.options), netns=args.netns,
        )
    except (NpipeError, ValueError) as e:
        return _error(str(e))

    # The handler only appends to a list. Python runs it in the main thread, between
    # any two bytecodes, so one that took a lock (threading.Event.set does) could find
    # that lock held by the very code it interrupted, Event.wait's, and wait forever.
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    from npipe.cli.service import STOP_SIGNALS

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        try:
            server.start(timeout=args.timeout)
        except (NpipeError, OSError) as e:
            return _error(str(e))
        where = f" in network namespace {args.netns}" if args.netns else ""
        print(f"smbd (pid {server.pid}) listening on {', '.join(server.addresses)} port "
              f"{server.port}{where}")
        print(f"config: {server.conf_path}")
        print(f"np dir: {server.np_dir}")
        print(f"logs:   {server.log_dir}")
        print("press Ctrl-C to stop", flush=True)
        while not stopping:
            if not server.running:
                return _error(f"smbd exited on its own:\n{server.log_tail()}")
            time.sleep(STOP_POLL)
        print("stopping smbd", flush=True)
        return EXIT_OK
    finally:
        try:
            server.stop()
        except NpipeError as e:
            _error(str(e))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
