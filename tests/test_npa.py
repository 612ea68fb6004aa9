"""The named_pipe_auth codec against requests captured from real smbd processes.

The vectors at the bottom of this file are whole messages (length prefix included):
five captured from smbd (Samba 4.17.12 on Debian 12 standalone and as an AD DC with a
Kerberos user, both level 7 with ``uint8 authenticated``; Samba 4.19.5, Ubuntu 24.04's,
in a debootstrapped root, level 7 with ``uint32 user_flags``, for an NTLM user and for a
guest; Samba 4.22.11 on Debian 13, level 8), and one level-8 request with claims and
device SIDs whose session info was encoded by Samba 4.22.11's own NDR code
(python3-samba ``ndr_pack`` of an ``auth_session_info_transport``, spliced behind the
captured level-8 header), because a smbd that sends claims needs a claims-issuing DC.
"""

from __future__ import annotations

import contextlib
import struct
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npipe.samba.npa import (
    MAX_REQUEST_SIZE,
    NpaError,
    NpaRequest,
    NpaRequestReader,
    build_reply,
    parse_request,
)

AUTHENTICATED_USERS = bytes.fromhex("01010000000000050b000000")  # S-1-5-11 on the wire
# Offsets in LEVEL7_NTLM (checked by test_ntlm7_offsets_hold): auth_user_info's last field,
# its ten string pointers, and auth_session_info's unix_info pointer.
L7_TAIL = 0x1F4
L7_INFO_POINTERS = (0x190, 0x194, *range(0x19C, 0x1BC, 4))
L7_UNIX_INFO_POINTER = 0x94


def vector(name: str) -> bytes:
    value = globals()[name]
    assert isinstance(value, bytes)
    return value


ALL_VECTORS = (
    "LEVEL7_NTLM", "LEVEL7_KERBEROS", "LEVEL7_NTLM_419", "LEVEL7_GUEST_419", "LEVEL8_NTLM",
    "LEVEL8_CLAIMS",
)  # fmt: skip


def reframe(message: bytes | bytearray) -> bytes:
    """The same bytes with the length prefix made to fit them."""
    return struct.pack(">I", len(message) - 4) + bytes(message[4:])


def patched(message: bytes, offset: int, new: bytes) -> bytes:
    return message[:offset] + new + message[offset + len(new) :]


def ntlm7(tail: bytes = b"\x01\x00\x00\x00", *, authenticated_users: bool = True) -> bytes:
    """LEVEL7_NTLM with auth_user_info's last four bytes replaced (and S-1-5-11 kept or not)."""
    m = patched(LEVEL7_NTLM, L7_TAIL, tail)
    if not authenticated_users:  # S-1-5-11 -> S-1-5-12 (Restricted), same size
        at = m.index(AUTHENTICATED_USERS)
        m = patched(m, at + 8, struct.pack("<I", 12))
    return m


# --- the captured vectors, field by field -------------------------------------------


def test_ntlm7_offsets_hold() -> None:
    # acct_flags 0x10 (ACB_NORMAL), then authenticated = 1 and three zero pad bytes
    assert LEVEL7_NTLM[L7_TAIL - 4 : L7_TAIL + 4] == bytes.fromhex("1000000001000000")
    assert all(LEVEL7_NTLM[p + 2 : p + 4] == b"\x02\x00" for p in (0x190, 0x19C))
    assert LEVEL7_NTLM[L7_UNIX_INFO_POINTER : L7_UNIX_INFO_POINTER + 4] == bytes.fromhex("24000200")


def test_level7_ntlm_samba_4_17() -> None:
    r = parse_request(LEVEL7_NTLM)
    assert r.level == 7
    assert r.transport == 1  # NCACN_NP
    assert (r.remote_client_addr, r.remote_client_port) == ("127.0.0.1", 38574)
    assert (r.local_server_addr, r.local_server_port) == ("127.0.0.1", 4451)
    assert r.remote_client_name == r.local_server_name == "vm"  # smbd's own host name
    s = r.session
    assert s.user_info_layout == "authenticated8"
    assert r.samba_releases == "Samba 4.17.9-4.18"
    assert s.authenticated and not s.is_guest and s.user_flags is None
    assert (s.account_name, s.domain_name, s.logon_server) == ("npt", "VM", "VM")
    assert s.user_principal_name is None and s.dns_domain_name is None
    assert s.full_name == ""
    domain = "S-1-5-21-1584304474-3841467407-2183848180"
    assert s.sids == (
        f"{domain}-1000",  # the user
        f"{domain}-513",  # primary group, RID 513
        "S-1-22-2-1002",  # Unix group 1002
        "S-1-1-0",  # Everyone
        "S-1-5-2",  # Network
        "S-1-5-11",  # Authenticated Users
        "S-1-22-1-1002",  # Unix user 1002
        "S-1-22-2041152804-0",  # smbd's NPA flags marker, flags 0
    )
    assert s.user_sid is not None and s.user_sid.startswith("S-1-5-21-")
    assert s.device_sids == ()
    assert (s.uid, s.gid, s.unix_groups) == (1002, 1002, (1002,))
    assert (s.unix_name, s.sanitized_username) == ("npt", "npt")
    assert s.acct_flags == 0x10
    assert (s.privilege_mask, s.rights_mask) == (0, 0)
    assert s.unique_session_token == uuid.UUID("6c52cdd2-d61b-4391-a759-44f593efd1a0")
    assert r.npa_flags == 0 and not r.need_idle_server and not r.probe_only


def test_level7_kerberos_samba_4_17_dc() -> None:
    r = parse_request(LEVEL7_KERBEROS)
    assert r.level == 7
    assert (r.remote_client_addr, r.remote_client_port) == ("198.19.1.1", 53562)
    assert (r.local_server_addr, r.local_server_port) == ("198.19.1.2", 445)
    s = r.session
    assert s.user_info_layout == "authenticated8" and s.authenticated
    assert (s.account_name, s.domain_name) == ("alice", "NPIPE")
    assert s.user_principal_name == "alice@npipe.test"  # as sent: lower case
    assert (s.dns_domain_name, s.logon_server) == ("NPIPE.TEST", "DC1")
    domain = "S-1-5-21-1188267574-63008996-282314162"
    assert s.sids == (
        f"{domain}-1103",  # alice
        f"{domain}-513",  # Domain Users
        "S-1-18-1",  # Authentication authority asserted identity (Kerberos)
        "S-1-1-0",
        "S-1-5-2",
        "S-1-5-11",
        "S-1-5-32-545",  # BUILTIN\Users
        "S-1-5-32-554",  # BUILTIN\Pre-Windows 2000 Compatible Access
        "S-1-22-1397571891-785-2-2",  # smbd's SMB3 marker ("SMB3", dialect 0x311, ...)
        "S-1-22-2041152804-0",
    )
    assert (s.uid, s.gid) == (3000015, 100)
    assert s.unix_groups == (
        3000015, 100, 3000016, 3000013, 3000014, 3000003, 3000009, 3000017,
    )  # fmt: skip
    assert (s.unix_name, s.sanitized_username) == ("NPIPE\\alice", "alice")
    assert s.acct_flags == 0x210  # ACB_NORMAL | ACB_PWNOEXP
    assert s.privilege_mask == 1 << 23  # SEC_PRIV_CHANGE_NOTIFY_BIT
    assert s.rights_mask == 0x400  # LSA_POLICY_MODE_REMOTE_INTERACTIVE
    assert r.npa_flags == 0


# Offsets of auth_user_info's last field in the Samba 4.19.5 captures (checked below).
L7_419_TAIL = 0x20C
L7_419_GUEST_TAIL = 0x1F4


def test_level7_ntlm_samba_4_19() -> None:
    """Samba 4.19 keeps level 7 but ends auth_user_info with ``uint32 user_flags``."""
    # acct_flags 0x10 (ACB_NORMAL), then user_flags 0x20 (NETLOGON_EXTRA_SIDS): as a
    # uint8 "authenticated" 0x20 is no boolean, so only the 4.19 reading fits
    assert LEVEL7_NTLM_419[L7_419_TAIL - 4 : L7_419_TAIL + 4] == bytes.fromhex("1000000020000000")
    r = parse_request(LEVEL7_NTLM_419)
    assert r.level == 7 and r.samba_releases == "Samba 4.19"
    assert (r.remote_client_addr, r.remote_client_port) == ("127.0.0.1", 46374)
    assert (r.local_server_addr, r.local_server_port) == ("127.0.0.1", 4451)
    assert r.remote_client_name == r.local_server_name == "vm"
    s = r.session
    assert s.user_info_layout == "user_flags32"
    assert s.user_flags == 0x20
    assert s.authenticated and not s.is_guest
    assert (s.account_name, s.domain_name, s.logon_server) == ("npt", "VM", "VM")
    assert s.user_principal_name is None and s.full_name == ""
    domain = "S-1-5-21-4280666346-2864502386-442839124"
    assert s.sids == (
        f"{domain}-1000", f"{domain}-513", "S-1-22-2-1002", "S-1-1-0", "S-1-5-2",
        "S-1-5-11", "S-1-22-1-1002",
        "S-1-22-1397571891-785-2-2",  # smbd's SMB3 marker (dialect 0x311)
        "S-1-22-2041152804-0",
    )  # fmt: skip
    assert (s.uid, s.gid, s.unix_groups) == (1002, 1002, (1002,))
    assert (s.unix_name, s.sanitized_username) == ("npt", "npt")
    assert s.acct_flags == 0x10
    assert s.unique_session_token == uuid.UUID("8ea799dc-5ac3-4df3-a1ad-26c426d3df24")
    assert r.npa_flags == 0


def test_level7_guest_samba_4_19() -> None:
    """A guest on Samba 4.19: user_flags is NETLOGON_GUEST (1), whose bytes read as
    4.18's ``authenticated = 1`` too; the token (no S-1-5-11) decides for the guest."""
    assert LEVEL7_GUEST_419[L7_419_GUEST_TAIL - 4 : L7_419_GUEST_TAIL + 4] == bytes.fromhex(
        "0000000001000000"
    )
    assert AUTHENTICATED_USERS not in LEVEL7_GUEST_419
    r = parse_request(LEVEL7_GUEST_419)
    assert r.level == 7
    assert (r.remote_client_addr, r.remote_client_port) == ("127.0.0.1", 33626)
    s = r.session
    assert (s.user_info_layout, s.user_flags) == ("user_flags32", 1)
    assert not s.authenticated and s.is_guest
    assert s.account_name == "nobody" and s.domain_name == "VM"
    assert s.full_name is None and s.logon_server is None
    domain = "S-1-5-21-4280666346-2864502386-442839124"
    assert s.sids == (
        f"{domain}-501",  # Guest
        f"{domain}-514",  # Domain Guests
        "S-1-22-2-65534", "S-1-1-0", "S-1-5-2",
        "S-1-5-32-546",  # BUILTIN\Guests, and no S-1-5-11
        "S-1-22-1-65534", "S-1-22-2041152804-0",
    )  # fmt: skip
    assert (s.uid, s.gid, s.unix_groups) == (65534, 65534, (65534,))
    assert (s.unix_name, s.sanitized_username) == ("nobody", "nosuchuser")
    assert s.acct_flags == 0


def test_level8_ntlm_samba_4_22() -> None:
    r = parse_request(LEVEL8_NTLM)
    assert r.level == 8 and r.samba_releases == "Samba 4.20+"
    assert (r.remote_client_addr, r.remote_client_port) == ("127.0.0.1", 56012)
    assert (r.local_server_addr, r.local_server_port) == ("127.0.0.1", 4450)
    s = r.session
    assert s.user_info_layout == "user_flags32"
    assert s.user_flags == 0x120  # NETLOGON_NTLMV2_ENABLED | NETLOGON_EXTRA_SIDS
    assert s.authenticated
    assert (s.account_name, s.domain_name) == ("npt", "VM")
    domain = "S-1-5-21-177044291-1766381718-2972355054"
    assert s.sids == (
        f"{domain}-1000", f"{domain}-513", "S-1-22-2-1000", "S-1-1-0", "S-1-5-2",
        "S-1-5-11", "S-1-22-1-1000", "S-1-22-2041152804-0",
    )  # fmt: skip
    assert s.device_sids == ()
    assert (s.uid, s.gid, s.unix_groups) == (1000, 1000, (1000,))
    assert (s.unix_name, s.sanitized_username) == ("npt", "npt")


def test_level8_claims_are_stepped_over() -> None:
    r = parse_request(LEVEL8_CLAIMS)
    s = r.session
    # one local string claim, three user claims (int64, uint64, boolean), two device
    # claims (SID, octet string) sit between these and the rest of the session info
    assert s.device_sids == ("S-1-5-21-9-8-7-1105", "S-1-5-11")
    assert s.sids == parse_request(LEVEL8_NTLM).session.sids
    assert (s.uid, s.gid, s.account_name, s.unix_name) == (1000, 1000, "npt", "npt")
    assert s.user_flags == 0x120


def test_claim_pointer_that_goes_back_is_refused() -> None:
    # The first claim's name pointer (0x236: "localstr") moved back into the scalars.
    assert struct.unpack_from("<I", LEVEL8_CLAIMS, 0x180) == (0x236,)
    m = patched(LEVEL8_CLAIMS, 0x180, struct.pack("<I", 0x100))
    with pytest.raises(NpaError, match="goes back"):
        parse_request(m)


def test_claim_name_scan_is_linear() -> None:
    # The name pointer aimed at 250 KiB of near misses (NUL pairs at odd offsets).
    junk = b"A\x00\x00A" * ((MAX_REQUEST_SIZE - len(LEVEL8_CLAIMS) - 64) // 4)
    m = reframe(patched(LEVEL8_CLAIMS, 0x180, struct.pack("<I", len(LEVEL8_CLAIMS))) + junk)
    started = time.perf_counter()
    with pytest.raises(NpaError):
        parse_request(m)
    assert time.perf_counter() - started < 2.0


# --- the two level-7 layouts ---------------------------------------------------------
#
# Real captures back each layout: 4.17.12 (LEVEL7_NTLM, LEVEL7_KERBEROS) ends
# auth_user_info with uint8 authenticated = 1; 4.19.5 (LEVEL7_NTLM_419, LEVEL7_GUEST_419)
# with uint32 user_flags 0x20 and 0x1. Those values fit in the first byte, so the cases
# below patch LEVEL7_NTLM's last four bytes (and S-1-5-11 in its token) to cover what the
# captures don't: flags with bits past the first byte (0x120, as Samba 4.22.11 sends at
# level 8), which a parser reading the field as a uint8 gets wrong, and each ambiguous
# 0/1 value both with and without S-1-5-11.


@pytest.mark.parametrize(
    ("tail", "authenticated_users", "layout", "authenticated", "user_flags"),
    [
        # Samba 4.17.9-4.18: uint8 authenticated + zero padding, agreeing with S-1-5-11
        (b"\x01\x00\x00\x00", True, "authenticated8", True, None),
        (b"\x00\x00\x00\x00", False, "authenticated8", False, None),
        # Samba 4.19: uint32 user_flags; bytes past the first rule out the uint8 reading
        (b"\x20\x01\x00\x00", True, "user_flags32", True, 0x120),
        (b"\x21\x01\x00\x00", False, "user_flags32", False, 0x121),
        (b"\x02\x00\x00\x00", True, "user_flags32", True, 0x2),  # 2 is no boolean
        # ...and where the bytes alone can't tell, the token does
        (b"\x01\x00\x00\x00", False, "user_flags32", False, 0x1),  # NETLOGON_GUEST
        (b"\x00\x00\x00\x00", True, "user_flags32", True, 0x0),  # no flags, signed in
    ],
)
def test_level7_layouts(
    tail: bytes, authenticated_users: bool, layout: str, authenticated: bool, user_flags: int | None
) -> None:
    s = parse_request(ntlm7(tail, authenticated_users=authenticated_users)).session
    assert (s.user_info_layout, s.authenticated, s.user_flags) == (
        layout,
        authenticated,
        user_flags,
    )
    assert s.is_guest is not authenticated


def _without_info_strings_and_unix_info(end: int) -> bytes:
    m = bytearray(LEVEL7_NTLM)
    for p in (*L7_INFO_POINTERS, L7_UNIX_INFO_POINTER):
        m[p : p + 4] = bytes(4)
    return reframe(m[:end])


def test_level7_uint8_as_the_last_byte() -> None:
    # Nothing follows auth_user_info: Samba 4.17/4.18 end the message on the uint8.
    s = parse_request(_without_info_strings_and_unix_info(L7_TAIL + 1)).session
    assert (s.user_info_layout, s.authenticated) == ("authenticated8", True)
    assert s.account_name is None and s.unix_name is None
    # ...while 4.19 ends it on the uint32 (here NETLOGON_GUEST, with S-1-5-11 in the
    # token: the bytes decide, not the token)
    s = parse_request(_without_info_strings_and_unix_info(L7_TAIL + 4)).session
    assert (s.user_info_layout, s.user_flags, s.authenticated) == ("user_flags32", 1, False)


def test_npa_flags() -> None:
    at = LEVEL7_NTLM.index(struct.pack("<I", 2041152804)) + 4
    r = parse_request(patched(LEVEL7_NTLM, at, struct.pack("<I", 1 | 4)))
    assert r.npa_flags == 5 and r.need_idle_server and r.probe_only


# --- the reply -----------------------------------------------------------------------


def test_reply_layout() -> None:
    reply = build_reply(8)
    assert len(reply) == 36
    assert reply[0:4] == b"\x00\x00\x00\x20"  # big-endian length of the rest
    assert reply[4:8] == b"NPAM"
    assert struct.unpack_from("<II", reply, 8) == (8, 8)  # level, union discriminant
    assert struct.unpack_from("<HH", reply, 16) == (1, 0x05FF)  # file_type, device_state
    assert reply[20:24] == bytes(4)  # pad: allocation_size is an 8-aligned hyper
    assert struct.unpack_from("<Q", reply, 24) == (4096,)
    assert struct.unpack_from("<I", reply, 32) == (0,)  # NTSTATUS


def test_reply_fields() -> None:
    reply = build_reply(
        7, file_type=2, device_state=0x00FF, allocation_size=1 << 40, status=0xC0000022
    )
    assert struct.unpack_from(">I", reply) == (32,)
    assert struct.unpack_from("<4sIIHH4xQI", reply, 4) == (
        b"NPAM", 7, 7, 2, 0x00FF, 1 << 40, 0xC0000022,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [
        {"level": 5},
        {"level": 9},
        {"level": 8, "file_type": 3},
        {"level": 8, "device_state": 0x10000},
        {"level": 8, "allocation_size": -1},
        {"level": 8, "status": 1 << 32},
    ],
)
def test_reply_rejects(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        build_reply(**kwargs)


# --- framing and the incremental reader ----------------------------------------------


@pytest.mark.parametrize("name", ALL_VECTORS)
def test_byte_at_a_time(name: str) -> None:
    message = vector(name)
    reader = NpaRequestReader()
    results = [reader.feed(message[i : i + 1]) for i in range(len(message))]
    assert results[:-1] == [None] * (len(message) - 1)
    assert results[-1] == parse_request(message)
    assert reader.request == results[-1]
    assert reader.unused_data == b""


def test_pipelined_bytes_are_kept() -> None:
    after = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    reader = NpaRequestReader()
    request = reader.feed(LEVEL8_NTLM + after)
    assert isinstance(request, NpaRequest) and request.level == 8
    assert reader.unused_data == after
    with pytest.raises(RuntimeError):
        reader.feed(b"more")

    reader = NpaRequestReader()
    assert reader.feed(LEVEL8_NTLM[:-3]) is None
    assert reader.feed(LEVEL8_NTLM[-3:] + after[:5]) == request
    assert reader.unused_data == after[:5]


@pytest.mark.parametrize("name", ALL_VECTORS)
def test_every_truncation(name: str) -> None:
    message = vector(name)
    for end in range(len(message)):
        with pytest.raises(NpaError):
            parse_request(message[:end])  # the length prefix promises more
        if end >= 4:
            with pytest.raises(NpaError):
                parse_request(reframe(message[:end]))  # it doesn't: the body is cut
        reader = NpaRequestReader()
        assert reader.feed(message[:end]) is None


def test_trailing_bytes_in_a_message_are_refused() -> None:
    with pytest.raises(NpaError, match="past its end"):
        parse_request(LEVEL7_NTLM + b"\x00")
    with pytest.raises(NpaError, match="left over"):
        parse_request(reframe(LEVEL7_NTLM + bytes(4)))


@pytest.mark.parametrize(
    ("level", "releases"),
    [
        (4, "Samba 4.0-4.15"),
        (5, "Samba 4.16-4.17.8 and 4.18.0-4.18.2"),
        (6, "unreleased"),
        (9, "newer than"),
        (0, "not sent by"),
    ],
)
def test_unsupported_level(level: int, releases: str) -> None:
    header = struct.pack(">I", 12) + struct.pack("<4sII", b"NPAM", level, level)
    expected = (
        rf"level {level} \({releases}.*\) is not supported: npipe speaks levels "
        r"7 \(Samba 4\.17\.9-4\.19\) and 8 \(Samba 4\.20\+\)"
    )
    with pytest.raises(NpaError, match=expected):
        parse_request(header)
    # the reader refuses it as soon as the level is in, body or not
    big_header = struct.pack(">I", 5000) + b"NPAM" + struct.pack("<I", level)
    with pytest.raises(NpaError, match=expected):
        NpaRequestReader().feed(big_header)


def test_mismatched_union_level() -> None:
    with pytest.raises(NpaError, match="union level 8 differs from level 7"):
        parse_request(patched(LEVEL7_NTLM, 12, struct.pack("<I", 8)))


def test_length_over_the_limit_is_refused_from_the_header() -> None:
    reader = NpaRequestReader()
    with pytest.raises(NpaError, match="over the 262144-byte limit"):
        reader.feed(struct.pack(">I", MAX_REQUEST_SIZE - 3))
    with pytest.raises(NpaError):  # and stays refused
        reader.feed(b"NPAM")
    assert NpaRequestReader().feed(struct.pack(">I", MAX_REQUEST_SIZE - 4)) is None
    with pytest.raises(NpaError, match="over the 512-byte limit"):
        NpaRequestReader(max_size=512).feed(LEVEL7_NTLM[:4])
    with pytest.raises(NpaError, match="over the"):
        parse_request(b"\xff\xff\xff\xff")


def test_bad_magic_is_refused_from_the_header() -> None:
    with pytest.raises(NpaError, match="bad magic b'PRI '"):
        NpaRequestReader().feed(b"\x00\x00\x01\x00PRI ")
    with pytest.raises(NpaError, match="bad magic"):
        parse_request(patched(LEVEL8_NTLM, 4, b"NPAX"))


def test_length_below_a_header() -> None:
    with pytest.raises(NpaError, match="too small"):
        NpaRequestReader().feed(struct.pack(">I", 11))


# --- malformed bodies ----------------------------------------------------------------


def test_bad_utf8() -> None:
    at = LEVEL7_NTLM.index(b"npt\x00")  # info.account_name
    with pytest.raises(NpaError, match=r"info\.account_name: string is not valid utf-8"):
        parse_request(patched(LEVEL7_NTLM, at, b"n\xfft"))


def test_forged_sid_count() -> None:
    # security_token.num_sids at 0xc8 (its conformance word follows)
    assert struct.unpack_from("<II", LEVEL7_NTLM, 0xC8) == (8, 8)
    m = patched(LEVEL7_NTLM, 0xC8, struct.pack("<I", 0xFFFFFFFF))
    with pytest.raises(NpaError, match=r"num_sids: 4294967295 elements .* run past the end"):
        parse_request(m)


def test_not_an_ip_address() -> None:
    at = LEVEL7_NTLM.index(b"127.0.0.1\x00")
    with pytest.raises(NpaError, match=r"remote_client_addr '127\.0\.0\.x' is not an IP"):
        parse_request(patched(LEVEL7_NTLM, at, b"127.0.0.x"))


def test_many_groups() -> None:
    # 10,000 extra 12-byte SIDs (an even number keeps every later offset's alignment)
    extra = 10_000
    sid = bytes.fromhex("0101000000000005") + struct.pack("<I", 32)  # S-1-5-32
    end_of_sids = 0xD0 + sum((28, 28, 16, 12, 12, 12, 16, 16))
    m = bytearray(LEVEL7_NTLM)
    m[0xC8:0xD0] = struct.pack("<II", 8 + extra, 8 + extra)
    m[end_of_sids:end_of_sids] = sid * extra
    started = time.perf_counter()
    s = parse_request(reframe(m)).session
    assert time.perf_counter() - started < 2.0
    assert len(s.sids) == 8 + extra and s.sids[-1] == "S-1-5-32"
    assert s.account_name == "npt"


# --- fuzzing -------------------------------------------------------------------------


def _parse_or_refuse(data: bytes) -> None:
    """Either a request or NpaError: anything else fails the test."""
    with contextlib.suppress(NpaError):
        parse_request(data)
    with contextlib.suppress(NpaError):
        NpaRequestReader().feed(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _parse_or_refuse(data)
    _parse_or_refuse(reframe(b"\x00\x00\x00\x00" + data))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from((7, 8)), st.binary(max_size=2048))
def test_random_bodies(level: int, body: bytes) -> None:
    _parse_or_refuse(reframe(struct.pack("<I4sII", 0, b"NPAM", level, level) + body))


_INTERESTING_WORDS = (0, 1, 2, 0xFF, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(vector(draw(st.sampled_from(ALL_VECTORS))))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(("flip", "byte", "word", "cut", "insert", "delete")))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "word":  # counts, sizes and pointers are 4-byte words
            data[at & ~3 : (at & ~3) + 4] = struct.pack(
                "<I", draw(st.sampled_from(_INTERESTING_WORDS))
            )
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 16))]
        if len(data) < 17:
            break
    if len(data) >= 4 and draw(st.booleans()):
        return reframe(data)  # usually: get past the framing into the NDR
    return bytes(data)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_vectors(data: bytes) -> None:
    started = time.perf_counter()
    _parse_or_refuse(data)
    assert time.perf_counter() - started < 1.0


# --- vectors: whole messages, length prefix included ----------------------------

# npa-request-level7-samba-4.17.12.bin: user npt (NTLM) from 127.0.0.1, standalone smbd
# sha256 7dd89b222214b4d7..., 696 bytes
LEVEL7_NTLM = bytes.fromhex(
    "000002b44e50414d0700000007000000010000000000020004000200ae960000080002000c00020063110000"
    "10000200030000000000000003000000766d00000a000000000000000a0000003132372e302e302e31000000"
    "030000000000000003000000766d00000a000000000000000a0000003132372e302e302e3100000014000200"
    "00000000180002001c00020020000200240002000000000010000000b297a9d8b9af21a40e80dfef823c3334"
    "00000000d2cd526c1bd69143a75944f593efd1a0000000000800000008000000010500000000000515000000"
    "5a916e5e0f24f8e4f4e02a82e80300000105000000000005150000005a916e5e0f24f8e4f4e02a8201020000"
    "010200000000001602000000ea03000001010000000000010000000001010000000000050200000001010000"
    "000000050b000000010200000000001601000000ea03000001020000000000162485a9790000000000000000"
    "00000000000000000000000001000000ea03000000000000ea030000000000000100000000000000ea030000"
    "000000002800020000000000000000002c000200000000003000020034000200380002003c00020040000200"
    "440002000000000000000000ffffffffffffff7fffffffffffffff7f80876337d97cdd0180876337d97cdd01"
    "ffffffffffffff7f0000000010000000010000000400000000000000040000006e7074000300000000000000"
    "03000000564d0000010000000000000001000000000000000100000000000000010000000000000011000000"
    "00000000110000005c5c564d5c6e70745c70726f66696c65000000000900000000000000090000005c5c564d"
    "5c6e70740000000001000000000000000100000000000000030000000000000003000000564d000048000200"
    "4c0002000400000000000000040000006e7074000400000000000000040000006e707400"
)

# npa-request-level7-samba-4.17.12-addc-kerberos.bin: alice@NPIPE.TEST (Kerberos) on a DC
# sha256 64c939c586fa3c56..., 834 bytes
LEVEL7_KERBEROS = bytes.fromhex(
    "0000033e4e50414d07000000070000000100000000000200040002003ad10000080002000c000200bd010000"
    "10000200030000000000000003000000766d00000b000000000000000b0000003139382e31392e312e310000"
    "030000000000000003000000766d00000b000000000000000b0000003139382e31392e312e32000014000200"
    "00000000180002001c000200200002002400020000000000100000008082444e0110f73b553982f18f8a1680"
    "000000000aa72932f4565742993c16b1c700037b020000000a0000000a000000010500000000000515000000"
    "3686d346e470c103b2c5d3104f0400000105000000000005150000003686d346e470c103b2c5d31001020000"
    "0101000000000012010000000101000000000001000000000101000000000005020000000101000000000005"
    "0b000000010200000000000520000000210200000102000000000005200000002a0200000104000000000016"
    "33414d5311030000020000000200000001020000000000162485a97900000000000080000000000000040000"
    "08000000cfc62d000000000064000000000000000800000000000000cfc62d00000000006400000000000000"
    "d0c62d0000000000cdc62d0000000000cec62d0000000000c3c62d0000000000c9c62d0000000000d1c62d00"
    "00000000280002002c000200000000003000020034000200380002003c000200400002004400020048000200"
    "4c0002000000000000000000ffffffffffffff7fffffffffffffff7fc4e5d9a1dd7cdd01c4a543cca67ddd01"
    "ffffffffffffff7f000000001002000001000000060000000000000006000000616c69636500000011000000"
    "0000000011000000616c696365406e706970652e74657374000000000600000000000000060000004e504950"
    "450000000b000000000000000b0000004e504950452e54455354000001000000000000000100000000000000"
    "0100000000000000010000000000000001000000000000000100000000000000010000000000000001000000"
    "0000000001000000000000000100000000000000040000000000000004000000444331005000020054000200"
    "0c000000000000000c0000004e504950455c616c69636500060000000000000006000000616c69636500"
)

# npa-request-level7-samba-4.19.5.bin: user npt (NTLM, SMB 3.1.1 from smbprotocol) from
# 127.0.0.1, standalone smbd 4.19.5+dfsg-4ubuntu9.9 (Ubuntu 24.04) in a debootstrapped root
# sha256 5803f633a41ec6a1..., 720 bytes
LEVEL7_NTLM_419 = bytes.fromhex(
    "000002cc4e50414d070000000700000001000000000002000400020026b50000080002000c00020063110000"
    "10000200030000000000000003000000766d00000a000000000000000a0000003132372e302e302e31000000"
    "030000000000000003000000766d00000a000000000000000a0000003132372e302e302e3100000014000200"
    "00000000180002001c00020020000200240002000000000010000000f8f3883439034c73c7047410c14b227b"
    "00000000dc99a78ec35af34da1ad26c426d3df24000000000900000009000000010500000000000515000000"
    "eac825ff72d6bcaa5430651ae8030000010500000000000515000000eac825ff72d6bcaa5430651a01020000"
    "010200000000001602000000ea03000001010000000000010000000001010000000000050200000001010000"
    "000000050b000000010200000000001601000000ea030000010400000000001633414d531103000002000000"
    "0200000001020000000000162485a979000000000000000000000000000000000000000001000000ea030000"
    "00000000ea030000000000000100000000000000ea030000000000002800020000000000000000002c000200"
    "000000003000020034000200380002003c00020040000200440002000000000000000000ffffffffffffff7f"
    "ffffffffffffff7f00181c122885dd0100181c122885dd01ffffffffffffff7f000000001000000020000000"
    "0400000000000000040000006e707400030000000000000003000000564d0000010000000000000001000000"
    "00000000010000000000000001000000000000001100000000000000110000005c5c564d5c6e70745c70726f"
    "66696c65000000000900000000000000090000005c5c564d5c6e707400000000010000000000000001000000"
    "00000000030000000000000003000000564d0000480002004c0002000400000000000000040000006e707400"
    "0400000000000000040000006e707400"
)

# npa-request-level7-samba-4.19.5-guest.bin: the same smbd with "map to guest = Bad User"
# and "guest account = nobody"; an unknown user "nosuchuser" (NTLM) mapped to guest
# sha256 ad0696b43f4d6a5a..., 591 bytes
LEVEL7_GUEST_419 = bytes.fromhex(
    "0000024b4e50414d07000000070000000100000000000200040002005a830000080002000c00020063110000"
    "10000200030000000000000003000000766d00000a000000000000000a0000003132372e302e302e31000000"
    "030000000000000003000000766d00000a000000000000000a0000003132372e302e302e3100000014000200"
    "00000000180002001c00020020000200240002000000000010000000b65141b63645fe0ff940875e8acfb959"
    "00000000642d295b14c28144959036c0986d6e92000000000800000008000000010500000000000515000000"
    "eac825ff72d6bcaa5430651af5010000010500000000000515000000eac825ff72d6bcaa5430651a02020000"
    "010200000000001602000000feff000001010000000000010000000001010000000000050200000001020000"
    "000000052000000022020000010200000000001601000000feff000001020000000000162485a97900000000"
    "00000000000000000000000001000000feff000000000000feff0000000000000100000000000000feff0000"
    "000000002800020000000000000000002c000200000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000010000000700000000000000070000006e6f626f6479000003000000"
    "0000000003000000564d000030000200340002000700000000000000070000006e6f626f647900000b000000"
    "000000000b0000006e6f737563687573657200"
)

# npa-request-level8-samba-4.22.11.bin: user npt (NTLM) from 127.0.0.1, Samba 4.22.11
# sha256 553e4d9a84b97cf9..., 736 bytes
LEVEL8_NTLM = bytes.fromhex(
    "000002dc4e50414d0800000008000000010000000000020004000200ccda0000080002000c00020062110000"
    "10000200030000000000000003000000766d00000a000000000000000a0000003132372e302e302e31000000"
    "030000000000000003000000766d00000a000000000000000a0000003132372e302e302e3100000014000200"
    "00000000180002001c00020020000200240002000000000010000000f40def99981f087535f3ef00a998a350"
    "00000000e37f20b141a5024585d90d105b5d2444000000000800000008000000010500000000000515000000"
    "437b8d0a96d84869ee892ab1e8030000010500000000000515000000437b8d0a96d84869ee892ab101020000"
    "010200000000001602000000e803000001010000000000010000000001010000000000050200000001010000"
    "000000050b000000010200000000001601000000e803000001020000000000162485a9790000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "010000000100000000000000e803000000000000e8030000000000000100000000000000e803000000000000"
    "2800020000000000000000002c000200000000003000020034000200380002003c0002004000020044000200"
    "0000000000000000ffffffffffffff7fffffffffffffff7f801fda2dd97cdd01801fda2dd97cdd01ffffffff"
    "ffffff7f0000000010000000200100000400000000000000040000006e707400030000000000000003000000"
    "564d000001000000000000000100000000000000010000000000000001000000000000001100000000000000"
    "110000005c5c564d5c6e70745c70726f66696c65000000000900000000000000090000005c5c564d5c6e7074"
    "0000000001000000000000000100000000000000030000000000000003000000564d0000480002004c000200"
    "0400000000000000040000006e7074000400000000000000040000006e707400"
)

# LEVEL8_NTLM's header and session info with claims and device SIDs added, encoded
# by Samba 4.22.11 (see the module docstring); Samba's own ndr_unpack fails on it.
# sha256 4ee5a13ed6a217c6..., 1040 bytes
LEVEL8_CLAIMS = bytes.fromhex(
    "0000040c4e50414d0800000008000000010000000000020004000200ccda0000080002000c00020062110000"
    "10000200030000000000000003000000766d00000a000000000000000a0000003132372e302e302e31000000"
    "030000000000000003000000766d00000a000000000000000a0000003132372e302e302e3100000000000200"
    "0000000004000200080002000c000200100002000000000010000000f40def99981f087535f3ef00a998a350"
    "00000000e37f20b141a5024585d90d105b5d2444000000000800000008000000010500000000000515000000"
    "437b8d0a96d84869ee892ab1e8030000010500000000000515000000437b8d0a96d84869ee892ab101020000"
    "010200000000001602000000e803000001010000000000010000000001010000000000050200000001010000"
    "000000050b000000010200000000001601000000e803000001020000000000162485a9790000000000000000"
    "0000000000000000000000000100000003000000020000000200000001000000360200000300000000000000"
    "02000000480200004c020000030000005a0200000100000000000000020000005e020000660200006e020000"
    "020000000000000001000000740200007c020000060000000000000001000000800200000200000088020000"
    "05000000000000000100000090020000b0020000100000000000000001000000b80200000200000001050000"
    "00000005150000000900000008000000070000005104000001010000000000050b00000001006c006f006300"
    "61006c007300740072000000610000005a00fc007200690063006800000069000000fbffffffffffffff0700"
    "000000000000750075000000000000000000008062000000010000000000000073006900640000001c000000"
    "010500000000000515000000010000000200000003000000500400006f006300740000000300000001020300"
    "0100000000000000e803000000000000e8030000000000000100000000000000e80300000000000014000200"
    "000000000000000018000200000000001c0002002000020024000200280002002c0002003000020000000000"
    "00000000ffffffffffffff7fffffffffffffff7f801fda2dd97cdd01801fda2dd97cdd01ffffffffffffff7f"
    "0000000010000000200100000400000000000000040000006e707400030000000000000003000000564d0000"
    "0100000000000000010000000000000001000000000000000100000000000000110000000000000011000000"
    "5c5c564d5c6e70745c70726f66696c65000000000900000000000000090000005c5c564d5c6e707400000000"
    "01000000000000000100000000000000030000000000000003000000564d0000340002003800020004000000"
    "00000000040000006e7074000400000000000000040000006e707400"
)
