"""What a shared SMB connection negotiated, as every backend reports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SmbConnectionInfo:
    """What one shared SMB connection negotiated (for tests, logs and diagnostics)."""

    host: str
    port: int
    user: str | None
    dialect: str
    signing_required: bool  # the connection requires signed messages
    signed: bool  # the session's messages are signed (or encrypted, which covers it)
    encrypted: bool  # every message of the session is encrypted
    pipes: int  # pipes open through it now
    alive: bool
    pipe_wait: bool = True  # FSCTL_PIPE_WAIT works here, as far as known (not on Samba)
