"""The npipe command, run as a user would run it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from served import wait_for_pipe

NPIPE = [sys.executable, "-m", "npipe"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NPIPE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def served(pipe_dir: Path, fresh_machine_dir: Path) -> Iterator[str]:
    """`npipe demo --serve` in the background, on a pipe named shop (published in a
    machine-wide directory of the test's own); stopped whatever happens."""
    proc = subprocess.Popen([*NPIPE, "demo", "--serve", "--pipe", "shop"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_pipe("shop", proc)
        yield "shop"
    finally:
        proc.terminate()
        proc.wait(10)


def test_demo_serves_and_calls_through_a_pipe(pipe_dir: Path) -> None:
    r = run("demo")
    assert r.returncode == 0, r.stderr
    assert "request:  BuyRequest(id='apple', quantity=3, price=10)" in r.stdout
    assert "bought 3 x 'apple' for 30 (caller: " in r.stdout
    assert f"uid={os.getuid()}" in r.stdout
    assert not (pipe_dir / "npipe-demo").exists(), "the demo leaves no socket behind"


def test_demo_with_other_values(pipe_dir: Path) -> None:
    r = run("demo", "--pipe", r"\\.\pipe\Other", "--id", "pear", "--quantity", "4",
            "--price", "25")
    assert r.returncode == 0, r.stderr
    assert "bought 4 x 'pear' for 100" in r.stdout


def test_demo_invalid_request_fails_with_status(pipe_dir: Path) -> None:
    r = run("demo", "--quantity", "0")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "npipe: call failed: INVALID_ARGUMENT: quantity must be positive, got 0"
    )


def test_health_serving(served: str) -> None:
    r = run("health", served)
    assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr
    r = run("health", f"//./pipe/{served}", "--service", "buy.MyService")
    assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr


def test_health_unknown_service(served: str) -> None:
    r = run("health", served, "--service", "nope.Nope")
    assert r.returncode == 1
    assert r.stdout.startswith("SERVICE_UNKNOWN")


def test_call_via_reflection(served: str) -> None:
    r = run("call", served, "buy.MyService/Buy", "-d",
            '{"id": "pear", "quantity": 2, "price": 7}')
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)["result"]
    assert result.startswith("bought 2 x 'pear' for 14 (caller: ")


def test_call_failure_prints_status(served: str) -> None:
    r = run("call", served, "buy.MyService/Buy", "-d", '{"id": "", "quantity": 1}')
    assert r.returncode == 1
    assert r.stderr.strip() == "npipe: call failed: INVALID_ARGUMENT: id must not be empty"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("buy.MyService/Nope", "-d", "{}"), "has no method 'Nope'"),
        (("nope.Svc/M", "-d", "{}"), "buy.MyService"),  # lists what there is
        (("buy.MyService/Buy", "-d", "{not json"), "JSON"),
        (("buy.MyService/Buy", "-d", '{"idx": 1}'), "idx"),
        (("buy.MyService/Buy", "-H", "no-colon"), "KEY:VALUE"),
        (("Buy",), "method"),
    ],
)
def test_call_usage_errors(served: str, args: tuple[str, ...], message: str) -> None:
    r = run("call", served, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ls_shows_live_pipes(served: str, fresh_machine_dir: Path) -> None:
    r = run("ls")
    assert r.returncode == 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("shop"))
    assert line.split()[1] == "live" and str(wait_for_pipe("shop")) in line


def test_ls_empty(pipe_dir: Path, fresh_machine_dir: Path) -> None:
    r = run("ls")
    assert r.returncode == 0 and "no pipes" in r.stdout


@pytest.mark.parametrize(
    "address", [r"\\.\pipe\a\b", "//./pipe/..", "unix:relative", "//h:0/pipe/x", ""]
)
def test_bad_address_is_exit_2_one_line(pipe_dir: Path, address: str) -> None:
    r = run("health", address)
    assert r.returncode == 2
    assert r.stderr.startswith("npipe: ") and len(r.stderr.strip().splitlines()) == 1


def test_missing_pipe_is_exit_1(pipe_dir: Path) -> None:
    r = run("health", "nosuch")
    assert r.returncode == 1
    assert "no pipe" in r.stderr and "nosuch" in r.stderr


def test_debug_shows_traceback(pipe_dir: Path) -> None:
    r = run("health", "nosuch", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_unreachable_remote_host_is_exit_1(pipe_dir: Path) -> None:
    r = run("health", "//no-such-host.invalid/pipe/x", "--timeout", "3")
    assert r.returncode == 1
    assert "no-such-host.invalid" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_demo_over_smb(pipe_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("npipe demo --smb starts a private smbd: needs root")
    with socket.socket() as s:  # a port the kernel picks: no other run can hold it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    existed = _account_exists("npipe-demo")
    r = run("demo", "--smb", "--smb-port", str(port), timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"calling \\\\127.0.0.1:{port}\\pipe\\npipe-demo" in r.stdout
    assert "bought 3 x 'apple' for 30 (caller: " in r.stdout and "npipe-demo uid=" in r.stdout
    assert "from 127.0.0.1:" in r.stdout
    # The Unix account the demo needed: removed at its end if it made it, else kept.
    assert _account_exists("npipe-demo") == existed
    if not existed:
        assert "(a Unix account made for the demo, removed at its end" in r.stdout


def _account_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("command", [[], ["demo"], ["health"], ["call"], ["ls"]])
def test_help_everywhere(command: list[str]) -> None:
    r = run(*command, "--help")
    assert r.returncode == 0 and "usage: npipe" in r.stdout


def test_no_command_is_usage_error() -> None:
    r = run()
    assert r.returncode == 2 and "usage" in r.stderr


def test_readme_shows_what_the_demo_prints(pipe_dir: Path) -> None:
    """The README's sample output of scripts/demo (npipe demo) matches it line by line,
    up to the values that change (paths, pids)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sample = readme.split("`scripts/demo` prints", 1)[1].split("```", 2)[1].strip()
    r = run("demo")
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip().splitlines()
    expected = sample.splitlines()
    assert [line.split()[0] for line in printed] == [line.split()[0] for line in expected]
    assert printed[2] == expected[2]  # the request is the same every time


# A server that stops with calls cancelled sends its clients a GOAWAY with an error
# code, and gRPC's C core logs that at INFO straight to stderr (absl logs everything
# there until a program initialises absl logging, which Python never does). In `npipe
# demo` that raced the client channel's teardown, and a CI run got this line in front
# of the one npipe prints. The CLI keeps gRPC's own log at ERROR unless the user asks.
GOAWAY_TO_IDLE_CHANNELS = """
import time
{setup}
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
import npipe.grpc

for i in range(10):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    npipe.grpc.add_pipe_port(server, f"goaway{{i}}")
    server.start()
    with npipe.grpc.channel(f"goaway{{i}}") as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        server.stop(None).wait(5)  # cancel_all_calls: a GOAWAY with code 2
        time.sleep(0.2)  # the channel stays up to read it
"""


def _goaway_stderr(setup: str, **env: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", GOAWAY_TO_IDLE_CHANNELS.format(setup=setup)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_cli_keeps_grpc_core_info_lines_off_stderr(pipe_dir: Path) -> None:
    assert _goaway_stderr("import npipe.cli") == ""


def test_cli_leaves_a_grpc_verbosity_the_user_set(pipe_dir: Path) -> None:
    # The same program with GRPC_VERBOSITY=INFO shows the core's lines: proof that the
    # test above would see them, and that the user can still ask for them.
    assert "Got goaway" in _goaway_stderr("import npipe.cli", GRPC_VERBOSITY="INFO")
