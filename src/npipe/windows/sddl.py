"""A pipe's security descriptor, in SDDL, from an :class:`npipe.Acl` (sans I/O).

The DACL is protected (``D:P``: nothing inherited) and names everyone it admits:

- full control (``FA``) for the owner, LocalSystem (``SY``) and Administrators (``BA``):
  the owner needs FILE_CREATE_PIPE_INSTANCE to create the next instance of its pipe;
- :data:`CLIENT_ACCESS` for each principal the ACL admits: read and write the pipe's data,
  read its attributes and security (the owner check), set its read mode; never
  FILE_CREATE_PIPE_INSTANCE, whose bit is FILE_APPEND_DATA's, so never FILE_GENERIC_WRITE
  (``FW``/``GW``/``GA``): a client holding it could create an instance of its own and
  answer the next caller ("Named Pipe Security and Access Rights", learn.microsoft.com);
- unless the pipe is served remotely, a deny ACE for NETWORK (``NU``, S-1-5-2) first, in
  addition to PIPE_REJECT_REMOTE_CLIENTS. A deny ACE comes before the allow ACEs, the
  canonical order. (A process whose token holds NETWORK, e.g. one started over some SSH
  logons, cannot use a local-only pipe either: serve it with remote=True.)

Format ("Security Descriptor String Format", "ACE Strings", "SID Strings"):
``O:owner_sid D:P(ace_type;ace_flags;rights;object_guid;inherit_object_guid;account_sid)``;
rights may be a hex mask (``0x12018b``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from npipe.acl import Acl
from npipe.errors import ConfigError

# File and pipe access rights ("File Access Rights Constants", "Standard Access Rights").
FILE_READ_DATA = 0x0001
FILE_WRITE_DATA = 0x0002
FILE_APPEND_DATA = 0x0004
FILE_CREATE_PIPE_INSTANCE = 0x0004  # the same bit as FILE_APPEND_DATA, for pipes
FILE_READ_EA = 0x0008
FILE_WRITE_EA = 0x0010
FILE_READ_ATTRIBUTES = 0x0080
FILE_WRITE_ATTRIBUTES = 0x0100  # SetNamedPipeHandleState (read mode) needs it
READ_CONTROL = 0x0002_0000  # read the security descriptor (the pipe's owner)
SYNCHRONIZE = 0x0010_0000
STANDARD_RIGHTS_READ = READ_CONTROL
STANDARD_RIGHTS_WRITE = READ_CONTROL
FILE_GENERIC_READ = (
    STANDARD_RIGHTS_READ | FILE_READ_DATA | FILE_READ_ATTRIBUTES | FILE_READ_EA | SYNCHRONIZE
)  # 0x120089
FILE_GENERIC_WRITE = (
    STANDARD_RIGHTS_WRITE | FILE_WRITE_DATA | FILE_WRITE_ATTRIBUTES | FILE_WRITE_EA
    | FILE_APPEND_DATA | SYNCHRONIZE
)  # 0x120116: includes FILE_CREATE_PIPE_INSTANCE, so never granted to clients

# What an admitted client gets, and what npipe's client asks for in CreateFileW: asking
# GENERIC_WRITE would ask for FILE_APPEND_DATA too and be refused by this DACL.
CLIENT_ACCESS = FILE_GENERIC_READ | FILE_WRITE_DATA | FILE_WRITE_ATTRIBUTES  # 0x12018b
assert not CLIENT_ACCESS & FILE_CREATE_PIPE_INSTANCE

# Well-known SIDs ("Well-known SIDs") and their SDDL aliases ("SID Strings").
SYSTEM_SID = "S-1-5-18"  # SY
ADMINISTRATORS_SID = "S-1-5-32-544"  # BA
EVERYONE_SID = "S-1-1-0"  # WD
NETWORK_SID = "S-1-5-2"  # NU: logons over the network

# S-R-I-S-S...: revision 1, an identifier authority, at least one sub-authority. Strict,
# because a SID is pasted into SDDL: ")(A;;FA;;;WD)" must never get through.
_SID = re.compile(r"S-1-(?:[0-9]{1,13}|0X[0-9A-F]{12})(?:-[0-9]{1,10}){1,15}\Z")


def strict_sid(sid: str, what: str = "SID") -> str:
    """``sid`` upper-cased if it is a well-formed SID string; ConfigError otherwise."""
    text = sid.strip().upper() if isinstance(sid, str) else ""
    if not _SID.match(text) or any(int(p) > 0xFFFFFFFF for p in text.split("-")[3:]):
        raise ConfigError(f"{sid!r} is not a valid {what} (S-1-5-21-...)")
    return text


def admitted_sids(
    acl: Acl, resolve_account: Callable[[str], str] | None = None
) -> frozenset[str]:
    """The SIDs the ACL names: ``acl.sids`` and its accounts and UPNs resolved to SIDs.
    ``everyone`` is not among them (it is no SID of the caller's to compare)."""
    for uid in sorted(acl.uids):
        raise ConfigError(
            f"ACL entry uid:{uid} (or a local user name) has no meaning on Windows: name the "
            "account (user:DOMAIN\\name or user:name@REALM) or its SID (sid:S-1-...)"
        )
    for gid in sorted(acl.gids):
        raise ConfigError(
            f"ACL entry gid:{gid} (or a group name) has no meaning on Windows: name the "
            "group's SID (sid:S-1-...)"
        )
    sids = {strict_sid(s, "SID in the pipe's ACL") for s in acl.sids}
    for name in sorted(acl.accounts | acl.upns):
        if resolve_account is None:
            raise ConfigError(
                f"ACL entry {name!r} cannot be resolved to a SID here: give its SID "
                "(sid:S-1-...)"
            )
        try:
            sid = resolve_account(name)
        except (LookupError, OSError, ValueError) as e:
            raise ConfigError(f"unknown account {name!r} in the pipe's ACL: {e}") from e
        sids.add(strict_sid(sid, f"SID for {name!r}"))
    return frozenset(sids)


def pipe_security_descriptor(
    acl: Acl,
    *,
    owner_sid: str,
    remote: bool,
    resolve_account: Callable[[str], str] | None = None,
) -> str:
    """The SDDL for a pipe served by ``owner_sid`` to what ``acl`` admits; ``remote``: SMB
    clients may come too (then the ACL must name who)."""
    owner = strict_sid(owner_sid, "owner SID")
    principals = admitted_sids(acl, resolve_account)
    if remote and not (acl.everyone or principals):
        raise ConfigError(
            "a pipe served to remote clients needs an ACL that names who may come over the "
            "network (user:DOMAIN\\name, user:name@REALM, sid:S-1-..., or everyone): the "
            "owner alone is the default for local pipes only"
        )
    aces = [] if remote else [f"(D;;FA;;;{_alias(NETWORK_SID)})"]
    full = (owner, SYSTEM_SID, ADMINISTRATORS_SID)
    aces += [f"(A;;FA;;;{_alias(sid)})" for sid in dict.fromkeys(full)]
    clients = sorted(principals - set(full))
    if acl.everyone:
        clients = [EVERYONE_SID]  # admits them all; one ACE says it
    aces += [f"(A;;{CLIENT_ACCESS:#x};;;{_alias(sid)})" for sid in clients]
    return f"O:{_alias(owner)}D:P{''.join(aces)}"


_ALIASES = {SYSTEM_SID: "SY", ADMINISTRATORS_SID: "BA", EVERYONE_SID: "WD", NETWORK_SID: "NU"}


def _alias(sid: str) -> str:
    return _ALIASES.get(sid, sid)
