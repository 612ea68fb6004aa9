"""Find the object a command serves from ``MODULE:NAME`` (``MODULE:NAME.attr`` too), the way
ASGI servers do: the current directory comes first on ``sys.path``.

A spec that names nothing is a usage error (:class:`ConfigError`, exit 2); an exception
raised while the module itself runs is the module's failure (:class:`NpipeError`, exit 1).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from npipe.errors import ConfigError, NpipeError


def load_object(spec: str, what: str = "MODULE:NAME") -> Any:
    module_name, sep, attrs = spec.partition(":")
    if not sep or not module_name or not attrs or not all(attrs.split(".")):
        raise ConfigError(f"{spec!r}: expected {what}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing MODULE (or a package on its way) is the spec's fault; a module
        # that imports something missing is broken itself.
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            raise ConfigError(f"{spec!r}: no module named {e.name!r}") from e
        raise NpipeError(f"importing {module_name!r} failed: {_one_line(e)}") from e
    except Exception as e:
        raise NpipeError(f"importing {module_name!r} failed: {_one_line(e)}") from e
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"{spec!r}: {module_name!r} has no {attrs!r}") from None
    return obj


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
