"""One exception root per side: the tree drawn in agent/errors.py and host/errors.py is the tree in the code.

Every exception class defined anywhere in the package must be drawn, under the parent it really has,
so `except AgentError` / `except HostError` is a promise a reader can check by reading one docstring.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from types import ModuleType

import pytest

import unplugd.agent
import unplugd.agent.errors
import unplugd.host
import unplugd.host.errors

SIDES = {
    "agent": (unplugd.agent, unplugd.agent.errors, "AgentError"),
    "host": (unplugd.host, unplugd.host.errors, "HostError"),
}


def defined_exceptions(package: ModuleType) -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of `package`, by name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                assert name not in found, f"two exception classes named {name}"
                found[name] = obj
    return found


def drawn_tree(doc: str, root: str) -> dict[str, str]:
    """child -> parent, as a docstring draws them (`+-- Name` lines below a line holding only the root)."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name) of the open branches
    for line in doc.splitlines():
        m = re.match(r"^[| ]*\+-- (\w+)", line) or re.match(rf"^ *({root})$", line)
        if m is None:
            continue
        name, column = m.group(1), m.start(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((column, name))
    return parents


@pytest.mark.parametrize("side", sorted(SIDES))
def test_the_docstring_tree_is_the_class_tree(side: str) -> None:
    package, errors, root = SIDES[side]
    assert errors.__doc__ is not None
    drawn = drawn_tree(errors.__doc__, root)
    defined = defined_exceptions(package)
    assert set(drawn) | {root} == set(defined)
    for name, parent in drawn.items():
        assert defined[name].__bases__ == (defined[parent],), name


@pytest.mark.parametrize("side", sorted(SIDES))
def test_every_exception_derives_from_the_sides_root(side: str) -> None:
    package, _, root = SIDES[side]
    defined = defined_exceptions(package)
    for name, cls in defined.items():
        assert issubclass(cls, defined[root]), name


def test_the_drawing_parser_reads_nesting() -> None:
    doc = """
    Root
     +-- A        text
     |    +-- B   more
     |         +-- C
     +-- D
    """
    assert drawn_tree(doc, "Root") == {"A": "Root", "B": "A", "C": "B", "D": "Root"}
