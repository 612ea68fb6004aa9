"""SMB2 messages as bytes: the header, the request bodies a pipe client sends and the
response bodies it reads (MS-SMB2 2.2). Sans-I/O and plain ``struct``: no objects per
field, so the hot path (READ, WRITE) is one ``pack`` and one ``unpack_from``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from npipe.errors import ConnectionLost

# --- commands, flags ----------------------------------------------------------------

NEGOTIATE = 0x00
SESSION_SETUP = 0x01
LOGOFF = 0x02
TREE_CONNECT = 0x03
TREE_DISCONNECT = 0x04
CREATE = 0x05
CLOSE = 0x06
READ = 0x08
WRITE = 0x09
IOCTL = 0x0B
CANCEL = 0x0C
ECHO = 0x0D

COMMAND_NAMES = {
    NEGOTIATE: "NEGOTIATE",
    SESSION_SETUP: "SESSION_SETUP",
    LOGOFF: "LOGOFF",
    TREE_CONNECT: "TREE_CONNECT",
    TREE_DISCONNECT: "TREE_DISCONNECT",
    CREATE: "CREATE",
    CLOSE: "CLOSE",
    READ: "READ",
    WRITE: "WRITE",
    IOCTL: "IOCTL",
    CANCEL: "CANCEL",
    ECHO: "ECHO",
}

FLAGS_SERVER_TO_REDIR = 0x00000001
FLAGS_ASYNC_COMMAND = 0x00000002
FLAGS_RELATED_OPERATIONS = 0x00000004
FLAGS_SIGNED = 0x00000008

PROTOCOL_SMB2 = b"\xfeSMB"
PROTOCOL_TRANSFORM = b"\xfdSMB"
PROTOCOL_COMPRESSED = b"\xfcSMB"
PROTOCOL_SMB1 = b"\xffSMB"

HEADER_SIZE = 64
SIGNATURE_OFFSET = 48
SIGNATURE_END = 64
ZERO_SIGNATURE = bytes(16)

# ProtocolId, StructureSize, CreditCharge, Status, Command, Credits, Flags, NextCommand,
# MessageId, then Reserved + TreeId (sync) or AsyncId (async), SessionId, Signature.
HEADER = struct.Struct("<4sHHIHHIIQIIQ16s")
HEADER_ASYNC = struct.Struct("<4sHHIHHIIQQQ16s")

# A related compound's "the file of the previous request".
FILE_ID_RELATED = b"\xff" * 16

# NTSTATUS (MS-ERREF 2.3.1) values the client itself acts on.
STATUS_SUCCESS = 0x00000000
STATUS_PENDING = 0x00000103
STATUS_BUFFER_OVERFLOW = 0x80000005
STATUS_MORE_PROCESSING_REQUIRED = 0xC0000016
STATUS_CANCELLED = 0xC0000120
STATUS_ACCESS_DENIED = 0xC0000022
# A server without FSCTL_VALIDATE_NEGOTIATE_INFO answers one of these (signed).
STATUS_INVALID_DEVICE_REQUEST = 0xC0000010
STATUS_NOT_SUPPORTED = 0xC00000BB
STATUS_FILE_CLOSED = 0xC0000128


class ProtocolError(ConnectionLost):
    """The server sent bytes that are not a valid SMB2 message here (or a forged one):
    the connection cannot go on."""


@dataclass(slots=True)
class Header:
    """The fields of a response header the client acts on."""

    command: int
    status: int
    credits: int
    flags: int
    next_command: int
    message_id: int
    async_id: int  # 0 for a sync message
    tree_id: int
    session_id: int
    credit_charge: int

    @property
    def is_async(self) -> bool:
        return bool(self.flags & FLAGS_ASYNC_COMMAND)

    @property
    def signed(self) -> bool:
        return bool(self.flags & FLAGS_SIGNED)


def pack_header(
    command: int,
    message_id: int,
    *,
    credit_charge: int = 1,
    credits: int = 1,
    flags: int = 0,
    next_command: int = 0,
    tree_id: int = 0,
    session_id: int = 0,
    async_id: int | None = None,
) -> bytes:
    """A request header with a zero signature (signing fills it in later)."""
    if async_id is not None:
        return HEADER_ASYNC.pack(
            PROTOCOL_SMB2, 64, credit_charge, 0, command, credits,
            flags | FLAGS_ASYNC_COMMAND, next_command, message_id, async_id, session_id,
            ZERO_SIGNATURE,
        )
    return HEADER.pack(
        PROTOCOL_SMB2, 64, credit_charge, 0, command, credits, flags, next_command,
        message_id, 0, tree_id, session_id, ZERO_SIGNATURE,
    )


def parse_header(message: bytes | memoryview, offset: int = 0) -> Header:
    """The header of the response at ``offset``; ProtocolError if it is not one."""
    if len(message) - offset < HEADER_SIZE:
        raise ProtocolError(
            f"an SMB2 message of {len(message) - offset} bytes is shorter than its header"
        )
    (proto, size, charge, status, command, credits, flags, next_command, mid, word,
     tree_id, session_id, _sig) = HEADER.unpack_from(message, offset)
    if proto != PROTOCOL_SMB2 or size != 64:
        raise ProtocolError(f"not an SMB2 header: {bytes(message[offset:offset + 8]).hex()}")
    if not flags & FLAGS_SERVER_TO_REDIR:
        raise ProtocolError("the server sent a request, not a response")
    async_id = 0
    if flags & FLAGS_ASYNC_COMMAND:
        async_id = word | (tree_id << 32)
        tree_id = 0
    return Header(command, status, credits, flags, next_command, mid, async_id, tree_id,
                  session_id, charge)


def body_at(message: bytes | memoryview, header_offset: int, offset: int, length: int) -> bytes:
    """The ``length`` bytes at ``offset`` (from the header's start), checked for bounds."""
    start = header_offset + offset
    if length < 0 or (offset < HEADER_SIZE and length) or start + length > len(message):
        raise ProtocolError(
            f"a buffer (offset {offset}, {length} bytes) lies outside its {len(message)}-byte "
            "message"
        )
    return bytes(message[start : start + length])


# --- NetBIOS session framing (RFC 1002 over TCP 445: a zero byte, a 24-bit length) ---

MAX_FRAME = 0x00FFFFFF


def frame(*parts: bytes | bytearray | memoryview) -> bytes:
    size = sum(len(p) for p in parts)
    if size > MAX_FRAME:
        raise ValueError(f"an SMB message of {size} bytes does not fit a NetBIOS frame")
    return b"".join((struct.pack(">I", size), *parts))


class Framer:
    """Cuts the TCP byte stream into SMB messages (whole NetBIOS session frames)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        if not buf and len(data) >= 4:
            # Fast path: the chunk holds exactly one frame (most READ responses).
            size = int.from_bytes(data[1:4], "big")
            if data[0] == 0 and len(data) == size + 4:
                return [data[4:]]
        buf += data
        frames = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            kind = buf[pos]
            size = int.from_bytes(buf[pos + 1 : pos + 4], "big")
            if kind != 0:
                raise ProtocolError(f"not a NetBIOS session message (type {kind:#04x})")
            if size > self._max:
                raise ProtocolError(f"a {size}-byte message is larger than {self._max}")
            if end - pos - 4 < size:
                break
            frames.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buf)


# --- request bodies ---------------------------------------------------------------

SESSION_SETUP_REQ = struct.Struct("<HBBIIHHQ")  # 24 bytes, buffer at 64 + 24 = 88
TREE_CONNECT_REQ = struct.Struct("<HHHH")  # 8 bytes, path at 72
CREATE_REQ = struct.Struct("<HBBIQQIIIIIHHII")  # 56 bytes, name at 120
READ_REQ = struct.Struct("<HBBIQ16sIIIHHB")  # 49 bytes (one buffer byte)
WRITE_REQ = struct.Struct("<HHIQ16sIIHHI")  # 48 bytes, data at 112
IOCTL_REQ = struct.Struct("<HHI16sIIIIIIII")  # 56 bytes, input at 120
CLOSE_REQ = struct.Struct("<HHI16s")
SMALL_REQ = struct.Struct("<HH")  # ECHO, CANCEL, LOGOFF, TREE_DISCONNECT

SECURITY_MODE_SIGNING_ENABLED = 0x0001
SECURITY_MODE_SIGNING_REQUIRED = 0x0002

# CREATE of a pipe (MS-SMB2 2.2.13; MS-FSCC access rights).
IMPERSONATION = 2
FILE_READ_DATA = 0x00000001
FILE_WRITE_DATA = 0x00000002
FILE_READ_ATTRIBUTES = 0x00000080
SYNCHRONIZE = 0x00100000
PIPE_ACCESS = FILE_READ_DATA | FILE_WRITE_DATA | FILE_READ_ATTRIBUTES | SYNCHRONIZE
FILE_SHARE_READ_WRITE = 0x00000003
FILE_OPEN = 0x00000001
FILE_NON_DIRECTORY_FILE = 0x00000040

# IOCTL (MS-FSCC 2.3).
FSCTL_PIPE_PEEK = 0x0011400C
FSCTL_PIPE_WAIT = 0x00110018
FSCTL_PIPE_TRANSCEIVE = 0x0011C017
FSCTL_VALIDATE_NEGOTIATE_INFO = 0x00140204
IOCTL_IS_FSCTL = 0x00000001


def session_setup_request(token: bytes, *, signing_required: bool) -> bytes:
    mode = SECURITY_MODE_SIGNING_REQUIRED if signing_required else SECURITY_MODE_SIGNING_ENABLED
    return SESSION_SETUP_REQ.pack(25, 0, mode, 0, 0, 88, len(token), 0) + token


def tree_connect_request(path: str) -> bytes:
    encoded = path.encode("utf-16-le")
    return TREE_CONNECT_REQ.pack(9, 0, 72, len(encoded)) + encoded


def create_request(name: str) -> bytes:
    encoded = name.encode("utf-16-le")
    if not encoded:
        raise ValueError("a pipe name cannot be empty")
    return CREATE_REQ.pack(
        57, 0, 0, IMPERSONATION, 0, 0, PIPE_ACCESS, 0, FILE_SHARE_READ_WRITE, FILE_OPEN,
        FILE_NON_DIRECTORY_FILE, 120, len(encoded), 0, 0,
    ) + encoded


def read_request(file_id: bytes, length: int, minimum: int = 0) -> bytes:
    return READ_REQ.pack(49, 0x50, 0, length, 0, file_id, minimum, 0, 0, 0, 0, 0)


def write_request_head(file_id: bytes, length: int) -> bytes:
    """The WRITE body up to its data (the data follows at offset 112)."""
    return WRITE_REQ.pack(49, 112, length, 0, file_id, 0, 0, 0, 0, 0)


def ioctl_request(ctl_code: int, file_id: bytes, data: bytes, max_output: int) -> bytes:
    offset = 120 if data else 0
    return IOCTL_REQ.pack(
        57, 0, ctl_code, file_id, offset, len(data), 0, 0, 0, max_output, IOCTL_IS_FSCTL, 0,
    ) + data


def pipe_wait_input(name: str, timeout: float) -> bytes:
    """FSCTL_PIPE_WAIT's input (MS-FSCC 2.3.49); the timeout in 100 ns units."""
    encoded = name.encode("utf-16-le")
    ticks = max(1, int(timeout * 10_000_000))
    return struct.pack("<qIBB", ticks, len(encoded), 1, 0) + encoded


def close_request(file_id: bytes) -> bytes:
    return CLOSE_REQ.pack(24, 0, 0, file_id)


def small_request() -> bytes:
    return SMALL_REQ.pack(4, 0)


# --- response bodies --------------------------------------------------------------

ERROR_RESP = struct.Struct("<HBBI")
SESSION_SETUP_RESP = struct.Struct("<HHHH")
TREE_CONNECT_RESP = struct.Struct("<HBBIII")
CREATE_RESP = struct.Struct("<HBBIQQQQQQII16sII")  # 88 bytes
READ_RESP = struct.Struct("<HBBIII")
WRITE_RESP = struct.Struct("<HHII")
IOCTL_RESP = struct.Struct("<HHI16sIIIIII")

SESSION_FLAG_IS_GUEST = 0x0001
SESSION_FLAG_IS_NULL = 0x0002
SESSION_FLAG_ENCRYPT_DATA = 0x0004

SHARE_TYPE_PIPE = 0x02
SHAREFLAG_ENCRYPT_DATA = 0x00008000


def _check_size(body: bytes | memoryview, offset: int, st: struct.Struct, what: str) -> None:
    if len(body) - offset < st.size:
        raise ProtocolError(f"a truncated {what} response ({len(body) - offset} bytes)")


@dataclass(frozen=True, slots=True)
class SessionSetupResponse:
    session_flags: int
    token: bytes


def parse_session_setup(msg: bytes, at: int = 0) -> SessionSetupResponse:
    _check_size(msg, at + HEADER_SIZE, SESSION_SETUP_RESP, "SESSION_SETUP")
    _size, flags, offset, length = SESSION_SETUP_RESP.unpack_from(msg, at + HEADER_SIZE)
    return SessionSetupResponse(flags, body_at(msg, at, offset, length) if length else b"")


@dataclass(frozen=True, slots=True)
class TreeConnectResponse:
    share_type: int
    share_flags: int
    capabilities: int
    maximal_access: int


def parse_tree_connect(msg: bytes, at: int = 0) -> TreeConnectResponse:
    _check_size(msg, at + HEADER_SIZE, TREE_CONNECT_RESP, "TREE_CONNECT")
    _size, share_type, _r, flags, caps, access = TREE_CONNECT_RESP.unpack_from(
        msg, at + HEADER_SIZE
    )
    return TreeConnectResponse(share_type, flags, caps, access)


def parse_create(msg: bytes, at: int = 0) -> bytes:
    """The FileId of a CREATE response."""
    _check_size(msg, at + HEADER_SIZE, CREATE_RESP, "CREATE")
    fields = CREATE_RESP.unpack_from(msg, at + HEADER_SIZE)
    return bytes(fields[12])


def parse_read(msg: bytes, at: int = 0) -> bytes:
    """The data of a READ response."""
    _check_size(msg, at + HEADER_SIZE, READ_RESP, "READ")
    _size, offset, _r, length, _remaining, _r2 = READ_RESP.unpack_from(msg, at + HEADER_SIZE)
    if not length:
        return b""
    start = at + offset
    if offset < HEADER_SIZE + 16 or start + length > len(msg):
        raise ProtocolError(
            f"a READ response's data (offset {offset}, {length} bytes) lies outside its "
            f"{len(msg) - at}-byte message"
        )
    if at == 0 and start + length == len(msg):
        return msg[start:]
    return msg[start : start + length]


def parse_write(msg: bytes, at: int = 0) -> int:
    """The count of bytes a WRITE response says were written."""
    _check_size(msg, at + HEADER_SIZE, WRITE_RESP, "WRITE")
    return int(WRITE_RESP.unpack_from(msg, at + HEADER_SIZE)[2])


def parse_ioctl(msg: bytes, at: int = 0) -> bytes:
    """The output buffer of an IOCTL response."""
    _check_size(msg, at + HEADER_SIZE, IOCTL_RESP, "IOCTL")
    fields = IOCTL_RESP.unpack_from(msg, at + HEADER_SIZE)
    out_offset, out_count = fields[6], fields[7]
    return body_at(msg, at, out_offset, out_count) if out_count else b""


PIPE_PEEK = struct.Struct("<IIII")  # FILE_PIPE_PEEK_BUFFER (MS-FSCC 2.3.46)


@dataclass(frozen=True, slots=True)
class PipePeek:
    state: int  # 3 = connected, 4 = closing (MS-FSCC 2.3.46)
    available: int  # bytes ready to read
    messages: int
    message_length: int
    data: bytes


def parse_pipe_peek(output: bytes) -> PipePeek:
    if len(output) < PIPE_PEEK.size:
        raise ProtocolError(f"a truncated FSCTL_PIPE_PEEK answer ({len(output)} bytes)")
    state, available, messages, length = PIPE_PEEK.unpack_from(output)
    return PipePeek(state, available, messages, length, output[PIPE_PEEK.size :])


def check_structure(msg: bytes, at: int, expected: int, what: str) -> None:
    """Validate a small fixed response (CLOSE, ECHO, LOGOFF ...) by its StructureSize."""
    if len(msg) - at < HEADER_SIZE + 2:
        raise ProtocolError(f"a truncated {what} response")
    (size,) = struct.unpack_from("<H", msg, at + HEADER_SIZE)
    if size != expected:
        raise ProtocolError(f"a {what} response with StructureSize {size}, not {expected}")
