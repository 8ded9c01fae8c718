"""The upstream over TLS, as the real provider answers: streams read from the TLS socket itself
(`UpstreamAnswer.iter_bytes` → `EventBody`) arrive whole, heartbeat through silences, and leave
the connection in the pool for the next request; a server the CA bundle does not vouch for is
refused.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from app import db
from app.errors import ApiError
from app.services.ledger import Ledger
from app.services.passthrough import Passthrough
from app.settings import load_settings
from app.upstream import UpstreamClient
from tests.conftest import send_chat
from tests.fake_upstream import FAKE_KEY, FakeUpstream, answer_like_openai, stream

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_upstream(authority: trustme.CA) -> Iterator[FakeUpstream]:
    certificate = authority.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    fake = FakeUpstream(tls=context).start()
    yield fake
    fake.stop()


@pytest.fixture
def passthrough(
    tls_upstream: FakeUpstream, authority: trustme.CA, tmp_path: Path
) -> Iterator[Passthrough]:
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    settings = load_settings(
        {
            "OPENAI_API_KEY": FAKE_KEY,
            "OPENAI_BASE_URL": tls_upstream.base_url,
            "REQUESTS_CA_BUNDLE": str(bundle),
        }
    )
    engine = db.create_engine(f"sqlite:///{tmp_path / 'chatproxy.db'}")
    db.upgrade(engine)
    yield Passthrough(settings, UpstreamClient(settings), Ledger(engine))
    engine.dispose()


def post(passthrough: Passthrough, body: dict) -> bytes:
    """The relayed body of one chat request, read to its end."""
    answer = send_chat(passthrough, body)
    relayed = passthrough.relay(answer, {})
    try:
        return b"".join(relayed)
    finally:
        relayed.close()


def contents(body: bytes) -> str:
    """The text of a relayed chat stream's deltas, in order."""
    text = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


def test_streams_and_answers_over_tls_arrive_whole_on_one_kept_connection(
    tls_upstream: FakeUpstream, passthrough: Passthrough
) -> None:
    pieces = [f"piece {n} " for n in range(60)]
    tls_upstream.enqueue(
        stream(chunks=pieces, interval=0.002), answer_like_openai, stream(chunks=pieces)
    )

    first = post(passthrough, {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
    answer = json.loads(post(passthrough, {"model": "gpt-4o-mini", "messages": MESSAGES}))
    second = post(passthrough, {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})

    assert contents(first) == contents(second) == "".join(pieces)
    assert first.rstrip().endswith(b"data: [DONE]")
    assert answer["object"] == "chat.completion"
    assert tls_upstream.connections == 1, "the TLS connection was not reused"


def test_a_silent_tls_stream_heartbeats_and_then_goes_on(
    tls_upstream: FakeUpstream, passthrough: Passthrough
) -> None:
    tls_upstream.enqueue(stream(chunks=["slow ", "answer"], interval=0.7))

    body = post(passthrough, {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})

    assert b": ping" in body  # IDLE_EVERY is 0.5 s: the read timed out on the TLS socket
    assert contents(body) == "slow answer"
    assert body.rstrip().endswith(b"data: [DONE]")


def test_an_upstream_the_ca_bundle_does_not_vouch_for_is_refused(
    tls_upstream: FakeUpstream, tmp_path: Path
) -> None:
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    settings = load_settings(
        {
            "OPENAI_API_KEY": FAKE_KEY,
            "OPENAI_BASE_URL": tls_upstream.base_url,
            "REQUESTS_CA_BUNDLE": str(stranger),
        }
    )

    with pytest.raises(ApiError) as refused:
        UpstreamClient(settings).send("POST", "chat/completions", body=b"{}")

    assert refused.value.code == "upstream_unreachable"
    assert "TLS" in refused.value.message
