"""The chat page (`/`) and the Q&A page (`/qa`) in headless Chromium, against the real service.

Every test drives a page the way a person would and ends with `pages.assert_clean()`: no console
error but a 4xx/5xx the test provoked, no aborted request but a fetch the user stopped, no
Content-Security-Policy violation (CONTRACT §6: scripts from 'self' only), no JavaScript dialog,
and no request to any host but 127.0.0.1. Some tests save screenshots to `docs/screenshots/`
for the README.

Conversations live on the server, per client: the module's service has `ACCESS_TOKENS`, and each
test's pages use a token of their own (put in localStorage before the page loads), so that every
test starts with an empty conversation list and a second browser context with the same token is
the same client on another device.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from playwright.sync_api import expect

from tests.conftest import Service, service_env
from tests.fake_upstream import FAKE_KEY, FakeUpstream, openai_error, rate_limited, stream

if TYPE_CHECKING:
    from playwright.sync_api import (
        Browser,
        ConsoleMessage,
        Dialog,
        Locator,
        Page,
        Request,
    )

    from tests.browser import PageLog
    from tests.fake_upstream import RecordedRequest

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}
TIMEOUT_MS = 10_000
# Chromium logs every 4xx/5xx response as this console error, whether or not the page handles it.
HTTP_ERROR_LOG = re.compile(r"^Failed to load resource: the server responded with a status of \d+")
# What Chromium reports for a fetch that the page aborted (the Stop button).
ABORTED = "net::ERR_ABORTED"
ABORTABLE_PATHS = frozenset({"/chat", "/callChatGPT"})
# Records CSP violations on `window` and hands them to the test, so a reload loses none.
CSP_RECORDER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  const entry = `${event.effectiveDirective} refused ${event.blockedURI || "inline code"}`
    + ` (${event.sourceFile || document.URL}:${event.lineNumber})`;
  window.__cspViolations.push(entry);
  window.__reportCspViolation?.(entry);
}, true);
"""

MARKDOWN_ANSWER = (
    "Here is **bold** text and a list:\n\n"
    "- first item\n"
    "- second item\n\n"
    "```python\n"
    "def greet(name):\n"
    '    return f"Hello, {name}!"\n'
    "```\n"
)
GREET_CODE = 'def greet(name):\n    return f"Hello, {name}!"\n'
TOKEN_KEY = "chatproxy.accessToken"
USE_THE_TESTS_TOKEN = object()


class Tokens:
    """Access tokens for one service, handed out one per test: each test is its own client."""

    def __init__(self, prefix: str, count: int = 64) -> None:
        self.tokens = {
            f"{prefix}{i:02d}": f"tok-{prefix}-{secrets.token_hex(8)}" for i in range(count)
        }
        self._unused = iter(list(self.tokens.values()))

    @property
    def env(self) -> str:
        """The value of `ACCESS_TOKENS`."""
        return ",".join(f"{name}:{token}" for name, token in self.tokens.items())

    def take(self) -> str:
        return next(self._unused)


TOKENS = Tokens("pages")


def token_service(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory, tokens: Tokens
) -> Iterator[Service]:
    """The default service of a module, with `tokens` as its clients."""
    workdir = tmp_path_factory.mktemp("service")
    env = service_env(upstream_server, workdir, {"ACCESS_TOKENS": tokens.env})
    started = Service(env, workdir).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def service(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    yield from token_service(upstream_server, tmp_path_factory, TOKENS)


class Pages:
    """Browser contexts opened by one test, and what their pages did that a page must never do.

    Each `open` gets a fresh context (no storage shared with other tests), a desktop-sized
    viewport unless told otherwise, listeners feeding `page_log`, CSP and dialog records, and
    `init_scripts` run in every document before the page's own scripts. Its localStorage holds
    `token` (the test's own unless told otherwise; None for none) as the access token, as if
    the user had typed it in once; `on_request` sees every request from the first.
    """

    def __init__(
        self,
        browser: Browser,
        log: PageLog,
        init_scripts: Sequence[str] = (),
        tokens: Tokens = TOKENS,
    ) -> None:
        self.browser = browser
        self.log = log
        self.init_scripts = [CSP_RECORDER, *init_scripts]
        self.token = tokens.take()
        self.csp_violations: list[str] = []
        self.dialogs: list[str] = []
        self._contexts = []

    def open(
        self,
        url: str,
        token: str | None | object = USE_THE_TESTS_TOKEN,
        on_request: Callable[[Request], None] | None = None,
        **context_options: object,
    ) -> Page:
        context = self.browser.new_context(**{"viewport": DESKTOP, **context_options})
        self._contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        context.on("request", self.log.on_request)
        if on_request:  # Playwright cannot take a built-in such as `list.append` as a handler
            context.on("request", lambda request: on_request(request))
        context.on("requestfailed", self.log.on_request_failed)
        context.on("response", self.log.on_response)
        context.expose_function("__reportCspViolation", self._on_csp_violation)
        token = self.token if token is USE_THE_TESTS_TOKEN else token
        if token:
            context.add_init_script(
                f"try {{ localStorage.setItem({json.dumps(TOKEN_KEY)}, {json.dumps(token)}); }}"
                " catch {}"
            )
        for script in self.init_scripts:
            context.add_init_script(script)
        page = context.new_page()
        self._watch(page)
        page.goto(url)
        if urlsplit(url).path in ("", "/"):
            page.locator("#messages > *").first.wait_for()  # chat.js has rendered
        return page

    def _watch(self, page: Page) -> None:
        page.on("console", self.log.on_console)
        page.on("console", self._on_console)
        page.on("pageerror", self.log.on_page_error)
        page.on("dialog", self._on_dialog)

    def _on_csp_violation(self, entry: str) -> None:
        self.csp_violations.append(entry)

    def _on_console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.csp_violations.append(f"console: {message.text}")

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def assert_clean(self) -> None:
        """Fail on anything a page must not do, whatever the test provoked on purpose."""
        for context in self._contexts:
            for page in context.pages:
                recorded = page.evaluate("window.__cspViolations || []")
                self.csp_violations.extend(v for v in recorded if v not in self.csp_violations)
        summary = self.log.summary()
        assert not self.csp_violations, f"CSP violations: {self.csp_violations}\n{summary}"
        assert not self.dialogs, f"JavaScript dialogs opened: {self.dialogs}\n{summary}"
        assert not self.log.page_errors, summary
        unexpected = [line for line in self.log.console_errors if not HTTP_ERROR_LOG.match(line)]
        assert not unexpected, f"console errors: {unexpected}\n{summary}"
        failed = [line for line in self.log.failed_requests if not _is_aborted_fetch(line)]
        assert not failed, f"failed requests: {failed}\n{summary}"
        self.log.assert_only_loopback()

    def close(self) -> None:
        for context in self._contexts:
            context.close()


def _is_aborted_fetch(line: str) -> bool:
    """`PageLog` writes a failed request as `METHOD URL: failure`."""
    _, url_and_failure = line.split(" ", 1)
    url, _, failure = url_and_failure.rpartition(": ")
    return failure == ABORTED and urlsplit(url).path in ABORTABLE_PATHS


@pytest.fixture
def pages(
    browser: Browser, page_log: PageLog, service_factory: Callable[..., Service]
) -> Iterator[Pages]:
    """Depends on `service_factory` so that the pages close before its services stop: a
    browser's keep-alive connection would hold up gunicorn's graceful shutdown."""
    opened = Pages(browser, page_log)
    yield opened
    opened.close()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / name)


def chat_requests(upstream: FakeUpstream, n: int) -> list[RecordedRequest]:
    """Wait for `n` chat completions at the fake (the page may also have asked for models)."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        found = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
        if len(found) >= n or time.monotonic() > deadline:
            assert len(found) >= n, [f"{r.method} {r.path}" for r in upstream.requests]
            return found
        time.sleep(0.02)


def ask(page: Page, question: str) -> None:
    page.locator("#question").fill(question)
    page.locator("#send-button").click()


def answer_body(page: Page) -> Locator:
    return page.locator(".message--assistant").last.locator(".message-body")


def wait_for_answer(page: Page, text: str, timeout: float = TIMEOUT_MS) -> Locator:
    """The last answer once it shows `text` and has finished (no aria-busy, a Regenerate)."""
    answer = page.locator(".message--assistant").last
    expect(answer.locator(".message-body")).to_have_text(text, timeout=timeout)
    expect(answer.locator(".regenerate")).to_be_visible(timeout=timeout)
    expect(page.locator(".message--assistant[aria-busy]")).to_have_count(0)
    return answer


def has_horizontal_scroll(page: Page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth > window.innerWidth")


def api(service: Service, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    """A call to the service as the client of `token`, as a script would make it."""
    headers = {"Authorization": f"Bearer {token}"}
    return requests.request(method, f"{service.url}{path}", headers=headers, timeout=10, **kwargs)


def stored_conversations(service: Service, token: str) -> list[dict]:
    """GET /chat/conversations: what the server keeps for the client, newest first."""
    response = api(service, token, "GET", "/chat/conversations")
    assert response.status_code == 200, response.text
    return response.json()["data"]


def stored_messages(service: Service, token: str, conversation_id: str) -> list[tuple]:
    """(role, content, partial) of each message of a stored conversation."""
    response = api(service, token, "GET", f"/chat/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"], m.get("partial")) for m in response.json()["messages"]]


def eventually(check: Callable[[], Any], timeout: float = TIMEOUT_MS / 1000) -> Any:
    """`check()` once it is truthy; the last value if it never is (for the assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def chat_posts(log: list[Request]) -> list[dict]:
    """The JSON bodies of the page's POST /chat requests, in order."""
    return [
        request.post_data_json
        for request in log
        if request.method == "POST" and urlsplit(request.url).path == "/chat"
    ]


# --- the chat page ----------------------------------------------------------------------------


def test_a_streamed_answer_appears_while_the_upstream_is_still_sending(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    interval = 0.4
    words = [f"Word{i:02d} " for i in range(10)]
    upstream.enqueue(stream(chunks=words, interval=interval))
    page = pages.open(service.url)

    ask(page, "Count slowly, please.")
    expect(answer_body(page)).to_contain_text("Word00")
    first_seen = time.monotonic()
    visible_then = answer_body(page).text_content()
    streaming = page.locator(".message--assistant[aria-busy]").count()
    stop_visible = page.locator("#stop-button").is_visible()

    sent_at = chat_requests(upstream, 1)[0].received_at
    # The fake sends piece i at sent_at + (i + 1) * interval; the last one cannot be out yet.
    last_piece_at = sent_at + len(words) * interval
    assert first_seen < last_piece_at - interval, (first_seen - sent_at, visible_then)
    assert "Word09" not in visible_then
    assert streaming == 1 and stop_visible

    answer = wait_for_answer(page, "".join(words).strip())
    assert time.monotonic() >= last_piece_at
    expect(answer.locator(".message-usage")).to_contain_text("gpt-4o-mini")
    expect(answer.locator(".message-usage")).to_contain_text("tokens")
    expect(page.locator("#stop-button")).to_be_hidden()
    expect(page.locator("#send-button")).to_be_visible()
    pages.assert_clean()


def test_markdown_renders_with_highlighted_code_and_a_copy_button(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.reply_text = MARKDOWN_ANSWER
    page = pages.open(service.url, color_scheme="light")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])

    ask(page, "Show me a greeting function in Python.")
    answer = page.locator(".message--assistant").last
    expect(answer.locator(".regenerate")).to_be_visible()
    body = answer.locator(".message-body")

    expect(body.locator("strong")).to_have_text("bold")
    expect(body.locator("ul > li")).to_have_text(["first item", "second item"])
    block = body.locator(".code-block")
    expect(block.locator(".code-language")).to_have_text("python")
    expect(block.locator("pre > code.hljs")).to_have_text(GREET_CODE)
    assert block.locator("pre > code.hljs span[class^='hljs-']").count() >= 3, block.inner_html()
    copy = block.locator(".copy-code")
    expect(copy).to_be_visible()
    expect(page.locator("#usage-today")).to_have_text(re.compile(r"^Today: \d+ tokens"))
    screenshot(page, "chat-light.png")

    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == GREET_CODE
    pages.assert_clean()


def test_the_dark_theme_applies_and_is_remembered(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.reply_text = MARKDOWN_ANSWER
    page = pages.open(service.url, color_scheme="light")
    ask(page, "Show me a greeting function in Python.")
    page.locator(".regenerate").wait_for()
    light = page.evaluate("getComputedStyle(document.body).backgroundColor")

    page.locator("#theme-switch").select_option("dark")

    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert dark != light
    expect(page.locator("#usage-today")).to_have_text(re.compile(r"^Today: \d+ tokens"))
    screenshot(page, "chat-dark.png")
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    expect(page.locator("#theme-switch")).to_have_value("dark")
    assert page.evaluate("localStorage.getItem('chatproxy.theme')") == "dark"
    pages.assert_clean()


def test_stop_ends_a_slow_stream_keeps_the_partial_answer_and_closes_the_upstream(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    words = ["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "stream."]
    upstream.enqueue(stream(chunks=words, interval=0.2, hang_after=3))
    page = pages.open(service.url)

    ask(page, "Tell me a long story.")
    expect(answer_body(page)).to_have_text("Once upon a")
    request = chat_requests(upstream, 1)[0]
    page.locator("#stop-button").click()
    stopped_at = time.monotonic()

    closed_at = upstream.wait_for_close(request, timeout=5)
    assert closed_at is not None, "the service kept the upstream stream open after Stop"
    assert closed_at - stopped_at < 2.0, closed_at - stopped_at
    answer = wait_for_answer(page, "Once upon a")
    expect(answer.locator(".message-note")).to_have_text("Stopped.")
    expect(answer.locator(".message-error")).to_have_count(0)
    expect(page.locator("#stop-button")).to_be_hidden()
    expect(page.locator("#send-button")).to_be_visible()

    # The server kept the partial answer, marked so.
    (conversation,) = stored_conversations(service, pages.token)
    expected = [
        ("user", "Tell me a long story.", False),
        ("assistant", "Once upon a ", True),
    ]
    kept = eventually(lambda: stored_messages(service, pages.token, conversation["id"]) == expected)
    assert kept, stored_messages(service, pages.token, conversation["id"])

    page.reload()  # this browser remembers that its user stopped it
    expect(answer_body(page)).to_have_text("Once upon a")
    expect(page.locator(".message-note")).to_have_text("Stopped.")

    elsewhere = pages.open(service.url)  # another device sees that it is incomplete
    elsewhere.locator("#conversation-list .conversation-open").click()
    expect(answer_body(elsewhere)).to_have_text("Once upon a")
    expect(elsewhere.locator(".message-note")).to_have_text(
        "This answer is incomplete: it was stopped or cut off."
    )
    pages.assert_clean()


def test_ask_again_sends_the_last_question_again_as_a_new_turn(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(text="The first answer."), stream(text="The second answer."))
    page = pages.open(service.url)
    ask(page, "Give me a name for a cat.")
    wait_for_answer(page, "The first answer.")

    again = page.locator(".regenerate")
    expect(again).to_have_text("Ask again")
    expect(again).to_have_attribute("title", re.compile("as a new turn.*stays in the conversation"))
    again.click()

    wait_for_answer(page, "The second answer.")
    question = {"role": "user", "content": "Give me a name for a cat."}
    first, second = (request.json["messages"] for request in chat_requests(upstream, 2))
    assert first == [question]
    assert second == [question, {"role": "assistant", "content": "The first answer."}, question]
    expect(page.locator(".message--user .message-body")).to_have_text([question["content"]] * 2)
    expect(page.locator(".message--assistant .message-body")).to_have_text(
        ["The first answer.", "The second answer."]
    )
    (conversation,) = stored_conversations(service, pages.token)
    assert conversation["message_count"] == 4

    page.reload()  # what the page showed is what the server has
    expect(page.locator(".message--assistant .message-body")).to_have_text(
        ["The first answer.", "The second answer."]
    )
    pages.assert_clean()


def test_edit_and_resend_sends_the_edited_question_as_a_new_turn(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(text="Frnace is not a country."), stream(text="Paris."))
    page = pages.open(service.url)
    ask(page, "What is the capital of Frnace?")
    wait_for_answer(page, "Frnace is not a country.")

    page.locator(".edit-message").click()
    expect(page.locator("#edit-banner")).to_be_visible()
    expect(page.locator("#edit-banner")).to_contain_text("It is sent as a new turn")
    expect(page.locator("#question")).to_have_value("What is the capital of Frnace?")
    page.locator("#question").fill("What is the capital of France?")
    page.locator("#question").press("Enter")

    wait_for_answer(page, "Paris.")
    edited = chat_requests(upstream, 2)[1].json["messages"]
    assert edited == [
        {"role": "user", "content": "What is the capital of Frnace?"},
        {"role": "assistant", "content": "Frnace is not a country."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    expect(page.locator(".message--user .message-body")).to_have_text(
        ["What is the capital of Frnace?", "What is the capital of France?"]
    )
    expect(page.locator("#edit-banner")).to_be_hidden()
    pages.assert_clean()


def test_conversations_are_on_the_server_for_every_browser_with_the_token(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(text="Bees dance to say where the flowers are."))
    sent: list[Request] = []
    page = pages.open(service.url, on_request=sent.append)
    ask(page, "Why do bees dance?")
    wait_for_answer(page, "Bees dance to say where the flowers are.")

    # A stored conversation is asked for with `message`, not a `messages` history.
    assert chat_posts(sent) == [{"message": "Why do bees dance?", "stream": True}]
    (conversation,) = stored_conversations(service, pages.token)
    assert conversation["title"] == "Why do bees dance?"
    assert conversation["message_count"] == 2
    # The page keeps no conversation in localStorage.
    assert "Bees dance" not in page.evaluate("JSON.stringify({...localStorage})")

    page.reload()
    expect(page.locator("#conversation-list .conversation-open")).to_have_text(
        ["Why do bees dance?"]
    )
    expect(page.locator(".message--user .message-body")).to_have_text(["Why do bees dance?"])
    expect(answer_body(page)).to_have_text("Bees dance to say where the flowers are.")

    # Another browser (a fresh context: no localStorage) with the same token: the same list.
    sent_elsewhere: list[Request] = []
    elsewhere = pages.open(service.url, on_request=sent_elsewhere.append)
    expect(elsewhere.locator("#conversation-list .conversation-open")).to_have_text(
        ["Why do bees dance?"]
    )
    elsewhere.locator("#conversation-list .conversation-open").click()
    expect(elsewhere.locator("#conversation-title")).to_have_text("Why do bees dance?")
    expect(answer_body(elsewhere)).to_have_text("Bees dance to say where the flowers are.")
    # ... where the conversation goes on, with its history kept by the server.
    ask(elsewhere, "And ants?")
    wait_for_answer(elsewhere, upstream.reply_text)
    assert chat_posts(sent_elsewhere) == [
        {"message": "And ants?", "stream": True, "conversation_id": conversation["id"]}
    ]
    assert chat_requests(upstream, 2)[1].json["messages"] == [
        {"role": "user", "content": "Why do bees dance?"},
        {"role": "assistant", "content": "Bees dance to say where the flowers are."},
        {"role": "user", "content": "And ants?"},
    ]
    page.reload()
    expect(page.locator(".message--user .message-body")).to_have_text(
        ["Why do bees dance?", "And ants?"]
    )

    # Another client (another token) sees none of it.
    stranger = pages.open(service.url, token=TOKENS.take())
    expect(stranger.locator("#conversation-empty")).to_be_visible()
    expect(stranger.locator("#conversation-list .conversation-open")).to_have_count(0)

    page.locator("#new-chat").click()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#conversation-title")).to_have_text("New chat")
    pages.assert_clean()


def test_rename_in_place_reaches_the_server(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    sent: list[Request] = []
    page = pages.open(service.url, on_request=sent.append)
    ask(page, "Plan a weekend trip")
    wait_for_answer(page, upstream.reply_text)
    item = page.locator("#conversation-list .conversation-item")
    expect(item.locator(".conversation-open")).to_have_text(["Plan a weekend trip"])

    item.locator(".conversation-rename").click()
    field = item.locator(".conversation-title-input")
    expect(field).to_be_focused()
    expect(field).to_have_value("Plan a weekend trip")
    field.fill("A title to throw away")
    field.press("Escape")  # cancels
    expect(field).to_have_count(0)
    expect(item.locator(".conversation-open")).to_have_text(["Plan a weekend trip"])
    assert [r for r in sent if r.method == "PATCH"] == []
    assert [c["title"] for c in stored_conversations(service, pages.token)] == [
        "Plan a weekend trip"
    ]

    item.locator(".conversation-rename").click()
    field.fill("Lisbon in May")
    field.press("Enter")  # saves
    expect(field).to_have_count(0)
    expect(item.locator(".conversation-open")).to_have_text(["Lisbon in May"])
    expect(page.locator("#conversation-title")).to_have_text("Lisbon in May")
    assert [c["title"] for c in stored_conversations(service, pages.token)] == ["Lisbon in May"]
    (patch,) = [r for r in sent if r.method == "PATCH"]
    assert patch.post_data_json == {"title": "Lisbon in May"}

    page.reload()
    expect(page.locator("#conversation-list .conversation-open")).to_have_text(["Lisbon in May"])
    expect(page.locator("#conversation-title")).to_have_text("Lisbon in May")
    pages.assert_clean()


def test_delete_asks_in_the_page_and_reaches_the_server(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    kept = api(service, pages.token, "POST", "/chat", json={"message": "Keep me"})
    assert kept.status_code == 200, kept.text
    page = pages.open(service.url)
    ask(page, "Delete me")
    wait_for_answer(page, upstream.reply_text)
    titles = page.locator("#conversation-list .conversation-open")
    expect(titles).to_have_text(["Delete me", "Keep me"])
    dialog = page.locator("dialog#delete-dialog[open]")
    delete = page.locator("#conversation-list .conversation-item").first.locator(
        ".conversation-delete"
    )

    delete.click()
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("“Delete me” will be deleted from the server")
    dialog.locator("#delete-cancel").click()
    expect(dialog).to_have_count(0)
    delete.click()
    page.keyboard.press("Escape")  # cancels too
    expect(dialog).to_have_count(0)
    expect(titles).to_have_text(["Delete me", "Keep me"])
    assert len(stored_conversations(service, pages.token)) == 2

    delete.click()
    dialog.locator("#delete-confirm").click()
    expect(dialog).to_have_count(0)
    expect(titles).to_have_text(["Keep me"])
    expect(page.locator(".message")).to_have_count(0)  # it was open: a new chat replaces it
    assert [c["title"] for c in stored_conversations(service, pages.token)] == ["Keep me"]
    page.reload()
    expect(titles).to_have_text(["Keep me"])
    pages.assert_clean()  # no confirm(): the dialog was the page's own


def test_the_list_loads_more_when_scrolled_to_the_end(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    total = 35
    for number in range(total):
        created = api(
            service, pages.token, "POST", "/chat", json={"message": f"Topic {number:02d}"}
        )
        assert created.status_code == 200, created.text
    sent: list[Request] = []
    page = pages.open(service.url, on_request=sent.append)
    titles = page.locator("#conversation-list .conversation-open")
    expect(titles).to_have_count(30)
    expect(titles.first).to_have_text(f"Topic {total - 1:02d}")  # newest first

    page.locator("#conversation-nav").evaluate("nav => nav.scrollTo(0, nav.scrollHeight)")

    expect(titles).to_have_count(total)
    expect(titles.last).to_have_text("Topic 00")
    expect(page.locator("#conversation-more")).to_be_hidden()
    listings = [
        parse_qs(urlsplit(r.url).query)
        for r in sent
        if urlsplit(r.url).path == "/chat/conversations"
    ]
    oldest_shown = stored_conversations(service, pages.token)[29]["id"]
    assert {"limit": ["30"], "before": [oldest_shown]} in listings, listings
    pages.assert_clean()


def test_settings_are_kept_per_conversation_and_the_system_prompt_is_fixed_at_the_start(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    sent: list[Request] = []
    page = pages.open(service.url, on_request=sent.append)
    page.locator("#settings-toggle").click()
    expect(page.locator("#setting-model option[value='gpt-4o']")).to_have_count(1)
    page.locator("#setting-model").select_option("gpt-4o")
    page.locator("#setting-preset").select_option("concise")
    concise = page.locator("#setting-system").input_value()
    assert concise.startswith("You are a helpful assistant.")
    page.locator("#setting-temperature").fill("0.3")
    page.locator("#setting-temperature").press("Tab")

    ask(page, "First conversation")
    wait_for_answer(page, upstream.reply_text)
    first_body = {
        "message": "First conversation",
        "stream": True,
        "system": concise,
        "model": "gpt-4o",
        "temperature": 0.3,
    }
    assert chat_posts(sent) == [first_body]
    assert chat_requests(upstream, 1)[0].json["messages"][0] == {
        "role": "system",
        "content": concise,
    }
    # Once started, the conversation's system prompt is the server's: shown, not editable.
    expect(page.locator("#setting-system")).to_have_value(concise)
    expect(page.locator("#setting-system")).to_have_attribute("readonly", "")
    expect(page.locator("#setting-preset")).to_be_disabled()
    expect(page.locator("#system-fixed")).to_be_visible()
    (first,) = stored_conversations(service, pages.token)
    kept = page.evaluate(
        f"JSON.parse(localStorage.getItem('chatproxy.conversation.{first['id']}'))"
    )
    assert kept["settings"] == {"model": "gpt-4o", "temperature": 0.3, "maxTokens": None}

    page.locator("#new-chat").click()  # a new chat starts from the last settings, all editable
    expect(page.locator("#setting-system")).to_have_value(concise)
    expect(page.locator("#setting-system")).not_to_have_attribute("readonly", "")
    expect(page.locator("#setting-temperature")).to_have_value("0.3")
    page.locator("#setting-temperature").fill("1")
    page.locator("#setting-temperature").press("Tab")
    ask(page, "Second conversation")
    wait_for_answer(page, upstream.reply_text)
    assert chat_posts(sent)[1]["temperature"] == 1

    page.reload()  # the first conversation keeps its own settings in this browser
    page.locator("#conversation-list .conversation-open", has_text="First conversation").click()
    expect(page.locator("#conversation-title")).to_have_text("First conversation")
    page.locator("#settings-toggle").click()
    expect(page.locator("#setting-temperature")).to_have_value("0.3")
    expect(page.locator("#setting-model")).to_have_value("gpt-4o")
    ask(page, "Back to the first")
    wait_for_answer(page, upstream.reply_text)
    assert chat_posts(sent)[-1] == {
        "message": "Back to the first",
        "stream": True,
        "conversation_id": first["id"],
        "model": "gpt-4o",
        "temperature": 0.3,
    }
    pages.assert_clean()


def test_the_token_dialog_asks_once_and_the_token_is_sent_as_bearer(
    pages: Pages, service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    token = "tok-pages-7d3e9b1c5a2f"
    service = service_factory(ACCESS_TOKENS=f"pages:{token}")
    sent: list[Request] = []
    page = pages.open(service.url, token=None, on_request=sent.append)

    def authorizations(method: str, path: str) -> list[str | None]:
        return [
            r.headers.get("authorization")
            for r in sent
            if r.method == method and urlsplit(r.url).path == path
        ]

    # The conversation list needs the token: the page asks for it as it opens.
    dialog = page.locator("dialog#token-dialog[open]")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#token-dialog-refused")).to_be_hidden()
    page.locator("#token-input").fill("tok-wrong")
    page.locator("#token-submit").click()
    expect(dialog.locator("#token-dialog-refused")).to_be_visible()  # asked again, refused
    page.locator("#token-input").fill(token)
    page.locator("#token-submit").click()
    expect(dialog).to_have_count(0)
    expect(page.locator("#conversation-empty")).to_be_visible()
    expect(page.locator("#usage-today")).to_have_text(re.compile(r"^Today: 0 tokens"))
    assert authorizations("GET", "/chat/conversations") == [
        None,
        "Bearer tok-wrong",
        f"Bearer {token}",
    ]

    ask(page, "Who am I?")
    wait_for_answer(page, upstream.reply_text)
    expect(page.locator("dialog#token-dialog[open]")).to_have_count(0)
    assert authorizations("POST", "/chat") == [f"Bearer {token}"]
    (request,) = chat_requests(upstream, 1)
    assert request.bearer == FAKE_KEY
    assert token not in str(request.headers) and token.encode() not in request.body
    assert page.evaluate(f"localStorage.getItem('{TOKEN_KEY}')") == token
    # After an answer the page asks for today's usage again: let it land, since a reload
    # in the middle would abort it.
    expect(page.locator("#usage-today")).not_to_have_text(re.compile(r"^Today: 0 tokens"))

    page.reload()  # remembered: the list and the next question go through without asking
    expect(page.locator("#conversation-list .conversation-open")).to_have_text(["Who am I?"])
    ask(page, "And now?")
    expect(page.locator(".message--assistant")).to_have_count(2)
    wait_for_answer(page, upstream.reply_text)
    expect(page.locator("dialog#token-dialog[open]")).to_have_count(0)
    assert authorizations("POST", "/chat")[-1] == f"Bearer {token}"
    pages.assert_clean()


def test_a_chinese_browser_gets_the_chinese_interface(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(text="长城全长两万多公里，是古代的军事防御工程。"))
    page = pages.open(service.url, locale="zh-CN", color_scheme="light")

    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    expect(page).to_have_title("ChatGPT 代理")
    expect(page.locator("#send-button")).to_have_text("发送")
    expect(page.locator("#new-chat")).to_have_text("新对话")
    expect(page.locator("#question")).to_have_attribute("placeholder", re.compile("Enter 发送"))
    ask(page, "请介绍一下长城。")
    answer = wait_for_answer(page, "长城全长两万多公里，是古代的军事防御工程。")
    expect(answer.locator(".regenerate")).to_have_text("再问一次")
    expect(answer.locator(".copy-answer")).to_have_text("复制")
    expect(page.locator(".edit-message")).to_have_text("编辑并重发")
    expect(page.locator("#usage-today")).to_have_text(re.compile(r"^今日：\d+ 个 token"))
    expect(page.locator(".conversation-rename")).to_have_attribute(
        "aria-label", "重命名对话“请介绍一下长城。”"
    )
    screenshot(page, "chat-zh-CN.png")

    page.locator("#lang-switch").select_option("en")
    expect(page.locator("#send-button")).to_have_text("Send")
    expect(answer.locator(".regenerate")).to_have_text("Ask again")
    expect(page.locator("#usage-today")).to_have_text(re.compile(r"^Today: \d+ tokens"))
    pages.assert_clean()


def test_a_chinese_browser_gets_the_chinese_qa_page(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(text="长城全长两万多公里，是古代的军事防御工程。"))
    page = pages.open(f"{service.url}/qa", locale="zh-CN", color_scheme="light")

    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    expect(page.locator("h1")).to_have_text("提问")
    expect(page.locator("#send-button")).to_have_text("提问")
    page.locator("#question").fill("请介绍一下长城。")
    page.locator("#question").press("Enter")
    expect(page.locator("#answer")).to_have_text("长城全长两万多公里，是古代的军事防御工程。")
    expect(page.locator("#send-button")).to_be_enabled()
    expect(page.locator("#answer-heading")).to_have_text("回答")
    screenshot(page, "qa-zh-CN.png")
    pages.assert_clean()


LONG_ANSWER = (
    "A long line of code must scroll inside its block, not widen the page:\n\n"
    "```javascript\n"
    "const url = 'https://example.com/" + "a" * 160 + "'; console.log(url.length, url);\n"
    "```\n\n"
    "And a long word wraps: " + "Donaudampfschifffahrtsgesellschaftskapitän" * 3 + "\n\n"
    "| column one | column two | column three | column four | column five |\n"
    "| --- | --- | --- | --- | --- |\n"
    "| some value | another value | a third value | a fourth value | a fifth value |\n"
)


def test_a_phone_wide_screen_has_no_horizontal_scroll(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.reply_text = LONG_ANSWER
    phone = {"viewport": PHONE, "is_mobile": True, "has_touch": True, "color_scheme": "light"}
    page = pages.open(service.url, **phone)
    assert not has_horizontal_scroll(page), page.evaluate("document.documentElement.scrollWidth")

    ask(page, "Show me something wide.")
    page.locator(".regenerate").wait_for()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the chat page is {width} px wide at {PHONE['width']} px"
    screenshot(page, "chat-phone.png")

    page.locator("#sidebar-toggle").click()
    expect(page.locator("#sidebar")).to_be_visible()
    expect(page.locator("#conversation-list .conversation-open")).to_have_count(1)
    expect(page.locator("#conversation-list .conversation-rename")).to_be_visible()
    expect(page.locator("#conversation-list .conversation-delete")).to_be_visible()
    expect(page.locator("#usage-today")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"with the drawer open the page is {width} px wide"
    page.locator("#conversation-list .conversation-delete").click()
    expect(page.locator("dialog#delete-dialog[open]")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"with the delete dialog open the page is {width} px wide"
    page.locator("#delete-cancel").click()

    qa = pages.open(f"{service.url}/qa", **phone)
    qa.locator("#question").fill("Show me something wide.")
    qa.locator("#question").press("Enter")
    expect(qa.locator("#answer")).to_contain_text("Donaudampfschifffahrts")
    width = qa.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the Q&A page is {width} px wide at {PHONE['width']} px"
    pages.assert_clean()


def test_an_upstream_429_that_outlasts_the_retries_is_worded_inline(
    pages: Pages, service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    service = service_factory(UPSTREAM_RETRIES="0")
    upstream.enqueue(rate_limited(retry_after="7"))
    page = pages.open(service.url)

    ask(page, "Are you busy?")

    error = page.locator(".message--assistant .message-error")
    expect(error).to_have_text("Too many requests. Try again in 7 s.")
    expect(error).to_have_attribute("role", "alert")
    expect(page.locator(".message--assistant[aria-busy]")).to_have_count(0)
    assert len(chat_requests(upstream, 1)) == 1

    # The server kept nothing of the refused turn, so the same question goes again in its place.
    retry = page.locator(".regenerate")
    expect(retry).to_have_text("Retry")
    retry.click()
    wait_for_answer(page, upstream.reply_text)
    expect(page.locator(".message-error")).to_have_count(0)
    expect(page.locator(".message--user .message-body")).to_have_text(["Are you busy?"])
    assert chat_requests(upstream, 2)[1].json["messages"] == [
        {"role": "user", "content": "Are you busy?"}
    ]
    pages.assert_clean()  # the 429 was shown in the page, not in an alert()


def test_a_spent_daily_budget_is_worded_inline(
    pages: Pages, service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    service = service_factory(DAILY_TOKEN_BUDGET="5")
    page = pages.open(service.url)
    ask(page, "Spend my budget, please.")
    wait_for_answer(page, upstream.reply_text)

    ask(page, "One more?")

    error = page.locator(".message--assistant").last.locator(".message-error")
    expect(error).to_have_text("Today's token budget is spent. It resets at midnight UTC.")
    expect(error).to_have_attribute("role", "alert")
    assert len(upstream.requests) == 1  # refused before the upstream
    pages.assert_clean()


def test_a_conversation_deleted_elsewhere_is_worded_inline(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    other = api(service, pages.token, "POST", "/chat", json={"message": "Older question"})
    assert other.status_code == 200, other.text
    page = pages.open(service.url)
    ask(page, "Remember me?")
    wait_for_answer(page, upstream.reply_text)
    titles = page.locator("#conversation-list .conversation-open")
    expect(titles).to_have_text(["Remember me?", "Older question"])
    for conversation in stored_conversations(service, pages.token):  # on another device
        assert api(service, pages.token, "DELETE", f"/chat/conversations/{conversation['id']}").ok

    ask(page, "Still there?")  # a new turn of a conversation that is gone
    error = page.locator(".message--assistant").last.locator(".message-error")
    expect(error).to_have_text(re.compile(r"^This conversation is no longer on the server"))
    expect(page.locator(".regenerate")).to_have_count(0)
    expect(titles).to_have_text(["Older question"])

    titles.click()  # listed before it was deleted: opening it says so
    notice = page.locator(".messages-notice")
    expect(notice).to_have_text(
        re.compile(r"^Could not open the conversation\. This conversation is no longer on the")
    )
    expect(titles).to_have_count(0)
    assert stored_conversations(service, pages.token) == []
    pages.assert_clean()


def test_the_usage_of_each_answer_and_of_today_is_shown(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    page = pages.open(service.url)
    usage_today = page.locator("#usage-today")
    expect(usage_today).to_have_text("Today: 0 tokens · $0.00")

    ask(page, "How many tokens is this?")
    answer = wait_for_answer(page, upstream.reply_text)

    response = api(service, pages.token, "GET", "/usage?days=1")
    assert response.status_code == 200, response.text
    total = response.json()["total"]
    assert total["total_tokens"] > 0 and total["requests"] == 1
    expect(answer.locator(".message-usage")).to_have_text(
        f"gpt-4o-mini · {total['prompt_tokens']} + {total['completion_tokens']}"
        f" = {total['total_tokens']} tokens"
    )
    expect(usage_today).to_have_text(re.compile(rf"^Today: {total['total_tokens']} tokens · "))
    assert re.search(r"\$\d", usage_today.text_content()), usage_today.text_content()
    expect(usage_today).to_have_attribute("title", re.compile(r"since midnight UTC: 1 requests"))

    ask(page, "And this one?")  # refreshed after each answer
    wait_for_answer(page, upstream.reply_text)
    spent = api(service, pages.token, "GET", "/usage?days=1").json()["total"]["total_tokens"]
    assert spent > total["total_tokens"]
    expect(usage_today).to_have_text(re.compile(rf"^Today: {spent} tokens · "))
    pages.assert_clean()


# --- the Q&A page -----------------------------------------------------------------------------


def test_the_qa_answer_streams_in_as_plain_text_and_enter_submits(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    pieces = ["  **Paris** ", "is <b>the</b> ", "capital ", "of ", "France. ", "It ", "is "]
    pieces += ["on ", "the ", "Seine.\n"]
    upstream.enqueue(stream(chunks=pieces, interval=0.3))
    page = pages.open(f"{service.url}/qa", color_scheme="light")
    answer = page.locator("#answer")

    page.locator("#question").fill("What is the capital of France?")
    page.locator("#question").press("Enter")
    expect(answer).to_contain_text("**Paris**")
    assert "Seine" not in answer.text_content()  # still being written

    expect(answer).to_have_text("**Paris** is <b>the</b> capital of France. It is on the Seine.")
    assert page.evaluate("document.querySelector('#answer').childElementCount") == 0
    expect(page.locator("#answer-error")).to_be_hidden()
    expect(page.locator("#send-button")).to_be_enabled()
    (request,) = chat_requests(upstream, 1)
    assert request.json["messages"][-1] == {
        "role": "user",
        "content": "What is the capital of France?",
    }
    screenshot(page, "qa-light.png")
    pages.assert_clean()


def test_an_upstream_failure_shows_in_the_qa_error_line(
    pages: Pages, service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    service = service_factory(UPSTREAM_RETRIES="0")
    upstream.enqueue(openai_error(500, "The server had an error.", type="server_error"))
    page = pages.open(f"{service.url}/qa")

    page.locator("#question").fill("Are you there?")
    page.locator("#send-button").click()

    error = page.locator("#answer-error")
    expect(error).to_be_visible()
    expect(error).to_have_text(re.compile(r"^error: \S"))
    assert "<" not in error.text_content()
    expect(page.locator("#answer")).to_have_text("")
    expect(page.locator("#send-button")).to_be_enabled()
    pages.assert_clean()
