"""Operations: liveness and readiness probes, and the calling client's usage."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from .. import db
from ..auth import client_name
from ..errors import ApiError

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Readiness: the configuration is usable and the database answers. Says whether an
    upstream key is set, never which."""
    settings = current_app.config["SETTINGS"]
    database = "ok" if db.ping(current_app.extensions["db"]) else "unavailable"
    checks = {
        "configuration": "ok",
        "database": database,
        "upstream_key_configured": settings.upstream_configured,
    }
    ready = database == "ok"
    return jsonify(status="ok" if ready else "unavailable", checks=checks), 200 if ready else 503


@bp.get("/usage")
def usage():
    """The calling client's ledger per UTC day and model: `?days=30` (1 to 366)."""
    raw = request.args.get("days", "30")
    try:
        days = int(raw)
    except ValueError:
        raise ApiError("invalid_value", "'days' must be a whole number from 1 to 366.") from None
    return jsonify(current_app.extensions["ledger"].usage(client_name(), days))
