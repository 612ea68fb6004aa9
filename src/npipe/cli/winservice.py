"""``npipe service install|remove|run``: a serve command as a Windows service
(:mod:`npipe.cli.winservice_host`); on other systems use contrib/systemd/."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WINDOWS_ONLY = "npipe: service: Windows only: use contrib/systemd/ (see contrib/README.md)"
EXIT_USAGE = 2


def add_parser(
    sub: Any, parents: Sequence[argparse.ArgumentParser], *,
    parse: Callable[[list[str]], Any], main: Callable[[list[str]], int],
) -> None:
    """``parse`` and ``main`` are npipe's own (npipe.cli): the host checks a config file
    with the one and runs the command with the other."""
    from npipe.cli.winservice_host import PASSWORD_ENV, SERVE_COMMANDS, START_TYPES

    p = sub.add_parser(
        "service", parents=list(parents),
        help="run serve-grpc, serve-asgi, serve-wsgi, forward or expose as a Windows service",
        description="Install, remove or (for the service manager) run a Windows service "
        "that runs one serve command from its --config file, the counterpart of "
        "contrib/systemd/. Needs pywin32: pip install 'npipe[windows-service]'.",
    )
    p.set_defaults(parse_argv=parse, run_main=main)
    service_sub = p.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    commands = ", ".join(SERVE_COMMANDS)

    i = service_sub.add_parser(
        "install", parents=list(parents), help="register the service (administrators)",
        description="Check FILE as the command will read it, then register the service "
        "NAME, which runs `npipe COMMAND --config FILE`. The service is RUNNING once the "
        "pipe is served, and stops gracefully on Stop-Service.",
    )
    i.add_argument("name", metavar="NAME", help="the service name")
    i.add_argument("--config", metavar="FILE", required=True,
                   help="the serve command's TOML file (contrib/config/*.toml)")
    i.add_argument("--command", choices=list(SERVE_COMMANDS),
                   help=f"{commands} (default: from the positional the file names: "
                   "function, app, address, name)")
    i.add_argument("--start", choices=START_TYPES, default="auto",
                   help="when it starts (default auto)")
    i.add_argument("--user", metavar="ACCOUNT",
                   help="the account it runs as (default: its virtual account NT SERVICE\\"
                   f"NAME); a password comes from ${PASSWORD_ENV} only")
    i.add_argument("--working-dir", metavar="DIR",
                   help="where MODULE of MODULE:APP is found (default: FILE's directory)")
    i.set_defaults(func=install)

    r = service_sub.add_parser("remove", parents=list(parents), help="delete the service")
    r.add_argument("name", metavar="NAME")
    r.set_defaults(func=remove)

    run = service_sub.add_parser(
        "run", parents=list(parents), help="what the service manager starts (not for you)")
    run.add_argument("name", metavar="NAME")
    run.add_argument("--config", metavar="FILE", required=True)
    run.add_argument("--command", choices=list(SERVE_COMMANDS), required=True)
    run.add_argument("--working-dir", metavar="DIR")
    run.set_defaults(func=run_service)


def _windows_only() -> int | None:
    if sys.platform == "win32":
        return None
    print(WINDOWS_ONLY, file=sys.stderr)
    return EXIT_USAGE


def install(args: argparse.Namespace) -> int:
    if (code := _windows_only()) is not None:
        return code
    from npipe.cli import winservice_host as service_host

    spec = service_host.make_spec(
        args.name, args.config, args.parse_argv, command=args.command, working_dir=args.working_dir,
        start=args.start, account=args.user,
    )
    service_host.install(spec, os.environ.get(service_host.PASSWORD_ENV))
    print(f"installed service {spec.name}: npipe {spec.command} --config {spec.config} "
          f"as {spec.service_account}; start it with: Start-Service {spec.name}")
    return 0


def remove(args: argparse.Namespace) -> int:
    if (code := _windows_only()) is not None:
        return code
    from npipe.cli import winservice_host as service_host

    service_host.remove(args.name)
    print(f"removed service {args.name}")
    return 0


def run_service(args: argparse.Namespace) -> int:
    if (code := _windows_only()) is not None:
        return code
    from npipe.cli import winservice_host as service_host

    config = Path(args.config)
    os.chdir(args.working_dir or config.absolute().parent)
    argv = service_host.serve_argv(args.command, config)
    name = service_host.check_service_name(args.name)
    return service_host.run(name, lambda: int(args.run_main(argv)))
