"""Only `vidquant.models` knows a model family: no module outside it imports a concrete adapter or builder."""

from __future__ import annotations

import ast
from pathlib import Path

import vidquant

SRC = Path(vidquant.__file__).parent
CONCRETE = {"wan", "cogvideox", "ltx", "generic", "dit", "tiny", "tiny_cogvideox", "tiny_ltx"}


def imported_modules(text: str, package: str) -> set[str]:
    """Absolute names of every module (and imported name) in ``text``, relative imports resolved in ``package``."""
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return names


def concrete(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.startswith("vidquant.models.") and n.split(".")[2] in CONCRETE)


def test_no_module_outside_models_imports_a_concrete_adapter() -> None:
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC)
        if relative.parts[0] == "models":
            continue
        package = ".".join(("vidquant", *relative.parent.parts))
        if bad := concrete(imported_modules(path.read_text(), package)):
            offenders[str(relative)] = bad
    assert offenders == {}


def test_the_scan_catches_every_import_form() -> None:
    text = "from ..models import wan\nfrom ..models.ltx import LTXAdapter\nimport vidquant.models.tiny\n"
    assert concrete(imported_modules(text, "vidquant.eval")) == [
        "vidquant.models.ltx", "vidquant.models.ltx.LTXAdapter", "vidquant.models.tiny", "vidquant.models.wan"]
    assert concrete(imported_modules("from ..models import adapter_for\n", "vidquant.eval")) == []
