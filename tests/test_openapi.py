"""`GET /openapi.json` (CONTRACT §3): a valid OpenAPI 3.1 document that describes exactly the
service's own routes, so that a new route cannot go undescribed."""

from __future__ import annotations

import pytest
import requests
from flask import Flask
from openapi_spec_validator import validate

from app import create_app
from app.errors import ERROR_KINDS
from app.openapi import document
from app.requestlog import route_template
from app.settings import Settings
from tests.conftest import Service

AUTOMATIC = {"HEAD", "OPTIONS"}  # added by Flask and Werkzeug to every route
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    database = tmp_path_factory.mktemp("openapi") / "chatproxy.db"
    return create_app(Settings(database_url=f"sqlite:///{database}"))


def url_map_operations(app: Flask) -> set[tuple[str, str]]:
    return {
        (route_template(rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - AUTOMATIC
    }


def documented_operations(described: dict) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in described["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_the_document_is_valid_openapi_3_1() -> None:
    described = document()

    validate(described)  # raises on the first problem

    assert described["openapi"].startswith("3.1")


def test_the_document_describes_exactly_the_routes_of_the_url_map(app: Flask) -> None:
    routes = url_map_operations(app)
    described = documented_operations(document())

    assert described - routes == set(), "documented, but no such route"
    assert routes - described == set(), "a route without a description"
    assert ("/v1/{path}", "post") in described


def test_every_operation_has_an_id_and_responses() -> None:
    operations = [
        operation
        for item in document()["paths"].values()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]

    ids = [operation["operationId"] for operation in operations]
    assert len(ids) == len(set(ids))
    assert all(operation["responses"] for operation in operations)


def test_the_error_shape_names_every_error_type_the_service_uses() -> None:
    schema = document()["components"]["schemas"]["Error"]
    types = set(schema["properties"]["error"]["properties"]["type"]["enum"])

    assert {kind for _, kind in ERROR_KINDS.values()} <= types


def test_the_open_routes_need_no_token_and_the_others_do() -> None:
    described = document()
    open_paths = {
        path
        for path, item in described["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS and operation.get("security") == []
    }

    assert described["security"] == [{"bearer": []}]
    assert open_paths == {"/", "/qa", "/healthz", "/readyz"}


def test_the_service_serves_the_document(service: Service) -> None:
    response = requests.get(f"{service.url}/openapi.json", timeout=10)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {**document(), "servers": [{"url": "/"}]}
