"""NTSTATUS codes a remote-pipe client acts on, and what each group of them means.

Shared by every backend, so that a status maps to the same npipe error everywhere.

What smbd answers a CREATE of ``\\\\HOST\\pipe\\NAME`` with, by what it finds at
``np/NAME`` (seen with smbd 4.17.12; tests/test_cross_host.py pins it):

- a front door that closes without a named_pipe_auth reply (how npipe refuses a caller:
  its ACL, a guest, a handshake it cannot read): STATUS_CONNECTION_DISCONNECTED, after
  smbd connected and sent its request twice;
- one that closes with the request come but unread (a server dying with the
  connection): STATUS_CONNECTION_RESET (closed before smbd sent it: DISCONNECTED);
- a socket nobody listens on (a killed server's, left behind): STATUS_CONNECTION_REFUSED;
- no socket at all: STATUS_OBJECT_NAME_NOT_FOUND;
- a reply with a non-zero NTSTATUS: ignored, the pipe opens;
- a reply and then a close: the pipe opens, its first READ fails with
  STATUS_PIPE_DISCONNECTED (the end of the stream; bytes sent just before the close
  may be lost).

The reply's file_type, device_state and allocation_size do not reach the CREATE
response (AllocationSize and EndofFile are 0, FileAttributes NORMAL whatever they are),
so a refusal has no other way to the client than the close. npipe's front door reads
the whole request before it refuses, so DISCONNECTED is reported as a refusal
(AccessDenied; a server that dies in the middle of the handshake, a window of
microseconds, gives it too, and the message says so), REFUSED as a server not running
(PipeNotFound: a killed server's case), RESET as neither (ConnectionLost).
"""

from __future__ import annotations

import re

from npipe.address import PipeAddress
from npipe.errors import (
    AccessDenied,
    AuthenticationError,
    ConnectionLost,
    NpipeError,
    PipeBusy,
    PipeNotFound,
)
from npipe.smb.credentials import Credentials

# NTSTATUS values (MS-ERREF 2.3.1).
STATUS_SUCCESS = 0x00000000
STATUS_PENDING = 0x00000103
STATUS_INVALID_HANDLE = 0xC0000008
STATUS_INVALID_DEVICE_REQUEST = 0xC0000010
STATUS_END_OF_FILE = 0xC0000011
STATUS_ACCESS_DENIED = 0xC0000022
STATUS_OBJECT_NAME_INVALID = 0xC0000033
STATUS_OBJECT_NAME_NOT_FOUND = 0xC0000034
STATUS_OBJECT_PATH_NOT_FOUND = 0xC000003A
STATUS_WRONG_PASSWORD = 0xC000006A
STATUS_NO_SUCH_USER = 0xC0000064
STATUS_LOGON_FAILURE = 0xC000006D
STATUS_ACCOUNT_RESTRICTION = 0xC000006E
STATUS_INVALID_LOGON_HOURS = 0xC000006F
STATUS_INVALID_WORKSTATION = 0xC0000070
STATUS_PASSWORD_EXPIRED = 0xC0000071
STATUS_ACCOUNT_DISABLED = 0xC0000072
STATUS_PIPE_NOT_AVAILABLE = 0xC00000AC
STATUS_PIPE_BUSY = 0xC00000AE
STATUS_PIPE_DISCONNECTED = 0xC00000B0
STATUS_PIPE_CLOSING = 0xC00000B1
STATUS_IO_TIMEOUT = 0xC00000B5
STATUS_NOT_SUPPORTED = 0xC00000BB
STATUS_NETWORK_NAME_DELETED = 0xC00000C9
STATUS_BAD_NETWORK_NAME = 0xC00000CC
STATUS_CANCELLED = 0xC0000120
STATUS_FILE_CLOSED = 0xC0000128
STATUS_PIPE_BROKEN = 0xC000014B
STATUS_LOGON_TYPE_NOT_GRANTED = 0xC000015B
STATUS_FS_DRIVER_REQUIRED = 0xC000019C
STATUS_ACCOUNT_EXPIRED = 0xC0000193
STATUS_USER_SESSION_DELETED = 0xC0000203
STATUS_CONNECTION_DISCONNECTED = 0xC000020C
STATUS_CONNECTION_RESET = 0xC000020D
STATUS_CONNECTION_REFUSED = 0xC0000236
STATUS_ACCOUNT_LOCKED_OUT = 0xC0000234
STATUS_NETWORK_SESSION_EXPIRED = 0xC000035C

# A CREATE that may succeed later: no such pipe (yet), a socket nobody listens on (a
# server dead, or restarting), or every instance taken. The first two are retried only
# for a short grace (npipe.smb.retry), busy until the timeout.
NOT_FOUND, NO_SERVER, BUSY = "not found", "no server", "busy"
RETRY_STATUSES = {
    STATUS_OBJECT_NAME_NOT_FOUND: NOT_FOUND,
    STATUS_CONNECTION_REFUSED: NO_SERVER,
    STATUS_PIPE_NOT_AVAILABLE: BUSY,
    STATUS_PIPE_BUSY: BUSY,
}
# smbd connected to the pipe's socket and the server closed it without answering the
# named_pipe_auth handshake: the server's way of refusing a caller.
REFUSED_STATUSES = {STATUS_CONNECTION_DISCONNECTED}
# The end of the pipe's byte stream, seen on a READ or a WRITE.
EOF_STATUSES = {
    STATUS_PIPE_BROKEN,
    STATUS_PIPE_DISCONNECTED,
    STATUS_PIPE_CLOSING,
    STATUS_END_OF_FILE,
    STATUS_FILE_CLOSED,
    STATUS_INVALID_HANDLE,
    STATUS_CANCELLED,
}
# The session or tree connect is gone: open a new connection and try again.
CONNECTION_GONE_STATUSES = {
    STATUS_NETWORK_NAME_DELETED,
    STATUS_USER_SESSION_DELETED,
    STATUS_NETWORK_SESSION_EXPIRED,
}
AUTH_STATUSES = {
    STATUS_LOGON_FAILURE: "wrong user name or password",
    STATUS_WRONG_PASSWORD: "wrong password",
    STATUS_NO_SUCH_USER: "no such user",
    STATUS_ACCOUNT_RESTRICTION: "account restriction",
    STATUS_INVALID_LOGON_HOURS: "not allowed to log on at this time",
    STATUS_INVALID_WORKSTATION: "not allowed to log on from this workstation",
    STATUS_PASSWORD_EXPIRED: "password expired",
    STATUS_ACCOUNT_DISABLED: "account disabled",
    STATUS_ACCOUNT_EXPIRED: "account expired",
    STATUS_ACCOUNT_LOCKED_OUT: "account locked out",
    STATUS_LOGON_TYPE_NOT_GRANTED: "network logon not granted",
}
# The name cannot be a pipe on this server: not worth retrying.
BAD_NAME_STATUSES = {
    STATUS_OBJECT_NAME_INVALID,
    STATUS_OBJECT_PATH_NOT_FOUND,
    STATUS_BAD_NETWORK_NAME,
}
# The server cannot do FSCTL_PIPE_WAIT (Samba: FS_DRIVER_REQUIRED).
NO_PIPE_WAIT_STATUSES = {
    STATUS_FS_DRIVER_REQUIRED,
    STATUS_NOT_SUPPORTED,
    STATUS_INVALID_DEVICE_REQUEST,
}


def gave_up_error(kind: str, address: PipeAddress, seconds: float) -> NpipeError:
    """The error for an open that retried a pipe of ``kind`` (a RETRY_STATUSES value)
    for ``seconds`` without success."""
    if kind == BUSY:
        return PipeBusy(f"pipe {address} stayed busy for {seconds:g} s")
    if kind == NO_SERVER:
        return PipeNotFound(
            f"the server of pipe {address} is not running: Samba found its socket but "
            f"nothing listens on it (the server died or stopped; tried for {seconds:g} s)"
        )
    return PipeNotFound(f"the server has no pipe {address} (tried for {seconds:g} s)")


def create_error(
    status: int | None, address: PipeAddress, credentials: Credentials, detail: str
) -> NpipeError:
    """The npipe error for a CREATE of ``address`` that failed with ``status``
    (None: no status, the failure ``detail`` describes)."""
    if status in REFUSED_STATUSES:
        return AccessDenied(
            f"the server of pipe {address} refused the connection of "
            f"{credentials.describe()}: it closed it without opening the pipe (its ACL "
            "does not allow you, or it failed in Samba's handshake: its log says which)"
        )
    if status == STATUS_CONNECTION_RESET:  # closed with smbd's request unread
        return ConnectionLost(
            f"the server of pipe {address} reset the connection before opening the pipe "
            "(it failed, or refused you, before reading Samba's handshake)"
        )
    if status == STATUS_ACCESS_DENIED:
        return AccessDenied(f"access to pipe {address} is denied to {credentials.describe()}")
    if status in BAD_NAME_STATUSES:
        return PipeNotFound(f"the server has no pipe named {address.name!r} ({status:#010x})")
    return ConnectionLost(f"opening pipe {address} failed: {detail}")


def auth_error(status: int, where: str, credentials: Credentials) -> AuthenticationError | None:
    """The AuthenticationError for a SESSION_SETUP that failed with ``status``, if it is
    a logon failure."""
    reason = AUTH_STATUSES.get(status)
    if reason is None:
        return None
    return AuthenticationError(
        f"{where} refused the logon of {credentials.describe()}: {reason} ({status:#010x})"
    )


# pyspnego's wrappers around the reason ("SpnegoError (N): ", GSSAPI's "Major (N): "),
# its separators (GSSAPI's minor status, the contexts), and contexts that say nothing.
_SPNEGO_NOISE = re.compile(r"SpnegoError \(\d+\): |Major \(\d+\): ")
_SPNEGO_PARTS = re.compile(r",? (?:Minor \(\d+\)|Context): ")
_SPNEGO_GENERIC = {
    "Unable to negotiate common mechanism",
    "Processing security token",
    "Operation not supported or available",
    "Unknown error code",
}
MAX_REASON = 240


def auth_failure_reason(exc: BaseException) -> str:
    """One line (at most MAX_REASON characters) on why pyspnego could not log on: its
    nested "SpnegoError (N): ..., Context: ..." text without the codes, and without the
    parts that say nothing."""
    text = _SPNEGO_NOISE.sub("", " ".join(str(exc).split()))
    parts = [p.strip(" ,") for p in _SPNEGO_PARTS.split(text)]
    useful = [p for p in parts if p and p not in _SPNEGO_GENERIC]
    reason = "; ".join(dict.fromkeys(useful)) or text or type(exc).__name__
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 3].rstrip() + "..."
    return reason
