"""npipe.connection across hosts: a Client in one network namespace, through a real smbd
in another, to a Listener(smb=True) behind it; message mode (Samba's, 1 to 65,535 bytes
a message) and byte mode (the stdlib's framing, any size); both SMB client backends."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from npipe.smb import BACKENDS, ENV_BACKEND
from npipe.testing.netns import SmbSite, require_root_and_samba, run_in, samba_version, smb_site

APPS = Path(__file__).resolve().parent / "cross_host"
ALICE, BOB, PASSWORD = "npm-alice", "npm-bob", "Pipe-Passw0rd!"
KIB64 = 65535


@pytest.fixture(scope="module", params=BACKENDS, autouse=True)
def smb_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    old = os.environ.get(ENV_BACKEND)
    os.environ[ENV_BACKEND] = request.param
    yield request.param
    if old is None:
        os.environ.pop(ENV_BACKEND, None)
    else:
        os.environ[ENV_BACKEND] = old


@pytest.fixture(scope="module")
def site() -> Iterator[SmbSite]:
    require_root_and_samba()
    with smb_site({ALICE: PASSWORD, BOB: PASSWORD}, prefix="npm") as bed:
        yield bed


def server(site: SmbSite, name: str, mode: str, max_message: int = 1000,
           key: str = "key") -> Any:
    return site.serve([sys.executable, str(APPS / "connection_app.py"), "serve", name, ALICE,
                       mode, str(max_message), key])


def client(site: SmbSite, scenario: str, name: str, mode: str,
           user: str = ALICE, *, check: bool = True, **env_extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPIPE_USER", "NPIPE_PASSWORD", "NPIPE_DOMAIN")}
    env.update(NPIPE_USER=user, NPIPE_PASSWORD=PASSWORD,
               KRB5CCNAME=f"FILE:{site.workdir}/no-such-ccache", **env_extra)
    done = run_in(site.hosts.client_ns,
                  [sys.executable, str(APPS / "connection_app.py"), scenario,
                   site.address(name), mode],
                  env=env, capture_output=True, text=True, timeout=180)
    if not check:
        return {"returncode": done.returncode}
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def message_pipe(site: SmbSite) -> Iterator[str]:
    with server(site, "cmsg", "message", max_message=KIB64):
        yield "cmsg"


@pytest.fixture(scope="module")
def byte_pipe(site: SmbSite) -> Iterator[str]:
    with server(site, "cbyte", "byte", max_message=2 << 20):
        yield "cbyte"


def test_message_boundaries(site: SmbSite, message_pipe: str) -> None:
    r = client(site, "boundaries", message_pipe, "message")
    assert r == {"poll_idle": False, "poll_answer": True, "hello": "hello",
                 "echoed": [True, True, True], "sizes": [1, 1000, KIB64], "intact": True,
                 "into": True, "object": {"an": ["object", 1]}}


def test_the_first_message_may_be_the_largest(site: SmbSite) -> None:
    """No authkey: the server's first message is 65,535 bytes, read by the READ the client
    posts with its CREATE."""
    with server(site, "cfirst", "message", key="none"):
        r = client(site, "first_big", "cfirst", "message")
    assert r == {"first": KIB64, "intact": True, "next": "next"}


def test_byte_mode_boundaries_any_size(site: SmbSite, byte_pipe: str) -> None:
    r = client(site, "boundaries", byte_pipe, "byte")
    assert r["echoed"] == [True] * 6, r
    assert r["sizes"] == [0, 1, 1000, KIB64, 70000, 1 << 20], r
    assert r["intact"] and r["into"] and r["poll_answer"] and not r["poll_idle"], r


def test_stdlib_connection_is_a_byte_mode_peer(site: SmbSite, byte_pipe: str) -> None:
    r = client(site, "stdlib_peer", byte_pipe, "byte")
    assert r == {"echoed": [True] * 4, "object": {"pickled": True}, "sizes": [5, 0, 70000]}


def test_samba_limits_are_clear_errors_and_lose_nothing(site: SmbSite) -> None:
    with server(site, "clim", "message", max_message=1000):
        r = client(site, "limits", "clim", "message")
    assert r["zero"].startswith("MessageNotCarried: a 0-byte message"), r
    assert r["big"].startswith("MessageNotCarried: a message of 65,536 bytes"), r
    assert "65,535" in r["big"] and "Samba" in r["big"], r
    assert r["after"] == "after", r  # nothing of the refused messages arrived
    assert r["server_zero"].startswith("MessageNotCarried"), r
    assert r["server_big"].startswith("MessageNotCarried"), r
    # the Listener's own limit: a clear error on the server, which goes on
    assert r["over_max"].startswith("too-large: bad message length: a message of 2000"), r
    assert r["still"] == "still", r


def test_caller_is_the_smb_account(site: SmbSite, message_pipe: str, byte_pipe: str) -> None:
    for name, mode in ((message_pipe, "message"), (byte_pipe, "byte")):
        r = client(site, "who", name, mode)
        assert r["transport"] == "smb", r
        assert r["user"] == ALICE and r["name"].endswith(f"\\{ALICE}"), r
        assert r["last_accepted"] == r["name"], r


def test_one_listener_serves_local_and_smb_callers(site: SmbSite, message_pipe: str) -> None:
    """The same Listener(smb=True) answers a caller on its own host (SO_PEERCRED)."""
    done = run_in(site.hosts.server_ns,
                  [sys.executable, str(APPS / "connection_app.py"), "who", message_pipe,
                   "message"],
                  env=site.server_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["transport"] == "local" and r["uid"] == os.getuid(), r
    assert client(site, "who", message_pipe, "message")["transport"] == "smb"


@pytest.mark.parametrize("mode", ["message", "byte"])
def test_wrong_authkey(site: SmbSite, mode: str, message_pipe: str, byte_pipe: str) -> None:
    name = message_pipe if mode == "message" else byte_pipe
    r = client(site, "wrong_key", name, mode)
    assert r["wrong"].startswith("AuthenticationError"), r
    assert any(e.startswith("AuthenticationError") for e in r["events"]), r


@pytest.mark.parametrize("mode", ["message", "byte"])
def test_refused_user(site: SmbSite, mode: str, message_pipe: str, byte_pipe: str) -> None:
    name = message_pipe if mode == "message" else byte_pipe
    r = client(site, "refused", name, mode, user=BOB)
    assert r["error"] == "AccessDenied", r
    assert client(site, "who", name, mode)["user"] == ALICE  # and the listener goes on


@pytest.mark.parametrize("mode", ["message", "byte"])
def test_a_server_that_vanishes(site: SmbSite, mode: str) -> None:
    with server(site, f"cvan{mode[0]}", mode):
        r = client(site, "vanish", f"cvan{mode[0]}", mode)
    assert r["end"].startswith(("EOFError", "ConnectionLost")), r
    if mode == "byte":
        assert "middle of a message" in r["end"], r
    assert r["seconds"] < 30, r


@pytest.mark.parametrize("redirector", ["off", "shared"])
def test_a_client_that_vanishes_mid_message(site: SmbSite, redirector: str) -> None:
    """The server learns that its client went in the middle of a message. With the
    redirector the SMB connection outlives the client; the client's last handshake
    message may have gone as a TRANSCEIVE that the server never answers, so the pipe's
    CLOSE waits behind it and the connection is reset instead. Samba 4.17 lets go of
    the pipe then; 4.22 keeps it until the server writes (tests/test_pipe_close.py), so
    there the server may never learn: an expected failure, not a pass."""
    name = f"cvmid{redirector[:2]}"
    with server(site, name, "byte", max_message=2 << 20):
        client(site, "vanish_mid_send", name, "byte", check=False,
               NPIPE_REDIRECTOR=redirector)
        # The server learns of the end only once smbd has seen the client's TCP close and
        # closed its np/ connection: a first look can come before that (seen on Debian 13).
        # Each look is a connection of its own, whose end is an event too: look on until
        # the one awaited is there.
        deadline = time.monotonic() + 20
        while True:
            r = client(site, "events_now", name, "byte")
            if any("middle of a message" in e for e in r["events"]) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    learned = any("middle of a message" in e for e in r["events"])
    if not learned and redirector == "shared" and samba_version() >= (4, 18):
        # Only the assertion is expected to fail there, not the server's start or stop.
        pytest.xfail("Samba 4.22 keeps a pipe whose TRANSCEIVE waits, even after its "
                     f"connection ends ({len(r['events'])} events, none of them the "
                     "vanished client's)")
    assert learned, json.dumps(r)
