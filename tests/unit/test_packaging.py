"""The package list in pyproject.toml must name every directory that is a package."""

from __future__ import annotations

import tomllib

from tests.conftest import REPO


def test_every_package_is_listed() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = cfg["package-dir"]
    owner = {(REPO / rel).resolve(): pkg for pkg, rel in mapping.items()}
    found: set[str] = set()
    for root, pkg in owner.items():
        for init in root.rglob("__init__.py"):
            sub = init.parent.relative_to(root).parts
            # a directory mapped on its own (unplugd.agent <- agent/) is named by its mapping
            if init.parent.resolve() in owner and init.parent.resolve() != root:
                continue
            found.add(".".join((pkg, *sub)))
    assert found == set(cfg["packages"])
