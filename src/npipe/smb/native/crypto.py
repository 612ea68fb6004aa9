"""SMB2/3 message security (MS-SMB2 3.1.4): key derivation, signing, encryption.

All primitives come from ``cryptography``; this module only lays out the bytes: which
key, which nonce, which part of the message is authenticated. Sans-I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from npipe.smb.native.wire import (
    CANCEL,
    FLAGS_SERVER_TO_REDIR,
    FLAGS_SIGNED,
    PROTOCOL_TRANSFORM,
    SIGNATURE_END,
    SIGNATURE_OFFSET,
    ZERO_SIGNATURE,
    ProtocolError,
)

# Signing algorithms (SMB2_SIGNING_CAPABILITIES ids) and ciphers (SMB2_ENCRYPTION_CAPABILITIES).
HMAC_SHA256 = 0x0000
AES_CMAC = 0x0001
AES_GMAC = 0x0002
SIGNING_NAMES = {HMAC_SHA256: "HMAC-SHA256", AES_CMAC: "AES-CMAC", AES_GMAC: "AES-GMAC"}

AES_128_CCM = 0x0001
AES_128_GCM = 0x0002
AES_256_CCM = 0x0003
AES_256_GCM = 0x0004
CIPHER_NAMES = {
    AES_128_CCM: "AES-128-CCM",
    AES_128_GCM: "AES-128-GCM",
    AES_256_CCM: "AES-256-CCM",
    AES_256_GCM: "AES-256-GCM",
}

_GMAC_NONCE = struct.Struct("<QI")

# ProtocolId, Signature, Nonce, OriginalMessageSize, Reserved, Flags, SessionId.
TRANSFORM = struct.Struct("<4s16s16sIHHQ")
TRANSFORM_SIZE = TRANSFORM.size  # 52
TRANSFORM_AAD_START = 20  # the AAD is the transform header from Nonce on
TRANSFORM_FLAG_ENCRYPTED = 0x0001


def kdf(key: bytes, label: bytes, context: bytes, bits: int = 128) -> bytes:
    """SP800-108 counter-mode KDF with HMAC-SHA256 (MS-SMB2 3.1.4.2)."""
    return KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
    ).derive(key)


class SessionKeys:
    """The keys of one session, derived as its dialect says (MS-SMB2 3.2.5.3.1)."""

    def __init__(
        self, dialect: int, session_key: bytes, preauth_hash: bytes | None, cipher: int | None
    ) -> None:
        full = session_key
        session_key = (session_key + bytes(16))[:16]
        self.session_key = session_key
        if dialect < 0x0300:
            self.signing = session_key
            self.encryption = self.decryption = b""
            return
        wide = cipher in (AES_256_CCM, AES_256_GCM)
        bits = 256 if wide else 128
        # AES-256 keys come from the whole GSS key (Kerberos gives 32 bytes), the rest
        # from its first 16 bytes.
        base = full if wide else session_key
        if dialect >= 0x0311:
            assert preauth_hash is not None
            self.signing = kdf(session_key, b"SMBSigningKey\x00", preauth_hash)
            self.encryption = kdf(base, b"SMBC2SCipherKey\x00", preauth_hash, bits)
            self.decryption = kdf(base, b"SMBS2CCipherKey\x00", preauth_hash, bits)
        else:
            self.signing = kdf(session_key, b"SMB2AESCMAC\x00", b"SmbSign\x00")
            self.encryption = kdf(session_key, b"SMB2AESCCM\x00", b"ServerIn \x00")
            self.decryption = kdf(session_key, b"SMB2AESCCM\x00", b"ServerOut\x00")


class Signer:
    """Signs outgoing messages and verifies incoming ones with one algorithm and key."""

    def __init__(self, algorithm: int, key: bytes) -> None:
        self.algorithm = algorithm
        self.key = key
        self._gmac = AESGCM(key) if algorithm == AES_GMAC else None
        self._cmac_base = None
        if algorithm == AES_CMAC:
            self._cmac_base = cmac.CMAC(algorithms.AES(key))

    @property
    def name(self) -> str:
        return SIGNING_NAMES[self.algorithm]

    def _mac(self, head: bytes | memoryview, tail: bytes | memoryview, nonce_word: int,
             message_id: int) -> bytes:
        """The MAC of ``head`` + a zero signature + ``tail``."""
        if self._gmac is not None:
            nonce = _GMAC_NONCE.pack(message_id, nonce_word)
            return self._gmac.encrypt(nonce, b"", b"".join((head, ZERO_SIGNATURE, tail)))
        if self._cmac_base is not None:
            c = self._cmac_base.copy()
            c.update(head)  # type: ignore[arg-type]  # any buffer works
            c.update(ZERO_SIGNATURE)
            c.update(tail)  # type: ignore[arg-type]
            return c.finalize()
        h = hmac.new(self.key, head, hashlib.sha256)
        h.update(ZERO_SIGNATURE)
        h.update(tail)
        return h.digest()[:16]

    def sign_at(self, frame: bytearray, offset: int, message_id: int) -> None:
        """Sign the request at ``offset`` of ``frame``, in place: its header already has
        SMB2_FLAGS_SIGNED and a zero signature (the hot path: no copy). Not for CANCEL."""
        view = memoryview(frame)[offset:]
        gmac = self._gmac
        if gmac is not None:
            mac = gmac.encrypt(_GMAC_NONCE.pack(message_id, 0), b"", view)
        elif self._cmac_base is not None:
            c = self._cmac_base.copy()
            c.update(view)  # type: ignore[arg-type]  # any buffer works
            mac = c.finalize()
        else:
            mac = hmac.new(self.key, view, hashlib.sha256).digest()[:16]
        view.release()
        frame[offset + SIGNATURE_OFFSET : offset + SIGNATURE_END] = mac

    def sign(self, message: bytearray) -> None:
        """Set SMB2_FLAGS_SIGNED and the signature of a request, in place."""
        flags = int.from_bytes(message[16:20], "little") | FLAGS_SIGNED
        message[16:20] = flags.to_bytes(4, "little")
        message_id = int.from_bytes(message[24:32], "little")
        view = memoryview(message)
        mac = self._mac(view[:SIGNATURE_OFFSET], view[SIGNATURE_END:], _gmac_word(message),
                        message_id)
        message[SIGNATURE_OFFSET:SIGNATURE_END] = mac

    def verify(self, message: bytes, message_id: int) -> bool:
        """Whether a response's signature is right."""
        view = memoryview(message)
        mac = self._mac(view[:SIGNATURE_OFFSET], view[SIGNATURE_END:], _gmac_word(message),
                        message_id)
        return hmac.compare_digest(mac, message[SIGNATURE_OFFSET:SIGNATURE_END])


def _gmac_word(message: bytes | bytearray | memoryview) -> int:
    """The last 4 bytes of the AES-GMAC nonce (MS-SMB2 3.1.4.1): bit 0 says the server
    sent it, bit 1 that it is a CANCEL. Taken from the header, as Samba does: its
    responses to a CANCEL carry the CANCEL bit too."""
    word = message[16] & FLAGS_SERVER_TO_REDIR
    if message[12] == CANCEL and message[13] == 0:
        word |= 2
    return word


class Cipher:
    """Encrypts requests into transform messages and decrypts the server's (3.1.4.3)."""

    def __init__(self, cipher: int, encryption_key: bytes, decryption_key: bytes) -> None:
        self.cipher = cipher
        gcm = cipher in (AES_128_GCM, AES_256_GCM)
        self._aead_out: AESGCM | AESCCM = (AESGCM if gcm else AESCCM)(encryption_key)
        self._aead_in: AESGCM | AESCCM = (AESGCM if gcm else AESCCM)(decryption_key)
        self._nonce_size = 12 if gcm else 11
        # A random prefix and a counter: never the same nonce twice under one key.
        self._prefix = os.urandom(self._nonce_size - 8)
        self._counter = 0

    @property
    def name(self) -> str:
        return CIPHER_NAMES[self.cipher]

    def encrypt(
        self, message: bytes | bytearray | memoryview, session_id: int
    ) -> list[bytes | bytearray | memoryview]:
        """``message`` (one or a compound chain) as a transform message, framed for the
        wire: the NetBIOS and transform headers, then the ciphertext."""
        self._counter += 1
        nonce = self._prefix + self._counter.to_bytes(8, "little")
        padded = nonce + bytes(16 - len(nonce))
        header = TRANSFORM.pack(PROTOCOL_TRANSFORM, ZERO_SIGNATURE, padded, len(message), 0,
                                TRANSFORM_FLAG_ENCRYPTED, session_id)
        sealed = self._aead_out.encrypt(nonce, message, header[TRANSFORM_AAD_START:])
        tag = sealed[-16:]
        # The ciphertext is sent from a view: no copy of a large WRITE.
        head = b"".join((
            (TRANSFORM_SIZE + len(message)).to_bytes(4, "big"),
            PROTOCOL_TRANSFORM, tag, header[TRANSFORM_AAD_START:],
        ))
        return [head, memoryview(sealed)[:-16]]

    def decrypt(self, message: bytes, session_id: int) -> bytes:
        """The plaintext of a transform message; ProtocolError if it is not authentic."""
        if len(message) < TRANSFORM_SIZE:
            raise ProtocolError("a truncated SMB2 TRANSFORM_HEADER")
        (_proto, tag, nonce, size, _r, flags, sid) = TRANSFORM.unpack_from(message)
        if flags != TRANSFORM_FLAG_ENCRYPTED or sid != session_id:
            raise ProtocolError(
                f"an encrypted message for session {sid:#x} (flags {flags:#x}); "
                f"this is session {session_id:#x}"
            )
        if size != len(message) - TRANSFORM_SIZE:
            raise ProtocolError(
                f"an encrypted message says {size} bytes but carries "
                f"{len(message) - TRANSFORM_SIZE}"
            )
        body = memoryview(message)[TRANSFORM_SIZE:]
        try:
            return self._aead_in.decrypt(
                nonce[: self._nonce_size], b"".join((body, tag)),
                memoryview(message)[TRANSFORM_AAD_START:TRANSFORM_SIZE],
            )
        except InvalidTag:
            raise ProtocolError("an encrypted message failed authentication") from None


class PreauthHash:
    """The SMB 3.1.1 pre-authentication integrity hash (SHA-512, MS-SMB2 3.2.5.2)."""

    def __init__(self, value: bytes = bytes(64)) -> None:
        self.value = value

    def update(self, message: bytes | memoryview) -> None:
        self.value = hashlib.sha512(self.value + bytes(message)).digest()

    def copy(self) -> PreauthHash:
        return PreauthHash(self.value)
