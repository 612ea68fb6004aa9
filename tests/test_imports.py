"""What a plain import loads: local pipes need no SMB client, no Samba code, no exit hook."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import atexit, json, sys
hooks = []
def register(f, *args, **kwargs):
    hooks.append(f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', f)}")
    return f
atexit.register = register
import npipe, npipe.grpc
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("npipe")),
                  "hooks": hooks}))
"""


def test_a_plain_import_loads_no_remote_support() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = json.loads(out)
    remote = [m for m in loaded["modules"] if m.startswith(("npipe.smb", "npipe.samba"))]
    assert remote == [], remote
    ours = [h for h in loaded["hooks"] if h.startswith("npipe")]  # (logging registers one)
    assert ours == [], loaded["hooks"]


WITHOUT_SMBPROTOCOL = """
import sys
sys.modules["smbprotocol"] = None  # as if not installed: importing it fails
import npipe.smb
from npipe.errors import ConfigError
assert type(npipe.smb.get_client("native")).__name__ == "NativeClient"
try:
    npipe.smb.get_client("smbprotocol")
except ConfigError as e:
    print(e)
"""


def test_smbprotocol_is_an_extra() -> None:
    """The native client needs no smbprotocol; asking for that backend without it says
    what to install."""
    out = subprocess.run([sys.executable, "-c", WITHOUT_SMBPROTOCOL], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "pip install 'npipe[smbprotocol]'" in out, out
