"""Every public name of npipe's public modules says what it is, and docs/api has it.

Public: a module's ``__all__`` and what it defines without a leading underscore (classes,
functions); of their classes, the methods and properties without one. Plain attributes
(dataclass fields) are left to their class's docstring. The docstrings are read as
pdoc reads them for docs/api (scripts/apidocs), so a variable's docstring is the string
after it. docs/api is checked for every such name (an anchor on its module's page), not
byte for byte: pdoc renders signatures a little differently on other Python versions.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from npipe.testing.netns import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
# As scripts/apidocs documents them.
MODULES = ["npipe", "npipe.grpc", "npipe.http", "npipe.bridges", "npipe.connection",
           "npipe.redirector", "npipe.blocking", "npipe.extras"]


def _pdoc() -> Any:
    try:
        import pdoc.doc
    except ImportError:
        skip_or_fail("pdoc is not installed (pip install '.[test]')")
    return pdoc.doc


def _module(name: str) -> ModuleType:
    module = importlib.import_module(name)
    for exported in getattr(module, "__all__", ()):  # lazy exports: resolve them
        getattr(module, exported)
    return module


def _public(module: ModuleType) -> list[str]:
    names = set(getattr(module, "__all__", ()))
    for name, value in vars(module).items():
        if (not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
                and value.__module__ == module.__name__):
            names.add(name)
    return sorted(names)


def _members(cls: type) -> list[str]:
    """A class's own public methods and properties."""
    names = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, (property, functools.cached_property)):
            names.append(name)
    return names


def _own_doc(value: Any) -> str:
    """The docstring written for ``value`` (not a base class's, nor the signature a
    dataclass makes up)."""
    doc = value.__doc__ or ""
    if inspect.isclass(value) and doc.startswith(f"{value.__name__}("):
        return ""
    return doc


def _undocumented(modname: str) -> list[str]:
    doc = _pdoc()
    module = _module(modname)
    page = doc.Module(module)
    missing = []
    for name in _public(module):
        member = page.get(name)
        value = getattr(module, name)
        docstring = member.docstring if member is not None else _own_doc(value)
        if not docstring.strip():
            missing.append(f"{modname}.{name}")
        if inspect.isclass(value) and member is not None:
            for attr in _members(value):
                method = member.get(attr)
                if method is None or not method.docstring.strip():
                    missing.append(f"{modname}.{name}.{attr}")
    return missing


@pytest.mark.parametrize("modname", MODULES)
def test_every_public_name_has_a_docstring(modname: str) -> None:
    assert _undocumented(modname) == []


def test_the_check_sees_a_missing_docstring() -> None:
    """The check itself: a public function, a method and a property without docstrings
    are reported (and a private one is not)."""
    _pdoc()
    import sys
    import types

    module = types.ModuleType("npipe_docstring_probe")

    def function() -> None:
        pass

    def _private() -> None:
        pass

    class Thing:
        """A documented class."""

        def method(self) -> None:
            pass

        @property
        def value(self) -> int:
            return 1

    # As if defined at the probe module's top level. Otherwise pdoc looks a member
    # without a docstring up by its __module__ and __qualname__ (this test's), finds
    # None, and reads None's docstring, which Python 3.13 has.
    for member in (Thing.method, Thing.value.fget):  # type: ignore[attr-defined]
        member.__module__ = module.__name__
        member.__qualname__ = f"Thing.{member.__name__}"
    for obj in (function, _private, Thing):
        obj.__module__ = module.__name__
        obj.__qualname__ = obj.__name__
        setattr(module, obj.__name__, obj)
    sys.modules[module.__name__] = module
    try:
        assert _undocumented(module.__name__) == [
            "npipe_docstring_probe.Thing.method", "npipe_docstring_probe.Thing.value",
            "npipe_docstring_probe.function",
        ]
    finally:
        del sys.modules[module.__name__]


@pytest.mark.parametrize("modname", MODULES)
def test_docs_api_has_every_public_name(modname: str) -> None:
    """docs/api is not stale: its page of the module has every public name (run
    scripts/apidocs after adding one)."""
    page = API / (modname.replace(".", "/") + ".html")
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing: run scripts/apidocs"
    html = page.read_text(encoding="utf-8")
    module = _module(modname)
    absent = []
    for name in getattr(module, "__all__", None) or _public(module):  # (as pdoc shows them)
        anchors = [name]
        value = getattr(module, name)
        if inspect.isclass(value):
            anchors += [f"{name}.{attr}" for attr in _members(value)]
        absent += [a for a in anchors if f'id="{a}"' not in html]
    assert absent == [], f"docs/api is stale (run scripts/apidocs): {absent}"
