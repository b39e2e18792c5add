"""A fake Claude API server speaking the Anthropic Messages API over HTTP, for offline runs.

It answers switchyard's prompt contract ([switchyard:PURPOSE] tags, tagged job sections) with
deterministic, valid answers, and injects faults on request ([fake:...] hints) or at random.

Hints, anywhere in the last user message (unknown or malformed ones are ignored):
  [fake:difficulty=easy|medium|hard] [fake:confidence=0.3] [fake:triage=garbage]
  [fake:invalid=sonnet|opus|haiku|all, comma list] [fake:invalid_once]
  [fake:error=CODE] or [fake:error=CODE@CLASS[,CLASS]] with [fake:times=N]
      CODE: 400 401 403 404 413 429 500 529 stall drop empty malformed refusal max_tokens
  [fake:latency_ms=N] [fake:truth=LABEL]
  [fake:batch=errored|expired|canceled] (@CLASS and [fake:times=N] as for error): inside a message
      batch only, how the request ends
Prompt caching is simulated (cache.py): `cache_control` breakpoints, TTLs, per-model minimums, and
entries readable only once the answer that wrote them has gone out. `output_config.format` with a
JSON Schema is answered with JSON valid against it (a refusal or max_tokens fault still breaks it);
the request log names the schema each request asked for (`output_format`, see `schema_digest`).
The Message Batches API (batches.py): a batch ends --batch-delay-s after its creation, its requests
answered then by the same code as POST /v1/messages (same answers, usage and cache), outside the
synchronous rate limits, fault rate, request log and `total`; --batch-error-rates
errored=0.02,expired=0.01 ends a share of them so (drawn from --seed); results come as JSON Lines in
shuffled order; GET /_fake/stats counts them under "batches".
GET /v1/models and GET /v1/models/{id} answer as the Models API does (the workers and the demo
check the configured models there at start).

Quality model (quality.py, truth.py), for checking routing quality against the truth. Every job has a
true answer ([fake:truth=LABEL] for classify, else a label the text names, else one chosen by a hash
of the job text; for extract, the values the fake has always extracted) and a true difficulty ([fake:
difficulty=...], else the one the fake's triage has always given). With error rates given
(`--error-rates`, FakeOptions.error_rates), a model class answers a classify or extract job wrongly
with the rate for the job's true difficulty, decided by a hash of (--seed, job text, model class,
stage): the same on every retry, independent across classes. Wrong answers are plausible: another
label, or one field changed to another value the schema allows. `--triage-noise P` makes triage
report another difficulty for a share P of jobs. Without error rates every answer is the truth.
  --error-rates default                         haiku 0.05/0.15/0.35, sonnet 0.02/0.05/0.12,
                                                opus 0.01/0.02/0.03 (easy/medium/hard)
  --error-rates haiku.hard=0.35,sonnet.*=0.1    CLASS.DIFFICULTY=RATE (* for all), unnamed 0;
                                                'default,haiku.hard=0.5' starts from the defaults
  --error-rates rates.toml                      a TOML or JSON file: [haiku] hard = 0.35 ...
In tests and benchmarks, `truth(payload, kind)` and `is_correct(answer, payload, kind)` give the truth
in-process (pass `labels=` / `schema=` for a task's jobs), `QualityModel.answer` what a model class
answers, and GET /_fake/stats shows the settings and counts right and wrong answers served under
"quality". Judge prompts (is a draft as good as the reference?) are not modelled yet.

Run it standalone with `python -m pipeline.fake_claude --help`.
"""

from pipeline.fake_claude.options import FakeOptions, parse_faults
from pipeline.fake_claude.quality import Answer, QualityModel
from pipeline.fake_claude.rates import DEFAULT_ERROR_RATES, parse_error_rates
from pipeline.fake_claude.server import FakeClaude, serve_forever
from pipeline.fake_claude.truth import Job, is_correct, true_difficulty, truth
from pipeline.fake_claude.validation import schema_digest

__all__ = [
    "DEFAULT_ERROR_RATES",
    "Answer",
    "FakeClaude",
    "FakeOptions",
    "Job",
    "QualityModel",
    "is_correct",
    "parse_error_rates",
    "parse_faults",
    "schema_digest",
    "serve_forever",
    "true_difficulty",
    "truth",
]
