"""npipe.cli.reflection_call against real grpcio servers on a Unix socket.

The streaming cases use a test-only proto compiled at test time with grpc_tools.protoc into
a descriptor set, loaded into a private descriptor pool and served through generic
handlers: no generated Python modules, nothing added to the process-wide default pool.
"""

from __future__ import annotations

import importlib.resources
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

from npipe.cli.reflection_call import NoReflection, call_json, list_services, split_method
from npipe.examples.buy import service as buy_service

COMMON_PROTO = """
syntax = "proto3";
package streamtest;
import "google/protobuf/timestamp.proto";
message Item {
  string name = 1;
  int64 count = 2;
  google.protobuf.Timestamp at = 3;
}
"""

STREAMER_PROTO = """
syntax = "proto3";
package streamtest;
import "streamtest/common.proto";
message Summary {
  int64 total = 1;
  repeated string names = 2;
}
service Streamer {
  rpc Explode(Item) returns (stream Item);
  rpc Sum(stream Item) returns (Summary);
  rpc Echo(stream Item) returns (stream Item);
  rpc Wait(Item) returns (Item);  // answers after count milliseconds
}
"""

STREAMER = "streamtest.Streamer"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the ~108-byte sun_path limit; /tmp/npXXXX cannot.
    path = Path(tempfile.mkdtemp(prefix="np", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stream_pool(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    src = tmp_path_factory.mktemp("proto")
    (src / "streamtest").mkdir()
    (src / "streamtest" / "common.proto").write_text(COMMON_PROTO)
    (src / "streamtest" / "streamer.proto").write_text(STREAMER_PROTO)
    out = src / "set.pb"
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{src}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            "streamtest/streamer.proto",
        ]
    )
    assert status == 0, "protoc failed on the test proto"
    pool = descriptor_pool.DescriptorPool()
    for file_proto in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file_proto)  # --include_imports lists dependencies first
    return pool


def _streamer_handler(pool: descriptor_pool.DescriptorPool) -> grpc.GenericRpcHandler:
    item_cls: Any = message_factory.GetMessageClass(pool.FindMessageTypeByName("streamtest.Item"))
    summary_cls: Any = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("streamtest.Summary")
    )

    def explode(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if request.count < 0:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "count must not be negative")
        for i in range(request.count):
            yield item_cls(name=f"{request.name}-{i}", count=i, at=request.at)

    def sum_items(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        summary = summary_cls()
        for item in requests:
            summary.total += item.count
            summary.names.append(item.name)
        return summary

    def echo(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for item in requests:
            yield item_cls(name=item.name.upper(), count=item.count * 2)

    def wait(request: Any, context: grpc.ServicerContext) -> Any:
        end = time.monotonic() + request.count / 1000
        while context.is_active() and time.monotonic() < end:
            time.sleep(0.01)
        return request

    de_item = item_cls.FromString
    ser = _serialize
    return grpc.method_handlers_generic_handler(
        STREAMER,
        {
            "Explode": grpc.unary_stream_rpc_method_handler(explode, de_item, ser),
            "Sum": grpc.stream_unary_rpc_method_handler(sum_items, de_item, ser),
            "Echo": grpc.stream_stream_rpc_method_handler(echo, de_item, ser),
            "Wait": grpc.unary_unary_rpc_method_handler(wait, de_item, ser),
        },
    )


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def _caller_from_metadata(context: grpc.ServicerContext) -> str:
    return str(dict(context.invocation_metadata()).get("x-user", "anonymous"))


def _start(server: grpc.Server, sock_dir: Path, name: str) -> grpc.Channel:
    address = "unix:" + str(sock_dir / name)
    assert server.add_insecure_port(address) == 1
    server.start()
    return grpc.insecure_channel(address)


@pytest.fixture
def served(sock_dir: Path) -> Iterator[grpc.Channel]:
    """buy.MyService with health and reflection, as the example's add_to_server sets it up."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    buy_service.add_to_server(server, buy_service.MyService(_caller_from_metadata))
    channel = _start(server, sock_dir, "b")
    yield channel
    channel.close()
    server.stop(None)


@pytest.fixture
def streamer(sock_dir: Path, stream_pool: descriptor_pool.DescriptorPool) -> Iterator[grpc.Channel]:
    """streamtest.Streamer reflected from its private pool by grpcio's own servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_streamer_handler(stream_pool),))
    reflection.enable_server_reflection(
        (STREAMER, reflection.SERVICE_NAME), server, pool=stream_pool
    )
    channel = _start(server, sock_dir, "st")
    yield channel
    channel.close()
    server.stop(None)


class OneFileReflection(reflection_pb2_grpc.ServerReflectionServicer):  # type: ignore[misc]
    """Reflection the way some non-Python servers do it: one file per answer, imports
    left for the client to ask for, and no well-known types on offer."""

    def __init__(self, pool: descriptor_pool.DescriptorPool, services: list[str]) -> None:
        self._pool = pool
        self._services = services
        self.asked_files: list[str] = []  # file_by_filename requests, in order

    def ServerReflectionInfo(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        for request in requests:
            response = reflection_pb2.ServerReflectionResponse(original_request=request)
            try:
                if request.HasField("list_services"):
                    response.list_services_response.service.extend(
                        reflection_pb2.ServiceResponse(name=name) for name in self._services
                    )
                    yield response
                    continue
                if request.HasField("file_containing_symbol"):
                    found = self._pool.FindFileContainingSymbol(request.file_containing_symbol)
                else:
                    self.asked_files.append(request.file_by_filename)
                    if request.file_by_filename.startswith("google/protobuf/"):
                        raise KeyError(request.file_by_filename)
                    found = self._pool.FindFileByName(request.file_by_filename)
            except KeyError:
                response.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
                response.error_response.error_message = "not found"
                yield response
                continue
            proto = descriptor_pb2.FileDescriptorProto()
            found.CopyToProto(proto)
            response.file_descriptor_response.file_descriptor_proto.append(
                proto.SerializeToString()
            )
            yield response


@pytest.fixture
def one_file_streamer(
    sock_dir: Path, stream_pool: descriptor_pool.DescriptorPool
) -> Iterator[tuple[grpc.Channel, OneFileReflection]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_streamer_handler(stream_pool),))
    servicer = OneFileReflection(stream_pool, [STREAMER, reflection.SERVICE_NAME])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    channel = _start(server, sock_dir, "of")
    yield channel, servicer
    channel.close()
    server.stop(None)


# --- split_method -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("buy.MyService/Buy", ("buy.MyService", "Buy")),
        ("/buy.MyService/Buy", ("buy.MyService", "Buy")),
        ("buy.MyService.Buy", ("buy.MyService", "Buy")),
        ("/a.b.c.Svc.Do_it2", ("a.b.c.Svc", "Do_it2")),
        ("Svc/Method", ("Svc", "Method")),
        ("  buy.MyService/Buy \n", ("buy.MyService", "Buy")),
    ],
)
def test_split_method_accepts_common_spellings(text: str, expected: tuple[str, str]) -> None:
    assert split_method(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Buy",
        "/Buy",
        "buy.MyService/",
        "buy.MyService//Buy",
        "a/b/c",
        "buy.My-Service/Buy",
        "buy..S/M",
        "1x.S/M",
    ],
)
def test_split_method_rejects_malformed_names(text: str) -> None:
    with pytest.raises(ValueError, match="malformed method name"):
        split_method(text)


def test_malformed_method_fails_before_any_rpc() -> None:
    # The channel points nowhere: a network attempt would fail differently (RpcError).
    channel = grpc.insecure_channel("unix:/nonexistent/np-none")
    with pytest.raises(ValueError, match="malformed method name"):
        call_json(channel, "nonsense", "{}", timeout=1)
    channel.close()


# --- against buy.MyService ----------------------------------------------------------


def test_list_services(served: grpc.Channel) -> None:
    assert list_services(served, 5) == sorted(
        ["buy.MyService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    )


@pytest.mark.parametrize("method", ["buy.MyService/Buy", "/buy.MyService/Buy", "buy.MyService.Buy"])
def test_call_json_unary(served: grpc.Channel, method: str) -> None:
    result = call_json(served, method, '{"id": "apple", "quantity": 3, "price": 10}', timeout=5)
    assert result == [{"result": "bought 3 x 'apple' for 30 (caller: anonymous)"}]


def test_call_json_accepts_a_dict(served: grpc.Channel) -> None:
    result = call_json(
        served, "buy.MyService/Buy", {"id": "pear", "quantity": 2, "price": 0}, timeout=5
    )
    assert result == [{"result": "bought 2 x 'pear' for 0 (caller: anonymous)"}]


def test_call_json_sends_metadata(served: grpc.Channel) -> None:
    result = call_json(
        served,
        "buy.MyService/Buy",
        {"id": "apple", "quantity": 1, "price": 7},
        timeout=5,
        metadata=[("X-User", "alice")],  # upper case is normalized, as HTTP/2 requires
    )
    assert result == [{"result": "bought 1 x 'apple' for 7 (caller: alice)"}]


def test_list_services_sends_metadata(sock_dir: Path) -> None:
    seen: list[tuple[tuple[str, str], ...]] = []

    class Spy(grpc.ServerInterceptor):  # type: ignore[misc]
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            seen.append(tuple(details.invocation_metadata))
            return continuation(details)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[Spy()])
    buy_service.add_to_server(server)
    channel = _start(server, sock_dir, "md")
    try:
        assert "buy.MyService" in list_services(channel, 5, metadata=[("X-Token", "t0k")])
    finally:
        channel.close()
        server.stop(None)
    assert ("x-token", "t0k") in seen[0]


def test_call_json_works_on_standard_services(served: grpc.Channel) -> None:
    result = call_json(
        served, "grpc.health.v1.Health/Check", {"service": "buy.MyService"}, timeout=5
    )
    assert result == [{"status": "SERVING"}]


def test_server_error_propagates_as_rpc_error(served: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call_json(served, "buy.MyService/Buy", {"id": "x", "quantity": 0}, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "quantity" in info.value.details()


def test_unknown_service_lists_available_ones(served: grpc.Channel) -> None:
    with pytest.raises(ValueError) as info:
        call_json(served, "buy.NoSuchService/Buy", "{}", timeout=5)
    message = str(info.value)
    assert "unknown service 'buy.NoSuchService'" in message
    assert "buy.MyService" in message
    assert "grpc.health.v1.Health" in message
    assert "\n" not in message


def test_message_type_is_not_a_service(served: grpc.Channel) -> None:
    with pytest.raises(ValueError, match=r"unknown service 'buy\.BuyRequest'.*buy\.MyService"):
        call_json(served, "buy.BuyRequest/Buy", "{}", timeout=5)


def test_unknown_method_lists_the_services_methods(served: grpc.Channel) -> None:
    with pytest.raises(ValueError, match=r"'buy\.MyService' has no method 'Sell'.*: Buy$"):
        call_json(served, "buy.MyService/Sell", "{}", timeout=5)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ('{"id": "apple", ', r"not valid JSON"),
        ('{"id": "apple", "colour": "red"}', r"does not match buy\.BuyRequest.*colour"),
        ('{"quantity": "many"}', r"does not match buy\.BuyRequest.*quantity"),
        ('{"quantity": 99999999999}', r"does not match buy\.BuyRequest.*quantity"),
        ('[{"id": "apple"}]', r"one JSON object \(buy\.BuyRequest\), got an array"),
        ('"apple"', r"one JSON object \(buy\.BuyRequest\), got a string"),
    ],
)
def test_bad_json_is_a_value_error(served: grpc.Channel, data: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        call_json(served, "buy.MyService/Buy", data, timeout=5)
    assert "\n" not in str(info.value)


def test_blank_data_means_empty_message(served: grpc.Channel) -> None:
    # An empty BuyRequest is invalid for the service, which proves it was sent.
    with pytest.raises(grpc.RpcError) as info:
        call_json(served, "buy.MyService/Buy", "  ", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_reflection_on_server_is_said_so(sock_dir: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    channel = _start(server, sock_dir, "nr")
    try:
        with pytest.raises(NoReflection, match="does not serve reflection"):
            list_services(channel, 5)
    finally:
        channel.close()
        server.stop(None)


# --- streaming, via a test-only proto ----------------------------------------------


def test_streamer_listed(streamer: grpc.Channel) -> None:
    assert STREAMER in list_services(streamer, 5)


def test_server_streaming(streamer: grpc.Channel) -> None:
    result = call_json(
        streamer,
        "streamtest.Streamer/Explode",
        '{"name": "x", "count": 3, "at": "2024-01-02T03:04:05Z"}',
        timeout=5,
    )
    # int64 comes back as a string and zero values are omitted: protobuf's JSON mapping.
    assert result == [
        {"name": "x-0", "at": "2024-01-02T03:04:05Z"},
        {"name": "x-1", "count": "1", "at": "2024-01-02T03:04:05Z"},
        {"name": "x-2", "count": "2", "at": "2024-01-02T03:04:05Z"},
    ]


def test_server_streaming_with_no_messages(streamer: grpc.Channel) -> None:
    assert call_json(streamer, "streamtest.Streamer/Explode", {"count": 0}, timeout=5) == []


def test_server_streaming_error_propagates(streamer: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call_json(streamer, "streamtest.Streamer/Explode", {"count": -1}, timeout=5)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_client_streaming(streamer: grpc.Channel) -> None:
    data = '[{"name": "a", "count": 1}, {"name": "b", "count": 2}, {"name": "c", "count": 4}]'
    result = call_json(streamer, "streamtest.Streamer/Sum", data, timeout=5)
    assert result == [{"total": "7", "names": ["a", "b", "c"]}]


def test_client_streaming_one_object_is_one_message(streamer: grpc.Channel) -> None:
    result = call_json(streamer, "streamtest.Streamer/Sum", {"name": "a", "count": 5}, timeout=5)
    assert result == [{"total": "5", "names": ["a"]}]


def test_client_streaming_empty_stream(streamer: grpc.Channel) -> None:
    assert call_json(streamer, "streamtest.Streamer/Sum", "[]", timeout=5) == [{}]


def test_bidi_streaming(streamer: grpc.Channel) -> None:
    data = [{"name": "a", "count": 1}, {"name": "b", "count": 2}]
    result = call_json(streamer, "streamtest.Streamer.Echo", data, timeout=5)
    assert result == [{"name": "A", "count": "2"}, {"name": "B", "count": "4"}]


def test_bad_stream_element_is_named(streamer: grpc.Channel) -> None:
    with pytest.raises(ValueError, match=r"message #2 does not match streamtest\.Item.*nope"):
        call_json(streamer, "streamtest.Streamer/Echo", '[{"name": "a"}, {"nope": 1}]', timeout=5)
    with pytest.raises(ValueError, match=r"message #1 must be a JSON object"):
        call_json(streamer, "streamtest.Streamer/Echo", "[1]", timeout=5)
    with pytest.raises(ValueError, match=r"JSON array of streamtest\.Item objects"):
        call_json(streamer, "streamtest.Streamer/Echo", "42", timeout=5)


def test_one_file_reflection_resolves_imports(
    one_file_streamer: tuple[grpc.Channel, OneFileReflection],
) -> None:
    # streamer.proto arrives alone; common.proto must be asked for, and the server
    # refuses timestamp.proto, so the copy bundled with protobuf stands in.
    channel, servicer = one_file_streamer
    result = call_json(
        channel,
        "streamtest.Streamer/Explode",
        {"name": "y", "count": 1, "at": "2024-01-02T03:04:05Z"},
        timeout=5,
    )
    assert result == [{"name": "y-0", "at": "2024-01-02T03:04:05Z"}]
    assert servicer.asked_files == [
        "streamtest/common.proto",
        "google/protobuf/timestamp.proto",
    ]


def test_timeout_covers_the_call(streamer: grpc.Channel) -> None:
    assert call_json(streamer, "streamtest.Streamer/Wait", {"count": 1}, timeout=5) == [
        {"count": "1"}
    ]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        call_json(streamer, "streamtest.Streamer/Wait", {"count": 5000}, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
