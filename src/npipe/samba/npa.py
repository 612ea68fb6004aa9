"""The ``named_pipe_auth`` (NPA) handshake smbd opens a proxied pipe with, sans I/O.

When an SMB client opens pipe NAME on IPC$ and smbd has no pipe of its own by that name,
smbd connects to ``<ncalrpc dir>/np/<name>``, sends one request and waits for one reply;
after that the socket carries the pipe's bytes. This module turns bytes into an
:class:`NpaRequest` and builds the reply; reading and writing the socket is the caller's.

    reader = NpaRequestReader()
    while (request := reader.feed(sock.recv(65536))) is None:
        pass
    sock.sendall(build_reply(request.level))
    first_pipe_bytes = reader.unused_data

Wire format (``librpc/idl/named_pipe_auth.idl``, ``auth.idl``, ``security.idl`` in
Samba): a 4-byte big-endian length, ``NPAM``, then NDR32 little-endian aligned from byte
0 of the message: ``uint32 level``, the union discriminant (the level again), and the
level's ``named_pipe_auth_req_infoN``. Levels 7 and 8 share that struct; they differ in
``security_token`` (level 8 added claims and device SIDs). Within level 7 the last field
of ``auth_user_info`` changed without a level bump; see :func:`parse_request`.
"""

from __future__ import annotations

import ipaddress
import struct
import uuid
from dataclasses import dataclass
from typing import Literal, NamedTuple

from npipe.errors import NpipeError
from npipe.samba.ndr import MIN_SID_SIZE, NdrError, NdrReader

MAGIC = b"NPAM"
LENGTH_SIZE = 4
_LEVEL_AT = LENGTH_SIZE + len(MAGIC)
# The smallest body: the magic, the level and the union discriminant.
MIN_BODY_SIZE = 12
# Real requests are under 1 KiB (696-834 bytes captured from Samba 4.17 and 4.22). The
# token grows ~28 bytes per Windows group SID, 8 per Unix group and with any claims, and
# Kerberos caps the PAC it comes from near 64 KiB (Windows' MaxTokenSize default is
# 48,000 bytes), so 256 KiB holds thousands of groups and still bounds what an
# unauthenticated local peer can make us buffer. Samba itself accepts up to 16 MiB
# (tstream_u32_read(..., 0x00FFFFFF) in libcli/named_pipe_auth/npa_tstream.c).
MAX_REQUEST_SIZE = 256 * 1024

LEVEL_7 = 7
LEVEL_8 = 8
SUPPORTED_LEVELS = (LEVEL_7, LEVEL_8)
# Which Samba releases send which level (git history of named_pipe_auth.idl).
_LEVEL_RELEASES = {
    4: "Samba 4.0-4.15",
    5: "Samba 4.16-4.17.8 and 4.18.0-4.18.2",
    6: "unreleased Samba 4.19 development builds",
    7: "Samba 4.17.9-4.19",
    8: "Samba 4.20+",
}
_SUPPORTED = "npipe speaks levels 7 (Samba 4.17.9-4.19) and 8 (Samba 4.20+)"

# The reply (named_pipe_auth_rep, same layout for levels 5, 7 and 8): length, magic,
# level, level, uint16 file_type, uint16 device_state, 4 pad bytes so the hyper is
# 8-aligned, hyper allocation_size, NTSTATUS.
_REPLY_BODY = struct.Struct("<4sIIHH4xQI")
REPLY_SIZE = LENGTH_SIZE + _REPLY_BODY.size  # 36
# libcli/smb/smb_constants.h
FILE_TYPE_BYTE_MODE_PIPE = 1
FILE_TYPE_MESSAGE_MODE_PIPE = 2
# What samba-dcerpcd answers with (source3/rpc_server/rpc_host.c: 0xff | 0x0400 | 0x0100):
# instance count 0xff, message-type pipe, message read mode.
DEFAULT_DEVICE_STATE = 0x05FF
DEFAULT_ALLOCATION_SIZE = 4096

# netr_UserFlags (netlogon.idl): from Samba 4.19 auth_user_info.user_flags carries this
# bit when the user is not authenticated (guest or anonymous).
NETLOGON_GUEST = 0x00000001
# S-1-5-11, added to the token of every authenticated (non-guest, non-anonymous) user.
AUTHENTICATED_USERS_SID = "S-1-5-11"
# smbd appends S-1-22-2041152804-<flags> to the token it sends (global_sid_Samba_NPA_Flags
# in libcli/security/util_sid.c, since Samba 4.17.9 / level 7); the flags replaced the
# level-6 need_idle_server field (libcli/security/dom_sid.h).
NPA_FLAGS_SID_PREFIX = "S-1-22-2041152804-"
NPA_FLAGS_NEED_IDLE = 1
NPA_FLAGS_WINBIND_OFF = 2
# Samba master (2026, unreleased): smbd only checks that the pipe exists, then closes.
NPA_FLAGS_PROBE_ONLY = 4

# CLAIM_SECURITY_ATTRIBUTE_RELATIVE_V1 value types (security.idl; level 8 tokens).
_CLAIM_FIXED_8 = frozenset({0x0001, 0x0002, 0x0006})  # INT64, UINT64, BOOLEAN
_CLAIM_STRING = 0x0003  # UTF-16 string, NUL-terminated
_CLAIM_BLOBS = frozenset({0x0005, 0x0010})  # SID, OCTET_STRING: DATA_BLOB
_CLAIM_TYPES = _CLAIM_FIXED_8 | _CLAIM_BLOBS | {_CLAIM_STRING}
# A claim's fixed part: relative name pointer 4, value_type 2 (+2 pad), flags 4, count 4.
_MIN_CLAIM_SIZE = 16

UserInfoLayout = Literal["authenticated8", "user_flags32"]

_INFO_STRINGS = (
    "account_name",
    "user_principal_name",
    "domain_name",
    "dns_domain_name",
    "full_name",
    "logon_script",
    "profile_path",
    "home_directory",
    "home_drive",
    "logon_server",
)


class NpaError(NpipeError, ValueError):
    """A named_pipe_auth request is malformed, too large, or of a level npipe can't read."""


@dataclass(frozen=True)
class NpaSession:
    """Who opened the pipe: the decoded ``auth_session_info`` smbd passes along.

    ``sids`` is ``security_token.sids`` as sent: user SID, primary group SID, then the
    other groups, including the S-1-22-... SIDs smbd adds (Unix uid/gid, SMB3 and NPA
    flags markers). ``uid``/``gid``/``unix_groups`` come from the unix token (absent on
    sessions without one).
    """

    sids: tuple[str, ...]
    device_sids: tuple[str, ...]
    privilege_mask: int
    rights_mask: int
    uid: int | None
    gid: int | None
    unix_groups: tuple[int, ...]
    account_name: str | None
    user_principal_name: str | None
    domain_name: str | None
    dns_domain_name: str | None
    full_name: str | None
    logon_server: str | None
    acct_flags: int
    # Which form auth_user_info's last field had: a uint8 ``authenticated`` (Samba up to
    # 4.18) or a uint32 ``user_flags`` (4.19 and later); None without auth_user_info.
    user_info_layout: UserInfoLayout | None
    user_flags: int | None
    authenticated: bool
    unix_name: str | None
    sanitized_username: str | None
    unique_session_token: uuid.UUID

    @property
    def is_guest(self) -> bool:
        """Not authenticated: a guest or anonymous session."""
        return not self.authenticated

    @property
    def user_sid(self) -> str | None:
        return self.sids[0] if self.sids else None


@dataclass(frozen=True)
class NpaRequest:
    """A decoded ``named_pipe_auth_req``.

    ``remote_client_name`` and ``local_server_name`` hold smbd's own host name, not the
    client's; the client is ``remote_client_addr``:``remote_client_port``.
    """

    level: int
    transport: int  # dcerpc_transport_t: 1 is NCACN_NP, what smbd sends
    remote_client_name: str | None
    remote_client_addr: str
    remote_client_port: int
    local_server_name: str | None
    local_server_addr: str
    local_server_port: int
    session: NpaSession
    npa_flags: int | None  # from the S-1-22-2041152804-<flags> SID; None if absent

    @property
    def need_idle_server(self) -> bool:
        return bool((self.npa_flags or 0) & NPA_FLAGS_NEED_IDLE)

    @property
    def probe_only(self) -> bool:
        return bool((self.npa_flags or 0) & NPA_FLAGS_PROBE_ONLY)

    @property
    def samba_releases(self) -> str:
        """Which Samba releases send a request shaped like this one (for logs)."""
        if self.level == LEVEL_8:
            return "Samba 4.20+"
        if self.session.user_info_layout == "authenticated8":
            return "Samba 4.17.9-4.18"
        if self.session.user_info_layout == "user_flags32":
            return "Samba 4.19"
        return _LEVEL_RELEASES[LEVEL_7]


class NpaRequestReader:
    """Accumulates bytes until one whole request is in, then parses it (h11 style).

    ``feed`` returns None while the request is incomplete and the :class:`NpaRequest`
    once it is; bytes that came after the request (a client may pipeline pipe data) are
    then in :attr:`unused_data`. A length over ``max_size``, a bad magic or an
    unsupported level is refused as soon as the header shows it, without waiting for
    the body.
    """

    def __init__(self, max_size: int = MAX_REQUEST_SIZE) -> None:
        self._buffer = bytearray()
        self._max_size = max_size
        self._needed: int | None = None
        self._magic_seen = False
        self._level_seen = False
        self._request: NpaRequest | None = None
        self._error: NpaError | None = None
        self._unused = b""

    @property
    def request(self) -> NpaRequest | None:
        return self._request

    @property
    def bytes_needed(self) -> int:
        """How many more bytes the request needs: read no more than this from the
        connection, since what follows the request is the pipe's data."""
        if self._request is not None:
            return 0
        if self._needed is None:
            return LENGTH_SIZE - len(self._buffer)
        return self._needed - len(self._buffer)

    @property
    def unused_data(self) -> bytes:
        """Bytes received after the request: the start of the pipe's data."""
        return self._unused

    def feed(self, data: bytes) -> NpaRequest | None:
        if self._error is not None:
            raise self._error
        if self._request is not None:
            raise RuntimeError("the named_pipe_auth request is complete; the rest is pipe data")
        self._buffer += data
        try:
            return self._advance()
        except NpaError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _advance(self) -> NpaRequest | None:
        if self._needed is None:
            if len(self._buffer) < LENGTH_SIZE:
                return None
            self._needed = _message_size(self._buffer, self._max_size)
        # Refuse a stranger or an old smbd now rather than after its whole body.
        if not self._magic_seen and len(self._buffer) >= _LEVEL_AT:
            _check_magic(self._buffer)
            self._magic_seen = True
        if not self._level_seen and len(self._buffer) >= _LEVEL_AT + 4:
            _check_level(int.from_bytes(self._buffer[_LEVEL_AT : _LEVEL_AT + 4], "little"))
            self._level_seen = True
        if len(self._buffer) < self._needed:
            return None
        message = bytes(self._buffer[: self._needed])
        self._unused = bytes(self._buffer[self._needed :])
        self._buffer.clear()
        self._request = parse_request(message, max_size=self._max_size)
        return self._request


def _message_size(message: bytes | bytearray, max_size: int) -> int:
    """The whole message's size from its length prefix, refused if out of bounds."""
    length = int.from_bytes(message[:LENGTH_SIZE], "big")
    if LENGTH_SIZE + length > max_size:
        raise NpaError(
            f"named_pipe_auth request of {LENGTH_SIZE + length} bytes is over the "
            f"{max_size}-byte limit"
        )
    if length < MIN_BODY_SIZE:
        raise NpaError(f"named_pipe_auth request length {length} is too small for a header")
    return LENGTH_SIZE + length


def _check_magic(message: bytes | bytearray) -> None:
    magic = bytes(message[LENGTH_SIZE : LENGTH_SIZE + len(MAGIC)])
    if magic != MAGIC:
        raise NpaError(f"not a named_pipe_auth request: bad magic {magic!r}, expected {MAGIC!r}")


def _check_level(level: int) -> None:
    if level in SUPPORTED_LEVELS:
        return
    if level in _LEVEL_RELEASES:
        known = _LEVEL_RELEASES[level]
    elif level > LEVEL_8:
        known = "newer than any Samba npipe knows"
    else:
        known = "not sent by any Samba release"
    raise NpaError(f"named_pipe_auth level {level} ({known}) is not supported: {_SUPPORTED}")


def parse_request(message: bytes, *, max_size: int = MAX_REQUEST_SIZE) -> NpaRequest:
    """Decodes one whole request, length prefix included, or raises :class:`NpaError`.

    Level 7 comes in two shapes with the same level number: Samba 4.17.9-4.18 end
    ``auth_user_info`` with ``uint8 authenticated``, Samba 4.19 with ``uint32
    user_flags``. Every string or structure that can follow the field is 4-aligned and
    Samba pads with zeros, so the two usually cover the same bytes; the rest of the
    message is therefore parsed both ways and a reading is kept only if it consumes the
    message exactly, its ``authenticated`` byte is 0 or 1 and its pad bytes are zero.
    When both readings survive, the field is 0 or 1 followed by zeros, and the two
    readings mean opposite things (1: authenticated / guest; 0: not authenticated / no
    flags). The token decides: Samba gives S-1-5-11 (Authenticated Users) exactly to
    authenticated sessions, so the reading that agrees with it is kept (with no token,
    the one that says "not authenticated").
    """
    if len(message) < LENGTH_SIZE:
        raise NpaError(f"named_pipe_auth request truncated: {len(message)} bytes, no header")
    size = _message_size(message, max_size)
    if len(message) < size:
        raise NpaError(f"named_pipe_auth request truncated: have {len(message)} of {size} bytes")
    if len(message) > size:
        raise NpaError(f"named_pipe_auth request has {len(message) - size} bytes past its end")
    _check_magic(message)
    level, discriminant = struct.unpack_from("<II", message, _LEVEL_AT)
    _check_level(level)
    if discriminant != level:
        raise NpaError(f"named_pipe_auth union level {discriminant} differs from level {level}")
    try:
        return _parse_info(message, level)
    except NdrError as exc:
        raise NpaError(f"malformed named_pipe_auth level {level} request: {exc}") from None


def build_reply(
    level: int,
    *,
    file_type: int = FILE_TYPE_BYTE_MODE_PIPE,
    device_state: int = DEFAULT_DEVICE_STATE,
    allocation_size: int = DEFAULT_ALLOCATION_SIZE,
    status: int = 0,
) -> bytes:
    """The 36-byte ``named_pipe_auth_rep`` for a request of ``level``.

    ``file_type`` 2 (message mode) makes smbd frame every message with a 2-byte
    little-endian length on the socket. smbd ignores ``status`` (seen on 4.17 and 4.22):
    to refuse a caller, close the socket without replying.
    """
    if level not in SUPPORTED_LEVELS:
        raise ValueError(f"cannot build a named_pipe_auth reply for level {level}")
    if file_type not in (FILE_TYPE_BYTE_MODE_PIPE, FILE_TYPE_MESSAGE_MODE_PIPE):
        raise ValueError(f"file_type must be 1 (byte mode) or 2 (message mode), not {file_type}")
    if not 0 <= device_state <= 0xFFFF:
        raise ValueError(f"device_state {device_state:#x} does not fit 16 bits")
    if not 0 <= allocation_size < 1 << 64:
        raise ValueError(f"allocation_size {allocation_size} does not fit 64 bits")
    if not 0 <= status <= 0xFFFFFFFF:
        raise ValueError(f"status {status:#x} is not a 32-bit NTSTATUS")
    body = _REPLY_BODY.pack(MAGIC, level, level, file_type, device_state, allocation_size, status)
    return struct.pack(">I", len(body)) + body


# --- the body -------------------------------------------------------------------------


class _Token(NamedTuple):
    sids: tuple[str, ...]
    device_sids: tuple[str, ...]
    privilege_mask: int
    rights_mask: int


class _UnixToken(NamedTuple):
    uid: int
    gid: int
    groups: tuple[int, ...]


class _Tail(NamedTuple):
    """Everything from auth_user_info's last field to the end of the message."""

    layout: UserInfoLayout
    value: int
    strings: dict[str, str | None]
    unix_name: str | None
    sanitized_username: str | None


def _parse_info(message: bytes, level: int) -> NpaRequest:
    # named_pipe_auth_req_info7/8: the same members for both levels.
    r = NdrReader(message, LENGTH_SIZE + MIN_BODY_SIZE)
    transport = r.u8("transport")
    has_client_name = r.pointer("remote_client_name")
    has_client_addr = r.pointer("remote_client_addr")
    client_port = r.u16("remote_client_port")
    has_server_name = r.pointer("local_server_name")
    has_server_addr = r.pointer("local_server_addr")
    server_port = r.u16("local_server_port")
    has_session = r.pointer("session_info")
    # Deferred data, in member order. [charset(DOS)] strings are addresses: ASCII.
    client_name = r.string("remote_client_name") if has_client_name else None
    client_addr = r.string("remote_client_addr", "ascii") if has_client_addr else None
    server_name = r.string("local_server_name") if has_server_name else None
    server_addr = r.string("local_server_addr", "ascii") if has_server_addr else None
    # Samba's own acceptor (tstream_npa_accept_existing) refuses these too.
    client_addr = _ip_address("remote_client_addr", client_addr)
    server_addr = _ip_address("local_server_addr", server_addr)
    if not has_session:
        raise NdrError("no session_info: the request does not say who the caller is")
    session, npa_flags = _parse_session_transport(r, level)
    return NpaRequest(
        level=level,
        transport=transport,
        remote_client_name=client_name,
        remote_client_addr=client_addr,
        remote_client_port=client_port,
        local_server_name=server_name,
        local_server_addr=server_addr,
        local_server_port=server_port,
        session=session,
        npa_flags=npa_flags,
    )


def _ip_address(what: str, text: str | None) -> str:
    if text is None:
        raise NdrError(f"{what} is missing")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise NdrError(f"{what} {text!r} is not an IP address") from None
    return text


def _parse_session_transport(r: NdrReader, level: int) -> tuple[NpaSession, int | None]:
    # auth_session_info_transport
    r.align(4)
    has_info = r.pointer("session_info.session_info")
    r.data_blob("exported_gssapi_credentials")
    if not has_info:
        raise NdrError("no auth_session_info: the request does not say who the caller is")
    # auth_session_info
    has_token = r.pointer("security_token")
    has_unix_token = r.pointer("unix_token")
    has_user_info = r.pointer("info")
    has_unix_info = r.pointer("unix_info")
    r.u32("torture")  # [ignore]: pushed as NULL, never followed (not even by Samba)
    r.data_blob("session_key")
    r.u32("credentials")  # [ignore] likewise
    r.align(4)
    session_token = uuid.UUID(bytes_le=r.raw(16, "unique_session_token"))
    r.u16("ticket_type")

    token = _parse_token(r, level) if has_token else _Token((), (), 0, 0)
    unix_token = _parse_unix_token(r) if has_unix_token else None
    tail: _Tail | None = None
    acct_flags = 0
    info_strings: dict[str, str | None] = dict.fromkeys(_INFO_STRINGS)
    unix_names: tuple[str | None, str | None] = (None, None)
    if has_user_info:
        present, acct_flags = _parse_user_info_head(r)
        tail = _parse_tail(r, level, present, has_unix_info, token.sids)
        info_strings = tail.strings
        unix_names = (tail.unix_name, tail.sanitized_username)
    elif has_unix_info:
        unix_names = _parse_unix_info(r)
        _check_end(r)
    else:
        _check_end(r)

    if tail is None:
        authenticated = False
    elif tail.layout == "authenticated8":
        authenticated = tail.value != 0
    else:
        authenticated = not tail.value & NETLOGON_GUEST
    session = NpaSession(
        sids=token.sids,
        device_sids=token.device_sids,
        privilege_mask=token.privilege_mask,
        rights_mask=token.rights_mask,
        uid=unix_token.uid if unix_token else None,
        gid=unix_token.gid if unix_token else None,
        unix_groups=unix_token.groups if unix_token else (),
        account_name=info_strings["account_name"],
        user_principal_name=info_strings["user_principal_name"],
        domain_name=info_strings["domain_name"],
        dns_domain_name=info_strings["dns_domain_name"],
        full_name=info_strings["full_name"],
        logon_server=info_strings["logon_server"],
        acct_flags=acct_flags,
        user_info_layout=tail.layout if tail else None,
        user_flags=tail.value if tail and tail.layout == "user_flags32" else None,
        authenticated=authenticated,
        unix_name=unix_names[0],
        sanitized_username=unix_names[1],
        unique_session_token=session_token,
    )
    return session, _npa_flags(token.sids)


def _npa_flags(sids: tuple[str, ...]) -> int | None:
    for sid in sids:
        if sid.startswith(NPA_FLAGS_SID_PREFIX):
            rest = sid[len(NPA_FLAGS_SID_PREFIX) :]
            if rest.isdigit():
                return int(rest)
    return None


def _parse_token(r: NdrReader, level: int) -> _Token:
    # security_token; its hyper privilege_mask makes the whole struct 8-aligned.
    r.align(8)
    n = r.count("security_token.num_sids", MIN_SID_SIZE)
    r.conformance("security_token.sids", n)
    sids = tuple(r.dom_sid("security_token.sids") for _ in range(n))
    privilege_mask = r.hyper("security_token.privilege_mask")
    rights_mask = r.u32("security_token.rights_mask")
    if level == LEVEL_7:
        return _Token(sids, (), privilege_mask, rights_mask)

    # Level 8 (security.idl since Samba 4.20): four counts, then the three claim arrays,
    # the device SIDs and a uint16 enum; the claims' data follows, reached by relative
    # pointers.
    kinds = ("local", "user", "device")
    claim_counts = [r.count(f"security_token.num_{k}_claims", _MIN_CLAIM_SIZE) for k in kinds]
    num_device_sids = r.count("security_token.num_device_sids", MIN_SID_SIZE)
    claims: list[tuple[int, int, tuple[int, ...]]] = []
    for kind, count in zip(kinds, claim_counts, strict=True):
        r.conformance(f"security_token.{kind}_claims", count)
        claims.extend(_claim_fixed_part(r) for _ in range(count))
    r.conformance("security_token.device_sids", num_device_sids)
    device_sids = tuple(r.dom_sid("security_token.device_sids") for _ in range(num_device_sids))
    r.u16("security_token.evaluate_claims")
    _skip_claim_data(r, claims)
    return _Token(sids, device_sids, privilege_mask, rights_mask)


def _claim_fixed_part(r: NdrReader) -> tuple[int, int, tuple[int, ...]]:
    """CLAIM_SECURITY_ATTRIBUTE_RELATIVE_V1 scalars: (name pointer, value type, pointers)."""
    r.align(4)
    name = r.u32("claim name")
    value_type = r.u16("claim value_type")
    r.u32("claim flags")
    n = r.count("claim values", 4)
    if n and value_type not in _CLAIM_TYPES:  # pidl fails on a union case it lacks
        raise NdrError(f"claim value type {value_type:#x} is unknown")
    values = struct.unpack(f"<{n}I", r.raw(4 * n, "claim values"))
    return name, value_type, values


def _skip_claim_data(r: NdrReader, claims: list[tuple[int, int, tuple[int, ...]]]) -> None:
    """Steps over the claims' pointed-to data, which Samba pushes right after the token.

    The pointers are [relative]: offsets from byte 0 of the message (no relative_base
    is set on the way down). Samba writes the data in member order with only alignment
    gaps, so each target must lie at or after the end of the previous one; asking that
    keeps the work linear in the message size. (Samba's own pull returns to the end of
    the scalars after following relative pointers and so misreads everything after a
    token with claims; we follow what smbd writes.)
    """
    cursor = r.offset
    for name, value_type, values in claims:
        if name:
            cursor = _skip_utf16z(r, name, cursor, "claim name")
        for pointer in values:
            if not pointer:
                continue
            if value_type == _CLAIM_STRING:
                cursor = _skip_utf16z(r, pointer, cursor, "claim string")
            elif value_type in _CLAIM_FIXED_8:
                cursor = _relative_span(r, pointer, cursor, 8, "claim value")
            else:  # a DATA_BLOB, unaligned under the union's NDR_NOALIGN
                end = _relative_span(r, pointer, cursor, 4, "claim blob length")
                (length,) = struct.unpack("<I", r.raw_at(pointer, 4, "claim blob length"))
                cursor = _relative_span(r, end, end, length, "claim blob")
    r.offset = cursor


def _relative_span(r: NdrReader, start: int, cursor: int, size: int, what: str) -> int:
    if start < cursor:
        raise NdrError(f"{what}: relative pointer {start} goes back before offset {cursor}")
    if start + size > r.end:
        raise NdrError(f"{what}: {size} bytes at offset {start} run past the end ({r.end})")
    return start + size


def _skip_utf16z(r: NdrReader, start: int, cursor: int, what: str) -> int:
    _relative_span(r, start, cursor, 0, what)
    end = r.find_utf16_nul(start)
    if end < 0:
        raise NdrError(f"{what}: UTF-16 string at offset {start} has no terminating NUL")
    return end


def _parse_unix_token(r: NdrReader) -> _UnixToken:
    # security_unix_token ends in a conformant array, so its size comes first, before
    # the struct's own 8-alignment (uid_t and gid_t are pushed as hypers).
    r.align(4)
    size = r.count("unix_token.groups", 8)
    r.align(8)
    uid = _id(r.hyper("unix_token.uid"), "uid")
    gid = _id(r.hyper("unix_token.gid"), "gid")
    ngroups = r.u32("unix_token.ngroups")
    if ngroups != size:
        raise NdrError(f"unix_token.groups: array size {size} does not match ngroups {ngroups}")
    r.align(8)
    groups = struct.unpack(f"<{size}Q", r.raw(8 * size, "unix_token.groups"))
    return _UnixToken(uid, gid, tuple(_id(g, "unix group") for g in groups))


def _id(value: int, what: str) -> int:
    # Samba pulls uid_t/gid_t as hypers and refuses values that don't fit 32 bits.
    if value > 0xFFFFFFFF:
        raise NdrError(f"{what} {value:#x} does not fit in 32 bits")
    return value


def _parse_user_info_head(r: NdrReader) -> tuple[tuple[bool, ...], int]:
    """auth_user_info up to (not including) its last field: which strings follow, flags."""
    r.align(4)
    present = [r.pointer("info.account_name"), r.pointer("info.user_principal_name")]
    r.u8("info.user_principal_constructed")
    present += [r.pointer(f"info.{name}") for name in _INFO_STRINGS[2:]]
    for _ in range(6):  # last_logon ... force_password_change
        r.nttime("info NTTIME")
    r.u16("info.logon_count")
    r.u16("info.bad_password_count")
    acct_flags = r.u32("info.acct_flags")
    return tuple(present), acct_flags


def _parse_tail(
    r: NdrReader,
    level: int,
    present: tuple[bool, ...],
    has_unix_info: bool,
    sids: tuple[str, ...],
) -> _Tail:
    layouts: tuple[UserInfoLayout, ...] = (
        ("authenticated8", "user_flags32") if level == LEVEL_7 else ("user_flags32",)
    )
    readings: list[_Tail] = []
    errors: list[NdrError] = []
    for layout in layouts:
        attempt = NdrReader(r.data, r.offset, r.end)
        try:
            readings.append(_parse_tail_as(attempt, layout, present, has_unix_info))
        except NdrError as exc:
            errors.append(exc)
    if not readings:
        raise errors[-1]  # the user_flags reading: the layout current Samba sends
    if len(readings) == 1:
        return readings[0]
    # Both fit: the field is 0 or 1 followed by zero padding, and the readings say
    # opposite things. Keep the one that agrees with the token (see parse_request).
    as_uint8, as_uint32 = readings
    token_says_authenticated = AUTHENTICATED_USERS_SID in sids
    return as_uint8 if (as_uint8.value == 1) == token_says_authenticated else as_uint32


def _parse_tail_as(
    r: NdrReader, layout: UserInfoLayout, present: tuple[bool, ...], has_unix_info: bool
) -> _Tail:
    if layout == "authenticated8":
        value = r.u8("info.authenticated")
        if value > 1:
            raise NdrError(f"info.authenticated is {value}, not a boolean")
        pad = r.data[r.offset : min(r.end, r.offset + (-r.offset % 4))]
        if any(pad):
            raise NdrError("info.authenticated is followed by non-zero padding")
    else:
        value = r.u32("info.user_flags")
    strings: dict[str, str | None] = {
        name: r.string(f"info.{name}") if here else None
        for name, here in zip(_INFO_STRINGS, present, strict=True)
    }
    unix_name, sanitized = _parse_unix_info(r) if has_unix_info else (None, None)
    _check_end(r)
    return _Tail(layout, value, strings, unix_name, sanitized)


def _parse_unix_info(r: NdrReader) -> tuple[str | None, str | None]:
    r.align(4)
    has_name = r.pointer("unix_info.unix_name")
    has_sanitized = r.pointer("unix_info.sanitized_username")
    name = r.string("unix_info.unix_name") if has_name else None
    sanitized = r.string("unix_info.sanitized_username") if has_sanitized else None
    return name, sanitized


def _check_end(r: NdrReader) -> None:
    if r.offset != r.end:
        raise NdrError(f"{r.end - r.offset} bytes left over after the session info")
