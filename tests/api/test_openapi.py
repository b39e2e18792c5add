"""A property-based run of the OpenAPI document (schemathesis): requests generated from the
document, valid ones and invalid ones, sent to the running server with a valid token. None may
get a 5xx, and each answer must match what the document promises (documented status, content
type, body schema). Bounded to a few examples per operation, so that it stays well under a minute.

schemathesis's own pytest plugin (``from_fixture``) does not work with pytest 9 (it sets
``node._nodeid``), so each operation's strategy is driven with Hypothesis directly."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.api.conftest import MakeToken, Server

EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10}
# Two checks ask more than an OpenAPI document can say, so they are left out:
# - positive_data_acceptance wants every schema-valid request accepted, but a job can be valid by
#   the schema and still be refused with a 422 that says why: a NUL character or a lone surrogate
#   in `metadata` (Postgres cannot store them), an unknown tier, an extract `schema` that is not a
#   JSON Schema, a job too large for the model's context.
# - negative_data_rejection wants unknown query parameters refused; like most HTTP APIs, this one
#   ignores them.
EXCLUDED = [schemathesis.checks.positive_data_acceptance, schemathesis.checks.negative_data_rejection]


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_openapi_document_holds_and_nothing_5xx(server: Server, make_token: MakeToken, mode: GenerationMode) -> None:
    token = make_token("schemathesis")
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [f"{o.method} {o.path}" for o in operations]

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                                   excluded_checks=EXCLUDED)

        try:
            run()
        except Unsatisfiable:
            # Negative mode and an operation with no input at all (/healthz): nothing to make invalid.
            assert mode is GenerationMode.NEGATIVE
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected for each operation, reported below
            failures[f"{operation.method.upper()} {operation.path}"] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"== {op}\n{why}" for op, why in failures.items())
