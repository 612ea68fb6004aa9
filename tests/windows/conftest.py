"""Windows-native pipe tests: collected on Windows only (on other systems there are no
Windows pipes to test; the platform-neutral parts have their own tests)."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator

import pytest

collect_ignore_glob = [] if sys.platform == "win32" else ["test_*.py"]


@pytest.fixture(scope="session", autouse=True)
def machine_dir() -> Iterator[None]:
    """Overrides the POSIX machine directory of tests/conftest.py: Windows pipes live
    in the kernel's namespace, not in a directory."""
    yield None


@pytest.fixture
def name() -> str:
    """A pipe name of this test's own (two runs can share a machine)."""
    return f"npipe-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def powershell() -> str:
    exe = shutil.which("powershell") or shutil.which("pwsh")
    if exe is None:
        reason = "needs PowerShell for the .NET interop tests"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true", pytrace=False)
        pytest.skip(reason)
    return exe
