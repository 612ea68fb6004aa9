"""Capture the SMB traffic of a test with dumpcap and check it with tshark.

    with capture(hosts.server_ns, hosts.server_if, workdir / "smb.pcap") as cap:
        ...                                  # SMB traffic on TCP 445
    smb2, bad = cap.check()                  # stops it
    assert smb2 > 0 and bad == []

``capture`` waits until dumpcap really captures (its output file has a header, which
it writes only after the interface is open and the filter set) and stops it at exit;
:meth:`Capture.stop` may also be called earlier (idempotent). tshark decodes TCP 445 as
SMB2. For an smbd on another port pass ``ports``: tshark then reads a copy of the
capture in which those ports are renumbered 445, because decoding them "as" NetBIOS
(``-d tcp.port==N,nbss``) is not the same: off port 445 tshark reads a NetBIOS length
of 17 bits, not SMB2's 24 (a message over 128 KiB derails the rest of the stream), and
it takes a NEGOTIATE response from a port above 1023 for a request, whose SPNEGO token
has no hints (Samba's then make a "BER Error"). Encrypted SMB3 shows only its transform
headers, which is fine: those are checked too.

Needs Wireshark's ``dumpcap`` and ``tshark`` (Debian: ``apt-get install tshark``);
:func:`require_tshark` skips without them, or fails when CI=true.
"""

from __future__ import annotations

import contextlib
import re
import signal
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from npipe.testing.netns import popen_in, skip_or_fail, tool

# The packets tshark could not dissect, whose dissection found an error, or that carry
# a NetBIOS session message that is neither SMB2 nor SMB (garbage in the stream).
BAD_FILTER = ("_ws.malformed || _ws.expert.severity == error"
              " || (nbss.type == 0x00 && !smb2 && !smb)")
SMB_PORT = 445
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
STOP_SETTLE = 0.75
READ_TIMEOUT = 120.0


def have_tshark() -> bool:
    return tool("tshark") is not None and tool("dumpcap") is not None


def require_tshark() -> None:
    """Skip unless dumpcap and tshark are installed; fail instead when CI=true."""
    if have_tshark():
        return
    skip_or_fail("dumpcap/tshark not found (apt-get install tshark)")


_ETHERNET = 1  # pcap LINKTYPE_ETHERNET: what Linux captures on lo and veth
_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<",
               b"\xa1\xb2\xc3\xd4": ">", b"\xa1\xb2\x3c\x4d": ">"}


def as_port_445(path: Path, ports: Sequence[int], out: Path) -> Path:
    """Copy the pcap file ``path`` to ``out`` with TCP ``ports`` renumbered 445 (the
    checksums go stale: tshark does not check them)."""
    data = bytearray(path.read_bytes())
    endian = _PCAP_MAGIC.get(bytes(data[:4]))
    if endian is None or len(data) < 24:
        raise RuntimeError(f"{path} is not a pcap file (dumpcap -P writes one)")
    if struct.unpack_from(endian + "I", data, 20)[0] != _ETHERNET:
        raise RuntimeError(f"{path}: not an Ethernet capture")
    wanted = set(ports)
    offset = 24
    while offset + 16 <= len(data):
        (caught,) = struct.unpack_from(endian + "I", data, offset + 8)
        packet, offset = offset + 16, offset + 16 + caught
        tcp = _tcp_offset(data, packet, offset)
        if tcp is None:
            continue
        for at in (tcp, tcp + 2):
            if int.from_bytes(data[at:at + 2], "big") in wanted:
                data[at:at + 2] = SMB_PORT.to_bytes(2, "big")
    out.write_bytes(data)
    return out


def _tcp_offset(data: bytearray, packet: int, end: int) -> int | None:
    """Where the TCP header of an Ethernet frame starts, if it has one (whole ports)."""
    ethertype = int.from_bytes(data[packet + 12:packet + 14], "big")
    ip = packet + 14
    if ethertype == 0x0800 and ip + 20 <= end and data[ip + 9] == 6:
        tcp = ip + (data[ip] & 0x0F) * 4
    elif ethertype == 0x86DD and ip + 40 <= end and data[ip + 6] == 6:
        tcp = ip + 40
    else:
        return None
    return tcp if tcp + 4 <= end else None


def _readable(path: Path, ports: Sequence[int]) -> Path:
    if all(port == SMB_PORT for port in ports):
        return path
    return as_port_445(path, ports, path.with_name(path.name + ".445.pcap"))


# dumpcap on a veth sees TCP segments in the order the kernel hands them over, not
# always the sender's: a large segment after the one that follows it, then part of it
# sent again. Wireshark 3.6 (Debian 12) does not reassemble out of order by default and
# then calls the retransmitted part "New fragment overlaps old data", a malformed TCP
# packet although the stream is sound (4.4 of Debian 13 takes it as a retransmission).
# Reassembling out of order also dissects the SMB2 message those segments complete.
_TSHARK_PREFS = ("-o", "tcp.reassemble_out_of_order:TRUE")


def _tshark(path: Path, ports: Sequence[int], *args: str) -> list[str]:
    argv = [tool("tshark") or "tshark", "-r", str(_readable(path, ports)), "-n",
            *_TSHARK_PREFS, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=READ_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"tshark failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return [line for line in done.stdout.splitlines() if line.strip()]


def check(path: Path, ports: Sequence[int] = (SMB_PORT,),
          nt_password: str | None = None) -> tuple[int, list[str]]:
    """How many captured packets carry SMB2 (SMB3 transform headers included), and the
    summary lines of the packets :data:`BAD_FILTER` picks (``path``: a pcap file, not
    pcapng, if ``ports`` are not just 445). One tshark pass.

    ``nt_password``: the NTLM users' password. With it tshark derives the session keys,
    decrypts SMB3 and checks what is inside too. Without it, tshark still "decrypts"
    with keys from an empty password and reads the garbage as SMB2 (false alarms)."""
    keys = ("-o", f"ntlmssp.nt_password:{nt_password}") if nt_password else ()
    out = _tshark(path, ports, *keys, "-Y", BAD_FILTER, "-z", "io,stat,0,smb2")
    stats = next((i for i, line in enumerate(out) if line.startswith("=====")), len(out))
    rows = [m for line in out[stats:]
            if (m := re.match(r"\|\s*[\d.:]+\s*<>\s*\S+\s*\|\s*(\d+)\s*\|", line))]
    if stats == len(out):
        raise RuntimeError("tshark printed no IO statistics:\n" + "\n".join(out[-20:]))
    return sum(int(m[1]) for m in rows), out[:stats]


def malformed(path: Path, ports: Sequence[int] = (SMB_PORT,)) -> list[str]:
    """The summary lines of the packets that tshark marks malformed or as errors."""
    return check(path, ports)[1]


def smb2_count(path: Path, ports: Sequence[int] = (SMB_PORT,)) -> int:
    return check(path, ports)[0]


# What protection() reads of each frame (-T fields: a field's occurrences, one per SMB2
# message of the frame for the header fields, comma-separated).
_PROTECTION_FIELDS = ("frame.number", "smb2.header.transform.msg_size", "smb2.cmd",
                      "smb2.flags.response", "smb2.flags.signature", "smb2.sesid",
                      "smb2.nt_status", "smb2.dialect", "smb2.sec_mode.sign_required",
                      "smb2.ses_flags.encrypt")
_NEGOTIATE, _SESSION_SETUP = 0, 1
_STATUS_PENDING = 0x00000103


@dataclass(frozen=True)
class Message:
    """One plaintext SMB2 message of a session (see :func:`protection`)."""

    frame: int
    command: int
    response: bool
    status: int
    signed: bool

    def __str__(self) -> str:
        kind = f"response status {self.status:#010x}" if self.response else "request"
        return (f"frame {self.frame}: command {self.command} {kind} "
                f"{'signed' if self.signed else 'unsigned'}")


@dataclass
class Protection:
    """How the captured SMB2 traffic was protected (see :func:`protection`)."""

    dialects: list[int] = field(default_factory=list)  # what NEGOTIATE responses chose
    signing_required: bool = False  # a NEGOTIATE response set SIGNING_REQUIRED
    encrypt_data: bool = False  # a SESSION_SETUP response set SESSION_FLAG_ENCRYPT_DATA
    encrypted: int = 0  # frames that carry an SMB3 TRANSFORM header
    plaintext: list[Message] = field(default_factory=list)  # of sessions, after SESSION_SETUP

    @property
    def signed(self) -> int:
        return sum(m.signed for m in self.plaintext)

    @property
    def unsigned(self) -> list[Message]:
        """The plaintext session messages that are not signed either, but for interim
        responses (STATUS_PENDING: they carry nothing, and MS-SMB2 3.3.4.2 has them go
        unsigned; the final response is signed)."""
        return [m for m in self.plaintext
                if not m.signed and not (m.response and m.status == _STATUS_PENDING)]


def _flag(value: str) -> bool:
    return value in ("1", "True", "true")


def protection(path: Path, ports: Sequence[int] = (SMB_PORT,),
               nt_password: str | None = None) -> Protection:
    """Read the capture: the dialects negotiated, whether the server required signing
    or encryption, how many frames went encrypted, and every message of a session
    after its SESSION_SETUP that went in plaintext (signed or not). ``nt_password``
    (see :func:`check`) lets tshark decrypt (not needed for any of that)."""
    keys = ("-o", f"ntlmssp.nt_password:{nt_password}") if nt_password else ()
    fields = [arg for name in _PROTECTION_FIELDS for arg in ("-e", name)]
    out = _tshark(path, ports, *keys, "-Y", "smb2", "-T", "fields", "-E", "occurrence=a",
                  "-E", "aggregator=,", *fields)
    seen = Protection()
    for line in out:
        row = dict(zip(_PROTECTION_FIELDS, (v.split(",") if v else [] for v in
                                            line.split("\t")), strict=False))
        if row.get("smb2.header.transform.msg_size"):
            seen.encrypted += 1
            continue
        cmds = [int(c, 0) for c in row.get("smb2.cmd", [])]
        responses = [_flag(v) for v in row.get("smb2.flags.response", [])]
        if cmds[:1] == [_NEGOTIATE] and responses[:1] == [True]:
            seen.dialects += [int(d, 0) for d in row.get("smb2.dialect", [])]
            seen.signing_required |= any(map(_flag, row.get("smb2.sec_mode.sign_required",
                                                            [])))
        if cmds[:1] == [_SESSION_SETUP] and responses[:1] == [True]:
            seen.encrypt_data |= any(map(_flag, row.get("smb2.ses_flags.encrypt", [])))
        frame = int(row["frame.number"][0])
        # A frame goes one way: all requests (tshark shows them no status) or responses.
        statuses = [int(v, 0) for v in row.get("smb2.nt_status", [])] or [0] * len(cmds)
        columns = [cmds, responses, row.get("smb2.flags.signature", []),
                   row.get("smb2.sesid", []), statuses]
        if any(len(column) != len(cmds) for column in columns):
            raise RuntimeError(f"tshark's fields of frame {frame} do not line up: {line!r}")
        for cmd, response, signature, session, status in zip(*columns, strict=True):
            if cmd not in (_NEGOTIATE, _SESSION_SETUP) and int(session, 0) != 0:
                seen.plaintext.append(Message(frame, cmd, response, status, _flag(signature)))
    return seen


class Capture:
    """dumpcap on ``iface`` (in namespace ``ns``, or this one) writing ``path``."""

    def __init__(self, ns: str | None, iface: str, path: Path | str,
                 ports: Sequence[int] = (SMB_PORT,), nt_password: str | None = None) -> None:
        self.ns = ns
        self.nt_password = nt_password
        self.iface = iface
        self.path = Path(path)
        self.ports = tuple(ports)
        self.stats = ""  # dumpcap's closing report (packets captured, dropped)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.path.with_suffix(".dumpcap.log")

    def start(self) -> Capture:
        bpf = " or ".join(f"tcp port {port}" for port in self.ports)
        # -B: a large kernel buffer, so a burst (20 clients, 8 MiB echoes) drops nothing.
        argv = [tool("dumpcap") or "dumpcap", "-i", self.iface, "-f", bpf, "-B", "64",
                "-w", str(self.path)]
        if any(port != SMB_PORT for port in self.ports):
            argv.append("-P")  # pcap, not pcapng: as_port_445 reads it
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with open(self._log, "wb") as log:
            if self.ns is None:
                self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            else:  # `ip netns exec` execs dumpcap: the pid is dumpcap's
                self._proc = popen_in(self.ns, argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.path.exists() and self.path.stat().st_size > 0):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dumpcap did not start capturing on {self.iface}: "
                                   f"{self._log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.01)
        return self

    def stop(self, settle: bool = True) -> None:
        """Stop capturing (dumpcap writes out what it has); again: nothing.

        Linux hands packets to libpcap in blocks, a block when it fills or after
        dumpcap's 250 ms read timeout: stopped at once (``settle=False``, for a capture
        nobody reads), dumpcap loses the last.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if settle:
                time.sleep(STOP_SETTLE)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        with contextlib.suppress(OSError):  # without its running count ("Packets: N")
            lines = self._log.read_text(errors="replace").splitlines()
            self.stats = "\n".join(x for x in lines if x.strip() and
                                   not x.startswith("Packets: "))

    def restart(self) -> Capture:
        """Stop, then capture afresh into the same file (what it held is gone)."""
        self.stop(settle=False)
        return self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def check(self) -> tuple[int, list[str]]:
        """Stop, then :func:`check` the capture: (SMB2 packets, malformed lines)."""
        self.stop()
        return check(self.path, self.ports, self.nt_password)

    def protection(self) -> Protection:
        """Stop, then read how the captured traffic was protected (:func:`protection`)."""
        self.stop()
        return protection(self.path, self.ports, self.nt_password)


@contextlib.contextmanager
def capture(ns: str | None, iface: str, path: Path | str,
            ports: Sequence[int] = (SMB_PORT,), nt_password: str | None = None
            ) -> Iterator[Capture]:
    """Capture TCP ``ports`` on ``iface`` in ``ns`` (None: this namespace) into ``path``."""
    cap = Capture(ns, iface, path, ports, nt_password).start()
    try:
        yield cap
    finally:
        cap.stop(settle=False)  # a capture still running here is not read


def stop_all(captures: Sequence[Capture]) -> None:
    """Stop several captures, waiting once for their last packets (see Capture.stop)."""
    if any(cap.running for cap in captures):
        time.sleep(STOP_SETTLE)
    for cap in captures:
        cap.stop(settle=False)
