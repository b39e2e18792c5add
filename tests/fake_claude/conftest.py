from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from pipeline.fake_claude import FakeClaude


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeClaude]:
    with FakeClaude(port=0) as fc:
        yield fc


@pytest.fixture(scope="module")
def client(fake: FakeClaude) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="test", base_url=fake.base_url, max_retries=0) as c:
        yield c
