"""A private smbd for demos and tests (where a system Samba keeps its ``np/`` directory
is npipe.samba.config's business).

:class:`PrivateSmbd` runs an smbd of our own, every file of which (config, databases,
pid file, sockets, logs) lives under one directory:

    with PrivateSmbd(Path("/tmp/s1"), port=4450, users={"alice": "secret"}) as smbd:
        serve_pipes_in(smbd.np_dir)   # smbd created it, root-owned 0700

smbd runs in the foreground (``-F --no-process-group``) as our child, in a session of
its own, so that :meth:`PrivateSmbd.stop` can end it with every process it forked. The
flags and tools used here exist with the same meaning in Samba 4.17 (Debian 12) and 4.22
(Debian 13). Running smbd needs root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType

from npipe.errors import ConfigError, NpipeError
from npipe.samba.config import _SBIN_PATH, _key

log = logging.getLogger("npipe.samba.smbd")

INSTALL_HINT = "install Debian's samba package (apt-get install samba)"

_EMPTY: Mapping[str, str] = MappingProxyType({})
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
# Options that smbd reads only when it starts: changing one restarts it.
_RESTART_KEYS = frozenset({
    "smbports", "interfaces", "bindinterfacesonly", "serverrole", "disablenetbios",
    "rpcstartondemandhelpers",
})
# Paths PrivateSmbd sets itself, all under its directory (np_dir and log_dir follow them).
_PATH_KEYS = frozenset({
    "privatedir", "lockdirectory", "statedirectory", "cachedirectory", "piddirectory",
    "ncalrpcdir", "logfile", "smbpasswdfile", "passdbbackend",
})
_TOOL_TIMEOUT = 30.0


class SmbdError(NpipeError, RuntimeError):
    """smbd or one of Samba's tools is missing, failed, or did not start in time."""


def find_tool(name: str) -> str:
    """The path of one of Samba's (or the system's) programs, or :class:`SmbdError`."""
    path = shutil.which(name) or shutil.which(name, path=_SBIN_PATH)
    if path is None:
        hint = "install Debian's iproute2 package" if name == "ip" else INSTALL_HINT
        raise SmbdError(f"{name} not found: {hint}")
    return path


# --- processes -----------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, process group) from /proc/PID/stat, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold anything.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0], int(fields[2])


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _uses_conf(argv: Sequence[str], conf: str) -> bool:
    """Whether a Samba process was started with ``conf`` as its smb.conf."""
    for i, arg in enumerate(argv):
        if arg in (f"--configfile={conf}", f"-s{conf}"):
            return True
        if arg in ("-s", "--configfile") and i + 1 < len(argv) and argv[i + 1] == conf:
            return True
    return False


def processes_using_conf(conf: Path, pgid: int | None = None) -> list[int]:
    """Live processes started with ``conf`` (smbd, samba-dcerpcd, rpcd_*), or in ``pgid``.

    samba-dcerpcd, which smbd starts on demand, leaves smbd's session and is reparented
    to init, but carries ``--configfile=CONF``; smbd's own children stay in its group.
    """
    conf_text, me = str(conf), os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if (pgid is not None and fields[1] == pgid) or _uses_conf(_cmdline(pid), conf_text):
            found.append(pid)
    return found


def _listening(pid: int, port: int) -> list[str]:
    """Addresses on which process ``pid`` itself holds a listening TCP socket on ``port``.

    /proc/PID/net/ shows the network namespace of that process, so this works for an smbd
    inside another namespace too.
    """
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return []
    inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A" or fields[9] not in inodes:  # LISTEN
                continue
            address_hex, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port:
                continue
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = bytes.fromhex(address_hex)
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            family = socket.AF_INET if width == 4 else socket.AF_INET6
            found.append(socket.inet_ntop(family, words))
    return found


def _probe_address(addresses: Sequence[str]) -> str:
    """Where to connect to reach one of smbd's listening addresses (IPv4 first)."""
    best = sorted(addresses, key=lambda a: ":" in a)[0]
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(best, best)


_CONNECT_SCRIPT = (
    "import socket, sys\n"
    "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n"
)


# --- the private smbd ------------------------------------------------------------------


class PrivateSmbd:
    """An smbd of our own, configured and kept entirely under ``directory``.

    ``port``: its TCP port (``smb ports``). ``interfaces``: Samba's ``interfaces``
    (names such as ``lo`` or ``veth0``, or addresses), with ``bind interfaces only``.
    ``bind_address``: listen on this one address instead (it becomes ``interfaces``).
    ``users``: SMB users to create, name -> password (a missing Unix user is created with
    ``useradd -M -s /usr/sbin/nologin``). ``extra``: more [global] lines, overriding the
    defaults (e.g. ``{"server signing": "mandatory", "smb encrypt": "required"}``).
    ``netns``: run smbd in that network namespace (``ip netns exec``).
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int = 445,
        interfaces: str = "lo",
        bind_address: str | None = None,
        users: Mapping[str, str] = _EMPTY,
        extra: Mapping[str, str] = _EMPTY,
        netns: str | None = None,
    ) -> None:
        if netns is not None and not _NETNS_NAME.match(netns):
            raise ConfigError(f"bad network namespace name {netns!r}")
        for name, password in users.items():
            _check_user(name, password)
        for key, value in extra.items():
            _check_option(key, value)
        _check_option("interfaces", bind_address or interfaces)
        self.directory = Path(directory).absolute()
        ports = next((v for k, v in extra.items() if _key(k) == "smbports"), str(port))
        self.port = _first_port(ports)  # the port start() waits for
        self.interfaces = interfaces
        self.bind_address = bind_address
        self.users = dict(users)
        self.extra = dict(extra)
        self.netns = netns
        self._proc: subprocess.Popen[bytes] | None = None
        self._listening: list[str] = []

    def __repr__(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<PrivateSmbd {self.directory} port {self.port}{where} ({state})>"

    # paths

    @property
    def conf_path(self) -> Path:
        return self.directory / "smb.conf"

    @property
    def ncalrpc_dir(self) -> Path:
        return self.directory / "ncalrpc"

    @property
    def np_dir(self) -> Path:
        """``<ncalrpc dir>/np``: smbd creates it (root, 0700) when it starts."""
        return self.ncalrpc_dir / "np"

    @property
    def log_dir(self) -> Path:
        return self.directory / "log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def addresses(self) -> list[str]:
        """The addresses smbd listened on when it became ready."""
        return list(self._listening)

    # configuration

    def options(self) -> dict[str, str]:
        """The [global] section: the defaults below, then ``extra`` (which wins)."""
        d = self.directory
        options = {
            "workgroup": "NPIPE",
            "server role": "standalone server",
            "smb ports": str(self.port),
            "interfaces": self.bind_address or self.interfaces,
            "bind interfaces only": "yes",
            "private dir": f"{d}/private",
            "lock directory": f"{d}/lock",
            "state directory": f"{d}/state",
            "cache directory": f"{d}/cache",
            "pid directory": f"{d}/pid",
            "ncalrpc dir": str(self.ncalrpc_dir),
            "log file": f"{self.log_dir}/log.%m",
            "max log size": "1000",
            "logging": "file",
            "log level": "1",
            "passdb backend": "tdbsam",
            "disable netbios": "yes",
            "server min protocol": "SMB2_02",
            "server signing": "default",
            "map to guest": "never",
            "restrict anonymous": "2",
            "load printers": "no",
            "printcap name": "/dev/null",
            "disable spoolss": "yes",
            "enable core files": "no",
        }
        by_key = {_key(k): k for k in options}
        for key, value in self.extra.items():
            options.pop(by_key.get(_key(key), key), None)
            options[key] = value
        return options

    def write_config(self) -> Path:
        """Create the directories (not np/: smbd makes that) and write smb.conf."""
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        for sub, mode in (("private", 0o700), ("lock", 0o755), ("state", 0o755),
                          ("cache", 0o755), ("pid", 0o755), ("ncalrpc", 0o755),
                          ("log", 0o750)):
            (self.directory / sub).mkdir(mode=mode, exist_ok=True)
        lines = ["# Written by npipe (npipe.samba.smbd.PrivateSmbd); every path is under",
                 f"# {self.directory}.", "[global]"]
        lines += [f"  {key} = {value}" for key, value in self.options().items()]
        tmp = self.conf_path.with_name("smb.conf.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o644)
        tmp.replace(self.conf_path)
        return self.conf_path

    def add_user(self, name: str, password: str) -> None:
        """Create (or re-password) an SMB user; smbd need not be restarted."""
        _check_user(name, password)
        if not self.conf_path.exists():
            self.write_config()
        ensure_unix_user(name)
        done = subprocess.run(
            [find_tool("smbpasswd"), "-c", str(self.conf_path), "-a", "-s", name],
            input=f"{password}\n{password}\n".encode(), capture_output=True,
            timeout=_TOOL_TIMEOUT,
        )
        if done.returncode != 0:
            output = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise SmbdError(f"smbpasswd -a {name} failed: {output}")
        self.users[name] = password

    def set_option(self, key: str, value: str) -> None:
        """Set a [global] option; a running smbd reloads its config (or restarts for
        options it reads only at start, such as ``smb ports`` or ``interfaces``)."""
        _check_option(key, value)
        if _key(key) == "smbports":
            self.port = _first_port(value)  # the port start() waits for
        by_key = {_key(k): k for k in self.extra}
        self.extra.pop(by_key.get(_key(key), key), None)
        self.extra[key] = value
        if not self.running:
            if self.conf_path.exists():
                self.write_config()
            return
        self.write_config()
        if _key(key) in _RESTART_KEYS:
            self.restart()
        else:
            self.reload()

    def reload(self) -> None:
        """Have the running smbd re-read smb.conf (``smbcontrol smbd reload-config``)."""
        try:
            done = subprocess.run(
                [find_tool("smbcontrol"), "-s", str(self.conf_path), "smbd", "reload-config"],
                capture_output=True, timeout=_TOOL_TIMEOUT, stdin=subprocess.DEVNULL,
            )
            failed = done.returncode != 0
        except (OSError, subprocess.TimeoutExpired):
            failed = True
        if failed:
            log.warning("smbcontrol reload-config failed: restarting smbd")
            self.restart()

    # life cycle

    def start(self, timeout: float = 20.0) -> PrivateSmbd:
        """Write the config, add the users, start smbd and wait until it accepts TCP
        connections on its port; on failure stop everything and raise :class:`SmbdError`
        with the end of smbd's log."""
        if self.running:
            return self
        if os.geteuid() != 0:
            raise SmbdError("running smbd needs root")
        smbd = find_tool("smbd")
        prefix = [find_tool("ip"), "netns", "exec", self.netns] if self.netns else []
        self._check_np_dir()
        self.write_config()
        self._clear_stale_pid_file()
        self.stop()  # what an earlier, dead smbd with this directory left (samba-dcerpcd)
        for name, password in list(self.users.items()):
            self.add_user(name, password)
        out = (self.log_dir / "smbd.out").open("wb")
        try:
            self._proc = subprocess.Popen(
                [*prefix, smbd, "-s", str(self.conf_path), "-F", "--no-process-group"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        finally:
            out.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("smbd pid %s listening on %s port %d", self.pid, self._listening, self.port)
        return self

    def _check_np_dir(self) -> None:
        """smbd refuses to start if np/ exists other than as a root-owned 0700 directory:
        say so in one line rather than through smbd's log."""
        try:
            st = self.np_dir.lstat()
        except FileNotFoundError:
            return
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or mode != 0o700:
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
            raise SmbdError(
                f"{self.np_dir} is {what}, uid {st.st_uid}, mode {mode:04o}: smbd refuses to "
                "start unless it is a root-owned 0700 directory (remove it: smbd creates it)"
            )

    def _clear_stale_pid_file(self) -> None:
        pid_file = self.directory / "pid" / "smbd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            if _alive(pid) and _uses_conf(_cmdline(pid), str(self.conf_path)):
                raise SmbdError(f"an smbd for {self.conf_path} is already running (pid {pid})")
            pid_file.unlink()

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        where = f" in netns {self.netns}" if self.netns else ""
        while True:
            status = self._proc.poll()
            if status is not None:
                raise SmbdError(
                    f"smbd{where} exited with status {status} before listening on port "
                    f"{self.port}:\n{self.log_tail()}"
                )
            addresses = _listening(self._proc.pid, self.port)
            if addresses and self._connects(_probe_address(addresses), deadline):
                self._listening = addresses
                return
            if time.monotonic() > deadline:
                raise SmbdError(
                    f"smbd{where} did not accept connections on port {self.port} within "
                    f"{timeout:g} s (listening on: {', '.join(addresses) or 'nothing'}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def _connects(self, address: str, deadline: float) -> bool:
        wait = max(0.5, min(5.0, deadline - time.monotonic()))
        if self.netns is None:
            try:
                socket.create_connection((address, self.port), timeout=wait).close()
            except OSError:
                return False
            return True
        argv = [find_tool("ip"), "netns", "exec", self.netns, sys.executable, "-c",
                _CONNECT_SCRIPT, address, str(self.port)]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=wait + 2,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def stop(self, timeout: float = 5.0) -> None:
        """End smbd and every process it started (its forks, samba-dcerpcd, rpcd_*):
        SIGTERM, then SIGKILL after ``timeout`` seconds. Safe to call again."""
        proc, self._proc = self._proc, None
        pgid = proc.pid if proc is not None else None
        pids = set(processes_using_conf(self.conf_path, pgid))
        if proc is not None and proc.poll() is None:
            pids.add(proc.pid)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
            if not pids:
                break
            if pgid is not None:  # also whatever smbd forks meanwhile
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                if proc is not None:
                    proc.poll()  # reap our child so it does not linger as a zombie
                pids = {pid for pid in pids if _alive(pid)}
                if pids:
                    time.sleep(0.02)
            if pids and sig == signal.SIGTERM:
                log.warning("smbd processes %s ignored SIGTERM: killing them", sorted(pids))
                # Whatever they forked meanwhile goes too.
                pids |= set(processes_using_conf(self.conf_path, pgid))
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        if pids:
            raise SmbdError(f"smbd processes {sorted(pids)} did not exit")
        self._listening = []

    def restart(self, timeout: float = 20.0) -> PrivateSmbd:
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 12) -> str:
        """What smbd said last: its own output, and the important (level 0) messages of
        its latest start in ``log.smbd``, one per line, without Samba's panic banner and
        backtrace."""
        parts = []
        with contextlib.suppress(OSError):
            out = (self.log_dir / "smbd.out").read_text(errors="replace").strip()
            if out:
                parts += out.splitlines()[-lines:]
        with contextlib.suppress(OSError):
            text = (self.log_dir / "log.smbd").read_text(errors="replace")
            parts += _important_messages(text)[-lines:]
        return "\n".join(f"  {line}" for line in parts) or f"  (nothing logged in {self.log_dir})"

    def __enter__(self) -> PrivateSmbd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def ensure_unix_user(name: str) -> None:
    """Create a Unix account without a home or login shell, unless it exists."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        return
    useradd = find_tool("useradd")
    deadline = time.monotonic() + 10.0
    while True:
        done = subprocess.run(
            [useradd, "-M", "-s", "/usr/sbin/nologin", name],
            capture_output=True, text=True, timeout=_TOOL_TIMEOUT, stdin=subprocess.DEVNULL,
        )
        # 9: the name is taken (someone made it meanwhile); 1 or 10: another
        # useradd or userdel may hold /etc/passwd or /etc/group (retried for a while).
        if done.returncode == 0:
            _note_created_account(name)
        if done.returncode in (0, 9):
            return
        locked = done.returncode in (1, 10)
        if not locked or time.monotonic() > deadline:
            raise SmbdError(f"useradd {name} failed: {done.stderr.strip()}")
        time.sleep(0.1)


def _note_created_account(name: str) -> None:
    # npipe's test suite removes the accounts it created when it ends: it names a file in
    # $NPIPE_TEST_ACCOUNTS_FILE, to which each account made here is appended.
    if registry := os.environ.get("NPIPE_TEST_ACCOUNTS_FILE"):
        with open(registry, "a") as f:
            f.write(f"{name}\n")


_LOG_HEADER = re.compile(r"\[\d{4}/\d\d/\d\d [\d:.]+,\s*(\d+)[^\]]*\]")


def _important_messages(text: str) -> list[str]:
    """The level-0 messages of smbd's latest run in a Samba log, one line each."""
    entries: list[tuple[int, list[str]]] = []
    for line in text.splitlines():
        header = _LOG_HEADER.match(line)
        if header:
            entries.append((int(header.group(1)), []))
        elif entries and line.strip():
            entries[-1][1].append(line.strip())
    messages: list[str] = []
    in_panic = False
    for level, body in entries:
        message = " ".join(body)
        if message.startswith("smbd version"):
            messages, in_panic = [], False  # a later start: only the latest one matters
        elif message.startswith("=" * 10):
            in_panic = True  # smb_panic's banner and backtrace; the cause came before
        elif level == 0 and message and not in_panic:
            messages.append(message)
    return messages


def _first_port(value: str) -> int:
    """The first port of an ``smb ports`` value (ports separated by spaces or commas)."""
    try:
        port = int(value.replace(",", " ").split()[0])
    except (ValueError, IndexError):
        raise ConfigError(f"bad smb ports value {value!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is not a TCP port")
    return port


def _check_user(name: str, password: str) -> None:
    if not _USER_NAME.match(name):
        raise ConfigError(f"bad user name {name!r}: lower-case letters, digits, _ and -")
    if "\n" in password or "\r" in password or "\0" in password:
        raise ConfigError(f"the password of {name} has a line break or NUL in it")


def _check_option(key: str, value: str) -> None:
    if _key(key) in _PATH_KEYS:
        raise ConfigError(f"{key!r} is not an option here: PrivateSmbd keeps its files under "
                          "its directory")
    if not key.strip() or any(c in key for c in "[]=\n\r\0#;"):
        raise ConfigError(f"bad smb.conf parameter name {key!r}")
    if any(c in value for c in "\n\r\0") or value.rstrip().endswith("\\"):
        raise ConfigError(f"bad value for smb.conf parameter {key!r}: {value!r}")
