"""Downgrade protection of the remote pipe client (both backends), through the tampering
proxy (tests/smb_tamper.py) in front of real private smbds.

An attacker on the path rewrites the NEGOTIATE: the client's (offer SMB 2.1 only, or
3.0 only) or the server's (no encryption capability on 3.0 / 3.0.2, no encryption
context on 3.1.1). By default only SMB 3.x is accepted (ConfigError naming
``allow_smb2`` otherwise); on 3.0 and 3.0.2 VALIDATE_NEGOTIATE_INFO, on 3.1.1 preauth
integrity, turn any other rewrite into NegotiationTampered, and the connection is
closed. ``allow_smb2=True`` accepts a real SMB 2 server, yet VALIDATE_NEGOTIATE_INFO
(sent on 2.x too) still catches an SMB 3 server talked down to 2.x. Needs root and
Samba's smbd: without them these tests skip, or fail when CI=true.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import pytest
from pipe_servers import SmbdPool
from smb_tamper import (
    CAP_ENCRYPTION,
    ENCRYPTION_CAPABILITIES,
    NEGOTIATE,
    TamperProxy,
    clear_capabilities,
    drop_context,
    negotiate_capabilities,
    negotiate_contexts,
    negotiate_dialect,
    offer_only,
    request_to,
    response_to,
)

from npipe.errors import ConfigError, NegotiationTampered
from npipe.smb import BACKENDS, get_client, open_pipe
from npipe.smb.credentials import Credentials
from npipe.smb.info import SmbConnectionInfo
from npipe.testing.netns import require_root_and_samba

pytestmark = pytest.mark.root

USER, PASSWORD = "npt-downgr", "npt-downgr-Pw-1"
CREDS = Credentials(USER, PASSWORD)
TIMEOUT = 20.0
BOUND = 60.0
TAMPERED = "tampered with (downgrade attack?)"
T = TypeVar("T")

SERVERS = {
    "smb3_11": {},
    "smb3_02": {"server max protocol": "SMB3_02"},
    "smb3_00": {"server max protocol": "SMB3_00"},
    "smb2_10": {"server max protocol": "SMB2_10"},
}


@pytest.fixture(scope="module")
def servers() -> Iterator[SmbdPool]:
    require_root_and_samba()
    s = SmbdPool(SERVERS, {USER: PASSWORD}, prefix="npdown")
    try:
        yield s
    finally:
        for name in BACKENDS:
            get_client(name).close_connections()
        s.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    yield name
    get_client(name).close_connections()


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, BOUND)

    return asyncio.run(bounded())


async def _echo_once(address: str, backend: str, **options: bool) -> SmbConnectionInfo:
    """One echo through the pipe; what its connection negotiated."""
    reader, writer = await open_pipe(address, credentials=CREDS, timeout=TIMEOUT,
                                     backend=backend, **options)
    try:
        payload = os.urandom(1000)
        writer.write(payload)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
        port = int(address.split(":")[1].split("/")[0])
        infos = [i for i in get_client(backend).connections() if i.port == port and i.alive]
        assert len(infos) == 1, infos
        return infos[0]
    finally:
        writer.close()


def _open_fails(address: str, backend: str, **options: bool) -> BaseException:
    with pytest.raises((ConfigError, NegotiationTampered)) as info:
        run(_echo_once(address, backend, **options))
    return info.value


def _connections_closed(proxy: TamperProxy) -> None:
    """The refused connection is gone (the proxy saw both sides close)."""
    deadline = time.monotonic() + 10
    while proxy.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.open_connections == 0


# --- SMB 2.x only with allow_smb2 ---------------------------------------------------


def test_client_negotiate_rewritten_to_smb21(servers: SmbdPool, backend: str) -> None:
    """The attacker makes the client seem to offer 2.1 only: refused by default."""
    with TamperProxy(servers.port("smb3_11")) as proxy:
        proxy.tamper(request_to(NEGOTIATE), "rewrite", edit=offer_only(0x0210),
                     from_client=True)
        error = _open_fails(proxy.address("echo"), backend)
        assert proxy.fired.is_set()
        assert isinstance(error, ConfigError), error
        assert "SMB 2.1" in str(error) and "allow_smb2=True" in str(error)
        _connections_closed(proxy)
        # allow_smb2=True accepts a real SMB 2 server (next test), but this one speaks
        # SMB 3: VALIDATE_NEGOTIATE_INFO, sent on 2.x too, shows the rewrite.
        proxy.tamper(request_to(NEGOTIATE), "rewrite", edit=offer_only(0x0210),
                     from_client=True)
        error = _open_fails(proxy.address("echo"), backend, allow_smb2=True)
        assert proxy.fired.is_set()
        assert isinstance(error, NegotiationTampered), error
        assert TAMPERED in str(error)
        _connections_closed(proxy)
        assert not proxy.errors, proxy.errors


def test_allow_smb2_without_tampering(servers: SmbdPool, backend: str) -> None:
    """allow_smb2=True does not change what a 3.x server negotiates."""
    with TamperProxy(servers.port("smb3_11")) as proxy:
        info = run(_echo_once(proxy.address("echo"), backend, allow_smb2=True))
        assert info.dialect == "3.1.1" and info.encrypted
        assert not proxy.errors, proxy.errors


def test_smb2_server_only_with_allow_smb2(servers: SmbdPool, backend: str) -> None:
    port = servers.port("smb2_10")
    address = f"//127.0.0.1:{port}/pipe/echo"
    error = _open_fails(address, backend)
    assert isinstance(error, ConfigError), error
    assert "negotiated SMB 2.1" in str(error) and "allow_smb2=True" in str(error)
    info = run(_echo_once(address, backend, allow_smb2=True))  # validated, signed
    assert info.dialect == "2.1" and info.signed and not info.encrypted


# --- 3.0 and 3.0.2: VALIDATE_NEGOTIATE_INFO -------------------------------------------


@pytest.mark.parametrize("config", ["smb3_00", "smb3_02"])
def test_validated_negotiation_passes(servers: SmbdPool, backend: str, config: str) -> None:
    """Untouched, a 3.0 / 3.0.2 session validates and encrypts."""
    with TamperProxy(servers.port(config)) as proxy:
        info = run(_echo_once(proxy.address("echo"), backend))
        assert info.dialect == {"smb3_00": "3.0", "smb3_02": "3.0.2"}[config]
        assert info.encrypted
        assert not proxy.errors, proxy.errors


@pytest.mark.parametrize("config", ["smb3_00", "smb3_02"])
def test_stripped_encryption_capability(servers: SmbdPool, backend: str, config: str) -> None:
    """CAP_ENCRYPTION cleared in the NEGOTIATE response: the client would sign only;
    VALIDATE_NEGOTIATE_INFO shows the server's real capabilities."""

    def offers_encryption(index: int, frame: bytes) -> bool:
        return index == 0 and bool(negotiate_capabilities(frame) & CAP_ENCRYPTION)

    with TamperProxy(servers.port(config)) as proxy:
        proxy.tamper(offers_encryption, "rewrite", edit=clear_capabilities(CAP_ENCRYPTION))
        error = _open_fails(proxy.address("echo"), backend)
        assert proxy.fired.is_set()
        assert isinstance(error, NegotiationTampered), error
        assert TAMPERED in str(error) and "capabilities" in str(error)
        _connections_closed(proxy)
        assert not proxy.errors, proxy.errors


def test_client_negotiate_rewritten_to_smb30(servers: SmbdPool, backend: str) -> None:
    """A 3.1.1 server made to pick 3.0 (the client seems to offer 3.0 only): the server
    sees the real dialect list in VALIDATE_NEGOTIATE_INFO and hangs up."""
    with TamperProxy(servers.port("smb3_11")) as proxy:
        proxy.tamper(request_to(NEGOTIATE), "rewrite", edit=offer_only(0x0300),
                     from_client=True)
        error = _open_fails(proxy.address("echo"), backend)
        assert proxy.fired.is_set()
        assert isinstance(error, NegotiationTampered), error
        assert TAMPERED in str(error)
        _connections_closed(proxy)
        assert not proxy.errors, proxy.errors


# --- 3.1.1: preauth integrity -------------------------------------------------------------


def test_stripped_encryption_context(servers: SmbdPool, backend: str) -> None:
    """The ENCRYPTION_CAPABILITIES context removed from the 3.1.1 NEGOTIATE response: the
    keys hash the response as each side saw it, so the session's signature fails."""

    def has_cipher(index: int, frame: bytes) -> bool:
        return (index == 0 and negotiate_dialect(frame) == 0x0311
                and any(k == ENCRYPTION_CAPABILITIES for k, _ in negotiate_contexts(frame)))

    with TamperProxy(servers.port("smb3_11")) as proxy:
        proxy.tamper(has_cipher, "rewrite", edit=drop_context(ENCRYPTION_CAPABILITIES))
        error = _open_fails(proxy.address("echo"), backend)
        assert proxy.fired.is_set()
        assert isinstance(error, NegotiationTampered), error
        assert TAMPERED in str(error) and "preauth integrity" in str(error)
        _connections_closed(proxy)
        assert not proxy.errors, proxy.errors


def test_untouched_311_encrypts(servers: SmbdPool, backend: str) -> None:
    with TamperProxy(servers.port("smb3_11")) as proxy:
        proxy.tamper(response_to(0xFF), "drop")  # matches nothing: the proxy only counts
        info = run(_echo_once(proxy.address("echo"), backend))
        assert info.dialect == "3.1.1" and info.encrypted
        assert not proxy.fired.is_set() and not proxy.errors


def test_client_negotiate_rewritten_on_311(servers: SmbdPool, backend: str) -> None:
    """Any change to the client's 3.1.1 NEGOTIATE (here: its 2.x dialects dropped, the
    cipher left alone) changes the server's preauth hash: the session's keys differ and
    the final SESSION_SETUP signature fails (smbprotocol itself checks it only on a
    session it will not encrypt; the backend checks it always)."""
    with TamperProxy(servers.port("smb3_11")) as proxy:
        proxy.tamper(request_to(NEGOTIATE), "rewrite",
                     edit=offer_only(0x0300, 0x0302, 0x0311), from_client=True)
        error = _open_fails(proxy.address("echo"), backend)
        assert proxy.fired.is_set()
        assert isinstance(error, NegotiationTampered), error
        assert TAMPERED in str(error) and "preauth integrity" in str(error)
        _connections_closed(proxy)
        assert not proxy.errors, proxy.errors
