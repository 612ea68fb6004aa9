"""The Win32 calls npipe's Windows pipes make, through ctypes (Windows only).

Every function is declared with argtypes/restype and ``use_last_error=True``; a
failure raises ``OSError`` with ``.winerror`` set (``ctypes.WinError``), which
npipe.windows.errors maps to npipe's errors. Nothing here decides policy: the
security descriptor comes from npipe.windows.sddl, the wait from waiting.py.

Why not asyncio's own pipe helpers: ``_winapi.CreateNamedPipe`` takes no security
attributes (NULL: the default DACL lets Everyone read), and ``_overlapped.ConnectPipe``
opens without SECURITY_SQOS_PRESENT (the server could impersonate the caller fully).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import sys
from collections.abc import Iterator
from ctypes import wintypes

assert sys.platform == "win32"  # never imported elsewhere; mypy checks it as Windows code

_kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
_advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
_ws2_32 = ctypes.WinDLL("ws2_32", use_last_error=True)

HANDLE = wintypes.HANDLE
INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value

# CreateNamedPipeW: open mode.
PIPE_ACCESS_DUPLEX = 0x00000003
FILE_FLAG_OVERLAPPED = 0x40000000
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000  # fails (ACCESS_DENIED) if the name exists
# Pipe mode: bytes both ways, blocking semantics (overlapped I/O makes it async).
PIPE_TYPE_BYTE = 0x00000000
PIPE_READMODE_BYTE = 0x00000000
PIPE_WAIT = 0x00000000
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008  # SMB clients are refused by the kernel
PIPE_UNLIMITED_INSTANCES = 255
# Kestrel uses 64 KiB too; 8 KiB (asyncio's) halves throughput for large messages.
BUFFER_SIZE = 64 * 1024

# CreateFileW for a client. Never GENERIC_WRITE: FILE_GENERIC_WRITE includes
# FILE_APPEND_DATA, which on a pipe is FILE_CREATE_PIPE_INSTANCE (and npipe's DACL
# does not grant it to clients, so asking for it would be refused).
READ_CONTROL = 0x00020000  # to read the pipe's owner (GetSecurityInfo)
SYNCHRONIZE = 0x00100000
FILE_READ_DATA = 0x0001
FILE_WRITE_DATA = 0x0002
FILE_READ_EA = 0x0008
FILE_READ_ATTRIBUTES = 0x0080
FILE_GENERIC_READ = (
    READ_CONTROL | FILE_READ_DATA | FILE_READ_ATTRIBUTES | FILE_READ_EA | SYNCHRONIZE
)
CLIENT_DESIRED_ACCESS = FILE_GENERIC_READ | FILE_WRITE_DATA
OPEN_EXISTING = 3
# The server may learn who we are but not act as us (Identification level).
SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 0x00010000

ERROR_PIPE_CONNECTED = 535
ERROR_SEM_TIMEOUT = 121
ERROR_INSUFFICIENT_BUFFER = 122
ERROR_NONE_MAPPED = 1332
ERROR_CANNOT_IMPERSONATE = 1368  # "until data has been read from that pipe"

# Tokens and security descriptors.
TOKEN_QUERY = 0x0008
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
TOKEN_USER_CLASS = 1
TOKEN_GROUPS_CLASS = 2
SE_KERNEL_OBJECT = 6
OWNER_SECURITY_INFORMATION = 0x1
SDDL_REVISION_1 = 1
SE_GROUP_ENABLED = 0x4
SE_GROUP_USE_FOR_DENY_ONLY = 0x10
SE_GROUP_LOGON_ID = 0xC0000000


class SECURITY_ATTRIBUTES(ctypes.Structure):
    _fields_ = [
        ("nLength", wintypes.DWORD),
        ("lpSecurityDescriptor", wintypes.LPVOID),
        ("bInheritHandle", wintypes.BOOL),
    ]


class SID_AND_ATTRIBUTES(ctypes.Structure):
    _fields_ = [("Sid", wintypes.LPVOID), ("Attributes", wintypes.DWORD)]


LPSECURITY_ATTRIBUTES = ctypes.POINTER(SECURITY_ATTRIBUTES)


def _declare(dll: ctypes.WinDLL, name: str, restype: object, *argtypes: object) -> None:
    fn = getattr(dll, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_declare(_kernel32, "CreateNamedPipeW", HANDLE, wintypes.LPCWSTR, wintypes.DWORD,
         wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, wintypes.DWORD,
         LPSECURITY_ATTRIBUTES)
_declare(_kernel32, "CreateFileW", HANDLE, wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD,
         LPSECURITY_ATTRIBUTES, wintypes.DWORD, wintypes.DWORD, HANDLE)
_declare(_kernel32, "WaitNamedPipeW", wintypes.BOOL, wintypes.LPCWSTR, wintypes.DWORD)
_declare(_kernel32, "SetNamedPipeHandleState", wintypes.BOOL, HANDLE,
         ctypes.POINTER(wintypes.DWORD), ctypes.POINTER(wintypes.DWORD),
         ctypes.POINTER(wintypes.DWORD))
_declare(_kernel32, "GetNamedPipeClientProcessId", wintypes.BOOL, HANDLE,
         ctypes.POINTER(wintypes.ULONG))
_declare(_kernel32, "GetNamedPipeServerProcessId", wintypes.BOOL, HANDLE,
         ctypes.POINTER(wintypes.ULONG))
_declare(_kernel32, "GetNamedPipeClientComputerNameW", wintypes.BOOL, HANDLE,
         wintypes.LPWSTR, wintypes.ULONG)
_declare(_kernel32, "CloseHandle", wintypes.BOOL, HANDLE)
_declare(_kernel32, "LocalFree", wintypes.HLOCAL, wintypes.HLOCAL)
_declare(_kernel32, "GetCurrentProcess", HANDLE)
_declare(_kernel32, "GetCurrentThread", HANDLE)
_declare(_kernel32, "OpenProcess", HANDLE, wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
_declare(_kernel32, "CreateDirectoryW", wintypes.BOOL, wintypes.LPCWSTR, LPSECURITY_ATTRIBUTES)
_declare(_advapi32, "OpenProcessToken", wintypes.BOOL, HANDLE, wintypes.DWORD,
         ctypes.POINTER(HANDLE))
_declare(_advapi32, "OpenThreadToken", wintypes.BOOL, HANDLE, wintypes.DWORD, wintypes.BOOL,
         ctypes.POINTER(HANDLE))
_declare(_advapi32, "ImpersonateNamedPipeClient", wintypes.BOOL, HANDLE)
_declare(_advapi32, "RevertToSelf", wintypes.BOOL)
_declare(_advapi32, "GetTokenInformation", wintypes.BOOL, HANDLE, ctypes.c_int,
         wintypes.LPVOID, wintypes.DWORD, ctypes.POINTER(wintypes.DWORD))
_declare(_advapi32, "ConvertSidToStringSidW", wintypes.BOOL, wintypes.LPVOID,
         ctypes.POINTER(wintypes.LPWSTR))
_declare(_advapi32, "ConvertStringSidToSidW", wintypes.BOOL, wintypes.LPCWSTR,
         ctypes.POINTER(wintypes.LPVOID))
_declare(_advapi32, "LookupAccountSidW", wintypes.BOOL, wintypes.LPCWSTR, wintypes.LPVOID,
         wintypes.LPWSTR, ctypes.POINTER(wintypes.DWORD), wintypes.LPWSTR,
         ctypes.POINTER(wintypes.DWORD), ctypes.POINTER(ctypes.c_int))
_declare(_advapi32, "LookupAccountNameW", wintypes.BOOL, wintypes.LPCWSTR, wintypes.LPCWSTR,
         wintypes.LPVOID, ctypes.POINTER(wintypes.DWORD), wintypes.LPWSTR,
         ctypes.POINTER(wintypes.DWORD), ctypes.POINTER(ctypes.c_int))
_declare(_advapi32, "GetSecurityInfo", wintypes.DWORD, HANDLE, ctypes.c_int, wintypes.DWORD,
         ctypes.POINTER(wintypes.LPVOID), ctypes.POINTER(wintypes.LPVOID),
         ctypes.POINTER(wintypes.LPVOID), ctypes.POINTER(wintypes.LPVOID),
         ctypes.POINTER(wintypes.LPVOID))
_declare(_advapi32, "ConvertStringSecurityDescriptorToSecurityDescriptorW", wintypes.BOOL,
         wintypes.LPCWSTR, wintypes.DWORD, ctypes.POINTER(wintypes.LPVOID),
         ctypes.POINTER(wintypes.ULONG))


def _error(winerror: int | None = None) -> OSError:
    return ctypes.WinError(ctypes.get_last_error() if winerror is None else winerror)


def _check(ok: object) -> None:
    if not ok:
        raise _error()


def _handle(h: int | None) -> int:
    if h is None or h == INVALID_HANDLE_VALUE or h == 0:
        raise _error()
    return h


def close_handle(handle: int) -> None:
    _kernel32.CloseHandle(handle)


# --- security descriptors -------------------------------------------------------------


@contextlib.contextmanager
def security_attributes(sddl: str) -> Iterator[SECURITY_ATTRIBUTES]:
    """SECURITY_ATTRIBUTES holding the descriptor ``sddl`` describes (freed on exit)."""
    sd = wintypes.LPVOID()
    _check(_advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(
        sddl, SDDL_REVISION_1, ctypes.byref(sd), None
    ))
    try:
        sa = SECURITY_ATTRIBUTES()
        sa.nLength = ctypes.sizeof(SECURITY_ATTRIBUTES)
        sa.lpSecurityDescriptor = sd.value
        sa.bInheritHandle = False
        yield sa
    finally:
        _kernel32.LocalFree(sd.value)


def create_private_directory(path: str, owner_sid: str) -> None:
    """A directory only ``owner_sid``, SYSTEM and Administrators may enter (protected
    DACL, inherited by what is made inside): grpcio's private socket lives there."""
    sddl = f"O:{owner_sid}D:P(A;OICI;FA;;;{owner_sid})(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)"
    with security_attributes(sddl) as sa:
        _check(_kernel32.CreateDirectoryW(path, ctypes.byref(sa)))


# --- pipes ----------------------------------------------------------------------------


def create_pipe_instance(
    path: str, sa: SECURITY_ATTRIBUTES, *, first: bool, remote: bool
) -> int:
    """A new listening instance of the byte-mode pipe ``path`` (overlapped).

    ``first``: FILE_FLAG_FIRST_PIPE_INSTANCE, so a live name is never joined (the
    call fails with ERROR_ACCESS_DENIED). Without ``remote`` the kernel refuses SMB
    clients (PIPE_REJECT_REMOTE_CLIENTS); the DACL denies NETWORK as well.
    """
    open_mode = PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED
    if first:
        open_mode |= FILE_FLAG_FIRST_PIPE_INSTANCE
    pipe_mode = PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT
    if not remote:
        pipe_mode |= PIPE_REJECT_REMOTE_CLIENTS
    return _handle(_kernel32.CreateNamedPipeW(
        path, open_mode, pipe_mode, PIPE_UNLIMITED_INSTANCES, BUFFER_SIZE, BUFFER_SIZE,
        0, ctypes.byref(sa),
    ))


def open_pipe(path: str) -> int:
    """Open the client end of ``path`` for overlapped I/O, at identification level.

    Raises OSError (ERROR_PIPE_BUSY, ERROR_FILE_NOT_FOUND, ...) at once: the waiting
    is waiting.py's. A client end starts in byte read mode whatever the server's type.
    """
    return _handle(_kernel32.CreateFileW(
        path, CLIENT_DESIRED_ACCESS, 0, None, OPEN_EXISTING,
        FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION, None,
    ))


def wait_named_pipe(path: str, timeout_ms: int) -> bool:
    """WaitNamedPipeW: True once an instance is free; False on a timeout or any failure
    (a vanished pipe included: the next open says precisely what is wrong)."""
    # 0 would mean the pipe's default timeout (50 ms); wait at least 1 ms.
    return bool(_kernel32.WaitNamedPipeW(path, max(1, min(timeout_ms, 0xFFFFFFFE))))


def set_byte_read_mode(handle: int) -> None:
    mode = wintypes.DWORD(PIPE_READMODE_BYTE)
    _check(_kernel32.SetNamedPipeHandleState(handle, ctypes.byref(mode), None, None))


def client_process_id(handle: int) -> int:
    pid = wintypes.ULONG()
    _check(_kernel32.GetNamedPipeClientProcessId(handle, ctypes.byref(pid)))
    return pid.value


def server_process_id(handle: int) -> int:
    pid = wintypes.ULONG()
    _check(_kernel32.GetNamedPipeServerProcessId(handle, ctypes.byref(pid)))
    return pid.value


def client_computer_name(handle: int) -> str | None:
    """The client's computer name for a caller over SMB; None for a local caller."""
    buf = ctypes.create_unicode_buffer(256)
    if not _kernel32.GetNamedPipeClientComputerNameW(handle, buf, ctypes.sizeof(buf)):
        return None  # ERROR_PIPE_LOCAL (or not known): a local caller
    return buf.value or None


# --- SIDs and tokens ------------------------------------------------------------------


def sid_string(psid: int | None) -> str:
    text = wintypes.LPWSTR()
    _check(_advapi32.ConvertSidToStringSidW(psid, ctypes.byref(text)))
    try:
        return str(text.value)
    finally:
        _kernel32.LocalFree(ctypes.cast(text, wintypes.LPVOID).value)


def _token_information(token: int, klass: int) -> ctypes.Array[ctypes.c_char]:
    size = wintypes.DWORD()
    _advapi32.GetTokenInformation(token, klass, None, 0, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    _check(_advapi32.GetTokenInformation(token, klass, buf, size, ctypes.byref(size)))
    return buf


def token_user_sid(token: int) -> str:
    buf = _token_information(token, TOKEN_USER_CLASS)
    return sid_string(SID_AND_ATTRIBUTES.from_buffer(buf).Sid)


def token_group_sids(token: int) -> list[str]:
    """The token's enabled group SIDs (deny-only and logon-session SIDs left out: they
    admit nothing)."""
    buf = _token_information(token, TOKEN_GROUPS_CLASS)
    count = wintypes.DWORD.from_buffer(buf).value
    # TOKEN_GROUPS: a DWORD count, then the array aligned as a pointer.
    offset = ctypes.sizeof(ctypes.c_void_p)
    groups = (SID_AND_ATTRIBUTES * count).from_buffer(buf, offset)
    sids = []
    for g in groups:
        if g.Attributes & SE_GROUP_USE_FOR_DENY_ONLY or not g.Attributes & SE_GROUP_ENABLED:
            continue
        if g.Attributes & SE_GROUP_LOGON_ID == SE_GROUP_LOGON_ID:
            continue
        sids.append(sid_string(g.Sid))
    return sids


@contextlib.contextmanager
def _process_token(process: int) -> Iterator[int]:
    token = HANDLE()
    _check(_advapi32.OpenProcessToken(process, TOKEN_QUERY, ctypes.byref(token)))
    try:
        yield _handle(token.value)
    finally:
        close_handle(_handle(token.value))


def current_user_sid() -> str:
    with _process_token(_kernel32.GetCurrentProcess()) as token:
        return token_user_sid(token)


def process_user_sid(pid: int) -> str:
    process = _handle(_kernel32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid))
    try:
        with _process_token(process) as token:
            return token_user_sid(token)
    finally:
        close_handle(process)


def process_token_sids(pid: int) -> tuple[str, list[str]]:
    """The user SID and group SIDs of process ``pid``'s token."""
    process = _handle(_kernel32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid))
    try:
        with _process_token(process) as token:
            return token_user_sid(token), token_group_sids(token)
    finally:
        close_handle(process)


def client_token_sids(pipe: int) -> tuple[str, list[str]]:
    """The connected client's user SID and group SIDs, from its token.

    The client opened at identification level, so impersonating it only lets us read
    its token. This thread impersonates for two calls, then reverts; if it could not
    revert, the process stops rather than run on as someone else.
    """
    _check(_advapi32.ImpersonateNamedPipeClient(pipe))
    token = HANDLE()
    try:
        # OpenAsSelf: the access check uses our own process token, not the client's.
        ok = _advapi32.OpenThreadToken(
            _kernel32.GetCurrentThread(), TOKEN_QUERY, True, ctypes.byref(token)
        )
        error = ctypes.get_last_error()
    finally:
        if not _advapi32.RevertToSelf():
            os.abort()
    if not ok:
        raise _error(error)
    try:
        return token_user_sid(_handle(token.value)), token_group_sids(_handle(token.value))
    finally:
        close_handle(_handle(token.value))


def lookup_account(sid: str) -> tuple[str | None, str | None]:
    """(account, domain) of a SID; (None, None) when it maps to no name."""
    psid = wintypes.LPVOID()
    _check(_advapi32.ConvertStringSidToSidW(sid, ctypes.byref(psid)))
    try:
        name = ctypes.create_unicode_buffer(256)
        domain = ctypes.create_unicode_buffer(256)
        name_len, domain_len = wintypes.DWORD(256), wintypes.DWORD(256)
        use = ctypes.c_int()
        if not _advapi32.LookupAccountSidW(
            None, psid, name, ctypes.byref(name_len), domain, ctypes.byref(domain_len),
            ctypes.byref(use),
        ):
            return None, None  # ERROR_NONE_MAPPED and the like: the SID still identifies
        return name.value or None, domain.value or None
    finally:
        _kernel32.LocalFree(psid.value)


def account_sid(account: str) -> str:
    """The SID of ``DOMAIN\\name`` or ``name@REALM`` (LookupAccountNameW)."""
    sid = ctypes.create_string_buffer(68)  # SECURITY_MAX_SID_SIZE
    sid_len = wintypes.DWORD(68)
    domain = ctypes.create_unicode_buffer(256)
    domain_len = wintypes.DWORD(256)
    use = ctypes.c_int()
    _check(_advapi32.LookupAccountNameW(
        None, account, sid, ctypes.byref(sid_len), domain, ctypes.byref(domain_len),
        ctypes.byref(use),
    ))
    return sid_string(ctypes.addressof(sid))


def pipe_owner_sid(handle: int) -> str:
    """The owner SID of the pipe behind ``handle`` (needs READ_CONTROL)."""
    owner = wintypes.LPVOID()
    sd = wintypes.LPVOID()
    status = _advapi32.GetSecurityInfo(
        handle, SE_KERNEL_OBJECT, OWNER_SECURITY_INFORMATION, ctypes.byref(owner),
        None, None, None, ctypes.byref(sd),
    )
    if status != 0:  # returns the error code itself, not through GetLastError
        raise _error(status)
    try:
        return sid_string(owner.value)
    finally:
        _kernel32.LocalFree(sd.value)


# --- AF_UNIX (grpcio's private listener) ------------------------------------------------
# Windows has AF_UNIX stream sockets and grpcio listens on them, but CPython's socket
# module cannot name their addresses; the sockets are made and connected here and then
# wrapped in socket.socket(fileno=...), whose send/recv need no address.

AF_UNIX = 1
SOCKET = ctypes.c_size_t
INVALID_SOCKET = ctypes.c_size_t(-1).value
UNIX_PATH_MAX = 108


class SOCKADDR_UN(ctypes.Structure):
    _fields_ = [("sun_family", ctypes.c_ushort), ("sun_path", ctypes.c_char * UNIX_PATH_MAX)]


_declare(_ws2_32, "socket", SOCKET, ctypes.c_int, ctypes.c_int, ctypes.c_int)
_declare(_ws2_32, "connect", ctypes.c_int, SOCKET, ctypes.POINTER(SOCKADDR_UN), ctypes.c_int)
_declare(_ws2_32, "bind", ctypes.c_int, SOCKET, ctypes.POINTER(SOCKADDR_UN), ctypes.c_int)
_declare(_ws2_32, "listen", ctypes.c_int, SOCKET, ctypes.c_int)
_declare(_ws2_32, "accept", SOCKET, SOCKET, wintypes.LPVOID, wintypes.LPVOID)
_declare(_ws2_32, "closesocket", ctypes.c_int, SOCKET)
_declare(_ws2_32, "WSAGetLastError", ctypes.c_int)


def _unix_address(path: str) -> SOCKADDR_UN:
    raw = os.fsencode(path)
    if len(raw) >= UNIX_PATH_MAX:
        raise OSError(f"socket path too long ({len(raw)} bytes, at most 107): {path}")
    addr = SOCKADDR_UN()
    addr.sun_family = AF_UNIX
    addr.sun_path = raw
    return addr


def _unix_socket() -> int:
    s = _ws2_32.socket(AF_UNIX, socket.SOCK_STREAM, 0)
    if s == INVALID_SOCKET:
        raise _error(_ws2_32.WSAGetLastError())
    return int(s)


def _wrap(s: int) -> socket.socket:
    try:
        return socket.socket(fileno=s)
    except BaseException:
        _ws2_32.closesocket(s)
        raise


def unix_connect(path: str, *, bind: str | None = None) -> socket.socket:
    """A blocking AF_UNIX stream socket connected to ``path`` (from the name ``bind``:
    the server then sees who connected by that name)."""
    s = _unix_socket()
    addr = _unix_address(path)
    local = _unix_address(bind) if bind is not None else None
    if ((local is not None and _ws2_32.bind(s, ctypes.byref(local), ctypes.sizeof(local)) != 0)
            or _ws2_32.connect(s, ctypes.byref(addr), ctypes.sizeof(addr)) != 0):
        error = _ws2_32.WSAGetLastError()
        _ws2_32.closesocket(s)
        raise _error(error)
    return _wrap(s)


def unix_listen(path: str, backlog: int = 128) -> socket.socket:
    """An AF_UNIX stream socket listening on ``path`` (accept with :func:`unix_accept`)."""
    s = _unix_socket()
    addr = _unix_address(path)
    if (_ws2_32.bind(s, ctypes.byref(addr), ctypes.sizeof(addr)) != 0
            or _ws2_32.listen(s, backlog) != 0):
        error = _ws2_32.WSAGetLastError()
        _ws2_32.closesocket(s)
        raise _error(error)
    return _wrap(s)


def unix_accept(listener: socket.socket) -> socket.socket:
    """Accept one connection (blocking); OSError once the listener is closed."""
    s = _ws2_32.accept(listener.fileno(), None, None)
    if s == INVALID_SOCKET:
        raise _error(_ws2_32.WSAGetLastError())
    return _wrap(int(s))
