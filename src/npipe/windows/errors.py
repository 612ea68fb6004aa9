"""Win32 error codes of pipe operations as npipe's exceptions (table-driven, sans I/O).

Codes from "System Error Codes" (learn.microsoft.com/windows/win32/debug/system-error-codes).
``opening`` tells a client's CreateFile/WaitNamedPipe (True) from a server's
CreateNamedPipe/ConnectNamedPipe (False): ERROR_ACCESS_DENIED means "not admitted" to the
first and "the name is taken" to the second (FILE_FLAG_FIRST_PIPE_INSTANCE fails with it).
"""

from __future__ import annotations

from npipe.errors import (
    AccessDenied,
    AddressError,
    AuthenticationError,
    ConnectionLost,
    HostUnreachable,
    NpipeError,
    PipeBusy,
    PipeInUse,
    PipeNotFound,
)

ERROR_FILE_NOT_FOUND = 2
ERROR_PATH_NOT_FOUND = 3
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_REM_NOT_LIST = 51  # the remote computer is not available
ERROR_BAD_NETPATH = 53  # the network path was not found
ERROR_NETNAME_DELETED = 64  # the network name is no longer available
ERROR_NETWORK_ACCESS_DENIED = 65
ERROR_BAD_NET_NAME = 67  # the network name (share, here IPC$) cannot be found
ERROR_BROKEN_PIPE = 109
ERROR_SEM_TIMEOUT = 121  # WaitNamedPipe's time-out (WaitNamedPipeW, Remarks)
ERROR_INVALID_NAME = 123
ERROR_BAD_PATHNAME = 161
ERROR_BAD_PIPE = 230  # the pipe state is invalid
ERROR_PIPE_BUSY = 231  # all pipe instances are busy
ERROR_NO_DATA = 232  # the pipe is being closed
ERROR_PIPE_NOT_CONNECTED = 233  # no process is on the other end of the pipe
ERROR_MORE_DATA = 234
ERROR_PIPE_CONNECTED = 535  # not an error: a client connected before ConnectNamedPipe
ERROR_PIPE_LISTENING = 536  # waiting for a process to open the other end
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997
ERROR_SESSION_CREDENTIAL_CONFLICT = 1219
ERROR_NETWORK_UNREACHABLE = 1231
ERROR_HOST_UNREACHABLE = 1232
ERROR_CONNECTION_REFUSED = 1225
ERROR_CONNECTION_ABORTED = 1236
ERROR_NO_LOGON_SERVERS = 1311
ERROR_LOGON_FAILURE = 1326
ERROR_ACCOUNT_RESTRICTION = 1327
ERROR_INVALID_LOGON_HOURS = 1328
ERROR_INVALID_WORKSTATION = 1329
ERROR_PASSWORD_EXPIRED = 1330
ERROR_ACCOUNT_DISABLED = 1331
ERROR_LOGON_TYPE_NOT_GRANTED = 1385
ERROR_ACCOUNT_EXPIRED = 1793
ERROR_PASSWORD_MUST_CHANGE = 1907
ERROR_ACCOUNT_LOCKED_OUT = 1909

# Codes that are not failures: callers handle them before mapping anything.
NOT_FAILURES = frozenset({ERROR_PIPE_CONNECTED, ERROR_IO_PENDING, ERROR_MORE_DATA})

_Entry = tuple[type[NpipeError], str]

# code -> (exception, message); {path} is filled in. Messages say what to do.
_COMMON: dict[int, _Entry] = {
    ERROR_INVALID_NAME: (AddressError, "{path} is not a valid pipe name"),
    ERROR_BAD_PATHNAME: (AddressError, "{path} is not a valid pipe path"),
    ERROR_SEM_TIMEOUT: (
        PipeBusy, "timed out waiting for a free instance of pipe {path}: its server is busy;"
        " try again or give a longer timeout"),
    ERROR_BROKEN_PIPE: (ConnectionLost, "pipe {path}: the other end closed it"),
    ERROR_NO_DATA: (ConnectionLost, "pipe {path} is being closed by the other end"),
    ERROR_PIPE_NOT_CONNECTED: (ConnectionLost, "pipe {path}: nobody is on the other end"),
    ERROR_BAD_PIPE: (ConnectionLost, "pipe {path} is in an invalid state (closed?)"),
    ERROR_PIPE_LISTENING: (ConnectionLost, "pipe {path}: no client has connected yet"),
    ERROR_OPERATION_ABORTED: (ConnectionLost, "pipe {path}: the operation was cancelled"),
    ERROR_CONNECTION_ABORTED: (ConnectionLost, "pipe {path}: the connection was aborted"),
    ERROR_INVALID_HANDLE: (ConnectionLost, "pipe {path}: the handle is closed"),
    # Remote pipes, through the Windows SMB client.
    ERROR_REM_NOT_LIST: (
        HostUnreachable, "the host of {path} is not available: is it up and sharing "
        "(its Server service, SMB port 445)?"),
    ERROR_BAD_NETPATH: (
        HostUnreachable, "the host of {path} cannot be found or reached: check its name, "
        "the network and that its Server service (SMB, port 445) runs"),
    ERROR_NETNAME_DELETED: (
        HostUnreachable, "the connection to the host of {path} was lost (network name "
        "deleted): check the network, then try again"),
    ERROR_BAD_NET_NAME: (
        HostUnreachable, "the host of {path} answered but offers no IPC$ share: is it a "
        "Windows or Samba server?"),
    ERROR_NETWORK_UNREACHABLE: (HostUnreachable, "the network of {path}'s host is unreachable"),
    ERROR_HOST_UNREACHABLE: (HostUnreachable, "the host of {path} is unreachable"),
    ERROR_CONNECTION_REFUSED: (
        HostUnreachable, "the host of {path} refused the connection: does it serve SMB "
        "(port 445)?"),
    ERROR_NETWORK_ACCESS_DENIED: (
        AccessDenied, "network access to {path} denied: the host does not admit you"),
    ERROR_LOGON_FAILURE: (
        AuthenticationError, "logon to the host of {path} failed: unknown user or bad "
        "password (net use \\\\HOST\\IPC$ /user:DOMAIN\\name to log on first)"),
    ERROR_ACCOUNT_RESTRICTION: (
        AuthenticationError, "logon to the host of {path} refused: an account restriction "
        "(e.g. a blank password) applies"),
    ERROR_INVALID_LOGON_HOURS: (
        AuthenticationError, "logon to the host of {path} refused outside the account's "
        "logon hours"),
    ERROR_INVALID_WORKSTATION: (
        AuthenticationError, "logon to the host of {path} refused: the account may not log "
        "on from this computer"),
    ERROR_PASSWORD_EXPIRED: (
        AuthenticationError, "logon to the host of {path} refused: the password has expired"),
    ERROR_PASSWORD_MUST_CHANGE: (
        AuthenticationError, "logon to the host of {path} refused: the password must be "
        "changed first"),
    ERROR_ACCOUNT_DISABLED: (
        AuthenticationError, "logon to the host of {path} refused: the account is disabled"),
    ERROR_ACCOUNT_EXPIRED: (
        AuthenticationError, "logon to the host of {path} refused: the account has expired"),
    ERROR_ACCOUNT_LOCKED_OUT: (
        AuthenticationError, "logon to the host of {path} refused: the account is locked out"),
    ERROR_LOGON_TYPE_NOT_GRANTED: (
        AuthenticationError, "logon to the host of {path} refused: the account may not log "
        "on over the network there"),
    ERROR_NO_LOGON_SERVERS: (
        AuthenticationError, "no domain controller could check the logon to {path}"),
    ERROR_SESSION_CREDENTIAL_CONFLICT: (
        AuthenticationError, "this logon session is already connected to the host of {path}"
        " as another user: disconnect that first (net use \\\\HOST\\IPC$ /delete)"),
}

_OPENING: dict[int, _Entry] = {
    ERROR_FILE_NOT_FOUND: (PipeNotFound, "no pipe {path}: is its server running?"),
    ERROR_PATH_NOT_FOUND: (PipeNotFound, "no pipe {path}: is its server running?"),
    ERROR_ACCESS_DENIED: (
        AccessDenied, "access to pipe {path} denied: its ACL does not admit you (its server"
        " can add you, e.g. --acl user:DOMAIN\\name)"),
    ERROR_PIPE_BUSY: (
        PipeBusy, "pipe {path} is busy: every instance is in use; try again or give a "
        "longer timeout"),
}

_CREATING: dict[int, _Entry] = {
    ERROR_FILE_NOT_FOUND: (AddressError, "cannot create pipe {path}: no such path"),
    ERROR_PATH_NOT_FOUND: (AddressError, "cannot create pipe {path}: no such path"),
    # FILE_FLAG_FIRST_PIPE_INSTANCE on a live name, or no FILE_CREATE_PIPE_INSTANCE on
    # another user's pipe: someone else serves it either way.
    ERROR_ACCESS_DENIED: (
        PipeInUse, "pipe {path} is already served (by another process or user): stop that "
        "server or choose another name"),
    ERROR_PIPE_BUSY: (
        PipeBusy, "pipe {path} has as many instances as it may: no new one can be created"),
}


def pipe_error(
    winerror: int, path: str, *, opening: bool, detail: str | None = None
) -> NpipeError:
    """npipe's exception for ``winerror`` from an operation on pipe ``path``; ``detail``
    (e.g. the OS's own text) is added to codes without an entry."""
    table = _OPENING if opening else _CREATING
    entry = table.get(winerror) or _COMMON.get(winerror)
    if entry is not None:
        cls, message = entry
        return cls(message.format(path=path))
    what = "opening" if opening else "serving"
    extra = f": {detail}" if detail else ""
    return NpipeError(f"{what} pipe {path} failed with Windows error {winerror}{extra}")


def from_oserror(exc: OSError, path: str, *, opening: bool) -> Exception:
    """npipe's exception for a failed Win32 call (``exc.winerror``); ``exc`` itself when
    it carries no Windows error code."""
    code = getattr(exc, "winerror", None)
    if not isinstance(code, int):
        return exc
    return pipe_error(code, path, opening=opening, detail=exc.strerror)
