"""House rules that a refactoring could silently break: a pure domain, and a wheel that ships
every subpackage (packages are listed explicitly in pyproject.toml for the templates mapping)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "clickphone_agi"
FORBIDDEN_IN_DOMAIN = {
    "asyncio", "aiosqlite", "sqlite3", "aiosmtplib", "aiosmtpd", "smtplib", "jinja2", "aiohttp",
    "panoramisk", "socket", "ssl", "subprocess", "structlog", "yaml", "img2pdf", "PIL",
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0] if not node.module.startswith("clickphone_agi") else node.module)
    return names


def test_domain_imports_no_io_library_and_no_adapter() -> None:
    for path in sorted((PACKAGE / "domain").glob("*.py")):
        imported = _imports(path)
        assert not imported & FORBIDDEN_IN_DOMAIN, f"{path.name} imports {imported & FORBIDDEN_IN_DOMAIN}"
        inner = {m for m in imported if m.startswith("clickphone_agi.")}
        allowed = ("clickphone_agi.domain", "clickphone_agi.dialplan_vars")
        assert all(m.startswith(allowed) for m in inner), f"{path.name} imports {inner}"


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py") if "__pycache__" not in p.parts
    }
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"
    assert "clickphone_agi.templates" in listed
