"""Nothing in the project may depend on where it is checked out, or on one machine's paths.

A clone anywhere else (CI clones into another folder) must find everything the code and
tests need inside the repository: no absolute path of a developer's machine (a home
directory, a work tree, a sibling folder of the checkout) may appear in code, tests,
benchmarks or scripts.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What counts as code: everything git tracks under these, in these kinds of files.
CODE_DIRS = ("src", "tests", "bench", "scripts", "examples", ".ci", ".github")
CODE_SUFFIXES = {".py", ".pyi", ".sh", ".yml", ".yaml", ".toml", ".cfg", ".conf", ""}

# Quoted absolute paths into places that belong to one machine or one person.
MACHINE_PATH = re.compile(r"""["'](?:/work|/root|/home/[^/"']+|/Users/[^/"']+)(?:/|["'])""")


# Folders every machine has: a checkout directly inside one says nothing about a machine.
SYSTEM_DIRS = {"/", "/tmp", "/var/tmp", "/opt", "/srv", "/usr", "/usr/src", "/var", "/run",
               "/mnt", "/media"}


def _tracked_code() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--", *CODE_DIRS, "pyproject.toml"],
            capture_output=True, check=True, timeout=30,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        reason = "not a git checkout (or no git): the tracked files are unknown"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this must not be skipped", pytrace=False)
        pytest.skip(reason)
    paths = [ROOT / p for p in out.decode().split("\0") if p]
    return [p for p in paths if p.suffix in CODE_SUFFIXES and p.is_file()]


def _texts() -> list[tuple[Path, str]]:
    texts = []
    for path in _tracked_code():
        try:
            texts.append((path, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue  # binary test vectors
    assert texts, "found no code to check"
    return texts


def test_no_machine_specific_absolute_paths() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for path, text in _texts()
        for m in MACHINE_PATH.finditer(text)
    ]
    assert not found, "absolute paths of a particular machine:\n" + "\n".join(found)


def test_nothing_names_where_this_checkout_lives() -> None:
    """The checkout's own directory and the folder around it (where shared/ or another
    clone may sit on one machine) must not be named: a clone elsewhere would miss them."""
    places = {str(ROOT)}
    if str(ROOT.parent) not in SYSTEM_DIRS:  # /tmp/ and the like name nothing particular
        places.add(str(ROOT.parent) + "/")
    found = [
        f"{path.relative_to(ROOT)}: names {place}"
        for path, text in _texts()
        for place in places
        if place in text
    ]
    assert not found, "paths of this checkout's location:\n" + "\n".join(found)


def test_the_check_catches_what_it_is_for() -> None:
    """The pattern itself: it must flag the kinds of paths that broke clones before."""
    q = '"'  # (built from parts, so that this file does not name such paths itself)
    assert MACHINE_PATH.search("TEMPLATE = Path(" + q + "/" + "work/shared/samba/smb.conf" + q)
    assert MACHINE_PATH.search("x = '/" + "root/.pyenv/bin/python'")
    assert MACHINE_PATH.search("HOME = " + q + "/" + "home/alice/src" + q)
    assert not MACHINE_PATH.search('DEFAULT_CONF = Path("/etc/samba/smb.conf")')
    assert not MACHINE_PATH.search("# the interpreter may live under /root, 0700")
