"""Browser fixtures: headless Debian Chromium through Playwright, and a second origin.

A test module loads them with `pytest_plugins = ["tests.browser"]` and marks its tests
`@pytest.mark.browser`; it imports names from here only under `TYPE_CHECKING`, so that pytest
imports this module first, as a plugin, and rewrites its asserts. They serve the tests of the
product's own pages (`/`, `/qa`) as well as of pages served from elsewhere that call the API:

- `browser` (session): Chromium at /usr/bin/chromium; Playwright's own browsers are never used.
  Without it every `browser`-marked test is skipped, saying why.
- `page`: a fresh context and page whose console errors, page errors and requests go to
  `page_log`; `page_log.assert_only_loopback()` fails if anything was asked of another host,
  `page_log.assert_no_errors()` if the console showed an error (CSP, CORS, a 404).
- `other_origin` (session): a static file server on 127.0.0.1 whose port makes it another
  origin than every service; `publish` puts a page or a script on it.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Error,
    Page,
    Request,
    Response,
    sync_playwright,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
# Long enough for a loaded CI machine, short enough that a hang fails the test quickly.
TIMEOUT_MS = 10_000
LOOPBACK_HOST = "127.0.0.1"
# Schemes that never reach the network.
LOCAL_SCHEMES = frozenset({"data", "blob", "about"})

MISSING_CHROMIUM = f"{CHROMIUM} is missing: install Debian's chromium (`make test` does, as root)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the browser tests up front, with the reason, when there is no Chromium."""
    if CHROMIUM.exists():
        return
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.skip(reason=MISSING_CHROMIUM))


@dataclass
class PageLog:
    """What a page did: console errors, uncaught exceptions, and every request it made."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    error_responses: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def on_page_error(self, error: Error) -> None:
        self.page_errors.append(f"{error.name}: {error.message}")

    def on_request(self, request: Request) -> None:
        self.requests.append(request.url)

    def on_request_failed(self, request: Request) -> None:
        self.failed_requests.append(f"{request.method} {request.url}: {request.failure}")

    def on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.error_responses.append(f"{response.status} {response.url}")

    def summary(self) -> str:
        """For assertion messages: everything recorded, one item a line."""
        sections = {
            "console errors": self.console_errors,
            "page errors": self.page_errors,
            "failed requests": self.failed_requests,
            "error responses": self.error_responses,
            "requests": self.requests,
        }
        return "\n".join(
            f"{title}:" + "".join(f"\n  {item}" for item in items) if items else f"{title}: none"
            for title, items in sections.items()
        )

    def assert_only_loopback(self) -> None:
        """Fail if the page asked any host but 127.0.0.1 for anything (a CDN, a font, analytics)."""
        elsewhere = [
            url
            for url in self.requests
            if urlsplit(url).scheme not in LOCAL_SCHEMES and urlsplit(url).hostname != LOOPBACK_HOST
        ]
        assert not elsewhere, f"requests left {LOOPBACK_HOST}: {elsewhere}\n{self.summary()}"

    def assert_no_errors(self) -> None:
        """Fail if the page logged a console error (CSP, CORS, a 404) or threw an exception."""
        assert not self.console_errors and not self.page_errors, self.summary()


class StaticSite:
    """A threaded `http.server` on 127.0.0.1 serving one directory: another origin."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = partial(_QuietHandler, directory=str(root))
        self._server = ThreadingHTTPServer((LOOPBACK_HOST, 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="static-site",
            daemon=True,
        )

    def start(self) -> StaticSite:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def origin(self) -> str:
        """What a browser sends as `Origin` from this site's pages (for `CORS_ORIGINS`)."""
        return f"http://{LOOPBACK_HOST}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.origin}/{path.lstrip('/')}"

    def publish(self, name: str, source: Path | str | bytes) -> str:
        """Serve `source` (a file to copy, or the content itself) as `name`; returns its URL."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, target)
        elif isinstance(source, str):
            target.write_text(source, encoding="utf-8")
        else:
            target.write_bytes(source)
        return self.url(name)


class _QuietHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        """As `http.server`, but a missing favicon is no content rather than a 404 in the
        console (Chromium asks for one on every page)."""
        if self.path == "/favicon.ico" and not (Path(self.directory) / "favicon.ico").exists():
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")  # a republished file is fetched anew
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Tests read the page's own log, not an access log on stderr."""


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(MISSING_CHROMIUM)
    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()
    finally:
        playwright.stop()


@pytest.fixture
def page_log() -> PageLog:
    return PageLog()


@pytest.fixture
def page(browser: Browser, page_log: PageLog) -> Iterator[Page]:
    """A page in its own context (no cookies, cache or storage shared between tests)."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    context.on("request", page_log.on_request)
    context.on("requestfailed", page_log.on_request_failed)
    context.on("response", page_log.on_response)
    opened = context.new_page()
    opened.on("console", page_log.on_console)
    opened.on("pageerror", page_log.on_page_error)
    yield opened
    context.close()


@pytest.fixture(scope="session")
def other_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticSite]:
    site = StaticSite(tmp_path_factory.mktemp("other-origin")).start()
    yield site
    site.stop()
