"""``npipe service``: a serve command (serve-grpc, serve-asgi, serve-wsgi, forward, expose)
as a Windows service, the counterpart of contrib/systemd/.

The platform-neutral part (tested on Linux): which serve command a config file is for,
checking the file as that command will read it, the command line the service control
manager (SCM) runs, and :class:`ServiceRunner`, which runs the command in the main thread
(asyncio's signal handling lives there) and stops it with SIGINT, as Ctrl+C would.

The pywin32 part (the ``windows-service`` extra, imported only here, only on Windows) is
thin: CreateService/DeleteService, and the service class the SCM drives. The process the
SCM starts is ``python -m npipe service run NAME --command CMD --config FILE``: its main
thread runs the command, a second thread StartServiceCtrlDispatcher. The service reports
SERVICE_RUNNING once the command says it is ready (``service.ready()`` sets
:data:`npipe.cli.service.READY`) or
after :data:`READY_FALLBACK` seconds, and stops on SERVICE_CONTROL_STOP/SHUTDOWN.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npipe.cli import service as cli_service
from npipe.errors import ConfigError, UnsupportedPlatform

# How the host reads a command line as ``npipe`` would (npipe.cli.build_parser's
# parse_args), and runs one (npipe.cli.main): handed in by the CLI, which sits above.
ParseArgv = Callable[[list[str]], Any]

# The serve commands, and the positional their config file names (contrib/README.md).
SERVE_COMMANDS = {"serve-grpc": "function", "serve-asgi": "app", "serve-wsgi": "app",
                  "forward": "address", "expose": "name"}
START_TYPES = ("auto", "delayed", "manual", "disabled")
# A service name: at most 256 characters, no '/' or '\\' (CreateServiceW, lpServiceName).
MAX_SERVICE_NAME = 256
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
READY_FALLBACK = 30.0  # seconds before a command that never says ready is RUNNING anyway
STOP_WAIT_HINT_MS = 30_000
ERROR_SERVICE_SPECIFIC_ERROR = 1066  # dwWin32ExitCode when dwServiceSpecificExitCode counts
PASSWORD_ENV = "NPIPE_SERVICE_PASSWORD"  # never on a command line


@dataclass(frozen=True)
class ServiceSpec:
    """What ``npipe service install`` registers."""

    name: str
    command: str
    config: Path
    working_dir: Path
    start: str = "auto"
    account: str | None = None  # None: the virtual account NT SERVICE\\NAME

    @property
    def display_name(self) -> str:
        return f"npipe {self.command} {self.name}"

    @property
    def service_account(self) -> str:
        return self.account or f"NT SERVICE\\{self.name}"


def check_service_name(name: str) -> str:
    if not name or len(name) > MAX_SERVICE_NAME or not _SERVICE_NAME.match(name):
        raise ConfigError(
            f"bad service name {name!r}: letters, digits, '.', '_' and '-' "
            f"(at most {MAX_SERVICE_NAME}), starting with a letter or digit"
        )
    return name


def command_for_config(config: Path, command: str | None = None) -> str:
    """The serve command ``config`` is for: ``command`` if given, else the one whose
    positional the file names (function, app, address or name; an app is serve-asgi's
    unless ``command`` says serve-wsgi)."""
    if command is not None:
        if command not in SERVE_COMMANDS:
            raise ConfigError(
                f"--command {command!r}: one of {', '.join(SERVE_COMMANDS)}"
            )
        return command
    keys = set(cli_service.read_config(str(config)))
    found = [cmd for cmd, key in SERVE_COMMANDS.items() if key in keys]
    if found == ["serve-asgi", "serve-wsgi"]:
        # Both take an app: ASGI unless told (serve-asgi refuses a WSGI app at start-up,
        # in one line that names serve-wsgi, so the service fails once and says why).
        found = ["serve-asgi"]
    if len(found) != 1:
        named = " and ".join(f"{SERVE_COMMANDS[c]!r}" for c in found) or "none of them"
        raise ConfigError(
            f"{config}: cannot tell which command it is for (it names {named} of "
            "function, app, address, name): give --command"
        )
    return found[0]


def serve_argv(command: str, config: Path) -> list[str]:
    """The npipe command line the service runs (after ``npipe``)."""
    return [command, "--config", str(config)]


def check_config(command: str, config: Path, parse: ParseArgv) -> None:
    """Read ``config`` as ``npipe COMMAND --config FILE`` will (``parse``: npipe's own
    argument parser), so that a bad file fails at install rather than at every start:
    unknown keys, bad values, a missing positional or required option."""
    argv = serve_argv(command, config)
    args = parse(argv)
    cli_service.apply_config(args.config_parser, args, argv)
    required = {"serve-grpc": ("pipe",), "serve-asgi": ("pipe",), "serve-wsgi": ("pipe",),
                "forward": ("listen",), "expose": ("to",)}[command]
    cli_service.require(args, SERVE_COMMANDS[command], *required)


def python_argv(
    *,
    executable: str,
    base_executable: str,
    prefix: str,
    base_prefix: str,
    site_dirs: Sequence[str],
) -> list[str]:
    """The interpreter part of the service's command line, up to ``npipe``'s arguments.

    A virtualenv's python.exe on Windows is a launcher that starts the base interpreter
    as a child, so the process the SCM started would not be the one calling
    StartServiceCtrlDispatcher. In a virtualenv the base interpreter is run instead, with
    the environment's site-packages added (their .pth files too: pywin32's, editable
    installs)."""
    if prefix == base_prefix:
        return [executable, "-m", "npipe"]
    boot = (
        "import site, sys, runpy; [site.addsitedir(d) for d in sys.argv.pop(1).split("
        f"{os.pathsep!r})]; runpy.run_module('npipe', run_name='__main__', alter_sys=True)"
    )
    return [base_executable, "-c", boot, os.pathsep.join(site_dirs)]


def this_python_argv() -> list[str]:
    import site

    return python_argv(
        executable=sys.executable,
        base_executable=getattr(sys, "_base_executable", sys.executable),
        prefix=sys.prefix, base_prefix=sys.base_prefix, site_dirs=site.getsitepackages(),
    )


def run_argv(spec: ServiceSpec) -> list[str]:
    """``service run`` as the SCM will call it (after the interpreter part)."""
    return ["service", "run", spec.name, "--command", spec.command, "--config",
            str(spec.config), "--working-dir", str(spec.working_dir)]


def command_line(argv: Sequence[str]) -> str:
    """One Windows command line (the service's binary path) from ``argv``; the quoting
    is the MS C runtime's, as CreateProcess's callee parses it."""
    return subprocess.list2cmdline(list(argv))


def make_spec(
    name: str,
    config: str,
    parse: ParseArgv,
    *,
    command: str | None = None,
    working_dir: str | None = None,
    start: str = "auto",
    account: str | None = None,
) -> ServiceSpec:
    """A checked :class:`ServiceSpec`: the name, the file (absolute, readable, valid for
    its command), the start type."""
    check_service_name(name)
    path = Path(config).absolute()
    if not path.is_file():
        raise ConfigError(f"--config {config}: no such file")
    cmd = command_for_config(path, command)
    check_config(cmd, path, parse)
    if start not in START_TYPES:
        raise ConfigError(f"--start {start!r}: one of {', '.join(START_TYPES)}")
    wd = Path(working_dir).absolute() if working_dir else path.parent
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: no such directory")
    return ServiceSpec(name, cmd, path, wd, start, account)


# -- running the command: platform-neutral, driven by the service class ------------------

class ServiceRunner:
    """Runs ``command()`` (returning an exit code) in the calling (main) thread and lets
    other threads wait for it to be ready or done, and ask it to stop."""

    def __init__(self, command: Callable[[], int]) -> None:
        self.command = command
        self.done = threading.Event()
        self.exit_code: int | None = None
        # One command per process: a readiness left over from before is not this one's
        # (the SCM would otherwise stop a command that has not yet installed its handlers).
        self.ready = cli_service.READY
        self.ready.clear()
        self.stop_requested = threading.Event()

    def run(self) -> int:
        try:
            self.exit_code = int(self.command())
        except SystemExit as e:
            self.exit_code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            self.exit_code = 1
            raise
        finally:
            self.done.set()
        return self.exit_code

    def wait_ready(self, timeout: float) -> bool:
        """True once the command is ready, False if it ended first or ``timeout`` passed
        (poll in small steps: two events, no condition variable across them)."""
        deadline = _now() + timeout
        while not self.done.is_set():
            if self.ready.wait(min(0.1, max(deadline - _now(), 0.0))):
                return True
            if _now() >= deadline:
                return False
        return False

    def request_stop(self) -> None:
        """Stop the command as Ctrl+C/SIGTERM would: SIGINT, whose Python handler runs in
        the main thread (and wakes its event loop through the signal wakeup fd)."""
        if not self.stop_requested.is_set() and not self.done.is_set():
            self.stop_requested.set()
            signal.raise_signal(signal.SIGINT)


def _now() -> float:
    import time

    return time.monotonic()


class LineSink:
    """A text stream that hands each complete line to ``emit`` (stderr of a service,
    which has no console, goes to the event log this way)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if line.strip():
                self.emit(line.rstrip("\r"))
        return len(text)

    def flush(self) -> None:
        if self.buffer.strip():
            self.emit(self.buffer)
        self.buffer = ""


# -- the Windows side (pywin32) ---------------------------------------------------------

def _pywin32() -> tuple[Any, Any, Any]:
    if sys.platform != "win32":
        raise UnsupportedPlatform("Windows only: on Linux use contrib/systemd/")
    try:
        import servicemanager
        import win32service
        import win32serviceutil
    except ImportError as e:
        raise UnsupportedPlatform(
            f"npipe service needs pywin32 ({e}): pip install 'npipe[windows-service]'"
        ) from e
    return servicemanager, win32service, win32serviceutil


_START = {"auto": 0x2, "delayed": 0x2, "manual": 0x3, "disabled": 0x4}  # SERVICE_*_START


def install(spec: ServiceSpec, password: str | None = None) -> None:
    """Register ``spec`` with the SCM (CreateServiceW); administrators only."""
    _, win32service, _ = _pywin32()
    binary = command_line([*this_python_argv(), *run_argv(spec)])
    scm = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
    try:
        handle = win32service.CreateService(
            scm, spec.name, spec.display_name, win32service.SERVICE_ALL_ACCESS,
            win32service.SERVICE_WIN32_OWN_PROCESS, _START[spec.start],
            win32service.SERVICE_ERROR_NORMAL, binary, None, 0, None,
            spec.service_account, password,
        )
        try:
            win32service.ChangeServiceConfig2(
                handle, win32service.SERVICE_CONFIG_DESCRIPTION,
                f"npipe {spec.command} --config {spec.config}",
            )
            if spec.start == "delayed":
                win32service.ChangeServiceConfig2(
                    handle, win32service.SERVICE_CONFIG_DELAYED_AUTO_START_INFO, True)
        finally:
            win32service.CloseServiceHandle(handle)
    finally:
        win32service.CloseServiceHandle(scm)


def remove(name: str) -> None:
    """Delete the service ``name`` (it goes once stopped)."""
    _, _, win32serviceutil = _pywin32()
    win32serviceutil.RemoveService(check_service_name(name))


def run(name: str, command: Callable[[], int]) -> int:
    """Host ``command`` as the service ``name``: what the SCM's process runs."""
    servicemanager, win32service, win32serviceutil = _pywin32()
    runner = ServiceRunner(command)
    entered = threading.Event()

    framework: Any = win32serviceutil.ServiceFramework

    class NpipeService(framework):  # type: ignore[misc]
        _svc_name_ = name
        _svc_display_name_ = name

        def SvcRun(self) -> None:  # the SCM's service thread, until the command ends
            entered.set()
            started = _now()
            while not runner.wait_ready(1.0) and not runner.done.is_set():
                if _now() - started > READY_FALLBACK:
                    break
                self.ReportServiceStatus(win32service.SERVICE_START_PENDING, waitHint=5000)
            if not runner.done.is_set():
                self.ReportServiceStatus(win32service.SERVICE_RUNNING)
            runner.done.wait()
            code = runner.exit_code or 0
            self.ReportServiceStatus(
                win32service.SERVICE_STOPPED,
                win32ExitCode=ERROR_SERVICE_SPECIFIC_ERROR if code else 0, svcExitCode=code,
            )

        def SvcStop(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING,
                                     waitHint=STOP_WAIT_HINT_MS)
            runner.request_stop()

        SvcShutdown = SvcStop

    servicemanager.Initialize()
    servicemanager.PrepareToHostSingle(NpipeService)
    failed: list[BaseException] = []

    def dispatch() -> None:  # returns once the service has stopped
        try:
            servicemanager.StartServiceCtrlDispatcher()
        except Exception as e:  # e.g. ERROR_FAILED_SERVICE_CONTROLLER_CONNECT (1063)
            failed.append(e)

    dispatcher = threading.Thread(target=dispatch, name="npipe-scm", daemon=True)
    dispatcher.start()
    # The SCM gives a service 30 s to connect; the command starts once it has.
    while not entered.wait(0.1):
        if failed or not dispatcher.is_alive():
            raise UnsupportedPlatform(
                "npipe service run is for the service manager to start "
                f"({failed[0] if failed else 'the dispatcher ended'}); run the serve "
                "command itself to try it"
            )
    # No console in a service: the command's one-line errors go to the event log.
    sys.stderr = LineSink(servicemanager.LogErrorMsg)
    code = runner.run()
    dispatcher.join(timeout=10)
    return code
