r"""``npipe http`` (a curl for pipes), ``npipe serve-asgi`` and ``npipe serve-wsgi`` (an ASGI
or WSGI app on a pipe).

httpx and hypercorn are imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
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
EXIT_FAILED, EXIT_USAGE = 1, 2  # as every npipe command
# A shell's status for a program killed by SIGPIPE (128 + 13): what curl or cat give when
# their reader goes away in a pipeline.
EXIT_STDOUT_CLOSED = 141
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
        usage="npipe http [METHOD] ADDRESS [PATH] [-X METHOD] [-d DATA|@FILE] [--json DATA] "
              "[-H 'Name: value'] [--http2] [-i] [-s] [-v] [-f] [-o FILE] [options]",
        description="Send one HTTP request over a pipe and print the response body (bytes "
        "as they are). PATH defaults to /. Exit 0 for any response unless -f is given; with "
        "-f a status >= 400 prints no body and exits 22 (as curl does).",
    )
    add_address(p)
    p.add_argument("path", metavar="PATH", nargs="?",
                   help="the request target, e.g. /items?limit=3 (default /)")
    # With three positionals the first is the METHOD (ADDRESS comes first in the parser:
    # the command shifts them).
    p.add_argument("extra", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("-X", "--request", metavar="METHOD", dest="method",
                   help="the request method (default GET, or POST with a body)")
    body = p.add_mutually_exclusive_group()
    body.add_argument("-d", "--data", metavar="DATA", help="request body (POST unless METHOD "
                      "is given); @FILE reads a file, @- standard input, and drops their CR "
                      "and LF characters, as curl -d does")
    body.add_argument("--data-binary", metavar="DATA",
                      help="as -d, but @FILE and @- are sent exactly as they are")
    body.add_argument("--json", metavar="DATA",
                      help="a JSON body (as --data-binary), with Content-Type and Accept "
                      "application/json unless -H gives them (as curl --json)")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'",
                   help="add a request header (repeatable)")
    p.add_argument("--http2", action="store_true",
                   help="HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1")
    p.add_argument("-i", "--include", action="store_true",
                   help="print the status line and headers before the body")
    p.add_argument("-s", "--silent", action="store_true",
                   help="print no error messages on stderr (the exit status still tells)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the request and response headers on stderr (> and <)")
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
    if not args.silent:
        return _http_command(args)
    # curl -s: no error message, the exit status alone tells (the codes npipe.cli's own).
    logging.disable(logging.CRITICAL)
    try:
        return _http_command(args)
    except (ConfigError, ValueError):
        return EXIT_USAGE
    except (NpipeError, OSError):
        return EXIT_FAILED


def _http_command(args: argparse.Namespace) -> int:
    import httpx

    from npipe.http import Transport

    method, address, target = _positionals(args)
    addr = parse_address(address)  # AddressError: exit 2
    headers = _headers(args.header)
    body = _request_body(args, headers)
    if method is None:
        method = "POST" if body is not None else "GET"
    credentials = dial_credentials(args, addr)

    def transport(http2: bool) -> Transport:
        return Transport(
            addr, http1=not http2, http2=http2, server_user=args.server_user,
            pipe_dir=args.pipe_dir, credentials=credentials, timeout=args.timeout,
            encrypt=args.encrypt, allow_smb2=args.allow_smb2,
        )

    hooks: dict[str, list[Any]] = {}
    if args.verbose:
        hooks = {"request": [_show_request(args.http2)], "response": [_show_response]}
    # --timeout bounds the whole request: each step on its own (httpx), and all of them
    # together (an alarm, where there are signals: a body that trickles in), a second
    # later, so that a step that times out on its own says why (no pipe, ...).
    timeout = httpx.Timeout(args.timeout)
    try:
        with _whole_request(args.timeout + ALARM_GRACE), httpx.Client(
            transport=transport(args.http2), timeout=timeout, base_url="http://localhost",
            event_hooks=hooks,
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
    except _StdoutClosed:
        return EXIT_STDOUT_CLOSED


def _request_body(args: argparse.Namespace, headers: list[tuple[str, str]]) -> bytes | None:
    """The body of -d, --data-binary or --json (None without one), and the headers that go
    with it when -H does not give them: curl's, form data for -d, JSON for --json."""
    given = {name.lower() for name, _ in headers}
    if args.json is not None:
        for name in ("Content-Type", "Accept"):
            if name.lower() not in given:
                headers.append((name, "application/json"))
        return _body(args.json, strip_newlines=False)
    if args.data is None and args.data_binary is None:
        return None
    if "content-type" not in given:
        headers.append(("Content-Type", "application/x-www-form-urlencoded"))  # curl's
    if args.data is not None:
        return _body(args.data, strip_newlines=True)
    return _body(args.data_binary, strip_newlines=False)


def _show_request(http2: bool) -> Any:
    version = "HTTP/2" if http2 else "HTTP/1.1"

    def show(request: httpx.Request) -> None:
        target = request.url.raw_path.decode("ascii", "replace")
        lines = [f"> {request.method} {target} {version}"]
        lines += [f"> {k.decode('latin-1')}: {v.decode('latin-1')}"
                  for k, v in request.headers.raw]
        print("\n".join([*lines, ">"]), file=sys.stderr, flush=True)

    return show


def _show_response(response: httpx.Response) -> None:
    # What came on the wire: HTTP/2 has no reason phrase (httpx makes one up).
    phrase = response.reason_phrase if response.http_version.startswith("HTTP/1") else ""
    reason = f" {phrase}" if phrase else ""
    lines = [f"< {response.http_version} {response.status_code}{reason}"]
    lines += [f"< {k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in response.headers.raw]
    print("\n".join([*lines, "<"]), file=sys.stderr, flush=True)


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


# Two words are METHOD ADDRESS (PATH /) when the first is one of these, in capitals, and
# the second is no path: ADDRESS PATH otherwise.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})


def _positionals(args: argparse.Namespace) -> tuple[str | None, str, str]:
    words = [w for w in (args.address, args.path, args.extra) if w is not None]
    if len(words) == 2 and words[0] in _METHODS and not words[1].startswith("/"):
        words.append("/")
    method: str | None = None
    if len(words) == 3:
        method, address, target = words
        if not _TOKEN.match(method):
            raise ConfigError(f"bad METHOD {method!r}")
        method = method.upper()
    else:
        address, target = words[0], (words[1] if len(words) > 1 else "/")
    if args.method is not None:
        if not _TOKEN.match(args.method):
            raise ConfigError(f"bad METHOD {args.method!r}")
        if method is not None and method != args.method.upper():
            raise ConfigError(f"two methods: {method} and -X {args.method}")
        method = args.method.upper()
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


def _body(data: str, *, strip_newlines: bool) -> bytes:
    """DATA as it is, or the bytes of @FILE (@- standard input); ``strip_newlines``: without
    their CR and LF characters, as curl -d sends a file (curl --data-binary keeps them)."""
    if not data.startswith("@"):
        return data.encode()
    source = data[1:]
    if source == "-":
        content = sys.stdin.buffer.read()
    else:
        try:
            with open(source, "rb") as f:
                content = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read {source}: {e.strerror or e}") from e
    return content.replace(b"\r", b"").replace(b"\n", b"") if strip_newlines else content


class _StdoutClosed(Exception):
    """Whoever read standard output has gone (``npipe http ... | head -c1``)."""


def _print_response(args: argparse.Namespace, response: httpx.Response) -> int:
    if args.fail and response.status_code >= 400:
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        if not args.silent:
            print(f"npipe: the server answered {response.status_code}{reason}",
                  file=sys.stderr)
        return EXIT_HTTP_ERROR
    with _quiet_when_stdout_closes():
        if args.include:
            # HTTP/2 has no reason phrase (httpx makes one up): print what came on the wire.
            phrase = response.reason_phrase if response.http_version.startswith("HTTP/1") else ""
            reason = f" {phrase}" if phrase else ""
            head = [f"{response.http_version} {response.status_code}{reason}"]
            head += [f"{k.decode('latin-1')}: {v.decode('latin-1')}"
                     for k, v in response.headers.raw]
            sys.stdout.buffer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if args.output:
            sys.stdout.buffer.flush()
            with open(args.output, "wb") as out:
                _copy(response, out)
        else:
            _copy(response, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    return 0


@contextlib.contextmanager
def _quiet_when_stdout_closes() -> Iterator[None]:
    """A reader of stdout that went away ends the command quietly, as SIGPIPE ends curl or
    cat in a shell pipeline (Python ignores SIGPIPE, so a write raises instead)."""
    try:
        yield
    except BrokenPipeError:
        # What is still buffered for stdout would fail again at exit ("Exception ignored
        # ... BrokenPipeError"): point the descriptor at /dev/null first.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        raise _StdoutClosed() from None


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
    # hypercorn gives its error logger a stderr handler of its own by default, and the
    # logger also propagates to the root logger that npipe.cli configured: every line
    # came out twice. A logger without handlers of its own goes through the root's only.
    config.errorlog = logging.getLogger("hypercorn.error")
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
    service.announce_ready(f"serving {args.app} on pipe {server.address.name}")
    try:
        sig = await stop
        service.announce_stopping(
            f"{sig.name}: stopping, requests in flight get {args.grace:g}s")
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
