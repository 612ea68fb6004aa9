"""Message-mode pipes over SMB (npipe.connection.Client to \\\\HOST\\pipe\\NAME): not yet.

What a real smbd does with a message-mode pipe (the NPA reply's file_type 2), seen on
Samba 4.17.12 with npipe's native client (a hand-run probe: raw SMB2 WRITE/READ on the
opened pipe, a Unix listener in np/ answering the NPA request with file_type 2):

- client -> np/ socket: a WRITE of 5 bytes arrives as ``05 00`` + the 5 bytes (the
  2-byte little-endian length, one frame per WRITE);
- a WRITE of 70,000 bytes fails with 0xC000002F (STATUS_PORT_MESSAGE_TOO_LONG: smbd's
  EMSGSIZE) and nothing reaches the socket: smbd refuses, it does not split. So a
  message through Samba is at most 65,535 bytes, in both directions;
- np/ socket -> client: each frame is handed out by READs; a READ shorter than the
  message returns STATUS_SUCCESS (not STATUS_BUFFER_OVERFLOW) with the first part, and
  the next READ the rest; a READ never spans two messages (``abc`` then ``hi`` came in
  separate READs of 100 bytes). So a client can tell a message's end only by asking
  for 65,535 bytes (a whole message always fits), not by the status;
- a 0-byte frame from the server makes that READ fail with 0xC0000185
  (STATUS_IO_DEVICE_ERROR), and the pipe goes on (the next READ had the next message):
  0-byte messages cannot cross Samba.
"""

from __future__ import annotations

from typing import Any

from npipe.address import PipeAddress
from npipe.errors import UnsupportedPlatform


def open_message_pipe(addr: PipeAddress, **dial: Any) -> Any:
    raise UnsupportedPlatform(
        f"{addr}: message pipes over SMB are not supported yet (npipe.connection.Client "
        "reaches local message pipes only)")
