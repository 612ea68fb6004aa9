"""npipe.cli.service: sd_notify readiness through real datagram sockets, stop signals, and
options from the command line, NPIPE_* and a TOML file, in that order."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from npipe.cli import build_parser, main, service
from npipe.errors import ConfigError

# -- readiness -------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A service manager's notification socket, at a path; NOTIFY_SOCKET points at it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_sends_one_datagram_to_a_path(notify_socket: socket.socket) -> None:
    assert service.ready("serving shop") is True
    fields = _fields(notify_socket.recv(4096))
    assert fields == {"MAINPID": str(os.getpid()), "READY": "1", "STATUS": "serving shop"}


def test_ready_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"npipe-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert service.ready() is True
        assert _fields(sock.recv(4096)) == {"MAINPID": str(os.getpid()), "READY": "1"}


def test_stopping_says_so(notify_socket: socket.socket) -> None:
    assert service.stopping("SIGTERM: stopping") is True
    assert _fields(notify_socket.recv(4096)) == {"STOPPING": "1", "STATUS": "SIGTERM: stopping"}


def test_without_notify_socket_nothing_is_sent(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert service.ready("x") is False
    assert service.stopping() is False
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)


@pytest.mark.parametrize("target", ["/nonexistent/npipe-notify", "vsock:2:1234", "relative"])
def test_an_unreachable_manager_is_a_warning_not_a_failure(
    target: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", target)
    with caplog.at_level(logging.WARNING, logger="npipe.service"):
        assert service.ready("x") is False
    assert target in caplog.text


# -- stop signals ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_until_stop_signal_returns_the_signal_and_restores_handlers(sig: signal.Signals) -> None:
    def previous(signum: int, frame: object) -> None:
        raise AssertionError("the earlier handler ran while until_stop_signal waited")

    saved = {s: signal.getsignal(s) for s in service.STOP_SIGNALS}
    for s in service.STOP_SIGNALS:
        signal.signal(s, previous)
    try:
        async def scenario() -> signal.Signals:
            waiting = asyncio.ensure_future(service.until_stop_signal())
            await asyncio.sleep(0)  # the handlers are in place
            os.kill(os.getpid(), sig)
            return await asyncio.wait_for(waiting, 5)

        assert asyncio.run(scenario()) == sig
        assert all(signal.getsignal(s) is previous for s in service.STOP_SIGNALS)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# -- configuration: precedence ---------------------------------------------------------


def toy_parser() -> argparse.ArgumentParser:
    """A command with one option of every kind that --config must handle."""
    top = argparse.ArgumentParser(prog="toy")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("app", nargs="?", metavar="MODULE:APP")
    p.add_argument("--flag", action="store_true")
    p.add_argument("--no-cache", dest="cache", action="store_false")
    p.add_argument("--encrypt", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--acl", action="append")
    p.add_argument("--tags", nargs="+")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--max-connections", type=int)
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--mode", choices=["fast", "safe"], default="safe")
    p.add_argument("-d", "--data", default="{}")
    service.add_config_option(p)
    return top


def configure(
    *argv: str, toml: str | None = None, tmp_path: Path | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> argparse.Namespace:
    parser = parser or toy_parser()
    words = list(argv)
    if toml is not None:
        assert tmp_path is not None
        (tmp_path / "c.toml").write_text(toml)
        words += ["--config", str(tmp_path / "c.toml")]
    args = parser.parse_args(words)
    service.apply_config(args.config_parser, args, words)
    return args


@pytest.fixture(autouse=True)
def no_npipe_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No option from this machine's environment leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("NPIPE_") and name not in (
            "NPIPE_PIPE_DIR", "NPIPE_MACHINE_DIR", "NPIPE_SAMBA_NP_DIR"
        ):
            monkeypatch.delenv(name)


def test_int_default_file_env_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert configure("run").port == 80
    assert configure("run", toml="port = 81", tmp_path=tmp_path).port == 81
    monkeypatch.setenv("NPIPE_PORT", "82")
    assert configure("run", toml="port = 81", tmp_path=tmp_path).port == 82
    assert configure("run", "--port", "83", toml="port = 81", tmp_path=tmp_path).port == 83
    assert configure("run", "--port=84", toml="port = 81", tmp_path=tmp_path).port == 84


def test_an_abbreviated_option_counts_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NPIPE_MAX_CONNECTIONS", "7")
    args = configure("run", "--max-conn", "5", toml="max-connections = 6", tmp_path=tmp_path)
    assert args.max_connections == 5
    # a short option with its value attached
    monkeypatch.setenv("NPIPE_DATA", '{"env": 1}')
    assert configure("run", '-d{"cli": 1}').data == '{"cli": 1}'
    assert configure("run").data == '{"env": 1}'


def test_float_from_an_integer_in_the_file(tmp_path: Path) -> None:
    assert configure("run", toml="grace = 3", tmp_path=tmp_path).grace == 3.0


def test_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert configure("run").flag is False
    assert configure("run", toml="flag = true", tmp_path=tmp_path).flag is True
    monkeypatch.setenv("NPIPE_FLAG", "no")
    assert configure("run", toml="flag = true", tmp_path=tmp_path).flag is False
    assert configure("run", "--flag", toml="flag = false", tmp_path=tmp_path).flag is True


def test_store_false_and_boolean_optional(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the key is the dest: cache = false means --no-cache
    assert configure("run").cache is True
    assert configure("run", toml="cache = false", tmp_path=tmp_path).cache is False
    monkeypatch.setenv("NPIPE_CACHE", "0")
    assert configure("run").cache is False
    monkeypatch.setenv("NPIPE_CACHE", "1")
    assert configure("run", "--no-cache", toml="cache = true", tmp_path=tmp_path).cache is False
    assert configure("run", toml="encrypt = false", tmp_path=tmp_path).encrypt is False
    monkeypatch.setenv("NPIPE_ENCRYPT", "true")
    assert configure("run", toml="encrypt = false", tmp_path=tmp_path).encrypt is True
    assert configure("run", "--no-encrypt", tmp_path=tmp_path).encrypt is False


def test_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert configure("run").acl is None
    toml = 'acl = ["user:alice", "group:ops"]\ntags = "one"'
    args = configure("run", toml=toml, tmp_path=tmp_path)
    assert (args.acl, args.tags) == (["user:alice", "group:ops"], ["one"])
    monkeypatch.setenv("NPIPE_ACL", "user:bob, everyone")
    assert configure("run", toml=toml, tmp_path=tmp_path).acl == ["user:bob", "everyone"]
    args = configure("run", "--acl", "uid:7", "--acl=gid:8", toml=toml, tmp_path=tmp_path)
    assert args.acl == ["uid:7", "gid:8"]


def test_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert configure("run", toml='mode = "fast"', tmp_path=tmp_path).mode == "fast"
    with pytest.raises(ConfigError, match=r"c\.toml: mode: 'quick' is not one of"):
        configure("run", toml='mode = "quick"', tmp_path=tmp_path)
    monkeypatch.setenv("NPIPE_MODE", "quick")
    with pytest.raises(ConfigError, match="NPIPE_MODE: 'quick' is not one of"):
        configure("run")


def test_positionals_from_the_file_only_when_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = 'app = "web:app"'
    assert configure("run", toml=toml, tmp_path=tmp_path).app == "web:app"
    assert configure("run", "cli:app", toml=toml, tmp_path=tmp_path).app == "cli:app"
    monkeypatch.setenv("NPIPE_APP", "env:app")  # positionals are not read from the env
    args = configure("run")
    assert args.app is None
    with pytest.raises(ConfigError, match=r"missing MODULE:APP .*app = \.\.\."):
        service.require(args, "app")
    service.require(configure("run", toml=toml, tmp_path=tmp_path), "app")


def test_dash_and_underscore_keys(tmp_path: Path) -> None:
    assert configure("run", toml="max_connections = 3", tmp_path=tmp_path).max_connections == 3
    with pytest.raises(ConfigError, match="given twice"):
        configure("run", toml="max_connections = 3\nmax-connections = 4", tmp_path=tmp_path)


def test_the_real_serve_grpc_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = (
        'function = "npipe.examples.buy.serve:add_services"\npipe = "shop"\n'
        'acl = ["user:EXAMPLE\\\\alice"]\nsmb = true\nmax-connections = 9\ngrace = 2.5\n'
    )
    monkeypatch.setenv("NPIPE_GRACE", "4")
    args = configure("serve-grpc", "--pipe", "other", toml=toml, tmp_path=tmp_path,
                     parser=build_parser())
    assert args.function == "npipe.examples.buy.serve:add_services"
    assert (args.pipe, args.acl, args.smb) == ("other", ["user:EXAMPLE\\alice"], True)
    assert (args.max_connections, args.grace, args.workers) == (9, 4.0, None)
    assert args.pipe_dir is None, "NPIPE_PIPE_DIR is the library's, not an option's"


# -- configuration: errors, as the command reports them ---------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("pipe = 'shop'\nbogus = 1\n", "unknown option 'bogus'"),
        ("pipe = 'shop\n", "not valid TOML"),
        ("pipe = 'shop'\nworkers = 'many'\n", "workers: 'many' is not valid"),
        ("pipe = 'shop'\nworkers = 0\n", "workers: '0' is not valid"),
        ("pipe = 'shop'\nworkers = true\n", "workers must be a string or a number"),
        ("pipe = ['a', 'b']\n", "pipe must be a string or a number"),
        ("smb = 'yes'\n", "smb must be true or false"),
        ("acl = [['x']]\n", "acl must be a string or a number"),
        ("[pipe]\nname = 'shop'\n", "pipe must be a string or a number"),
        ("config = 'other.toml'\n", "unknown option 'config'"),
    ],
)
def test_a_bad_file_is_exit_2_with_one_line_naming_file_and_key(
    toml: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(toml)
    assert main(["serve-grpc", "npipe.examples.buy.serve:add_services",
                 "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"npipe: {config}") and expected in err, err


def test_a_missing_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["serve-grpc", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"npipe: cannot read {missing}: No such file or directory\n"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("NPIPE_GRACE", "soon", "NPIPE_GRACE: 'soon' is not valid"),
        ("NPIPE_SMB", "maybe", "NPIPE_SMB='maybe': use 1/0, true/false, yes/no"),
        ("NPIPE_MAX_CONNECTIONS", "-1", "NPIPE_MAX_CONNECTIONS: '-1' is not valid"),
    ],
)
def test_a_bad_environment_value_is_exit_2(
    name: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["serve-grpc", "npipe.examples.buy.serve:add_services", "--pipe", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
