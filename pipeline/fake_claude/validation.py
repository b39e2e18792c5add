"""Checks the real API makes before answering: headers, body shape, model, parameters."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jsonschema

from pipeline.fake_claude.cache import check_cache_controls
from pipeline.fake_claude.errors import RequestInvalid, invalid
from pipeline.fake_claude.models import is_known, rejects_sampling_params

MAX_PROMPT_TOKENS = 200_000


def check_headers(headers: Mapping[str, str], api_key: str | None) -> None:
    """`headers` has lower-case names."""
    key = request_api_key(headers)
    if not key:
        raise RequestInvalid(401, "authentication_error", "x-api-key header is required")
    if api_key is not None and key != api_key:
        raise RequestInvalid(401, "authentication_error", "invalid x-api-key")
    if not headers.get("anthropic-version"):
        raise invalid("anthropic-version: header is required")


def request_api_key(headers: Mapping[str, str]) -> str:
    """The key from `x-api-key`, or from `Authorization: Bearer`: the documented header is
    x-api-key, but anthropic SDK 2.x sends the key as a bearer token instead."""
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def check_message_body(body: Any, *, need_max_tokens: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("body: Input should be a JSON object")
    model = body.get("model")
    if "model" not in body:
        raise invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise invalid("model: Input should be a valid string")
    if need_max_tokens:
        if "max_tokens" not in body:
            raise invalid("max_tokens: Field required")
        max_tokens = body["max_tokens"]
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid("max_tokens: Input should be a positive integer")
    _check_messages(body.get("messages"), "messages" in body)
    _check_system(body.get("system"))
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise invalid("stop_sequences: Input should be a list of strings")
    _check_output_config(body.get("output_config"))
    if output_schema(body) is not None and body["messages"][-1].get("role") == "assistant":
        # Constrained decoding starts the answer itself, so the API takes no prefilled start.
        raise invalid("output_config.format: structured outputs cannot be combined with an assistant "
                      "prefill (the last message is the assistant's)")
    check_cache_controls(body)
    if body.get("stream") is True:
        raise invalid("stream: streaming is not supported by the fake Claude server; send stream=false")
    if not is_known(model):
        raise RequestInvalid(404, "not_found_error", f"model: {model}")
    if rejects_sampling_params(model):
        for name in ("temperature", "top_p", "top_k"):
            if body.get(name) is not None:
                raise invalid(
                    f"{name}: is not supported for model {model}; omit temperature, top_p and top_k"
                )
    return body


def output_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a checked body asks its answer to follow, if any."""
    config = body.get("output_config")
    output_format = config.get("format") if isinstance(config, dict) else None
    return output_format["schema"] if isinstance(output_format, dict) else None


def schema_digest(schema: dict[str, Any]) -> str:
    """A short name for an output schema, in the order its keys were sent (the prompt cache keys on
    the bytes): what the request log keeps of it, instead of the schema itself."""
    canonical = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def check_prompt_size(input_tokens: int) -> None:
    if input_tokens > MAX_PROMPT_TOKENS:
        raise invalid(f"prompt is too long: {input_tokens} tokens > {MAX_PROMPT_TOKENS} maximum")


def _check_messages(messages: Any, present: bool) -> None:
    if not present:
        raise invalid("messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: Input should be a non-empty list")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise invalid(f"{where}: Input should be an object with role and content")
        if message.get("role") not in ("user", "assistant"):
            raise invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise invalid(f"{where}.content: Field required")
        _check_content(message["content"], f"{where}.content")


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid(f"{where}: Input should be a string or a list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"{where}.{j}.type: Field required")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise invalid(f"{where}.{j}.text: Input should be a valid string")


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise invalid("system: Input should be a string or a list of text blocks")
    for j, block in enumerate(system):
        if not (isinstance(block, dict) and block.get("type") == "text"
                and isinstance(block.get("text"), str)):
            raise invalid(f"system.{j}: Input should be a text block")


def _check_output_config(config: Any) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise invalid("output_config: Input should be an object")
    output_format = config.get("format")
    if output_format is None:
        return
    if not isinstance(output_format, dict):
        raise invalid("output_config.format: Input should be an object")
    if output_format.get("type") != "json_schema":
        raise invalid("output_config.format.type: Input should be 'json_schema'")
    if "schema" not in output_format:
        raise invalid("output_config.format.schema: Field required")
    schema = output_format["schema"]
    if not isinstance(schema, dict):
        raise invalid("output_config.format.schema: Input should be an object")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise invalid(f"output_config.format.schema: invalid JSON Schema at {where}: {exc.message}") from None
