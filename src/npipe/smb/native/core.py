"""The client side of one SMB2/3 connection as a state machine (sans-I/O).

It turns requests into bytes to send and received bytes into :class:`Response` objects,
and keeps the state that lies between: message ids, credits, the dialect, the preauth
integrity hash, the session's keys, which responses must be signed or encrypted. It
never touches a socket; :mod:`npipe.smb.native.connection` drives it with asyncio, and the
tests drive it with bytes.

One connection carries one session (npipe opens one connection per host and identity).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from npipe.errors import NegotiationTampered
from npipe.smb.native import wire
from npipe.smb.native.crypto import Cipher, PreauthHash, SessionKeys, Signer
from npipe.smb.native.negotiate import (
    DEFAULT_CIPHERS,
    DEFAULT_SIGNING,
    DIALECTS,
    SMB_3_0,
    SMB_3_1_1,
    Negotiated,
    client_capabilities,
    client_security_mode,
    negotiate_request,
    negotiation_mismatch,
    parse_negotiate,
    parse_validate_negotiate,
    validate_negotiate_input,
)
from npipe.smb.native.wire import ProtocolError

# What a server without FSCTL_VALIDATE_NEGOTIATE_INFO answers (signed) instead.
VALIDATE_UNSUPPORTED = (
    wire.STATUS_NOT_SUPPORTED, wire.STATUS_INVALID_DEVICE_REQUEST, wire.STATUS_FILE_CLOSED,
)

# Keep about this many credits in hand: below it, each request asks for more.
CREDIT_TARGET = 512
CREDIT_ASK = 64
CREDIT_ASK_MAX = 256


@dataclass
class Options:
    """How the client negotiates. The defaults are npipe's security policy."""

    dialects: tuple[int, ...] = DIALECTS
    ciphers: tuple[int, ...] = DEFAULT_CIPHERS
    signing_algorithms: tuple[int, ...] = DEFAULT_SIGNING
    # Sign every message once a session exists. Only benchmarks turn this off (and only
    # a server that does not require signing on SMB 2.x then goes along).
    sign: bool = True
    # None: a fresh one for every connection. Samba hands a new connection with a
    # ClientGuid it knows to the smbd process that serves that client already (for
    # multichannel), so a connection reset to make smbd let go of a stuck pipe would
    # not end that process, nor the pipe. npipe does no multichannel: one client per
    # connection, as separate processes were.
    client_guid: bytes | None = None
    # Seconds after which a server that has sent nothing, while requests wait on it, is
    # taken for dead: every pipe on the connection then fails with ConnectionLost. An
    # SMB ECHO goes out halfway through such a silence, and TCP keepalive (the same
    # bound) watches connections with nothing outstanding. None: neither (a vanished
    # server is noticed only when TCP gives up, if ever).
    dead_peer_timeout: float | None = 30.0


@dataclass(slots=True)
class Response:
    """One response: its header and its own bytes (split out of a compound chain)."""

    header: wire.Header
    message: bytes
    encrypted: bool
    verified: bool  # False only for the final SESSION_SETUP before the keys exist

    @property
    def status(self) -> int:
        return self.header.status

    @property
    def command(self) -> int:
        return self.header.command


@dataclass(slots=True)
class Outgoing:
    """Request bytes ready for the wire (one frame), and the message ids inside."""

    message_ids: list[int]
    parts: list[bytes | bytearray | memoryview]

    @property
    def message_id(self) -> int:
        return self.message_ids[0]


class Smb2Client:
    """One connection's protocol state. Not thread-safe: one driver owns it."""

    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.client_guid = self.options.client_guid or os.urandom(16)
        self.framer = wire.Framer()
        self.negotiated: Negotiated | None = None
        self.next_message_id = 0
        self.credits = 1  # before NEGOTIATE the client may send exactly one request
        self.session_id = 0
        self.tree_id = 0
        self.signer: Signer | None = None
        self.cipher: Cipher | None = None
        self.encrypt = False  # every message of the session is encrypted
        self.sign = False  # every message of the session is signed
        self.keys: SessionKeys | None = None
        self._preauth = PreauthHash()
        self._session_preauth: PreauthHash | None = None
        self._negotiate_message: bytes | None = None
        # What the NEGOTIATE offered, for VALIDATE_NEGOTIATE_INFO to repeat:
        # capabilities, security mode, dialects.
        self._offered: tuple[int, int, tuple[int, ...]] = (0, 0, ())
        self._large_mtu = False

    # --- state --------------------------------------------------------------------------

    @property
    def dialect(self) -> int:
        return self.negotiated.dialect if self.negotiated else 0

    def charge(self, payload: int) -> int:
        """Credits a request moving ``payload`` bytes costs (MS-SMB2 3.1.5.2)."""
        if self.negotiated is None or not self.negotiated.large_mtu:
            return 1
        return 1 + max(0, payload - 1) // 65536

    def can_send(self, charge: int = 1) -> bool:
        return self.credits >= charge

    # --- negotiate and session setup ------------------------------------------------------

    def negotiate(self) -> Outgoing:
        opts = self.options
        body = negotiate_request(
            client_guid=self.client_guid,
            dialects=opts.dialects,
            signing_required=opts.sign,
            ciphers=opts.ciphers,
            signing_algorithms=opts.signing_algorithms,
        )
        self._offered = (
            client_capabilities(opts.ciphers), client_security_mode(opts.sign), opts.dialects
        )
        out = self._build([(wire.NEGOTIATE, body, 0, 0)], allow_sign=False)
        message = b"".join(out.parts)
        self._negotiate_message = message
        return Outgoing(out.message_ids, [wire.frame(message)])

    def negotiated_by(self, response: Response) -> Negotiated:
        """Take the NEGOTIATE response; the dialect, limits and algorithms are set."""
        if response.status != wire.STATUS_SUCCESS:
            raise ProtocolError(f"NEGOTIATE failed with NTSTATUS {response.status:#010x}")
        opts = self.options
        msg = response.message
        self.negotiated = parse_negotiate(
            msg, offered=opts.dialects, ciphers=opts.ciphers,
            signing_algorithms=opts.signing_algorithms,
        )
        self._large_mtu = self.negotiated.large_mtu
        if self.negotiated.dialect >= SMB_3_1_1:
            assert self._negotiate_message is not None
            self._preauth.update(self._negotiate_message)
            self._preauth.update(msg)
        self._negotiate_message = None
        return self.negotiated

    def session_setup(self, token: bytes) -> Outgoing:
        body = wire.session_setup_request(token, signing_required=self.options.sign)
        out = self._build([(wire.SESSION_SETUP, body, 0, 0)], allow_sign=False)
        if self.dialect >= SMB_3_1_1:
            if self._session_preauth is None:
                self._session_preauth = self._preauth.copy()
            self._session_preauth.update(b"".join(out.parts))
        return Outgoing(out.message_ids, [wire.frame(*out.parts)])

    def session_setup_continues(self, response: Response) -> bytes:
        """A MORE_PROCESSING_REQUIRED response: remember the session id, hash it; its token."""
        self.session_id = response.header.session_id
        if self._session_preauth is not None:
            self._session_preauth.update(response.message)
        return wire.parse_session_setup(response.message).token

    def session_established(self, response: Response, session_key: bytes) -> int:
        """The final SESSION_SETUP response: derive keys, verify it; its session flags."""
        self.session_id = response.header.session_id
        neg = self.negotiated
        assert neg is not None
        flags = wire.parse_session_setup(response.message).session_flags
        if flags & (wire.SESSION_FLAG_IS_GUEST | wire.SESSION_FLAG_IS_NULL):
            return flags  # no keys: the caller refuses such sessions
        preauth = self._session_preauth.value if self._session_preauth else None
        keys = SessionKeys(neg.dialect, session_key, preauth, neg.cipher)
        self.keys = keys
        self.signer = Signer(neg.signing_algorithm, keys.signing)
        if response.header.signed:
            if not self.signer.verify(response.message, response.header.message_id):
                if neg.dialect >= SMB_3_1_1:
                    # The keys hash every NEGOTIATE and SESSION_SETUP message as each
                    # side saw it (preauth integrity): the server saw other ones.
                    raise NegotiationTampered(
                        "the SESSION_SETUP response's signature does not match the "
                        "NEGOTIATE and SESSION_SETUP messages this client exchanged "
                        "(SMB 3.1.1 preauth integrity)"
                    )
                raise ProtocolError("the SESSION_SETUP response's signature is wrong")
        elif self.options.sign or neg.signing_required:
            raise ProtocolError("the final SESSION_SETUP response is not signed")
        if neg.cipher is not None and neg.dialect >= SMB_3_0:
            self.cipher = Cipher(neg.cipher, keys.encryption, keys.decryption)
        self.sign = self.options.sign or neg.signing_required
        if flags & wire.SESSION_FLAG_ENCRYPT_DATA:
            self.require_encryption()
        self._session_preauth = None
        return flags

    # --- validating the negotiation (3.0, 3.0.2) ---------------------------------------

    @property
    def needs_validation(self) -> bool:
        """Whether FSCTL_VALIDATE_NEGOTIATE_INFO must follow SESSION_SETUP: below 3.1.1
        (which has preauth integrity instead), on a signed session. MS-SMB2 asks it on
        3.0 and 3.0.2; on 2.x (only with allow_smb2) it catches a 3.x server talked
        down to 2.x, while a real 2.x server answers a signed "not supported"."""
        return self.dialect < SMB_3_1_1 and self.sign and self.signer is not None

    def validate_negotiate(self) -> bytes:
        """The FSCTL_VALIDATE_NEGOTIATE_INFO request (an IOCTL body) that repeats what
        this client's NEGOTIATE offered (MS-SMB2 3.2.5.3.1): send it on the IPC$ tree,
        signed or encrypted."""
        capabilities, security_mode, dialects = self._offered
        info = validate_negotiate_input(
            capabilities=capabilities,
            client_guid=self.client_guid,
            security_mode=security_mode,
            dialects=dialects,
        )
        return wire.ioctl_request(
            wire.FSCTL_VALIDATE_NEGOTIATE_INFO, wire.FILE_ID_RELATED, info, 24
        )

    def validated_by(self, response: Response) -> bool:
        """Check the server's answer (MS-SMB2 3.2.5.14.12): NegotiationTampered if the
        server negotiated something else than the NEGOTIATE response said; False if it
        does not implement the check (a signed refusal), True if all agrees."""
        neg = self.negotiated
        assert neg is not None
        if not (response.verified and (response.encrypted or response.header.signed)):
            raise NegotiationTampered(
                "the VALIDATE_NEGOTIATE_INFO answer is neither signed nor encrypted"
            )
        status = response.status
        if status == wire.STATUS_ACCESS_DENIED:
            raise NegotiationTampered(
                "the server refused VALIDATE_NEGOTIATE_INFO (it received another NEGOTIATE)"
            )
        if status in VALIDATE_UNSUPPORTED:
            return False
        if status != wire.STATUS_SUCCESS:
            raise NegotiationTampered(
                f"VALIDATE_NEGOTIATE_INFO failed with NTSTATUS {status:#010x}"
            )
        mismatch = negotiation_mismatch(
            neg, parse_validate_negotiate(wire.parse_ioctl(response.message))
        )
        if mismatch is not None:
            raise NegotiationTampered(mismatch)
        return True

    def require_encryption(self) -> None:
        """Encrypt every later message of the session (ours, and the server's too)."""
        if self.cipher is None:
            raise ProtocolError("encryption is required but no cipher was negotiated")
        self.encrypt = True

    # --- requests -------------------------------------------------------------------

    def request(
        self,
        command: int,
        body: bytes,
        *,
        payload: int = 0,
        tree: bool = True,
        data: bytes | memoryview | None = None,
    ) -> Outgoing:
        """One request on the session (and the IPC$ tree), framed for the wire.

        The hot path (every READ and WRITE): one header ``pack``, and ``data`` copied at
        most once (not at all when the message is neither signed nor encrypted).
        """
        charge = 1 if payload <= 65536 or not self._large_mtu else 1 + (payload - 1) // 65536
        credits = self.credits - charge
        if credits < 0:
            raise ProtocolError(f"{charge} credits needed, {self.credits} in hand")
        self.credits = credits
        mid = self.next_message_id
        self.next_message_id = mid + charge
        ask = charge + CREDIT_ASK if credits < CREDIT_TARGET else charge
        tail = b"" if data is None else data
        size = 64 + len(body) + len(tail)
        signer = self.signer
        if self.encrypt and self.cipher is not None:
            header = wire.HEADER.pack(
                wire.PROTOCOL_SMB2, 64, charge, 0, command, ask, 0, 0, mid, 0,
                self.tree_id if tree else 0, self.session_id, wire.ZERO_SIGNATURE,
            )
            parts = self.cipher.encrypt(b"".join((header, body, tail)), self.session_id)
        elif self.sign and signer is not None:
            header = wire.HEADER.pack(
                wire.PROTOCOL_SMB2, 64, charge, 0, command, ask, wire.FLAGS_SIGNED, 0, mid, 0,
                self.tree_id if tree else 0, self.session_id, wire.ZERO_SIGNATURE,
            )
            # One buffer for the frame: the signature is written into it in place.
            msg = bytearray(b"".join((size.to_bytes(4, "big"), header, body, tail)))
            signer.sign_at(msg, 4, mid)
            parts = [msg]
        else:
            header = wire.HEADER.pack(
                wire.PROTOCOL_SMB2, 64, charge, 0, command, ask, 0, 0, mid, 0,
                self.tree_id if tree else 0, self.session_id, wire.ZERO_SIGNATURE,
            )
            parts = [b"".join((size.to_bytes(4, "big"), header, body))]
            if tail:
                parts.append(tail)
        return Outgoing([mid], parts)

    def compound(self, requests: list[tuple[int, bytes, int]]) -> Outgoing:
        """Related requests in one frame: (command, body, payload) each; later ones act
        on the file the first one opens (MS-SMB2 3.2.4.1.4)."""
        items = [(cmd, body, self.charge(payload), self.tree_id) for cmd, body, payload in requests]
        return self._finish(self._build(items, related=True))

    def cancel(self, message_id: int, async_id: int | None) -> Outgoing:
        """CANCEL of a pending request: no credit, the request's own message id."""
        header = wire.pack_header(
            wire.CANCEL, message_id, credit_charge=0, credits=0,
            tree_id=self.tree_id, session_id=self.session_id, async_id=async_id,
        )
        msg = bytearray(header + wire.small_request())
        if self.sign and self.signer is not None and not self.encrypt:
            self.signer.sign(msg)
        return self._finish(Outgoing([], [bytes(msg)]))

    def _finish(self, out: Outgoing) -> Outgoing:
        if self.encrypt and self.cipher is not None:
            plain = b"".join(out.parts) if len(out.parts) > 1 else out.parts[0]
            return Outgoing(out.message_ids, self.cipher.encrypt(plain, self.session_id))
        size = sum(len(p) for p in out.parts)
        return Outgoing(out.message_ids, [size.to_bytes(4, "big"), *out.parts])

    def _build(
        self,
        items: list[tuple[int, bytes, int, int]],
        *,
        related: bool = False,
        allow_sign: bool = True,
    ) -> Outgoing:
        total = sum(max(1, charge) for _c, _b, charge, _t in items)
        if total > self.credits:
            raise ProtocolError(f"{total} credits needed, {self.credits} in hand")
        self.credits -= total
        sign = allow_sign and self.sign and self.signer is not None and not self.encrypt
        parts: list[bytes | bytearray | memoryview] = []
        ids = []
        for i, (command, body, charge, tree_id) in enumerate(items):
            mid = self.next_message_id
            self.next_message_id += max(1, charge)
            ids.append(mid)
            last = i == len(items) - 1
            size = wire.HEADER_SIZE + len(body)
            pad = 0 if last else (8 - size % 8) % 8
            ask = charge + max(0, min(CREDIT_ASK_MAX, CREDIT_TARGET - self.credits))
            flags = wire.FLAGS_RELATED_OPERATIONS if related and i else 0
            header = wire.pack_header(
                command, mid, credit_charge=charge, credits=ask, flags=flags,
                next_command=0 if last else size + pad, tree_id=tree_id,
                session_id=self.session_id,
            )
            if sign:
                msg = bytearray(header)
                msg += body
                msg += bytes(pad)
                assert self.signer is not None
                self.signer.sign(msg)
                parts.append(bytes(msg))
            else:
                parts.append(header + body + bytes(pad))
        return Outgoing(ids, parts)

    # --- responses -----------------------------------------------------------------

    def receive(self, data: bytes) -> list[Response]:
        """Responses in ``data`` (plus what earlier calls left); ProtocolError if the
        server's bytes are malformed or not authentic: the connection cannot go on."""
        responses: list[Response] = []
        for message in self.framer.feed(data):
            self._unpack(message, responses)
        return responses

    def _unpack(self, message: bytes, out: list[Response]) -> None:
        proto = message[:4]
        encrypted = False
        if proto == wire.PROTOCOL_TRANSFORM:
            if self.cipher is None:
                raise ProtocolError("an encrypted message on a connection without a cipher")
            message = self.cipher.decrypt(message, self.session_id)
            encrypted = True
        elif proto != wire.PROTOCOL_SMB2:
            if proto == wire.PROTOCOL_COMPRESSED:
                raise ProtocolError("a compressed message, though compression was not offered")
            raise ProtocolError(f"not an SMB2 message: {message[:8].hex()}")
        at = 0
        size = len(message)
        while True:
            header = wire.parse_header(message, at)
            next_command = header.next_command
            if next_command:
                end = at + next_command
                if next_command % 8 or end > size - wire.HEADER_SIZE:
                    raise ProtocolError(f"a bad NextCommand {next_command}")
                chunk = message[at:end]
            else:
                end = size
                chunk = message if at == 0 else message[at:]
            if encrypted:
                verified = True
            elif (self.sign and header.signed and header.session_id == self.session_id
                  and self.signer is not None and not self.encrypt):
                # The usual case on a signed session, checked first.
                if not self.signer.verify(chunk, header.message_id):
                    raise ProtocolError(
                        f"a {wire.COMMAND_NAMES.get(header.command, header.command)} response "
                        "with a wrong signature"
                    )
                verified = True
            else:
                verified = self._check(header, chunk)
            self.credits += header.credits
            out.append(Response(header, chunk, encrypted, verified))
            if not next_command:
                return
            at = end

    def _check(self, header: wire.Header, message: bytes) -> bool:
        """Whether an unencrypted response is authentic; ProtocolError if it must be and
        is not."""
        if self.encrypt and header.session_id == self.session_id:
            raise ProtocolError(
                f"an unencrypted {wire.COMMAND_NAMES.get(header.command, header.command)} "
                "response on an encrypted session"
            )
        if self.signer is None or not self.sign or header.session_id != self.session_id:
            # Before the session's keys: NEGOTIATE, SESSION_SETUP. The final one is
            # verified by session_established() once the keys are derived.
            if header.command in (wire.NEGOTIATE, wire.SESSION_SETUP) or not self.sign:
                return header.command != wire.SESSION_SETUP or header.status != 0
            raise ProtocolError(
                f"a response for session {header.session_id:#x}, not ours ({self.session_id:#x})"
            )
        if header.status == wire.STATUS_PENDING and header.is_async:
            return True  # interim responses are not signed (MS-SMB2 3.3.4.1.1)
        if not header.signed:
            raise ProtocolError(
                f"an unsigned {wire.COMMAND_NAMES.get(header.command, header.command)} response "
                f"(NTSTATUS {header.status:#010x}) on a signed session"
            )
        if not self.signer.verify(message, header.message_id):
            raise ProtocolError(
                f"a {wire.COMMAND_NAMES.get(header.command, header.command)} response with a "
                "wrong signature"
            )
        return True
