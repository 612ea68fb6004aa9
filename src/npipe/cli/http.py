r"""``npipe http`` (a curl for pipes), ``npipe serve-asgi`` and ``npipe serve-wsgi`` (an ASGI
or WSGI app on a pipe).

httpx and hypercorn are imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from npipe.acl import Acl
from npipe.address import parse_address
from npipe.cli import service
from npipe.cli.dial import add_address, closed_before_answering, dial_options
from npipe.cli.dial import credentials as dial_credentials
from npipe.cli.load import load_object
from npipe.errors import ConfigError, NpipeError

if TYPE_CHECKING:
    import httpx

EXIT_HTTP_ERROR = 22  # curl -f's exit code for a response >= 400
ALARM_GRACE = 1.0  # past the library's own grace on opening (npipe.http.network)
# RFC 9110 token: what a header name may be made of.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\r\n\0]")


def add_http_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Register ``http``, ``serve-asgi`` and ``serve-wsgi``."""
    p = sub.add_parser(
        "http", parents=[common, dial_options("http")],
        help="make an HTTP request over a pipe (like curl)",
        usage="npipe http [METHOD] ADDRESS PATH [-d DATA|@FILE] [-H 'Name: value'] "
              "[--http2] [-i] [-f] [-o FILE] [options]",
        description="Send one HTTP request over a pipe and print the response body (bytes "
        "as they are). Exit 0 for any response unless -f is given; with -f a status >= 400 "
        "prints no body and exits 22 (as curl does).",
    )
    add_address(p)
    p.add_argument("path", metavar="PATH", help="the request target, e.g. /items?limit=3")
    # With three positionals the first is the METHOD (ADDRESS comes first in the parser:
    # the command shifts them).
    p.add_argument("extra", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("-d", "--data", metavar="DATA", help="request body (POST unless METHOD "
                   "is given); @FILE reads a file, @- standard input")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'",
                   help="add a request header (repeatable)")
    p.add_argument("--http2", action="store_true",
                   help="HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1")
    p.add_argument("-i", "--include", action="store_true",
                   help="print the status line and headers before the body")
    p.add_argument("-f", "--fail", action="store_true",
                   help="exit 22 without printing the body when the status is >= 400")
    p.add_argument("-o", "--output", metavar="FILE", help="write the body to FILE")
    p.set_defaults(func=http_command)

    p = sub.add_parser(
        "serve-asgi", parents=[common], help="serve an ASGI app on a pipe (hypercorn)",
        description="Import MODULE:APP (the current directory first on sys.path) and serve "
        "it on a pipe with hypercorn (HTTP/1.1 and h2c), until SIGINT/SIGTERM/SIGHUP; then "
        "requests in flight get --grace seconds to finish. The app finds its caller in "
        "scope['extensions']['npipe.caller'].",
    )
    p.add_argument("app", nargs="?", metavar="MODULE:APP",
                   help="the ASGI app, e.g. myapi:app (APP defaults to 'app')")
    p.add_argument("--pipe", metavar="NAME", help="pipe name to serve (required)")
    service.add_pipe_server_options(p)
    service.add_service_options(p, grace=5.0, what="requests in flight")
    p.set_defaults(func=serve_asgi_command)

    p = sub.add_parser(
        "serve-wsgi", parents=[common],
        help="serve a WSGI app (Flask, Django) on a pipe (hypercorn)",
        description="Import MODULE:APP (the current directory first on sys.path) and serve "
        "the WSGI app (Flask, Django's get_wsgi_application(), ...) on a pipe with "
        "hypercorn (HTTP/1.1 and h2c), its requests on --workers threads, until "
        "SIGINT/SIGTERM/SIGHUP; then requests in flight get --grace seconds to finish "
        "(one still running then is abandoned, and said in the log: exit 0). The app finds "
        "its caller in environ['npipe.caller'].",
    )
    p.add_argument("app", nargs="?", metavar="MODULE:APP",
                   help="the WSGI app, e.g. myapp:app (APP defaults to 'app')")
    p.add_argument("--pipe", metavar="NAME", help="pipe name to serve (required)")
    service.add_pipe_server_options(p)
    p.add_argument("--workers", type=service.positive_int, metavar="N",
                   help="threads running requests at once; more wait for one (default 10)")
    service.add_service_options(p, grace=5.0, what="requests in flight")
    p.set_defaults(func=serve_wsgi_command)


# --- npipe http ---------------------------------------------------------------------------


def http_command(args: argparse.Namespace) -> int:
    import httpx

    from npipe.http import Transport

    method, address, target = _positionals(args)
    addr = parse_address(address)  # AddressError: exit 2
    headers = _headers(args.header)
    body = _body(args.data) if args.data is not None else None
    if method is None:
        method = "POST" if body is not None else "GET"
    if body is not None and not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("Content-Type", "application/x-www-form-urlencoded"))  # curl's
    credentials = dial_credentials(args, addr)

    def transport(http2: bool) -> Transport:
        return Transport(
            addr, http1=not http2, http2=http2, server_user=args.server_user,
            pipe_dir=args.pipe_dir, credentials=credentials, timeout=args.timeout,
            encrypt=args.encrypt, allow_smb2=args.allow_smb2,
        )

    # --timeout bounds the whole request: each step on its own (httpx), and all of them
    # together (an alarm, where there are signals: a body that trickles in), a second
    # later, so that a step that times out on its own says why (no pipe, ...).
    timeout = httpx.Timeout(args.timeout)
    try:
        with _whole_request(args.timeout + ALARM_GRACE), httpx.Client(
            transport=transport(args.http2), timeout=timeout, base_url="http://localhost"
        ) as client:
            answered = False
            try:
                with client.stream(method, target, headers=headers, content=body) as response:
                    answered = True
                    return _print_response(args, response)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as e:
                if not answered and _closed_at_once(e):
                    raise NpipeError(closed_before_answering(addr)) from e
                # Not HTTP as expected: a gRPC server (HTTP/2 only, and only for gRPC)?
                if (not answered and isinstance(e, httpx.RemoteProtocolError)
                        and _speaks_grpc(transport(True), args.timeout)):
                    raise NpipeError(
                        f"pipe {addr} answered like a gRPC server, not HTTP: use npipe call "
                        "or npipe health"
                    ) from e
                raise NpipeError(_http_error(e, addr)) from e
            except httpx.HTTPError as e:
                raise NpipeError(_http_error(e, addr)) from e
    except _RequestTimeout:
        raise NpipeError(
            f"timed out: pipe {addr} did not complete the request in {args.timeout:g} s"
        ) from None


class _RequestTimeout(Exception):
    """The alarm of _whole_request went off."""


@contextlib.contextmanager
def _whole_request(seconds: float) -> Iterator[None]:
    """Raise _RequestTimeout in this (the main) thread after ``seconds``, whatever it is
    waiting for; without SIGALRM (Windows) httpx's own per-step timeouts remain."""
    setitimer = getattr(signal, "setitimer", None)
    if setitimer is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: object) -> None:
        raise _RequestTimeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _speaks_grpc(transport: httpx.BaseTransport, timeout: float) -> bool:
    """Whether the pipe answers a gRPC request (HTTP/2, to a method no server has) as a
    gRPC server does: content-type application/grpc or a grpc-status header."""
    import httpx

    probe = {"content-type": "application/grpc", "te": "trailers"}
    try:
        with httpx.Client(transport=transport, timeout=min(timeout, 5.0),
                          base_url="http://localhost") as client:
            reply = client.post("/npipe.Probe/NoSuchMethod", headers=probe,
                                content=b"\0\0\0\0\0")  # one empty message
    except (httpx.HTTPError, NpipeError, OSError):
        return False
    return (reply.headers.get("content-type", "").startswith("application/grpc")
            or "grpc-status" in reply.headers)


def _positionals(args: argparse.Namespace) -> tuple[str | None, str, str]:
    if args.extra is None:
        method, address, target = None, args.address, args.path
    else:
        method, address, target = args.address, args.path, args.extra
        if not _TOKEN.match(method):
            raise ConfigError(f"bad METHOD {method!r}")
        method = method.upper()
    if "://" in target:
        raise ConfigError(f"PATH {target!r} is a URL: give only the path (the pipe is the host)")
    if not target.startswith("/"):
        target = "/" + target
    return method, address, target


def _headers(given: list[str]) -> list[tuple[str, str]]:
    headers = []
    for header in given:
        name, sep, value = header.partition(":")
        if not sep or not _TOKEN.match(name):
            raise ConfigError(f"bad header {header!r}: use 'Name: value'")
        if _BAD_VALUE.search(value):
            raise ConfigError(f"bad header {header!r}: a value may not hold CR, LF or NUL")
        headers.append((name, value.strip()))
    return headers


def _body(data: str) -> bytes:
    if not data.startswith("@"):
        return data.encode()
    source = data[1:]
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {source}: {e.strerror or e}") from e


def _print_response(args: argparse.Namespace, response: httpx.Response) -> int:
    if args.fail and response.status_code >= 400:
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        print(f"npipe: the server answered {response.status_code}{reason}", file=sys.stderr)
        return EXIT_HTTP_ERROR
    out: IO[bytes]
    if args.include:
        # HTTP/2 has no reason phrase (httpx makes one up): print what came on the wire.
        phrase = response.reason_phrase if response.http_version.startswith("HTTP/1") else ""
        reason = f" {phrase}" if phrase else ""
        head = [f"{response.http_version} {response.status_code}{reason}"]
        head += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in response.headers.raw]
        sys.stdout.buffer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if args.output:
        sys.stdout.buffer.flush()
        with open(args.output, "wb") as out:
            _copy(response, out)
    else:
        _copy(response, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


def _copy(response: httpx.Response, out: IO[bytes]) -> None:
    for chunk in response.iter_bytes():
        out.write(chunk)


def _closed_at_once(e: Exception) -> bool:
    """The pipe closed the connection before any answer: reset, or an end of stream."""
    import httpx

    if isinstance(e, httpx.RemoteProtocolError):
        return "without sending" in str(e)  # h11: "Server disconnected without sending..."
    cause = e.__cause__ or e.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return isinstance(cause, (ConnectionResetError, BrokenPipeError))


def _http_error(e: Exception, addr: Any) -> str:
    import httpx

    if isinstance(e, httpx.ConnectTimeout):
        return f"timed out opening pipe {addr}"
    if isinstance(e, httpx.TimeoutException):
        return f"timed out talking to pipe {addr}"
    if isinstance(e, httpx.ConnectError):
        return str(e)  # npipe's own message (no pipe, access denied, ...)
    return f"HTTP over pipe {addr} failed: {e or type(e).__name__}"


# --- npipe serve-asgi, serve-wsgi -------------------------------------------------------


def serve_asgi_command(args: argparse.Namespace) -> int:
    return _serve_command(args, "asgi")


def serve_wsgi_command(args: argparse.Namespace) -> int:
    return _serve_command(args, "wsgi")


def _serve_command(args: argparse.Namespace, kind: str) -> int:
    service.require(args, "app", "pipe")
    service.served_pipe(args.pipe, "--pipe")
    acl = service.pipe_acl(args)
    app = load_app(args.app, kind)
    return asyncio.run(_serve(args, app, acl, kind))


async def _serve(args: argparse.Namespace, app: Any, acl: Acl, kind: str) -> int:
    from hypercorn.config import Config

    from npipe.http import serve_asgi, serve_wsgi
    from npipe.http.server import DEFAULT_WSGI_WORKERS, AsgiServer, WsgiServer

    config = Config()
    config.graceful_timeout = args.grace
    options: dict[str, Any] = {
        "acl": acl, "pipe_dir": args.pipe_dir, "dotnet": args.dotnet, "smb": args.smb,
        "max_connections": args.max_connections, "config": config,
    }
    stop = await service.watch_stop_signals()
    server: AsgiServer
    try:
        if kind == "wsgi":
            workers = args.workers if args.workers is not None else DEFAULT_WSGI_WORKERS
            server = await serve_wsgi(app, args.pipe, max_workers=workers, **options)
        else:
            server = await serve_asgi(app, args.pipe, **options)
    except BaseException:
        stop.cancel()
        raise
    status = f"serving {args.app} on pipe {server.address.name}"
    print(status, file=sys.stderr, flush=True)
    service.ready(status)
    try:
        sig = await stop
        service.stopping(f"stopping on {sig.name}")
    finally:
        await server.aclose()  # bounded: graceful timeout, then cancelled
    if isinstance(server, WsgiServer) and server.busy_workers:
        # A request's thread cannot be stopped, and the pool's threads are joined at
        # exit: one stuck would hold the process past systemd's TimeoutStopSec.
        # The stop asked for was carried out: exit 0 (not a failed unit for systemd),
        # the requests left behind said here, in the journal.
        print(f"npipe: {service.plural(server.busy_workers, 'request')} still running "
              f"{args.grace:g}s after {sig.name}: abandoned", file=sys.stderr, flush=True)
        os._exit(0)
    return 0


_OTHER = {"asgi": ("a WSGI", "serve-wsgi", "a sync callable taking (environ, start_response),"
                   " as Flask and Django apps are"),
          "wsgi": ("an ASGI", "serve-asgi", "an async callable taking (scope, receive, send)")}


def load_app(spec: str, kind: str = "asgi") -> Any:
    """MODULE:APP (APP may be dotted; MODULE alone means MODULE:app), imported as uvicorn
    and hypercorn do (npipe.cli.load); an app of the other kind is a usage error that
    names the command that serves it."""
    from npipe.http.server import app_kind

    app = load_object(spec if ":" in spec else f"{spec}:app", "MODULE:APP")
    if not callable(app):
        raise ConfigError(f"{spec} is not an {kind.upper()} app (not callable)")
    found = app_kind(app)
    if found is not None and found != kind:
        other, command, what = _OTHER[kind]
        raise ConfigError(f"{spec} is {other} app ({what}): serve it with npipe {command}")
    return app


__all__ = ["add_http_parsers", "load_app"]
