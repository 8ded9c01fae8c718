"""Who may call: ACCESS_TOKENS, the routes that stay open, CORS, and the pages' security
headers (CONTRACT §2, §3, §6)."""

from __future__ import annotations

import base64
import gc
import re
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
import requests

from app import create_app
from app.settings import load_settings
from tests.conftest import REPO, Service, assert_no_secrets, service_env
from tests.fake_upstream import DEFAULT_REPLY, FAKE_KEY, FakeUpstream

ALICE = "tok-alice-123"
BARE = "tok-bare-456"
ORIGIN = "https://a.example"
OTHER_ORIGIN = "https://b.example"
CHAT_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
# (method, path, JSON body) of each surface that reaches the upstream.
SURFACES = [
    ("POST", "/chat", {"message": "hi"}),
    ("GET", "/callChatGPT?input=hi", None),
    ("POST", "/callChatGPT", {"input": "hi"}),
    ("POST", "/v1/chat/completions", CHAT_BODY),
    ("GET", "/v1/models", None),
]
SURFACE_IDS = [f"{method} {path}" for method, path, _ in SURFACES]
REFUSED_AUTHORIZATIONS = {
    "none": None,
    "wrong": "Bearer tok-wrong-999",
    "basic": "Basic " + base64.b64encode(f"alice:{ALICE}".encode()).decode(),
    "empty bearer": "Bearer ",
    "no scheme": ALICE,
    "prefix": f"Bearer {ALICE[:-1]}",
    "longer": f"Bearer {ALICE}4",
    "two words": f"Bearer {ALICE} {BARE}",
}


def start(upstream: FakeUpstream, factory: pytest.TempPathFactory, **overrides: str) -> Service:
    workdir = factory.mktemp("access")
    return Service(service_env(upstream, workdir, overrides), workdir).start()


def stop(service: Service) -> None:
    """Stop once no response keeps a keep-alive connection open (gunicorn waits for those)."""
    gc.collect()
    service.stop()


@pytest.fixture(scope="module")
def guarded(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = start(upstream_server, tmp_path_factory, ACCESS_TOKENS=f"alice:{ALICE},{BARE}")
    yield service
    stop(service)


@pytest.fixture(scope="module")
def one_origin(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = start(upstream_server, tmp_path_factory, CORS_ORIGINS=ORIGIN)
    yield service
    stop(service)


def call(
    service: Service,
    method: str,
    path: str,
    body: dict | None,
    authorization: str | None = None,
    **headers: str,
) -> requests.Response:
    if authorization is not None:
        headers["Authorization"] = authorization
    return requests.request(method, f"{service.url}{path}", json=body, headers=headers, timeout=10)


def preflight(service: Service, path: str, origin: str = ORIGIN) -> requests.Response:
    return requests.options(
        f"{service.url}{path}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )


def header_tokens(response: requests.Response, name: str) -> set[str]:
    return {item.strip().lower() for item in response.headers.get(name, "").split(",") if item}


# --- ACCESS_TOKENS ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", REFUSED_AUTHORIZATIONS.values(), ids=REFUSED_AUTHORIZATIONS
)
@pytest.mark.parametrize(("method", "path", "body"), SURFACES, ids=SURFACE_IDS)
def test_a_missing_or_wrong_token_is_refused_before_the_upstream(
    guarded: Service,
    upstream: FakeUpstream,
    method: str,
    path: str,
    body: dict | None,
    authorization: str | None,
) -> None:
    response = call(guarded, method, path, body, authorization)

    assert response.status_code == 401
    assert response.headers.get("WWW-Authenticate", "").lower().startswith("bearer")
    if path.startswith("/callChatGPT"):
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.text.startswith("error: ")
        assert "\n" not in response.text.rstrip("\n")
    else:
        assert response.headers["Content-Type"].startswith("application/json")
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("invalid_access_token", "authentication_error")
        assert error["message"]
    assert upstream.requests == []


@pytest.mark.parametrize("token", [ALICE, BARE], ids=["named", "bare"])
@pytest.mark.parametrize(("method", "path", "body"), SURFACES, ids=SURFACE_IDS)
def test_a_valid_token_passes_and_never_reaches_the_upstream(
    guarded: Service,
    upstream: FakeUpstream,
    method: str,
    path: str,
    body: dict | None,
    token: str,
) -> None:
    response = call(guarded, method, path, body, f"Bearer {token}")

    assert response.status_code == 200, response.text
    if path.startswith("/callChatGPT"):
        assert response.text == DEFAULT_REPLY
    [received] = upstream.requests
    assert received.bearer == FAKE_KEY
    assert token not in str(received.headers)


def test_the_bearer_scheme_is_case_insensitive(guarded: Service, upstream: FakeUpstream) -> None:
    response = call(guarded, "POST", "/chat", {"message": "hi"}, f"bearer {ALICE}")

    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/", "/qa", "/healthz", "/readyz"])
def test_pages_and_probes_need_no_token(guarded: Service, path: str) -> None:
    assert requests.get(f"{guarded.url}{path}", timeout=10).status_code == 200


def test_static_files_need_no_token(guarded: Service) -> None:
    static = REPO / "static"
    asset = next(path for path in sorted(static.rglob("*")) if path.is_file())

    response = requests.get(f"{guarded.url}/static/{asset.relative_to(static)}", timeout=10)

    assert response.status_code == 200
    assert response.content == asset.read_bytes()


@pytest.mark.parametrize("path", ["/chat", "/callChatGPT", "/v1/chat/completions"])
def test_cors_preflights_need_no_token_and_allow_authorization(
    guarded: Service, upstream: FakeUpstream, path: str
) -> None:
    response = preflight(guarded, path)

    assert response.status_code in (200, 204)
    assert response.headers.get("Access-Control-Allow-Origin") in ("*", ORIGIN)
    # A wildcard does not cover Authorization: it must be named.
    assert "authorization" in header_tokens(response, "Access-Control-Allow-Headers")
    assert "post" in header_tokens(response, "Access-Control-Allow-Methods")
    assert upstream.requests == []


# --- CORS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [ORIGIN, "null", "http://localhost:3000"])
def test_the_default_origin_wildcard_never_comes_with_credentials(
    guarded: Service, origin: str
) -> None:
    simple = requests.get(f"{guarded.url}/healthz", headers={"Origin": origin}, timeout=10)
    checked = preflight(guarded, "/chat", origin)

    for response in (simple, checked):
        assert response.headers.get("Access-Control-Allow-Origin") in ("*", origin)
        assert response.headers.get("Access-Control-Allow-Credentials", "").lower() != "true"


def test_a_request_without_origin_gets_no_cors_headers(guarded: Service) -> None:
    """Only browsers read CORS headers, and they always send Origin: curl and the SDKs are
    spared them."""
    response = requests.get(f"{guarded.url}/healthz", timeout=10)

    assert response.status_code == 200
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]


def test_an_allowed_origin_is_answered_with_itself(one_origin: Service) -> None:
    simple = requests.get(f"{one_origin.url}/healthz", headers={"Origin": ORIGIN}, timeout=10)
    checked = preflight(one_origin, "/chat", ORIGIN)

    assert simple.headers.get("Access-Control-Allow-Origin") == ORIGIN
    assert checked.headers.get("Access-Control-Allow-Origin") == ORIGIN
    assert "authorization" in header_tokens(checked, "Access-Control-Allow-Headers")


def test_another_origin_gets_no_cors_headers(one_origin: Service, upstream: FakeUpstream) -> None:
    simple = requests.get(f"{one_origin.url}/healthz", headers={"Origin": OTHER_ORIGIN}, timeout=10)
    checked = preflight(one_origin, "/chat", OTHER_ORIGIN)

    for response in (simple, checked):
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Credentials" not in response.headers
    assert upstream.requests == []


def test_a_wildcard_among_origins_still_never_comes_with_credentials() -> None:
    app = create_app(load_settings({"CORS_ORIGINS": f"{ORIGIN},*", "OPENAI_API_KEY": FAKE_KEY}))

    with app.test_client() as client:
        for origin in (ORIGIN, OTHER_ORIGIN):
            simple = client.get("/healthz", headers={"Origin": origin})
            checked = client.options(
                "/chat",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            for response in (simple, checked):
                assert response.headers.get("Access-Control-Allow-Origin") in ("*", origin)
                assert response.headers.get("Access-Control-Allow-Credentials") != "true"


# --- the pages' security headers ---------------------------------------------------------------------


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for directive in policy.split(";"):
        name, *values = directive.split()
        parsed.setdefault(name.lower(), values)
    return parsed


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        self.handlers += [name for name, _ in attrs if name.lower().startswith("on")]

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script" and data.strip():
            self.inline.append(data.strip()[:80])


@pytest.mark.parametrize("path", ["/", "/qa"])
def test_pages_are_sent_with_the_security_headers(guarded: Service, path: str) -> None:
    response = requests.get(f"{guarded.url}{path}", timeout=10)

    policy = directives(response.headers["Content-Security-Policy"])
    scripts = policy.get("script-src", policy.get("default-src"))
    assert scripts == ["'self'"], response.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in response.headers["Content-Security-Policy"]
    assert "'unsafe-eval'" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("path", ["/", "/qa"])
def test_pages_have_no_inline_script_that_the_policy_would_block(
    guarded: Service, path: str
) -> None:
    page = _Scripts()
    page.feed(requests.get(f"{guarded.url}{path}", timeout=10).text)

    assert page.scripts, "the page loads no script"
    for script in page.scripts:
        assert script.get("src"), f"inline script: {page.inline}"
        assert not re.match(r"^(https?:)?//", script["src"]), f"script from elsewhere: {script}"
    assert page.inline == []
    assert page.handlers == [], f"inline event handlers: {page.handlers}"


# --- last: nothing above wrote a token to the log -----------------------------------------------------


def test_tokens_never_appear_in_the_log(guarded: Service) -> None:
    call(guarded, "POST", "/chat", {"message": "hi"}, f"Bearer {ALICE}")
    call(guarded, "GET", "/callChatGPT?input=hi", None, f"Bearer {BARE}")

    assert_no_secrets(guarded.log_text(), ALICE, BARE)
