"""Operations: liveness and readiness probes."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Readiness: the configuration is usable. Says whether an upstream key is set, never which."""
    settings = current_app.config["SETTINGS"]
    checks = {"configuration": "ok", "upstream_key": settings.upstream_configured}
    return jsonify(status="ok", checks=checks)
