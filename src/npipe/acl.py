"""Who may open a pipe.

The default is owner-only: the serving user (and root, who can reach any socket
anyway). An :class:`Acl` opens a pipe to more users, groups or Windows SIDs.
Names are resolved when the Acl is made, so a typo fails at start-up, not at the
first refused caller.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from npipe.errors import ConfigError
from npipe.identity import Caller


@dataclass(frozen=True)
class Acl:
    """Users, groups and SIDs allowed besides the owner; ``everyone`` lifts the check."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    sids: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()  # lower-case remote account names, DOMAIN\\name
    everyone: bool = False

    @classmethod
    def allow(
        cls,
        users: Iterable[str | int] = (),
        groups: Iterable[str | int] = (),
        sids: Iterable[str] = (),
        everyone: bool = False,
    ) -> Acl:
        uids: set[int] = set()
        accounts: set[str] = set()
        for u in users:
            if isinstance(u, int):
                uids.add(u)
            elif "\\" in u or "@" in u:
                accounts.add(u.lower())  # a remote (domain) account, matched by name
            else:
                uids.add(_uid(u))  # a local user: its uid, never its bare name
        gids = {g if isinstance(g, int) else _gid(g) for g in groups}
        for sid in sids:
            if not sid.upper().startswith("S-1-"):
                raise ConfigError(f"{sid!r} is not a SID (S-1-...)")
        return cls(
            frozenset(uids), frozenset(gids), frozenset(s.upper() for s in sids),
            frozenset(accounts), everyone,
        )

    @classmethod
    def parse(cls, text: str) -> Acl:
        """Parse ``user:alice,group:staff,uid:1001,sid:S-1-5-...,everyone`` (CLI form)."""
        users: list[str | int] = []
        groups: list[str | int] = []
        sids: list[str] = []
        everyone = False
        for item in filter(None, (p.strip() for p in text.split(","))):
            kind, _, value = item.partition(":")
            if kind == "everyone" and not value:
                everyone = True
            elif kind == "user" and value:
                users.append(value)
            elif kind == "uid" and value.isdigit():
                users.append(int(value))
            elif kind == "group" and value:
                groups.append(value)
            elif kind == "gid" and value.isdigit():
                groups.append(int(value))
            elif kind == "sid" and value:
                sids.append(value)
            else:
                raise ConfigError(
                    f"bad ACL entry {item!r}: use user:NAME, uid:N, group:NAME, gid:N, "
                    "sid:S-1-..., or everyone"
                )
        return cls.allow(users, groups, sids, everyone)

    def allows(self, caller: Caller, owner_uid: int | None = None) -> bool:
        """True if ``caller`` may open a pipe served by ``owner_uid`` (default: this process)."""
        owner = os.getuid() if owner_uid is None else owner_uid
        if self.everyone:
            return True
        # The owner's own account, local or over SMB (Samba maps it to the same uid);
        # root only locally: a remote session mapped to uid 0 is not the machine's root.
        if caller.uid == owner or (caller.transport == "local" and caller.uid == 0):
            return True
        if caller.uid is not None and caller.uid in self.uids:
            return True
        caller_gids = set(caller.groups)
        if caller.gid is not None:
            caller_gids.add(caller.gid)
        if caller_gids & self.gids:
            return True
        if any(s.upper() in self.sids for s in caller.sids):
            return True
        return bool(caller.account and _account_names(caller) & self.accounts)


OWNER_ONLY = Acl()


def _account_names(caller: Caller) -> set[str]:
    """DOMAIN\\account, by the NetBIOS and the DNS domain Samba reports: never the bare
    account, which any domain may have."""
    if not caller.account:
        return set()
    dns_domain = caller.extra.get("dns_domain")
    domains = {caller.domain, dns_domain if isinstance(dns_domain, str) else None}
    return {f"{d}\\{caller.account}".lower() for d in domains if d}


def _uid(name: str) -> int:
    import pwd  # POSIX only; the Windows path matches SIDs and accounts

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ConfigError(f"unknown user {name!r} in the pipe's ACL") from None


def _gid(name: str) -> int:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {name!r} in the pipe's ACL") from None
