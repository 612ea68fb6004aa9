"""What the cross-host benchmark measures: its transports (client kinds), the payloads and
sizes, the timeouts of a measurement and the targets the report judges.

Each transport names the server kind it talks to (``testbed.py``'s servers), what it is,
what its numbers are compared with and the security it must have negotiated.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpc_local import SERVICE

# the service bench_service() serves (grpc_local.SERVICE)
ECHO = f"/{SERVICE}/Echo"
UPLOAD = f"/{SERVICE}/Upload"
UNARY_BYTES = 100
RAW_BYTES = 64
MIB = 1 << 20
# Echo sizes of the raw throughput runs; a turn is --echoes x the factor echoes.
SIZES = (64, 4096, 65536, MIB)
SIZE_FACTOR = {64: 16, 4096: 16, 65536: 4, MIB: 1}
SIZE_LABELS = {64: "64 B", 4096: "4 KiB", 65536: "64 KiB", MIB: "1 MiB"}
SMB_2_1 = 0x0210
CALL_TIMEOUT_S = 60.0
# A command is given this long plus per-op slack: a stuck transport fails the run.
COMMAND_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Transport:
    """One client kind: its server, what it is, what its numbers are compared with."""

    server: str  # the server kind it talks to
    description: str
    sizes: tuple[int, ...] = ()  # throughput runs (message or echo sizes)
    lat_vs: str | None = None  # p50/p99 ratio: this / lat_vs
    tput_vs: str | None = None  # throughput ratio: this / tput_vs, per size
    security: str | None = None  # what the client must have negotiated (checked)
    # a second base for the p50/p99/MB/s ratios: the encrypted pipes against TLS (like
    # with like: both encrypted), next to lat_vs (plain TCP)
    also_vs: str | None = None


TRANSPORTS: dict[str, Transport] = {
    "grpc-tcp": Transport("grpc-tcp", "grpcio, TCP 198.18.0.1:PORT across the link", (MIB,)),
    # The anchor for an encrypted pipe: grpcio's TLS (BoringSSL; TLS 1.3 as it negotiates)
    # with a throwaway self-signed certificate for 198.18.0.1, the client's only root.
    "grpc-tls": Transport(
        "grpc-tls", "grpcio, TLS on TCP 198.18.0.1:PORT (self-signed certificate, IP SAN)",
        (MIB,), "grpc-tcp", "grpc-tcp", "TLS"),
    "grpc-smb": Transport(
        "grpc-pipe", "grpcio via npipe.grpc.channel('//198.18.0.1/pipe/...'), native, default",
        (MIB,), "grpc-tcp", "grpc-tcp", "encrypted", also_vs="grpc-tls"),
    "grpc-smb-inproc": Transport(
        "grpc-pipe", "the same, relayed in the calling process (NPIPE_REDIRECTOR=off)",
        (MIB,), "grpc-tcp", "grpc-tcp", "encrypted", also_vs="grpc-tls"),
    "grpc-smb-signed": Transport(
        "grpc-pipe", "the same, encrypt=False", (MIB,), "grpc-tcp", "grpc-tcp", "signed"),
    "grpc-smb-unsigned": Transport(
        "grpc-pipe", "the same on an unsigned SMB 2.1 connection (benchmark-only Options)",
        (MIB,), "grpc-tcp", "grpc-tcp", "unsigned"),
    "grpc-smbprotocol": Transport(
        "grpc-pipe", "the same through smb_backend='smbprotocol', default security",
        (MIB,), "grpc-tcp", "grpc-tcp", "encrypted", also_vs="grpc-tls"),
    "tcp": Transport("raw-tcp", "asyncio TCP echo across the link (the wire's floor; no SMB)",
                     SIZES),
    "smb2-echo": Transport("raw-pipe", "bare SMB2 ECHO, link.echo(), native, default",
                           security="encrypted"),
    "smb2-echo-signed": Transport("raw-pipe", "the same, encrypt=False", security="signed"),
    "smb2-echo-unsigned": Transport("raw-pipe", "the same, unsigned SMB 2.1",
                                    security="unsigned"),
    # The floor: the least asyncio driver around npipe's sans-I/O core (smb_clients.py).
    "minimal": Transport("raw-pipe", "minimal asyncio client: 1 TRANSCEIVE per round trip, "
                         "npipe's core builds the messages", SIZES, "smb2-echo", "npipe",
                         "encrypted"),
    "minimal-signed": Transport("raw-pipe", "the same, signed only", SIZES, "smb2-echo-signed",
                                "npipe-signed", "signed"),
    "minimal-unsigned": Transport("raw-pipe", "the same, unsigned SMB 2.1", SIZES,
                                  "smb2-echo-unsigned", "npipe-unsigned", "unsigned"),
    "npipe": Transport("raw-pipe", "npipe.open_connection('//198.18.0.1/pipe/...'), default",
                       SIZES, "minimal", "tcp", "encrypted"),
    "npipe-signed": Transport("raw-pipe", "the same, encrypt=False", SIZES,
                              "minimal-signed", "tcp", "signed"),
    "npipe-unsigned": Transport("raw-pipe", "the same, unsigned SMB 2.1 (native Options)",
                                SIZES, "minimal-unsigned", "tcp", "unsigned"),
    "smbprotocol": Transport(
        "raw-pipe", "smbprotocol, SMB2IOCTLRequest FSCTL_PIPE_TRANSCEIVE, require_encryption",
        SIZES, "npipe", "npipe", "encrypted"),
    "smbprotocol-signed": Transport(
        "raw-pipe", "the same, require_encryption=False", SIZES, "npipe-signed",
        "npipe-signed", "signed"),
    # impacket encrypts whenever the server can (AES-128-CCM, the only cipher it offers).
    # A 1 MiB WRITE would wait for READs that impacket's sync calls cannot post meanwhile.
    "impacket": Transport("raw-pipe", "impacket SMBConnection.transactNamedPipe",
                          SIZES[:-1], "npipe", "npipe", "encrypted"),
}
GRPC_TRANSPORTS = tuple(t for t in TRANSPORTS if t.startswith("grpc"))
RAW_TRANSPORTS = tuple(t for t in TRANSPORTS if not t.startswith("grpc"))
ALL_TRANSPORTS = tuple(TRANSPORTS)
# The concurrency run: many aio channels, each its own pipe (or TCP connection).
CONC_TRANSPORTS = {"grpc-smb-many": "grpc-pipe", "grpc-tcp-many": "grpc-tcp"}
CLIENT_KINDS = ALL_TRANSPORTS + tuple(CONC_TRANSPORTS)
# The threads section: sync channels called from threads (``mt`` commands), on the
# clients of the rounds; each extra channel has a subchannel pool of its own, so it is a
# pipe instance (or an HTTP/2 connection) of its own.
THREAD_TRANSPORTS = ("grpc-tcp", "grpc-tls", "grpc-smb", "grpc-smb-inproc", "grpc-smb-signed")

# The targets: (label, row, base, metric, bound); metric "p50" is row/base (<= bound),
# "mb_s" is row/base (>= bound), "speedup" is base/row per size and p50 row/base (>= bound).
TARGETS = (
    ("gRPC unary p50 / TCP", "grpc-smb", "grpc-tcp", "p50", 1.5),
    ("gRPC 1 MiB stream / TCP", "grpc-smb", "grpc-tcp", "mb_s", 0.6),
    ("gRPC unary p50 / TLS", "grpc-smb", "grpc-tls", "p50", 1.3),
    ("gRPC 1 MiB stream / TLS", "grpc-smb", "grpc-tls", "mb_s", 0.8),
    ("  signed: unary p50 / TCP", "grpc-smb-signed", "grpc-tcp", "p50", 1.5),
    ("  signed: 1 MiB stream / TCP", "grpc-smb-signed", "grpc-tcp", "mb_s", 0.6),
    ("npipe 64 B echo p50 / SMB2 ECHO", "npipe", "smb2-echo", "p50", 1.5),
    ("  signed", "npipe-signed", "smb2-echo-signed", "p50", 1.5),
    ("  unsigned", "npipe-unsigned", "smb2-echo-unsigned", "p50", 1.5),
    ("smbprotocol / npipe", "smbprotocol", "npipe", "speedup", 5.0),
    ("  signed", "smbprotocol-signed", "npipe-signed", "speedup", 5.0),
    ("impacket / npipe", "impacket", "npipe", "speedup", 5.0),
)

