"""TEST HOOKS: fault injection that only the fault tests switch on. Nothing here runs unless its
setting is given, and no production path depends on it.

``CrashOnMarker`` makes a worker process die the way the kernel's OOM killer ends it (SIGKILL to
the whole process, no clean-up, no ack) whenever it is about to make a model call whose prompt
contains a marker. That is the honest shape of a poison job: the stage has begun (the claim and
the started call row are committed), and then the process is gone. Exhausting memory for real
under an RLIMIT_AS would only raise MemoryError in one thread of a threads-pool worker, which
Python survives; the OOM killer's SIGKILL is what actually takes a worker down, so that is what
this sends. Enabled by SWITCHYARD_TEST_CRASH_ON=<marker> (pipeline.settings).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from pipeline.claude.client import CallResult, ModelClient

log = logging.getLogger(__name__)


class CrashOnMarker:
    """A model client that kills its own process instead of calling when the prompt has ``marker``."""

    def __init__(self, inner: ModelClient, marker: str) -> None:
        if not marker:
            raise ValueError("the crash marker must not be empty")
        self.inner = inner
        self.marker = marker

    def call(self, *, tier: str, model: str, system: str, user: str, max_tokens: int,
             on_retry: Callable[[int], None] | None = None, cache_system: bool = False,
             cache_ttl: str = "5m", output_schema: dict[str, Any] | None = None) -> CallResult:
        if self.marker in user:
            log.critical("TEST HOOK: prompt contains %r, killing this worker process (SWITCHYARD_TEST_CRASH_ON)",
                         self.marker)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.call(tier=tier, model=model, system=system, user=user, max_tokens=max_tokens,
                               on_retry=on_retry, cache_system=cache_system, cache_ttl=cache_ttl,
                               output_schema=output_schema)

    def close(self) -> None:
        self.inner.close()
