"""The dashboard's sign-in: an API token in, a signed session cookie out.

The cookie never holds the token. It holds the token's public prefix, an expiry and a per-session
CSRF secret, signed with HMAC-SHA256 under the server's secret (SWITCHYARD_UI_SECRET). Every request
checks the signature and the expiry, then looks the prefix up again, so a token revoked with
`switchyard tokens revoke` ends its sessions at the next request. The cookie is HttpOnly (no script
reads it), SameSite=Strict (no other site's page sends it) and Secure when served over HTTPS.

Forms that change state carry the session's CSRF secret in a hidden field; the handler compares it
in constant time. SameSite=Strict already keeps other sites' requests cookie-less; the field also
covers an older browser that ignores SameSite.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import ApiToken, Tenant
from pipeline.tenants import Caller

COOKIE = "switchyard_session"
DEFAULT_TTL_S = 8 * 3600


@dataclass(frozen=True)
class UiSession:
    prefix: str  # the token's public prefix: the lookup key, never the secret
    expires: int  # unix seconds
    csrf: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, secret: str | bytes, ttl_s: int = DEFAULT_TTL_S) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        # Derived, so the configured secret is used for this purpose only.
        self._key = hmac.new(key, b"switchyard-ui-session", hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def issue(self, prefix: str, *, now: float | None = None) -> tuple[str, UiSession]:
        s = UiSession(prefix=prefix, expires=int((now or time.time()) + self.ttl_s), csrf=secrets.token_urlsafe(24))
        body = _b64(json.dumps({"p": s.prefix, "e": s.expires, "c": s.csrf}, separators=(",", ":")).encode())
        return f"{body}.{self._mac(body)}", s

    def read(self, cookie: str | None, *, now: float | None = None) -> UiSession | None:
        """The session a cookie holds, or None if it is missing, forged, altered or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            data = json.loads(_unb64(body))
            s = UiSession(prefix=str(data["p"]), expires=int(data["e"]), csrf=str(data["c"]))
        except (ValueError, KeyError, TypeError):
            return None
        return s if s.expires > (now or time.time()) else None


def caller_for(session: Session, prefix: str) -> Caller | None:
    """The caller a signed session's token stands for, if the token still exists and is not revoked."""
    row = session.execute(
        select(ApiToken.revoked_at, ApiToken.operator, Tenant.id, Tenant.name)
        .join(Tenant, Tenant.id == ApiToken.tenant_id).where(ApiToken.prefix == prefix)).first()
    if row is None or row.revoked_at is not None:
        return None
    return Caller(tenant_id=row.id, tenant=row.name, token_prefix=prefix, operator=row.operator)


def csrf_ok(session: UiSession, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(session.csrf, sent or "")
