"""`UpstreamClient` on its own, against the fake upstream over real sockets.

The client prepares each request once and sends it through the session's adapter instead of
`Session.request`; these tests check that what reaches the upstream is still what `requests`
would send: the URL as it quotes it, the caller's headers, one key per attempt, the proxy.
"""

from __future__ import annotations

import pytest
import requests

from app.errors import ApiError
from app.settings import load_settings
from app.upstream import UpstreamClient
from tests.fake_upstream import FAKE_KEY, FakeUpstream, auth_failed, respond

FIRST_KEY = "sk-test-first-0123456789abcdef"
SECOND_KEY = "sk-test-second-0123456789abcdef"
BODY = b'{"model": "gpt-4o-mini", "messages": []}'


def client_for(upstream: FakeUpstream, **environ: str) -> UpstreamClient:
    settings = load_settings(
        {"OPENAI_API_KEY": FAKE_KEY, "OPENAI_BASE_URL": upstream.base_url, **environ}
    )
    return UpstreamClient(settings)


def test_path_and_query_are_quoted_as_requests_quotes_them(upstream: FakeUpstream) -> None:
    client = client_for(upstream)
    path, query = "models/gpt 4o ü", "q=a b&r=%41"
    client.send("GET", path, query=query).close()
    sent = upstream.wait_for_requests(1)[0]
    expected = requests.Request("GET", client.url(path, query)).prepare().url
    assert f"http://127.0.0.1:{upstream.port}{sent.path}?{sent.query}" == expected


def test_each_attempt_carries_its_own_key_and_the_same_request(upstream: FakeUpstream) -> None:
    client = client_for(upstream, OPENAI_API_KEY=f"{FIRST_KEY},{SECOND_KEY}")
    upstream.enqueue(auth_failed(401))
    headers = {"user-agent": "caller/1.0", "Content-Type": "application/json"}
    answer = client.send("POST", "chat/completions", headers=headers, body=BODY)
    assert answer.status == 200
    answer.close()
    first, second = upstream.wait_for_requests(2)
    assert {first.bearer, second.bearer} == {FIRST_KEY, SECOND_KEY}
    for sent in (first, second):
        assert sent.headers.get_all("Authorization") == [f"Bearer {sent.bearer}"]
        assert sent.headers.get_all("User-Agent") == ["caller/1.0"]
        assert sent.headers["Content-Type"] == "application/json"
        assert sent.headers["Content-Length"] == str(len(BODY))
        assert sent.body == BODY
        assert sent.headers.get("Cookie") is None  # the fake sets one on every answer


def test_a_request_without_a_user_agent_gets_the_servers_own(upstream: FakeUpstream) -> None:
    client = client_for(upstream)
    client.send("GET", "models").close()
    assert upstream.wait_for_requests(1)[0].headers.get_all("User-Agent") == ["chatgpt-proxy"]


def test_a_header_requests_refuses_is_never_sent(upstream: FakeUpstream) -> None:
    client = client_for(upstream)
    with pytest.raises(ApiError) as refused:
        client.send("GET", "models", headers={"X-Note": "a\r\nInjected: 1"})
    assert refused.value.code == "upstream_unreachable"
    assert upstream.requests == []


def test_an_http_proxy_carries_every_request(upstream: FakeUpstream) -> None:
    client = client_for(
        upstream,
        OPENAI_BASE_URL="http://upstream.invalid/v1",
        HTTP_PROXY=f"http://127.0.0.1:{upstream.port}",
    )
    for _ in range(2):
        upstream.enqueue(respond(200, json={"proxied": True}))
        assert client.send("GET", "models").json() == {"proxied": True}
    targets = [sent.path for sent in upstream.wait_for_requests(2)]
    assert targets == ["http://upstream.invalid/v1/models"] * 2


def test_requests_still_go_out_after_the_connection_pools_were_closed(
    upstream: FakeUpstream,
) -> None:
    client = client_for(upstream)
    first = client.send("GET", "models")
    first.read()
    first.close()
    client.session.close()  # closes the adapter's pools, the one it looked up once included
    second = client.send("GET", "models")
    assert second.status == 200
    second.read()
    second.close()
    assert len(upstream.wait_for_requests(2)) == 2


def test_credentials_in_the_base_url_are_sent_as_basic_auth(upstream: FakeUpstream) -> None:
    """As `requests` does with them: a gateway behind Basic auth, whose key is then unused."""
    client = client_for(
        upstream, OPENAI_BASE_URL=f"http://user:secret@127.0.0.1:{upstream.port}/v1"
    )
    client.send("GET", "models").close()
    assert upstream.wait_for_requests(1)[0].headers["Authorization"] == "Basic dXNlcjpzZWNyZXQ="
