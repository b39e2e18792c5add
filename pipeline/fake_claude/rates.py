"""Error rates for the quality model (quality.py): per model class and true difficulty, the chance of
a wrong answer; the defaults, and reading them from `--error-rates` or a TOML or JSON file."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.fake_claude.models import MODEL_CLASSES

DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
ErrorRates = Mapping[str, Mapping[str, float]]

# What `--error-rates default` means: the small model errs most, the large one least, and every
# class errs more on harder jobs.
DEFAULT_ERROR_RATES: dict[str, dict[str, float]] = {
    "haiku": {"easy": 0.05, "medium": 0.15, "hard": 0.35},
    "sonnet": {"easy": 0.02, "medium": 0.05, "hard": 0.12},
    "opus": {"easy": 0.01, "medium": 0.02, "hard": 0.03},
}
_SPEC_HELP = "'default', CLASS.DIFFICULTY=RATE items or the path of a TOML or JSON file"


def zero_error_rates() -> dict[str, dict[str, float]]:
    return {klass: dict.fromkeys(DIFFICULTIES, 0.0) for klass in MODEL_CLASSES}


def complete_error_rates(rates: ErrorRates) -> dict[str, dict[str, float]]:
    """Every class and difficulty, 0 where `rates` names none; ValueError naming a bad entry."""
    out = zero_error_rates()
    if not isinstance(rates, Mapping):
        # A ValueError like every other mistake here: callers turn it into one sentence for the user.
        raise ValueError(  # noqa: TRY004
            "error rates must be a table of model classes, each a table of difficulty = rate")
    for klass, table in rates.items():
        if isinstance(table, Mapping):
            for difficulty, rate in table.items():
                _put(out, str(klass), str(difficulty), rate, where="error rates")
        else:
            _put(out, str(klass), "*", table, where="error rates")
    return out


def parse_error_rates(spec: str) -> dict[str, dict[str, float]]:
    """Read `--error-rates`: 'default' (DEFAULT_ERROR_RATES) and CLASS.DIFFICULTY=RATE items, comma
    separated, later items winning, * for every class or difficulty, unnamed pairs 0
    ("default,haiku.hard=0.5", "*.*=0.1"); or else the path of a TOML or JSON file holding a table
    per class of difficulty = rate. A ValueError's message is one sentence naming the mistake."""
    text = spec.strip()
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ValueError(f"expected {_SPEC_HELP}, got nothing")
    if "=" not in text and items != ["default"]:
        return complete_error_rates(_read_file(text))
    out = zero_error_rates()
    for item in items:
        if item == "default":
            out = {klass: dict(table) for klass, table in DEFAULT_ERROR_RATES.items()}
            continue
        name, eq, rate = item.partition("=")
        klass, dot, difficulty = name.strip().partition(".")
        if not eq or not dot:
            raise ValueError(f"{item!r}: expected CLASS.DIFFICULTY=RATE, such as haiku.hard=0.35")
        _put(out, klass.strip(), difficulty.strip(), rate.strip(), where=repr(item))
    return out


def _read_file(name: str) -> Any:
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"{name!r} is not 'default', nor CLASS.DIFFICULTY=RATE items, nor a file that exists")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot read the error-rates file {name!r}: {reason}") from None
    as_json = path.suffix.lower() == ".json" or (path.suffix.lower() != ".toml" and raw.lstrip().startswith("{"))
    try:
        data = json.loads(raw) if as_json else tomllib.loads(raw)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"the error-rates file {name!r} is not valid {'JSON' if as_json else 'TOML'}: "
                         f"{exc}") from None
    try:
        return complete_error_rates(data)
    except ValueError as exc:
        raise ValueError(f"the error-rates file {name!r}: {exc}") from None


def _put(out: dict[str, dict[str, float]], klass: str, difficulty: str, rate: Any, *, where: str) -> None:
    if klass != "*" and klass not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {klass!r} in {where} (known: {', '.join(MODEL_CLASSES)}, or *)")
    if difficulty != "*" and difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r} in {where} (known: {', '.join(DIFFICULTIES)}, or *)")
    value: float | None = None
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        value = float(rate)
    elif isinstance(rate, str):
        try:
            value = float(rate)
        except ValueError:
            value = None
    if value is None:
        raise ValueError(f"the rate for {klass}.{difficulty} in {where} is not a number: {rate!r}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"the rate {rate} for {klass}.{difficulty} in {where} is outside [0, 1]")
    for k in MODEL_CLASSES if klass == "*" else (klass,):
        for d in DIFFICULTIES if difficulty == "*" else (difficulty,):
            out[k][d] = value
