"""Pipe address parsing and formatting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npipe import AddressError, PipeAddress, parse_address
from npipe.address import MAX_NAME_LENGTH, local


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("shop", PipeAddress("local", name="shop")),
        (r"\\.\pipe\shop", PipeAddress("local", name="shop")),
        (r"\\.\PIPE\Shop", PipeAddress("local", name="Shop")),
        ("//./pipe/shop", PipeAddress("local", name="shop")),
        (r"\\server1\pipe\shop", PipeAddress("remote", name="shop", host="server1")),
        ("//server1.example.com/pipe/a b", PipeAddress("remote", name="a b",
                                                       host="server1.example.com")),
        ("//198.18.0.1:4445/pipe/x", PipeAddress("remote", name="x", host="198.18.0.1",
                                                 port=4445)),
        ("//[::1]/pipe/x", PipeAddress("remote", name="x", host="::1")),
        ("//[fe80::1]:99/pipe/x", PipeAddress("remote", name="x", host="fe80::1", port=99)),
        ("//::1/pipe/x", PipeAddress("remote", name="x", host="::1")),
        ("unix:/run/x.sock", PipeAddress("unix", path="/run/x.sock")),
        (r"\\.\pipe\docker_engine", PipeAddress("local", name="docker_engine")),
    ],
)
def test_parse_accepts(text: str, expected: PipeAddress) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty pipe address"),
        ("\\\\.\\pipe\\", "empty pipe name"),
        (r"\\.\pipe\a\b", "backslash"),
        ("//./pipe/a/b", "slash"),
        ("//./pipe/..", "'..'"),
        ("a..b", "'..'"),
        (".", "'.'"),
        ("a\0b", "NUL"),
        ("a\nb", "control character"),
        ("x" * (MAX_NAME_LENGTH + 1), "longer than 256"),
        (r"\\.\share\x", "'share'"),
        (r"\\.\pipe", "incomplete"),
        (r"\\\pipe\x", "missing host"),
        ("//bad_host!/pipe/x", "'bad_host!'"),
        ("//-bad/pipe/x", "'-bad'"),
        ("//h:0/pipe/x", "port '0'"),
        ("//h:99999/pipe/x", "port '99999'"),
        ("//h:abc/pipe/x", "port 'abc'"),
        ("//[::1/pipe/x", "unclosed"),
        ("//[nothex]/pipe/x", "not an IPv6"),
        ("//./pipe", "incomplete"),
        ("//.:4445/pipe/x", "local pipe has no port"),
        ("unix:relative", "not absolute"),
        ("unix:/" + "x" * 200, "longer than 107"),
        ("/abs/path", "unknown pipe address form"),
        ("pipe\\x", "unknown pipe address form"),
    ],
)
def test_parse_rejects_with_named_part(text: str, names: str) -> None:
    with pytest.raises(AddressError) as err:
        parse_address(text)
    assert names in str(err.value)


def test_non_string_is_rejected() -> None:
    with pytest.raises(AddressError, match="not int"):
        parse_address(42)  # type: ignore[arg-type]


def test_address_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_address("")


def test_names_are_case_insensitive_keys() -> None:
    assert parse_address("MyPipe").key == parse_address(r"\\.\pipe\mypipe").key == "mypipe"


def test_formatting() -> None:
    assert str(local("shop")) == r"\\.\pipe\shop"
    assert local("shop").posix() == "//./pipe/shop"
    remote = parse_address("//[::1]:4445/pipe/x")
    assert str(remote) == r"\\[::1]:4445\pipe\x"
    assert parse_address(r"\\h\pipe\x").posix() == "//h/pipe/x"
    assert str(parse_address("unix:/a/b")) == "unix:/a/b"


# Windows pipe names: anything but backslash, within 256 characters; npipe also keeps
# slashes, '..', NUL and control characters out so that a name is one safe file name.
names = st.text(
    alphabet=st.characters(blacklist_characters="\\/\0", blacklist_categories=("Cc", "Cs")),
    min_size=1, max_size=MAX_NAME_LENGTH,
).filter(lambda s: ".." not in s and s != ".")
hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9](\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.one_of(st.just(445), st.integers(1, 65535))


@given(names)
def test_local_round_trip(name: str) -> None:
    addr = local(name)
    assert parse_address(str(addr)) == addr
    assert parse_address(addr.posix()) == addr
    assert parse_address(name) == addr or "/" in name


@given(names, hosts, ports)
def test_remote_round_trip(name: str, host: str, port: int) -> None:
    addr = parse_address(f"//{'[' + host + ']' if ':' in host else host}:{port}/pipe/{name}")
    assert addr.kind == "remote" and addr.name == name and addr.port == port
    assert parse_address(str(addr)) == addr
    assert parse_address(addr.posix()) == addr


@given(st.text(max_size=300))
def test_parse_never_crashes(text: str) -> None:
    try:
        addr = parse_address(text)
    except AddressError as e:
        assert str(e)
    else:
        assert parse_address(str(addr)) == addr
