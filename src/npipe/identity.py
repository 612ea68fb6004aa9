"""Who is on the other end of a pipe: one :class:`Caller` type for every transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Caller:
    """The identity of a pipe's peer, as the operating system (or SMB server) vouches for it.

    Local callers come from the kernel (SO_PEERCRED): ``uid``, ``gid``, ``pid``, ``groups``.
    Remote callers (through Samba) add the authenticated ``account``, ``domain`` and ``sids``
    and the client's network ``address``; their ``uid``/``gid`` are Samba's Unix mapping
    (what that admits, and why uid 0 admits nothing remotely: :mod:`npipe.acl`).
    """

    transport: Literal["local", "smb"]
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    groups: tuple[int, ...] = ()
    user: str | None = None
    account: str | None = None
    domain: str | None = None
    sids: tuple[str, ...] = ()
    address: str | None = None
    port: int | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def local(cls, pid: int, uid: int, gid: int, groups: tuple[int, ...] = ()) -> Caller:
        """A caller on this host, by its process, user and group ids (its user name looked up)."""
        return cls("local", uid=uid, gid=gid, pid=pid, groups=groups, user=user_name(uid))

    @property
    def name(self) -> str:
        """A readable name: DOMAIN\\account for remote callers, the user name for local ones."""
        if self.account:
            return f"{self.domain}\\{self.account}" if self.domain else self.account
        if self.user:
            return self.user
        return f"uid {self.uid}" if self.uid is not None else "unknown"

    def __str__(self) -> str:
        parts = [self.name]
        if self.uid is not None:
            parts.append(f"uid={self.uid}")
        if self.pid is not None:
            parts.append(f"pid={self.pid}")
        if self.address:
            parts.append(f"from {self.address}" + (f":{self.port}" if self.port else ""))
        return " ".join(parts)


def user_name(uid: int) -> str | None:
    try:
        import pwd  # POSIX only

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return None


def group_name(gid: int) -> str | None:
    try:
        import grp  # POSIX only

        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return None
