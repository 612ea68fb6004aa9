"""One exception type per kind of failure, all under :class:`NpipeError`.

Each message names what failed and, where there is one, what to do about it.
"""

from __future__ import annotations


class NpipeError(Exception):
    """Base class of every error npipe raises on purpose."""


class AddressError(NpipeError, ValueError):
    """A pipe address or pipe name is malformed."""


class PipeNotFound(NpipeError, FileNotFoundError):
    """Nothing is listening on the pipe."""


class PipeBusy(NpipeError):
    """The pipe exists but cannot take another connection now."""


class PipeInUse(NpipeError):
    """A live server already serves this pipe name (like FILE_FLAG_FIRST_PIPE_INSTANCE)."""


class AccessDenied(NpipeError, PermissionError):
    """The caller may not open the pipe, or the pipe's server is not the one expected."""


class AuthenticationError(NpipeError):
    """Credentials were refused."""


class ConnectionLost(NpipeError, ConnectionError):
    """The peer went away mid-stream."""


class UnsupportedPlatform(NpipeError, NotImplementedError):
    """This feature does not exist on this operating system (yet)."""


class ConfigError(NpipeError, ValueError):
    """A setting (ACL entry, pipe directory, option) is invalid."""


class HostUnreachable(NpipeError, ConnectionError):
    """The remote host did not answer on its SMB port."""


class NegotiationTampered(ConnectionLost):
    """Someone on the path changed the SMB negotiation (a downgrade attack?): what the
    server says it negotiated is not what the client saw. The connection is closed."""


class MessageTooLarge(NpipeError, OSError):
    """A message longer than the receiver's limit arrived on a message pipe and was
    dropped (the stdlib's ``OSError("bad message length")``); the connection goes on."""


class RedirectorUnavailable(NpipeError):
    """The user's redirector (npipe.redirector) could not be started or reached."""


def says_exiting(exc: BaseException) -> bool:
    """Whether ``exc`` says only that the interpreter is exiting: its thread pools refuse
    new work ("cannot schedule new futures after [interpreter] shutdown"), which a
    background re-dial can meet at exit. Not a failure worth reporting."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and "schedule new futures" in text and "shutdown" in text
