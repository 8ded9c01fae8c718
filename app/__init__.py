"""chatgpt-proxy: a self-hosted ChatGPT gateway that keeps the upstream key on the server."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .keypool import mask_key
from .settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from flask import Flask

ROOT = Path(__file__).resolve().parent.parent
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
EXPOSED_HEADERS = [
    "Retry-After",
    "X-Request-ID",
    "x-should-retry",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
]

log = logging.getLogger("chatproxy")


def create_app(settings: Settings | None = None) -> Flask:
    """Builds the application. Without `settings`, reads them from the environment and `.env`,
    and exits with one line naming the variable when a value cannot be used.

    The app's modules are imported here, not with the package: gunicorn's master imports the
    package for `settings_or_exit` and `log_startup` only, and stays ~30 MB lighter for it.
    """
    from flask import Flask
    from flask_cors import CORS
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import auth, db, errors, limits, logs, requestlog
    from .blueprints import chat, legacy, ops, pages, passthrough
    from .services.completions import ChatService
    from .services.conversations import Conversations
    from .services.ledger import Ledger
    from .services.passthrough import Passthrough
    from .services.turns import ConversationChat
    from .upstream import UpstreamClient

    if settings is None:
        settings = settings_or_exit()
    logs.configure(settings.log_level, settings.log_format, settings.secrets)
    app = Flask(
        __name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static")
    )
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=settings.max_request_bytes)
    app.url_map.merge_slashes = False  # `//` in a /v1 path is refused, not redirected
    app.url_map.strict_slashes = False

    engine = db.init_app(app)
    upstream = UpstreamClient(settings, settings.upstream_pool_size)
    ledger = Ledger(engine, settings.model_prices)
    conversations = Conversations(engine)
    chat_service = ChatService(settings, upstream, ledger)
    app.extensions.update(
        upstream=upstream,
        ledger=ledger,
        conversations=conversations,
        chat=chat_service,
        turns=ConversationChat(settings, chat_service, conversations),
        passthrough=Passthrough(settings, upstream, ledger),
    )

    requestlog.init_app(app)  # first: every later hook's failure has a request ID to log
    errors.init_app(app)
    auth.init_app(app)
    limits.init_app(app)  # after auth: the limiter keys on its client name
    CORS(
        app,
        origins=list(settings.cors_origins),
        supports_credentials="*" not in settings.cors_origins,
        send_wildcard="*" in settings.cors_origins,  # a literal `*`, never a reflected origin
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
        always_send=False,  # only browsers read CORS headers, and they always send `Origin`
    )
    for blueprint in (pages.bp, ops.bp, legacy.bp, chat.bp, passthrough.bp):
        app.register_blueprint(blueprint)
    app.after_request(_security_headers)
    if settings.trust_proxy_headers:
        hops = settings.trust_proxy_headers
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_prefix=hops)
    if not os.environ.get("CHATPROXY_STARTUP_LOGGED"):  # gunicorn's master said it already
        log_startup(settings)
    return app


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"chatgpt-proxy: configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def log_startup(settings: Settings) -> None:
    """Says once what the service will do with its configuration (keys masked)."""
    if not settings.upstream_configured:
        log.warning(
            "OPENAI_API_KEY is not set: the pages are served, and every endpoint that would call "
            "the upstream answers 503 upstream_not_configured"
        )
    else:
        keys = ", ".join(mask_key(key) for key in settings.api_keys)
        log.info("upstream %s with %d key(s): %s", settings.base_url, len(settings.api_keys), keys)


def _security_headers(response):
    # `Headers.setdefault` raises and catches an exception per absent name: one pass instead.
    present = {name.lower() for name in response.headers.keys()}
    for name, value in SECURITY_HEADERS.items():
        if name.lower() not in present:
            response.headers.add(name, value)
    return response
