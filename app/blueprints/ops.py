"""Operations: liveness and readiness probes, metrics, the API's description, and the calling
client's usage."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from .. import db, openapi
from ..auth import client_name
from ..errors import ApiError
from ..metrics import exposition

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Readiness: the configuration is usable and the database answers. Says whether an
    upstream key is set, never which; `degraded` (still 200) while Redis, used for rate
    limits, is unreachable and each process counts on its own."""
    settings = current_app.config["SETTINGS"]
    database = "ok" if db.ping(current_app.extensions["db"]) else "unavailable"
    rate_limit_storage = current_app.extensions["rate_limits"].storage_state()
    checks = {
        "configuration": "ok",
        "database": database,
        "rate_limit_storage": rate_limit_storage,
        "upstream_key_configured": settings.upstream_configured,
    }
    ready = database == "ok"
    status = "degraded" if rate_limit_storage == "unreachable" else "ok"
    return jsonify(status=status if ready else "unavailable", checks=checks), 200 if ready else 503


@bp.get("/usage")
def usage():
    """The calling client's ledger per UTC day and model: `?days=30` (1 to 366)."""
    raw = request.args.get("days", "30")
    try:
        days = int(raw)
    except ValueError:
        raise ApiError("invalid_value", "'days' must be a whole number from 1 to 366.") from None
    return jsonify(current_app.extensions["ledger"].usage(client_name(), days))


@bp.get("/metrics")
def metrics():
    """Prometheus metrics, added up over every worker process (docs/operations.md lists them).
    Needs an access token like every API route: Prometheus sends one with `authorization`."""
    body, content_type = exposition(request.headers.get("Accept"))
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


@bp.get("/openapi.json")
def openapi_document():
    """This service's own endpoints as OpenAPI 3.1 (the `/v1` passthrough described generically)."""
    return jsonify(openapi.document(request.script_root))
