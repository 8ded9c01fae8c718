"""The chat page (`/`) and the Q&A page (`/qa`) in headless Chromium, against the real service.

Every test drives a page the way a person would and ends with `pages.assert_clean()`: no console
error but a 4xx/5xx the test provoked, no aborted request but a fetch the user stopped, no
Content-Security-Policy violation (CONTRACT §6: scripts from 'self' only), no JavaScript dialog,
and no request to any host but 127.0.0.1. Some tests save screenshots to `docs/screenshots/`
for the README.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.fake_upstream import FAKE_KEY, FakeUpstream, openai_error, rate_limited, stream

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Locator, Page, Response

    from tests.browser import PageLog
    from tests.conftest import Service
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


class Pages:
    """Browser contexts opened by one test, and what their pages did that a page must never do.

    Each `open` gets a fresh context (no storage shared with other tests), a desktop-sized
    viewport unless told otherwise, listeners feeding `page_log`, CSP and dialog records, and
    `init_scripts` run in every document before the page's own scripts.
    """

    def __init__(self, browser: Browser, log: PageLog, init_scripts: Sequence[str] = ()) -> None:
        self.browser = browser
        self.log = log
        self.init_scripts = [CSP_RECORDER, *init_scripts]
        self.csp_violations: list[str] = []
        self.dialogs: list[str] = []
        self._contexts = []

    def open(self, url: str, **context_options: object) -> Page:
        context = self.browser.new_context(**{"viewport": DESKTOP, **context_options})
        self._contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        context.on("request", self.log.on_request)
        context.on("requestfailed", self.log.on_request_failed)
        context.on("response", self.log.on_response)
        context.expose_function("__reportCspViolation", self._on_csp_violation)
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

    page.reload()  # the partial answer was kept with the conversation
    expect(answer_body(page)).to_have_text("Once upon a")
    expect(page.locator(".message-note")).to_have_text("Stopped.")
    pages.assert_clean()


def test_regenerate_sends_the_same_question_again(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(text="The first answer."), stream(text="The second answer."))
    page = pages.open(service.url)
    ask(page, "Give me a name for a cat.")
    wait_for_answer(page, "The first answer.")

    page.locator(".regenerate").click()

    wait_for_answer(page, "The second answer.")
    first, second = (request.json["messages"] for request in chat_requests(upstream, 2))
    assert first == second == [{"role": "user", "content": "Give me a name for a cat."}]
    expect(page.locator(".message--assistant")).to_have_count(1)
    expect(page.locator(".message--user")).to_have_count(1)
    pages.assert_clean()


def test_edit_and_resend_replaces_the_last_question(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(text="Frnace is not a country."), stream(text="Paris."))
    page = pages.open(service.url)
    ask(page, "What is the capital of Frnace?")
    wait_for_answer(page, "Frnace is not a country.")

    page.locator(".edit-message").click()
    expect(page.locator("#edit-banner")).to_be_visible()
    expect(page.locator("#question")).to_have_value("What is the capital of Frnace?")
    page.locator("#question").fill("What is the capital of France?")
    page.locator("#question").press("Enter")

    wait_for_answer(page, "Paris.")
    edited = chat_requests(upstream, 2)[1].json["messages"]
    assert edited == [{"role": "user", "content": "What is the capital of France?"}]
    expect(page.locator(".message--user .message-body")).to_have_text(
        ["What is the capital of France?"]
    )
    expect(page.locator("#edit-banner")).to_be_hidden()
    pages.assert_clean()


def test_conversations_survive_a_reload(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(text="Bees dance to say where the flowers are."))
    page = pages.open(service.url)
    ask(page, "Why do bees dance?")
    wait_for_answer(page, "Bees dance to say where the flowers are.")

    page.reload()
    expect(page.locator("#conversation-list .conversation-open")).to_have_text(
        ["Why do bees dance?"]
    )
    expect(page.locator(".message--user .message-body")).to_have_text(["Why do bees dance?"])
    expect(answer_body(page)).to_have_text("Bees dance to say where the flowers are.")

    page.locator("#new-chat").click()
    expect(page.locator(".message")).to_have_count(0)
    page.locator("#conversation-list .conversation-open").click()
    expect(page.locator("#conversation-title")).to_have_text("Why do bees dance?")
    expect(answer_body(page)).to_have_text("Bees dance to say where the flowers are.")

    page.locator("#conversation-list .conversation-delete").click()
    expect(page.locator("#conversation-list .conversation-open")).to_have_count(0)
    page.reload()
    expect(page.locator("#conversation-list .conversation-open")).to_have_count(0)
    pages.assert_clean()


def test_the_token_dialog_asks_once_and_the_token_is_sent_as_bearer(
    pages: Pages, service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    token = "tok-pages-7d3e9b1c5a2f"
    service = service_factory(ACCESS_TOKENS=f"pages:{token}")
    page = pages.open(service.url)
    sent: list[tuple[str | None, int]] = []  # (Authorization, status) of each POST /chat

    def record(response: Response) -> None:
        if urlsplit(response.url).path == "/chat":
            sent.append((response.request.headers.get("authorization"), response.status))

    page.on("response", record)

    ask(page, "Who am I?")
    dialog = page.locator("dialog#token-dialog[open]")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#token-dialog-refused")).to_be_hidden()
    page.locator("#token-input").fill("tok-wrong")
    page.locator("#token-submit").click()
    expect(dialog.locator("#token-dialog-refused")).to_be_visible()  # asked again, refused
    page.locator("#token-input").fill(token)
    page.locator("#token-submit").click()

    wait_for_answer(page, upstream.reply_text)
    expect(page.locator("dialog#token-dialog[open]")).to_have_count(0)
    assert sent == [(None, 401), ("Bearer tok-wrong", 401), (f"Bearer {token}", 200)]
    (request,) = chat_requests(upstream, 1)
    assert request.bearer == FAKE_KEY
    assert token not in str(request.headers) and token.encode() not in request.body
    assert page.evaluate("localStorage.getItem('chatproxy.accessToken')") == token

    page.reload()  # remembered: the next question goes through without asking
    ask(page, "And now?")
    expect(page.locator(".message--assistant")).to_have_count(2)
    wait_for_answer(page, upstream.reply_text)
    expect(page.locator("dialog#token-dialog[open]")).to_have_count(0)
    assert sent[-1] == (f"Bearer {token}", 200)
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
    expect(answer.locator(".regenerate")).to_have_text("重新生成")
    expect(answer.locator(".copy-answer")).to_have_text("复制")
    expect(page.locator(".edit-message")).to_have_text("编辑并重发")
    screenshot(page, "chat-zh-CN.png")

    page.locator("#lang-switch").select_option("en")
    expect(page.locator("#send-button")).to_have_text("Send")
    expect(answer.locator(".regenerate")).to_have_text("Regenerate")
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
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"with the drawer open the page is {width} px wide"

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

    page.locator(".regenerate").click()  # once the limit is over, the same question goes again
    wait_for_answer(page, upstream.reply_text)
    expect(page.locator(".message-error")).to_have_count(0)
    pages.assert_clean()  # the 429 was shown in the page, not in an alert()


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
