"""What every request handler needs: a database session, and the caller its token stands for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.claude.ratelimit import RedisRateLimiter
from pipeline.config import ModelConfig
from pipeline.errors import Unauthorized
from pipeline.tenants import Caller


@dataclass
class ApiState:
    sessions: sessionmaker[Session]
    models: ModelConfig
    broker: redis.Redis | None  # None for a non-Redis broker (the demo's in-process one)
    limiter: RedisRateLimiter | None  # the tiers' shared budgets and 429 pauses, in the broker's Redis
    queues: list[str]
    max_body_bytes: int
    max_batch_jobs: int


def state(request: Request) -> ApiState:
    return request.app.state.api  # type: ignore[no-any-return]


def db(request: Request) -> Iterator[Session]:
    with state(request).sessions() as session:
        yield session


bearer = HTTPBearer(auto_error=False, scheme_name="token",
                    description="A token from `switchyard tokens create --tenant NAME`: `Authorization: Bearer sy_...`")


def caller(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Caller:
    if credentials is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>' "
                           "(`switchyard tokens create --tenant NAME` makes one)")
    with state(request).sessions() as session:
        who = tenants.authenticate(session, credentials.credentials)
    if who is None:
        # The same answer for malformed, unknown and revoked tokens, and never the token itself.
        raise Unauthorized("the bearer token is not valid: it is unknown, malformed or revoked")
    request.state.tenant = who.tenant
    return who


Db = Annotated[Session, Depends(db)]
Who = Annotated[Caller, Depends(caller)]
State = Annotated[ApiState, Depends(state)]
