"""The dashboard's session cookie (pipeline.ui.session): what it holds, and every way a cookie that
the server did not issue, or issued too long ago, is refused."""

from __future__ import annotations

import base64
import json

from pipeline.ui.session import Signer, csrf_ok

NOW = 1_800_000_000.0


def test_a_cookie_holds_the_prefix_an_expiry_and_a_csrf_secret_signed() -> None:
    signer = Signer("server-secret", ttl_s=600)
    cookie, issued = signer.issue("0123456789ab", now=NOW)
    body = json.loads(base64.urlsafe_b64decode(cookie.split(".")[0] + "=="))
    assert body == {"p": "0123456789ab", "e": int(NOW) + 600, "c": issued.csrf}
    assert signer.read(cookie, now=NOW + 599) == issued
    assert csrf_ok(issued, issued.csrf)
    assert not csrf_ok(issued, None) and not csrf_ok(issued, "") and not csrf_ok(issued, issued.csrf + "x")
    # Each session its own CSRF secret.
    assert signer.issue("0123456789ab", now=NOW)[1].csrf != issued.csrf


def test_expired_altered_forged_and_garbled_cookies_are_no_session() -> None:
    signer = Signer("server-secret", ttl_s=600)
    cookie, _ = signer.issue("0123456789ab", now=NOW)
    body, mac = cookie.split(".")
    assert signer.read(cookie, now=NOW + 600) is None  # expired
    # Another prefix (another tenant's token) under the old signature.
    other = base64.urlsafe_b64encode(json.dumps({"p": "ffffffffffff", "e": int(NOW) + 600, "c": "x"},
                                                separators=(",", ":")).encode()).rstrip(b"=").decode()
    assert signer.read(f"{other}.{mac}", now=NOW) is None
    # Signed under another server's secret.
    assert Signer("another-secret", ttl_s=600).read(cookie, now=NOW) is None
    for garbled in ("", "x", f"{body}.{mac}.x", f"{body}.", f".{mac}", "not base64!.sig"):
        assert signer.read(garbled, now=NOW) is None, garbled
    assert signer.read(None, now=NOW) is None
