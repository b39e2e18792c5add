"""What the README points a reader to is in the project: every file and name it cites exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TREES = ("pipeline", "workers", "bench", "scripts", "migrations", "tests")


def _cited() -> list[str]:
    return re.findall(r"`([^`\s]+)`", README.read_text())


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def test_every_file_the_readme_cites_exists() -> None:
    files = [c for c in _cited() if c.startswith(tuple(f"{t}/" for t in TREES)) and re.search(r"\.\w+(::\w+)?$", c)]
    assert len(files) >= 15, files
    missing = []
    for cited in files:
        path, _, name = cited.partition("::")
        if not (ROOT / path).is_file() or (name and not _defines(ROOT / path, name)):
            missing.append(cited)
    assert not missing, f"the README cites what the project does not have: {missing}"


def test_every_pipeline_name_the_readme_cites_exists() -> None:
    dotted = [c for c in _cited() if re.fullmatch(r"pipeline(\.\w+)+", c)]
    assert dotted, "the README cites no pipeline.module name: is this test still reading it right?"
    missing = []
    for cited in dotted:
        parts = cited.split(".")
        # The longest prefix that imports is the module; the rest are attributes of it.
        for cut in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            break
        if obj is None:
            missing.append(cited)
    assert not missing, f"the README cites what the package does not have: {missing}"

