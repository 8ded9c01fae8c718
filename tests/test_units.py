"""Fast in-process tests of the pieces the contract rests on: settings, the key pool, SSE
parsing, strict JSON, `Retry-After`, the paced relay and log redaction."""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from requests.structures import CaseInsensitiveDict

from app import create_app
from app.errors import ApiError
from app.jsonbody import MAX_DEPTH, parse_json
from app.keypool import KeyPool, mask_key, redact
from app.limits import WindowCounts
from app.logs import JsonFormatter, RedactingFilter
from app.relay import IDLE, pace
from app.settings import DEFAULT_V1_ALLOWED_PATHS, ConfigError, load_settings
from app.sse import Event, EventReader
from app.upstream import retry_after_seconds

KEY = "sk-test-UNITKEY-0123456789abcdef"


# --- settings ----------------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    settings = load_settings({})

    assert settings.api_keys == ()
    assert not settings.upstream_configured
    assert settings.base_url == "https://api.openai.com/v1"
    assert settings.default_model == "gpt-4o-mini"
    assert settings.allowed_models == ()
    assert settings.system_prompt == ""
    assert settings.connect_timeout == 10
    assert settings.read_timeout == 120
    assert settings.retries == 2
    assert settings.max_stream_seconds == 900
    assert dict(settings.proxies) == {}
    assert dict(settings.access_tokens) == {}
    assert settings.cors_origins == ("*",)
    assert settings.rate_limit == "60/minute"
    assert settings.daily_token_budget == 0
    assert settings.ratelimit_storage_uri == "memory://"
    assert settings.database_url == "sqlite:///instance/chatproxy.db"
    assert settings.allow_open_access is False
    assert settings.trust_proxy_headers == 0
    assert settings.max_request_bytes == 8388608
    assert settings.log_level == "INFO"
    assert settings.log_format == "text"


def test_settings_take_no_value_from_the_process_environment_when_given_one(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_MODEL", "from-process")

    assert load_settings({}).default_model == "gpt-4o-mini"


def test_several_keys_form_a_pool_in_order_without_repeats() -> None:
    settings = load_settings({"OPENAI_API_KEY": " sk-one , sk-two,sk-one,, sk-three "})

    assert settings.api_keys == ("sk-one", "sk-two", "sk-three")
    assert settings.upstream_configured


def test_keys_are_not_in_the_settings_repr() -> None:
    settings = load_settings({"OPENAI_API_KEY": KEY, "ACCESS_TOKENS": "alice:tok-alice-123"})

    assert KEY not in repr(settings)
    assert "tok-alice-123" not in repr(settings)
    assert set(settings.secrets) == {KEY, "tok-alice-123"}


def test_base_url_loses_its_trailing_slash() -> None:
    assert load_settings({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1/"}).base_url == (
        "http://127.0.0.1:11434/v1"
    )


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        ("gpt-4o", True),
        ("gpt-4o-mini", True),
        ("o3-mini", True),
        ("gpt-4.1", False),
        ("o3", False),
        ("GPT-4O", False),
    ],
)
def test_allowed_models_are_names_or_globs(model: str, allowed: bool) -> None:
    settings = load_settings({"ALLOWED_MODELS": "gpt-4o*, o3-mini"})

    assert settings.model_allowed(model) is allowed


def test_no_allowed_models_means_any() -> None:
    assert load_settings({}).model_allowed("anything-at-all")


def test_access_tokens_map_tokens_to_names() -> None:
    settings = load_settings({"ACCESS_TOKENS": "alice:tok-alice-123, bob:tok-bob-456"})

    assert dict(settings.access_tokens) == {"tok-alice-123": "alice", "tok-bob-456": "bob"}


def test_a_bare_token_is_named_client_and_8_hex_of_its_sha256() -> None:
    settings = load_settings({"ACCESS_TOKENS": "alice:tok-alice-123,tok-bare-456"})

    expected = "client-" + hashlib.sha256(b"tok-bare-456").hexdigest()[:8]
    assert settings.access_tokens["tok-bare-456"] == expected
    assert settings.access_tokens["tok-alice-123"] == "alice"


@pytest.mark.parametrize("value", ["a:", ":tok-x", "a:t1,a:t2", "a:t,b:t", "t,t", "a:t1,,b:t2"])
def test_malformed_access_tokens_are_refused(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"ACCESS_TOKENS": value})

    assert refused.value.variable == "ACCESS_TOKENS"
    assert "ACCESS_TOKENS" in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("UPSTREAM_TIMEOUT", "abc"),
        ("UPSTREAM_TIMEOUT", "-1"),
        ("UPSTREAM_TIMEOUT", "nan"),
        ("UPSTREAM_CONNECT_TIMEOUT", "0"),
        ("UPSTREAM_RETRIES", "x"),
        ("UPSTREAM_RETRIES", "-1"),
        ("MAX_STREAM_SECONDS", "inf"),
        ("RATE_LIMIT", "lots"),
        ("OPENAI_BASE_URL", "ftp://x"),
        ("OPENAI_BASE_URL", "not a url"),
        ("OPENAI_BASE_URL", "http://"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("MAX_REQUEST_BYTES", "0"),
        ("DAILY_TOKEN_BUDGET", "some"),
        ("ALLOW_OPEN_ACCESS", "maybe"),
        ("RATELIMIT_STORAGE_URI", "memcached://x"),
        ("MODEL_PRICES", "/nonexistent.json"),
    ],
)
def test_unusable_values_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({variable: value})

    assert refused.value.variable == variable
    assert str(refused.value).startswith(variable)
    assert "\n" not in str(refused.value)


def test_model_prices_are_read_from_a_json_file(tmp_path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-x": {"prompt": 0.5, "completion": 1.5}}))

    settings = load_settings({"MODEL_PRICES": str(prices)})

    assert settings.model_prices["gpt-x"].prompt == 0.5
    assert settings.model_prices["gpt-x"].completion == 1.5


def test_an_http_proxy_is_used_for_an_http_upstream_unless_no_proxy_names_it() -> None:
    environ = {"OPENAI_BASE_URL": "http://10.9.8.7:8080/v1", "HTTP_PROXY": "http://proxy:3128"}

    assert dict(load_settings(environ).proxies) == {"http": "http://proxy:3128"}
    assert dict(load_settings({**environ, "NO_PROXY": "10.9.8.7"}).proxies) == {}
    assert dict(load_settings({**environ, "HTTP_PROXY": "", "HTTPS_PROXY": "x"}).proxies) == {}


def test_an_https_proxy_is_used_for_an_https_upstream() -> None:
    settings = load_settings({"HTTPS_PROXY": "http://proxy:3128", "HTTP_PROXY": "http://other:1"})

    assert dict(settings.proxies) == {"https": "http://proxy:3128"}


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "models", True),
        ("GET", "models/gpt-4o", True),
        ("GET", "models/a/b", False),
        ("DELETE", "models/gpt-4o", False),
        ("POST", "chat/completions", True),
        ("GET", "chat/completions", False),
        ("GET", "chat/completions/chatcmpl-123", False),
        ("POST", "completions", True),
        ("POST", "embeddings", True),
        ("POST", "moderations", True),
        ("POST", "responses", True),
        ("GET", "responses/resp_123", False),
        ("POST", "images/generations", True),
        ("POST", "images/edits", True),
        ("POST", "images/variations", True),
        ("POST", "audio/speech", True),
        ("POST", "audio/transcriptions", True),
        ("POST", "audio/translations", True),
        ("GET", "files", False),
        ("POST", "files", False),
        ("GET", "batches", False),
        ("GET", "assistants", False),
        ("POST", "fine_tuning/jobs", False),
        ("GET", "organization/usage", False),
        ("POST", "chat/completionsX", False),
        ("POST", "xchat/completions", False),
    ],
)
def test_default_v1_paths_are_the_stateless_inference_paths(
    method: str, path: str, allowed: bool
) -> None:
    settings = load_settings({})

    assert settings.v1_allowed_paths == DEFAULT_V1_ALLOWED_PATHS
    assert settings.v1_path_allowed(method, path) is allowed


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "files", False),
        ("GET", "files/file-1", True),
        ("DELETE", "files/file-1", True),
        ("GET", "files/file-1/content", True),
        ("GET", "batches/batch_1", True),
        ("POST", "batches/batch_1", False),
        ("GET", "batches/batch_1/cancel", False),
        ("POST", "chat/completions", True),
        ("GET", "models", False),
    ],
)
def test_v1_allowed_paths_rules_are_method_and_glob(method: str, path: str, allowed: bool) -> None:
    settings = load_settings(
        {"V1_ALLOWED_PATHS": "/files/**, get batches/*, POST chat/completions"}
    )

    assert settings.v1_path_allowed(method, path) is allowed


@pytest.mark.parametrize("rules", ["FETCH models", "GET /", "/"])
def test_unusable_v1_allowed_paths_are_refused(rules: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"V1_ALLOWED_PATHS": rules})

    assert refused.value.variable == "V1_ALLOWED_PATHS"


# --- key pool ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_used_in_turn() -> None:
    pool = KeyPool(["k1", "k2", "k3"], clock=Clock())

    assert [pool.choose() for _ in range(7)] == ["k1", "k2", "k3", "k1", "k2", "k3", "k1"]
    assert len(pool) == 3


def test_a_resting_key_is_skipped_until_its_rest_ends() -> None:
    clock = Clock()
    pool = KeyPool(["k1", "k2", "k3"], clock=clock)
    pool.rest("k2", 30)

    assert [pool.choose() for _ in range(4)] == ["k1", "k3", "k1", "k3"]
    clock.now += 30
    assert {pool.choose() for _ in range(3)} == {"k1", "k2", "k3"}


def test_a_retired_key_is_never_used_while_another_is_fresh() -> None:
    clock = Clock()
    pool = KeyPool(["k1", "k2"], clock=clock)
    pool.retire("k1")
    clock.now += 10**9

    assert {pool.choose() for _ in range(5)} == {"k2"}
    assert not pool.has_fresh_key(exclude={"k2"})
    assert pool.has_fresh_key(exclude=())


def test_excluded_keys_are_skipped() -> None:
    pool = KeyPool(["k1", "k2", "k3"], clock=Clock())

    assert {pool.choose(exclude={"k1", "k3"}) for _ in range(4)} == {"k2"}


def test_when_every_key_rests_the_one_whose_rest_ends_first_is_used() -> None:
    clock = Clock()
    pool = KeyPool(["k1", "k2", "k3"], clock=clock)
    pool.rest("k1", 50)
    pool.rest("k2", 5)
    pool.retire("k3")

    assert not pool.has_fresh_key(exclude=())
    assert pool.choose() == "k2"
    assert pool.choose(exclude={"k2"}) == "k1"


def test_a_shorter_rest_does_not_cut_a_longer_one() -> None:
    clock = Clock()
    pool = KeyPool(["k1", "k2"], clock=clock)
    pool.rest("k1", 60)
    pool.rest("k1", 1)
    clock.now += 2

    assert {pool.choose() for _ in range(4)} == {"k2"}


def test_an_empty_pool_cannot_choose() -> None:
    pool = KeyPool([])

    assert len(pool) == 0
    with pytest.raises(LookupError):
        pool.choose()


def test_a_masked_key_shows_at_most_its_prefix_and_last_four() -> None:
    assert mask_key(KEY) == "sk-…cdef"
    assert mask_key("abcdefghijklmnop") == "…mnop"
    assert mask_key("short") == "…"


def test_redact_replaces_every_secret_with_its_masked_form() -> None:
    text = f"key={KEY}; again {KEY}; token tok-alice-123 end"

    redacted = redact(text, [KEY, "tok-alice-123", ""])

    assert KEY not in redacted and "tok-alice-123" not in redacted
    assert redacted == "key=sk-…cdef; again sk-…cdef; token …-123 end"


# --- SSE reading ---------------------------------------------------------------------------------

STREAM = (
    b": a comment\n"
    b"event: start\n"
    b'data: {"model":"m"}\n'
    b"\n"
    b"data: line one\n"
    b"data: line two\n"
    b"\n"
    b": ping\n\n"
    b"data:no space\n"
    b"id: 7\n"
    b"retry: 10\n"
    b"\n"
    b'data: {"text":"\xe4\xbd\xa0\xe5\xa5\xbd"}\n'
    b"\n"
    b"data: [DONE]\n\n"
)
EVENTS = [
    Event("start", '{"model":"m"}'),
    Event("message", "line one\nline two"),
    Event("message", "no space"),
    Event("message", '{"text":"你好"}'),
    Event("message", "[DONE]"),
]


def feed_all(reader: EventReader, *pieces: bytes) -> list[Event]:
    return [event for piece in pieces for event in reader.feed(piece)]


def test_events_are_read_whole() -> None:
    assert feed_all(EventReader(), STREAM) == EVENTS


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_events_survive_a_split_at_every_byte(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    for cut in range(len(stream) + 1):
        events = feed_all(EventReader(), stream[:cut], stream[cut:])
        assert events == EVENTS, f"split at {cut}: {stream[:cut]!r}"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_events_survive_being_fed_one_byte_at_a_time(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)

    events = feed_all(EventReader(), *(stream[i : i + 1] for i in range(len(stream))))

    assert events == EVENTS


def test_line_endings_may_be_mixed() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r\n"

    assert feed_all(EventReader(), stream) == [Event("message", "a\nb\nc"), Event("message", "d")]


def test_an_event_ended_by_cr_cr_is_given_at_once() -> None:
    """A CR ends a line; the parser must not wait for a possible LF before giving the event."""
    reader = EventReader()

    assert feed_all(reader, b"data: x\r\r") == [Event("message", "x")]
    assert reader.at_boundary


def test_a_crlf_split_between_feeds_is_one_line_end() -> None:
    reader = EventReader()

    assert feed_all(reader, b"data: a\r") == []
    assert feed_all(reader, b"\ndata: b\r\n\r\n") == [Event("message", "a\nb")]


def test_comments_and_unknown_fields_make_no_event() -> None:
    reader = EventReader()

    assert feed_all(reader, b": ping\n\n:\n\nfoo: bar\n\nid: 3\n\n") == []
    assert reader.at_boundary


def test_empty_data_field_makes_an_event_with_empty_data() -> None:
    assert feed_all(EventReader(), b"data\n\n") == [Event("message", "")]


@pytest.mark.parametrize(
    ("fed", "boundary"),
    [
        (b"", True),
        (b"data: x", False),
        (b"data: x\n", False),
        (b"event: e\n", False),
        (b"data: x\n\n", True),
        (b": ping\n\n", True),
        (b": ping", False),
        (b"data: x\n\ndata: y", False),
        (b"data: x\r\n\r\n", True),
    ],
)
def test_at_boundary_only_between_events(fed: bytes, boundary: bool) -> None:
    reader = EventReader()
    feed_all(reader, fed)

    assert reader.at_boundary is boundary


def test_invalid_utf8_in_an_event_does_not_raise() -> None:
    [event] = feed_all(EventReader(), b"data: \xff\xfe ok\n\n")

    assert event.data.endswith(" ok")


# --- strict JSON -----------------------------------------------------------------------------------


def assert_invalid_json(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as refused:
        parse_json(raw)
    assert refused.value.code == "invalid_json"
    assert refused.value.status == 400
    return refused.value


def test_plain_json_is_parsed() -> None:
    assert parse_json(b'{"model": "gpt-4o", "n": [1, 2.5, null, true], "s": "\\u00e9"}') == {
        "model": "gpt-4o",
        "n": [1, 2.5, None, True],
        "s": "é",
    }


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "a", "model": "b"}',
        b'{"outer": {"k": 1, "k": 2}}',
        b'[{"x": 1}, {"y": 1, "y": 1}]',
    ],
)
def test_duplicate_keys_are_refused(raw: bytes) -> None:
    error = assert_invalid_json(raw)

    assert "repeats" in error.message or "duplicate" in error.message.lower()


@pytest.mark.parametrize(
    "raw",
    [b'{"temperature": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}', b"[NaN]", b"NaN"],
)
def test_nan_and_infinity_are_refused(raw: bytes) -> None:
    assert_invalid_json(raw)


def test_nesting_up_to_the_limit_is_accepted() -> None:
    depth = MAX_DEPTH
    assert parse_json(b"[" * depth + b"]" * depth) is not None


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000, 200_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    assert_invalid_json(b"[" * depth + b"]" * depth)
    assert_invalid_json(b'{"a":' * depth + b"1" + b"}" * depth)


def test_a_value_inside_the_deepest_allowed_object_is_one_level_too_many() -> None:
    assert parse_json(b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1)) is not None
    assert_invalid_json(b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    raw = json.dumps({"content": "[{" * 500, "messages": [{"role": "user"}]}).encode()

    assert parse_json(raw)["content"] == "[{" * 500


@pytest.mark.parametrize(
    "raw",
    [b'{"input": "\xff"}', b'{"input": "\xc3"}', b'{"input": "\xed\xa0\x80"}', b"\xef\xbb"],
)
def test_invalid_utf8_is_refused(raw: bytes) -> None:
    assert_invalid_json(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1,}', b"{'a': 1}", b'{"a": 1} x'])
def test_unparsable_json_is_refused(raw: bytes) -> None:
    assert_invalid_json(raw)


# --- rate limit counters ----------------------------------------------------------------------------


def test_a_window_counter_starts_again_once_its_window_has_ended() -> None:
    counts = WindowCounts()

    assert [counts.incr("open", 60), counts.incr("open", 60)] == [1, 2]
    assert [counts.incr("ended", 0), counts.incr("ended", 0)] == [1, 1]
    assert (counts.get("open"), counts.get("ended")) == (2, 0)


def test_ended_windows_are_dropped_from_memory() -> None:
    counts = WindowCounts(sweep_every=0)
    for key in ("a", "b", "c"):
        counts.incr(key, 0)

    counts.incr("open", 60)

    assert counts.reset() == 1  # only "open" was still held


def test_the_allowance_is_counted_under_the_keys_flask_limiter_used(tmp_path) -> None:
    """Instances before and after the change share one count in Redis."""
    settings = load_settings(
        {"RATE_LIMIT": "5/minute", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    )
    app = create_app(settings)

    with app.test_client() as client:
        response = client.get("/v1/models")

    assert response.headers["X-RateLimit-Remaining"] == "4"
    storage = app.extensions["rate_limits"].storage
    assert storage.get("LIMITER/chatgpt-proxy/127.0.0.1/global/5/1/minute") == 1


# --- Retry-After -------------------------------------------------------------------------------------


def headers(**values: str) -> CaseInsensitiveDict:
    return CaseInsensitiveDict({name.replace("_", "-"): value for name, value in values.items()})


def test_retry_after_in_seconds() -> None:
    assert retry_after_seconds(headers(Retry_After="7")) == 7
    assert retry_after_seconds(headers(retry_after="0")) == 0


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)

    assert 27 <= retry_after_seconds(headers(Retry_After=when)) <= 31


def test_retry_after_in_the_past_is_no_wait() -> None:
    when = email.utils.formatdate(time.time() - 3600, usegmt=True)

    assert retry_after_seconds(headers(Retry_After=when)) == 0


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert retry_after_seconds(headers(retry_after_ms="1500", retry_after="9")) == 1.5


def test_garbage_retry_after_ms_falls_back_to_retry_after() -> None:
    assert retry_after_seconds(headers(retry_after_ms="soon", retry_after="4")) == 4


def test_no_retry_after_is_none() -> None:
    assert retry_after_seconds(headers()) is None


@pytest.mark.parametrize("value", ["soon", "", "1 2", "nan", "inf", "Thu, 99 Foo 2024"])
def test_garbage_retry_after_is_none(value: str) -> None:
    assert retry_after_seconds(headers(Retry_After=value)) is None


@pytest.mark.parametrize("value", ["nan", "inf", "later"])
def test_garbage_retry_after_ms_alone_is_none(value: str) -> None:
    assert retry_after_seconds(headers(retry_after_ms=value)) is None


def test_a_negative_retry_after_is_no_wait() -> None:
    assert retry_after_seconds(headers(Retry_After="-5")) == 0


# --- pace --------------------------------------------------------------------------------------------


class Source:
    """An upstream body whose chunks a test releases one at a time."""

    def __init__(self) -> None:
        self.release = threading.Semaphore(0)
        self.stopped = threading.Event()
        self.planned: list[bytes | BaseException] = []

    def __iter__(self) -> Iterator[bytes]:
        for item in self.planned:
            while not self.release.acquire(timeout=0.01):
                if self.stopped.is_set():
                    return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self.stopped.set()


def test_pace_yields_idle_while_silent_then_the_chunk() -> None:
    source = Source()
    source.planned = [b"one", b"two"]
    paced = pace(iter(source), idle_every=0.05, max_seconds=10, on_stop=source.stop)

    assert next(paced) is IDLE
    assert next(paced) is IDLE
    source.release.release()
    items = [next(paced)]
    while items[-1] is IDLE:
        items.append(next(paced))
    assert items[-1] == b"one"
    source.release.release()
    rest = [item for item in paced if item is not IDLE]
    assert rest == [b"two"]
    assert source.stopped.is_set()


def test_pace_passes_chunks_on_without_idle_when_they_come_quickly() -> None:
    stops = []

    paced = pace(
        iter([b"a", b"b", b"c"]), idle_every=5, max_seconds=10, on_stop=lambda: stops.append(1)
    )

    assert list(paced) == [b"a", b"b", b"c"]
    assert stops == [1]


def test_pace_ends_a_relay_that_outlasts_max_seconds() -> None:
    source = Source()
    source.planned = [b"never"]
    started = time.monotonic()
    paced = pace(iter(source), idle_every=0.05, max_seconds=0.3, on_stop=source.stop)

    with pytest.raises(ApiError) as ended:
        for _ in paced:
            pass

    assert ended.value.code == "upstream_timeout"
    assert ended.value.status == 504
    assert 0.25 <= time.monotonic() - started < 2
    assert source.stopped.is_set()


@pytest.mark.parametrize(
    "failure",
    [ApiError("upstream_unreachable", "broke"), ValueError("bad chunk"), OSError("reset")],
)
def test_pace_reraises_what_reading_raised_in_the_caller(failure: Exception) -> None:
    source = Source()
    source.planned = [b"first", failure]
    source.release.release()
    source.release.release()
    paced = pace(iter(source), idle_every=0.05, max_seconds=10, on_stop=source.stop)
    seen = []

    with pytest.raises(type(failure)) as raised:
        for item in paced:
            seen.append(item)

    assert raised.value is failure
    assert [item for item in seen if item is not IDLE] == [b"first"]
    assert source.stopped.is_set()


def test_pace_stops_the_reader_when_the_caller_stops() -> None:
    source = Source()
    source.planned = [b"x", b"never"]
    source.release.release()
    paced = pace(iter(source), idle_every=0.05, max_seconds=10, on_stop=source.stop)

    item = next(paced)
    while item is IDLE:
        item = next(paced)
    paced.close()

    assert item == b"x"
    assert source.stopped.is_set()


# --- log redaction -----------------------------------------------------------------------------------


@pytest.fixture
def captured_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter([KEY, "tok-alice-123"]))
    logger = logging.getLogger("chatproxy.test-units")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.handlers[:] = []


def test_a_key_in_a_log_message_is_masked(captured_log) -> None:
    logger, stream = captured_log

    logger.info("calling upstream with %s and token %s", KEY, "tok-alice-123")
    logger.warning(f"inline {KEY}")

    text = stream.getvalue()
    assert KEY not in text and "tok-alice-123" not in text
    assert "calling upstream with sk-…cdef and token …-123" in text
    assert "inline sk-…cdef" in text


def test_a_key_in_an_exception_traceback_is_masked(captured_log) -> None:
    logger, stream = captured_log

    def fail() -> None:
        raise RuntimeError(f"Incorrect API key provided: {KEY}")

    try:
        fail()
    except RuntimeError:
        logger.exception("upstream failed")

    text = stream.getvalue()
    assert "Traceback" in text and "RuntimeError" in text
    assert KEY not in text
    assert "sk-…cdef" in text


def test_a_key_in_a_chained_exception_is_masked(captured_log) -> None:
    logger, stream = captured_log

    try:
        try:
            raise ValueError(f"inner {KEY}")
        except ValueError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError:
        logger.error("failed", exc_info=True)

    assert KEY not in stream.getvalue()
    assert "inner sk-…cdef" in stream.getvalue()


def test_the_json_format_is_redacted_too() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter([KEY]))
    record = logging.LogRecord("chatproxy", logging.ERROR, __file__, 1, "key %s", (KEY,), None)
    try:
        raise RuntimeError(KEY)
    except RuntimeError:
        record.exc_info = sys.exc_info()

    handler.handle(record)

    line = stream.getvalue().strip()
    assert KEY not in line
    entry = json.loads(line)
    assert entry["message"] == "key sk-…cdef"
    assert "sk-…cdef" in entry["exception"]
