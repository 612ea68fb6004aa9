"""The units in contrib/systemd under a real systemd: a Debian 12 root booted with
``systemd-nspawn -b`` (systemd 252 as PID 1 of a container), npipe installed into it from a
wheel of this checkout exactly as contrib/README.md says, then every unit driven with
``systemctl`` and read back with ``journalctl`` (through ``nsenter``).

The root is debootstrapped once and kept in a cache outside the checkout
(``/var/cache/npipe-tests/systemd-bookworm-KEY``, KEY from the release, the package list
and ROOT_RECIPE: a change of either makes a new one); each run boots an overlay of it, so
the cached root is never changed, and builds npipe's wheel afresh. Bookworm on either
release: systemd 257 (Debian 13) does not boot on a hybrid cgroup v1 host, 252 does.

pip inside the container has no network (``--private-network``): the wheels it installs
come from a wheelhouse that this machine's pip downloads for bookworm's Python 3.11 (kept
in the cache), named in the container's /etc/pip.conf, so the README's ``pip install
npipe`` line runs as written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from npipe.testing.netns import skip_or_fail

# The first test also builds the root when the cache has none (debootstrap: a minute or
# two, more on a slow mirror), past the suite's 120 s; each step inside has its own bound.
pytestmark = [pytest.mark.root, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "contrib" / "README.md"
RELEASE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates",
            "sudo")
# Bump when what cached_root() does to a fresh root changes (the key then names a new one).
ROOT_RECIPE = 1
PYTHON = ("3.11", "cp311")  # bookworm's python3, for which the wheels are downloaded
CACHE = Path(os.environ.get("NPIPE_TEST_CACHE", "/var/cache/npipe-tests"))
MIRROR = os.environ.get("NPIPE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 120.0


# -- prerequisites, the cached root, the wheels ----------------------------------------


def _require() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (debootstrap, mounts, systemd-nspawn)")
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "mount")
               if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed (scripts/test installs debootstrap "
                     "and systemd-container)")
    if not os.path.ismount("/sys/fs/cgroup"):
        # e.g. a chroot that bound /sys without the mounts beneath it
        skip_or_fail("no cgroup hierarchy mounted at /sys/fs/cgroup: systemd-nspawn cannot "
                     "run a container here (bind /sys recursively: mount --rbind)")


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)}: exit {done.returncode}\n"
                             f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p == str(path) or p.startswith(prefix)),
                  key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -rf, but never through a mount (a debootstrap cut short leaves /proc bound in)."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    if _mounts_under(path):
        raise AssertionError(f"{path}: still has mounts in it, not removed")
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cached_root() -> Path:
    """The debootstrapped root, built now if the cache has none for this key."""
    recipe = repr((RELEASE, PACKAGES, ROOT_RECIPE)).encode()
    base = CACHE / f"systemd-{RELEASE}-{hashlib.sha256(recipe).hexdigest()[:12]}"
    with _cache_lock():
        if (base / "complete").exists():
            return base / "root"
        for leftover in CACHE.glob(f"{base.name}.building-*"):
            _remove_tree(leftover)
        building = CACHE / f"{base.name}.building-{os.getpid()}"
        building.mkdir()
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
              RELEASE, str(building / "root"), MIRROR], timeout=1500)
        (building / "complete").write_text(f"{RELEASE} {' '.join(PACKAGES)}\n")
        if base.exists():
            _remove_tree(base)
        building.rename(base)
        return base / "root"


def _target_platforms() -> list[str]:
    """pip download's --platform for bookworm (glibc 2.36) on this machine's architecture."""
    arch = platform.machine()
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(17, 37)]
    return [*tags, f"manylinux2014_{arch}", f"linux_{arch}"]


def build_wheels(work: Path) -> tuple[Path, Path]:
    """(npipe's wheel, built from this checkout now; the wheels it needs, for bookworm)."""
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".*_cache", ".venv"))
    own = work / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(own),
          str(source)])
    wheel = next(own.glob("npipe-*.whl"))
    deps = CACHE / f"wheels-{RELEASE}"
    target = ["--only-binary=:all:", "--python-version", PYTHON[0], "--implementation", "cp",
              "--abi", PYTHON[1], "--abi", "abi3", "--abi", "none",
              *(f"--platform={p}" for p in _target_platforms())]
    wanted = f"{wheel}[all]"  # as contrib/README.md installs it (the units serve gRPC and HTTP)
    with _cache_lock():
        deps.mkdir(exist_ok=True)
        download = [sys.executable, "-m", "pip", "download", "-q", "-d", str(deps), *target]
        # What the cache has is enough unless a requirement changed: the index only then.
        offline = subprocess.run([*download, "--no-index", "--find-links", str(deps),
                                  wanted], capture_output=True, text=True, timeout=300)
        if offline.returncode != 0:
            _run([*download, wanted], timeout=900)
        for copy in deps.glob("npipe-*.whl"):  # (pip download copies the wheel itself)
            copy.unlink()
    return own, deps


# -- the container ---------------------------------------------------------------------


@dataclass
class Container:
    name: str
    leader: int  # its PID 1, as this machine numbers it
    log: Path
    install: list[tuple[str, subprocess.CompletedProcess[str]]] = field(default_factory=list)

    @property
    def enter(self) -> list[str]:
        # -r: its root too. Entering its mount namespace alone is not enough where
        # systemd-nspawn itself ran in a chroot (scripts/test-in-chroot): the namespace's
        # root is then the whole machine's, and systemctl run there says "offline".
        return ["nsenter", "-t", str(self.leader), "-a", "-r", "-w"]

    def run(self, command: str, *, check: bool = True, timeout: float = 90
            ) -> subprocess.CompletedProcess[str]:
        """``command`` (bash) inside, as root, in a clean environment."""
        argv = [*self.enter, "env", "-i", f"PATH={PATH}",
                "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
                "bash", "-c", command]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"in the container: {command}: exit {done.returncode}\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def popen(self, command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.enter, "env", "-i", f"PATH={PATH}",
             "HOME=/root", "LANG=C.UTF-8", "bash", "-c", command],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run(f"install -D -m {mode:o} /dev/stdin {shlex.quote(path)} <<'EOF_NPIPE'\n"
                 f"{text}EOF_NPIPE")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *selector: str) -> str:
        self.run("journalctl --sync || true")
        return self.run(f"journalctl --no-pager -o cat {' '.join(selector)}").stdout

    def as_user(self, user: str, command: str, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        return self.run(f"runuser -u {user} -- {command}", check=check)


def _container_init(nspawn_pid: int, timeout: float) -> int:
    """The host PID of the container's PID 1: the descendant of nspawn that is 1 inside."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parents: dict[int, int] = {}
        inner: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{entry}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                parents[int(entry)] = int(fields["PPid"])
                inner[int(entry)] = fields.get("NSpid", "").split()[-1]
        for pid, last in inner.items():
            if last != "1" or pid == 1:
                continue
            ancestor = parents.get(pid, 0)
            while ancestor > 1 and ancestor != nspawn_pid:
                ancestor = parents.get(ancestor, 0)
            if ancestor == nspawn_pid:
                return pid
        time.sleep(0.1)
    raise AssertionError("the container's init did not appear")


@contextlib.contextmanager
def booted(lower: Path, wheels: tuple[Path, Path], work: Path) -> Iterator[Container]:
    """An overlay of ``lower`` booted by systemd-nspawn; always torn down."""
    upper, scratch, merged = work / "upper", work / "overlay-work", work / "root"
    for d in (upper, scratch, merged):
        d.mkdir()
    _run(["mount", "-t", "overlay", "overlay", "-o",
          f"lowerdir={lower},upperdir={upper},workdir={scratch}", str(merged)])
    # pip in the container installs from the wheelhouse only (it has no network).
    (merged / "etc" / "pip.conf").write_text(
        "[global]\nno-index = true\nfind-links = /wheelhouse/npipe /wheelhouse/deps\n")
    name = f"npipe-test-{os.getpid()}"
    log = work / "console.log"
    proc = None
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["systemd-nspawn", "-q", "-D", str(merged), "-b", "--private-network",
                 "--register=no", "--keep-unit", "-M", name, "--console=read-only",
                 f"--bind-ro={wheels[0]}:/wheelhouse/npipe",
                 f"--bind-ro={wheels[1]}:/wheelhouse/deps",
                 f"--bind-ro={work / 'src'}:/root/npipe"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            leader = _container_init(proc.pid, 30)
        except AssertionError:
            raise AssertionError(f"systemd-nspawn did not start a container: "
                                 f"{log.read_text()[-3000:]}") from None
        box = Container(name, leader, log)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:  # (systemctl cannot connect until PID 1 has made its socket)
            booting = box.run("systemctl is-system-running --wait", check=False,
                              timeout=BOOT_TIMEOUT)
            # Before that socket exists is-system-running says "offline" and nothing on
            # stderr (seen on the first boot of a freshly built root, in a Debian 13 chroot)
            not_yet = ("Failed to connect" in booting.stderr
                       or booting.stdout.strip() == "offline")
            if not not_yet or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if booting.stdout.strip() not in ("running", "degraded"):
            raise AssertionError(f"the container's systemd is {booting.stdout.strip()!r} "
                                 f"({booting.stderr.strip()}): {log.read_text()[-3000:]}")
        yield box
    finally:
        if proc is not None:
            _stop_container(proc)
        for _ in range(20):
            if subprocess.run(["umount", str(merged)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(merged)], capture_output=True)


def _stop_container(proc: subprocess.Popen[bytes]) -> None:
    """nspawn powers the container off on SIGTERM; kill it all if that takes too long
    (the container's processes die with its PID 1)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(AssertionError, ProcessLookupError):
            os.kill(_container_init(proc.pid, 1), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(20)


def readme_install_lines() -> list[str]:
    """The commands of contrib/README.md's install block, in order."""
    section = README.read_text().split("\n## Install\n", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "contrib/README.md: no sh block under ## Install"
    return [line for line in match.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    _require()
    started = time.monotonic()
    lower = cached_root()
    work = Path(tempfile.mkdtemp(prefix="npipe-boot-", dir=CACHE))
    try:
        wheels = build_wheels(work)
        with booted(lower, wheels, work) as container:
            print(f"\n[systemd-boot] root and wheels ready and booted in "
                  f"{time.monotonic() - started:.0f}s")
            # The README's lines as written, from the source's top directory.
            for line in readme_install_lines():
                container.install.append((line, container.run(
                    f"cd /root/npipe && {line}", check=False, timeout=300)))
            yield container
    finally:
        _remove_tree(work)


def _installed(box: Container) -> None:
    failed = [(line, r) for line, r in box.install if r.returncode != 0]
    if failed:
        line, r = failed[0]
        pytest.fail(f"contrib/README.md's install step failed: {line}: exit {r.returncode}\n"
                    f"{r.stdout}{r.stderr}", pytrace=False)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.2)


SLOW_MODULE = """\
import os, pathlib, time

from npipe.examples.buy import buy_pb2_grpc, service


def add_services(server):
    time.sleep(float(os.environ.get("SLOW_START", "0")))

    def slow(context):
        pathlib.Path("/tmp/slow-call-started").touch()
        time.sleep(float(os.environ.get("SLOW_CALL", "0")))
        return "slow"

    buy_pb2_grpc.add_MyServiceServicer_to_server(service.MyService(slow), server)


def fail(server):
    raise RuntimeError("no database")
"""

HELLO_APP = """\
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello from asgi"})
"""

BUY = """'{"id": "pear", "quantity": 2, "price": 7}'"""


def _module_dir(box: Container, unit: str, directory: str) -> None:
    """A drop-in putting ``unit``'s module directory first (contrib/README.md's way)."""
    box.write(f"/etc/systemd/system/{unit}.d/module.conf",
              f"[Service]\nWorkingDirectory={directory}\n")
    box.run("systemctl daemon-reload")


# -- the tests, in the order they run (one container for all) ---------------------------


def test_install_steps_as_contrib_readme_gives_them(box: Container) -> None:
    _installed(box)
    lines = [line for line, _r in box.install]
    assert any(re.search(r"pip install '?npipe\b", line) for line in lines), lines
    status = dict(box.install)[next(line for line in lines if line.startswith("systemctl status"))]
    assert 'Status: "serving buy.MyService on pipe shop"' in status.stdout, status.stdout
    health = dict(box.install)[next(line for line in lines if line.startswith("npipe health"))]
    assert health.stdout.strip() == "SERVING"
    # on every user's PATH, as the README says
    assert box.run("runuser -u nobody -- sh -c 'command -v npipe'").stdout.strip() == \
        "/usr/local/bin/npipe"


def test_status_text_and_journal_tag(box: Container) -> None:
    _installed(box)
    shown = box.show("npipe-grpc@shop", "StatusText", "MainPID")
    assert shown["StatusText"] == "serving buy.MyService on pipe shop"
    assert "npipe: serving buy.MyService on pipe shop" in box.journal("-t npipe-grpc@shop")
    entries = [json.loads(line) for line in box.run(
        "journalctl --no-pager -o json -u npipe-grpc@shop").stdout.splitlines()]
    tags = {e.get("SYSLOG_IDENTIFIER") for e in entries if e.get("_PID") == shown["MainPID"]}
    assert tags == {"npipe-grpc@shop"}, tags


def test_admitted_and_refused_callers(box: Container) -> None:
    _installed(box)
    box.run("useradd -m alice && useradd -m mallory")
    config = box.run("cat /etc/npipe/shop.toml").stdout
    box.write("/etc/npipe/shop.toml", re.sub(r"(?m)^acl = .*$", 'acl = ["user:alice"]', config))
    box.run("systemctl restart npipe-grpc@shop")
    health = box.as_user("alice", "npipe health shop --server-user npipe")
    assert health.stdout.strip() == "SERVING"
    bought = box.as_user("alice", f"npipe call shop buy.MyService/Buy --server-user npipe "
                                  f"-d {BUY}")
    result = json.loads(bought.stdout)["result"]
    assert result.startswith("bought 2 x 'pear' for 14 (caller: ") and "alice" in result
    refused = box.as_user("mallory", f"npipe call shop buy.MyService/Buy --server-user npipe "
                                     f"-d {BUY}", check=False)
    # (the client reads the pipe's published ACL and does not even knock)
    assert refused.returncode == 1, refused
    assert "denied to mallory" in refused.stderr and "does not admit you" in refused.stderr


def test_ready_waits_for_the_pipe(box: Container) -> None:
    _installed(box)
    box.write("/srv/slow/slow_shop.py", SLOW_MODULE)
    box.write("/etc/npipe/slow.toml", 'function = "slow_shop:add_services"\npipe = "slow"\n'
              'acl = ["user:alice"]\n')
    box.write("/etc/npipe/slow.env", "SLOW_START=4\n", mode=0o600)
    _module_dir(box, "npipe-grpc@slow.service", "/srv/slow")
    box.run("systemctl start --no-block npipe-grpc@slow")
    time.sleep(2)
    assert box.show("npipe-grpc@slow", "ActiveState")["ActiveState"] == "activating"
    box.run("systemctl start npipe-grpc@slow")  # waits for the job: READY=1
    # from READY=1 on the pipe answers, no retry
    assert box.run("npipe health slow --server-user npipe").stdout.strip() == "SERVING"
    shown = box.show("npipe-grpc@slow", "ActiveState", "InactiveExitTimestampMonotonic",
                     "ActiveEnterTimestampMonotonic")
    assert shown["ActiveState"] == "active"
    activating = (int(shown["ActiveEnterTimestampMonotonic"])
                  - int(shown["InactiveExitTimestampMonotonic"])) / 1e6
    assert activating >= 4, f"active {activating:.1f}s after the start, before it served"


def _stop_with_a_call_in_flight(box: Container, call_seconds: int, grace: int
                                ) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    box.write("/etc/npipe/slow.env", f"SLOW_CALL={call_seconds}\nNPIPE_GRACE={grace}\n",
              mode=0o600)
    box.run("rm -f /tmp/slow-call-started && systemctl restart npipe-grpc@slow")
    since = box.run("date +%s.%N").stdout.strip()
    call = box.popen(f"runuser -u alice -- npipe call slow buy.MyService/Buy "
                     f"--server-user npipe -d {BUY}")
    try:
        wait_until("the call reaches the handler",
                   lambda: box.run("test -e /tmp/slow-call-started", check=False).returncode == 0)
        box.run("systemctl stop npipe-grpc@slow", timeout=60)
        out, err = call.communicate(timeout=60)
    finally:
        if call.poll() is None:
            call.kill()
            call.communicate()
    shown = box.show("npipe-grpc@slow", "ActiveState", "Result", "ExecMainStatus")
    shown["journal"] = box.journal(f"-u npipe-grpc@slow --since @{since}")
    return subprocess.CompletedProcess([], call.returncode, out, err), shown


def test_stop_lets_a_call_in_flight_finish(box: Container) -> None:
    _installed(box)
    call, shown = _stop_with_a_call_in_flight(box, call_seconds=2, grace=10)
    assert call.returncode == 0, call.stderr
    assert "(caller: slow)" in json.loads(call.stdout)["result"]
    assert (shown["ActiveState"], shown["Result"], shown["ExecMainStatus"]) == \
        ("inactive", "success", "0"), shown
    assert "SIGTERM: stopping, calls in flight get 10s" in shown["journal"]
    assert "abandoned" not in shown["journal"]


def test_stop_past_the_grace_is_not_a_failed_unit(box: Container) -> None:
    _installed(box)
    call, shown = _stop_with_a_call_in_flight(box, call_seconds=60, grace=1)
    assert call.returncode == 1 and ("CANCELLED" in call.stderr or "UNAVAILABLE" in call.stderr)
    # the stop systemd asked for was carried out: inactive, not failed; the journal says
    # what it cost
    assert (shown["ActiveState"], shown["Result"], shown["ExecMainStatus"]) == \
        ("inactive", "success", "0"), shown
    assert "npipe: 1 call still running 1s after SIGTERM: abandoned" in shown["journal"]


def test_kill_9_restarts_and_reclaims_the_name(box: Container) -> None:
    _installed(box)
    before = box.show("npipe-grpc@shop", "MainPID", "NRestarts")
    box.run("systemctl kill -s SIGKILL --kill-who=main npipe-grpc@shop")

    def restarted() -> bool:
        now = box.show("npipe-grpc@shop", "ActiveState", "MainPID")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

    wait_until("npipe-grpc@shop restarted", restarted)
    after = box.show("npipe-grpc@shop", "NRestarts")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert box.as_user("alice", "npipe health shop --server-user npipe").stdout.strip() == \
        "SERVING"


def test_bad_config_is_exit_2_and_not_restarted(box: Container) -> None:
    _installed(box)
    box.write("/etc/npipe/bad.toml", 'function = "npipe.examples.buy.serve:add_services"\n'
              'pipe = "bad"\nbogus = 1\n')
    assert box.run("systemctl start npipe-grpc@bad", check=False).returncode != 0
    time.sleep(5)  # RestartSec=2, twice over
    shown = box.show("npipe-grpc@bad", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert shown == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2",
                     "NRestarts": "0"}, shown
    assert "npipe: /etc/npipe/bad.toml: unknown option 'bogus'" in box.journal(
        "-t npipe-grpc@bad")


def test_a_pipe_name_in_use_is_exit_3_and_not_restarted(box: Container) -> None:
    _installed(box)
    box.write("/etc/npipe/dup.toml", 'function = "npipe.examples.buy.serve:add_services"\n'
              'pipe = "shop"\nacl = ["user:alice"]\n')
    assert box.run("systemctl start npipe-grpc@dup", check=False).returncode != 0
    time.sleep(5)
    shown = box.show("npipe-grpc@dup", "ActiveState", "ExecMainStatus", "NRestarts")
    assert shown == {"ActiveState": "failed", "ExecMainStatus": "3", "NRestarts": "0"}, shown
    assert box.show("npipe-grpc@shop", "ActiveState")["ActiveState"] == "active"


def test_a_start_limit_ends_a_restart_loop(box: Container) -> None:
    """systemd 252 ends the loop with "Start request repeated too quickly" (the unit's
    Result stays the last exit's, not start-limit-hit, as seen here)."""
    _installed(box)
    box.write("/srv/slow/slow_shop.py", SLOW_MODULE)
    box.write("/etc/npipe/crash.toml", 'function = "slow_shop:fail"\npipe = "crash"\n')
    _module_dir(box, "npipe-grpc@crash.service", "/srv/slow")
    box.run("systemctl start --no-block npipe-grpc@crash")
    wait_until("the start limit ends the loop", lambda: "Start request repeated too quickly"
               in box.journal("-u npipe-grpc@crash"), timeout=60)
    first = box.show("npipe-grpc@crash", "ActiveState", "NRestarts")
    time.sleep(5)  # and it stays so: no more tries
    assert box.show("npipe-grpc@crash", "ActiveState", "NRestarts") == first
    assert first["ActiveState"] == "failed"
    tries = box.journal("-t npipe-grpc@crash").count("RuntimeError: no database")
    assert tries == 5, f"{tries} tries (StartLimitBurst=5)"
    box.run("systemctl reset-failed npipe-grpc@crash")
    assert box.show("npipe-grpc@crash", "ActiveState")["ActiveState"] == "inactive"


def test_serve_asgi_unit(box: Container) -> None:
    _installed(box)
    box.write("/srv/api/hello.py", HELLO_APP)
    box.write("/etc/npipe/api.toml", 'app = "hello:app"\npipe = "api"\nacl = ["user:alice"]\n')
    _module_dir(box, "npipe-asgi@api.service", "/srv/api")
    box.run("systemctl start npipe-asgi@api")
    assert box.show("npipe-asgi@api", "StatusText")["StatusText"] == \
        "serving hello:app on pipe api"
    got = box.as_user("alice", "npipe http api / --server-user npipe")
    assert got.stdout == "hello from asgi"
    _stopped_cleanly(box, "npipe-asgi@api")


FORWARDED_HEALTH = """\
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel("127.0.0.1:5050") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
"""


def test_forward_and_expose_units(box: Container) -> None:
    """A port in front of pipe shop (forward), and pipe viafwd in front of that port
    (expose): a health check through both reaches serve-grpc."""
    _installed(box)
    box.write("/etc/npipe/engine.toml", 'address = "shop"\nlisten = "tcp:127.0.0.1:5050"\n')
    box.write("/etc/npipe/viafwd.toml", 'name = "viafwd"\nto = "tcp:127.0.0.1:5050"\n'
              'acl = ["user:alice"]\n')
    box.write("/srv/check/forwarded_health.py", FORWARDED_HEALTH)
    box.run("systemctl start npipe-forward@engine npipe-expose@viafwd")
    assert box.run("/opt/npipe/bin/python /srv/check/forwarded_health.py").stdout.strip() == \
        "SERVING"
    assert box.as_user("alice", "npipe health viafwd --server-user npipe").stdout.strip() == \
        "SERVING"
    _stopped_cleanly(box, "npipe-expose@viafwd")
    _stopped_cleanly(box, "npipe-forward@engine")


def _stopped_cleanly(box: Container, unit: str) -> None:
    box.run(f"systemctl stop {unit}")
    shown = box.show(unit, "ActiveState", "Result", "ExecMainStatus")
    assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, \
        (shown, box.journal(f"-u {unit}"))


def test_no_unit_was_killed_by_its_hardening(box: Container) -> None:
    """SystemCallFilter= kills with SIGSYS, a missing capability fails with EPERM: neither
    showed in any npipe unit's journal."""
    _installed(box)
    journal = box.journal("-u 'npipe-*'")
    assert "SYS" not in re.findall(r"status=\d+/(\w+)", journal)
    assert "Operation not permitted" not in journal and "Permission denied" not in journal
