"""Blocking streams across hosts (npipe.connect / npipe.create_server): a client in one
network namespace, through a real smbd in another, to a blocking or an asyncio server;
both SMB client backends."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from npipe.smb import BACKENDS, ENV_BACKEND
from npipe.testing.netns import SmbSite, require_root_and_samba, run_in, smb_site

APPS = Path(__file__).resolve().parent / "cross_host"
ALICE, BOB, PASSWORD = "npb-alice", "npb-bob", "Pipe-Passw0rd!"


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
    with smb_site({ALICE: PASSWORD, BOB: PASSWORD}, prefix="npb") as bed:
        yield bed


def blocking_server(site: SmbSite, name: str, users: str = ALICE) -> Any:
    return site.serve([sys.executable, str(APPS / "blocking_app.py"), "serve", name, users])


def asyncio_server(site: SmbSite, name: str, users: str = ALICE) -> Any:
    return site.serve([sys.executable, str(APPS / "server_app.py"), "raw", name, users])


def client(site: SmbSite, app: str, scenario: str, address: str,
           user: str = ALICE) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPIPE_USER", "NPIPE_PASSWORD", "NPIPE_DOMAIN")}
    env.update(NPIPE_USER=user, NPIPE_PASSWORD=PASSWORD,
               KRB5CCNAME=f"FILE:{site.workdir}/no-such-ccache")
    done = run_in(site.hosts.client_ns, [sys.executable, str(APPS / app), scenario, address],
                  env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _check_echo(r: dict[str, Any]) -> None:
    greeting = r.pop("greeting")
    assert greeting.startswith("hello ") and f"\\{ALICE}" in greeting, greeting
    # an SMB pipe cannot half-close: refused, and the connection goes on
    assert r == {"fileno": True, "timeout": "raised", "echo": True,
                 "shutdown": "EOPNOTSUPP", "after": "after"}


def test_blocking_client_and_asyncio_server(site: SmbSite) -> None:
    with asyncio_server(site, "bcas"):
        _check_echo(client(site, "blocking_app.py", "echo", site.address("bcas")))


def test_asyncio_client_and_blocking_server(site: SmbSite) -> None:
    with blocking_server(site, "acbs"):
        r = client(site, "client_app.py", "raw", site.address("acbs"))
    assert r["echo"] == "raw bytes"
    assert r["greeting"].startswith("hello ") and r["greeting"].endswith(f"\\{ALICE} #1")


def test_blocking_client_and_blocking_server(site: SmbSite) -> None:
    with blocking_server(site, "bcbs"):
        r = client(site, "blocking_app.py", "echo", site.address("bcbs"))
    assert r["greeting"].endswith(f"\\{ALICE} #1")
    _check_echo(r)


def test_refused_caller_gets_access_denied_and_never_reaches_accept(site: SmbSite) -> None:
    with blocking_server(site, "bref"):
        r = client(site, "blocking_app.py", "refused", site.address("bref"), user=BOB)
        assert r["error"] == "AccessDenied", r
        ok = client(site, "blocking_app.py", "echo", site.address("bref"))
    assert ok["greeting"].endswith(f"\\{ALICE} #1")  # BOB was never accepted


def test_missing_pipe(site: SmbSite) -> None:
    r = client(site, "blocking_app.py", "refused", site.address("nobody-serves-this"))
    assert r["error"] == "PipeNotFound", r


def test_a_server_that_vanishes_mid_stream(site: SmbSite) -> None:
    with blocking_server(site, "bvan"):
        r = client(site, "blocking_app.py", "vanish", site.address("bvan"))
    assert r["end"] in ("eof", "ConnectionResetError", "ConnectionAbortedError",
                        "BrokenPipeError", "ConnectionError"), r
    assert r["seconds"] < 30, r
