"""Which model ids the fake knows, and what it derives from an id."""

from __future__ import annotations

import re
from typing import Any

# Any id of the documented shape is served, so switching models in configuration needs no change
# here; the list below is only what GET /v1/models reports (the ids Anthropic's documentation
# named in late 2026, newest first in each class).
MODEL_ID = re.compile(r"^claude-(haiku|sonnet|opus)-([0-9])[-0-9a-z]*$")
DEFAULT_MODELS: tuple[str, ...] = (
    "claude-haiku-5-5",
    "claude-haiku-4-5",
    "claude-sonnet-5-5",
    "claude-sonnet-5",
    "claude-sonnet-4-6",
    "claude-opus-5-5",
    "claude-opus-5",
    "claude-opus-4-6",
)
MODEL_CLASSES: tuple[str, ...] = ("haiku", "sonnet", "opus")
# The shortest prefix, in tokens, that prompt caching stores, by model class (an exact model id may
# be set too, in FakeOptions.cache_min_tokens). Anthropic's documentation in late 2026 gave 1,024 for
# Sonnet 4.5/4.6 and 4,096 for Haiku 4.5 and Opus 4.5/4.6; the fake applies them to every version.
CACHE_MIN_TOKENS: dict[str, int] = {"haiku": 4096, "sonnet": 1024, "opus": 4096}


def is_known(model: str) -> bool:
    return MODEL_ID.match(model) is not None


def model_class(model: str) -> str | None:
    """haiku/sonnet/opus by substring, as the rate limits and hints group models."""
    for name in MODEL_CLASSES:
        if name in model:
            return name
    return None


def major_version(model: str) -> int | None:
    match = MODEL_ID.match(model)
    return int(match.group(2)) if match else None


def rejects_sampling_params(model: str) -> bool:
    """Whether the fake answers 400 to a temperature, top_p or top_k. The API refuses a non-default
    value from Sonnet 5 on (Anthropic's documentation, late 2026); the fake refuses any value, and
    from Opus 5 on as well: stricter than documented, so a client that passes here sends none of them
    to a Sonnet or an Opus from 5 on."""
    version = major_version(model)
    return model_class(model) in ("sonnet", "opus") and version is not None and version >= 5


def display_name(model: str) -> str:
    parts = model.split("-")[1:]
    family = parts[0].capitalize() if parts else model
    numbers = [p for p in parts[1:] if p.isdigit() and len(p) < 4]
    return f"Claude {family} {'.'.join(numbers)}".strip()


def model_entry(model: str, index: int) -> dict[str, Any]:
    # A stable fake creation date, newer for the models listed first, as the real list is ordered.
    day = 28 - (index % 28)
    return {
        "id": model,
        "type": "model",
        "display_name": display_name(model),
        "created_at": f"2026-{12 - min(index, 11):02d}-{day:02d}T00:00:00Z",
    }
