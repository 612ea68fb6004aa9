"""The remote open's retry policy (npipe.smb.retry) and status mapping (npipe.smb.status),
with a fake connection: which CREATE failures are waited for, and how long."""

from __future__ import annotations

import asyncio
import time

import pytest

from npipe.address import parse_address
from npipe.errors import AccessDenied, ConnectionLost, PipeBusy, PipeNotFound
from npipe.smb import status as st
from npipe.smb.credentials import Credentials
from npipe.smb.retry import Refused, open_with_retries

ADDRESS = parse_address("//server1/pipe/shop")
CREDS = Credentials("alice", "secret")


class FakeConnection:
    where = "server1:445"
    alive = True
    pipe_wait = False

    def retire(self, why: str) -> None:
        raise AssertionError(f"retired: {why}")


def attempt(statuses: list[int], timeout: float) -> tuple[BaseException, float, int]:
    """Open with CREATEs that fail with ``statuses`` in turn (the last for ever): the
    error, the seconds it took and the CREATEs made."""
    made = 0

    async def connect(deadline: float) -> FakeConnection:
        return FakeConnection()

    async def create(connection: FakeConnection, timeout: float) -> Refused:
        nonlocal made
        made += 1
        return Refused(statuses[min(made, len(statuses)) - 1], "refused")

    async def main() -> None:
        await open_with_retries(ADDRESS, CREDS, timeout, connect=connect, create=create,
                                pipe_wait=lambda c: None)  # type: ignore[arg-type,return-value]

    start = time.monotonic()
    with pytest.raises(Exception) as info:
        asyncio.run(main())
    return info.value, time.monotonic() - start, made


def test_a_missing_pipe_is_retried_for_the_grace_only() -> None:
    error, seconds, made = attempt([st.STATUS_OBJECT_NAME_NOT_FOUND], timeout=10)
    assert isinstance(error, PipeNotFound) and "has no pipe" in str(error)
    assert 0.9 <= seconds < 1.6 and made > 2


def test_a_dead_server_is_retried_for_the_grace_then_not_running() -> None:
    """smbd's STATUS_CONNECTION_REFUSED: a socket nobody listens on (a killed server)."""
    error, seconds, _made = attempt([st.STATUS_CONNECTION_REFUSED], timeout=10)
    assert isinstance(error, PipeNotFound) and "not running" in str(error)
    assert "refused" not in str(error) and 0.9 <= seconds < 1.6


def test_a_busy_pipe_is_waited_for_until_the_timeout() -> None:
    error, seconds, _made = attempt([st.STATUS_PIPE_BUSY], timeout=2.5)
    assert isinstance(error, PipeBusy) and 2.4 <= seconds < 3.5


def test_a_pipe_found_busy_after_missing_waits_until_the_timeout() -> None:
    error, seconds, _made = attempt(
        [st.STATUS_OBJECT_NAME_NOT_FOUND, st.STATUS_PIPE_NOT_AVAILABLE], timeout=2.5
    )
    assert isinstance(error, PipeBusy) and 2.4 <= seconds < 3.5


def test_a_short_timeout_bounds_the_grace() -> None:
    _error, seconds, _made = attempt([st.STATUS_OBJECT_NAME_NOT_FOUND], timeout=0.3)
    assert seconds < 0.8


def test_a_refusal_is_access_denied_at_once() -> None:
    """smbd's STATUS_CONNECTION_DISCONNECTED: the front door closed without a reply."""
    error, seconds, made = attempt([st.STATUS_CONNECTION_DISCONNECTED], timeout=10)
    assert isinstance(error, AccessDenied) and "refused" in str(error) and "alice" in str(error)
    assert made == 1 and seconds < 0.5


def test_a_reset_is_not_called_a_refusal() -> None:
    error, _seconds, made = attempt([st.STATUS_CONNECTION_RESET], timeout=10)
    assert isinstance(error, ConnectionLost) and made == 1


@pytest.mark.parametrize("text, reason", [
    ("SpnegoError (1): SpnegoError (7): Major (458752): No credentials were supplied, or the "
     "credentials were unavailable or inaccessible, Minor (2529639053): No Kerberos "
     "credentials available (default cache: FILE:/tmp/krb5cc_0), Context: Processing "
     "security token, Context: Unable to negotiate common mechanism",
     "No credentials were supplied, or the credentials were unavailable or inaccessible; "
     "No Kerberos credentials available (default cache: FILE:/tmp/krb5cc_0)"),
    ("SpnegoError (1): SpnegoError (16): Operation not supported or available, Context: No "
     "username or password was specified and the credential cache did not exist or "
     "contained no credentials, Context: Unable to negotiate common mechanism",
     "No username or password was specified and the credential cache did not exist or "
     "contained no credentials"),
    ("SpnegoError (4): bad\nthing,\n  Context: over\ntwo lines", "bad thing; over two lines"),
    ("x" * 1000, "x" * (st.MAX_REASON - 3) + "..."),
])
def test_auth_failure_reason_is_one_short_line(text: str, reason: str) -> None:
    assert st.auth_failure_reason(Exception(text)) == reason
