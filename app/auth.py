"""Who is calling: one extractor for every route.

With `ACCESS_TOKENS` set, every route but the pages, static files, probes and CORS preflights
needs `Authorization: Bearer <token>`; the check runs before any body is read. A client is its
token's name, else its address. Failed authentications count against the address (`limits.py`).
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, current_app, g, request

from .errors import ApiError

OPEN_ENDPOINTS = frozenset(
    {"static", "pages.chat_page", "pages.qa_page", "ops.healthz", "ops.readyz"}
)


def client_name() -> str:
    """The calling client, as set by `authenticate` for this request."""
    return g.client_name


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Access tokens kept as digests and compared in constant time, whatever their lengths."""

    def __init__(self, tokens: dict[str, str]):
        self._names = [(_digest(token), name) for token, name in tokens.items()]

    def __bool__(self) -> bool:
        return bool(self._names)

    def name_for(self, token: str) -> str | None:
        presented, found = _digest(token), None
        for digest, name in self._names:  # no early exit: every comparison is made
            if hmac.compare_digest(presented, digest):
                found = name
        return found


def authenticate() -> None:
    tokens: TokenTable = current_app.extensions["access_tokens"]
    g.client_name = request.remote_addr or "unknown"
    if not tokens or request.method == "OPTIONS" or request.endpoint in OPEN_ENDPOINTS:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    name = tokens.name_for(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if name is None:
        # A valid token is its own client and never pays for its address's failures.
        rate_limits = current_app.extensions["rate_limits"]
        rate_limits.refuse_spent_address(g.client_name)
        rate_limits.count_failed_authentication(g.client_name)
        raise ApiError(
            "invalid_access_token",
            "A valid access token is required: send 'Authorization: Bearer <token>'.",
            headers={"WWW-Authenticate": 'Bearer realm="chatgpt-proxy"'},
        )
    g.client_name = name


def init_app(app: Flask) -> None:
    app.extensions["access_tokens"] = TokenTable(dict(app.config["SETTINGS"].access_tokens))
    app.before_request(authenticate)
