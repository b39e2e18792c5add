"""switchyard's errors live in one tree, in pipeline/errors.py, drawn in its docstring: every
subclass of SwitchyardError the package defines is there, under its real base, with the HTTP status
the API answers it with; and no module raises the bare base class, which says nothing a caller
could act on."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pipeline
import pipeline.errors
from pipeline.api.errors import status_for
from pipeline.errors import SwitchyardError

ROOT = Path(__file__).resolve().parents[2]

# A class's line in the drawing: the tree's branches, its name, then its HTTP status.
TREE_LINE = re.compile(r"^ {4}(?P<indent>(?:[│ ] {3})*)(?:[├└]── )?(?P<name>[A-Z]\w+)\s+(?P<status>\d{3})\b")


def _import_the_package() -> None:
    for module in pkgutil.walk_packages(pipeline.__path__, prefix="pipeline."):
        if not module.name.endswith(".__main__"):  # running it starts a server
            importlib.import_module(module.name)


def _subclasses(cls: type[SwitchyardError]) -> list[type[SwitchyardError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def drawn_tree() -> dict[str, tuple[str | None, int]]:
    """Class name -> (its base as drawn, the HTTP status drawn beside it)."""
    drawn: dict[str, tuple[str | None, int]] = {}
    parents: list[str] = []  # the chain of names above the current line, by depth
    for line in (pipeline.errors.__doc__ or "").splitlines():
        match = TREE_LINE.match(line)
        if match is None:
            continue
        depth = len(match["indent"]) // 4 + (1 if "──" in line else 0)
        del parents[depth:]
        drawn[match["name"]] = (parents[-1] if parents else None, int(match["status"]))
        parents.append(match["name"])
    return drawn


def test_the_drawing_is_read_as_a_tree() -> None:
    drawn = drawn_tree()
    assert drawn["SwitchyardError"][0] is None
    assert drawn["JobInputError"][0] == "InvalidInput"
    assert drawn["AmbiguousBatch"] == ("InvalidQuery", 422)
    assert drawn["NotFound"] == ("SwitchyardError", 404)


def test_every_error_is_defined_in_errors_py_and_drawn_under_its_base_with_its_status() -> None:
    _import_the_package()
    drawn = drawn_tree()
    classes = _subclasses(SwitchyardError)
    assert len(classes) >= 15
    for cls in classes:
        assert cls.__module__ == "pipeline.errors", f"{cls.__name__} is defined in {cls.__module__}"
        assert cls.__name__ in drawn, f"{cls.__name__} is missing from the tree in pipeline/errors.py's docstring"
        base, status = drawn[cls.__name__]
        assert base == cls.__base__.__name__, f"{cls.__name__} is drawn under {base}, but derives from {cls.__base__}"
        assert status == status_for(cls), f"{cls.__name__} is drawn with {status}; the API answers {status_for(cls)}"
    # ...and nothing is drawn that does not exist.
    assert set(drawn) == {c.__name__ for c in classes} | {"SwitchyardError"}


def _raises_the_base(node: ast.AST) -> bool:
    if not isinstance(node, ast.Raise) or node.exc is None:
        return False
    target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else None
    return name == "SwitchyardError"


def test_no_module_raises_the_bare_base_class() -> None:
    found = []
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        found += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree) if _raises_the_base(n)]
    assert not found, "raise a subclass from pipeline/errors.py, not SwitchyardError itself: " + ", ".join(found)


def test_the_scan_sees_a_bare_raise() -> None:
    assert _raises_the_base(ast.parse("raise SwitchyardError('x')").body[0])
    assert _raises_the_base(ast.parse("raise errors.SwitchyardError").body[0])
    assert not _raises_the_base(ast.parse("raise NotFound('x')").body[0])
