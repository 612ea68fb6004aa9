"""The optional parts of npipe (pip extras) and the one-line error when one is missing.

``pip install npipe`` brings what raw streams, blocking sockets, message pipes, the SMB
client, Samba serving and the bridges need. gRPC (``npipe[grpc]``) and HTTP
(``npipe[http]``) bring their libraries; a module or command that needs one raises
:class:`MissingExtra` (an ImportError) saying which extra to install, rather than a
bare ``No module named 'grpc'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

__all__ = ["EXTRAS", "MissingExtra", "imports_of", "missing", "require"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "grpc": ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "h2"),
    "http": ("httpx", "httpcore", "h2", "hypercorn"),
    "smbprotocol": ("smbprotocol",),
}
"""The modules each extra provides (as imported, not as distributions), as pyproject.toml's
optional-dependencies install them. h2 is in both: the gRPC front door answers a refused
caller's HTTP/2 itself (npipe.grpc_refusal)."""


class MissingExtra(ImportError):
    """``what`` needs extra ``extra``, which is not installed; the message says, in one
    line, what to install."""

    def __init__(self, what: str, extra: str, name: str | None = None) -> None:
        super().__init__(f"{what} needs the {extra} extra: pip install 'npipe[{extra}]'",
                         name=name)
        self.what = what
        self.extra = extra


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found, not imported)."""
    absent = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a stub in sys.modules
            found = False
        if not found:
            absent.append(module)
    return absent


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` is installed."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(what, extra, name=absent[0])


def _of(extra: str, name: str) -> bool:
    """Whether missing module ``name`` is (part of, or a parent of) one of ``extra``'s."""
    return any(name == m or name.startswith(f"{m}.") or m.startswith(f"{name}.")
               for m in EXTRAS[extra])


@contextlib.contextmanager
def imports_of(extra: str, what: str) -> Iterator[None]:
    """Around a module's imports of ``extra``: a module of the extra that is missing
    raises :class:`MissingExtra` (any other missing module is left as it is)::

        with imports_of("grpc", "npipe.grpc"):
            import grpc
    """
    try:
        yield
    except ModuleNotFoundError as e:
        if e.name and _of(extra, e.name):
            raise MissingExtra(what, extra, name=e.name) from None
        raise
