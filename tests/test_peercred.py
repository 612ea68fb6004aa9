"""Peer credentials as macOS and the BSDs give them (``struct xucred``), sans I/O: the
macOS CI job is the only place they come from a kernel."""

from __future__ import annotations

import struct

from npipe.local.peercred import parse_xucred


def _xucred(uid: int, groups: list[int]) -> bytes:
    # <sys/ucred.h>: u_int cr_version (XUCRED_VERSION 0); uid_t cr_uid; short cr_ngroups;
    # gid_t cr_groups[NGROUPS] (16): 76 bytes, two of padding after cr_ngroups.
    raw = struct.pack("=IIh", 0, uid, len(groups)) + b"\0\0"
    raw += struct.pack("=16I", *(groups + [0] * (16 - len(groups))))
    assert len(raw) == 76
    return raw


def test_uid_and_groups_effective_gid_first() -> None:
    assert parse_xucred(_xucred(501, [20, 12, 61, 79])) == (501, (20, 12, 61, 79))


def test_sixteen_groups_at_most_and_a_short_answer() -> None:
    groups = list(range(100, 116))
    assert parse_xucred(_xucred(0, groups)) == (0, tuple(groups))
    assert parse_xucred(_xucred(7, [7])[:16]) == (7, (7,))  # (the kernel wrote less)
