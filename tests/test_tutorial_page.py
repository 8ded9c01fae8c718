"""The tutorial's page, served from another origin, works against the service in a browser.

The project began from a tutorial whose page was a jQuery form calling
`$.ajax({url: 'http://HOST/callChatGPT', type: 'GET', data: 'input=' + q, dataType: 'text'})`
from wherever it was hosted. `tests/pages/tutorial.html` is that page; here it is served by a
static server on another port (another origin) and driven in headless Chromium, so CORS is the
browser's, not a test's idea of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import pytest
import requests

from tests.fake_upstream import FAKE_KEY, FakeUpstream, openai_error

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.browser import PageLog, StaticSite
    from tests.conftest import Service

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

TESTS = Path(__file__).resolve().parent
TUTORIAL_PAGE = TESTS / "pages" / "tutorial.html"
JQUERY = TESTS.parent / "static" / "vendor" / "jquery" / "jquery.min.js"
ACCESS_TOKEN = "tok-tutorial-4f1c2a9e7b"
CORS_BLOCKED = "blocked by CORS policy"


@dataclass
class Outcome:
    """What the page's ajax callback saw: `xhr.status` and the text it put in `#answer`."""

    status: int
    text: str


@pytest.fixture(scope="module")
def tutorial_url(other_origin: StaticSite) -> str:
    other_origin.publish("jquery.min.js", JQUERY)
    return other_origin.publish("tutorial.html", TUTORIAL_PAGE)


@pytest.fixture
def ask(
    service_factory: Callable[..., Service], page: Page, tutorial_url: str
) -> Callable[..., Outcome]:
    """Open the tutorial page pointed at a service, type a question, click, await the callback.

    It depends on `service_factory` so that the page closes before the services stop: a
    browser's keep-alive connection would hold up gunicorn's graceful shutdown.
    """

    def ask_question(service: Service, question: str, token: str | None = None) -> Outcome:
        query = {"api": service.url, **({"token": token} if token else {})}
        page.goto(f"{tutorial_url}?{urlencode(query)}")
        page.locator("#question").press_sequentially(question)
        page.locator("#submit").click()
        answer = page.locator("#answer[data-status]")
        answer.wait_for(state="attached")
        return Outcome(int(answer.get_attribute("data-status")), answer.text_content())

    return ask_question


def send_preflight(url: str, origin: str) -> requests.Response:
    """The OPTIONS request Chromium sends before a GET with `Authorization`, which it leaves out."""
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
        # An idle keep-alive connection would hold up the service's graceful stop.
        "Connection": "close",
    }
    return requests.options(url, headers=headers, timeout=5)


def last_user_message(upstream: FakeUpstream) -> dict:
    return upstream.wait_for_requests(1)[-1].json["messages"][-1]


def test_the_answer_appears_in_the_page(
    ask: Callable[..., Outcome],
    service_factory: Callable[..., Service],
    upstream: FakeUpstream,
    page_log: PageLog,
) -> None:
    service = service_factory()
    upstream.reply_text = "  Paris is the capital of France.\n"

    outcome = ask(service, "What is the capital of France?")

    assert outcome == Outcome(200, "Paris is the capital of France."), page_log.summary()
    assert last_user_message(upstream) == {
        "role": "user",
        "content": "What is the capital of France?",
    }
    page_log.assert_no_errors()
    page_log.assert_only_loopback()


def test_a_chinese_question_and_answer_round_trip(
    ask: Callable[..., Outcome],
    service_factory: Callable[..., Service],
    upstream: FakeUpstream,
    page_log: PageLog,
) -> None:
    service = service_factory()
    upstream.reply_text = "长城是中国古代的军事防御工程，全长两万多公里。"

    outcome = ask(service, "请用一句话介绍长城。")

    assert outcome == Outcome(200, "长城是中国古代的军事防御工程，全长两万多公里。"), (
        page_log.summary()
    )
    assert last_user_message(upstream) == {"role": "user", "content": "请用一句话介绍长城。"}
    page_log.assert_no_errors()


def test_an_upstream_failure_reaches_the_error_callback_as_a_readable_502(
    ask: Callable[..., Outcome],
    service_factory: Callable[..., Service],
    upstream: FakeUpstream,
    page_log: PageLog,
) -> None:
    service = service_factory(UPSTREAM_RETRIES="0")
    upstream.enqueue(openai_error(500, "The server had an error.", type="server_error"))

    outcome = ask(service, "Are you there?")

    assert outcome.status == 502, page_log.summary()
    # The body is readable only if the error response carries the CORS headers too.
    assert outcome.text.startswith("error: ") and "\n" not in outcome.text.strip(), outcome
    assert len(upstream.requests) == 1
    assert not [line for line in page_log.console_errors if "CORS" in line], page_log.summary()
    assert not page_log.page_errors


def test_an_origin_named_in_cors_origins_is_allowed(
    ask: Callable[..., Outcome],
    service_factory: Callable[..., Service],
    upstream: FakeUpstream,
    other_origin: StaticSite,
    page_log: PageLog,
) -> None:
    service = service_factory(CORS_ORIGINS=other_origin.origin)

    outcome = ask(service, "Hello?")

    assert outcome == Outcome(200, upstream.reply_text), page_log.summary()
    page_log.assert_no_errors()


def test_an_origin_not_in_cors_origins_is_blocked_by_the_browser(
    ask: Callable[..., Outcome],
    service_factory: Callable[..., Service],
    page_log: PageLog,
) -> None:
    # A simple GET is not preflighted: the service may answer it, but the page must not see it.
    service = service_factory(CORS_ORIGINS="https://elsewhere.example")

    outcome = ask(service, "Hello?")

    assert outcome == Outcome(0, ""), page_log.summary()
    assert [line for line in page_log.console_errors if CORS_BLOCKED in line], page_log.summary()


def test_a_page_sending_a_bearer_token_passes_the_preflight(
    ask: Callable[..., Outcome],
    service_factory: Callable[..., Service],
    upstream: FakeUpstream,
    other_origin: StaticSite,
    page_log: PageLog,
) -> None:
    service = service_factory(ACCESS_TOKENS=f"tutorial:{ACCESS_TOKEN}")
    preflight = send_preflight(f"{service.url}/callChatGPT", other_origin.origin)
    assert preflight.status_code in (200, 204), (preflight.status_code, preflight.text)
    allowed = preflight.headers.get("Access-Control-Allow-Headers", "").lower()
    assert "authorization" in [name.strip() for name in allowed.split(",")], preflight.headers

    outcome = ask(service, "Who am I?", token=ACCESS_TOKEN)

    assert outcome == Outcome(200, upstream.reply_text), page_log.summary()
    assert last_user_message(upstream) == {"role": "user", "content": "Who am I?"}
    assert upstream.requests[-1].bearer == FAKE_KEY  # the client's token stays with the proxy
    page_log.assert_no_errors()


def test_a_page_without_the_token_gets_a_readable_401(
    ask: Callable[..., Outcome],
    service_factory: Callable[..., Service],
    upstream: FakeUpstream,
    page_log: PageLog,
) -> None:
    service = service_factory(ACCESS_TOKENS=f"tutorial:{ACCESS_TOKEN}")

    outcome = ask(service, "Who am I?")

    assert outcome.status == 401, page_log.summary()
    assert outcome.text.startswith("error: "), outcome
    assert not [line for line in page_log.console_errors if "CORS" in line], page_log.summary()
    assert ACCESS_TOKEN not in outcome.text
    assert upstream.requests == []
