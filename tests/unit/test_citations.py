"""What the README and the code point a reader to is in the project: every file and name the README
cites exists, and nothing cites notes that live outside the repository."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TREES = ("pipeline", "workers", "bench", "scripts", "migrations", "tests")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml", "Dockerfile", "docker-compose.yml", "alembic.ini", ".ci/run")


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


def test_nothing_cites_notes_from_outside_the_repository() -> None:
    """The notes the developers share sit beside the repository, not in it: a user has only the
    project, so a comment must state the fact it relies on instead of pointing there."""
    pattern = re.compile(r"(\.\./)?\bshared/[A-Z_]+\.md")
    files = [p for t in TREES for p in (ROOT / t).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [ROOT / f for f in TOP_FILES if (ROOT / f).is_file()]
    here = Path(__file__).resolve()
    citing = []
    for path in files:
        if path.resolve() == here:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        citing += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                   for m in pattern.finditer(text)]
    assert not citing, "cited, but not in the repository: " + "; ".join(citing)
