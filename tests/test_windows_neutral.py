"""The platform-neutral parts of Windows pipes (npipe.windows.*): run on Linux and Windows."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import parse_address
from npipe.cli import build_parser, service
from npipe.cli import winservice_host as service_host
from npipe.errors import (
    AccessDenied,
    AddressError,
    AuthenticationError,
    ConfigError,
    ConnectionLost,
    HostUnreachable,
    NpipeError,
    PipeBusy,
    PipeInUse,
    PipeNotFound,
)
from npipe.windows import errors as werr
from npipe.windows import names, sddl
from npipe.windows.identity import (
    acl_admits,
    check_server_owner,
    enabled_group_sids,
    windows_caller,
)
from npipe.windows.waiting import (
    MAX_WAIT_MS,
    Sleep,
    Wait,
    WaitPolicy,
    open_with_wait,
    open_with_wait_async,
)

OWNER = "S-1-5-21-1111111111-2222222222-3333333333-1001"
ALICE = "S-1-5-21-1111111111-2222222222-3333333333-1002"
OPS = "S-1-5-21-1111111111-2222222222-3333333333-2001"


def parse(argv: list[str]) -> object:
    """npipe's own parser, as the CLI hands it to the service host."""
    return build_parser().parse_args(argv)


def winerror(code: int) -> OSError:
    e = OSError(22, f"Windows error {code}")
    e.winerror = code  # type: ignore[attr-defined]  # as OSError has it on Windows
    return e


# -- sddl ---------------------------------------------------------------------------------


def test_client_access_mask_reads_and_writes_but_never_creates_instances() -> None:
    assert sddl.CLIENT_ACCESS == 0x12018B
    assert sddl.FILE_CREATE_PIPE_INSTANCE == sddl.FILE_APPEND_DATA == 0x4
    assert not sddl.CLIENT_ACCESS & sddl.FILE_CREATE_PIPE_INSTANCE
    needed = (sddl.FILE_READ_DATA | sddl.FILE_WRITE_DATA | sddl.SYNCHRONIZE
              | sddl.FILE_READ_ATTRIBUTES | sddl.READ_CONTROL)
    assert sddl.CLIENT_ACCESS & needed == needed
    assert sddl.FILE_GENERIC_WRITE & sddl.FILE_CREATE_PIPE_INSTANCE  # why it is never given


def test_owner_only_local_pipe() -> None:
    text = sddl.pipe_security_descriptor(OWNER_ONLY, owner_sid=OWNER.lower(), remote=False)
    assert text == f"O:{OWNER}D:P(D;;FA;;;NU)(A;;FA;;;{OWNER})(A;;FA;;;SY)(A;;FA;;;BA)"


def test_admitted_principals_get_client_access_only() -> None:
    acl = Acl.parse(f"sid:{ALICE},user:CORP\\Bob,user:carol@CORP.TEST")
    resolved = {"corp\\bob": OPS, "carol@corp.test": "S-1-5-21-9-9-9-1500"}
    text = sddl.pipe_security_descriptor(
        acl, owner_sid=OWNER, remote=True, resolve_account=resolved.__getitem__)
    assert "(D;;FA;;;NU)" not in text  # remote clients are the point
    aces = text.split("D:P", 1)[1]
    for sid in (ALICE, OPS, "S-1-5-21-9-9-9-1500"):
        assert f"(A;;0x12018b;;;{sid})" in aces
    assert aces.count(";FA;") == 3  # owner, SY, BA only
    for forbidden in ("GA", "GW", "FW", "WD"):
        assert f";{forbidden};" not in aces and f";;;{forbidden})" not in aces


def test_everyone_is_one_ace_for_world_and_network_still_denied_locally() -> None:
    text = sddl.pipe_security_descriptor(Acl(everyone=True), owner_sid=OWNER, remote=False)
    assert text.index("(D;;FA;;;NU)") < text.index("(A;")  # deny first: canonical order
    assert text.endswith("(A;;0x12018b;;;WD)")


def test_remote_pipe_must_name_its_network_callers() -> None:
    with pytest.raises(ConfigError, match="needs an ACL that names"):
        sddl.pipe_security_descriptor(OWNER_ONLY, owner_sid=OWNER, remote=True)


@pytest.mark.parametrize("acl, entry", [(Acl(uids=frozenset({1001})), "uid:1001"),
                                         (Acl(gids=frozenset({50})), "gid:50")])
def test_unix_ids_have_no_meaning_on_windows(acl: Acl, entry: str) -> None:
    with pytest.raises(ConfigError, match=entry):
        sddl.pipe_security_descriptor(acl, owner_sid=OWNER, remote=False)


def test_accounts_need_a_resolver_and_unknown_accounts_fail_by_name() -> None:
    acl = Acl.parse("user:CORP\\ghost")
    with pytest.raises(ConfigError, match="cannot be resolved"):
        sddl.pipe_security_descriptor(acl, owner_sid=OWNER, remote=False)

    def lookup(name: str) -> str:
        raise LookupError("no such account")

    with pytest.raises(ConfigError, match=r"unknown account .*ghost"):
        sddl.pipe_security_descriptor(acl, owner_sid=OWNER, remote=False, resolve_account=lookup)


@pytest.mark.parametrize("bad", [
    "S-1-5-21)(A;;FA;;;WD", "S-1-5-21-1(A;;GA;;;WD)", "S-1-5", "S-2-5-21", "S-1-5-99999999999",
    "WD", "", "S-1-5-21-1;;", "S-1-5-\n21",
])
def test_no_sddl_injection_through_a_sid(bad: str) -> None:
    with pytest.raises(ConfigError):
        sddl.strict_sid(bad)
    with pytest.raises(ConfigError):
        sddl.pipe_security_descriptor(OWNER_ONLY, owner_sid=bad, remote=False)
    # An Acl takes anything that starts with S-1- (npipe.acl); the SDDL builder does not,
    # nor a resolver's answer.
    if bad.upper().startswith("S-1-"):
        with pytest.raises(ConfigError):
            sddl.pipe_security_descriptor(Acl(sids=frozenset({bad})), owner_sid=OWNER,
                                          remote=False)
    with pytest.raises(ConfigError):
        sddl.pipe_security_descriptor(Acl.parse("user:CORP\\x"), owner_sid=OWNER,
                                      remote=False, resolve_account=lambda n: bad)


# -- names --------------------------------------------------------------------------------


def test_pipe_paths() -> None:
    assert names.pipe_path("api") == "\\\\.\\pipe\\api"
    assert names.pipe_path("//./pipe/Api") == "\\\\.\\pipe\\Api"
    assert names.pipe_path("//srv.example/pipe/api") == "\\\\srv.example\\pipe\\api"
    assert names.pipe_path(parse_address("\\\\[fe80::1]\\pipe\\x")) == (
        "\\\\fe80--1.ipv6-literal.net\\pipe\\x")
    assert names.is_local("api") and not names.is_local("//srv/pipe/api")


def test_pipe_path_limits() -> None:
    longest = "n" * names.MAX_WINDOWS_NAME
    assert len(names.pipe_path(longest)) == 256
    with pytest.raises(AddressError, match="too long for Windows"):
        names.pipe_path(longest + "n")
    with pytest.raises(AddressError, match="port 445"):
        names.pipe_path("//srv:4445/pipe/api")
    with pytest.raises(AddressError, match="Unix socket"):
        names.pipe_path("unix:/run/x.sock")


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("code, opening, cls", [
    (2, True, PipeNotFound), (3, True, PipeNotFound), (5, True, AccessDenied),
    (5, False, PipeInUse), (231, True, PipeBusy), (121, True, PipeBusy),
    (53, True, HostUnreachable), (64, True, HostUnreachable), (1231, True, HostUnreachable),
    (1326, True, AuthenticationError), (1327, True, AuthenticationError),
    (109, True, ConnectionLost), (232, False, ConnectionLost), (233, True, ConnectionLost),
    (123, True, AddressError), (536, False, ConnectionLost),
])
def test_pipe_error_table(code: int, opening: bool, cls: type[NpipeError]) -> None:
    e = werr.pipe_error(code, "\\\\.\\pipe\\api", opening=opening)
    assert type(e) is cls
    assert "\\\\.\\pipe\\api" in str(e) or "api" in str(e)
    assert "\n" not in str(e)


def test_unknown_code_keeps_the_number_and_the_os_text() -> None:
    e = werr.from_oserror(winerror(1450), "\\\\.\\pipe\\x", opening=False)
    assert type(e) is NpipeError and "1450" in str(e) and "Windows error 1450" in str(e)
    plain = OSError(5, "no winerror here")
    assert werr.from_oserror(plain, "p", opening=True) is plain


# -- waiting ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def test_busy_waits_with_what_is_left_then_opens() -> None:
    clock, waits, results = FakeClock(), [], [winerror(231), winerror(231), "handle"]

    def try_open() -> str:
        r = results.pop(0)
        if isinstance(r, OSError):
            raise r
        return r

    def wait(ms: int) -> bool:
        waits.append(ms)
        clock.now += 0.5
        return True

    assert open_with_wait(try_open, wait, 2.0, clock=clock, sleep=clock.sleep) == "handle"
    assert waits == [2000, 1500]


def test_busy_until_the_deadline_is_pipe_busy() -> None:
    clock = FakeClock()

    def wait(ms: int) -> bool:
        assert 1 <= ms <= MAX_WAIT_MS  # never 0 (server default) nor forever
        clock.now += ms / 1000
        return False  # ERROR_SEM_TIMEOUT

    def busy() -> None:
        raise winerror(231)

    with pytest.raises(PipeBusy) as info:
        open_with_wait(busy, wait, 3.0, path="\\\\.\\pipe\\b", clock=clock, sleep=clock.sleep)
    assert isinstance(info.value.__cause__, OSError)
    assert clock.now == pytest.approx(103.0)


def test_missing_pipe_retries_briefly_then_not_found() -> None:
    clock, tries = FakeClock(), []

    def missing() -> None:
        tries.append(clock.now)
        raise winerror(2)

    with pytest.raises(PipeNotFound):
        open_with_wait(missing, lambda ms: True, 10.0, clock=clock, sleep=clock.sleep)
    assert 1.0 <= clock.now - 100.0 < 1.25  # the default grace, not the whole timeout
    assert len(tries) > 3
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps[:-1] == sorted(gaps[:-1])  # backing off (the last one cut at the grace)


def test_missing_then_served_opens_and_grace_none_waits_to_the_deadline() -> None:
    clock = FakeClock()
    outcomes = iter([winerror(2)] * 5 + [None])

    def try_open() -> str:
        e = next(outcomes)
        if e:
            raise e
        return "h"

    assert open_with_wait(try_open, lambda ms: True, 5, clock=clock, sleep=clock.sleep) == "h"
    clock2 = FakeClock()
    with pytest.raises(PipeNotFound):
        open_with_wait(lambda: (_ for _ in ()).throw(winerror(2)), lambda ms: True, 4.0,
                       clock=clock2, sleep=clock2.sleep, missing_grace=None)
    assert clock2.now == pytest.approx(104.0)


def test_other_errors_fail_at_once() -> None:
    clock = FakeClock()
    with pytest.raises(AccessDenied):
        open_with_wait(lambda: (_ for _ in ()).throw(winerror(5)), lambda ms: True, 10,
                       clock=clock, sleep=clock.sleep)
    assert clock.now == 100.0
    with pytest.raises(ValueError, match="timeout"):
        WaitPolicy(-1, path="p", clock=clock)


def test_policy_steps_and_no_spin_when_wait_fails_early() -> None:
    clock = FakeClock()
    policy = WaitPolicy(1.0, path="p", clock=clock)
    assert policy.after_failure(winerror(231)) == Wait(1000)
    step = policy.after_wait(False)
    assert isinstance(step, Sleep) and step.seconds > 0
    assert policy.after_wait(True) is None


def test_async_twin_waits_in_the_loop() -> None:
    clock, calls = FakeClock(), []
    outcomes = iter([winerror(231), winerror(2), None])

    def try_open() -> str:
        e = next(outcomes)
        if e:
            raise e
        return "h"

    async def wait(ms: int) -> bool:
        calls.append(ms)
        await asyncio.sleep(0)
        return True

    async def sleep(seconds: float) -> None:
        clock.sleep(seconds)

    async def main() -> str:
        return await open_with_wait_async(try_open, wait, 1.5, clock=clock, sleep=sleep)

    assert asyncio.run(main()) == "h" and calls == [1500]


# -- identity -----------------------------------------------------------------------------


def test_windows_caller() -> None:
    groups = enabled_group_sids([(OPS, 0x7), ("S-1-5-32-544", 0x10), ("S-1-5-11", 0x0)])
    assert groups == (OPS,)  # deny-only Administrators and disabled groups are dropped
    c = windows_caller(pid=42, sid=ALICE.lower(), account="alice", domain="CORP",
                       group_sids=groups)
    assert c.transport == "local" and c.uid is None and c.gid is None and c.pid == 42
    assert c.sids == (ALICE, OPS) and c.name == "CORP\\alice"
    remote = windows_caller(pid=None, sid=ALICE, account="alice", domain="CORP", remote=True,
                            address="198.18.0.2")
    assert remote.transport == "smb" and remote.address == "198.18.0.2"
    with pytest.raises(ConfigError):
        windows_caller(pid=1, sid="S-1-5-21)(A;;FA;;;WD)", account=None, domain=None)


def test_acl_admits() -> None:
    alice = windows_caller(pid=1, sid=ALICE, account="Alice", domain="CORP", group_sids=[OPS])
    assert not acl_admits(OWNER_ONLY, alice, OWNER)
    assert acl_admits(OWNER_ONLY, alice, ALICE)  # the owner
    assert acl_admits(Acl.parse(f"sid:{OPS}"), alice, OWNER)  # by a group SID
    assert acl_admits(Acl.parse("user:corp\\ALICE"), alice, OWNER)  # by name, any case
    assert not acl_admits(Acl.parse("user:OTHER\\alice"), alice, OWNER)
    assert acl_admits(Acl.parse("user:alice@corp.test"), alice, OWNER, resolved={ALICE})
    assert acl_admits(Acl(everyone=True), alice, OWNER)
    system = windows_caller(pid=4, sid="S-1-5-18", account="SYSTEM", domain="NT AUTHORITY")
    assert acl_admits(OWNER_ONLY, system, OWNER)
    admin = windows_caller(pid=5, sid=ALICE, account="a", domain="D",
                           group_sids=["S-1-5-32-544"])
    assert acl_admits(OWNER_ONLY, admin, OWNER)


def test_check_server_owner() -> None:
    for trusted in (OWNER, "S-1-5-18", "S-1-5-32-544"):
        check_server_owner(None, trusted, OWNER)
    with pytest.raises(AccessDenied, match=r"CORP\\svc"):
        check_server_owner(None, ALICE, OWNER, path="\\\\.\\pipe\\x", actual_name="CORP\\svc")
    check_server_owner(ALICE.lower(), ALICE, OWNER)
    check_server_owner("svc", ALICE, OWNER, actual_name="CORP\\SVC")
    check_server_owner("corp\\svc", ALICE, OWNER, actual_name="CORP\\svc")
    with pytest.raises(AccessDenied):
        check_server_owner("OTHER\\svc", ALICE, OWNER, actual_name="CORP\\svc")
    check_server_owner("CORP\\svc", ALICE, OWNER, resolve_account=lambda n: ALICE)
    with pytest.raises(ConfigError, match="uid"):
        check_server_owner(1001, ALICE, OWNER)


# -- the service host ---------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_service_spec_from_a_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "shop.toml", 'function = "npipe.examples.buy.serve:add_services"'
                   '\npipe = "shop"\nacl = ["sid:S-1-5-32-545"]\n')
    spec = service_host.make_spec("shop", str(config), parse)
    assert spec.command == "serve-grpc" and spec.working_dir == tmp_path
    assert spec.service_account == "NT SERVICE\\shop"
    argv = service_host.run_argv(spec)
    assert argv[:3] == ["service", "run", "shop"] and str(config) in argv
    line = service_host.command_line(["C:\\Program Files\\Python\\python.exe", "-m", "npipe",
                                      *argv])
    assert line.startswith('"C:\\Program Files\\Python\\python.exe" -m npipe service run shop')


@pytest.mark.parametrize("text, match", [
    ('pipe = "x"\n', "cannot tell which command"),
    ('app = "a:b"\nfunction = "f:g"\npipe = "x"\n', "cannot tell which command"),
    ('app = "a:b"\npipe = "x"\nbogus = 1\n', "unknown option 'bogus'"),
    ('app = "a:b"\n', "missing --pipe"),
    ('name = "ssh"\nto = "tcp:127.0.0.1:22"\nmax-connections = 0\n', "max-connections"),
    ('app = [', "not valid TOML"),
])
def test_bad_config_fails_at_install(tmp_path: Path, text: str, match: str) -> None:
    config = write(tmp_path / "svc.toml", text)
    with pytest.raises(ConfigError, match=match):
        service_host.make_spec("svc", str(config), parse)


def test_service_name_and_options_checked(tmp_path: Path) -> None:
    config = write(tmp_path / "e.toml", 'name = "ssh"\nto = "tcp:127.0.0.1:22"\n')
    assert service_host.make_spec("e", str(config), parse).command == "expose"
    for bad in ("", "a/b", "a\\b", "-x", "x" * 257, "a b"):
        with pytest.raises(ConfigError, match="service name"):
            service_host.make_spec(bad, str(config), parse)
    with pytest.raises(ConfigError, match="--command"):
        service_host.make_spec("e", str(config), parse, command="relay")
    with pytest.raises(ConfigError, match="no such file"):
        service_host.make_spec("e", str(tmp_path / "missing.toml"), parse)


def test_python_argv_outside_and_inside_a_virtualenv() -> None:
    plain = service_host.python_argv(executable="C:\\Py\\python.exe", base_executable="x",
                                     prefix="C:\\Py", base_prefix="C:\\Py", site_dirs=[])
    assert plain == ["C:\\Py\\python.exe", "-m", "npipe"]
    venv = service_host.python_argv(
        executable="C:\\venv\\Scripts\\python.exe", base_executable="C:\\Py\\python.exe",
        prefix="C:\\venv", base_prefix="C:\\Py", site_dirs=["C:\\venv\\Lib\\site-packages"])
    assert venv[0] == "C:\\Py\\python.exe" and venv[1] == "-c"
    assert venv[3] == "C:\\venv\\Lib\\site-packages"


def test_python_argv_of_a_virtualenv_runs_npipe(tmp_path: Path) -> None:
    # The bootstrap for real, with this interpreter as the "base" one: it must find
    # npipe through the site directory it is given and run the CLI.
    import npipe

    site_dir = str(Path(npipe.__file__).parent.parent)
    argv = service_host.python_argv(executable="unused", base_executable=sys.executable,
                                    prefix="venv", base_prefix="base", site_dirs=[site_dir])
    done = subprocess.run([*argv, "service", "remove", "x"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": ""})
    if sys.platform == "win32":
        assert "service" in done.stdout + done.stderr
    else:
        assert done.returncode == 2 and "Windows only" in done.stderr


def test_cli_on_linux_says_windows_only(tmp_path: Path) -> None:
    if sys.platform == "win32":
        pytest.skip("the Windows-only message is for other systems")
    from npipe.cli import main

    config = write(tmp_path / "api.toml", 'app = "a:b"\npipe = "api"\n')
    for argv in (["service", "install", "api", "--config", str(config)],
                 ["service", "remove", "api"],
                 ["service", "run", "api", "--config", str(config), "--command", "serve-asgi"]):
        assert main(argv) == 2


def test_runner_stops_the_command_with_sigint_from_another_thread() -> None:
    # The command runs in the main thread as the serve commands do, awaiting SIGINT on
    # its event loop; the SCM's thread stops it.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        # As npipe.cli.service.until_stop_signal: the loop's handler on POSIX; on Windows
        # (no add_signal_handler) the Python handler, which the proactor's wakeup fd
        # lets run at once.
        previous = signal.getsignal(signal.SIGINT)
        if sys.platform == "win32":
            signal.signal(signal.SIGINT,
                          lambda *_: loop.call_soon_threadsafe(stop.set_result, None))
        else:
            loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
        try:
            service.ready()
            await asyncio.wait_for(stop, 10)
            return 0
        finally:
            if sys.platform != "win32":
                loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)

    runner = service_host.ServiceRunner(lambda: asyncio.run(serve()))
    seen: list[bool] = []

    def scm() -> None:
        seen.append(runner.wait_ready(10))
        runner.request_stop()

    thread = threading.Thread(target=scm)
    thread.start()
    started = time.monotonic()
    assert runner.run() == 0
    assert time.monotonic() - started < 5  # stopped by the signal, not the time-out
    thread.join(5)
    assert seen == [True] and runner.done.is_set() and runner.stop_requested.is_set()
    service.READY.clear()


def test_runner_reports_a_failed_command_and_never_ready() -> None:
    runner = service_host.ServiceRunner(lambda: 3)
    assert runner.run() == 3 and runner.exit_code == 3
    assert runner.wait_ready(5) is False  # ended: no waiting out the timeout
    runner.request_stop()  # after the end: no signal
    assert not runner.stop_requested.is_set()


def test_line_sink() -> None:
    lines: list[str] = []
    sink = service_host.LineSink(lines.append)
    sink.write("npipe: bad")
    sink.write(" config\r\nsecond\n\n")
    sink.write("tail")
    sink.flush()
    assert lines == ["npipe: bad config", "second", "tail"]


def test_a_new_runner_is_not_ready_from_an_earlier_command() -> None:
    # A readiness left over in the process (an earlier command, or a test) must not make
    # the service manager stop a command before it has installed its signal handlers.
    service.ready()
    runner = service_host.ServiceRunner(lambda: 0)
    assert not runner.wait_ready(0.05)
