"""A fake Claude API server speaking the Anthropic Messages API over HTTP, for offline runs.

It answers switchyard's prompt contract ([switchyard:PURPOSE] tags, tagged job sections) with
deterministic, valid answers, and injects faults on request ([fake:...] hints) or at random.

Hints, anywhere in the last user message (unknown or malformed ones are ignored):
  [fake:difficulty=easy|medium|hard] [fake:confidence=0.3] [fake:triage=garbage]
  [fake:invalid=sonnet|opus|haiku|all, comma list] [fake:invalid_once]
  [fake:error=CODE] or [fake:error=CODE@CLASS[,CLASS]] with [fake:times=N]
      CODE: 400 401 403 404 413 429 500 529 stall drop empty malformed refusal max_tokens
  [fake:latency_ms=N]
Prompt caching is simulated (cache.py): `cache_control` breakpoints, TTLs, per-model minimums, and
entries readable only once the answer that wrote them has gone out. `output_config.format` with a
JSON Schema is answered with JSON valid against it (a refusal or max_tokens fault still breaks it);
the request log names the schema each request asked for (`output_format`, see `schema_digest`).
GET /v1/models and GET /v1/models/{id} answer as the Models API does (the workers and the demo
check the configured models there at start).
Run it standalone with `python -m pipeline.fake_claude --help`.
"""

from pipeline.fake_claude.options import FakeOptions, parse_faults
from pipeline.fake_claude.server import FakeClaude, serve_forever
from pipeline.fake_claude.validation import schema_digest

__all__ = ["FakeClaude", "FakeOptions", "parse_faults", "schema_digest", "serve_forever"]
