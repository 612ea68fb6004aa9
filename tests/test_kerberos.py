"""Kerberos across hosts: a client with a ticket from a Samba AD DC opens a pipe that an
npipe server on that DC serves through the DC's own smbd.

    client ns 198.18.0.2                            server ns 198.18.0.1: samba -F
      kinit alice  ---------------------------------->  KDC (port 88)
      open_pipe(//dc1.npipe.test/pipe/NAME,  --SMB-->  smbd (445) -> np/NAME -> npipe
                auth_protocol="kerberos")

Every remote-pipe backend in npipe.smb.BACKENDS is tried.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from addc import DC_FQDN, DC_NAME, REALM, WORKGROUP, AdDc, KerberosClient, require_kerberos

import npipe.smb
from npipe.testing.netns import Hosts, serve_app, server_env, two_hosts

APPS = Path(__file__).resolve().parent / "cross_host"
ALICE, BOB, PASSWORD = "alice", "bob", "Pipe-Passw0rd!"
ECHO_PIPE, GRPC_PIPE, UPN_PIPE = "krbecho", "krbgrpc", "krbupn"
ALLOWED = f"{WORKGROUP}\\{ALICE}"  # a domain account: matched by name, not by uid
ALLOWED_UPN = f"{ALICE}@{REALM}"  # the same account by its user principal name
AUTHORITY_ASSERTED, NTLM_AUTHENTICATION = "S-1-18-1", "S-1-5-64-10"

pytestmark = [pytest.mark.root, pytest.mark.parametrize("backend", npipe.smb.BACKENDS)]


@dataclass
class Realm:
    hosts: Hosts
    dc: AdDc
    client: KerberosClient
    workdir: Path

    def ccache(self, user: str | None) -> Path:
        """A new credential cache with a TGT for ``user`` (None: no cache, no ticket)."""
        path = self.workdir / f"ccache-{uuid.uuid4().hex}"  # kinit makes it
        if user is not None:
            self.client.kinit(path, user, PASSWORD)
        return path

    def run(self, scenario: str, backend: str, address: str,
            ccache: Path) -> dict[str, Any]:
        done = self.client.run([sys.executable, str(APPS / "kerberos_app.py"), scenario,
                                backend, address], ccache=ccache, timeout=90)
        assert done.returncode == 0, done.stderr[-3000:]
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def serve(hosts: Hosts, dc: AdDc, workdir: Path,
          argv: list[str]) -> contextlib.AbstractContextManager[object]:
    """A server app in the DC's namespace, its front door in the DC smbd's np/."""
    return serve_app(hosts.server_ns, [sys.executable, *argv],
                     server_env(dc.np_dir, workdir / "pipes"))


@pytest.fixture(scope="module")
def realm() -> Iterator[Realm]:
    require_kerberos()
    workdir = Path(tempfile.mkdtemp(prefix="npkrb", dir="/tmp"))
    try:
        with two_hosts() as hosts, AdDc(workdir / "dc", hosts) as dc:
            for user in (ALICE, BOB):
                dc.samba_tool("user", "create", user, PASSWORD)
                dc.samba_tool("user", "setexpiry", user, "--noexpiry")
            # Clients that dial the address ask for a ticket to cifs/ADDRESS.
            dc.samba_tool("spn", "add", f"cifs/{hosts.server_ip}", f"{DC_NAME.upper()}$")
            client = KerberosClient(workdir / "client", hosts)
            echo = [str(APPS / "kerberos_app.py"), "serve", ECHO_PIPE, ALLOWED]
            grpc = [str(APPS / "server_app.py"), "grpc", GRPC_PIPE, ALLOWED]
            upn = [str(APPS / "kerberos_app.py"), "serve", UPN_PIPE, ALLOWED_UPN]
            with serve(hosts, dc, workdir, echo), serve(hosts, dc, workdir, grpc), \
                    serve(hosts, dc, workdir, upn):
                yield Realm(hosts, dc, client, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def assert_alice(who: dict[str, Any], realm: Realm) -> None:
    assert who["transport"] == "smb"
    assert (who["account"], who["domain"]) == (ALICE, WORKGROUP)
    assert who["sids"][0].startswith("S-1-5-21-")
    # A Kerberos logon as the server saw it: the KDC's "authentication authority asserted
    # identity" SID, and not the "NTLM authentication" SID (seen here for NTLM logons).
    assert AUTHORITY_ASSERTED in who["sids"] and NTLM_AUTHENTICATION not in who["sids"]
    assert who["address"] == realm.hosts.client_ip


@pytest.mark.parametrize("host", ["name", "address"])
def test_echo_with_a_kerberos_ticket(realm: Realm, backend: str, host: str) -> None:
    server = DC_FQDN if host == "name" else realm.hosts.server_ip
    ccache = realm.ccache(ALICE)
    r = realm.run("raw", backend, f"//{server}/pipe/{ECHO_PIPE}", ccache)
    assert r["echo"] == "kerberos bytes"
    who = r["who"]
    assert_alice(who, realm)
    assert who["upn"] == f"{ALICE}@{REALM.lower()}"
    # The client got a service ticket for the server it dialled.
    assert any(f"/{server}@".lower() in t.lower() for t in realm.client.tickets(ccache))


def test_grpc_with_a_kerberos_ticket(realm: Realm, backend: str) -> None:
    r = realm.run("grpc", backend, f"//{DC_FQDN}/pipe/{GRPC_PIPE}", realm.ccache(ALICE))
    assert r["echo"] == "over grpc"
    assert_alice(r["who"], realm)


def test_acl_refuses_another_domain_user(realm: Realm, backend: str) -> None:
    r = realm.run("error", backend, f"//{DC_FQDN}/pipe/{ECHO_PIPE}", realm.ccache(BOB))
    assert r["error"] == "AccessDenied", r


def test_acl_by_user_principal_name(realm: Realm, backend: str) -> None:
    r = realm.run("raw", backend, f"//{DC_FQDN}/pipe/{UPN_PIPE}", realm.ccache(ALICE))
    assert r["echo"] == "kerberos bytes"
    assert_alice(r["who"], realm)
    r = realm.run("error", backend, f"//{DC_FQDN}/pipe/{UPN_PIPE}", realm.ccache(BOB))
    assert r["error"] == "AccessDenied", r


def test_no_ticket_is_an_authentication_error(realm: Realm, backend: str) -> None:
    r = realm.run("error", backend, f"//{DC_FQDN}/pipe/{ECHO_PIPE}", realm.ccache(None))
    assert r["error"] == "AuthenticationError", r
    assert "Kerberos" in r["message"]
    assert r["seconds"] < 5  # a clear failure, not a wait for the open timeout
