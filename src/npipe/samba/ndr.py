"""A small reader for NDR32, little-endian: just what Samba's ``named_pipe_auth`` uses.

NDR (DCE 1.1 RPC, C706 chapter 14) as Samba's pidl writes it:

- every primitive is aligned to its own size, counted from byte 0 of the buffer that was
  pushed (for ``named_pipe_auth`` that is the 4-byte length prefix of the message);
  NTTIME is the exception: 8 bytes aligned to 4 (pidl's ``udlong``);
- a ``[unique]`` pointer is a 4-byte referent id, 0 for NULL; what it points to
  ("deferred" data) follows the structure that holds the pointer, in member order;
- a conformant array is a 4-byte element count followed by the elements (in NDR32 the
  ``uint3264`` counts are 4 bytes);
- a ``[string]`` through a pointer is size, offset (always 0), length, then ``length``
  bytes that include the terminating NUL.

Every read checks the bytes left, and every count read from the wire is checked against
the bytes left before anything is looped over or allocated, so hostile input costs work
in proportion to its length and fails with :class:`NdrError` and nothing else.
"""

from __future__ import annotations

import struct

# A dom_sid has at most 15 sub-authorities (MS-DTYP 2.4.2.2; Samba's ndr_pull_dom_sid
# rejects more), so its wire form is 8 to 68 bytes.
MAX_SUB_AUTHORITIES = 15
MIN_SID_SIZE = 8
# MS-DTYP 2.4.2.1: an identifier authority of 2**32 or more is written in hex.
_SID_AUTHORITY_HEX_FROM = 1 << 32

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class NdrError(ValueError):
    """The bytes are not the NDR structure that was expected (the message says where)."""


class NdrReader:
    """Reads NDR32 little-endian primitives from ``data[offset:end]``.

    ``offset`` is public so a caller can note where something started; alignment is
    always computed from index 0 of ``data``.
    """

    __slots__ = ("_data", "end", "offset")

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self._data = data
        self.offset = offset
        self.end = len(data) if end is None else end

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def remaining(self) -> int:
        return max(0, self.end - self.offset)

    def _take(self, size: int, what: str) -> int:
        """Claim ``size`` bytes at the current offset and return where they start."""
        start = self.offset
        if size < 0 or start + size > self.end:
            raise NdrError(
                f"{what}: needs {size} bytes at offset {start}, "
                f"only {max(0, self.end - start)} left"
            )
        self.offset = start + size
        return start

    def align(self, size: int) -> None:
        # No bounds check here: the read that follows the padding does it, and a
        # structure may legitimately end exactly at the end of the data.
        self.offset += -self.offset % size

    def u8(self, what: str) -> int:
        return self._data[self._take(1, what)]

    def u16(self, what: str) -> int:
        self.align(2)
        return int(_U16.unpack_from(self._data, self._take(2, what))[0])

    def u32(self, what: str) -> int:
        self.align(4)
        return int(_U32.unpack_from(self._data, self._take(4, what))[0])

    def hyper(self, what: str) -> int:
        """A 64-bit integer aligned to 8 (``hyper``, ``uid_t``, 64-bit bitmaps)."""
        self.align(8)
        return int(_U64.unpack_from(self._data, self._take(8, what))[0])

    def nttime(self, what: str) -> int:
        """NTTIME: 64 bits but aligned to 4 only (pidl pushes it as ``udlong``)."""
        self.align(4)
        return int(_U64.unpack_from(self._data, self._take(8, what))[0])

    def raw(self, size: int, what: str) -> bytes:
        start = self._take(size, what)
        return self._data[start : start + size]

    def skip(self, size: int, what: str) -> None:
        self._take(size, what)

    def raw_at(self, offset: int, size: int, what: str) -> bytes:
        """Bytes somewhere else (a relative pointer's target); the offset is not moved."""
        if offset < 0 or offset + size > self.end:
            raise NdrError(f"{what}: {size} bytes at offset {offset} run past the end")
        return self._data[offset : offset + size]

    def find_utf16_nul(self, start: int) -> int:
        """The offset just past the first 2-byte-aligned (from ``start``) UTF-16 NUL, or -1."""
        at = start
        while True:
            at = self._data.find(b"\0\0", at, self.end)
            if at < 0:
                return -1
            if (at - start) % 2 == 0:
                return at + 2
            at += 1

    def pointer(self, what: str) -> bool:
        """A ``[unique]`` pointer: True when data for it follows as deferred data."""
        return self.u32(what) != 0

    def count(self, what: str, min_element_size: int) -> int:
        """A count read from the wire, refused unless its elements can fit in what is left.

        ``min_element_size`` is the smallest wire size one element can have, so a forged
        count can never make the caller loop (or allocate) past the end of the data.
        """
        n = self.u32(what)
        if n * min_element_size > self.remaining:
            raise NdrError(
                f"{what}: {n} elements of at least {min_element_size} bytes "
                f"run past the end ({self.remaining} bytes left at offset {self.offset})"
            )
        return n

    def conformance(self, what: str, expected: int) -> None:
        """The size word of a conformant array, which must equal its ``size_is`` field."""
        size = self.u32(what)
        if size != expected:
            raise NdrError(f"{what}: array size {size} does not match its count {expected}")

    def data_blob(self, what: str) -> None:
        """Steps over a DATA_BLOB (4-byte length, then the bytes) without keeping it."""
        self.skip(self.u32(what), what)

    def string(self, what: str, encoding: str = "utf-8") -> str:
        """The deferred part of a ``[string]`` pointer: size, offset, length, bytes, NUL."""
        size = self.u32(what)
        offset = self.u32(what)
        length = self.u32(what)
        if offset != 0:
            raise NdrError(f"{what}: string offset {offset} is not 0")
        if length > size:
            raise NdrError(f"{what}: string length {length} exceeds its size {size}")
        if length == 0:
            raise NdrError(f"{what}: string has no terminating NUL")
        data = self.raw(length, what)
        if data[-1] != 0:
            raise NdrError(f"{what}: string is not NUL-terminated")
        if 0 in data[:-1]:
            raise NdrError(f"{what}: string has an embedded NUL")
        try:
            return data[:-1].decode(encoding)
        except UnicodeDecodeError as exc:
            raise NdrError(f"{what}: string is not valid {encoding}: {exc.reason}") from None

    def dom_sid(self, what: str) -> str:
        """A dom_sid in its NDR form, returned as the usual 'S-1-5-21-...' string."""
        self.align(4)
        revision = self.u8(what)
        n = self.u8(what)
        if n > MAX_SUB_AUTHORITIES:
            raise NdrError(f"{what}: SID has {n} sub-authorities, at most 15 allowed")
        authority = int.from_bytes(self.raw(6, what), "big")
        start = self._take(4 * n, what)
        subs = struct.unpack_from(f"<{n}I", self._data, start)
        return format_sid(revision, authority, subs)


def format_sid(revision: int, authority: int, sub_authorities: tuple[int, ...]) -> str:
    """The MS-DTYP 2.4.2.1 string form of a SID."""
    auth = f"0x{authority:012X}" if authority >= _SID_AUTHORITY_HEX_FROM else str(authority)
    return "-".join(["S", str(revision), auth, *map(str, sub_authorities)])
