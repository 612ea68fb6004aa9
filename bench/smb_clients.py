"""The pipe clients that ``cross_host.py`` measures next to npipe, each with its best call.

A pipe round trip (a request and its answer) has one best SMB call: FSCTL_PIPE_TRANSCEIVE,
an IOCTL that writes the request and returns the answer in one exchange (npipe's native
client sends one whenever a write finds no READ posted). Every client here uses it for
echoes of up to ``TRANSCEIVE_MAX_INPUT`` bytes, which includes the 64-byte latency echo:

* :class:`MinimalClient` - the floor: the least code that can do an authenticated,
  signed or encrypted pipe round trip in asyncio. One TCP connection read and written
  through asyncio streams, one request in flight, one TRANSCEIVE per round trip, no READ
  posted ahead, no bridge, no shared-connection registry. Its messages are built by
  npipe's sans-I/O core (:class:`npipe.smb.native.core.Smb2Client` and
  :mod:`npipe.smb.native.wire`: ``struct`` packing, key derivation, AES-GCM/GMAC via
  ``cryptography``) and NTLM comes from pyspnego, as in npipe. Reusing the core, not
  re-writing it, is deliberate: the figure is then the cost of npipe's *driver* (link,
  pipe transport, StreamReader/Writer) over the same bytes on the wire, and a second
  hand-written SMB3 key schedule would be one more thing to get wrong without making
  the floor lower (the core's per-message work is one header pack and one AEAD call).
* :class:`SmbprotocolClient` - smbprotocol's ``Connection``/``Session``/``TreeConnect``/
  ``Open``, and for the round trip an ``SMB2IOCTLRequest`` with
  ``CtlCode.FSCTL_PIPE_TRANSCEIVE`` sent with ``Connection.send`` and collected with
  ``Connection.receive`` (``Open`` has no transceive method of its own).
* :class:`ImpacketClient` - impacket's ``SMBConnection.transactNamedPipe`` (an SMB2
  IOCTL with FSCTL_PIPE_TRANSCEIVE, at most 65,535 bytes of answer).

Larger echoes (64 KiB, 1 MiB) go as npipe sends them: a WRITE sent without waiting for
its answer, then READs of up to 64 KiB one at a time until the echo is back, then the
WRITE's answer (a TRANSCEIVE's input is written before smbd reads any answer, so an
echoing server blocked on a full socket could never let a large one finish). impacket's
sync calls cannot leave a WRITE outstanding: it stops at 64 KiB (WRITE, then READs).

A TRANSCEIVE answers what the pipe holds at that moment: an answer cut short (the echo
server wrote it in two pieces, or STATUS_BUFFER_OVERFLOW) is completed with READs.

Each client reports what it negotiated (``info()``: dialect and ``encrypted (cipher)``,
``signed (algorithm)`` or ``unsigned``), checked by ``cross_host.py`` before measuring.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

TRANSCEIVE_MAX_INPUT = 16384  # as npipe.smb.native.pipe: larger echoes WRITE, then READ
TRANSCEIVE_OUTPUT = 65536
READ_SIZE = 65536
STATUS_BUFFER_OVERFLOW = 0x80000005
DIALECT_NAMES = {0x202: "2.0.2", 0x210: "2.1", 0x300: "3.0", 0x302: "3.0.2", 0x311: "3.1.1"}


class BenchClient:
    """One transport's client: ``lat(n)`` in us per round trip, ``tput(size, n)`` in MB/s."""

    def info(self) -> dict[str, Any]:
        return {}

    def lat(self, n: int) -> list[float]:
        raise NotImplementedError

    def tput(self, size: int, n: int) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class BlockingEchoClient(BenchClient):
    """A client with a blocking ``echo(data) -> answer`` (one request, its answer): the
    latency and throughput loops are the same for every such library."""

    payload: bytes

    def echo(self, data: bytes) -> bytes:
        raise NotImplementedError

    def lat(self, n: int) -> list[float]:
        payload, echo = self.payload, self.echo

        def one() -> None:
            _check(echo(payload), payload)

        return timed(one, n)

    def tput(self, size: int, n: int) -> list[float]:
        msg = os.urandom(size)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            got = self.echo(msg)
            out.append(size / (time.perf_counter() - t0) / 1e6)
            _check(got, msg)
        return out


class LoopClient(BenchClient):
    """An asyncio client on an event loop of its own, driven one command at a time."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.aclose())
        self.loop.close()

    async def aclose(self) -> None:
        pass


def timed(op: Callable[[], None], n: int) -> list[float]:
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        op()
        out.append((clock() - t0) / 1000.0)
    return out


def security(signed: bool, encrypted: bool, algorithm: str | None) -> str:
    """As the native link says it (``SmbConnection.security``): 'encrypted (AES-128-GCM)' etc."""
    what = "encrypted" if encrypted else "signed" if signed else "unsigned"
    return f"{what} ({algorithm})" if algorithm and what != "unsigned" else what


def smbprotocol_algorithm(conn: Any, encrypted: bool) -> str | None:
    """The cipher (if this session encrypts) or the signing algorithm (if it only signs)."""
    from smbprotocol.connection import Ciphers, SigningAlgorithms

    if encrypted and conn.cipher_id:
        return _enum_name(Ciphers, conn.cipher_id)
    if not encrypted and conn.signing_algorithm_id is not None:
        return _enum_name(SigningAlgorithms, conn.signing_algorithm_id)
    return None


def _enum_name(cls: Any, value: int) -> str:
    for name in dir(cls):
        if not name.startswith("_") and getattr(cls, name) == value:
            return name.replace("_", "-")
    return hex(value)


def _check(got: bytes, want: bytes) -> None:
    if got != want:
        raise AssertionError(f"the {len(want)}-byte echo differs")


# ================================================================== the floor


class MinimalClient(LoopClient):
    """The least driver that does a pipe round trip: asyncio streams, one request in
    flight (two while a large echo's WRITE is outstanding), one TRANSCEIVE per round trip."""

    def __init__(self, host: str, user: str, password: str, pipe: str, protection: str,
                 timeout: float = 60.0) -> None:
        super().__init__()
        self.timeout = timeout
        self.run(self._open(host, user, password, pipe, protection))
        self.payload = os.urandom(64)

    async def _open(self, host: str, user: str, password: str, pipe: str,
                    protection: str) -> None:
        import spnego

        from npipe.smb.native import wire
        from npipe.smb.native.core import Options, Smb2Client

        self.wire = wire
        self.reader, self.writer = await asyncio.open_connection(host, 445)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                        socket.TCP_NODELAY, 1)
        options = Options()  # npipe's defaults: 3.0-3.1.1, AES-GCM/CCM, AES-GMAC/CMAC
        if protection == "unsigned":
            options = dataclasses.replace(options, sign=False, dialects=(0x0210,))
        core = self.core = Smb2Client(options)
        self.answers: dict[int, Any] = {}
        neg = core.negotiated_by(await self._ask(core.negotiate()))
        ctx = spnego.client(user, password, hostname=host, service="cifs", protocol="ntlm")
        token = ctx.step(None)
        while True:
            answer = await self._ask(core.session_setup(token or b""))
            if answer.status == wire.STATUS_MORE_PROCESSING_REQUIRED:
                token = ctx.step(core.session_setup_continues(answer))
                continue
            if answer.status != wire.STATUS_SUCCESS:
                raise ConnectionError(f"SESSION_SETUP: NTSTATUS {answer.status:#010x}")
            core.session_established(answer, ctx.session_key)
            break
        if protection == "encrypted" and neg.cipher is not None:
            core.require_encryption()  # npipe's default: encrypt where the server can
        tree = await self._ask(core.request(
            wire.TREE_CONNECT, wire.tree_connect_request(f"\\\\{host}\\IPC$"), tree=False))
        if tree.status != wire.STATUS_SUCCESS:
            raise ConnectionError(f"TREE_CONNECT: NTSTATUS {tree.status:#010x}")
        core.tree_id = tree.header.tree_id
        # 3.1.1's preauth integrity covers the negotiation; unsigned 2.1 cannot validate.
        create = await self._ask(core.request(wire.CREATE, wire.create_request(pipe)))
        if create.status != wire.STATUS_SUCCESS:
            raise ConnectionError(f"CREATE {pipe}: NTSTATUS {create.status:#010x}")
        self.file_id = wire.parse_create(create.message)

    def _send(self, out: Any) -> int:
        self.writer.writelines(out.parts)
        return int(out.message_ids[-1])

    async def _wait(self, mid: int) -> Any:
        answers, core, reader = self.answers, self.core, self.reader
        while mid not in answers:
            data = await reader.read(1 << 18)
            if not data:
                raise ConnectionError("the server closed the connection")
            for answer in core.receive(data):
                header = answer.header
                if header.status == self.wire.STATUS_PENDING and header.is_async:
                    continue  # the final answer follows
                answers[header.message_id] = answer
        return answers.pop(mid)

    async def _ask(self, out: Any) -> Any:
        return await self._wait(self._send(out))

    async def _read(self, n: int) -> bytes:
        wire, core = self.wire, self.core
        answer = await self._ask(core.request(
            wire.READ, wire.read_request(self.file_id, n), payload=n))
        if answer.status not in (wire.STATUS_SUCCESS, STATUS_BUFFER_OVERFLOW):
            raise ConnectionError(f"READ: NTSTATUS {answer.status:#010x}")
        return wire.parse_read(answer.message)

    async def _rest(self, got: bytes, size: int) -> bytes:
        parts = [got]
        have = len(got)
        while have < size:
            part = await self._read(min(READ_SIZE, size - have))
            parts.append(part)
            have += len(part)
        return b"".join(parts)

    async def echo(self, data: bytes) -> bytes:
        wire, core, size = self.wire, self.core, len(data)
        if size <= TRANSCEIVE_MAX_INPUT:
            answer = await self._ask(core.request(
                wire.IOCTL, wire.ioctl_request(wire.FSCTL_PIPE_TRANSCEIVE, self.file_id, data,
                                               TRANSCEIVE_OUTPUT),
                payload=TRANSCEIVE_OUTPUT))
            if answer.status not in (wire.STATUS_SUCCESS, STATUS_BUFFER_OVERFLOW):
                raise ConnectionError(f"TRANSCEIVE: NTSTATUS {answer.status:#010x}")
            return await self._rest(wire.parse_ioctl(answer.message), size)
        write = self._send(core.request(wire.WRITE, wire.write_request_head(self.file_id, size),
                                        payload=size, data=data))
        got = await self._rest(b"", size)
        answer = await self._wait(write)
        if answer.status != wire.STATUS_SUCCESS:
            raise ConnectionError(f"WRITE: NTSTATUS {answer.status:#010x}")
        return got

    def info(self) -> dict[str, Any]:
        from npipe.smb.native.crypto import CIPHER_NAMES, SIGNING_NAMES

        core = self.core
        neg = core.negotiated
        if core.encrypt and core.cipher is not None:
            what = f"encrypted ({CIPHER_NAMES[core.cipher.cipher]})"
        elif core.sign and core.signer is not None:
            what = f"signed ({SIGNING_NAMES[core.signer.algorithm]})"
        else:
            what = "unsigned"
        return {"dialect": neg.dialect_name if neg else "?", "security": what}

    def lat(self, n: int) -> list[float]:
        return self.run(self._lat(n))

    async def _lat(self, n: int) -> list[float]:
        payload, echo = self.payload, self.echo
        clock = time.perf_counter_ns
        out = []
        for _ in range(n):
            t0 = clock()
            got = await asyncio.wait_for(echo(payload), self.timeout)
            out.append((clock() - t0) / 1000.0)
            _check(got, payload)
        return out

    def tput(self, size: int, n: int) -> list[float]:
        return self.run(self._tput(size, n))

    async def _tput(self, size: int, n: int) -> list[float]:
        msg = os.urandom(size)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            got = await asyncio.wait_for(self.echo(msg), self.timeout)
            out.append(size / (time.perf_counter() - t0) / 1e6)
            _check(got, msg)
        return out

    async def aclose(self) -> None:
        wire, core = self.wire, self.core
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ask(core.request(
                wire.CLOSE, wire.close_request(self.file_id))), 2)
            await asyncio.wait_for(self._ask(core.request(
                wire.LOGOFF, wire.small_request(), tree=False)), 2)
        self.writer.close()


# ================================================================== smbprotocol


class SmbprotocolClient(BlockingEchoClient):
    """smbprotocol used directly: one Connection/Session/TreeConnect/Open, sync calls;
    a round trip is one IOCTL FSCTL_PIPE_TRANSCEIVE."""

    def __init__(self, host: str, user: str, password: str, pipe: str, encrypt: bool,
                 timeout: float = 60.0) -> None:
        from smbprotocol.connection import Connection
        from smbprotocol.ioctl import CtlCode, IOCTLFlags
        from smbprotocol.open import (
            CreateDisposition,
            CreateOptions,
            FilePipePrinterAccessMask,
            ImpersonationLevel,
            Open,
            ShareAccess,
        )
        from smbprotocol.session import Session
        from smbprotocol.tree import TreeConnect

        self.conn = Connection(uuid.uuid4(), host, 445)
        self.conn.connect(timeout=timeout)
        self.session = Session(self.conn, user, password, require_encryption=encrypt)
        self.session.connect()
        self.tree = TreeConnect(self.session, rf"\\{host}\IPC$")
        self.tree.connect()
        self.op = Open(self.tree, pipe)
        self.op.create(
            ImpersonationLevel.Impersonation,
            FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
            0,
            ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
            CreateDisposition.FILE_OPEN,
            CreateOptions.FILE_NON_DIRECTORY_FILE,
        )
        # A 1 MiB WRITE costs 16 credits: ask for a few more up front (SMB2 ECHO).
        self.conn.echo(sid=self.session.session_id, credit_request=64)
        self._ctl, self._fsctl = CtlCode.FSCTL_PIPE_TRANSCEIVE, IOCTLFlags.SMB2_0_IOCTL_IS_FSCTL
        self.payload = os.urandom(64)

    def info(self) -> dict[str, Any]:
        encrypted = bool(self.session.encrypt_data)
        return {"dialect": DIALECT_NAMES.get(self.conn.dialect, hex(self.conn.dialect)),
                "security": security(self.session.signing_key is not None, encrypted,
                                     smbprotocol_algorithm(self.conn, encrypted))}

    def transceive(self, data: bytes) -> bytes:
        from smbprotocol.ioctl import SMB2IOCTLRequest, SMB2IOCTLResponse

        req = SMB2IOCTLRequest()
        req["ctl_code"] = self._ctl
        req["file_id"] = self.op.file_id
        req["max_output_response"] = TRANSCEIVE_OUTPUT
        req["flags"] = self._fsctl
        req["buffer"] = data
        request = self.conn.send(req, sid=self.session.session_id,
                                 tid=self.tree.tree_connect_id)
        response = self.conn.receive(request)
        answer = SMB2IOCTLResponse()
        answer.unpack(response["data"].get_value())
        return bytes(answer["buffer"].get_value())

    def _rest(self, got: bytes, size: int) -> bytes:
        parts, have = [got], len(got)
        while have < size:
            part = self.op.read(0, min(READ_SIZE, size - have))
            parts.append(part)
            have += len(part)
        return b"".join(parts)

    def echo(self, data: bytes) -> bytes:
        size = len(data)
        if size <= TRANSCEIVE_MAX_INPUT:
            return self._rest(self.transceive(data), size)
        # The WRITE goes out without waiting; READs drain the echo; then its answer.
        message, receive = self.op.write(data, 0, send=False)
        request = self.conn.send(message, self.session.session_id, self.tree.tree_connect_id)
        got = self._rest(b"", size)
        receive(request)
        return got

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.op.close()
        self.conn.disconnect(close=True)


# ================================================================== impacket


class ImpacketClient(BlockingEchoClient):
    """impacket's SMBConnection; a round trip is one ``transactNamedPipe``."""

    def __init__(self, host: str, user: str, password: str, pipe: str,
                 timeout: float = 60.0) -> None:
        from impacket.smbconnection import SMBConnection

        self.smb = SMBConnection(host, host, sess_port=445, timeout=int(timeout))
        self.smb.login(user, password)
        self.tid = self.smb.connectTree("IPC$")
        self.fid = self.smb.openFile(self.tid, "\\" + pipe, desiredAccess=0x12019F,
                                     creationOption=0x40, fileAttributes=0x80)
        self.payload = os.urandom(64)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            inner = self.smb.getSMBServer()
            dialect = self.smb.getDialect()
            out["dialect"] = DIALECT_NAMES.get(dialect, str(dialect))
            tree = inner._Session["TreeConnectTable"].get(self.tid, {})
            encrypted = bool(tree.get("EncryptData")) or bool(
                inner._Session["SessionFlags"] & 0x4)  # SMB2_SESSION_FLAG_ENCRYPT_DATA
            # AES-128-CCM is the only cipher impacket offers and uses.
            out["security"] = security(bool(inner._Session["SigningActivated"]), encrypted,
                                       "AES-128-CCM" if encrypted else None)
        return out

    def _rest(self, got: bytes, size: int) -> bytes:
        parts, have = [got], len(got)
        while have < size:
            part = self.smb.readFile(self.tid, self.fid, 0, min(READ_SIZE, size - have))
            parts.append(part)
            have += len(part)
        return b"".join(parts)

    def echo(self, data: bytes) -> bytes:
        smb, tid, fid = self.smb, self.tid, self.fid
        if len(data) <= TRANSCEIVE_MAX_INPUT:
            return self._rest(bytes(smb.transactNamedPipe(tid, fid, data)), len(data))
        smb.writeFile(tid, fid, data)
        return self._rest(b"", len(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.smb.closeFile(self.tid, self.fid)
        with contextlib.suppress(Exception):
            self.smb.close()
