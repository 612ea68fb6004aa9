"""Shared test setup: every test gets its own short pipe directory."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def pipe_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private pipe directory (short: socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="np", dir="/tmp"))
    monkeypatch.setenv("NPIPE_PIPE_DIR", str(d / "pipes"))
    yield d / "pipes"
    shutil.rmtree(d, ignore_errors=True)
