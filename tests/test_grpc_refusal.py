"""The sans-I/O gRPC status responder (npipe.grpc_refusal): raw HTTP/2 client bytes in,
a trailers-only answer per call and a GOAWAY out; and a real grpcio channel sees the
status and message it was given."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from npipe import frontdoor, grpc_refusal
from npipe.grpc_refusal import StatusResponder, percent_encode

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.Svc/Echo"),
           (":authority", "localhost"), ("content-type", "application/grpc"),
           ("te", "trailers")]


def _client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    return client


def test_each_call_gets_a_trailers_only_answer_then_goaway() -> None:
    client = _client()
    responder = StatusResponder(grpc_refusal.PERMISSION_DENIED, "pipe shop: no 100% é\nhere")
    events = client.receive_data(responder.data_to_send())  # the server's SETTINGS
    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
    client.send_headers(1, REQUEST)
    client.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    client.send_headers(3, REQUEST, end_stream=False)
    answer = responder.receive_data(client.data_to_send())
    assert responder.answered == 2 and responder.finished
    events = client.receive_data(answer)
    responses = {e.stream_id: dict(e.headers) for e in events
                 if isinstance(e, h2.events.ResponseReceived)}
    assert set(responses) == {1, 3}
    assert responses[1] == {
        ":status": "200", "content-type": "application/grpc", "grpc-status": "7",
        # one line; '%' and non-ASCII percent-encoded (gRPC's PROTOCOL-HTTP2.md)
        "grpc-message": "pipe shop: no 100%25 %C3%A9 here",
    }
    ended = [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)]
    assert sorted(ended) == [1, 3]  # trailers-only: HEADERS with END_STREAM
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert len(goaway) == 1 and goaway[0].last_stream_id == 3 and goaway[0].error_code == 0
    assert responder.receive_data(b"more") == b""  # finished: nothing more is read


def test_no_goaway_before_a_call_arrives() -> None:
    """grpcio sends its preface first and the call when the connection is ready: the
    responder must wait for the call rather than close (UNAVAILABLE) first."""
    client = _client()
    responder = StatusResponder(grpc_refusal.UNAUTHENTICATED, "who are you")
    client.receive_data(responder.data_to_send())
    out = responder.receive_data(client.data_to_send())  # preface, SETTINGS (+ ACK)
    assert not responder.finished and responder.answered == 0
    events = client.receive_data(out)
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
    client.send_headers(1, REQUEST, end_stream=True)
    events = client.receive_data(responder.receive_data(client.data_to_send()))
    headers = [dict(e.headers) for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert headers[0]["grpc-status"] == "16" and headers[0]["grpc-message"] == "who are you"


def test_garbage_is_not_answered() -> None:
    responder = StatusResponder(grpc_refusal.PERMISSION_DENIED, "no")
    responder.data_to_send()
    out = responder.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert responder.finished and responder.answered == 0
    assert out  # a GOAWAY (PROTOCOL_ERROR)


def test_percent_encoding_and_one_line() -> None:
    assert percent_encode("a b~") == "a b~"
    assert percent_encode("%\t\u00ff") == "%25%09%C3%BF"
    long = StatusResponder(14, "x" * 5000).message
    assert len(percent_encode(long)) <= grpc_refusal.MAX_MESSAGE


@pytest.fixture
def sock_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nr", dir="/tmp") as d:
        yield Path(d) / "s"


def _serve_refusals(path: Path, refusal: frontdoor.Refusal, **bounds: float) -> list[int]:
    """A listener answering every connection with answer_refused; the list counts them."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen()
    served: list[int] = []

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            served.append(1)
            with conn:
                frontdoor.answer_refused(conn, refusal, **bounds)  # type: ignore[arg-type]

    threading.Thread(target=loop, daemon=True).start()
    return served


@pytest.mark.parametrize("wait_for_ready", [False, True])
def test_a_grpcio_channel_sees_the_status(sock_path: Path, wait_for_ready: bool) -> None:
    message = "the ACL of pipe \\\\.\\pipe\\shop does not admit mallory uid=1234 (é)"
    served = _serve_refusals(sock_path, frontdoor.Refusal(None, 7, message))
    with grpc.insecure_channel(f"unix:{sock_path}") as channel:
        call = channel.unary_unary("/t.Svc/Echo")
        for _ in range(2):  # the next call, on a new connection, is answered too
            with pytest.raises(grpc.RpcError) as info:
                call(b"x" * 100_000, timeout=10, wait_for_ready=wait_for_ready)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.details() == message
        stream = channel.stream_stream("/t.Svc/Bidi")(iter([b"a", b"b"]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert 1 <= len(served) <= 4


def test_a_silent_caller_is_let_go_in_time(sock_path: Path) -> None:
    """A peer that connects and says nothing costs the door its time limit at most,
    and one that floods it is cut off at the byte limit."""
    import time

    _serve_refusals(sock_path, frontdoor.Refusal(None, 7, "no"), timeout=0.5, limit=1000)
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(os.fspath(sock_path))
    start = time.monotonic()
    silent.settimeout(5)
    got = b""
    while chunk := silent.recv(4096):
        got += chunk
    assert time.monotonic() - start < 2.5
    silent.close()

    flood = socket.socket(socket.AF_UNIX)
    flood.connect(os.fspath(sock_path))
    flood.settimeout(5)
    sent = 0
    try:
        for _ in range(100):
            flood.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 10_000)
            sent += 1
    except OSError:
        pass
    assert sent < 100  # the door stopped reading (and closed) long before
    flood.close()


# --- the gate: holding a connection for a pipe not there yet -------------------------


def test_the_gate_reads_the_calls_and_keeps_what_the_pipe_gets() -> None:
    """The first HEADERS (and every later call) decoded; the gate's own SETTINGS ACK
    and the PINGs it answers are kept from the pipe; the rest is held as sent, byte
    for byte, a half frame included."""
    from npipe.grpc_refusal import CallGate

    client = _client()
    gate = CallGate()
    client.receive_data(gate.data_to_send())  # an empty SETTINGS: grpcio sends its calls
    preface = client.data_to_send()  # the preface, its SETTINGS and the ACK of the gate's
    client.send_headers(1, [*REQUEST, ("grpc-timeout", "1500m"),
                            (grpc_refusal.WAIT_FOR_READY_KEY, "1")])
    client.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    client.ping(b"12345678")
    client.send_headers(3, REQUEST, end_stream=True)  # HPACK: indexed from the first
    sent = preface + client.data_to_send()
    back = gate.receive_data(sent[:-3], now=100.0)
    assert not gate.at_boundary
    back += gate.receive_data(sent[-3:], now=100.0)
    assert gate.at_boundary and not gate.failed
    assert back == b"\x00\x00\x08\x06\x01\x00\x00\x00\x0012345678"  # the PING's ACK
    assert gate.headers is not None and (":path", "/t.Svc/Echo") in gate.headers
    assert gate.wait_for_ready and gate.timeout == 1.5
    assert gate.calls == {1: (True, 101.5), 3: (False, None)}
    assert gate.hold_until(grace_until=100.5) == 101.5 + grpc_refusal.DEADLINE_SLACK
    # What the pipe's server gets: a client stream a server accepts as it is.
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    events = server.receive_data(gate.held())
    calls = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert [c.stream_id for c in calls] == [1, 3]
    assert not [e for e in events if isinstance(e, (h2.events.PingReceived,
                                                    h2.events.SettingsAcknowledged))]
    # grpcio gives the marked call up: the rest must fail fast.
    client.reset_stream(1)
    gate.receive_data(client.data_to_send(), now=101.0)
    assert gate.hold_until(grace_until=100.5) == 100.5


def test_the_gate_is_bounded() -> None:
    from npipe.grpc_refusal import CallGate

    gate = CallGate(limit=100)
    client = _client()
    client.receive_data(gate.data_to_send())
    gate.receive_data(client.data_to_send())
    assert not gate.failed
    gate.receive_data(b"\x00" * 100)
    assert gate.overflow
    garbage = CallGate()
    garbage.receive_data(b"GET / HTTP/1.1\r\n")
    assert garbage.malformed
