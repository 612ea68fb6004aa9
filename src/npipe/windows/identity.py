"""Who is on the other end of a Windows pipe, who may be, and whom a client trusts (sans I/O).

The kernel enforces the pipe's DACL (:mod:`npipe.windows.sddl`) when a client opens it;
npipe checks the caller again against the :class:`Acl`, as on Linux, so that a handler
never runs for a caller the ACL does not name (a DACL edited by hand, an inherited
handle). Clients check the server as :func:`npipe.local.dial.check_server` does: it must
run as this user, SYSTEM or Administrators, or as the ``server_user`` named.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from npipe.acl import Acl
from npipe.errors import AccessDenied, ConfigError
from npipe.identity import Caller
from npipe.windows.sddl import ADMINISTRATORS_SID, SYSTEM_SID, strict_sid

# Token groups carry attributes (TOKEN_GROUPS, SID_AND_ATTRIBUTES): only enabled groups
# count, and a deny-only group (UAC's filtered Administrators) never admits anyone.
SE_GROUP_ENABLED = 0x0000_0004
SE_GROUP_USE_FOR_DENY_ONLY = 0x0000_0010


def enabled_group_sids(groups: Sequence[tuple[str, int]]) -> tuple[str, ...]:
    """The SIDs of (sid, attributes) token groups that are enabled and not deny-only."""
    return tuple(
        sid for sid, attributes in groups
        if attributes & SE_GROUP_ENABLED and not attributes & SE_GROUP_USE_FOR_DENY_ONLY
    )


def windows_caller(
    *,
    pid: int | None,
    sid: str,
    account: str | None,
    domain: str | None,
    group_sids: Sequence[str] = (),
    remote: bool = False,
    address: str | None = None,
) -> Caller:
    """A :class:`Caller` from the client's token: its user ``sid`` (first in ``sids``),
    its enabled group SIDs (see :func:`enabled_group_sids`), its account and domain
    (LookupAccountSid). ``remote``: the client came over SMB (transport ``"smb"``).
    Windows callers have no uid or gid."""
    user = strict_sid(sid, "caller SID")
    groups = [strict_sid(g, "group SID") for g in group_sids]
    sids = tuple(dict.fromkeys([user, *groups]))
    return Caller(
        "smb" if remote else "local", pid=pid, user=account, account=account,
        domain=domain, sids=sids, address=address,
    )


def acl_admits(
    acl: Acl, caller: Caller, owner_sid: str, *, resolved: Collection[str] = ()
) -> bool:
    """True if ``acl`` admits ``caller`` to a pipe served by ``owner_sid``: the owner,
    SYSTEM, an (enabled) Administrators member, a SID the ACL names or ``resolved`` (its
    accounts and UPNs resolved when the server started: :func:`sddl.admitted_sids`), an
    account named DOMAIN\\name (case-insensitively), or everyone."""
    if acl.everyone:
        return True
    if not caller.sids:
        return False
    sids = {s.upper() for s in caller.sids}
    user = caller.sids[0].upper()
    if user in (owner_sid.upper(), SYSTEM_SID) or ADMINISTRATORS_SID in sids:
        return True
    if sids & (acl.sids | {r.upper() for r in resolved}):
        return True
    if caller.account and caller.domain:
        return f"{caller.domain}\\{caller.account}".lower() in acl.accounts
    return False


def check_server_owner(
    expected: str | int | None,
    actual_sid: str,
    own_sid: str,
    *,
    path: str = "the pipe",
    actual_name: str | None = None,
    resolve_account: Callable[[str], str] | None = None,
) -> None:
    """Refuse a pipe whose server (its process token's user, or the pipe's owner SID)
    is not this user (``own_sid``), SYSTEM, Administrators (an elevated administrator's
    objects are owned by BA) or ``expected``: a SID, ``DOMAIN\\name`` or a bare name
    (resolved with ``resolve_account`` when given, else compared with ``actual_name``,
    the server's DOMAIN\\name, case-insensitively)."""
    actual = actual_sid.upper()
    if actual in (own_sid.upper(), SYSTEM_SID, ADMINISTRATORS_SID):
        return
    if expected is not None and _is_expected(expected, actual, actual_name, resolve_account):
        return
    who = f"{actual_name} ({actual})" if actual_name else actual
    raise AccessDenied(
        f"pipe {path} is served by {who}, not by you, SYSTEM or Administrators: name the "
        "server user you expect (server_user=..., --server-user) if you trust it"
    )


def _is_expected(
    expected: str | int,
    actual: str,
    actual_name: str | None,
    resolve_account: Callable[[str], str] | None,
) -> bool:
    if isinstance(expected, int):
        raise ConfigError(
            f"server_user={expected}: a uid has no meaning on Windows; name the account "
            "(DOMAIN\\name) or its SID"
        )
    if expected.upper().startswith("S-1-"):
        return strict_sid(expected, "server_user SID") == actual
    if resolve_account is not None:
        try:
            return strict_sid(resolve_account(expected)) == actual
        except (LookupError, OSError, ValueError) as e:
            raise ConfigError(f"unknown server_user {expected!r}: {e}") from e
    if not actual_name:
        return False
    want, have = expected.lower(), actual_name.lower()
    # A bare name matches the account part only: "svc" is HOST\svc or DOMAIN\svc.
    return want == have if "\\" in want else want == have.rpartition("\\")[2]
