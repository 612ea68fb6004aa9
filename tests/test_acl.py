"""ACLs and caller identities (platform-neutral)."""

from __future__ import annotations

import pytest

from npipe import Acl, Caller, ConfigError
from npipe.acl import OWNER_ONLY

OWNER = 1000


def local(uid: int, gid: int = 100, groups: tuple[int, ...] = ()) -> Caller:
    return Caller("local", uid=uid, gid=gid, pid=42, groups=groups, user=f"u{uid}")


def test_owner_only_by_default() -> None:
    assert OWNER_ONLY.allows(local(OWNER), owner_uid=OWNER)
    assert OWNER_ONLY.allows(local(0), owner_uid=OWNER)  # root
    assert not OWNER_ONLY.allows(local(1001), owner_uid=OWNER)


def test_users_groups_and_supplementary_groups() -> None:
    acl = Acl.allow(users=[1001], groups=[500])
    assert acl.allows(local(1001), owner_uid=OWNER)
    assert acl.allows(local(1002, gid=500), owner_uid=OWNER)
    assert acl.allows(local(1003, groups=(7, 500)), owner_uid=OWNER)
    assert not acl.allows(local(1004, gid=501, groups=(7,)), owner_uid=OWNER)


def test_everyone() -> None:
    assert Acl.parse("everyone").allows(local(4242), owner_uid=OWNER)


def test_remote_callers_by_sid_and_account() -> None:
    acl = Acl.allow(users=["NPIPE\\alice"], sids=["S-1-5-21-1-2-3-1104"])
    alice = Caller("smb", account="alice", domain="NPIPE", sids=("S-1-5-21-9-9-9-500",))
    bob = Caller("smb", account="bob", domain="NPIPE", sids=("s-1-5-21-1-2-3-1104",))
    eve = Caller("smb", account="eve", domain="NPIPE", sids=("S-1-5-21-1-2-3-666",))
    assert acl.allows(alice, owner_uid=OWNER)
    assert acl.allows(bob, owner_uid=OWNER)  # SIDs compare case-insensitively
    assert not acl.allows(eve, owner_uid=OWNER)


def test_parse_forms() -> None:
    acl = Acl.parse("uid:1001, gid:500,sid:S-1-5-32-544")
    assert acl.uids == {1001} and acl.gids == {500} and acl.sids == {"S-1-5-32-544"}


@pytest.mark.parametrize("text", ["user", "uid:abc", "group:", "sid:X-1", "admin:1", "everyone:x"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        Acl.parse(text)


def test_unknown_user_fails_at_construction() -> None:
    pytest.importorskip("pwd")
    with pytest.raises(ConfigError, match="unknown user 'no-such-user-xyz'"):
        Acl.allow(users=["no-such-user-xyz"])


def test_caller_text() -> None:
    assert str(local(1000)) == "u1000 uid=1000 pid=42"
    remote = Caller("smb", account="alice", domain="NPIPE", address="198.18.0.2", port=50000)
    assert str(remote) == "NPIPE\\alice from 198.18.0.2:50000"


# --- remote callers (transport="smb"): who a name, a SID or a uid admits ----------------


def smb(
    account: str,
    domain: str,
    uid: int | None = None,
    gid: int | None = None,
    groups: tuple[int, ...] = (),
    sids: tuple[str, ...] = (),
    upn: str | None = None,
    dns_domain: str | None = None,
) -> Caller:
    """A remote caller as the Samba front door builds it from a named_pipe_auth request."""
    return Caller("smb", uid=uid, gid=gid, groups=groups, user=account, account=account,
                  domain=domain, sids=sids, address="198.18.0.2", port=50000,
                  extra={"upn": upn, "dns_domain": dns_domain})


@pytest.fixture
def nobody() -> int:
    """A local user that exists on every Debian host: the bare name 'nobody'."""
    pwd = pytest.importorskip("pwd")
    return int(pwd.getpwnam("nobody").pw_uid)


def test_a_bare_name_is_the_local_user_only(nobody: int) -> None:
    acl = Acl.allow(users=["nobody"])
    assert acl.uids == {nobody} and acl.accounts == frozenset()
    assert acl.allows(local(nobody), owner_uid=OWNER)
    # another domain's "nobody", mapped by Samba to a uid of its own: not her
    for domain in ("OTHER", "NPIPE", "VM"):
        assert not acl.allows(smb("nobody", domain, uid=3000042), owner_uid=OWNER)
    # ...nor a session without a Unix mapping at all
    assert not acl.allows(smb("nobody", "VM"), owner_uid=OWNER)


def test_a_bare_name_admits_the_session_samba_maps_to_that_user(nobody: int) -> None:
    """Samba maps a session to the local uid when it authenticated as that account
    (standalone: its passdb entry), so the local user over SMB is the local user."""
    acl = Acl.allow(users=["nobody"])
    assert acl.allows(smb("nobody", "VM", uid=nobody, gid=nobody), owner_uid=OWNER)
    assert Acl.parse("user:nobody").allows(smb("x", "Y", uid=nobody), owner_uid=OWNER)


def test_domain_accounts_match_domain_and_name() -> None:
    acl = Acl.allow(users=["NPIPE\\alice"])
    assert acl.accounts == {"npipe\\alice"}
    assert acl.allows(smb("alice", "NPIPE"), owner_uid=OWNER)
    assert acl.allows(smb("ALICE", "npipe"), owner_uid=OWNER)  # case-insensitive
    assert not acl.allows(smb("alice", "OTHER"), owner_uid=OWNER)
    assert not acl.allows(smb("alice", ""), owner_uid=OWNER)
    assert not acl.allows(smb("bob", "NPIPE"), owner_uid=OWNER)
    # a local user called alice is not NPIPE\alice
    assert not acl.allows(Caller.local(pid=1, uid=4242, gid=4242), owner_uid=OWNER)
    assert not acl.allows(
        Caller("local", uid=4242, gid=4242, pid=1, user="alice"), owner_uid=OWNER
    )


def test_domain_accounts_by_dns_domain() -> None:
    acl = Acl.allow(users=["npipe.test\\alice"])
    assert acl.allows(smb("alice", "NPIPE", dns_domain="NPIPE.TEST"), owner_uid=OWNER)
    assert not acl.allows(smb("alice", "NPIPE", dns_domain="OTHER.TEST"), owner_uid=OWNER)


def test_upn_entries_match_the_upn_or_account_at_dns_domain() -> None:
    acl = Acl.allow(users=["alice@NPIPE.TEST"])
    assert acl.upns == {"alice@npipe.test"} and acl.accounts == frozenset()
    # the UPN Samba reports (Kerberos or NTLM against a DC), case-insensitive
    assert acl.allows(smb("alice", "NPIPE", upn="alice@npipe.test"), owner_uid=OWNER)
    # an account whose UPN was not sent: account@DNS domain, its implicit UPN
    assert acl.allows(smb("ALICE", "NPIPE", dns_domain="npipe.test"), owner_uid=OWNER)
    assert not acl.allows(smb("alice", "NPIPE", upn="alice@other.test"), owner_uid=OWNER)
    assert not acl.allows(smb("alice", "OTHER", dns_domain="OTHER.TEST"), owner_uid=OWNER)
    assert not acl.allows(smb("alice", "VM"), owner_uid=OWNER)  # standalone: no realm
    assert not acl.allows(smb("bob", "NPIPE", upn="bob@npipe.test",
                              dns_domain="NPIPE.TEST"), owner_uid=OWNER)


def test_parse_remote_forms() -> None:
    acl = Acl.parse("user:NPIPE\\alice,user:bob@NPIPE.TEST,sid:s-1-5-21-1-2-3-1104")
    assert acl.accounts == {"npipe\\alice"} and acl.upns == {"bob@npipe.test"}
    assert acl.sids == {"S-1-5-21-1-2-3-1104"}
    assert acl.allows(smb("alice", "npipe"), owner_uid=OWNER)
    assert acl.allows(smb("bob", "NPIPE", upn="bob@npipe.test"), owner_uid=OWNER)


MALFORMED = ["NPIPE\\", "\\alice", "\\", "A\\B\\c", "@NPIPE.TEST", "alice@", "@",
             "a@b@c", " NPIPE\\alice", "NPIPE\\alice ", "NPIPE\\ ", "alice @x"]


@pytest.mark.parametrize("entry", MALFORMED)
def test_malformed_remote_entries_are_refused(entry: str) -> None:
    with pytest.raises(ConfigError, match="ACL"):
        Acl.allow(users=[entry])
    if entry == entry.rstrip():  # (the CLI form strips blanks around an item)
        with pytest.raises(ConfigError, match="ACL"):
            Acl.parse(f"user:{entry}")


@pytest.mark.parametrize(
    "fields",
    [{"accounts": frozenset({"npt"})}, {"accounts": frozenset({"vm\\"})},
     {"upns": frozenset({"alice@"})}, {"sids": frozenset({"X-1-5"})}],
    ids=["bare-account", "empty-name", "empty-realm", "not-a-sid"],
)
def test_entries_no_caller_could_match_are_refused_when_made_directly(
    fields: dict[str, frozenset[str]],
) -> None:
    with pytest.raises(ConfigError):
        Acl(**fields)  # type: ignore[arg-type]


def test_direct_construction_normalises_case() -> None:
    acl = Acl(accounts=frozenset({"VM\\Npt"}), upns=frozenset({"A@B.TEST"}),
              sids=frozenset({"s-1-5-11"}))
    assert acl == Acl.allow(users=["vm\\npt", "a@b.test"], sids=["S-1-5-11"])


def test_a_remote_session_mapped_to_root_is_not_root() -> None:
    """Samba maps e.g. an AD DC's Administrator to uid 0: not the machine's root, not
    the owner of a pipe root serves, and no uid/gid 0 entry admits it."""
    remote_root = smb("Administrator", "NPIPE", uid=0, gid=0, groups=(0, 100))
    assert OWNER_ONLY.allows(local(0), owner_uid=0)
    assert not OWNER_ONLY.allows(remote_root, owner_uid=0)
    assert not OWNER_ONLY.allows(remote_root, owner_uid=OWNER)
    for acl in (Acl.allow(users=[0]), Acl.parse("uid:0"), Acl.allow(groups=[0]),
                Acl.parse("gid:0")):
        assert acl.allows(local(0), owner_uid=OWNER)
        assert not acl.allows(remote_root, owner_uid=0)
    pytest.importorskip("pwd")
    assert not Acl.allow(users=["root"], groups=["root"]).allows(remote_root, owner_uid=0)
    # named, it is admitted like any other account
    assert Acl.allow(users=["NPIPE\\Administrator"]).allows(remote_root, owner_uid=0)
    assert Acl.allow(sids=["S-1-5-21-1-2-3-500"]).allows(
        smb("Administrator", "NPIPE", uid=0, sids=("S-1-5-21-1-2-3-500",)), owner_uid=0)


def test_a_remote_session_mapped_to_the_owner_is_the_owner() -> None:
    """As a bare name admits the session Samba maps to that user, the owner's own uid
    admits the owner over SMB: a non-root owner only (see above)."""
    assert OWNER_ONLY.allows(smb("u1000", "VM", uid=OWNER, gid=OWNER), owner_uid=OWNER)
    assert not OWNER_ONLY.allows(smb("u1001", "VM", uid=OWNER + 1), owner_uid=OWNER)
    assert not OWNER_ONLY.allows(smb("u1000", "VM"), owner_uid=OWNER)  # no Unix mapping


def test_uid_and_gid_entries_admit_remote_sessions_mapped_to_them() -> None:
    acl = Acl.allow(users=[1001], groups=[500])
    assert acl.allows(smb("a", "VM", uid=1001, gid=1001), owner_uid=OWNER)
    assert acl.allows(smb("b", "VM", uid=1002, gid=500), owner_uid=OWNER)
    assert acl.allows(smb("c", "NPIPE", uid=3000015, gid=100, groups=(100, 500)),
                      owner_uid=OWNER)
    assert not acl.allows(smb("d", "VM", uid=1003, gid=501, groups=(501,)), owner_uid=OWNER)


@pytest.mark.parametrize(
    ("acl", "names"),
    [(OWNER_ONLY, False), (Acl.allow(users=[0], groups=[0]), False),
     (Acl.allow(users=[1001]), True), (Acl.allow(groups=[500]), True),
     (Acl.allow(users=["NPIPE\\alice"]), True), (Acl.allow(users=["a@NPIPE.TEST"]), True),
     (Acl.allow(sids=["S-1-5-11"]), True), (Acl.allow(everyone=True), True)],
    ids=["owner-only", "root-ids", "uid", "gid", "account", "upn", "sid", "everyone"],
)
def test_names_remote_callers(acl: Acl, names: bool) -> None:
    assert acl.names_remote_callers() is names
