"""The ACL note beside a local pipe's socket: who its ACL admits, in words and in numbers.

A server writes it (``.acl-<name>``, see npipe.local.listener) when it claims the pipe;
``npipe ls`` shows its ``text``, and a client that connected reads the rest to tell a
refusal by the ACL from a crash: the front door closes a refused caller's connection
without a word, which on its own looks like a server that failed.

The note holds what the front door checks for a *local* caller (npipe.acl): the
server's uid (the owner), ``everyone``, the admitted uids and gids. Windows-style
entries (DOMAIN\\name, UPNs, SIDs) never admit a local caller and are only in the text.
It also says which server wrote it: the pid that listens on the socket and the socket's
inode. A client trusts a note only once it is connected, to a listener (SO_PEERCRED)
with that pid, on a socket with that inode, owned like the note by that uid: a note a
dead server left behind, or another user put there, predicts nothing, and neither does
an older npipe's plain-text note. No prediction means connecting as before.

Pure functions only (bytes in, bytes out): the reading and the checks are npipe.local.dial's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from npipe.acl import Acl
from npipe.identity import Caller

# A note is a few words and numbers; whatever is there beyond this is not read.
MAX_NOTE_BYTES = 1000


@dataclass(frozen=True)
class AclNote:
    """A parsed note: ``text`` for people; the rest (None in an older npipe's plain-text
    note, or one too long to hold them) for a client's prediction."""

    text: str
    owner: int | None = None  # the server's uid (the pipe's owner in its ACL)
    pid: int | None = None  # the process listening on the socket
    socket: int | None = None  # the socket's inode number
    everyone: bool = False
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    @property
    def predicts(self) -> bool:
        return None not in (self.owner, self.pid, self.socket)


def build_note(acl: Acl, text: str, *, owner: int, pid: int, socket: int) -> bytes:
    """The note a server of uid ``owner`` writes for ``acl`` (``text``: the ACL in words),
    listening in process ``pid`` on the socket with inode ``socket``; at most
    MAX_NOTE_BYTES (a longer text is shortened, and an ACL too long to list leaves the
    numbers out: the note then predicts nothing)."""
    fields: dict[str, object] = {
        "text": text, "owner": owner, "pid": pid, "socket": socket,
        "everyone": acl.everyone, "uids": sorted(acl.uids), "gids": sorted(acl.gids),
    }
    raw = _fit(fields)
    if len(raw) > MAX_NOTE_BYTES:  # the numbers alone do not fit: words only
        raw = _fit({"text": text})
    return raw


def _dump(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def _fit(fields: dict[str, object]) -> bytes:
    """``fields`` as JSON, its text cut (and marked "...") until the whole fits in
    MAX_NOTE_BYTES, if that can be done by cutting the text (each character cut takes a
    byte or more off)."""
    raw = _dump(fields)
    text = str(fields["text"])
    while len(raw) > MAX_NOTE_BYTES and text:
        text = text[:max(0, len(text) - (len(raw) - MAX_NOTE_BYTES) - 3)]
        raw = _dump({**fields, "text": text + "..."})
    return raw


def parse_note(raw: bytes) -> AclNote:
    """A note as read (at most MAX_NOTE_BYTES): anything that is not a note of this
    format is taken for an older npipe's plain text (shown, never used to predict)."""
    text = raw.decode(errors="replace")
    try:
        fields = json.loads(raw)
    except ValueError:
        return AclNote(text)
    if not isinstance(fields, dict) or not isinstance(fields.get("text"), str):
        return AclNote(text)
    note = AclNote(fields["text"])
    owner, pid, socket = (fields.get(k) for k in ("owner", "pid", "socket"))
    everyone, uids, gids = (fields.get(k) for k in ("everyone", "uids", "gids"))
    if not (_ids([owner, pid, socket]) and isinstance(everyone, bool)
            and isinstance(uids, list) and _ids(uids)
            and isinstance(gids, list) and _ids(gids)):
        return note
    assert isinstance(owner, int) and isinstance(pid, int) and isinstance(socket, int)
    return AclNote(note.text, owner, pid, socket, everyone, frozenset(uids), frozenset(gids))


def _ids(values: Iterable[object]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def admits(
    note: AclNote, *, uid: int, gid: int, groups: Iterable[int],
    listener: tuple[int, int], socket: tuple[int, int],
) -> bool | None:
    """Whether the server that wrote ``note`` admits a local caller with these ids (the
    caller's effective uid and gid and its supplementary groups: what SO_PEERCRED and
    SO_PEERGROUPS tell the front door), by the front door's own rule (Acl.allows: root,
    the owner, a uid entry, a gid entry, everyone).

    None (no prediction) unless the note is the connected server's own: ``listener`` is
    its (pid, uid) from SO_PEERCRED, ``socket`` the (inode, owner uid) of the socket
    dialled, and the note must name that pid, inode and uid.
    """
    if not note.predicts or note.owner is None:
        return None
    if (note.pid, note.owner) != listener or (note.socket, note.owner) != socket:
        return None
    acl = Acl(uids=note.uids, gids=note.gids, everyone=note.everyone)
    caller = Caller("local", uid=uid, gid=gid, groups=tuple(groups))
    return acl.allows(caller, owner_uid=note.owner)


__all__ = ["MAX_NOTE_BYTES", "AclNote", "admits", "build_note", "parse_note"]
