"""Who may open a pipe.

The default is owner-only: the serving user (and root, who can reach any socket
anyway). An :class:`Acl` opens a pipe to more users, groups or Windows SIDs.
Names are resolved when the Acl is made, so a typo fails at start-up, not at the
first refused caller; an entry no caller could ever match is refused there too.

Local callers (``transport="local"``, from SO_PEERCRED) are admitted by uid and gids:
the owner, root, a ``users`` entry (a local name is resolved to its uid) or a
``groups`` entry.

Remote callers (``transport="smb"``, vouched for by smbd's named_pipe_auth request)
get in only as the owner or through an entry that names them:

- ``DOMAIN\\name``: the account in the domain Samba reports (its NetBIOS name, or its
  DNS name), case-insensitively. A bare name never matches a remote account by name:
  another domain's ``alice`` is not the local user ``alice``.
- ``name@REALM``: the user principal name Samba reports, or the account's implicit UPN
  ``account@DNS domain`` (case-insensitive). Standalone servers report neither.
- a SID (``sids``): any SID of the session's token (user, groups, well-known ones).
- a uid or gid entry, local user or group names included: the Unix uid/gid Samba maps
  the session to. Samba is the administrator's mapping of network accounts to Unix
  users (passdb, idmap, username map), and smbd is believed only as root: on a
  standalone server a session mapped to ``alice``'s uid authenticated with the password
  in ``alice``'s passdb entry, so it *is* the local user ``alice`` and
  ``users=["alice"]`` admits her over SMB too. A same-named account of another domain
  is mapped to a uid of its own and is not admitted.
- the owner: likewise, a session Samba maps to the serving user's own uid is the owner,
  so an owner-only pipe served by ``svc`` admits ``svc`` over SMB (only when Samba
  maps that session to ``svc``'s uid).

Uid 0 and gid 0 are the exception: Samba maps network accounts to root that are not
the machine's root (an AD DC maps the domain's Administrator to uid 0), so a remote
session mapped to uid 0 is never the owner of a pipe root serves, and uid/gid 0
entries (``root`` included) never admit a remote caller. To admit such an account,
name it (``DOMAIN\\name``, ``name@REALM``, its SID).
``everyone`` admits everyone, remote root included; guest sessions never reach the ACL
(the Samba front door refuses them first).
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
    sids: frozenset[str] = frozenset()  # upper case, S-1-...
    accounts: frozenset[str] = frozenset()  # lower case, domain\\name
    everyone: bool = False
    upns: frozenset[str] = frozenset()  # lower case, name@realm

    def __post_init__(self) -> None:
        # Checked and normalised here too, so that an Acl made directly has no entry that
        # no caller could ever match (a bare account name, an empty part, a non-SID).
        sids = frozenset(_check_sid(s) for s in self.sids)
        accounts = frozenset(_domain_account(a) for a in self.accounts)
        upns = frozenset(_upn(u) for u in self.upns)
        object.__setattr__(self, "sids", sids)
        object.__setattr__(self, "accounts", accounts)
        object.__setattr__(self, "upns", upns)

    @classmethod
    def allow(
        cls,
        users: Iterable[str | int] = (),
        groups: Iterable[str | int] = (),
        sids: Iterable[str] = (),
        everyone: bool = False,
    ) -> Acl:
        """``users``: a local user name or uid, ``DOMAIN\\name`` or ``name@REALM``."""
        uids: set[int] = set()
        accounts: set[str] = set()
        upns: set[str] = set()
        for u in users:
            if isinstance(u, int):
                uids.add(u)
            elif "\\" in u:
                accounts.add(_domain_account(u))
            elif "@" in u:
                upns.add(_upn(u))
            else:
                uids.add(_uid(u))  # a local user: its uid, never its bare name
        gids = {g if isinstance(g, int) else _gid(g) for g in groups}
        return cls(
            frozenset(uids), frozenset(gids), frozenset(sids), frozenset(accounts), everyone,
            frozenset(upns),
        )

    @classmethod
    def parse(cls, text: str) -> Acl:
        """Parse ``user:alice,user:NPIPE\\bob,user:carol@NPIPE.TEST,group:staff,uid:1001,
        sid:S-1-5-...,everyone`` (the CLI form; ``user:`` takes what ``allow`` does)."""
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
                    f"bad ACL entry {item!r}: use user:NAME, user:DOMAIN\\NAME, "
                    "user:NAME@REALM, uid:N, group:NAME, gid:N, sid:S-1-..., or everyone"
                )
        return cls.allow(users, groups, sids, everyone)

    def allows(self, caller: Caller, owner_uid: int | None = None) -> bool:
        """True if ``caller`` may open a pipe served by ``owner_uid`` (default: this process)."""
        owner = os.getuid() if owner_uid is None else owner_uid
        if self.everyone:
            return True
        uid, gids = caller.uid, set(caller.groups)
        if caller.gid is not None:
            gids.add(caller.gid)
        if caller.transport == "local":
            if uid == 0:
                return True  # root reaches any socket anyway
        else:  # a remote session Samba maps to uid or gid 0 is not root: see the module doc
            uid = None if uid == 0 else uid
            gids.discard(0)
        if uid is not None and (uid == owner or uid in self.uids):
            return True
        if gids & self.gids:
            return True
        if any(s.upper() in self.sids for s in caller.sids):
            return True
        if caller.account and _account_names(caller) & self.accounts:
            return True
        return bool(self.upns and _upn_names(caller) & self.upns)

    def names_remote_callers(self) -> bool:
        """Whether an entry could admit an SMB caller, by the rules above: ``everyone``, a
        DOMAIN\\name, UPN or SID entry, or a uid/gid entry other than 0. (Without one,
        only sessions Samba maps to a non-root owner's own uid get in.)"""
        return bool(
            self.everyone or self.accounts or self.upns or self.sids
            or self.uids - {0} or self.gids - {0}
        )


OWNER_ONLY = Acl()


def _account_names(caller: Caller) -> set[str]:
    """DOMAIN\\account, by the NetBIOS and the DNS domain Samba reports: never the bare
    account, which any domain may have."""
    if not caller.account:
        return set()
    dns_domain = caller.extra.get("dns_domain")
    domains = {caller.domain, dns_domain if isinstance(dns_domain, str) else None}
    return {f"{d}\\{caller.account}".lower() for d in domains if d}


def _upn_names(caller: Caller) -> set[str]:
    """The UPN Samba reports, and account@DNS domain (the account's implicit UPN)."""
    names = set()
    upn, dns_domain = caller.extra.get("upn"), caller.extra.get("dns_domain")
    if isinstance(upn, str) and upn:
        names.add(upn.lower())
    if caller.account and isinstance(dns_domain, str) and dns_domain:
        names.add(f"{caller.account}@{dns_domain}".lower())
    return names


def _parts(entry: str, sep: str, form: str) -> tuple[str, str]:
    first, _, second = entry.partition(sep)
    for part in (first, second):
        if not part or part != part.strip() or sep in part:
            raise ConfigError(
                f"bad ACL entry {entry!r}: {form} (one {sep!r}, parts neither empty nor padded)"
            )
    return first, second


def _domain_account(entry: str) -> str:
    domain, name = _parts(entry, "\\", "a domain account is DOMAIN\\name")
    if "@" in domain:
        raise ConfigError(f"bad ACL entry {entry!r}: DOMAIN\\name, or name@REALM, not both")
    return f"{domain}\\{name}".lower()


def _upn(entry: str) -> str:
    if "\\" in entry:
        raise ConfigError(f"bad ACL entry {entry!r}: name@REALM, or DOMAIN\\name, not both")
    name, realm = _parts(entry, "@", "a user principal name is name@REALM")
    return f"{name}@{realm}".lower()


def _check_sid(sid: str) -> str:
    if not sid.upper().startswith("S-1-"):
        raise ConfigError(f"{sid!r} is not a SID (S-1-...) in the pipe's ACL")
    return sid.upper()


def _posix_only(kind: str, name: str) -> ConfigError:
    return ConfigError(
        f"{kind}:{name} in the pipe's ACL: a bare name is a Unix {kind}; on Windows name "
        f"the account as DOMAIN\\{name} (HOSTNAME\\{name} for a local one) or by its SID"
    )


def _uid(name: str) -> int:
    try:
        import pwd  # POSIX only; the Windows path matches SIDs and accounts
    except ImportError:
        raise _posix_only("user", name) from None
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ConfigError(f"unknown user {name!r} in the pipe's ACL") from None


def _gid(name: str) -> int:
    try:
        import grp
    except ImportError:
        raise _posix_only("group", name) from None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {name!r} in the pipe's ACL") from None
