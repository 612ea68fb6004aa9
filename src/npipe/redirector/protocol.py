"""What an npipe process and its user's redirector say to each other (sans-I/O).

One Unix connection per relayed socket. The process sends one request, framed as
``multiprocessing.connection`` frames its messages (a 4-byte big-endian length: see
:mod:`npipe.framing`), holding a JSON object, with the socket to relay attached to its
first byte (SCM_RIGHTS). The redirector answers with one frame: ``{"ok": true}`` once
it relays the socket to the pipe, or the error that kept it from opening the pipe (its
class and message, rebuilt on this side as the same npipe exception).

After an ``ok`` the connection stays open when the request was ``tied``: closing it
ends the relay (as closing an in-process bridge ends its relays), and the redirector
closes it when the relay ends. An untied request's connection is closed at once; the
relay lives as long as its socket does.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from npipe import errors
from npipe.address import PipeAddress
from npipe.framing import STDLIB, FrameReader, Oversized, stdlib_header
from npipe.smb.credentials import Credentials
from npipe.smb.info import SmbConnectionInfo

VERSION = 1
# A request carries at most what a bridge holds for calls that wait for a pipe (1 MiB),
# base64'd, and the rest of the request.
MAX_FRAME = 2 << 20


class RedirectorProtocolError(errors.NpipeError, ValueError):
    """A request or reply that is not what this protocol says."""


@dataclass(frozen=True)
class AttachRequest:
    """Open ``address`` as ``credentials`` with these options and relay the socket sent
    with the request to it (see :meth:`npipe.smb.PipeClient.attach`)."""

    backend: str
    address: PipeAddress
    credentials: Credentials
    timeout: float
    encrypt: bool | None
    allow_smb2: bool
    initial: bytes = b""
    missing_grace: float | None = None
    tied: bool = False

    def encode(self) -> bytes:
        creds = self.credentials
        body = {
            "v": VERSION, "op": "attach", "backend": self.backend,
            "address": {"kind": self.address.kind, "name": self.address.name,
                        "host": self.address.host, "port": self.address.port,
                        "path": self.address.path},
            "credentials": {"username": creds.username, "password": creds.password,
                            "domain": creds.domain, "auth_protocol": creds.auth_protocol},
            "timeout": self.timeout, "encrypt": self.encrypt, "allow_smb2": self.allow_smb2,
            "initial": base64.b64encode(self.initial).decode("ascii"),
            "missing_grace": self.missing_grace, "tied": self.tied,
        }
        return frame(json.dumps(body).encode())

    @classmethod
    def decode(cls, payload: bytes) -> AttachRequest:
        body = _object(payload)
        if body.get("v") != VERSION or body.get("op") != "attach":
            raise RedirectorProtocolError(
                f"not a version {VERSION} attach request: v={body.get('v')!r}, "
                f"op={body.get('op')!r}")
        try:
            addr = body["address"]
            creds = body["credentials"]
            address = PipeAddress(kind=_str(addr["kind"]), name=_str(addr["name"]),  # type: ignore[arg-type]
                                  host=_str(addr["host"]), port=_int(addr["port"]),
                                  path=_str(addr["path"]))
            if not address.is_remote:
                raise RedirectorProtocolError(f"{address} is not a remote pipe")
            return cls(
                backend=_str(body["backend"]),
                address=address,
                credentials=Credentials(
                    _opt_str(creds["username"]), _opt_str(creds["password"]),
                    _opt_str(creds["domain"]), _str(creds["auth_protocol"])),
                timeout=_number(body["timeout"]),
                encrypt=_opt_bool(body["encrypt"]),
                allow_smb2=_bool(body["allow_smb2"]),
                initial=base64.b64decode(_str(body["initial"]), validate=True),
                missing_grace=None if body["missing_grace"] is None
                else _number(body["missing_grace"]),
                tied=_bool(body["tied"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, RedirectorProtocolError):
                raise
            raise RedirectorProtocolError(f"malformed attach request: {e!r}") from None


def operation(payload: bytes) -> str:
    """What a request asks: ``attach``, ``connections`` or ``close_connections``."""
    body = _object(payload)
    if body.get("v") != VERSION or body.get("op") not in OPERATIONS:
        raise RedirectorProtocolError(
            f"not a version {VERSION} request: v={body.get('v')!r}, op={body.get('op')!r}")
    return str(body["op"])


OPERATIONS = ("attach", "connections", "close_connections")


def encode_connections_request(backend: str, op: str = "connections") -> bytes:
    """Ask for the connections of ``backend`` (or, op ``close_connections``, to close
    them: as ``npipe.smb.PipeClient.close_connections`` does, pipes and all)."""
    return frame(json.dumps({"v": VERSION, "op": op, "backend": backend}).encode())


def decode_connections_request(payload: bytes) -> str:
    """The backend whose connections are asked for (or to be closed)."""
    try:
        return _str(_object(payload)["backend"])
    except (KeyError, TypeError) as e:
        raise RedirectorProtocolError(f"malformed connections request: {e!r}") from None


def encode_connections(infos: list[SmbConnectionInfo]) -> bytes:
    return frame(json.dumps({"ok": True,
                             "connections": [dataclasses.asdict(i) for i in infos]}).encode())


def decode_connections(payload: bytes) -> list[SmbConnectionInfo]:
    body = _object(payload)
    items = body.get("connections")
    if body.get("ok") is not True or not isinstance(items, list):
        raise RedirectorProtocolError(f"malformed connections reply: {body!r:.200}")
    try:
        return [SmbConnectionInfo(**item) for item in items]
    except TypeError as e:
        raise RedirectorProtocolError(f"malformed connections reply: {e}") from None


def frame(payload: bytes) -> bytes:
    return stdlib_header(len(payload)) + payload


def reader() -> FrameReader:
    """A reader of this protocol's frames (:meth:`FrameReader.feed` gives each whole)."""
    return FrameReader(STDLIB, limit=MAX_FRAME)


def whole(message: bytes | Oversized | None) -> bytes | None:
    """A frame the reader gave, or RedirectorProtocolError for an oversized one."""
    if isinstance(message, Oversized):
        raise RedirectorProtocolError(f"a frame of {message.size} bytes (at most {MAX_FRAME})")
    return message


# --- replies --------------------------------------------------------------------------

# The exceptions a reply may name: npipe's own, rebuilt as themselves; anything else
# arrives as an NpipeError that names it.
_REBUILT: dict[str, type[BaseException]] = {
    cls.__name__: cls for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.NpipeError)
}


def encode_reply(failure: BaseException | None) -> bytes:
    if failure is None:
        return frame(json.dumps({"ok": True}).encode())
    name = type(failure).__name__
    for cls in type(failure).__mro__:  # the nearest class this side can rebuild
        if _REBUILT.get(cls.__name__) is cls:
            name = cls.__name__
            break
    else:
        failure = RuntimeError(f"{type(failure).__name__}: {failure}")
        name = "RuntimeError"
    return frame(json.dumps({"ok": False, "error": name, "message": str(failure)}).encode())


def decode_reply(payload: bytes) -> BaseException | None:
    """None for ``ok``, else the exception the redirector reported."""
    body = _object(payload)
    if body.get("ok") is True:
        return None
    if body.get("ok") is not False:
        raise RedirectorProtocolError(f"malformed reply: {body!r:.200}")
    message = body.get("message")
    name = body.get("error")
    text = message if isinstance(message, str) else repr(message)
    cls = _REBUILT.get(name) if isinstance(name, str) else None
    if cls is None:
        return errors.NpipeError(f"the redirector could not open the pipe: {name}: {text}")
    return cls(text)


def _object(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError as e:
        raise RedirectorProtocolError(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RedirectorProtocolError(f"not a JSON object: {body!r:.100}")
    return body


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, not {value!r:.60}")
    return value


def _opt_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, not {value!r:.60}")
    return value


def _opt_bool(value: object) -> bool | None:
    return None if value is None else _bool(value)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, not {value!r:.60}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise TypeError(f"expected a number >= 0, not {value!r:.60}")
    return float(value)
