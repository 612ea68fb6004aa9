"""Who is the owner of a pipe served through Samba, end to end (npipe.acl's rule).

A session that Samba maps to the serving user's own uid is the owner: an owner-only pipe
served by an ordinary user (behind root's `npipe samba link NAME --user USER`) admits that
user over SMB, and nobody else. A session Samba maps to uid 0 is never the owner of a pipe
root serves, and a uid 0 entry admits no remote caller; ``everyone`` does.

    client ns 198.18.0.2: npipe client (each SMB backend) as npt-owner / npt-stranger / root
        --SMB over TCP 445-->  server ns 198.18.0.1: smbd -> np/NAME -> npipe server
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from npipe.smb import BACKENDS
from npipe.testing.netns import (
    SmbSite,
    require_root_and_samba,
    run_in,
    skip_or_fail,
    smb_site,
    tool,
)

OWNER, STRANGER, PASSWORD = "npt-owner", "npt-stranger", "Owner-Passw0rd!"
ROOT = "root"  # an SMB account for root in the private smbd's passdb: Samba maps it to uid 0
WAIT = 60

# A raw stream server on each NAME[=ACL] given (no ACL: the default, owner-only): greets
# every caller with what it knows of it (and of itself) as a JSON line, then echoes.
# Prints "ready" when it serves; stops when its stdin closes.
SERVER = r"""
import asyncio, json, os, sys
import npipe

async def handler(reader, writer):
    c = npipe.caller(writer)
    hello = {"transport": c.transport, "uid": c.uid, "account": c.account,
             "server_uid": os.getuid()} if c else {}
    writer.write((json.dumps(hello) + "\n").encode())
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()

async def main():
    servers = []
    for spec in sys.argv[1:]:
        name, _, acl = spec.partition("=")
        kw = {"acl": npipe.Acl.parse(acl)} if acl else {}
        servers.append(await npipe.start_server(handler, name, smb=True, **kw))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: done.done() or done.set_result(None))
    await done
    for server in servers:
        server.close()

asyncio.run(main())
"""

# Opens ADDRESS through SMB backend BACKEND as $NPIPE_USER: the server's greeting and an
# echo, or the npipe error that opening gave.
CLIENT = r"""
import asyncio, json, sys
import npipe

async def main(address, backend):
    try:
        reader, writer = await npipe.open_connection(address, timeout=5, smb_backend=backend)
    except npipe.NpipeError as e:
        return {"error": type(e).__name__, "message": str(e)}
    hello = json.loads(await asyncio.wait_for(reader.readline(), 30))
    writer.write(b"ping")
    await writer.drain()
    echo = (await asyncio.wait_for(reader.readexactly(4), 30)).decode()
    writer.close()
    return {"hello": hello, "echo": echo}

print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
"""


@pytest.fixture(scope="module")
def site() -> Iterator[SmbSite]:
    require_root_and_samba()
    if tool("setpriv") is None:
        skip_or_fail("setpriv not found (apt-get install util-linux)")
    with smb_site({OWNER: PASSWORD, STRANGER: PASSWORD, ROOT: PASSWORD}, prefix="npo") as bed:
        os.chmod(bed.workdir, 0o755)  # the owner's pipe directory is in it
        yield bed


def as_user(user: str, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` (its uid, gid and groups; nothing of root's kept)."""
    pw = pwd.getpwnam(user)
    return [tool("setpriv") or "setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
            "--init-groups", "--", *argv]


def server_argv(*pipes: str) -> list[str]:
    # -I: nothing from the environment or the working directory (not the owner's to read)
    return [sys.executable, "-I", "-c", SERVER, *pipes]


def client(site: SmbSite, name: str, user: str, backend: str) -> dict[str, Any]:
    """Open pipe NAME from the client host as SMB user ``user``."""
    env = {**os.environ, "NPIPE_USER": user, "NPIPE_PASSWORD": PASSWORD}
    done = run_in(site.hosts.client_ns,
                  [sys.executable, "-c", CLIENT, site.address(name), backend],
                  env=env, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def refused(result: dict[str, Any]) -> bool:
    return result.get("error") == "AccessDenied"


@pytest.fixture(scope="module")
def owners_pipe(site: SmbSite) -> Iterator[str]:
    """Pipe 'ownedpipe', owner-only (the default ACL), served by the ordinary user OWNER
    behind root's `npipe samba link ownedpipe --user OWNER`."""
    owner = pwd.getpwnam(OWNER)
    pipes = site.workdir / "owner-pipes"  # OWNER's own local pipe directory
    pipes.mkdir(mode=0o700)
    os.chown(pipes, owner.pw_uid, owner.pw_gid)
    env = {**os.environ, "NPIPE_SAMBA_NP_DIR": str(site.smbd.np_dir)}
    link = [sys.executable, "-m", "npipe", "samba", "link", "ownedpipe"]
    done = subprocess.run([*link, "--user", OWNER], env=env, capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 0, done.stderr
    try:
        with site.serve(as_user(OWNER, server_argv("ownedpipe")), NPIPE_PIPE_DIR=str(pipes)):
            yield "ownedpipe"
    finally:
        subprocess.run([*link, "--remove"], env=env, capture_output=True, timeout=WAIT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_serving_user_is_the_owner_over_smb(
    site: SmbSite, owners_pipe: str, backend: str
) -> None:
    owner = pwd.getpwnam(OWNER)
    mine = client(site, owners_pipe, OWNER, backend)
    assert "error" not in mine, f"the owner {OWNER} was refused on its own pipe: {mine}"
    # the handler saw the SMB session Samba mapped to the owner's uid, in a server of OWNER's
    assert mine["hello"] == {"transport": "smb", "uid": owner.pw_uid, "account": OWNER,
                             "server_uid": owner.pw_uid}
    assert mine["echo"] == "ping"
    # another SMB user, and root's SMB account, are not the owner
    for other in (STRANGER, ROOT):
        theirs = client(site, owners_pipe, other, backend)
        assert refused(theirs), f"{other} on {OWNER}'s owner-only pipe: {theirs}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_session_mapped_to_root_is_not_the_owner_of_roots_pipe(
    site: SmbSite, backend: str
) -> None:
    """Root serves: owner-only, a uid:0 entry and `everyone`; root's SMB account (which
    Samba maps to uid 0) gets only through `everyone`."""
    with site.serve(server_argv("rootonly", "rootbyuid=uid:0,user:root", "rootopen=everyone")):
        opened = client(site, "rootopen", ROOT, backend)
        assert "error" not in opened, f"root's SMB account could not open any pipe: {opened}"
        assert opened["hello"] == {"transport": "smb", "uid": 0, "account": ROOT,
                                   "server_uid": 0}
        for name in ("rootonly", "rootbyuid"):
            result = client(site, name, ROOT, backend)
            assert refused(result), f"a session mapped to uid 0 on root's pipe {name}: {result}"
        # and an ordinary SMB user is not root's owner either
        assert refused(client(site, "rootonly", OWNER, backend))
