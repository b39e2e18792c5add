"""Prompt caching as the API does it: a prefix ends at each `cache_control` breakpoint and is keyed
by the model and the exact bytes before it (tools, then system blocks, then message blocks, and the
output format, which the API says invalidates the cache when it changes).

A request reads the longest prefix that is stored, ready and unexpired, and writes every longer
cacheable prefix it marks. An entry written by a request becomes readable only when that request's
answer goes out (`settle`), so requests fired together all miss, as the API documents. A read
restarts the entry's TTL. A prefix shorter than the model's minimum is silently not cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pipeline.fake_claude.errors import invalid
from pipeline.fake_claude.models import model_class
from pipeline.fake_claude.prompt import block_text

MAX_BREAKPOINTS = 4
TTL_SECONDS: dict[str, float] = {"5m": 300.0, "1h": 3600.0}
_MAX_ENTRIES = 100_000  # oldest forgotten first: a long benchmark must not grow the fake forever


@dataclass(frozen=True)
class Breakpoint:
    key: bytes     # sha256 of the model, the output format and every byte before the breakpoint
    tokens: int    # the prefix's size, estimated as the fake estimates the whole prompt
    ttl_s: float


@dataclass(frozen=True)
class CachePlan:
    """What one request reads and writes; `writes` become readable on `settle`."""

    marked: bool                    # the request has a breakpoint at all
    cacheable: bool                 # some breakpoint reached the model's minimum
    read_tokens: int
    creation_tokens: int
    reads: tuple[Breakpoint, ...]   # entries whose TTL the read restarts
    writes: tuple[Breakpoint, ...]

    @property
    def hit(self) -> bool:
        return self.read_tokens > 0


NO_CACHE = CachePlan(marked=False, cacheable=False, read_tokens=0, creation_tokens=0, reads=(), writes=())


def check_cache_controls(body: Mapping[str, Any]) -> None:
    """400 for a malformed cache_control or more breakpoints than the API allows."""
    found = 0
    for where, block in _blocks(body):
        control = block.get("cache_control")
        if control is None:
            continue
        if not isinstance(control, dict):
            raise invalid(f"{where}.cache_control: Input should be an object")
        if control.get("type") != "ephemeral":
            raise invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")
        if control.get("ttl", "5m") not in TTL_SECONDS:
            raise invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
        found += 1
    if found > MAX_BREAKPOINTS:
        raise invalid(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {found}.")


def breakpoints(body: Mapping[str, Any]) -> list[Breakpoint]:
    """Every breakpoint of a checked body, in prefix order."""
    digest = hashlib.sha256()
    digest.update(str(body.get("model")).encode() + b"\0")
    config = body.get("output_config")
    output_format = config.get("format") if isinstance(config, dict) else None
    digest.update(_canonical(output_format) + b"\0")
    chars = 0
    found: list[Breakpoint] = []
    for _, block in _blocks(body):
        digest.update(_canonical({k: v for k, v in block.items() if k != "cache_control"}))
        chars += len(block_text([block]))
        control = block.get("cache_control")
        if isinstance(control, dict):
            ttl = TTL_SECONDS[control.get("ttl", "5m")]
            found.append(Breakpoint(digest.copy().digest(), math.ceil(chars / 4), ttl))
    return found


class PromptCache:
    def __init__(self, min_tokens: Mapping[str, int]) -> None:
        self._min_tokens = dict(min_tokens)
        self._lock = threading.Lock()
        # key -> (expires_at, ready); a pending entry is one whose writer has not answered yet.
        self._entries: OrderedDict[bytes, tuple[float, bool]] = OrderedDict()

    def minimum(self, model: str) -> int:
        """The model's own setting, else its class's (haiku/sonnet/opus), else Sonnet's 1,024."""
        if model in self._min_tokens:
            return self._min_tokens[model]
        return self._min_tokens.get(model_class(model) or "", 1024)

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()

    def plan(self, body: Mapping[str, Any], now: float) -> CachePlan:
        """What this request would read and write, without changing the cache (a request the rate
        limiter then refuses must leave no trace)."""
        minimum = self.minimum(str(body.get("model")))
        marked = breakpoints(body)
        points = [p for p in marked if p.tokens >= minimum]
        if not points:
            return replace(NO_CACHE, marked=bool(marked))
        with self._lock:
            hit = next((i for i in range(len(points) - 1, -1, -1) if self._readable(points[i].key, now)), None)
        read = points[hit].tokens if hit is not None else 0
        writes = tuple(points[(hit + 1) if hit is not None else 0:])
        creation = writes[-1].tokens - read if writes else 0
        reads = (points[hit],) if hit is not None else ()
        return CachePlan(marked=True, cacheable=True, read_tokens=read, creation_tokens=creation, reads=reads,
                         writes=writes)

    def begin(self, plan: CachePlan, now: float) -> None:
        """The request is answered: restart what it read, and start its writes as pending."""
        with self._lock:
            for point in plan.reads:
                expires, ready = self._entries.get(point.key, (0.0, True))
                self._store(point.key, max(expires, now + point.ttl_s), ready)
            for point in plan.writes:
                expires, ready = self._entries.get(point.key, (0.0, False))
                if ready and expires <= now:
                    ready = False  # an expired entry is written afresh
                self._store(point.key, max(expires if ready else 0.0, now + point.ttl_s), ready)

    def settle(self, plan: CachePlan, *, delivered: bool) -> None:
        """The answer has gone out: its writes become readable. A dropped answer leaves them pending,
        to be completed by another writer of the same prefix or to expire."""
        if not plan.writes or not delivered:
            return
        with self._lock:
            for point in plan.writes:
                entry = self._entries.get(point.key)
                if entry is not None:
                    self._entries[point.key] = (entry[0], True)

    def _readable(self, key: bytes, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[1] and entry[0] > now

    def _store(self, key: bytes, expires: float, ready: bool) -> None:
        self._entries[key] = (expires, ready)
        self._entries.move_to_end(key)
        while len(self._entries) > _MAX_ENTRIES:
            self._entries.popitem(last=False)


def _blocks(body: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, block) in the API's prefix order: tools, system blocks, then each message's blocks.
    A string system prompt or message content is one block without a breakpoint; each message starts
    with a marker of its role, so moving text between turns changes the prefix."""
    out: list[tuple[str, dict[str, Any]]] = []
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(tool, dict):
            out.append((f"tools.{i}", tool))
    system = body.get("system")
    if isinstance(system, str):
        out.append(("system", {"type": "text", "text": system}))
    elif isinstance(system, list):
        out.extend((f"system.{j}", block) for j, block in enumerate(system) if isinstance(block, dict))
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict):
            continue
        out.append((f"messages.{i}", {"role": message.get("role")}))
        content = message.get("content")
        if isinstance(content, str):
            out.append((f"messages.{i}.content", {"type": "text", "text": content}))
        elif isinstance(content, list):
            out.extend((f"messages.{i}.content.{j}", block) for j, block in enumerate(content)
                       if isinstance(block, dict))
    return out


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
