"""SMB2 NEGOTIATE (MS-SMB2 2.2.3, 2.2.4): the request with its 3.1.1 contexts, and what
the server chose. Sans-I/O.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from npipe.smb.native.crypto import (
    AES_128_CCM,
    AES_128_GCM,
    AES_256_CCM,
    AES_256_GCM,
    AES_CMAC,
    AES_GMAC,
    HMAC_SHA256,
)
from npipe.smb.native.wire import HEADER_SIZE, ProtocolError, body_at

SMB_2_0_2 = 0x0202
SMB_2_1 = 0x0210
SMB_3_0 = 0x0300
SMB_3_0_2 = 0x0302
SMB_3_1_1 = 0x0311
DIALECTS = (SMB_2_0_2, SMB_2_1, SMB_3_0, SMB_3_0_2, SMB_3_1_1)
SMB3_DIALECTS = (SMB_3_0, SMB_3_0_2, SMB_3_1_1)
DIALECT_NAMES = {
    SMB_2_0_2: "2.0.2", SMB_2_1: "2.1", SMB_3_0: "3.0", SMB_3_0_2: "3.0.2", SMB_3_1_1: "3.1.1",
}

CAP_DFS = 0x01
CAP_LARGE_MTU = 0x04
CAP_ENCRYPTION = 0x40

# Negotiate context types.
PREAUTH_INTEGRITY_CAPABILITIES = 0x0001
ENCRYPTION_CAPABILITIES = 0x0002
SIGNING_CAPABILITIES = 0x0008
SHA_512 = 0x0001

# Preferences: GCM and GMAC first (cheap with AES-NI; CCM and CMAC cost CPU on both ends).
DEFAULT_CIPHERS = (AES_128_GCM, AES_256_GCM, AES_128_CCM, AES_256_CCM)
DEFAULT_SIGNING = (AES_GMAC, AES_CMAC, HMAC_SHA256)

NEGOTIATE_REQ = struct.Struct("<HHHHI16sIHH")  # 36 bytes; dialects at 100
NEGOTIATE_RESP = struct.Struct("<HHHH16sIIIIQQHHI")  # 64 bytes
CONTEXT_HEAD = struct.Struct("<HHI")


def _pad8(n: int) -> int:
    return (8 - n % 8) % 8


def client_capabilities(ciphers: tuple[int, ...]) -> int:
    """The Capabilities a client offering ``ciphers`` sends (NEGOTIATE and
    VALIDATE_NEGOTIATE_INFO must carry the same)."""
    return CAP_LARGE_MTU | (CAP_ENCRYPTION if ciphers else 0)


def client_security_mode(signing_required: bool) -> int:
    return 0x0002 if signing_required else 0x0001


def negotiate_request(
    *,
    client_guid: bytes,
    dialects: tuple[int, ...] = DIALECTS,
    signing_required: bool = True,
    ciphers: tuple[int, ...] = DEFAULT_CIPHERS,
    signing_algorithms: tuple[int, ...] = DEFAULT_SIGNING,
    salt: bytes | None = None,
) -> bytes:
    """The NEGOTIATE request body (after the header)."""
    mode = client_security_mode(signing_required)
    caps = client_capabilities(ciphers)
    dialect_bytes = struct.pack(f"<{len(dialects)}H", *dialects)
    contexts = b""
    if SMB_3_1_1 in dialects:
        items = [
            (PREAUTH_INTEGRITY_CAPABILITIES,
             struct.pack("<HHH", 1, 32, SHA_512) + (salt or os.urandom(32))),
            (SIGNING_CAPABILITIES,
             struct.pack(f"<H{len(signing_algorithms)}H", len(signing_algorithms),
                         *signing_algorithms)),
        ]
        if ciphers:
            items.insert(1, (ENCRYPTION_CAPABILITIES,
                             struct.pack(f"<H{len(ciphers)}H", len(ciphers), *ciphers)))
        parts = []
        for i, (kind, data) in enumerate(items):
            parts.append(CONTEXT_HEAD.pack(kind, len(data), 0) + data)
            if i < len(items) - 1:
                parts.append(bytes(_pad8(len(data))))
        contexts = b"".join(parts)
    start = HEADER_SIZE + NEGOTIATE_REQ.size + len(dialect_bytes)
    padding = bytes(_pad8(start)) if contexts else b""
    context_offset = start + len(padding) if contexts else 0
    context_count = (2 + bool(ciphers)) if contexts else 0
    head = NEGOTIATE_REQ.pack(36, len(dialects), mode, 0, caps, client_guid, context_offset,
                              context_count, 0)
    return head + dialect_bytes + padding + contexts


@dataclass(frozen=True)
class Negotiated:
    """What the server chose."""

    dialect: int
    security_mode: int
    capabilities: int
    max_transact: int
    max_read: int
    max_write: int
    security_buffer: bytes
    cipher: int | None  # None: no encryption on this connection
    signing_algorithm: int  # HMAC-SHA256 below 3.0, AES-CMAC on 3.0 or without the context
    server_guid: bytes = bytes(16)

    @property
    def signing_required(self) -> bool:
        return bool(self.security_mode & 0x0002)

    @property
    def dialect_name(self) -> str:
        return DIALECT_NAMES.get(self.dialect, f"{self.dialect:#06x}")

    @property
    def large_mtu(self) -> bool:
        return self.dialect >= SMB_2_1 and bool(self.capabilities & CAP_LARGE_MTU)


def parse_negotiate(
    msg: bytes,
    *,
    offered: tuple[int, ...] = DIALECTS,
    ciphers: tuple[int, ...] = DEFAULT_CIPHERS,
    signing_algorithms: tuple[int, ...] = DEFAULT_SIGNING,
) -> Negotiated:
    """The server's choice; ProtocolError for anything we did not offer or cannot use."""
    if len(msg) < HEADER_SIZE + NEGOTIATE_RESP.size:
        raise ProtocolError(f"a truncated NEGOTIATE response ({len(msg)} bytes)")
    (size, mode, dialect, n_contexts, guid, caps, max_transact, max_read, max_write, _t, _st,
     sec_offset, sec_length, ctx_offset) = NEGOTIATE_RESP.unpack_from(msg, HEADER_SIZE)
    if size != 65:
        raise ProtocolError(f"a NEGOTIATE response with StructureSize {size}")
    if dialect not in offered:
        raise ProtocolError(f"the server chose dialect {dialect:#06x}, which was not offered")
    security = body_at(msg, 0, sec_offset, sec_length) if sec_length else b""
    cipher: int | None = None
    signing = HMAC_SHA256 if dialect < SMB_3_0 else AES_CMAC
    if dialect >= SMB_3_1_1:
        seen_preauth = False
        pos = ctx_offset
        for _ in range(n_contexts):
            pos += _pad8(pos)
            if pos + CONTEXT_HEAD.size > len(msg):
                raise ProtocolError("a NEGOTIATE context lies outside the response")
            kind, length, _r = CONTEXT_HEAD.unpack_from(msg, pos)
            data = body_at(msg, 0, pos + CONTEXT_HEAD.size, length)
            pos += CONTEXT_HEAD.size + length
            if kind == PREAUTH_INTEGRITY_CAPABILITIES:
                if len(data) < 6 or struct.unpack_from("<HHH", data)[:1] != (1,) or \
                        struct.unpack_from("<H", data, 4)[0] != SHA_512:
                    raise ProtocolError("the server chose no SHA-512 preauth integrity")
                seen_preauth = True
            elif kind == ENCRYPTION_CAPABILITIES:
                chosen = _one_choice(data, "cipher")
                if chosen and chosen not in ciphers:
                    raise ProtocolError(f"the server chose cipher {chosen:#06x}, not offered")
                cipher = chosen or None
            elif kind == SIGNING_CAPABILITIES:
                chosen = _one_choice(data, "signing algorithm")
                if chosen not in signing_algorithms:
                    raise ProtocolError(f"the server chose signing {chosen:#06x}, not offered")
                signing = chosen
        if not seen_preauth:
            raise ProtocolError("an SMB 3.1.1 NEGOTIATE response without preauth integrity")
    elif dialect >= SMB_3_0 and caps & CAP_ENCRYPTION and AES_128_CCM in ciphers:
        cipher = AES_128_CCM  # 3.0 and 3.0.2 know only AES-128-CCM
    return Negotiated(dialect, mode, caps, max_transact, max_read, max_write, security,
                      cipher, signing, guid)


def _one_choice(data: bytes, what: str) -> int:
    if len(data) < 4:
        raise ProtocolError(f"a truncated {what} context")
    count, chosen = struct.unpack_from("<HH", data)
    if count != 1:
        raise ProtocolError(f"the server chose {count} values for the {what}, not one")
    return int(chosen)


# --- FSCTL_VALIDATE_NEGOTIATE_INFO (MS-SMB2 2.2.31.4, 2.2.32.6; 3.0 and 3.0.2 only) ---
#
# 3.0 and 3.0.2 have no preauth integrity: nothing in the keys depends on the NEGOTIATE,
# so an attacker may rewrite it (fewer dialects, no encryption capability) unseen.
# After SESSION_SETUP the client repeats what it offered in a signed IOCTL; the server
# checks that against what it received and answers with what it chose, which the
# client checks against the NEGOTIATE response it received.

VALIDATE_NEGOTIATE_REQ = struct.Struct("<I16sHH")  # 24 bytes, then the dialects
VALIDATE_NEGOTIATE_RESP = struct.Struct("<I16sHH")  # 24 bytes


def validate_negotiate_input(
    *, capabilities: int, client_guid: bytes, security_mode: int, dialects: tuple[int, ...]
) -> bytes:
    """The VALIDATE_NEGOTIATE_INFO request: what the client's NEGOTIATE said."""
    return VALIDATE_NEGOTIATE_REQ.pack(
        capabilities, client_guid, security_mode, len(dialects)
    ) + struct.pack(f"<{len(dialects)}H", *dialects)


@dataclass(frozen=True)
class ValidatedNegotiate:
    """The server's VALIDATE_NEGOTIATE_INFO answer: what it negotiated."""

    capabilities: int
    server_guid: bytes
    security_mode: int
    dialect: int


def parse_validate_negotiate(output: bytes) -> ValidatedNegotiate:
    if len(output) < VALIDATE_NEGOTIATE_RESP.size:
        raise ProtocolError(
            f"a truncated VALIDATE_NEGOTIATE_INFO answer ({len(output)} bytes)"
        )
    caps, guid, mode, dialect = VALIDATE_NEGOTIATE_RESP.unpack_from(output)
    return ValidatedNegotiate(caps, guid, mode, dialect)


def negotiation_mismatch(neg: Negotiated, validated: ValidatedNegotiate) -> str | None:
    """What differs between the NEGOTIATE response and the validated answer, or None."""
    diffs = []
    if validated.dialect != neg.dialect:
        diffs.append(f"dialect {DIALECT_NAMES.get(validated.dialect, hex(validated.dialect))}"
                     f" (the NEGOTIATE response said {neg.dialect_name})")
    if validated.capabilities != neg.capabilities:
        diffs.append(f"capabilities {validated.capabilities:#x} (the NEGOTIATE response said "
                     f"{neg.capabilities:#x})")
    if validated.security_mode != neg.security_mode:
        diffs.append(f"security mode {validated.security_mode:#x} (the NEGOTIATE response "
                     f"said {neg.security_mode:#x})")
    if validated.server_guid != neg.server_guid:
        diffs.append("another server GUID")
    if not diffs:
        return None
    return "the server validated " + ", ".join(diffs)
