"""The terminal client, `chatgpt-proxy ask` and `chatgpt-proxy chat`, driven in a real
pseudo-terminal (pexpect) against the service under gunicorn and the fake upstream."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pytest

from app.cli import read_events
from tests.conftest import Service
from tests.fake_upstream import DEFAULT_REPLY, FakeUpstream, RecordedRequest, openai_error, stream

CLI = Path(sys.executable).with_name("chatgpt-proxy")
REFUSED = "the service refused the access token — pass --token or set CHATGPT_PROXY_TOKEN"
TOKEN = "alice-secret-token-0123456789"
PROMPT = "> "


@pytest.fixture(autouse=True)
def installed() -> None:
    if not CLI.exists():
        pytest.fail(f"{CLI} is missing: install the project (pip install -e '.[test]')")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """A bare environment: no configuration of the service, nor of the client unless given."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
        **extra,
    }


def spawn(home: Path, *args: str, **env: str) -> pexpect.spawn:
    """The console script in a pseudo-terminal of 40 rows by 120 columns; `transcript` reads
    everything it wrote."""
    child = pexpect.spawn(
        str(CLI),
        list(args),
        cwd=str(home),
        env=cli_env(home, **env),
        encoding="utf-8",
        dimensions=(40, 120),
        timeout=15,
    )
    child.logfile_read = io.StringIO()
    return child


def transcript(child: pexpect.spawn) -> str:
    return child.logfile_read.getvalue()


def finish(child: pexpect.spawn) -> int:
    """Waits for the client to exit by itself; its exit code."""
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def run(home: Path, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    """The console script with piped standard streams."""
    return subprocess.run(
        [str(CLI), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=home,
        env=cli_env(home, **env),
        timeout=30,
    )


def say(child: pexpect.spawn, message: str, reply: str = DEFAULT_REPLY) -> None:
    """Types a message at the prompt and waits for the answer and the next prompt."""
    child.sendline(message)
    child.expect_exact(reply)
    child.expect_exact(PROMPT)


def contents(request: RecordedRequest) -> list[str]:
    """What the upstream received as the conversation, system prompt left out."""
    return [m["content"] for m in request.json["messages"] if m["role"] != "system"]


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


# --- Installed and usable ------------------------------------------------------------------------


def test_help_works_in_an_empty_directory_without_configuration(tmp_path: Path) -> None:
    for args in (["--help"], ["ask", "--help"], ["chat", "--help"]):
        result = subprocess.run(
            [str(CLI), *args],
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        assert "--url" in result.stdout or "COMMAND" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no database, no instance/, no .env


def test_a_usage_error_exits_2(tmp_path: Path) -> None:
    result = run(tmp_path, "ask", "--url", "localhost:8000", "hi")
    assert result.returncode == 2
    assert "must be an http(s) URL" in result.stderr
    no_traceback(result.stderr)


# --- ask ----------------------------------------------------------------------------------------


def test_ask_streams_the_answer_as_it_is_written(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.enqueue(
        stream(chunks=["alpha ", "**beta** ", "gamma ", "delta ", "omega"], interval=0.2)
    )
    child = spawn(tmp_path, "ask", "--url", service.url, "Name", "five", "letters")
    child.expect_exact("alpha")
    first_shown = time.monotonic()
    assert "omega" not in child.buffer  # the rest was not written yet
    assert finish(child) == 0
    assert time.monotonic() - first_shown >= 0.6
    # On a terminal the streamed text is redrawn as Markdown once whole: **beta** in bold.
    rendered = transcript(child).rsplit("\x1b[J", 1)[1]
    assert "beta" in rendered and "**" not in rendered
    assert contents(upstream.requests[-1]) == ["Name five letters"]


def test_plain_leaves_the_answer_as_it_was_written(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.enqueue(stream(chunks=["Some ", "**bold** ", "text"]))
    child = spawn(tmp_path, "ask", "--plain", "--url", service.url, "Hi")
    assert finish(child) == 0
    output = transcript(child)
    assert "Some **bold** text" in output and "\x1b[J" not in output


def test_events_are_read_however_the_stream_is_cut() -> None:
    stream_bytes = (
        b'event: start\ndata: {"conversation_id":"c1"}\n\n: ping\n\n'
        b'event: delta\r\ndata: {"content":"caf\xc3\xa9"}\r\n\r\n'
        b"event: done\ndata: {}\n\n"
    )
    expected = [
        ("start", '{"conversation_id":"c1"}'),
        ("delta", '{"content":"café"}'),
        ("done", "{}"),
    ]
    assert list(read_events([stream_bytes])) == expected
    one_byte_a_read = (stream_bytes[i : i + 1] for i in range(len(stream_bytes)))
    assert list(read_events(one_byte_a_read)) == expected


def test_ask_reads_a_piped_question_and_prints_plain_text(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    result = run(tmp_path, "ask", "--url", service.url, stdin="What is 2+2?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == DEFAULT_REPLY + "\n"  # no escape sequences when piped
    assert contents(upstream.requests[-1]) == ["What is 2+2?"]


def test_ask_puts_piped_text_after_the_question(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    result = run(tmp_path, "ask", "--url", service.url, "Explain:", stdin="def f(): pass\n")
    assert result.returncode == 0, result.stderr
    assert contents(upstream.requests[-1]) == ["Explain:\n\ndef f(): pass"]


def test_ask_without_streaming_prints_the_whole_answer(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    result = run(tmp_path, "ask", "--no-stream", "--model", "gpt-4o", "--url", service.url, "Hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == DEFAULT_REPLY + "\n"
    request = upstream.requests[-1].json
    assert not request.get("stream") and request["model"] == "gpt-4o"


def test_model_output_cannot_drive_the_terminal(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.enqueue(stream(chunks=["safe ", "\x1b]0;pwned\x07", "\x1b[2J", "\x9b31m", "text"]))
    child = spawn(tmp_path, "ask", "--url", service.url, "Hi")
    assert finish(child) == 0
    output = transcript(child)
    assert "safe" in output and "text" in output
    assert "\x1b]0;" not in output and "\x1b[2J" not in output and "\x9b" not in output


# --- chat ---------------------------------------------------------------------------------------


def test_chat_continues_starts_lists_and_switches_conversations(
    service_factory: Callable[..., Service], upstream: FakeUpstream, tmp_path: Path
) -> None:
    service = service_factory()  # its own database: /list shows exactly this test's two
    child = spawn(tmp_path, "chat", "--url", service.url)
    child.expect_exact("/help")
    child.expect_exact(PROMPT)

    say(child, "Remember the word apple")
    say(child, "Which word was it?")
    assert contents(upstream.requests[-1]) == [
        "Remember the word apple",
        DEFAULT_REPLY,
        "Which word was it?",
    ]

    child.sendline("/new")
    child.expect_exact("new conversation")
    child.expect_exact(PROMPT)
    say(child, "Name a colour")
    assert contents(upstream.requests[-1]) == ["Name a colour"]

    child.sendline("/list")
    child.expect(r"1\. Name a colour +· 2 messages")
    child.expect(r"2\. Remember the word apple +· 4 messages")
    child.expect_exact(PROMPT)

    child.sendline("/switch 2")
    child.expect_exact("continuing “Remember the word apple” (4 messages)")
    child.expect_exact("Which word was it?")  # its last messages are shown
    child.expect_exact(PROMPT)
    say(child, "And once more?")
    assert contents(upstream.requests[-1]) == [
        "Remember the word apple",
        DEFAULT_REPLY,
        "Which word was it?",
        DEFAULT_REPLY,
        "And once more?",
    ]

    child.sendline("/title Fruit")
    child.expect_exact("renamed to “Fruit”")
    child.sendline("/list")
    child.expect(r"\* +1\. Fruit +· 6 messages")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    assert finish(child) == 0
    no_traceback(transcript(child))


def test_ctrl_c_stops_an_answer_and_keeps_the_conversation(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.enqueue(stream(chunks=["Once ", "upon ", "a time"], hang_after=1))
    child = spawn(tmp_path, "chat", "--url", service.url)
    child.expect_exact(PROMPT)
    child.sendline("Tell me a story")
    child.expect_exact("Once")
    child.sendintr()
    child.expect_exact("(answer stopped)")
    child.expect_exact(PROMPT)
    stopped = upstream.wait_for_requests(1)[0]
    assert upstream.wait_for_close(stopped) is not None  # the service let the upstream go

    say(child, "Go on")
    history = contents(upstream.requests[-1])
    assert history[0] == "Tell me a story" and history[-1] == "Go on"

    child.sendintr()  # at the prompt: leaves
    assert finish(child) == 0
    no_traceback(transcript(child))


def test_ctrl_d_at_the_prompt_leaves(service: Service, tmp_path: Path) -> None:
    child = spawn(tmp_path, "chat", "--url", service.url)
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0


# --- Errors in plain words ----------------------------------------------------------------------


def test_a_refused_token_is_reported_in_plain_words(
    service_factory: Callable[..., Service], tmp_path: Path
) -> None:
    guarded = service_factory(ACCESS_TOKENS=f"alice:{TOKEN}")
    for command in (["ask", "hi"], ["chat"], ["chat", "--token", "not-the-token"]):
        child = spawn(tmp_path, *command, "--url", guarded.url)
        assert finish(child) == 1, command
        output = transcript(child)
        assert REFUSED in output, output
        assert "not-the-token" not in output
        no_traceback(output)

    child = spawn(tmp_path, "ask", "--url", guarded.url, "hi", CHATGPT_PROXY_TOKEN=TOKEN)
    assert finish(child) == 0
    assert DEFAULT_REPLY in transcript(child)


def test_an_unreachable_service_is_reported_in_plain_words(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_unused_port()}"
    child = spawn(tmp_path, "ask", "hi", CHATGPT_PROXY_URL=url)
    assert finish(child) == 1
    output = transcript(child)
    assert f"cannot reach the service at {url}" in output
    no_traceback(output)


def test_an_error_event_mid_answer_is_reported_after_what_came(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.enqueue(stream(chunks=["Partial ", "answer ", "never ends"], stop_after=2))
    child = spawn(tmp_path, "ask", "--url", service.url, "Hi")
    assert finish(child) == 1
    output = transcript(child)
    assert re.search(r"Partial answer\s*\r?\n.*the answer was cut short: ", output), output
    no_traceback(output)


def test_a_failing_upstream_is_reported_with_the_services_message(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.enqueue(*[openai_error(500, "boom", "server_error", type="server_error")] * 3)
    result = run(tmp_path, "ask", "--url", service.url, "Hi")
    assert result.returncode == 1
    assert "the service failed (502 upstream_bad_response): " in result.stderr
    no_traceback(result.stderr)


def test_a_rate_limit_says_when_to_try_again(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    limited = openai_error(
        429, "Slow down", "rate_limit_exceeded", "requests", headers={"retry-after-ms": "10"}
    )
    upstream.enqueue(limited, limited, limited)
    result = run(tmp_path, "ask", "--url", service.url, "Hi")
    assert result.returncode == 1
    assert re.search(
        r"asks to slow down \(429 upstream_rate_limited\): .*try again in \d+ s", result.stderr
    ), result.stderr
    no_traceback(result.stderr)


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
