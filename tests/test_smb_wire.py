"""The native SMB client's sans-I/O core, with no server: bytes in, bytes out.

Layouts and cryptography are checked against smbprotocol, an independent
implementation: every request body ours build carries its own command's StructureSize
(from MS-SMB2) and is the bytes smbprotocol packs from the same fields, and its key
derivation, signatures and transform encryption agree with ours byte for byte. Garbage from a
server must end in ProtocolError, never in another exception.
"""

from __future__ import annotations

import os
import struct
import uuid
from re import escape as re_escape

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smbprotocol.connection import (
    Connection,
    SMB2CancelRequest,
    SMB2Echo,
    SMB2TransformHeader,
    SMB3NegotiateRequest,
)
from smbprotocol.header import SMB2HeaderRequest
from smbprotocol.ioctl import (
    SMB2IOCTLRequest,
    SMB2ValidateNegotiateInfoRequest,
    SMB2ValidateNegotiateInfoResponse,
)
from smbprotocol.open import SMB2CloseRequest, SMB2CreateRequest, SMB2ReadRequest, SMB2WriteRequest
from smbprotocol.session import Session, SMB2Logoff, SMB2SessionSetupRequest
from smbprotocol.structure import Structure
from smbprotocol.tree import SMB2TreeConnectRequest, SMB2TreeDisconnect

from npipe.errors import NegotiationTampered
from npipe.smb.native import crypto, wire
from npipe.smb.native.core import Options, Response, Smb2Client
from npipe.smb.native.negotiate import (
    SMB_2_1,
    SMB_3_0,
    SMB_3_0_2,
    SMB_3_1_1,
    Negotiated,
    parse_negotiate,
    parse_validate_negotiate,
    validate_negotiate_input,
)

FILE_ID = bytes(range(16))


def _unframe(parts: list[bytes | bytearray | memoryview]) -> bytes:
    data = b"".join(bytes(p) for p in parts)
    size = int.from_bytes(data[:4], "big")
    assert data[0] == 0 and size == len(data) - 4
    return data[4:]


def _client(dialect: int = SMB_3_1_1, *, signing: int = crypto.AES_GMAC,
            cipher: int | None = crypto.AES_128_GCM, key: bytes = b"k" * 16) -> Smb2Client:
    core = Smb2Client()
    core.negotiated = Negotiated(dialect, 1, 0x44, 1 << 20, 1 << 20, 1 << 20, b"", cipher, signing)
    core._large_mtu = True
    core.credits = 100
    core.session_id = 0x1122334455667788
    core.tree_id = 5
    core.signer = crypto.Signer(signing, key)
    core.sign = True
    if cipher is not None:
        core.cipher = crypto.Cipher(cipher, key, key)
    return core


# --- requests, as smbprotocol reads them -------------------------------------------


# Each request's StructureSize as MS-SMB2 2.2 gives it (the size of the fixed part, plus
# one when a variable buffer follows), written out here and not taken from the code under
# test. These are every request the native client builds; it sends no FLUSH (24), LOCK
# (48), QUERY_DIRECTORY (33), CHANGE_NOTIFY (32), QUERY_INFO (41), SET_INFO (33) or
# OPLOCK_BREAK acknowledgment (24).
SPEC_STRUCTURE_SIZE = {
    wire.NEGOTIATE: 36,  # 2.2.3
    wire.SESSION_SETUP: 25,  # 2.2.5
    wire.LOGOFF: 4,  # 2.2.7
    wire.TREE_CONNECT: 9,  # 2.2.9
    wire.TREE_DISCONNECT: 4,  # 2.2.11
    wire.CREATE: 57,  # 2.2.13
    wire.CLOSE: 24,  # 2.2.15
    wire.READ: 49,  # 2.2.19
    wire.WRITE: 49,  # 2.2.21
    wire.ECHO: 4,  # 2.2.28
    wire.CANCEL: 4,  # 2.2.30
    wire.IOCTL: 57,  # 2.2.31
}


def _theirs(structure: Structure, **fields: object) -> Structure:
    for name, value in fields.items():
        structure[name] = value
    return structure


def _request_twins() -> list[tuple[str, int, bytes, Structure]]:
    """(name, command, our body, smbprotocol's structure with the same fields) for every
    request body the native client builds."""
    tree = "\\\\h\\IPC$"
    pipe = wire.PIPE_ACCESS
    return [
        ("session_setup", wire.SESSION_SETUP,
         wire.session_setup_request(b"tok", signing_required=True),
         _theirs(SMB2SessionSetupRequest(), security_mode=2, buffer=b"tok")),
        ("tree_connect", wire.TREE_CONNECT, wire.tree_connect_request(tree),
         _theirs(SMB2TreeConnectRequest(), buffer=tree.encode("utf-16-le"))),
        ("create", wire.CREATE, wire.create_request("shop"),
         _theirs(SMB2CreateRequest(), impersonation_level=2, desired_access=pipe,
                 share_access=3, create_disposition=1, create_options=0x40,
                 buffer_path="shop".encode("utf-16-le"))),
        ("read", wire.READ, wire.read_request(FILE_ID, 65536, 7),
         _theirs(SMB2ReadRequest(), padding=0x50, length=65536, file_id=FILE_ID,
                 minimum_count=7)),
        ("write", wire.WRITE, wire.write_request_head(FILE_ID, 3) + b"abc",
         _theirs(SMB2WriteRequest(), file_id=FILE_ID, buffer=b"abc")),
        ("ioctl_transceive", wire.IOCTL,
         wire.ioctl_request(wire.FSCTL_PIPE_TRANSCEIVE, FILE_ID, b"in", 4096),
         # smbprotocol points OutputOffset at the buffer; we send 0 with OutputCount 0
         _theirs(SMB2IOCTLRequest(), ctl_code=wire.FSCTL_PIPE_TRANSCEIVE, file_id=FILE_ID,
                 buffer=b"in", max_output_response=4096, flags=1, output_offset=0)),
        ("ioctl_peek", wire.IOCTL, wire.ioctl_request(wire.FSCTL_PIPE_PEEK, FILE_ID, b"", 24),
         _theirs(SMB2IOCTLRequest(), ctl_code=wire.FSCTL_PIPE_PEEK, file_id=FILE_ID,
                 max_output_response=24, flags=1)),
        ("close", wire.CLOSE, wire.close_request(FILE_ID),
         _theirs(SMB2CloseRequest(), file_id=FILE_ID)),
        ("echo", wire.ECHO, wire.small_request(), SMB2Echo()),
        ("logoff", wire.LOGOFF, wire.small_request(), SMB2Logoff()),
        ("tree_disconnect", wire.TREE_DISCONNECT, wire.small_request(), SMB2TreeDisconnect()),
    ]


@pytest.mark.parametrize(("command", "ours", "theirs"),
                         [pytest.param(*t[1:], id=t[0]) for t in _request_twins()])
def test_request_bodies_match_smbprotocol_byte_for_byte(command: int, ours: bytes,
                                                         theirs: Structure) -> None:
    """Each body's StructureSize is its own command's (MS-SMB2), smbprotocol's structure
    says the same, and smbprotocol packs the same fields into the same bytes."""
    expected = SPEC_STRUCTURE_SIZE[command]
    assert struct.unpack_from("<H", ours) == (expected,)
    assert theirs["structure_size"].get_value() == expected
    assert ours == theirs.pack()
    # The fixed part is StructureSize rounded down to even; a variable buffer follows it.
    fixed = expected & ~1
    assert len(ours) >= fixed and (expected & 1 or len(ours) == fixed)


def test_each_connection_has_its_own_client_guid() -> None:
    """A fresh ClientGuid per connection (per core), even with one Options: Samba gives
    a connection with a ClientGuid it knows to the smbd process that already serves it,
    so resetting one connection would not end that process nor a pipe it holds
    (test_connection_cross_host's vanished client). An explicit one is kept."""
    def guid(core: Smb2Client) -> bytes:
        theirs = SMB3NegotiateRequest()
        theirs.unpack(_unframe(core.negotiate().parts)[64:])
        return uuid.UUID(str(theirs["client_guid"].get_value())).bytes

    shared = Options()
    a, b = Smb2Client(shared), Smb2Client(shared)
    assert guid(a) == a.client_guid != b.client_guid == guid(b)
    fixed = uuid.UUID(int=7).bytes
    assert guid(Smb2Client(Options(client_guid=fixed))) == fixed


def test_negotiate_and_cancel_structure_sizes() -> None:
    negotiate = _unframe(Smb2Client(Options(client_guid=uuid.UUID(int=7).bytes))
                         .negotiate().parts)[64:]
    theirs = SMB3NegotiateRequest()
    theirs.unpack(negotiate)
    assert struct.unpack_from("<H", negotiate) == (SPEC_STRUCTURE_SIZE[wire.NEGOTIATE],)
    assert theirs["structure_size"].get_value() == SMB3NegotiateRequest()[
        "structure_size"].get_value() == 36
    assert struct.unpack_from("<H", negotiate, 36) == (0x0202,)  # the dialects at 64 + 36
    cancel = _unframe(_client(cipher=None).cancel(3, 99).parts)
    assert cancel[12] == wire.CANCEL
    assert cancel[64:] == SMB2CancelRequest().pack() == struct.pack(
        "<HH", SPEC_STRUCTURE_SIZE[wire.CANCEL], 0)


def test_requests_parse_as_smbprotocol_structures() -> None:
    core = _client()
    core.sign = False
    for _name, command, body, _theirs_structure in _request_twins():
        message = _unframe(core.request(command, body).parts)
        header = SMB2HeaderRequest()
        header.unpack(message)
        rest = message[64:]
        assert header["command"].get_value() == command
        assert header["session_id"].get_value() == core.session_id
        assert header["tree_id"].get_value() == core.tree_id
        assert rest == body
        assert struct.unpack_from("<H", rest) == (SPEC_STRUCTURE_SIZE[command],)
    create = SMB2CreateRequest()
    create.unpack(wire.create_request("shop") + b"\0" * 8)
    assert create["buffer_path"].get_value().decode("utf-16-le") == "shop"
    assert create["create_disposition"].get_value() == 1
    read = SMB2ReadRequest()
    read.unpack(wire.read_request(FILE_ID, 4096))
    assert read["length"].get_value() == 4096 and read["file_id"].get_value() == FILE_ID
    ioctl = SMB2IOCTLRequest()
    ioctl.unpack(wire.ioctl_request(wire.FSCTL_PIPE_TRANSCEIVE, FILE_ID, b"in", 4096))
    assert ioctl["ctl_code"].get_value() == wire.FSCTL_PIPE_TRANSCEIVE
    assert ioctl["buffer"].get_value() == b"in" and ioctl["max_output_response"].get_value() == 4096


def test_write_carries_its_data_after_the_body() -> None:
    core = _client()
    core.sign = False
    data = os.urandom(1000)
    out = core.request(wire.WRITE, wire.write_request_head(FILE_ID, len(data)), payload=len(data),
                       data=data)
    message = _unframe(out.parts)
    write = SMB2WriteRequest()
    write.unpack(message[64:])
    assert write["length"].get_value() == 1000 and write["buffer"].get_value() == data


def test_negotiate_request_offers_every_dialect_and_the_311_contexts() -> None:
    core = Smb2Client(Options(client_guid=uuid.UUID(int=7).bytes))
    message = _unframe(core.negotiate().parts)
    request = SMB3NegotiateRequest()
    request.unpack(message[64:])
    assert [d for d in request["dialects"].get_value()] == [0x202, 0x210, 0x300, 0x302, 0x311]
    listed = request["negotiate_context_list"].get_value()
    contexts = {c["context_type"].get_value(): c for c in listed}
    assert set(contexts) == {1, 2, 8}  # preauth integrity, encryption, signing
    ciphers = contexts[2]["data"].get_value()["ciphers"].get_value()
    assert ciphers[0] == crypto.AES_128_GCM  # GCM first: cheap with AES-NI


def test_credit_charge_and_message_ids() -> None:
    core = _client()
    first = core.request(wire.READ, wire.read_request(FILE_ID, 65536)).message_id
    big = core.request(wire.WRITE, wire.write_request_head(FILE_ID, 1 << 20), payload=1 << 20,
                       data=bytes(1 << 20)).message_id
    after = core.request(wire.ECHO, wire.small_request()).message_id
    assert (first, big, after) == (0, 1, 17)  # 1 MiB costs 16 credits and 16 message ids
    assert core.credits == 100 - 18
    with pytest.raises(wire.ProtocolError, match="credits"):
        core.request(wire.WRITE, b"", payload=100 << 20)


# --- cryptography, against smbprotocol ------------------------------------------------


@pytest.mark.parametrize("bits", [128, 256])
def test_kdf_matches_smbprotocol(bits: int) -> None:
    key = os.urandom(32)
    context = os.urandom(64)
    ours = crypto.kdf(key, b"SMBSigningKey\x00", context, bits)
    theirs = Session._smb3kdf(None, key, b"SMBSigningKey\x00", context, bits // 8)
    assert ours == theirs


def _smbprotocol_connection(dialect: int, signing: int | None, cipher: int | None) -> Connection:
    conn = Connection(uuid.uuid4(), "h", 445)
    conn.dialect = dialect
    conn.signing_algorithm_id = signing
    conn.cipher_id = cipher
    return conn


@pytest.mark.parametrize(("dialect", "signing"), [
    (SMB_2_1, crypto.HMAC_SHA256), (SMB_3_0_2, crypto.AES_CMAC),
    (SMB_3_1_1, crypto.AES_CMAC), (SMB_3_1_1, crypto.AES_GMAC),
])
def test_signatures_match_smbprotocol(dialect: int, signing: int) -> None:
    key = os.urandom(16)
    core = _client(dialect, signing=signing, cipher=None, key=key)
    conn = _smbprotocol_connection(dialect, signing, None)
    for command in (wire.READ, wire.ECHO):
        message = _unframe(core.request(command, wire.small_request()).parts)
        mid = struct.unpack_from("<Q", message, 24)[0]
        expected = conn._generate_signature(message, key, mid, False, command)
        assert message[48:64] == expected
    cancel = _unframe(core.cancel(3, 99).parts)
    assert cancel[48:64] == conn._generate_signature(cancel, key, 3, False, wire.CANCEL)
    # A response signed by smbprotocol's rules verifies with ours, and a flipped bit fails.
    response = bytearray(_response(wire.CLOSE, 9, b"\x3c\x00" + bytes(58), signed=True))
    response[48:64] = conn._generate_signature(bytes(response), key, 9, True, wire.CLOSE)
    assert core.signer is not None and core.signer.verify(bytes(response), 9)
    response[70] ^= 1
    assert not core.signer.verify(bytes(response), 9)


@pytest.mark.parametrize("cipher", [crypto.AES_128_CCM, crypto.AES_128_GCM, crypto.AES_256_CCM,
                                    crypto.AES_256_GCM])
def test_encryption_interoperates_with_smbprotocol(cipher: int) -> None:
    size = 32 if cipher in (crypto.AES_256_CCM, crypto.AES_256_GCM) else 16
    key = os.urandom(size)
    ours = crypto.Cipher(cipher, key, key)
    conn = _smbprotocol_connection(SMB_3_1_1, None, cipher)

    class _Session:
        decryption_key = key
        encryption_key = key
        session_id = 0x42

    conn.session_table = {0x42: _Session()}
    plain = os.urandom(300)
    sealed = _unframe(ours.encrypt(plain, 0x42))
    header = SMB2TransformHeader()
    header.unpack(sealed)
    assert conn._decrypt(header) == plain
    theirs = conn._encrypt(plain, _Session()).pack()
    assert ours.decrypt(theirs, 0x42) == plain
    tampered = bytearray(theirs)
    tampered[-1] ^= 1
    with pytest.raises(wire.ProtocolError, match="authentication"):
        ours.decrypt(bytes(tampered), 0x42)
    with pytest.raises(wire.ProtocolError, match="session"):
        ours.decrypt(theirs, 0x43)


def test_encryption_nonces_never_repeat() -> None:
    cipher = crypto.Cipher(crypto.AES_128_GCM, b"k" * 16, b"k" * 16)
    nonces = {_unframe(cipher.encrypt(b"x", 1))[20:36] for _ in range(1000)}
    assert len(nonces) == 1000


# --- responses: what the state machine accepts and refuses ------------------------------


def _response(command: int, mid: int, body: bytes, *, status: int = 0, signed: bool = False,
              session_id: int = 0x1122334455667788, credits: int = 1,
              next_command: int = 0, flags: int = 0) -> bytes:
    flags |= wire.FLAGS_SERVER_TO_REDIR | (wire.FLAGS_SIGNED if signed else 0)
    header = wire.HEADER.pack(wire.PROTOCOL_SMB2, 64, 1, status, command, credits, flags,
                              next_command, mid, 0, 5, session_id, bytes(16))
    return header + body


def _sign(core: Smb2Client, message: bytes) -> bytes:
    buf = bytearray(message)
    assert core.signer is not None
    core.signer.sign(buf)
    return bytes(buf)


def _framed(message: bytes) -> bytes:
    return len(message).to_bytes(4, "big") + message


def test_signed_session_accepts_signed_and_refuses_forged_or_unsigned() -> None:
    core = _client(cipher=None)
    close = b"\x3c\x00" + bytes(58)
    good = _sign(core, _response(wire.CLOSE, 1, close))
    [response] = core.receive(_framed(good))
    assert response.verified and response.command == wire.CLOSE and core.credits == 101
    forged = bytearray(good)
    forged[66] ^= 0xFF
    with pytest.raises(wire.ProtocolError, match="wrong signature"):
        core.receive(_framed(bytes(forged)))
    with pytest.raises(wire.ProtocolError, match="unsigned"):
        Smb2Client.receive(_client(cipher=None), _framed(_response(wire.CLOSE, 1, close)))


def test_interim_responses_need_no_signature() -> None:
    core = _client(cipher=None)
    interim = _response(wire.READ, 4, b"\x09\x00" + bytes(7), status=wire.STATUS_PENDING,
                        flags=wire.FLAGS_ASYNC_COMMAND)
    [response] = core.receive(_framed(interim))
    assert response.header.is_async and response.status == wire.STATUS_PENDING


def test_encrypted_session_refuses_plain_responses() -> None:
    core = _client()
    core.encrypt = True
    with pytest.raises(wire.ProtocolError, match="unencrypted"):
        core.receive(_framed(_sign(core, _response(wire.CLOSE, 1, b"\x3c\x00" + bytes(58)))))
    assert core.cipher is not None
    sealed = _unframe(core.cipher.encrypt(_response(wire.ECHO, 2, b"\x04\x00\x00\x00"),
                                          core.session_id))
    [response] = core.receive(_framed(sealed))
    assert response.encrypted and response.command == wire.ECHO


def test_compound_responses_are_split_and_each_verified() -> None:
    core = _client(cipher=None)
    first = _response(wire.CREATE, 1, bytes(89), next_command=160)
    first = _sign(core, first + bytes(160 - len(first)))
    read = struct.pack("<HBBIII", 17, 80, 0, 4, 0, 0) + b"data"
    second = _sign(core, _response(wire.READ, 2, read))
    responses = core.receive(_framed(first + second))
    assert [r.command for r in responses] == [wire.CREATE, wire.READ]
    assert wire.parse_read(responses[1].message) == b"data"
    bad = _response(wire.CREATE, 1, bytes(89), next_command=12)  # not 8-aligned
    with pytest.raises(wire.ProtocolError, match="NextCommand"):
        _client(cipher=None).receive(_framed(_sign(core, bad) + second))


def test_read_response_bounds_are_checked() -> None:
    liar = _response(wire.READ, 1, struct.pack("<HBBIII", 17, 80, 0, 1000, 0, 0) + b"short")
    with pytest.raises(wire.ProtocolError, match="outside"):
        wire.parse_read(liar)
    with pytest.raises(wire.ProtocolError, match="truncated"):
        wire.parse_create(_response(wire.CREATE, 1, bytes(10)))


def test_negotiate_response_must_choose_what_was_offered() -> None:
    body = struct.pack("<HHHH16sIIIIQQHHI", 65, 1, 0x0311, 0, bytes(16), 0x44, 1 << 20, 1 << 20,
                       1 << 20, 0, 0, 0, 0, 0)
    with pytest.raises(wire.ProtocolError, match="not offered"):
        parse_negotiate(_response(wire.NEGOTIATE, 0, body), offered=(0x0202, 0x0210))
    with pytest.raises(wire.ProtocolError, match="preauth"):
        parse_negotiate(_response(wire.NEGOTIATE, 0, body))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_garbage_from_the_server_is_only_ever_a_protocol_error(junk: bytes, step: int) -> None:
    """Random bytes, or a real header followed by random bytes, in random chunks."""
    for payload in (junk, _framed(_response(wire.READ, 1, junk)), _framed(b"\xfdSMB" + junk),
                    _framed(b"\xfeSMB" + junk)):
        core = _client()
        try:
            for i in range(0, len(payload), step):
                for response in core.receive(payload[i : i + step]):
                    wire.parse_read(response.message)
        except wire.ProtocolError:
            pass


def test_framer_reassembles_split_frames_and_refuses_bad_ones() -> None:
    frames = [os.urandom(n) for n in (1, 100, 70000, 3)]
    stream = b"".join(_framed(f) for f in frames)
    for step in (1, 7, 4096, len(stream)):
        framer = wire.Framer()
        got: list[bytes] = []
        for i in range(0, len(stream), step):
            got += framer.feed(stream[i : i + step])
        assert got == frames and framer.pending == 0
    with pytest.raises(wire.ProtocolError, match="NetBIOS"):
        wire.Framer().feed(b"\x85\x00\x00\x00")
    with pytest.raises(wire.ProtocolError, match="larger"):
        wire.Framer(max_frame=1000).feed(b"\x00\x01\x00\x00")


def test_session_keys_follow_the_dialect() -> None:
    key = os.urandom(16)
    preauth = os.urandom(64)
    old = crypto.SessionKeys(SMB_2_1, key, None, None)
    assert old.signing == key
    v30 = crypto.SessionKeys(0x0300, key, None, crypto.AES_128_CCM)
    assert v30.signing == Session._smb3kdf(None, key, b"SMB2AESCMAC\x00", b"SmbSign\x00")
    assert v30.encryption == Session._smb3kdf(None, key, b"SMB2AESCCM\x00", b"ServerIn \x00")
    full = key + os.urandom(16)  # Kerberos gives 32 bytes; AES-256 keys use them all
    v311 = crypto.SessionKeys(SMB_3_1_1, full, preauth, crypto.AES_256_GCM)
    assert v311.signing == Session._smb3kdf(None, key, b"SMBSigningKey\x00", preauth)
    assert v311.decryption == Session._smb3kdf(None, full, b"SMBS2CCipherKey\x00", preauth, 32)
    assert v311.encryption == Session._smb3kdf(None, full, b"SMBC2SCipherKey\x00", preauth, 32)


def test_response_type() -> None:
    response = Response(wire.parse_header(_response(wire.ECHO, 3, b"\x04\x00\x00\x00")),
                        _response(wire.ECHO, 3, b"\x04\x00\x00\x00"), False, True)
    assert response.status == 0 and response.command == wire.ECHO


def test_pipe_peek_answer() -> None:
    peek = wire.parse_pipe_peek(struct.pack("<IIII", 3, 5, 0, 0) + b"hello")
    assert (peek.state, peek.available, peek.data) == (3, 5, b"hello")
    with pytest.raises(wire.ProtocolError, match="truncated"):
        wire.parse_pipe_peek(b"\x03\x00")


# --- FSCTL_VALIDATE_NEGOTIATE_INFO ------------------------------------------------------

CLIENT_GUID = uuid.UUID(int=7).bytes
SERVER_GUID = uuid.UUID(int=9).bytes


def _negotiated_client(dialect: int = SMB_3_0_2, *, sign: bool = True) -> Smb2Client:
    """A client that sent its NEGOTIATE and has a signed session on the IPC$ tree."""
    core = Smb2Client(Options(client_guid=CLIENT_GUID, sign=sign))
    core.negotiate()
    core.negotiated = Negotiated(dialect, 0x01, 0x47, 1 << 20, 1 << 20, 1 << 20, b"",
                                 crypto.AES_128_CCM, crypto.AES_CMAC, SERVER_GUID)
    core.credits = 100
    core.session_id = 0x1122334455667788
    core.tree_id = 5
    core.signer = crypto.Signer(crypto.AES_CMAC, b"k" * 16)
    core.sign = True
    return core


def test_validate_negotiate_input_matches_smbprotocol() -> None:
    dialects = (0x0202, 0x0210, 0x0300, 0x0302, 0x0311)
    ours = validate_negotiate_input(capabilities=0x44, client_guid=CLIENT_GUID,
                                    security_mode=2, dialects=dialects)
    theirs = SMB2ValidateNegotiateInfoRequest()
    theirs["capabilities"] = 0x44
    theirs["guid"] = uuid.UUID(bytes=CLIENT_GUID)
    theirs["security_mode"] = 2
    theirs["dialects"] = list(dialects)
    assert ours == theirs.pack()
    assert len(ours) == 24 + 2 * len(dialects)


@pytest.mark.parametrize("sign", [True, False])
def test_validate_negotiate_repeats_what_the_negotiate_offered(sign: bool) -> None:
    core = _negotiated_client(sign=sign)
    core.options.sign = True  # the driver insists on signing after NEGOTIATE on 3.x
    assert core.needs_validation
    message = _unframe(core.request(wire.IOCTL, core.validate_negotiate()).parts)
    assert struct.unpack_from("<I", message, 16)[0] & wire.FLAGS_SIGNED
    ioctl = SMB2IOCTLRequest()
    ioctl.unpack(message[64:])
    assert ioctl["ctl_code"].get_value() == wire.FSCTL_VALIDATE_NEGOTIATE_INFO == 0x00140204
    assert ioctl["file_id"].get_value() == b"\xff" * 16
    assert ioctl["max_output_response"].get_value() == 24
    assert ioctl["flags"].get_value() == wire.IOCTL_IS_FSCTL
    info = SMB2ValidateNegotiateInfoRequest()
    info.unpack(ioctl["buffer"].get_value())
    assert info["capabilities"].get_value() == 0x44  # LARGE_MTU | ENCRYPTION, as offered
    assert info["guid"].get_value() == uuid.UUID(bytes=CLIENT_GUID)
    assert info["security_mode"].get_value() == (2 if sign else 1)  # as in the NEGOTIATE
    assert info["dialects"].get_value() == [0x202, 0x210, 0x300, 0x302, 0x311]


def test_validation_is_for_signed_sessions_below_311() -> None:
    assert _negotiated_client(SMB_3_0).needs_validation
    assert _negotiated_client(SMB_2_1).needs_validation  # a 3.x server talked down to 2.1
    assert not _negotiated_client(SMB_3_1_1).needs_validation  # preauth integrity instead
    unsigned = _negotiated_client(SMB_2_1)
    unsigned.sign = False
    assert not unsigned.needs_validation


def test_parse_validate_negotiate_matches_smbprotocol() -> None:
    theirs = SMB2ValidateNegotiateInfoResponse()
    theirs["capabilities"] = 0x47
    theirs["guid"] = uuid.UUID(bytes=SERVER_GUID)
    theirs["security_mode"] = 1
    theirs["dialect"] = 0x0302
    got = parse_validate_negotiate(theirs.pack())
    assert (got.capabilities, got.server_guid, got.security_mode, got.dialect) == (
        0x47, SERVER_GUID, 1, 0x0302)
    with pytest.raises(wire.ProtocolError, match="truncated"):
        parse_validate_negotiate(theirs.pack()[:23])


def _validate_answer(core: Smb2Client, output: bytes, *, status: int = 0,
                     signed: bool = True) -> Response:
    body = wire.IOCTL_RESP.pack(49, 0, wire.FSCTL_VALIDATE_NEGOTIATE_INFO, b"\xff" * 16,
                                112, 0, 112, len(output), 0, 0) + output
    message = _response(wire.IOCTL, 3, body, status=status, signed=signed)
    if signed:
        message = _sign(core, message)
    [response] = core.receive(_framed(message))
    return response


def _answer(caps: int = 0x47, guid: bytes = SERVER_GUID, mode: int = 1,
            dialect: int = SMB_3_0_2) -> bytes:
    return struct.pack("<I16sHH", caps, guid, mode, dialect)


def test_validated_negotiation_that_agrees() -> None:
    core = _negotiated_client()
    assert core.validated_by(_validate_answer(core, _answer())) is True


@pytest.mark.parametrize("answer, what", [
    (_answer(caps=0x07), "capabilities 0x7 (the NEGOTIATE response said 0x47)"),
    (_answer(dialect=SMB_3_1_1), "dialect 3.1.1 (the NEGOTIATE response said 3.0.2)"),
    (_answer(mode=3), "security mode 0x3"),
    (_answer(guid=bytes(16)), "another server GUID"),
])
def test_validated_negotiation_that_differs_is_tampering(answer: bytes, what: str) -> None:
    core = _negotiated_client()
    with pytest.raises(NegotiationTampered, match=re_escape(what)):
        core.validated_by(_validate_answer(core, answer))


def test_validate_negotiate_refusals() -> None:
    core = _negotiated_client()
    with pytest.raises(NegotiationTampered, match="refused"):
        core.validated_by(_validate_answer(core, b"", status=wire.STATUS_ACCESS_DENIED))
    with pytest.raises(NegotiationTampered, match="0xc0000001"):
        core.validated_by(_validate_answer(core, b"", status=0xC0000001))
    # A server without the FSCTL says so, signed: accepted (MS-SMB2 3.2.5.14.12).
    for status in (wire.STATUS_NOT_SUPPORTED, wire.STATUS_INVALID_DEVICE_REQUEST,
                   wire.STATUS_FILE_CLOSED):
        assert core.validated_by(_validate_answer(core, b"", status=status)) is False
    # An answer that is neither signed nor encrypted proves nothing.
    core.sign = False  # (a signed session refuses it on receipt already)
    unsigned = _validate_answer(core, _answer(), signed=False)
    with pytest.raises(NegotiationTampered, match="neither signed nor encrypted"):
        core.validated_by(unsigned)


@pytest.mark.parametrize("dialect", [SMB_3_0_2, SMB_3_1_1])
def test_final_session_setup_with_a_wrong_signature(dialect: int) -> None:
    """On 3.1.1 the keys hash the NEGOTIATE and SESSION_SETUP messages (preauth
    integrity): a signature that does not match means they were changed on the way."""
    core = Smb2Client(Options(client_guid=CLIENT_GUID))
    core.negotiated = Negotiated(dialect, 1, 0x47, 1 << 20, 1 << 20, 1 << 20, b"",
                                 crypto.AES_128_GCM if dialect == SMB_3_1_1 else
                                 crypto.AES_128_CCM, crypto.AES_CMAC, SERVER_GUID)
    if dialect == SMB_3_1_1:
        core._session_preauth = crypto.PreauthHash()
    body = wire.SESSION_SETUP_RESP.pack(9, 0, 72, 0)
    message = _response(wire.SESSION_SETUP, 2, body, signed=True)
    message = message[:48] + os.urandom(16) + message[64:]
    response = Response(wire.parse_header(message), message, False, False)
    if dialect == SMB_3_1_1:
        with pytest.raises(NegotiationTampered, match="preauth integrity"):
            core.session_established(response, b"s" * 16)
    else:
        with pytest.raises(wire.ProtocolError, match="signature is wrong"):
            core.session_established(response, b"s" * 16)
