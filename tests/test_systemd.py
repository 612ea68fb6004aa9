"""Running as a service: the units in contrib/systemd (systemd-analyze verify), the example
configs in contrib/config, and ``npipe serve-grpc`` as systemd runs it: a real NOTIFY_SOCKET,
SIGTERM during a call, --config, reflection, and bad input."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import npipe.grpc
from npipe.cli import build_parser, service
from npipe.cli.reflection_call import list_services
from npipe.examples.buy import buy_pb2, buy_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
CONFIGS = ROOT / "contrib" / "config"
NPIPE = [sys.executable, "-m", "npipe"]
# unit -> the subcommand it runs; example config -> the subcommand it is for
COMMANDS = {
    "npipe-grpc@.service": "serve-grpc",
    "npipe-asgi@.service": "serve-asgi",
    "npipe-forward@.service": "forward",
    "npipe-expose@.service": "expose",
}
EXAMPLES = {
    "shop.toml": "serve-grpc",
    "api.toml": "serve-asgi",
    "engine.toml": "forward",
    "ssh.toml": "expose",
}
WAIT = 30.0
INSTALLED_NPIPE = "/usr/local/bin/npipe"  # where contrib/README.md links the venv's npipe


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path:
        return path
    reason = f"{tool} is not installed"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so this must not be skipped", pytrace=False)
    pytest.skip(reason)


# -- the units -------------------------------------------------------------------------


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; a key may repeat, as systemd allows."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def verify_problems(unit: Path, tmp_path: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about an instance of template ``unit``.

    verify exits 0 after a mere warning (an unknown key, a value it cannot parse and
    ignores), so any line about the unit counts, and so does the exit code.
    """
    tool = _need("systemd-analyze")
    copy = tmp_path / unit.name
    # verify checks that ExecStart's program exists: the units run contrib/README.md's
    # /usr/local/bin/npipe, which is this machine's only if it installed npipe that way.
    copy.write_text(unit.read_text().replace(INSTALLED_NPIPE, str(Path(sys.executable).parent
                                                                 / "npipe")))
    instance = copy.with_name(unit.name.replace("@.", "@demo."))
    done = subprocess.run(
        [tool, "verify", "--man=no", str(instance)], capture_output=True, text=True,
        timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    stem = unit.name.split("@")[0]
    problems = [
        line for line in (done.stdout + done.stderr).splitlines()
        if stem in line or str(tmp_path) in line
    ]
    if done.returncode != 0:
        problems.append(f"exit code {done.returncode}: {done.stderr.strip()}")
    return problems


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unit_verifies_cleanly(name: str, tmp_path: Path) -> None:
    assert verify_problems(UNITS / name, tmp_path) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t + "\nBogusKey=1\n", "Unknown key"),
        (lambda t: t.replace("TimeoutStopSec=20", "TimeoutStopSec=soon"), "soon"),
        (lambda t: t.replace(INSTALLED_NPIPE, "/nonexistent/npipe"), "/nonexistent"),
    ],
)
def test_verify_catches_a_broken_unit(
    change: Callable[[str], str], expected: str, tmp_path: Path
) -> None:
    broken = tmp_path / "src" / "npipe-grpc@.service"
    broken.parent.mkdir()
    broken.write_text(change((UNITS / "npipe-grpc@.service").read_text()))
    problems = verify_problems(broken, tmp_path)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unit_runs_the_command_as_a_notify_service(name: str) -> None:
    entries = unit_entries((UNITS / name).read_text())
    service_ = {k: v for s, k, v in entries if s == "Service"}
    assert service_["Type"] == "notify" and service_["NotifyAccess"] == "main"
    assert service_["KillSignal"] == "SIGTERM"
    assert service_["Restart"] == "on-failure"
    # a bad config (2) and a pipe name another live server holds (3) stay failed
    assert service_["RestartPreventExitStatus"].split() == ["2", "3"]
    # and any other loop ends: a start limit, in [Unit] where systemd reads it
    unit = {k: v for s, k, v in entries if s == "Unit"}
    assert int(unit["StartLimitBurst"]) <= 10 and int(unit["StartLimitIntervalSec"]) >= 30
    assert "StartLimitBurst" not in service_ and "StartLimitIntervalSec" not in service_
    assert service_["EnvironmentFile"] == "-/etc/npipe/%i.env"
    assert service_["ExecStart"] == (
        f"{INSTALLED_NPIPE} {COMMANDS[name]} --config /etc/npipe/%i.toml"
    )
    # journal lines tagged with the instance, not the interpreter's name
    assert service_["SyslogIdentifier"] == name.replace("@.service", "@%i")
    assert service_["SystemCallFilter"] == "@system-service"
    assert service_["ProtectProc"] == "invisible" and service_["RemoveIPC"] == "yes"
    assert service_["CapabilityBoundingSet"] == (
        "CAP_NET_BIND_SERVICE" if name == "npipe-forward@.service" else "")
    # the default --grace (10 s) and some room for the interpreter's exit
    assert float(service_["TimeoutStopSec"]) > 10 + 5
    assert service_["ProtectSystem"] == "strict" and service_["NoNewPrivileges"] == "yes"
    # .NET's pipes are in the machine's /tmp
    assert service_["PrivateTmp"] == "no"
    assert "DynamicUser" not in service_ and service_["User"]
    writable = " ".join(v for s, k, v in entries if k == "ReadWritePaths")
    if name != "npipe-forward@.service":  # the servers claim pipes
        assert "-/run/npipe" in writable.split() and "-/tmp" in writable.split()
        assert service_["Environment"] == "NPIPE_PIPE_DIR=%t/npipe-%i"
        assert service_["RuntimeDirectory"] == "npipe-%i"


def test_the_grpc_unit_command_line_is_npipes() -> None:
    exec_start = dict(
        (k, v) for s, k, v in unit_entries((UNITS / "npipe-grpc@.service").read_text())
        if s == "Service"
    )["ExecStart"]
    assert exec_start.split()[0] == INSTALLED_NPIPE
    words = exec_start.replace("%i", "shop").split()[1:]
    args = build_parser().parse_args(words)
    assert (args.command, args.config) == ("serve-grpc", "/etc/npipe/shop.toml")


# -- the example configs ---------------------------------------------------------------


def _subcommands() -> set[str]:
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_is_accepted_by_its_command(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("NPIPE_")]:
        if var not in ("NPIPE_PIPE_DIR", "NPIPE_MACHINE_DIR"):
            monkeypatch.delenv(var)
    command, path = EXAMPLES[name], CONFIGS / name
    # Every build has every subcommand: an example whose command is gone is an error.
    assert command in _subcommands(), f"npipe {command} is gone; contrib/config/{name} is for it"
    argv = [command, "--config", str(path)]
    args = build_parser().parse_args(argv)
    service.apply_config(args.config_parser, args, argv)
    with path.open("rb") as f:
        for key, value in service.tomllib.load(f).items():
            got = getattr(args, key.replace("-", "_"))
            assert got == value, (key, got, value)


# -- serve-grpc as systemd runs it ------------------------------------------------------

SLOW_MODULE = """\
import os, pathlib, time

from npipe.examples.buy import buy_pb2_grpc, service


def add_services(server):
    def slow(context):
        pathlib.Path("call-started").touch()
        time.sleep(float(os.environ["SLOW_CALL"]))
        return "slow"

    buy_pb2_grpc.add_MyServiceServicer_to_server(service.MyService(slow), server)


def add_nothing_and_fail(server):
    raise RuntimeError("no database")
"""


@dataclass
class Served:
    proc: subprocess.Popen[str]
    notify: socket.socket
    pipe: str
    workdir: Path
    messages: list[dict[str, str]] = field(default_factory=list)

    def next_message(self, timeout: float = WAIT) -> dict[str, str]:
        self.notify.settimeout(timeout)
        data = self.notify.recv(4096)
        message = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.messages.append(message)
        return message

    def stop(self, sig: int = signal.SIGTERM, timeout: float = WAIT) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


@contextlib.contextmanager
def serve_grpc(*args: str, pipe: str = "shop", env: dict[str, str] | None = None,
               expect_ready: bool = True) -> Iterator[Served]:
    """``npipe serve-grpc`` in its own working directory (holding slow_shop.py), with a
    real NOTIFY_SOCKET; waits for READY=1 unless told not to."""
    workdir = Path(tempfile.mkdtemp(prefix="nps", dir="/tmp"))  # short: socket paths
    (workdir / "slow_shop.py").write_text(SLOW_MODULE)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    proc = subprocess.Popen(
        [*NPIPE, "serve-grpc", *args], cwd=workdir, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": str(workdir / "notify"), "SLOW_CALL": "2",
             "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    served = Served(proc, notify, pipe, workdir)
    try:
        if expect_ready:
            try:
                message = served.next_message()
            except TimeoutError:
                proc.kill()
                raise AssertionError(f"no READY=1 in {WAIT}s: {proc.communicate()}") from None
            assert message["READY"] == "1", message
            assert message["MAINPID"] == str(proc.pid), message
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        notify.close()
        shutil.rmtree(workdir, ignore_errors=True)


def health_status(pipe: str, service_name: str = "") -> str:
    with npipe.grpc.channel(pipe) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service_name), timeout=10
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def run_npipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NPIPE, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_ready_comes_once_health_answers_serving(pipe_dir: Path) -> None:
    with serve_grpc("npipe.examples.buy.serve:add_services", "--pipe", "shop") as served:
        # READY=1 has arrived: from this moment on the pipe must answer, no retry
        r = run_npipe("health", "shop")
        assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr
        assert health_status("shop", "buy.MyService") == "SERVING"
        # systemd drops backslashes from STATUS=: none in it
        assert served.messages[0]["STATUS"] == "serving buy.MyService on pipe shop"
        code, _out, err = served.stop()
        assert code == 0, err
        assert served.next_message(5)["STOPPING"] == "1"
    assert not (pipe_dir / "shop").exists(), "the pipe is given up on stop"


def test_no_ready_when_function_fails(pipe_dir: Path) -> None:
    with serve_grpc("slow_shop:add_nothing_and_fail", "--pipe", "shop",
                    expect_ready=False) as served:
        _out, err = served.proc.communicate(timeout=WAIT)  # it ends by itself
        assert served.proc.returncode == 1
        assert err == "npipe: slow_shop:add_nothing_and_fail(server) failed: " \
            "RuntimeError: no database\n"
        served.notify.setblocking(False)
        with pytest.raises(BlockingIOError):
            served.notify.recv(4096)


def _buy_in_thread(pipe: str) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def call() -> None:
        started = time.monotonic()
        try:
            with npipe.grpc.channel(pipe) as channel:
                stub = buy_pb2_grpc.MyServiceStub(channel)  # type: ignore[no-untyped-call]
                reply = stub.Buy(buy_pb2.BuyRequest(id="pear", quantity=2, price=7), timeout=30)
                outcome["result"] = reply.result
        except grpc.RpcError as e:
            outcome["error"] = e.code()
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_sigterm_lets_the_call_in_flight_finish(pipe_dir: Path) -> None:
    with serve_grpc("slow_shop:add_services", "--pipe", "shop", "--grace", "6") as served:
        thread, outcome = _buy_in_thread("shop")
        _wait_for(served.workdir / "call-started", served.proc)
        sent = time.monotonic()
        code, _out, err = served.stop()  # SIGTERM
        took = time.monotonic() - sent
        thread.join(WAIT)
        assert code == 0, err
        assert outcome.get("result") == "bought 2 x 'pear' for 14 (caller: slow)", outcome
        assert took < 6, f"exit {took:.1f}s after SIGTERM, past the grace"
        assert float(outcome["seconds"]) >= 2  # type: ignore[arg-type]
        assert "npipe: SIGTERM: stopping, calls in flight get 6s" in err
        assert not (pipe_dir / "shop").exists()


def test_health_watchers_hear_not_serving_on_sigterm(pipe_dir: Path) -> None:
    seen: list[str] = []

    def watch() -> None:
        with npipe.grpc.channel("shop") as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="buy.MyService"), timeout=WAIT
            )
            with contextlib.suppress(grpc.RpcError):  # cancelled at the end of the grace
                for reply in stream:
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    with serve_grpc("npipe.examples.buy.serve:add_services", "--pipe", "shop",
                    "--grace", "1") as served:
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        deadline = time.monotonic() + WAIT
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == ["SERVING"]
        code, _out, err = served.stop()
        thread.join(WAIT)
        assert code == 0, err
        assert seen == ["SERVING", "NOT_SERVING"]


def test_a_call_past_the_grace_is_cancelled_and_the_stop_stays_bounded(
    pipe_dir: Path,
) -> None:
    with serve_grpc("slow_shop:add_services", "--pipe", "shop", "--grace", "1",
                    env={"SLOW_CALL": "60"}) as served:
        thread, outcome = _buy_in_thread("shop")
        _wait_for(served.workdir / "call-started", served.proc)
        sent = time.monotonic()
        code, _out, err = served.stop()
        took = time.monotonic() - sent
        thread.join(WAIT)
        assert outcome.get("error") in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert took < 1 + 2 + 3, f"exit {took:.1f}s after SIGTERM"
        # The stop systemd asked for was carried out: exit 0 (a failed unit otherwise),
        # and the journal says what it cost.
        assert code == 0, err
        assert err.strip().splitlines()[-1] == \
            "npipe: 1 call still running 1s after SIGTERM: abandoned"


def test_a_pipe_name_in_use_is_exit_3_which_the_units_do_not_restart(pipe_dir: Path) -> None:
    with serve_grpc("npipe.examples.buy.serve:add_services", "--pipe", "shop") as served:
        r = run_npipe("serve-grpc", "npipe.examples.buy.serve:add_services", "--pipe", "shop")
        assert r.returncode == 3, r.stderr
        assert r.stderr.count("\n") == 1 and "shop" in r.stderr, r.stderr
        assert served.stop()[0] == 0
    unit = (UNITS / "npipe-grpc@.service").read_text()
    assert "3" in dict((k, v) for _s, k, v in unit_entries(unit))[
        "RestartPreventExitStatus"].split()


def test_status_text_keeps_no_backslashes() -> None:
    # systemd 252 drops backslashes from STATUS= (\\.\pipe\shop showed as \.pipeshop)
    assert service.status_text(r"serving x on \\.\pipe\shop") == "serving x on //./pipe/shop"
    assert service.status_text("two\nlines") == "two lines"


def test_call_through_reflection_on_the_buy_example(pipe_dir: Path) -> None:
    with serve_grpc("npipe.examples.buy.serve:add_services", "--pipe", "shop") as served:
        r = run_npipe("call", "shop", "buy.MyService/Buy", "-d",
                      '{"id": "pear", "quantity": 2, "price": 7}')
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)["result"]
        assert result.startswith("bought 2 x 'pear' for 14 (caller: ")
        assert f"uid={os.getuid()}" in result  # the example names its caller
        with npipe.grpc.channel("shop") as channel:
            assert list_services(channel, timeout=10) == [
                "buy.MyService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
        assert served.stop()[0] == 0


def test_a_function_that_adds_health_and_reflection_itself_keeps_them(pipe_dir: Path) -> None:
    # npipe.examples.buy.service.add_to_server registers all three services itself
    with serve_grpc("npipe.examples.buy.service:add_to_server", "--pipe", "shop") as served:
        with npipe.grpc.channel("shop") as channel:
            assert list_services(channel, timeout=10) == [
                "buy.MyService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
        assert health_status("shop", "buy.MyService") == "SERVING"
        assert served.stop()[0] == 0


def test_an_async_function_runs_on_an_aio_server(pipe_dir: Path) -> None:
    with serve_grpc("npipe.examples.buy.serve:add_async_services", "--pipe", "shop",
                    "--grace", "3") as served:
        assert health_status("shop") == "SERVING"
        r = run_npipe("call", "shop", "buy.MyService/Buy", "-d",
                      '{"id": "fig", "quantity": 1, "price": 3}')
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["result"].startswith("bought 1 x 'fig' for 3")
        code, _out, err = served.stop(signal.SIGINT)
        assert code == 0, err


def test_pipe_and_acl_from_the_config_file(pipe_dir: Path, machine_dir: Path) -> None:
    from grpc_support import ensure_test_users, require_root, run_python

    require_root()
    users = ensure_test_users()
    with tempfile.TemporaryDirectory(prefix="npc", dir="/tmp") as d:
        config = Path(d) / "shop.toml"
        config.write_text(textwrap.dedent("""\
            function = "npipe.examples.buy.serve:add_services"
            pipe = "cfgshop"
            acl = ["user:npipe-t1"]
            grace = 2
        """))
        with serve_grpc("--config", str(config), pipe="cfgshop") as served:
            assert served.messages[0]["STATUS"].endswith(" on pipe cfgshop")
            listing = run_npipe("ls").stdout
            assert "cfgshop" in listing and "user:npipe-t1" in listing, listing
            # Any other exception fails the child, and with it this test.
            client = """\
                from grpc_health.v1 import health_pb2, health_pb2_grpc
                try:
                    with npipe.grpc.channel("cfgshop") as ch:
                        reply = health_pb2_grpc.HealthStub(ch).Check(
                            health_pb2.HealthCheckRequest(), timeout=10)
                    result(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                except grpc.RpcError as e:
                    result({"code": e.code().name, "details": e.details()})
            """
            t2 = users["npipe-t2"]
            assert run_python(client, users["npipe-t1"]).check() == "SERVING"
            refused = run_python(client, t2)
            outcome = refused.check()
            code, _out, err = served.stop()
        assert code == 0, err
        # The front door answers a caller the ACL refuses itself, before grpcio sees a
        # byte: the client's call fails PERMISSION_DENIED with the reason, and the server
        # says whom it refused, once.
        refusals = [line for line in err.splitlines() if "refused" in line]
        assert len(refusals) == 1, err
        match = re.fullmatch(rf"npipe: WARNING: refused npipe-t2 uid={t2.uid} "
                            rf"pid={refused.pid} on pipe (\S+/cfgshop): not allowed by its ACL",
                            refusals[0])
        assert match, refusals[0]
        assert isinstance(outcome, dict) and outcome["code"] == "PERMISSION_DENIED", outcome
        assert outcome["details"] == (
            rf"the ACL of pipe \\.\pipe\cfgshop does not admit npipe-t2 uid={t2.uid} "
            f"pid={refused.pid}"), outcome


def test_smb_serves_into_sambas_np_directory(np_dir: Path) -> None:
    with serve_grpc("npipe.examples.buy.serve:add_services", "--pipe", "shop", "--smb",
                    "--acl", "user:EXAMPLE\\alice") as served:
        assert (np_dir / "shop").exists(), "no socket where smbd looks"
        assert health_status("shop") == "SERVING"
        assert served.stop()[0] == 0
    assert not (np_dir / "shop").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuchmodule:add", "npipe: 'nosuchmodule:add': no module named 'nosuchmodule'"),
        ("npipe.examples.buy.serve:nope",
         "npipe: 'npipe.examples.buy.serve:nope': 'npipe.examples.buy.serve' has no 'nope'"),
        ("npipe.examples.buy.serve", "npipe: 'npipe.examples.buy.serve': expected "
         "MODULE:FUNCTION"),
        ("npipe.examples.buy.service:SERVICE_NAME",
         "npipe: 'npipe.examples.buy.service:SERVICE_NAME' is not a function"),
    ],
)
def test_a_bad_module_function_is_exit_2_with_one_line(
    spec: str, message: str, pipe_dir: Path
) -> None:
    r = run_npipe("serve-grpc", spec, "--pipe", "shop")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", message + "\n")
    assert not (pipe_dir / "shop").exists()


def test_a_module_that_fails_to_import_is_exit_1(pipe_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text("import nosuchdependency\n")
    r = run_npipe("serve-grpc", "broken_app:add", "--pipe", "shop", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr == "npipe: importing 'broken_app' failed: ModuleNotFoundError: " \
        "No module named 'nosuchdependency'\n"


def test_missing_pipe_is_exit_2(pipe_dir: Path) -> None:
    r = run_npipe("serve-grpc", "npipe.examples.buy.serve:add_services")
    assert r.returncode == 2
    assert r.stderr == "npipe: missing --pipe (on the command line, or pipe = ... in the " \
        "--config file)\n"
