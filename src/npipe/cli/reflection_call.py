"""Call any gRPC method with JSON, like ``grpcurl``, using the server's reflection service.

Nothing here knows about pipes: it works on any :class:`grpc.Channel`. The flow is

1. ask the server (``grpc.reflection.v1alpha.ServerReflection``) for the file that
   defines the service, then for every file it imports, recursively;
2. load those files into a private :class:`~google.protobuf.descriptor_pool.DescriptorPool`
   (private so that they cannot clash with protos this process compiled in);
3. build request/response classes from it, convert JSON to the request, call, and turn
   the response(s) back into dicts.

Only v1alpha is spoken: it is what grpcio-reflection serves (it has no v1), and the Go,
C++ and Java servers serve it alongside v1.

Problems with what the caller asked for (method name, service, JSON) raise
:class:`ValueError` with a one-line message; failures of the RPC itself propagate as
:class:`grpc.RpcError` unchanged so that callers can report code and details.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

__all__ = ["NoReflection", "call_json", "describe", "list_methods", "list_services", "split_method"]

Metadata: TypeAlias = Sequence[tuple[str, str]]
JsonObject: TypeAlias = dict[str, Any]
# What call_json accepts as request data: JSON text, one message, or a stream of messages.
RequestData: TypeAlias = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SERVICE = rf"{_IDENT}(?:\.{_IDENT})*"
_SLASH_FORM = re.compile(rf"/?(?P<service>{_SERVICE})/(?P<method>{_IDENT})")
_DOT_FORM = re.compile(rf"/?(?P<service>{_SERVICE})\.(?P<method>{_IDENT})")

# Reflection's ErrorResponse carries bare status numbers; these name them.
_STATUS_NAMES: dict[int, str] = {status.value[0]: status.name for status in grpc.StatusCode}
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


class _UnknownSymbol(ValueError):
    """Reflection found no file defining the symbol."""


class NoReflection(Exception):
    """The server does not serve reflection (its ServerReflectionInfo is UNIMPLEMENTED)."""


def split_method(method: str) -> tuple[str, str]:
    """Split ``pkg.Service/Method`` (or ``pkg.Service.Method``, ``/pkg.Service/Method``).

    Returns ``(service, method)``; raises :class:`ValueError` if the name is malformed.
    """
    text = method.strip()
    match = _SLASH_FORM.fullmatch(text) or _DOT_FORM.fullmatch(text)
    if match is None:
        raise ValueError(
            f"malformed method name {method!r}: expected 'package.Service/Method' "
            "(or 'package.Service.Method')"
        )
    return match["service"], match["method"]


def list_services(
    channel: grpc.Channel, timeout: float | None = None, *, metadata: Metadata = ()
) -> list[str]:
    """Names of the services the server lists via reflection, sorted."""
    client = _ReflectionClient(channel, _Deadline(timeout), metadata)
    return client.list_services()


def list_methods(
    channel: grpc.Channel, service: str, timeout: float | None = None, *,
    metadata: Metadata = (),
) -> list[str]:
    """The full names of ``service``'s methods (``pkg.Service.Method``), in the order the
    proto declares them, as ``grpcurl list SERVICE`` prints them."""
    client = _ReflectionClient(channel, _Deadline(timeout), metadata)
    found = client.pool_for_service(service).FindServiceByName(service)
    return [method.full_name for method in found.methods]


def describe(
    channel: grpc.Channel, symbol: str, timeout: float | None = None, *,
    metadata: Metadata = (),
) -> str:
    """``symbol`` (a service, method, message or enum) as proto text, after a line that
    says what it is, as ``grpcurl describe SYMBOL`` prints it."""
    name = symbol.strip().lstrip(".").replace("/", ".")
    client = _ReflectionClient(channel, _Deadline(timeout), metadata)
    try:
        pool = client.pool_for_symbol(name)
    except _UnknownSymbol:
        parent = name.rpartition(".")[0]
        if not parent:
            raise
        # grpcio's reflection finds no method by name (Go's does): ask for its service.
        try:
            pool = client.pool_for_symbol(parent)
        except _UnknownSymbol:
            pass
        else:
            return _render_symbol(pool, name)
        raise
    return _render_symbol(pool, name)


def call_json(
    channel: grpc.Channel,
    method: str,
    data: RequestData,
    *,
    timeout: float | None = None,
    metadata: Metadata = (),
) -> list[JsonObject]:
    """Call ``method`` with JSON ``data``; return every response message as a dict.

    ``data`` is JSON text or already-decoded JSON. Methods taking one request want one
    object; client-streaming methods take an array of objects (one object is a stream of
    one). Blank text means ``{}`` (or an empty stream). ``timeout`` bounds the whole
    operation, reflection look-ups included. ``metadata`` goes with the reflection
    look-ups too, as with ``grpcurl -H``, since servers that demand it usually demand
    it for every call.

    Responses keep the proto field names (``snake_case``) and, as protobuf's JSON
    mapping does, leave out fields that hold their default value.
    """
    service_name, method_name = split_method(method)
    deadline = _Deadline(timeout)
    metadata = _normalize_metadata(metadata)
    client = _ReflectionClient(channel, deadline, metadata)
    pool = client.pool_for_service(service_name)
    service = pool.FindServiceByName(service_name)
    method_desc = service.methods_by_name.get(method_name)
    if method_desc is None:
        available = ", ".join(sorted(service.methods_by_name)) or "(none)"
        raise ValueError(
            f"service {service_name!r} has no method {method_name!r}; its methods: {available}"
        )

    request_cls = message_factory.GetMessageClass(method_desc.input_type)
    response_cls = message_factory.GetMessageClass(method_desc.output_type)
    requests = _parse_requests(data, request_cls, pool, streaming=method_desc.client_streaming)

    path = f"/{service.full_name}/{method_desc.name}"
    serialize: Callable[[Any], bytes] = request_cls.SerializeToString
    deserialize: Callable[[bytes], Any] = response_cls.FromString
    kwargs: dict[str, Any] = {"timeout": deadline.remaining(), "metadata": metadata or None}
    responses: list[Any]
    if method_desc.client_streaming and method_desc.server_streaming:
        stream_stream = channel.stream_stream(path, serialize, deserialize)
        responses = list(stream_stream(iter(requests), **kwargs))
    elif method_desc.client_streaming:
        stream_unary = channel.stream_unary(path, serialize, deserialize)
        responses = [stream_unary(iter(requests), **kwargs)]
    elif method_desc.server_streaming:
        unary_stream = channel.unary_stream(path, serialize, deserialize)
        responses = list(unary_stream(requests[0], **kwargs))
    else:
        unary_unary = channel.unary_unary(path, serialize, deserialize)
        responses = [unary_unary(requests[0], **kwargs)]

    return [
        json_format.MessageToDict(response, preserving_proto_field_name=True, descriptor_pool=pool)
        for response in responses
    ]


class _Deadline:
    """One time budget shared by the reflection look-ups and the call itself."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        # An exhausted budget is passed on as 0 so that gRPC, not us, enforces it.
        return max(0.0, self._end - time.monotonic())


def _normalize_metadata(metadata: Metadata) -> tuple[tuple[str, str], ...]:
    # HTTP/2 header names are lowercase; grpcio rejects the call otherwise.
    return tuple((key.lower(), value) for key, value in metadata)


class _ReflectionClient:
    """Thin synchronous wrapper over the bidirectional ServerReflectionInfo stream."""

    def __init__(self, channel: grpc.Channel, deadline: _Deadline, metadata: Metadata) -> None:
        self._stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        self._deadline = deadline
        self._metadata = _normalize_metadata(metadata)

    def _ask(self, requests: list[Any]) -> list[Any]:
        # One short stream per batch: send everything, read until the server closes.
        # Simpler than keeping a stream open, and servers answer in request order.
        responses = self._stub.ServerReflectionInfo(
            iter(requests),
            timeout=self._deadline.remaining(),
            metadata=self._metadata or None,
        )
        try:
            answers = list(responses)
        except grpc.RpcError as e:
            # A gRPC server without the service answers UNIMPLEMENTED; grpcio also says
            # UNIMPLEMENTED for a plain HTTP server's 404, which stays an RpcError so
            # that the caller can tell what the peer speaks.
            details = e.details() or ""
            if (e.code() == grpc.StatusCode.UNIMPLEMENTED
                    and "http2 header with status" not in details):
                raise NoReflection(
                    "the server does not serve reflection (grpc.reflection.v1alpha), which "
                    "npipe call needs to find methods and their types"
                ) from None
            raise
        if len(answers) != len(requests):
            raise ValueError(
                f"server reflection answered {len(answers)} of {len(requests)} requests"
            )
        return answers

    def list_services(self) -> list[str]:
        (answer,) = self._ask([reflection_pb2.ServerReflectionRequest(list_services="")])
        if answer.HasField("error_response"):
            raise ValueError(f"server reflection cannot list services: {_describe(answer)}")
        return sorted(service.name for service in answer.list_services_response.service)

    def pool_for_service(self, service_name: str) -> descriptor_pool.DescriptorPool:
        """A pool holding the file that defines ``service_name`` and all it imports."""
        pool = self.pool_for_symbol(service_name, what="service")
        try:
            pool.FindServiceByName(service_name)
        except KeyError:
            # The symbol exists but is not a service (e.g. a message type).
            raise self._unknown_service(service_name) from None
        return pool

    def pool_for_symbol(
        self, symbol: str, what: str = "symbol"
    ) -> descriptor_pool.DescriptorPool:
        """A pool holding the file that defines ``symbol`` and all it imports."""
        (answer,) = self._ask(
            [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]
        )
        if answer.HasField("error_response"):
            if answer.error_response.error_code == _NOT_FOUND:
                if what == "service":
                    raise self._unknown_service(symbol)
                raise _UnknownSymbol(f"the server knows no symbol {symbol!r}; its services: "
                                     f"{', '.join(self.list_services()) or '(none)'}")
            raise ValueError(
                f"server reflection cannot describe {symbol!r}: {_describe(answer)}"
            )
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        _collect(answer, files)

        # Servers may send just the one file (Go does), or the file with its imports
        # (grpcio does): fetch whatever is still missing until the set is closed.
        missing = _missing_dependencies(files)
        while missing:
            requests = [
                reflection_pb2.ServerReflectionRequest(file_by_filename=name) for name in missing
            ]
            for name, answer in zip(missing, self._ask(requests), strict=True):
                if answer.HasField("error_response"):
                    local = _bundled_file(name)
                    if local is None:
                        raise ValueError(
                            f"server reflection cannot provide {name!r}, which "
                            f"{symbol!r} depends on: {_describe(answer)}"
                        )
                    files[name] = local
                else:
                    _collect(answer, files)
            missing = _missing_dependencies(files)

        pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()
        for name in sorted(files):
            _add_with_dependencies(pool, files, name, added)
        return pool

    def _unknown_service(self, service_name: str) -> ValueError:
        available = ", ".join(self.list_services()) or "(none)"
        return ValueError(f"unknown service {service_name!r}; the server offers: {available}")


def _describe(answer: Any) -> str:
    error = answer.error_response
    code = _STATUS_NAMES.get(error.error_code, str(error.error_code))
    return f"{code} {error.error_message}".strip()


def _collect(answer: Any, files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    for serialized in answer.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        files.setdefault(proto.name, proto)


def _missing_dependencies(files: Mapping[str, descriptor_pb2.FileDescriptorProto]) -> list[str]:
    wanted = {dep for proto in files.values() for dep in proto.dependency}
    return sorted(wanted - files.keys())


def _bundled_file(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    """Well-known types shipped with protobuf, for servers that do not reflect them."""
    if not name.startswith("google/protobuf/") or not name.endswith(".proto"):
        return None
    module = name.removesuffix(".proto").replace("/", ".") + "_pb2"
    try:
        importlib.import_module(module)  # registers the file in the default pool
        found = descriptor_pool.Default().FindFileByName(name)
    except (ImportError, KeyError):
        return None
    proto = descriptor_pb2.FileDescriptorProto()
    found.CopyToProto(proto)
    return proto


def _add_with_dependencies(
    pool: descriptor_pool.DescriptorPool,
    files: Mapping[str, descriptor_pb2.FileDescriptorProto],
    name: str,
    added: set[str],
) -> None:
    # A pool only accepts a file once everything it imports is in; imports form a DAG.
    if name in added:
        return
    added.add(name)
    for dep in files[name].dependency:
        _add_with_dependencies(pool, files, dep, added)
    pool.Add(files[name])


def _parse_requests(
    data: RequestData,
    request_cls: Any,
    pool: descriptor_pool.DescriptorPool,
    *,
    streaming: bool,
) -> list[Any]:
    type_name = request_cls.DESCRIPTOR.full_name
    decoded: Any
    if isinstance(data, str):
        if not data.strip():
            decoded = [] if streaming else {}
        else:
            try:
                decoded = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ValueError(f"request data is not valid JSON: {exc}") from None
    else:
        decoded = data

    items: list[Any]
    if isinstance(decoded, Mapping):
        items = [decoded]
    elif streaming and isinstance(decoded, Sequence) and not isinstance(decoded, str | bytes):
        items = list(decoded)
    elif streaming:
        raise ValueError(
            f"request data must be a JSON array of {type_name} objects (or one object), "
            f"got {_json_kind(decoded)}"
        )
    else:
        raise ValueError(
            f"request data must be one JSON object ({type_name}), got {_json_kind(decoded)}"
        )

    messages = []
    for index, item in enumerate(items):
        where = f"message #{index + 1}" if streaming else "request"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} must be a JSON object ({type_name}), got {_json_kind(item)}")
        try:
            messages.append(json_format.ParseDict(item, request_cls(), descriptor_pool=pool))
        except json_format.ParseError as exc:
            raise ValueError(f"{where} does not match {type_name}: {_one_line(exc)}") from None
    return messages


def _json_kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --- describe: descriptors back to proto text, as grpcurl prints them ----------------------

# FieldDescriptor.TYPE_* -> the proto keyword (message and enum fields name their type).
_SCALARS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
    7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32",
    16: "sfixed64", 17: "sint32", 18: "sint64",
}


def _render_symbol(pool: descriptor_pool.DescriptorPool, name: str) -> str:
    finders: list[tuple[str, Callable[[str], Any], Callable[[Any], list[str]]]] = [
        ("a service", pool.FindServiceByName, _service_lines),
        ("a message", pool.FindMessageTypeByName, _message_lines),
        ("an enum", pool.FindEnumTypeByName, _enum_lines),
        ("a method", pool.FindMethodByName, lambda m: [_rpc_line(m)]),
    ]
    for kind, find, lines in finders:
        try:
            found = find(name)
        except KeyError:
            continue
        return "\n".join([f"{found.full_name} is {kind}:", *lines(found)])
    raise ValueError(f"{name!r} is not a service, method, message or enum")


def _rpc_line(method: Any) -> str:
    def stream(flag: bool) -> str:
        return "stream " if flag else ""

    return (f"rpc {method.name} ( {stream(method.client_streaming)}.{method.input_type.full_name}"
            f" ) returns ( {stream(method.server_streaming)}.{method.output_type.full_name} );")


def _service_lines(service: Any) -> list[str]:
    return [f"service {service.name} {{", *(f"  {_rpc_line(m)}" for m in service.methods), "}"]


def _enum_lines(enum: Any) -> list[str]:
    return [f"enum {enum.name} {{", *(f"  {v.name} = {v.number};" for v in enum.values), "}"]


def _type_name(field: Any) -> str:
    if field.message_type is not None:
        return f".{field.message_type.full_name}"
    if field.enum_type is not None:
        return f".{field.enum_type.full_name}"
    return _SCALARS.get(field.type, str(field.type))


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf 7; older ones have label
    return bool(flag) if flag is not None else getattr(field, "label", 0) == 3


def _field_line(field: Any) -> str:
    if _is_map(field):
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name[
            "value"]
        return f"map<{_type_name(key)}, {_type_name(value)}> {field.name} = {field.number};"
    label = "repeated " if _repeated(field) else ""
    return f"{label}{_type_name(field)} {field.name} = {field.number};"


def _message_lines(message: Any) -> list[str]:
    body: list[str] = []
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:
            body += _message_lines(nested)
    for enum in message.enum_types:
        body += _enum_lines(enum)
    for field in message.fields:
        body.append(_field_line(field))
    return [f"message {message.name} {{", *(f"  {line}" for line in body), "}"]
