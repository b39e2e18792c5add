"""Shared helpers: build contract-shaped prompts and talk to the fake over plain HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import anthropic
from anthropic.types import Message

SONNET = "claude-sonnet-5-5"
OPUS = "claude-opus-5-5"
HAIKU = "claude-haiku-5-5"
HEADERS = {"x-api-key": "test", "anthropic-version": "2023-06-01", "content-type": "application/json"}


def system_for(purpose: str) -> str:
    return f"You are a careful assistant.\n[switchyard:{purpose}]"


def user_text(**sections: Any) -> str:
    """Tagged sections as switchyard writes them; lists and dicts become JSON."""
    parts = []
    for name, value in sections.items():
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"<{name}>\n{text}\n</{name}>")
    return "\n".join(parts)


def ask(
    client: anthropic.Anthropic,
    purpose: str,
    user: str,
    *,
    model: str = SONNET,
    max_tokens: int = 1024,
    **extra: Any,
) -> Message:
    return client.messages.create(
        model=model,
        max_tokens=max_tokens,
        system=system_for(purpose),
        messages=[{"role": "user", "content": user}],
        **extra,
    )


def text_of(message: Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def http(
    base_url: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """(status, lower-cased headers, parsed JSON body) without the SDK in the way."""
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        base_url + path, data=data, headers=HEADERS if headers is None else headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, _lower(response.headers.items()), json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, _lower(err.headers.items()), json.loads(err.read())


def message_body(user: str, *, purpose: str = "classify", model: str = SONNET, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 512,
        "system": system_for(purpose),
        "messages": [{"role": "user", "content": user}],
        **extra,
    }


def error_message(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    assert isinstance(body, dict)
    return str(body["error"]["message"])


def _lower(items: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in items}
