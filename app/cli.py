"""The terminal client, `chatgpt-proxy`: `ask` one question, or `chat` in a stored conversation.

A client of a running service that talks to it over HTTP only (`/chat` and
`/chat/conversations`): it needs none of the server's configuration, and never its database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import quote, urlsplit

import requests
from rich.cells import cell_len
from rich.console import Console
from rich.markdown import Markdown

DEFAULT_URL = "http://127.0.0.1:8000"
URL_VARIABLE = "CHATGPT_PROXY_URL"
TOKEN_VARIABLE = "CHATGPT_PROXY_TOKEN"
CONNECT_TIMEOUT = 10
# A stream carries `: ping` while the upstream is silent; a whole answer may take the service's
# UPSTREAM_TIMEOUT (120 s by default) with its retries inside it.
READ_TIMEOUT = 180
HISTORY_FILE = Path("~/.chatgpt_proxy_history")
HISTORY_LENGTH = 1000
LISTED = 20  # conversations shown by /list
SHOWN_ON_SWITCH = 4  # messages shown when switching to a conversation
EXIT_OK, EXIT_SERVICE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
REFUSED_TOKEN = f"the service refused the access token — pass --token or set {TOKEN_VARIABLE}"
# C0 and C1 control characters but tab and newline: model output must not drive the terminal.
CONTROLS = dict.fromkeys(
    code for code in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(code) not in "\t\n"
)
CHAT_HELP = """\
/new          start a new conversation
/list         your conversations, most recent first
/switch N     continue conversation N of /list (or give its id)
/title TEXT   rename the current conversation
/exit         leave (Ctrl-D too); Ctrl-C stops an answer, or leaves at the prompt"""


class ServiceError(Exception):
    """A failure of the service, or of reaching it, told in plain words (exit code 1)."""


class UsageError(Exception):
    """A command line that cannot be used (exit code 2)."""


@dataclass(frozen=True)
class Options:
    """What every turn sends besides the message."""

    model: str | None = None
    system: str | None = None
    stream: bool = True


class Client:
    """The service's conversation API, over one `requests.Session`."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"chatgpt-proxy-cli/{_version()}"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def stream(
        self, message: str, conversation_id: str | None, options: Options
    ) -> Iterator[tuple[str, dict]]:
        """The answer's events as they arrive: `start`, `delta`…, `done`; an `error` event
        or a stream that ends before `done` raises ServiceError."""
        body = {**_turn(message, conversation_id, options), "stream": True}
        response = self._request(
            "POST", "/chat", json=body, stream=True, headers={"Accept": "text/event-stream"}
        )
        try:
            if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                raise ServiceError(f"the service at {self.url} did not answer with an event stream")
            for name, data in read_events(response.iter_content(chunk_size=None)):
                payload = _json_event(name, data)
                if name == "error":
                    raise ServiceError(f"the answer was cut short: {_error_text(payload)}")
                yield name, payload
                if name == "done":
                    return
        except requests.RequestException:
            pass  # a cut connection or a silence: the same for the reader as an early end
        finally:
            response.close()
        raise ServiceError("the answer was cut short: the connection ended before the answer did")

    def reply(self, message: str, conversation_id: str | None, options: Options) -> dict:
        """The whole answer at once (`--no-stream`)."""
        body = {**_turn(message, conversation_id, options), "stream": False}
        return self._json("POST", "/chat", json=body)

    def conversations(self, limit: int = LISTED) -> list[dict]:
        listing = self._json("GET", "/chat/conversations", params={"limit": limit}).get("data")
        if not isinstance(listing, list):
            raise ServiceError(f"the service at {self.url} listed no conversations")
        return listing

    def conversation(self, conversation_id: str) -> dict:
        return self._json("GET", f"/chat/conversations/{quote(conversation_id, safe='')}")

    def rename(self, conversation_id: str, title: str) -> dict:
        path = f"/chat/conversations/{quote(conversation_id, safe='')}"
        return self._json("PATCH", path, json={"title": title})

    def _json(self, method: str, path: str, **kwargs) -> dict:
        response = self._request(method, path, **kwargs)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise ServiceError(f"the service at {self.url} answered {path} with something not JSON")
        return payload

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        """A response with a 2xx status; anything else raises ServiceError saying why."""
        try:
            response = self.session.request(
                method, self.url + path, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs
            )
        except requests.ConnectTimeout:
            raise ServiceError(
                f"cannot reach the service at {self.url} (no answer within {CONNECT_TIMEOUT} s)"
            ) from None
        except requests.ConnectionError as exc:
            raise ServiceError(f"cannot reach the service at {self.url}{_reason(exc)}") from None
        except requests.Timeout:
            raise ServiceError(
                f"the service at {self.url} sent nothing for {READ_TIMEOUT} s"
            ) from None
        if not response.ok:
            error = service_error(response, self.url)
            response.close()
            raise error
        return response


def service_error(response: requests.Response, url: str) -> ServiceError:
    """A refusal (§4 of the contract) in plain words."""
    status = response.status_code
    try:
        error = response.json()["error"]
        message, code = str(error.get("message") or "").strip(), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = None, None
    if status == 401:
        return ServiceError(REFUSED_TOKEN)
    if message is None:
        return ServiceError(
            f"the service at {url} answered {status} {response.reason or ''}".rstrip()
            + " without an error in the chatgpt-proxy shape — is the URL right?"
        )
    label = f"{status} {code}" if code else str(status)
    if status == 429:
        wait = _retry_after(response.headers.get("Retry-After"))
        return ServiceError(f"the service asks to slow down ({label}): {message}{wait}")
    if status >= 500:
        return ServiceError(f"the service failed ({label}): {message}")
    return ServiceError(f"the service refused the request ({label}): {message}")


def read_events(chunks: Iterable[bytes]) -> Iterator[tuple[str, str]]:
    """Server-sent events `(name, data)` from a stream's bytes, however the reads cut them;
    comments such as the `: ping` heartbeat are skipped."""
    buffer = b""
    name, data = "", []
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            if not line:
                if data:
                    yield name or "message", "\n".join(data)
                name, data = "", []
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)


class AnswerWriter:
    """Shows an answer as it arrives; on a terminal, redraws it as Markdown once it is whole."""

    def __init__(self, console: Console, markdown: bool) -> None:
        self.console = console
        self.markdown = markdown and console.is_terminal and not console.is_dumb_terminal
        self.text = ""

    def write(self, piece: str) -> None:
        piece = piece.translate(CONTROLS)
        self.text += piece
        self.console.file.write(piece)
        self.console.file.flush()

    def finish(self) -> None:
        """Replaces the streamed text by its rendering, when all of it is still on the screen
        (the rows that scrolled away cannot be rewritten; the plain text stays then)."""
        rows = _rows(self.text, self.console.width)
        if self.markdown and self.text.strip() and rows < self.console.height:
            up = f"\x1b[{rows - 1}A" if rows > 1 else ""
            self.console.file.write(f"\r{up}\x1b[J")
            self.console.print(Markdown(self.text))
        else:
            self.end_line()

    def whole(self, text: str) -> None:
        """An answer that came whole (`--no-stream`)."""
        text = text.translate(CONTROLS)
        if self.markdown and text.strip():
            self.console.print(Markdown(text))
        else:
            self.write(text)
            self.end_line()

    def end_line(self) -> None:
        if self.text and not self.text.endswith("\n"):
            self.console.file.write("\n")
        self.console.file.flush()


class Terminal:
    """Where answers, notices and errors go, and how answers are shown."""

    def __init__(self, plain: bool) -> None:
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.plain = plain

    def answer(self) -> AnswerWriter:
        return AnswerWriter(self.out, markdown=not self.plain)

    def notice(self, text: str) -> None:
        self.out.print(text, style="dim", markup=False, soft_wrap=True)

    def error(self, text: str) -> None:
        self.err.print(f"chatgpt-proxy: {text}", style="red", markup=False, soft_wrap=True)

    def waiting(self) -> AbstractContextManager:
        """A spinner while a whole answer is awaited, on a terminal only."""
        if self.out.is_terminal and not self.out.is_dumb_terminal:
            return self.out.status("waiting for the answer…")
        return nullcontext()


def answer(
    client: Client,
    terminal: Terminal,
    message: str,
    conversation_id: str | None,
    options: Options,
    started: Callable[[str | None], None] = lambda conversation_id: None,
) -> None:
    """Asks and shows the answer; `started` learns the conversation's id as soon as it is known,
    so that an answer stopped with Ctrl-C still leaves the conversation to continue."""
    writer = terminal.answer()
    if not options.stream:
        with terminal.waiting():
            reply = client.reply(message, conversation_id, options)
        started(reply.get("conversation_id"))
        writer.whole(str(reply.get("content") or ""))
        _tell_finish(terminal, reply.get("finish_reason"))
        return
    events = client.stream(message, conversation_id, options)
    try:
        for name, data in events:
            if name == "start" and data.get("conversation_id"):
                started(data["conversation_id"])
            elif name == "delta":
                writer.write(str(data.get("content") or ""))
            elif name == "done":
                writer.finish()
                _tell_finish(terminal, data.get("finish_reason"))
    except BaseException:
        writer.end_line()
        raise
    finally:
        events.close()


class ChatSession:
    """The interactive loop: one conversation at a time, and the slash commands."""

    def __init__(self, client: Client, terminal: Terminal, options: Options) -> None:
        self.client = client
        self.terminal = terminal
        self.options = options
        self.conversation_id: str | None = None
        self.listing: list[dict] = []
        self.commands: dict[str, Callable[[str], bool]] = {
            "/new": self.new,
            "/list": self.list,
            "/switch": self.switch,
            "/title": self.title,
            "/help": self.help,
            "/exit": self.exit,
            "/quit": self.exit,
        }

    def run(self) -> int:
        self.client.conversations(limit=1)  # a wrong URL or token shows now, not after typing
        self.terminal.notice(
            f"chatgpt-proxy chat · {self.client.url} · /help for commands, /exit or Ctrl-D to leave"
        )
        with _readline_history():
            while True:
                try:
                    line = input("> ").strip()
                except (EOFError, KeyboardInterrupt):
                    self.terminal.out.print()
                    return EXIT_OK
                if not line:
                    continue
                if line.startswith("/"):
                    command, _, argument = line.partition(" ")
                    if not self.command(command, argument.strip()):
                        return EXIT_OK
                else:
                    self.turn(line)

    def command(self, command: str, argument: str) -> bool:
        """Runs one slash command; False when the session should end."""
        handler = self.commands.get(command.lower())
        if handler is None:
            self.terminal.error(f"unknown command {command} — /help lists the commands")
            return True
        try:
            return handler(argument)
        except ServiceError as exc:
            self.terminal.error(str(exc))
        except KeyboardInterrupt:
            self.terminal.out.print()
        return True

    def turn(self, message: str) -> None:
        try:
            answer(
                self.client,
                self.terminal,
                message,
                self.conversation_id,
                self.options,
                started=self._started,
            )
        except ServiceError as exc:
            self.terminal.error(str(exc))
        except KeyboardInterrupt:
            self.terminal.notice("(answer stopped)")

    def _started(self, conversation_id: str | None) -> None:
        self.conversation_id = conversation_id or self.conversation_id

    def new(self, argument: str) -> bool:
        self.conversation_id = None
        self.terminal.notice("new conversation: your next message starts it")
        return True

    def list(self, argument: str) -> bool:
        self.listing = self.client.conversations()
        if not self.listing:
            self.terminal.notice("no conversations yet")
        for number, conversation in enumerate(self.listing, start=1):
            mark = "*" if conversation["id"] == self.conversation_id else " "
            count = conversation.get("message_count")
            self.terminal.out.print(
                f"{mark}{number:>3}. {_title(conversation)}"
                f"  · {count} messages · {_when(conversation.get('updated_at'))}",
                markup=False,
            )
        return True

    def switch(self, argument: str) -> bool:
        if not argument:
            self.terminal.error("/switch needs the number /list shows, e.g. /switch 2")
            return True
        if argument.isdigit():
            if not self.listing:
                self.listing = self.client.conversations()
            number = int(argument)
            if not 1 <= number <= len(self.listing):
                self.terminal.error(f"there is no conversation {number} — /list shows them")
                return True
            argument = self.listing[number - 1]["id"]
        conversation = self.client.conversation(argument)
        self.conversation_id = conversation["id"]
        messages = [m for m in conversation.get("messages", []) if m.get("role") != "system"]
        self.terminal.notice(f"continuing “{_title(conversation)}” ({len(messages)} messages)")
        for message in messages[-SHOWN_ON_SWITCH:]:
            self._show(message)
        return True

    def title(self, argument: str) -> bool:
        if not argument:
            self.terminal.error("/title needs the new title, e.g. /title Trip to Lisbon")
        elif self.conversation_id is None:
            self.terminal.error("no conversation yet: send a message first")
        else:
            renamed = self.client.rename(self.conversation_id, argument)
            self.terminal.notice(f"renamed to “{_title(renamed)}”")
        return True

    def help(self, argument: str) -> bool:
        self.terminal.out.print(CHAT_HELP, markup=False)
        return True

    def exit(self, argument: str) -> bool:
        return False

    def _show(self, message: dict) -> None:
        who = "you" if message.get("role") == "user" else message.get("role", "?")
        cut = " (cut short)" if message.get("partial") else ""
        self.terminal.out.print(f"{who}{cut}:", style="bold", markup=False)
        writer = self.terminal.answer()
        writer.whole(str(message.get("content") or ""))


def main(argv: list[str] | None = None) -> int:
    """The `chatgpt-proxy` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    terminal = Terminal(plain=args.plain)
    try:
        client = Client(_service_url(args.url), args.token)
        options = Options(model=args.model, system=args.system, stream=not args.no_stream)
        if args.command == "ask":
            question = _question(args.question)
            answer(client, terminal, question, None, options)
            return EXIT_OK
        return ChatSession(client, terminal, options).run()
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"chatgpt-proxy: {exc}\n")
    except ServiceError as exc:
        terminal.error(str(exc))
        return EXIT_SERVICE
    except KeyboardInterrupt:
        terminal.error("stopped")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `chatgpt-proxy ask … | head -1`
        sys.stdout = open(os.devnull, "w")  # so that the flush at exit is quiet
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get(URL_VARIABLE) or DEFAULT_URL,
        help=f"the service (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        default=os.environ.get(TOKEN_VARIABLE) or None,
        help=f"an access token, when the service has ACCESS_TOKENS (default: ${TOKEN_VARIABLE})",
    )
    common.add_argument("--model", help="the model (default: the service's)")
    common.add_argument("--system", help="a system prompt for a new conversation")
    common.add_argument(
        "--no-stream", action="store_true", help="wait for the whole answer instead of streaming"
    )
    common.add_argument(
        "--plain", action="store_true", help="print answers as they are, without Markdown"
    )
    parser = argparse.ArgumentParser(
        prog="chatgpt-proxy",
        description="A terminal client of a running chatgpt-proxy service.",
        epilog=(
            "examples:\n"
            '  chatgpt-proxy ask "What is a reverse proxy?"\n'
            "  git diff | chatgpt-proxy ask 'Review this change'\n"
            "  chatgpt-proxy chat --url https://gpt.example.com\n\n"
            "exit codes: 0 ok, 1 the service failed or could not be reached, 2 usage error"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    ask = commands.add_parser(
        "ask",
        parents=[common],
        help="ask one question and print the answer",
        description=(
            "Asks one question and prints the answer as it is written. The question is read "
            "from standard input when none is given or when input is piped; with both, the "
            "piped text follows the question."
        ),
    )
    ask.add_argument("question", nargs="*", help="the question (words are joined)")
    commands.add_parser(
        "chat",
        parents=[common],
        help="chat in a conversation that the service keeps",
        description="An interactive chat; the service stores the conversation.\n\n" + CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _service_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(
            f"--url (or ${URL_VARIABLE}) must be an http(s) URL such as {DEFAULT_URL}, not {url!r}"
        )
    return url


def _question(words: list[str]) -> str:
    """The question from the arguments, stdin, or both (a piped text after the question)."""
    question = " ".join(words).strip()
    if not question or not sys.stdin.isatty():
        if sys.stdin.isatty():
            print("Type the question, then Ctrl-D:", file=sys.stderr)
        piped = sys.stdin.read().strip()
        question = f"{question}\n\n{piped}" if question and piped else question or piped
    if not question:
        raise UsageError("no question: give one as an argument or on standard input")
    return question


def _turn(message: str, conversation_id: str | None, options: Options) -> dict:
    body: dict = {"message": message}
    if conversation_id:
        body["conversation_id"] = conversation_id
    elif options.system:
        body["system"] = options.system  # the service keeps it with a new conversation
    if options.model:
        body["model"] = options.model
    return body


def _json_event(name: str, data: str) -> dict:
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise ServiceError(f"the service sent a {name} event that is not a JSON object")
    return payload


def _error_text(payload: dict) -> str:
    error = payload.get("error")
    if isinstance(error, dict):
        code = f" ({error['code']})" if error.get("code") else ""
        return f"{error.get('message') or 'the service gave no reason'}{code}"
    return "the service gave no reason"


def _tell_finish(terminal: Terminal, finish_reason: str | None) -> None:
    if finish_reason == "length":
        terminal.notice("(the answer reached its length limit: --model or max tokens)")
    elif finish_reason not in (None, "stop"):
        terminal.notice(f"(the answer ended early: {finish_reason})")


def _reason(exc: requests.ConnectionError) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return " (connection refused: is it running?)"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return " (unknown host)"
    if isinstance(exc, requests.exceptions.SSLError):
        return " (TLS failed)"
    return ""


def _retry_after(value: str | None) -> str:
    """Retry-After as seconds or an HTTP date, said as a wait."""
    if not value:
        return ""
    if value.strip().isdigit():
        return f"; try again in {int(value)} s"
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return ""
    seconds = max(0, round((moment - dt.datetime.now(dt.UTC)).total_seconds()))
    return f"; try again in {seconds} s"


def _rows(text: str, width: int) -> int:
    """Terminal rows `text` takes when written from the start of a row `width` columns wide."""
    width = max(1, width)
    return sum(max(1, -(-cell_len(line.expandtabs()) // width)) for line in text.split("\n"))


def _title(conversation: dict) -> str:
    return str(conversation.get("title") or "(untitled)").translate(CONTROLS)


def _when(timestamp: str | None) -> str:
    if not timestamp:
        return ""
    try:
        moment = dt.datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M")


@contextmanager
def _readline_history() -> Iterator[None]:
    """Line editing and a history file kept across sessions, where readline exists."""
    try:
        import readline
    except ImportError:  # Windows
        yield
        return
    path = HISTORY_FILE.expanduser()
    readline.set_history_length(HISTORY_LENGTH)
    with suppress(OSError):
        readline.read_history_file(path)
    try:
        yield
    finally:
        with suppress(OSError):
            readline.write_history_file(path)


def _version() -> str:
    try:
        return metadata.version("chatgpt-proxy")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
