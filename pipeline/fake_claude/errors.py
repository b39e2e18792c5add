"""Ids and error bodies in the real API's shapes."""

from __future__ import annotations

import secrets
import string
from typing import Any

_ALNUM = string.ascii_letters + string.digits


def _token(n: int = 24) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def new_request_id() -> str:
    # Ids stay unique even when the answer is deterministic: callers key logs and rows on them.
    return "req_" + _token()


def new_message_id() -> str:
    return "msg_" + _token()


def new_batch_id() -> str:
    return "msgbatch_" + _token()


def error_body(error_type: str, message: str, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


class RequestInvalid(Exception):
    """A request the API refuses; carries the status and error.type to answer with."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def invalid(message: str) -> RequestInvalid:
    return RequestInvalid(400, "invalid_request_error", message)
