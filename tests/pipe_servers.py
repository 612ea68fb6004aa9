"""Raw pipe servers for the SMB client tests: Unix listeners placed in smbd's np/ that
answer the named_pipe_auth handshake with ``npipe.samba.npa``, then run a handler."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from npipe.samba.npa import NpaRequestReader, build_reply

Handler = Callable[[socket.socket, bytes], None]


class PipeServer:
    """A raw Unix listener at np/NAME: handshake (unless ``handshake=False``), then handler."""

    THREAD = "test-pipe-server"

    def __init__(self, np_dir: Path, name: str, handler: Handler, handshake: bool = True):
        self.path = np_dir / name
        self.handler = handler
        self.handshake = handshake
        self.accepted = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(64)
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, name=self.THREAD, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name=self.THREAD,
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if not self.handshake:
                self.handler(conn, b"")
                return
            reader = NpaRequestReader()
            request = None
            while request is None:
                data = conn.recv(65536)
                if not data:
                    return
                request = reader.feed(data)
            conn.sendall(build_reply(request.level))
            self.handler(conn, reader.unused_data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def echo(conn: socket.socket, data: bytes) -> None:
    if data:
        conn.sendall(data)
    while data := conn.recv(1 << 20):
        conn.sendall(data)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the kernel picked (so concurrent runs never meet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SmbdPool:
    """Private smbds on loopback, one per named configuration (extra smb.conf lines),
    started on first use, each with an echo pipe."""

    def __init__(self, configs: Mapping[str, Mapping[str, str]], users: Mapping[str, str],
                 prefix: str = "npsmbd") -> None:
        from npipe.samba.smbd import PrivateSmbd

        self._make = PrivateSmbd
        self.configs = configs
        self.users = dict(users)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.running: dict[str, tuple[PrivateSmbd, PipeServer]] = {}

    def port(self, config: str) -> int:
        if config not in self.running:
            smbd = self._make(self.dir / config, port=free_port(), bind_address="127.0.0.1",
                              users=self.users, extra=self.configs[config])
            smbd.start()
            self.running[config] = (smbd, PipeServer(smbd.np_dir, "echo", echo))
        return self.running[config][0].port

    def address(self, config: str) -> str:
        """The echo pipe of that configuration's smbd."""
        return f"//127.0.0.1:{self.port(config)}/pipe/echo"

    def close(self) -> None:
        for smbd, pipe in self.running.values():
            pipe.close()
            smbd.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
