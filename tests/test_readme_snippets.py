"""Every ```python block of README.md runs as pasted (issue 20).

Each block runs in a fresh ``python -c`` subprocess with the installed package, in an
empty working directory, with a pipe directory and a machine-wide directory of its own,
and must exit 0 within TIMEOUT seconds. What a block needs is said in an HTML comment on
the line just before its fence; nothing is skipped silently: a marker this file does not
know, or a block it cannot run, is a failure (a need the machine cannot meet, root for
one, is a skip, and under CI=true a failure, as everywhere in the suite).

    <!-- snippet: KEY=VALUE[,VALUE...] [KEY=VALUE ...] -->

Keys:

- ``needs=pipe:NAME``: the Buy example (``npipe demo --serve``) serves pipe NAME while the
  block runs.
- ``needs=user:NAME``: a Unix account NAME exists (made if missing, as root, and then
  removed when the test session ends, as the suite's other accounts are).
- ``needs=group:NAME``: a Unix group NAME exists (made if missing, as root, and removed
  after the block).
- ``needs=smb``: ``smb=True`` can serve: $NPIPE_SAMBA_NP_DIR names a root-owned 0700
  stand-in for smbd's np/ directory (as root; the tests elsewhere run a real smbd).
- ``serves=NAME``: the block is a server that runs until stopped: it passes once pipe
  NAME is served while it still runs (exiting first is a failure); it is then stopped.
- ``module=NAME``: the block is the file NAME.py, and its first line says how to run it:
  ``# NAME.py: npipe ...`` (the command is run in the file's directory).

Several needs are comma-separated: ``<!-- snippet: needs=user:bob,smb -->``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from npipe.testing.netns import skip_or_fail

README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT = 60.0
NEEDS = ("pipe", "user", "group", "smb")
KEYS = ("needs", "serves", "module")

_FENCE = re.compile(r"^```python[ \t]*$")
_MARKER = re.compile(r"^<!--\s*snippet:(?P<body>.*?)-->\s*$")


@dataclass
class Snippet:
    line: int  # of the fence, 1-based
    code: str
    marker: str | None  # the comment's text, if the line before the fence is one
    needs: list[tuple[str, str]] = field(default_factory=list)
    serves: str | None = None
    module: str | None = None


def snippets(text: str) -> list[Snippet]:
    lines = text.splitlines()
    found = []
    i = 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README.md:{start + 1}: a python block is never closed"
            before = lines[start - 1] if start else ""
            marker = _MARKER.match(before)
            found.append(Snippet(start + 1, "\n".join(body) + "\n",
                                 marker["body"].strip() if marker else None))
        i += 1
    return found


def parse_marker(snippet: Snippet) -> None:
    """Fill ``snippet``'s needs, serves and module from its marker; AssertionError (a
    failure, not a skip) for anything this file does not know."""
    snippet.needs, snippet.serves, snippet.module = [], None, None
    if snippet.marker is None:
        return
    where = f"README.md:{snippet.line - 1}"
    assert snippet.marker, f"{where}: an empty snippet marker"
    for word in snippet.marker.split():
        key, sep, value = word.partition("=")
        assert sep and value, f"{where}: {word!r} is not KEY=VALUE"
        assert key in KEYS, f"{where}: unknown snippet key {key!r} (known: {', '.join(KEYS)})"
        if key == "needs":
            for need in value.split(","):
                kind, _, arg = need.partition(":")
                assert kind in NEEDS, f"{where}: unknown need {need!r} (known: {NEEDS})"
                assert bool(arg) == (kind != "smb"), f"{where}: {need!r}: wrong argument"
                snippet.needs.append((kind, arg))
        elif key == "serves":
            snippet.serves = value
        else:
            assert re.fullmatch(r"[A-Za-z_]\w*", value), f"{where}: bad module {value!r}"
            snippet.module = value


ALL = snippets(README.read_text())


def test_the_readme_has_python_snippets_and_well_formed_markers() -> None:
    assert len(ALL) >= 5
    for snippet in ALL:
        parse_marker(snippet)


def test_the_marker_parser_refuses_what_it_does_not_know() -> None:
    for marker in ("needs=printer", "needs=user", "timeout=5", "serves", "needs=smb:x", ""):
        with pytest.raises(AssertionError):
            parse_marker(Snippet(2, "pass\n", marker))


# --- what the needs bring -------------------------------------------------------------


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        skip_or_fail(f"the README snippet needs {what}, which needs root")


@contextlib.contextmanager
def _group(name: str) -> Iterator[None]:
    try:
        grp.getgrnam(name)
    except KeyError:
        pass
    else:
        yield
        return
    _require_root(f"a group {name}")
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


def _user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        _require_root(f"a user {name}")
        from npipe.samba.smbd import ensure_unix_user

        ensure_unix_user(name)  # noted in the suite's registry: removed at the session's end


def _np_dir(base: Path) -> Path:
    _require_root("smb=True (a stand-in for smbd's np/)")
    np = base / "np"
    np.mkdir(mode=0o700)
    return np


def _live(name: str, env: dict[str, str]) -> bool:
    done = subprocess.run([sys.executable, "-m", "npipe", "path", name], env=env,
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return False
    from npipe.local.listener import is_live

    return is_live(Path(done.stdout.strip()))


def _wait_served(name: str, proc: subprocess.Popen[str], env: dict[str, str],
                 what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not _live(name, env):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{what} ended ({proc.returncode}) before serving pipe {name}:\n"
                        f"{out}\n{err}")
        assert time.monotonic() < deadline, f"{what} did not serve pipe {name} in {TIMEOUT} s"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


@contextlib.contextmanager
def _environment(snippet: Snippet) -> Iterator[tuple[dict[str, str], Path]]:
    """The block's environment and working directory, its needs met."""
    base = Path(tempfile.mkdtemp(prefix="nprd", dir="/tmp"))  # short: socket paths
    os.chmod(base, 0o755)
    work = base / "work"
    work.mkdir()
    env = {**os.environ, "NPIPE_PIPE_DIR": str(base / "pipes"),
           "NPIPE_MACHINE_DIR": str(base / "run")}
    env.pop("NPIPE_SAMBA_NP_DIR", None)
    if os.geteuid() == 0:
        (base / "run").mkdir()
        os.chmod(base / "run", 0o1777)
    servers: list[subprocess.Popen[str]] = []
    try:
        with contextlib.ExitStack() as stack:
            for kind, arg in snippet.needs:
                if kind == "user":
                    _user(arg)
                elif kind == "group":
                    stack.enter_context(_group(arg))
                elif kind == "smb":
                    env["NPIPE_SAMBA_NP_DIR"] = str(_np_dir(base))
                else:  # pipe: the Buy example
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "npipe", "demo", "--serve", "--pipe", arg],
                        env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
                    servers.append(proc)
                    _wait_served(arg, proc, env, f"npipe demo --serve --pipe {arg}")
            yield env, work
    finally:
        for proc in servers:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


# --- each snippet ---------------------------------------------------------------------


def _command(snippet: Snippet, work: Path) -> list[str]:
    if snippet.module is None:
        return [sys.executable, "-c", snippet.code]
    first = snippet.code.splitlines()[0]
    prefix = f"# {snippet.module}.py: npipe "
    assert first.startswith(prefix), (
        f"README.md:{snippet.line + 1}: a module=... block starts with '{prefix}...'")
    (work / f"{snippet.module}.py").write_text(snippet.code)
    return [sys.executable, "-m", "npipe", *shlex.split(first[len(prefix):])]


@pytest.mark.parametrize("snippet", ALL, ids=[f"README.md:{s.line}" for s in ALL])
def test_readme_snippet_runs(snippet: Snippet) -> None:
    parse_marker(snippet)
    with _environment(snippet) as (env, work):
        command = _command(snippet, work)
        if snippet.serves is None:
            try:
                done = subprocess.run(command, env=env, cwd=work, capture_output=True,
                                      text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as e:
                pytest.fail(f"README.md:{snippet.line}: still running after {TIMEOUT} s "
                            f"(a server? mark it serves=NAME):\n{e.stdout!r}\n{e.stderr!r}")
            assert done.returncode == 0, (
                f"README.md:{snippet.line} exited {done.returncode}:\n{done.stdout}"
                f"\n{done.stderr}")
            assert "Traceback" not in done.stderr, done.stderr
            return
        proc = subprocess.Popen(command, env=env, cwd=work, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            _wait_served(snippet.serves, proc, env, f"README.md:{snippet.line}")
        finally:
            _out, err = _stop(proc)
        assert "Traceback" not in err, err
