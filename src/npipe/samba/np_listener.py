"""Serving a pipe to SMB clients through Samba: the listener in smbd's np/ directory.

smbd hands each open of ``\\\\HOST\\pipe\\NAME`` to ``<ncalrpc dir>/np/<name>`` and
introduces the caller in a named_pipe_auth request; we answer with the reply, and from
then on the connection carries the pipe's bytes. The request is the only word on who
called, so it is believed only from root (smbd): a local user who can reach the socket
could otherwise claim to be anyone. smbd ignores the reply's status, so a caller the
ACL refuses is closed without a reply (the client's CREATE then fails), unless the pipe
carries gRPC (``answer_as``): then the open succeeds and every call on it is answered
with PERMISSION_DENIED (or UNAUTHENTICATED for a guest session) and npipe's reason
(npipe.frontdoor.Refusal), which tells a gRPC client more than a failed CREATE.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

from npipe import grpc_refusal
from npipe.acl import Acl
from npipe.address import PipeAddress
from npipe.errors import AccessDenied, ConfigError
from npipe.frontdoor import DoorIdentify, Refusal, acl_refusal
from npipe.identity import Caller, user_name
from npipe.local.listener import ClaimedSocket, claim
from npipe.local.namespace import check_root_made_user_dir, root_made_user_dir
from npipe.local.paths import pipe_dir
from npipe.local.peercred import peer_credentials
from npipe.samba.config import np_dir_from_conf
from npipe.samba.npa import (
    FILE_TYPE_BYTE_MODE_PIPE,
    NpaRequest,
    NpaRequestReader,
    build_reply,
)

log = logging.getLogger("npipe.samba")

# smbd waits for our reply with no timeout of its own, holding that client's smbd
# process: a peer that stalls mid-request is cut off after this many seconds.
HANDSHAKE_TIMEOUT = 10.0

# Pipes samba-dcerpcd serves from the same np/ directory (source3/rpc_server and
# librpc/idl): taking one of these names would hijack or break Samba itself.
RESERVED_NAMES = frozenset({
    "lsarpc", "lsass", "samr", "netlogon", "srvsvc", "wkssvc", "winreg", "spoolss",
    "svcctl", "eventlog", "ntsvcs", "dssetup", "epmapper", "mdssvc", "fssagentrpc",
    "initshutdown", "protected_storage", "rpcecho", "winspool", "unixinfo", "browser",
    "atsvc", "ntlmssp", "keysvc", "plugplay", "scerpc", "epm", "witness",
})


def samba_socket_name(key: str) -> str:
    """The socket name a non-root server listens on for smbd, in its pipe directory."""
    return f".smb-{key}"


def np_dir() -> Path:
    """Samba's np/ directory: $NPIPE_SAMBA_NP_DIR, else from smb.conf ($NPIPE_SAMBA_CONF)."""
    return np_dir_from_conf(None)


def claim_samba_pipe(
    addr: PipeAddress,
    *,
    directory: str | os.PathLike[str] | None = None,
    acl: Acl | None = None,
) -> ClaimedSocket:
    """Listen where smbd will look for pipe ``addr``.

    As root the socket goes straight into np/ (smbd insists np/ is root's, mode 0700).
    Anyone else listens in the directory root made for them (``/run/npipe-smb/<uid>``,
    by ``npipe samba link NAME --user USER``), where root's link np/<name> points: no
    other user can ever create a socket there, so smbd can never be led to one.
    Given the pipe's ``acl``, warns once if it names no remote caller.
    """
    claimed = _claim_samba_pipe(addr, directory)
    if acl is not None:
        warn_if_no_remote_callers(acl, addr)
    return claimed


def warn_if_no_remote_callers(
    acl: Acl, addr: PipeAddress, owner_uid: int | None = None
) -> None:
    """Log a warning if ``acl`` admits no SMB caller, or only the owner's own (see npipe.acl)."""
    if acl.names_remote_callers():
        return
    owner = os.getuid() if owner_uid is None else owner_uid
    if owner == 0:
        admitted = "none will be admitted (a session Samba maps to root is not root)"
    else:
        admitted = (
            f"only SMB sessions Samba maps to uid {owner} ({user_name(owner) or '?'}), "
            "the owner, will be admitted"
        )
    log.warning(
        "pipe %s is served over SMB, but its ACL names no remote caller: %s; allow them "
        "by DOMAIN\\name, name@REALM, SID or local user (CLI: --acl user:DOMAIN\\name)",
        addr.name, admitted,
    )


def _claim_samba_pipe(
    addr: PipeAddress, directory: str | os.PathLike[str] | None
) -> ClaimedSocket:
    if addr.key in RESERVED_NAMES:
        raise ConfigError(f"pipe name {addr.name!r} belongs to Samba's own RPC services")
    lock_dir = pipe_dir(directory)
    np = np_dir()
    if os.geteuid() == 0:
        if not np.is_dir():
            raise ConfigError(
                f"Samba's pipe directory {np} does not exist: start smbd once (it creates "
                "it), or point NPIPE_SAMBA_NP_DIR / NPIPE_SAMBA_CONF at the right one"
            )
        return claim(np / addr.key, lock_dir, mode=0o600)
    uid = os.geteuid()
    try:
        own = check_root_made_user_dir(uid)
    except (FileNotFoundError, AccessDenied) as e:
        raise ConfigError(
            f"serving pipe {addr.name} to SMB clients as a user other than root needs the "
            f"directory root makes for you ({root_made_user_dir(uid)}): ask root to run "
            f"`npipe samba link {addr.name} --user {user_name(uid) or uid}` ({e})"
        ) from None
    path = own / samba_socket_name(addr.key)
    claimed = claim(path, lock_dir, mode=0o600)  # root (smbd) can connect whatever the mode
    if os.path.realpath(np / addr.key) != os.path.realpath(path):
        log.warning(
            "SMB clients reach pipe %s only once root runs: npipe samba link %s --user %s",
            addr.name, addr.name, user_name(uid) or uid,
        )
    return claimed


def caller_from_request(request: NpaRequest) -> Caller:
    s = request.session
    return Caller(
        "smb",
        uid=s.uid,
        gid=s.gid,
        groups=s.unix_groups,
        user=s.unix_name or s.sanitized_username,
        account=s.account_name,
        domain=s.domain_name,
        sids=s.sids,
        address=request.remote_client_addr,
        port=request.remote_client_port,
        extra={"upn": s.user_principal_name, "dns_domain": s.dns_domain_name,
               "samba": request.samba_releases},
    )


def admit(
    request: NpaRequest, acl: Acl, pipe: object, *, answer_as: object = None,
    file_type: int = FILE_TYPE_BYTE_MODE_PIPE,
) -> tuple[Caller | Refusal | None, bytes]:
    """Decide on a request: the caller and the reply to send, or (None, b"") to refuse.
    ``file_type``: the pipe's, in the reply (FILE_TYPE_MESSAGE_MODE_PIPE: smbd frames
    every message; see npipe.framing).

    With ``answer_as`` (the pipe's name; gRPC pipes) a refused caller gets the reply
    all the same, and a :class:`Refusal` (PERMISSION_DENIED; UNAUTHENTICATED for a
    guest) for the front door to answer its calls with: nothing of it is relayed."""
    caller = caller_from_request(request)
    if request.probe_only:  # smbd only checks that the pipe exists (Samba master)
        return None, build_reply(request.level, file_type=file_type)
    if not request.session.authenticated:
        log.warning("refused an unauthenticated (guest) SMB session %s on pipe %s", caller, pipe)
        if answer_as is None:
            return None, b""
        return Refusal(caller, grpc_refusal.UNAUTHENTICATED,
                       f"pipe {answer_as} admits no unauthenticated (guest) SMB session: "
                       "connect with an account its ACL names"), build_reply(request.level,
                                                                             file_type=file_type)
    if not acl.allows(caller):
        log.warning("refused %s on pipe %s: not allowed by its ACL", caller, pipe)
        if answer_as is None:
            return None, b""
        return acl_refusal(caller, answer_as), build_reply(request.level, file_type=file_type)
    return caller, build_reply(request.level, file_type=file_type)


def samba_identify(acl: Acl, pipe: object, *, answer_as: object = None,
                   file_type: int = FILE_TYPE_BYTE_MODE_PIPE) -> DoorIdentify:
    """The front door's identify step for a socket in np/ (blocking, bounded in time).

    ``answer_as``: answer refused callers rather than close them (see :func:`admit`);
    ``file_type``: the pipe's, in the reply."""

    def identify(conn: socket.socket) -> Caller | Refusal | None:
        if not _from_smbd(conn, pipe):
            return None
        try:
            request = _recv_request(conn)
            caller, reply = admit(request, acl, pipe, answer_as=answer_as, file_type=file_type)
            if reply:
                conn.sendall(reply)
            conn.settimeout(None)
        except (OSError, ValueError) as e:
            log.warning("bad named_pipe_auth handshake on Samba pipe %s: %s", pipe, e)
            return None
        return caller

    return identify


async def handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, acl: Acl, pipe: object
) -> Caller | None:
    """The same for an asyncio stream server; None means: close it."""
    if not _from_smbd(writer.get_extra_info("socket"), pipe):
        return None
    try:
        request = await asyncio.wait_for(_read_request(reader), HANDSHAKE_TIMEOUT)
        caller, reply = admit(request, acl, pipe)
        assert not isinstance(caller, Refusal)  # (only with answer_as)
        if reply:
            writer.write(reply)
            await writer.drain()
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        log.warning("bad named_pipe_auth handshake on Samba pipe %s: %s", pipe, e)
        return None
    return caller


def _from_smbd(sock: socket.socket, pipe: object) -> bool:
    """Only root (smbd) may introduce callers: anyone else could forge the request."""
    _pid, uid, _gid = peer_credentials(sock)
    if uid != 0:
        log.warning("refused a non-root peer (uid %s) on Samba pipe %s", uid, pipe)
    return uid == 0


# Both drivers read the request through the sans-I/O reader (one framing, one size
# limit), never past its end: what follows is the pipe's data.


async def _read_request(reader: asyncio.StreamReader) -> NpaRequest:
    npa = NpaRequestReader()
    while (request := npa.feed(await reader.readexactly(npa.bytes_needed))) is None:
        pass
    return request


def _recv_request(conn: socket.socket) -> NpaRequest:
    """The same on a blocking socket, within HANDSHAKE_TIMEOUT in all (not per recv:
    a peer that trickles a byte at a time is cut off all the same)."""
    npa = NpaRequestReader()
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    request: NpaRequest | None = None
    while request is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no whole named_pipe_auth request in {HANDSHAKE_TIMEOUT:g} s")
        conn.settimeout(left)
        chunk = conn.recv(npa.bytes_needed)
        if not chunk:
            raise ConnectionError("the peer closed the connection in the middle of a request")
        request = npa.feed(chunk)
    return request

