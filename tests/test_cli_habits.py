"""The npipe command behaves as users of curl, grpcurl and socat expect (issue 20): each
subcommand's own usage for a mistyped option, curl's options and habits in ``npipe
http`` (checked against the machine's curl on the same pipe), grpcurl's ``-d @file``,
``list`` and ``describe`` in ``npipe call``, ``npipe ls --json`` and ``npipe path``,
hypercorn's log lines once, the serve commands' one announcement, the CLI's words in
errors. Run as a user would run it, against real served pipes."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
from http_apps import ServerThread
from served import wait_for_pipe

from npipe.testing.netns import skip_or_fail

NPIPE = [sys.executable, "-m", "npipe"]
TESTS = Path(__file__).resolve().parent


def run(*args: str, stdin: bytes | None = None, timeout: float = 60,
        **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*NPIPE, *args], input=stdin, capture_output=True, timeout=timeout,
                          **kw)


# --- usage -----------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], list[str]]]:
    """Every leaf subcommand, with words for its required positionals."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if nested:
                    yield from _subcommands(sub, (*prefix, name))
                else:
                    yield (*prefix, name), _required_words(sub)


def _required_words(parser: argparse.ArgumentParser) -> list[str]:
    """Words that satisfy ``parser``'s required options and positionals, so that an unknown
    option is the only error left."""
    words: list[str] = []

    def give(action: argparse.Action) -> None:
        value = [str(next(iter(action.choices)))] if action.choices else ["x"]
        words.extend([action.option_strings[0], *(value if action.nargs != 0 else [])])

    for action in parser._actions:
        if action.option_strings and action.required:
            give(action)
    for group in parser._mutually_exclusive_groups:
        if group.required:
            give(group._group_actions[0])
    positionals = [a for a in parser._actions if not a.option_strings and a.nargs in (None, "+")]
    return words + ["x"] * len(positionals)


def _all_subcommands() -> list[tuple[tuple[str, ...], list[str]]]:
    from npipe.cli import build_parser

    return list(_subcommands(build_parser()))


@pytest.mark.parametrize(("command", "words"), _all_subcommands(),
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_an_unknown_option_prints_the_subcommands_usage(command: tuple[str, ...],
                                                        words: list[str]) -> None:
    done = run(*command, *words, "--no-such-option")
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.startswith(f"usage: npipe {' '.join(command)}"), err
    assert f"npipe {' '.join(command)}: error: unrecognized arguments: --no-such-option" in err


def test_the_top_level_description_names_http() -> None:
    out = run("--help").stdout.decode()
    assert "gRPC, HTTP and byte streams over named pipes" in out


# --- npipe http ------------------------------------------------------------------------


async def echo_request(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Every request answered with JSON of its method, target, headers and body (latin-1)."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = {"method": scope["method"], "path": scope["path"],
            "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
            "body": body.decode("latin-1")}
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(seen).encode()})


@pytest.fixture
def echo(pipe_dir: Path) -> Iterator[str]:
    with ServerThread("echo", echo_request):
        yield "echo"


def seen(done: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_http_path_defaults_to_slash(echo: str) -> None:
    assert seen(run("http", echo))["path"] == "/"
    assert seen(run("http", "DELETE", echo))["method"] == "DELETE"  # METHOD ADDRESS
    assert seen(run("http", echo, "items"))["path"] == "/items"


def test_http_request_option_sets_the_method(echo: str) -> None:
    got = seen(run("http", "-X", "PATCH", echo, "/x", "-d", "a=1"))
    assert (got["method"], got["body"]) == ("PATCH", "a=1")
    assert seen(run("http", "--request", "options", echo))["method"] == "OPTIONS"
    done = run("http", "GET", echo, "/x", "-X", "PUT")
    assert done.returncode == 2 and b"two methods" in done.stderr


def test_http_json_sets_content_type_and_accept(echo: str, tmp_path: Path) -> None:
    got = seen(run("http", echo, "/items", "--json", '{"a": 1}'))
    assert got["method"] == "POST" and got["body"] == '{"a": 1}'
    assert got["headers"]["content-type"] == "application/json"
    assert got["headers"]["accept"] == "application/json"
    (tmp_path / "item.json").write_bytes(b'{"a":\n 2}\n')
    got = seen(run("http", echo, "--json", f"@{tmp_path / 'item.json'}", "-H",
                   "Accept: text/plain"))
    assert got["body"] == '{"a":\n 2}\n'  # as --data-binary: kept as it is
    assert got["headers"]["accept"] == "text/plain"  # -H wins


def _curl_body(socket_path: Path, *args: str) -> str:
    curl = shutil.which("curl")
    if curl is None:
        skip_or_fail("curl is not installed (Debian's curl package)")
    done = subprocess.run([curl, "-s", "--unix-socket", str(socket_path), *args,
                           "http://echo/"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    body: str = json.loads(done.stdout)["body"]
    return body


def test_http_data_from_a_file_is_sent_as_curl_sends_it(echo: str, tmp_path: Path) -> None:
    """curl -d @FILE drops every CR and LF of the file; --data-binary keeps them: npipe
    http sends what the machine's curl sends to the same pipe (curl --unix-socket)."""
    body = tmp_path / "body"
    body.write_bytes(b"a=1\r\nb=2\n\nc\n")
    socket_path = Path(run("path", echo).stdout.decode().strip())
    for option in ("-d", "--data", "--data-binary"):
        by_curl = _curl_body(socket_path, option, f"@{body}")
        assert seen(run("http", echo, option, f"@{body}"))["body"] == by_curl, option
        assert seen(run("http", echo, option, "@-", stdin=body.read_bytes()))["body"] == by_curl
    assert _curl_body(socket_path, "-d", f"@{body}") == "a=1b=2c"  # what curl did here


def test_http_verbose_shows_headers_on_stderr(echo: str) -> None:
    done = run("http", "-v", echo, "/v", "-H", "X-Trace: t1")
    err = done.stderr.decode().splitlines()
    assert "> GET /v HTTP/1.1" in err and "> X-Trace: t1" in err
    assert "< HTTP/1.1 200" in err and "< content-type: application/json" in err
    assert json.loads(done.stdout)["path"] == "/v"  # the body alone on stdout


def test_http_silent_prints_no_error(echo: str) -> None:
    done = run("http", "-s", "nosuchpipe", "/x")
    assert (done.returncode, done.stderr) == (1, b"")
    done = run("http", "nosuchpipe", "/x")  # the same without -s: one line
    assert done.returncode == 1 and b"no pipe" in done.stderr


def test_http_into_a_closed_pipe_ends_quietly(pipe_dir: Path) -> None:
    """``npipe http ... | head -c1``: the reader goes after one byte."""
    with ServerThread("api"):
        proc = subprocess.Popen([*NPIPE, "http", "api", "/big?n=20000000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(1) == b"\0"
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(30)
    assert err == "" and code == 141, (code, err)  # as a shell reports SIGPIPE's


# --- npipe call ------------------------------------------------------------------------


@pytest.fixture
def shop(pipe_dir: Path, fresh_machine_dir: Path) -> Iterator[str]:
    """`npipe demo --serve` (the Buy example, with reflection) on pipe shop."""
    proc = subprocess.Popen([*NPIPE, "demo", "--serve", "--pipe", "shop"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_pipe("shop", proc)
        yield "shop"
    finally:
        proc.terminate()
        proc.wait(10)


def test_call_reads_data_from_a_file_or_stdin(shop: str, tmp_path: Path) -> None:
    request = tmp_path / "req.json"
    request.write_text('{"id": "fig", "quantity": 2,\n "price": 3}\n')
    for data, stdin in ((f"@{request}", None), ("@-", request.read_bytes()),
                        ("@", request.read_bytes())):
        done = run("call", shop, "buy.MyService/Buy", "-d", data, stdin=stdin)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["result"].startswith("bought 2 x 'fig' for 6"), data
    done = run("call", shop, "buy.MyService/Buy", "-d", f"@{tmp_path / 'missing'}")
    assert done.returncode == 2 and b"cannot read" in done.stderr


def test_call_list_and_describe(shop: str) -> None:
    done = run("call", shop, "list")
    assert done.stdout.decode().split() == [
        "buy.MyService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    assert run("call", shop, "list", "buy.MyService").stdout.decode() == "buy.MyService.Buy\n"
    assert run("call", shop, "describe", "buy.MyService").stdout.decode() == textwrap.dedent("""\
        buy.MyService is a service:
        service MyService {
          rpc Buy ( .buy.BuyRequest ) returns ( .buy.BuyResponse );
        }
        """)
    assert run("call", shop, "describe", "buy.BuyRequest").stdout.decode() == textwrap.dedent("""\
        buy.BuyRequest is a message:
        message BuyRequest {
          string id = 1;
          int32 quantity = 2;
          int32 price = 3;
        }
        """)
    assert run("call", shop, "describe", "buy.MyService/Buy").stdout.decode() == (
        "buy.MyService.Buy is a method:\n"
        "rpc Buy ( .buy.BuyRequest ) returns ( .buy.BuyResponse );\n")
    out = run("call", shop, "describe", "grpc.health.v1.HealthCheckResponse").stdout.decode()
    assert "  enum ServingStatus {\n    UNKNOWN = 0;" in out
    assert ".grpc.health.v1.HealthCheckResponse.ServingStatus status = 1;" in out
    for args, message in ((("describe", "nope.Nope"), "knows no symbol 'nope.Nope'"),
                          (("list", "nope.Nope"), "unknown service 'nope.Nope'"),
                          (("describe",), "describe needs a SYMBOL")):
        done = run("call", shop, *args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr.decode() and len(done.stderr.splitlines()) == 1


def test_call_to_a_server_without_reflection_says_so(pipe_dir: Path) -> None:
    import grpc

    import npipe.grpc
    from npipe.examples.buy import buy_pb2_grpc, service

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # no reflection
    buy_pb2_grpc.add_MyServiceServicer_to_server(  # type: ignore[no-untyped-call]
        service.MyService(lambda ctx: "x"), server)
    npipe.grpc.add_pipe_port(server, "bare")
    server.start()
    try:
        for args in (("buy.MyService/Buy", "-d", "{}"), ("list",), ("describe", "buy.X")):
            done = run("call", "bare", *args)
            err = done.stderr.decode()
            assert done.returncode == 1, err
            assert err == ("npipe: pipe bare: the server does not serve reflection "
                           "(grpc.reflection.v1alpha), which npipe call needs to find "
                           "methods and their types\n")
    finally:
        server.stop(None)


# --- npipe ls --json, npipe path --------------------------------------------------------


def test_ls_json_and_path(shop: str, fresh_machine_dir: Path) -> None:
    socket_path = wait_for_pipe(shop)
    done = run("ls", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = [r for r in json.loads(done.stdout) if r["name"] == shop]
    assert row == {"name": shop, "state": "live", "owner": row["owner"], "admits": "owner",
                   "kind": "machine", "path": str(fresh_machine_dir / shop),
                   "socket": str(socket_path)}
    assert row["owner"] and row["owner"] != "?"
    done = run("path", shop)
    assert (done.returncode, done.stdout.decode()) == (0, f"{socket_path}\n"), done.stderr
    assert run("path", rf"\\.\pipe\{shop.upper()}").stdout.decode() == f"{socket_path}\n"


def test_ls_json_without_pipes_is_an_empty_list(pipe_dir: Path, fresh_machine_dir: Path) -> None:
    done = run("ls", "--json")
    assert (done.returncode, json.loads(done.stdout)) == (0, [])


def test_path_of_an_unknown_or_remote_name(pipe_dir: Path) -> None:
    done = run("path", "nosuch")
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.decode().startswith("npipe: no pipe \\\\.\\pipe\\nosuch")
    done = run("path", "//host/pipe/x")
    assert done.returncode == 2 and b"local pipe name" in done.stderr


# --- serve-asgi, serve-grpc -------------------------------------------------------------

FAILING_APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    raise RuntimeError("the app failed on purpose")
"""


def _serve_until_ready(args: list[str], pipe: str, cwd: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*NPIPE, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_pipe(pipe, proc)
    return proc


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err


def test_hypercorn_log_lines_come_once(pipe_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "failing_app.py").write_text(FAILING_APP)
    proc = _serve_until_ready(["serve-asgi", "failing_app:app", "--pipe", "boom"], "boom",
                              tmp_path)
    try:
        done = run("http", "boom", "/")
        assert done.returncode == 0 and done.stdout == b"", done.stderr  # a 500, empty
    finally:
        _out, err = _stop(proc)
    assert err.count("Error in ASGI Framework") == 1, err
    assert err.count("RuntimeError: the app failed on purpose") == 1, err


def test_serve_commands_announce_themselves_alike(pipe_dir: Path) -> None:
    announced = {}
    for args, pipe in ((["serve-grpc", "npipe.examples.buy.serve:add_services"], "g"),
                       (["serve-asgi", "http_apps:app"], "a"),
                       (["serve-wsgi", "wsgi_apps:app"], "w")):
        proc = _serve_until_ready([*args, "--pipe", pipe], pipe, TESTS)
        out, err = _stop(proc)
        assert out == "", out
        announced[args[0]] = err.splitlines()
    assert announced["serve-grpc"] == [
        "npipe: serving buy.MyService on pipe g",
        r"npipe: SIGTERM: stopping, calls in flight get 10s"]
    assert announced["serve-asgi"] == [
        "npipe: serving http_apps:app on pipe a",
        r"npipe: SIGTERM: stopping, requests in flight get 5s"]
    assert announced["serve-wsgi"] == [
        "npipe: serving wsgi_apps:app on pipe w",
        r"npipe: SIGTERM: stopping, requests in flight get 5s"]


# --- the CLI's words --------------------------------------------------------------------


def test_access_denied_names_the_cli_option(fresh_machine_dir: Path, a: Any) -> None:
    """A pipe served by someone the caller did not name: the CLI says --server-user, the
    option its user can type, not the library's keyword."""
    from grpc_support import ready_path, serve_as

    with serve_as(a, "theirs") as server:
        ready_path(server)
        for command in (["health", "theirs"], ["http", "theirs"], ["path", "theirs"]):
            done = run(*command)
            err = done.stderr.decode()
            assert done.returncode == 1, err
            assert f"served by {a.name}, not by you or root" in err, err
            assert "(--server-user USER)" in err and "server_user=" not in err, err
        done = run("path", "theirs", "--server-user", a.name)
        assert done.returncode == 0 and done.stdout.decode().strip() == str(ready_path(server))
