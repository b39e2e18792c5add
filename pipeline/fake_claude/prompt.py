"""Reading a request the way switchyard's prompt contract writes it.

The system prompt carries a ``[switchyard:PURPOSE]`` tag, and the last user message carries the job
in tagged sections plus optional ``[fake:NAME=VALUE]`` hints for this fake.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

PURPOSES: tuple[str, ...] = ("triage", "classify", "extract", "draft", "generate", "format_check", "judge")
SECTION_NAMES: tuple[str, ...] = (
    "text", "labels", "schema", "instructions", "context", "prompt", "feedback", "kind", "output",
    "routed_answer", "reference_answer",
)
_PURPOSE_TAG = re.compile(r"\[switchyard:([a-z_]+)\]")
_HINT = re.compile(r"\[fake:([A-Za-z_][A-Za-z0-9_]*)(?:=([^\]\s]*))?\]")
_OPEN_TAG = re.compile(r"<(" + "|".join(SECTION_NAMES) + r")>")


@dataclass(frozen=True)
class Prompt:
    purpose: str                # one of PURPOSES, or "other" when the system prompt has no tag
    system: str
    last_user: str              # text of the last user message
    sections: dict[str, str]    # top-level tagged sections of the last user message
    hints: dict[str, str]       # [fake:NAME=VALUE] directives; a bare [fake:NAME] maps to ""
    digest: bytes               # sha256 of the content: every "random" choice derives from it

    def section(self, name: str) -> str | None:
        return self.sections.get(name)

    def json_section(self, name: str) -> Any:
        """A section holding JSON (the labels, the schema), decoded; None if absent or not JSON."""
        raw = self.sections.get(name)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return None


def block_text(content: Any) -> str:
    """The text of a message content: a string, or the text blocks of a block list."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            elif block.get("type") == "tool_result":
                parts.append(block_text(block.get("content")))
    return "\n".join(p for p in parts if p)


def system_text(system: Any) -> str:
    return block_text(system) if system is not None else ""


def estimate_input_tokens(body: dict[str, Any]) -> int:
    chars = len(system_text(body.get("system")))
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            chars += len(block_text(message.get("content")))
    return max(1, math.ceil(chars / 4))


def estimate_output_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def parse_sections(text: str) -> dict[str, str]:
    """Top-level sections only: what sits inside <output> (an answer under check) may itself
    contain tags, and must not be mistaken for the job's own sections."""
    sections: dict[str, str] = {}
    pos = 0
    while True:
        match = _OPEN_TAG.search(text, pos)
        if match is None:
            return sections
        name = match.group(1)
        end = _matching_close(text, name, match.end())
        if end is None:
            return sections
        close_start, close_end = end
        sections.setdefault(name, text[match.end():close_start].strip("\n"))
        pos = close_end


def _matching_close(text: str, name: str, start: int) -> tuple[int, int] | None:
    opener, closer = f"<{name}>", f"</{name}>"
    depth, pos = 1, start
    while depth:
        next_close = text.find(closer, pos)
        if next_close < 0:
            return None
        next_open = text.find(opener, pos, next_close)
        if next_open >= 0:
            depth, pos = depth + 1, next_open + len(opener)
        else:
            depth, pos = depth - 1, next_close + len(closer)
    return pos - len(closer), pos


def parse_hints(text: str) -> dict[str, str]:
    """All [fake:...] directives; a name given twice keeps its last value."""
    return {m.group(1).lower(): (m.group(2) or "") for m in _HINT.finditer(text)}


def strip_hints(text: str) -> str:
    return _HINT.sub("", text)


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return block_text(message.get("content"))
    return ""


def read_prompt(body: dict[str, Any]) -> Prompt:
    system = system_text(body.get("system"))
    tag = _PURPOSE_TAG.search(system)
    purpose = tag.group(1) if tag and tag.group(1) in PURPOSES else "other"
    last_user = last_user_text(body.get("messages") or [])
    digest = hashlib.sha256(f"{purpose}\0{system}\0{last_user}".encode()).digest()
    return Prompt(
        purpose=purpose,
        system=system,
        last_user=last_user,
        # A task's shared sections (its labels, schema, examples) sit in the system prompt, where
        # switchyard puts them for the prompt cache; the job's own, in the user message, come last.
        sections={**parse_sections(system), **parse_sections(last_user)},
        hints=parse_hints(last_user),
        digest=digest,
    )


def unit(digest: bytes, salt: str) -> float:
    """A deterministic number in [0, 1) from the content digest and a salt naming the choice."""
    h = hashlib.sha256(digest + salt.encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def pick(digest: bytes, salt: str, n: int) -> int:
    return min(n - 1, int(unit(digest, salt) * n)) if n > 0 else 0
