"""Where a system Samba hands pipes over: its smb.conf, read the way Samba reads it.

When an SMB client opens pipe NAME on ``IPC$`` and smbd has no pipe of its own by that
name, smbd connects to ``<ncalrpc dir>/np/<name in lower case>``. :func:`np_dir_from_conf`
finds that directory (``testparm`` first, so includes, defaults and the compiled-in path
are Samba's own answer). The Samba front door needs only this; the private smbd for
demos and tests (:mod:`npipe.samba.smbd`) lives apart.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from npipe.errors import ConfigError

log = logging.getLogger("npipe.samba.config")

ENV_NP_DIR = "NPIPE_SAMBA_NP_DIR"
ENV_CONF = "NPIPE_SAMBA_CONF"
# Debian's compiled-in defaults (``smbd -b``: the config file, and NCALRPCDIR, which
# ``smbd -b`` does not print but ``testparm`` reports); used only when testparm is missing.
DEFAULT_CONF = Path("/etc/samba/smb.conf")
DEFAULT_NCALRPC_DIR = Path("/run/samba/ncalrpc")
# Root's PATH is not always given /usr/sbin (su without -, cron, some CI runners).
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
_TESTPARM_TIMEOUT = 15.0


def _key(option: str) -> str:
    # Samba compares parameter names ignoring case and white space.
    return "".join(option.split()).lower()


# --- the np dir of a system Samba ---------------------------------------------------


def np_dir_from_conf(conf: Path | None = None) -> Path:
    """Where smbd looks for pipes it does not serve itself: ``<ncalrpc dir>/np``.

    ``$NPIPE_SAMBA_NP_DIR`` (the np directory itself) wins, then ``$NPIPE_SAMBA_CONF``
    (an smb.conf path), then ``conf``, then Samba's default smb.conf. The value is what
    ``testparm -s --parameter-name="ncalrpc dir" CONF`` reports (so includes, defaults
    and the compiled-in path are Samba's own answer); without a working testparm, the
    file is read for an ``ncalrpc dir`` line.
    """
    np_dir = os.environ.get(ENV_NP_DIR)
    if np_dir:
        return Path(np_dir)
    env_conf = os.environ.get(ENV_CONF)
    if env_conf:
        conf = Path(env_conf)
    return ncalrpc_dir_from_conf(conf) / "np"


def ncalrpc_dir_from_conf(conf: Path | None = None) -> Path:
    """The ``ncalrpc dir`` smbd uses with ``conf`` (None: Samba's default smb.conf)."""
    if conf is not None and not conf.is_file():
        raise ConfigError(f"no smb.conf at {conf}")
    value = _testparm_value("ncalrpc dir", conf)
    if value is None:
        value = _parse_conf_value(conf or DEFAULT_CONF, "ncalrpc dir")
    if not value:
        return DEFAULT_NCALRPC_DIR
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"ncalrpc dir {value!r} in {conf or DEFAULT_CONF} is not absolute")
    return path


def _testparm_value(parameter: str, conf: Path | None) -> str | None:
    """One [global] parameter as testparm reports it, or None if testparm cannot say."""
    testparm = shutil.which("testparm") or shutil.which("testparm", path=_SBIN_PATH)
    if testparm is None:
        return None
    argv = [testparm, "-s", f"--parameter-name={parameter}"]
    if conf is not None:
        argv.append(str(conf))
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_TESTPARM_TIMEOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("testparm failed: %s", e)
        return None
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or len(lines) != 1:
        log.debug("testparm exited %s: %s", done.returncode, done.stderr.strip())
        return None
    return lines[0]


def global_parameters(conf: Path | None = None) -> dict[str, str]:
    """Every [global] parameter (defaults included) as ``testparm -s -v`` prints them.

    Keys are as testparm spells them (lower case, single spaces). Empty if testparm is
    missing or fails.
    """
    testparm = shutil.which("testparm") or shutil.which("testparm", path=_SBIN_PATH)
    if testparm is None:
        return {}
    argv = [testparm, "-s", "-v", "--section-name=global"]
    if conf is not None:
        argv.append(str(conf))
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_TESTPARM_TIMEOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:
        return {}
    values: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith(("#", ";", "[")):
            values[" ".join(key.split()).lower()] = value.strip()
    return values


def _parse_conf_value(conf: Path, parameter: str, _depth: int = 0) -> str | None:
    """A [global] parameter read from the file itself, following ``include =`` lines."""
    try:
        text = conf.read_text(errors="replace")
    except OSError:
        return None
    wanted, found = _key(parameter), None
    section = "global"
    # Samba joins lines ending in a backslash.
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        key, sep, value = line.partition("=")
        if not sep or section != "global":
            continue
        if _key(key) == wanted:
            found = value.strip()
        elif _key(key) == "include" and _depth < 8 and "%" not in value:
            included = Path(value.strip())
            if not included.is_absolute():
                included = conf.parent / included
            found = _parse_conf_value(included, parameter, _depth + 1) or found
    return found
