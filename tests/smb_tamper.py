"""A TCP proxy between an SMB client and a real smbd that spoils one message.

    with TamperProxy(smbd_port) as proxy:
        proxy.tamper(read_with_data, "flip_signature")
        reader, writer = await open_pipe(proxy.address("echo"), ...)
        ...
        assert proxy.fired.wait(5)

The proxy listens on 127.0.0.1 (``listen_host``) on a free port and forwards each
connection to ``target_host:target_port``, cut into messages by the 4-byte NetBIOS
session header (a zero byte, then the length as 24-bit big-endian) in both directions.
One rule at a time picks a server-to-client message by a predicate on ``(index, frame)``
(``index`` counts that connection's server messages from 0, the NEGOTIATE response;
``frame`` is the message without its NetBIOS header) and spoils it once with one of
:data:`ACTIONS`:

``truncate``        cut the message to ``keep`` bytes (default half), with a NetBIOS
                    length that matches
``garbage``         replace the message with random bytes (after the first ``keep``)
``bad_length``      announce more bytes than follow, send the message, then close
``flip_signature``  flip a byte of the signature (offset 48 of an SMB2 header; of an
                    encrypted message, offset 4 of its transform header)
``flip_payload``    flip a byte of the body (default the last), leaving the signature
``drop``            close both connections instead of forwarding it
``stall``           forward nothing more to the client (its connection stays open)
``rewrite``         replace the message with ``edit(frame)`` (see :func:`offer_only`,
                    :func:`clear_capabilities`, :func:`drop_context`: a downgrade)

With ``from_client=True`` the rule picks a client-to-server message instead (``index``
counts the client's messages from 0, its NEGOTIATE request; ``stall`` is not offered
that way), e.g. ``proxy.tamper(nth(0), "rewrite", edit=offer_only(0x0210),
from_client=True)`` makes the client seem to offer SMB 2.1 only.

It runs its own asyncio loop in a thread, so tests drive it the same from plain or
asyncio code. Counters (``connections``, ``frames_from_server``, ``frames_from_client``)
and ``fired`` (an Event, set when the rule acted; ``fired_index`` says on which
message) let a test check that the traffic went through it and the rule took effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

ACTIONS = (
    "truncate", "garbage", "bad_length", "flip_signature", "flip_payload", "drop", "stall",
    "rewrite",
)

SMB2_MAGIC = b"\xfeSMB"
TRANSFORM_MAGIC = b"\xfdSMB"
SMB2_HEADER_SIZE = 64
SIGNATURE_OFFSET = 48
TRANSFORM_SIGNATURE_OFFSET = 4

NEGOTIATE, SESSION_SETUP, TREE_CONNECT, CREATE, CLOSE, READ, WRITE, IOCTL = (
    0x00, 0x01, 0x03, 0x05, 0x06, 0x08, 0x09, 0x0B,
)
STATUS_SUCCESS = 0
STATUS_PENDING = 0x103
STATUS_MORE_PROCESSING_REQUIRED = 0xC0000016

Match = Callable[[int, bytes], bool]
Edit = Callable[[bytes], bytes]

CAP_ENCRYPTION = 0x40
ENCRYPTION_CAPABILITIES = 0x0002
NEGOTIATE_REQ = struct.Struct("<HHHHI16sIHH")  # after the header; dialects follow
NEGOTIATE_RESP = struct.Struct("<HHHH16sIIIIQQHHI")  # after the header


# --- looking at messages ------------------------------------------------------------


@dataclass(frozen=True)
class Smb2Header:
    offset: int  # where it starts in the frame (compounded messages follow each other)
    command: int
    status: int
    flags: int
    next_command: int

    @property
    def signed(self) -> bool:
        return bool(self.flags & 0x8)


def headers(frame: bytes) -> list[Smb2Header]:
    """The SMB2 headers of a plain (not encrypted) message, following NextCommand."""
    found: list[Smb2Header] = []
    offset = 0
    while offset + SMB2_HEADER_SIZE <= len(frame) and frame[offset:offset + 4] == SMB2_MAGIC:
        status, command = struct.unpack_from("<IH", frame, offset + 8)
        flags, next_command = struct.unpack_from("<II", frame, offset + 16)
        found.append(Smb2Header(offset, command, status, flags, next_command))
        if next_command == 0 or len(found) > 64:
            break
        offset += next_command
    return found


def is_encrypted(frame: bytes) -> bool:
    return frame[:4] == TRANSFORM_MAGIC


def response_to(command: int, status: int | None = None) -> Match:
    """A predicate: a message with a response to ``command`` (with ``status``, if given)."""

    def match(index: int, frame: bytes) -> bool:
        return any(h.command == command and (status is None or h.status == status)
                   for h in headers(frame))

    return match


def read_with_data(index: int, frame: bytes) -> bool:
    """A predicate: a successful READ response that carries data, or an IOCTL response
    (FSCTL_PIPE_TRANSCEIVE: a write's answer) that does."""
    for h in headers(frame):
        if h.command == READ and h.status == STATUS_SUCCESS:
            # READ response: StructureSize, DataOffset (1 byte), Reserved, DataLength.
            (length,) = struct.unpack_from("<I", frame, h.offset + SMB2_HEADER_SIZE + 4)
            if length > 0:
                return True
        if h.command == IOCTL and h.status == STATUS_SUCCESS:
            # IOCTL response: ..., OutputOffset at 32, OutputCount at 36.
            (length,) = struct.unpack_from("<I", frame, h.offset + SMB2_HEADER_SIZE + 36)
            if length > 0:
                return True
    return False


def request_to(command: int) -> Match:
    """A predicate for client messages: a request for ``command``."""
    return lambda index, frame: any(h.command == command for h in headers(frame))


def nth(n: int) -> Match:
    """A predicate: the connection's ``n``-th server message (0: NEGOTIATE response)."""
    return lambda index, frame: index == n


def encrypted(index: int, frame: bytes) -> bool:
    """A predicate: any encrypted message."""
    return is_encrypted(frame)


def spoil(frame: bytes, action: str, *, keep: int | None = None,
          offset: int | None = None) -> bytes:
    """``frame`` as ``truncate``, ``garbage``, ``flip_signature`` or ``flip_payload``
    leave it (the other actions do not change bytes)."""
    if action == "truncate":
        return frame[:len(frame) // 2 if keep is None else keep]
    if action == "garbage":
        kept = keep or 0
        return frame[:kept] + os.urandom(max(0, len(frame) - kept))
    if action in ("flip_signature", "flip_payload"):
        if offset is None:
            if action == "flip_payload":
                offset = len(frame) - 1
            elif is_encrypted(frame):
                offset = TRANSFORM_SIGNATURE_OFFSET
            else:
                offset = SIGNATURE_OFFSET
        spoiled = bytearray(frame)
        spoiled[offset] ^= 0xFF
        return bytes(spoiled)
    raise ValueError(f"{action!r} does not change a message's bytes")


# --- downgrades: rewriting the NEGOTIATE ---------------------------------------------


def offer_only(*dialects: int) -> Edit:
    """An edit of the client's NEGOTIATE request: it offers ``dialects`` only (and no
    3.1.1 negotiate contexts unless 0x0311 stays)."""

    def edit(frame: bytes) -> bytes:
        head = frame[:SMB2_HEADER_SIZE]
        (size, _count, mode, reserved, caps, guid, ctx_offset, ctx_count,
         _r2) = NEGOTIATE_REQ.unpack_from(frame, SMB2_HEADER_SIZE)
        listed = struct.pack(f"<{len(dialects)}H", *dialects)
        if 0x0311 not in dialects or not ctx_count:
            return head + NEGOTIATE_REQ.pack(size, len(dialects), mode, reserved, caps, guid,
                                             0, 0, 0) + listed
        contexts = frame[ctx_offset:]
        start = SMB2_HEADER_SIZE + NEGOTIATE_REQ.size + len(listed)
        pad = (8 - start % 8) % 8
        return (head + NEGOTIATE_REQ.pack(size, len(dialects), mode, reserved, caps, guid,
                                          start + pad, ctx_count, 0)
                + listed + bytes(pad) + contexts)

    return edit


def negotiate_capabilities(frame: bytes) -> int:
    """The Capabilities of a NEGOTIATE response."""
    return int(NEGOTIATE_RESP.unpack_from(frame, SMB2_HEADER_SIZE)[5])


def negotiate_dialect(frame: bytes) -> int:
    return int(NEGOTIATE_RESP.unpack_from(frame, SMB2_HEADER_SIZE)[2])


def clear_capabilities(bits: int) -> Edit:
    """An edit of the server's NEGOTIATE response: ``bits`` cleared in its Capabilities
    (CAP_ENCRYPTION: the server seems unable to encrypt on 3.0 and 3.0.2)."""

    def edit(frame: bytes) -> bytes:
        at = SMB2_HEADER_SIZE + 24
        (caps,) = struct.unpack_from("<I", frame, at)
        return frame[:at] + struct.pack("<I", caps & ~bits) + frame[at + 4:]

    return edit


def negotiate_contexts(frame: bytes) -> list[tuple[int, bytes]]:
    """The (type, data) negotiate contexts of a 3.1.1 NEGOTIATE response."""
    fields = NEGOTIATE_RESP.unpack_from(frame, SMB2_HEADER_SIZE)
    count, pos = fields[3], fields[13]
    found = []
    for _ in range(count):
        pos += (8 - pos % 8) % 8
        kind, length = struct.unpack_from("<HH", frame, pos)
        found.append((kind, frame[pos + 8:pos + 8 + length]))
        pos += 8 + length
    return found


def drop_context(kind: int) -> Edit:
    """An edit of the server's 3.1.1 NEGOTIATE response: its negotiate context ``kind``
    removed (ENCRYPTION_CAPABILITIES: the server seems unable to encrypt)."""

    def edit(frame: bytes) -> bytes:
        fields = list(NEGOTIATE_RESP.unpack_from(frame, SMB2_HEADER_SIZE))
        kept = [(k, d) for k, d in negotiate_contexts(frame) if k != kind]
        offset = fields[13]
        parts = []
        for i, (k, data) in enumerate(kept):
            parts.append(struct.pack("<HHI", k, len(data), 0) + data)
            if i < len(kept) - 1:
                parts.append(bytes((8 - len(data) % 8) % 8))
        fields[3] = len(kept)
        body = NEGOTIATE_RESP.pack(*fields)
        return (frame[:SMB2_HEADER_SIZE] + body
                + frame[SMB2_HEADER_SIZE + NEGOTIATE_RESP.size:offset] + b"".join(parts))

    return edit


# --- the proxy ----------------------------------------------------------------------


@dataclass
class Rule:
    match: Match
    action: str
    keep: int | None = None
    offset: int | None = None
    edit: Edit | None = None
    from_client: bool = False


class TamperProxy:
    """See the module docstring. ``start()``/``stop()``, or use it as a context manager."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1",
                 listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.connections = 0
        self.frames_from_server = 0
        self.frames_from_client = 0
        self.fired = threading.Event()
        self.fired_index: int | None = None
        self.fired_frame: bytes | None = None
        self.errors: list[BaseException] = []  # unexpected failures inside the proxy
        self._rule: Rule | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # --- control (any thread) -------------------------------------------------------

    def address(self, name: str) -> str:
        return f"//{self.listen_host}:{self.port}/pipe/{name}"

    def tamper(self, match: Match, action: str, *, keep: int | None = None,
               offset: int | None = None, edit: Edit | None = None,
               from_client: bool = False) -> None:
        """Spoil the next server message (client message, with ``from_client``)
        ``match`` accepts (on any connection), once."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
        if (action == "rewrite") != (edit is not None):
            raise ValueError("edit= goes with the rewrite action, and only with it")
        if from_client and action == "stall":
            raise ValueError("stall applies to server messages only")
        with self._lock:
            self._rule = Rule(match, action, keep, offset, edit, from_client)
            self.fired.clear()
            self.fired_index = None
            self.fired_frame = None

    def pass_through(self) -> None:
        with self._lock:
            self._rule = None

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    def start(self) -> TamperProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.listen_host, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"smb-tamper->{self.target[1]}",
                                        daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection; the thread ends."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            future.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    def __enter__(self) -> TamperProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- the loop's side ------------------------------------------------------------

    async def _shutdown(self) -> None:
        # Stop accepting, then drop the connections, and only then wait for the server:
        # since Python 3.12 Server.wait_closed() waits until every connection has closed.
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5)

    def _take(self, index: int, frame: bytes, from_server: bool = True) -> Rule | None:
        """The rule, if it picks this message (then it is used up)."""
        with self._lock:
            rule = self._rule
            if rule is None or rule.from_client == from_server:
                return None
            try:
                picked = rule.match(index, frame)
            except Exception as exc:  # a predicate that chokes on odd bytes: no match
                self.errors.append(exc)
                picked = False
            if not picked:
                return None
            self._rule = None
            self.fired_index = index
            self.fired_frame = frame
        return rule

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        self.connections += 1
        server_w: asyncio.StreamWriter | None = None
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(server_w)
            for writer in (client_w, server_w):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = asyncio.ensure_future(self._pump(client_r, server_w, from_server=False))
            downstream = asyncio.ensure_future(self._pump(server_r, client_w, from_server=True))
            try:
                done, _ = await asyncio.wait({upstream, downstream},
                                             return_when=asyncio.FIRST_COMPLETED)
                hang_up = any(t.result() == "close" for t in done)  # drop, bad_length
                if not hang_up:
                    # One side ended: let the other finish (it sees EOF forwarded).
                    await asyncio.wait({upstream, downstream})
            finally:
                for t in (upstream, downstream):
                    t.cancel()
                await asyncio.gather(upstream, downstream, return_exceptions=True)
            if hang_up:
                await self._hang_up(client_r, client_w, server_w)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self.errors.append(exc)
        finally:
            for w in (client_w, server_w):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()
            self._tasks.discard(task)

    @staticmethod
    async def _hang_up(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                       server_w: asyncio.StreamWriter) -> None:
        """Close both connections now, the client's as a server would: a FIN after what
        was sent (closing with the client's bytes unread would send a reset instead)."""
        server_w.transport.abort()
        with contextlib.suppress(OSError):
            if client_w.can_write_eof():
                client_w.write_eof()

        async def discard() -> None:
            while await client_r.read(65536):
                pass

        with contextlib.suppress(Exception):
            await asyncio.wait_for(discard(), 5)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *, from_server: bool) -> str:
        """Copy messages until EOF ("eof") or a rule closes the connection ("close")."""
        index = 0
        stalled = False
        try:
            while True:
                try:
                    head = await reader.readexactly(4)
                    length = int.from_bytes(head[1:], "big")
                    frame = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if from_server:
                    self.frames_from_server += 1
                else:
                    self.frames_from_client += 1
                rule = None if stalled else self._take(index, frame, from_server)
                index += 1
                if stalled:
                    continue
                if rule is not None:
                    self.fired.set()
                    if rule.action == "drop":
                        return "close"
                    if rule.action == "stall":
                        stalled = True
                        continue
                    if rule.action == "bad_length":
                        announced = min(length + 4096, 0xFFFFFF)
                        writer.write(b"\x00" + announced.to_bytes(3, "big") + frame)
                        with contextlib.suppress(ConnectionError):
                            await writer.drain()
                        return "close"
                    if rule.action == "rewrite":
                        assert rule.edit is not None
                        frame = rule.edit(frame)
                    else:
                        frame = spoil(frame, rule.action, keep=rule.keep, offset=rule.offset)
                    head = b"\x00" + len(frame).to_bytes(3, "big")
                writer.write(head + frame)
                await writer.drain()
        except ConnectionError:
            return "close"
        if stalled:
            return "stalled"
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
        return "eof"
