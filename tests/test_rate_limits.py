"""Rate limits (CONTRACT §2 `RATE_LIMIT`, `RATELIMIT_STORAGE_URI`, `TRUST_PROXY_HEADERS`; §4
`429 rate_limit_exceeded`; §5 Redis unreachable), on real gunicorn services and a real Redis.

Each test plays its own clients — its own token names, or its own loopback source address (any
127.x.y.z reaches a service bound to 127.0.0.1) — so that tests sharing a service never spend
each other's allowance.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
import requests
from requests.adapters import HTTPAdapter

from app.settings import ConfigError, load_settings
from tests.conftest import Service, service_env
from tests.fake_upstream import FakeUpstream, answer_like_openai, delay

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

TOKENS = {
    "alice": "tok-alice-5b7e0c1d",
    "bob": "tok-bob-8f21a9e4",
    "carol": "tok-carol-1c4d7a0b",
    "dave": "tok-dave-93e0f6c2",
    "erin": "tok-erin-4a6b2d8f",
}
ACCESS_TOKENS = ",".join(f"{name}:{token}" for name, token in TOKENS.items())
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
RECOVERY_TIMEOUT = 40.0  # Flask-Limiter looks at Redis again after 1, 2, 4 … 32 s
LOG_TIMEOUT = 10.0


class SourceAddressAdapter(HTTPAdapter):
    """Connects from `address`, so that one machine plays several clients."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs) -> None:
        pool_kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def client_from(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(address))
    return session


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def assert_rate_limited(response: requests.Response) -> None:
    """Our 429 in the OpenAI shape, with `Retry-After` and the allowance headers."""
    assert response.status_code == 429, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["X-RateLimit-Remaining"] == "0"


def remaining(response: requests.Response) -> int:
    return int(response.headers["X-RateLimit-Remaining"])


def statuses(calls: list[Callable[[], requests.Response]]) -> list[int]:
    """Make the calls all at once and return their statuses."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [response.status_code for response in pool.map(lambda call: call(), calls)]


def get_models(service: Service, **kwargs) -> Callable[[], requests.Response]:
    return lambda: requests.get(f"{service.url}/v1/models", timeout=10, **kwargs)


def ready(service: Service) -> dict:
    response = requests.get(f"{service.url}/readyz", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_log(service: Service, pattern: str, count: int = 1) -> list[str]:
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        lines = [line for line in service.log_text().splitlines() if re.search(pattern, line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


class Services:
    """Services started by a test or a module, stopped together at the end: each stop waits out
    gunicorn's graceful timeout, so stopping them one by one would add up."""

    def __init__(self, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.upstream = upstream
        self.tmp_path_factory = tmp_path_factory
        self.started: list[Service] = []
        self._lock = threading.Lock()

    def start(self, **overrides: str | None) -> Service:
        workdir = self.tmp_path_factory.mktemp("service")
        service = Service(service_env(self.upstream, workdir, overrides), workdir)
        with self._lock:
            self.started.append(service)
        return service.start()

    def start_pair(self, **overrides: str | None) -> tuple[Service, Service]:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(lambda _: self.start(**overrides), range(2))
        return first, second

    def stop_all(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.started))) as pool:
            list(pool.map(Service.stop, self.started))


@pytest.fixture
def services(
    upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    started = Services(upstream, tmp_path_factory)
    yield started
    started.stop_all()


@pytest.fixture(scope="module")
def module_services(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    started = Services(upstream_server, tmp_path_factory)
    yield started
    started.stop_all()


@pytest.fixture(scope="module")
def token_service(module_services: Services) -> Service:
    """Access tokens for the tests' clients, three requests a minute each."""
    return module_services.start(ACCESS_TOKENS=ACCESS_TOKENS, RATE_LIMIT="3/minute")


@pytest.fixture(scope="module")
def open_service(module_services: Services) -> Service:
    """No access tokens (a client is its address), the default memory storage, one worker."""
    return module_services.start(RATE_LIMIT="5/minute")


# --- RATE_LIMIT is read as Flask-Limiter reads it ------------------------------------------------


@pytest.mark.parametrize(
    "value", ["60/minute", "60/minute;1000/day", "10 per 2 minutes", "5/second,100/hour"]
)
def test_rate_limit_takes_flask_limiter_notation(value: str) -> None:
    assert load_settings({"RATE_LIMIT": value}).rate_limit == value


@pytest.mark.parametrize("value", ["lots", "60/fortnight", "60/minute;", "0/minute"])
def test_an_unusable_rate_limit_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"RATE_LIMIT": value})

    assert str(refused.value).startswith("RATE_LIMIT: ")
    assert value in str(refused.value)


# --- One limit per client, on the routes that reach the upstream ------------------------------


def test_each_access_token_has_its_own_allowance_shared_by_the_upstream_routes(
    token_service: Service, upstream: FakeUpstream
) -> None:
    url = token_service.url
    answers = [
        requests.get(f"{url}/v1/models", headers=bearer("alice"), timeout=10),
        requests.post(f"{url}/chat", json=CHAT, headers=bearer("alice"), timeout=10),
        requests.get(f"{url}/callChatGPT", params={"input": "hi"}, headers=bearer("alice"), timeout=10),
    ]  # fmt: skip
    refused = requests.post(
        f"{url}/v1/chat/completions", json=CHAT, headers=bearer("alice"), timeout=10
    )
    other_client = requests.get(f"{url}/v1/models", headers=bearer("bob"), timeout=10)

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [remaining(answer) for answer in answers] == [2, 1, 0]
    for answer in answers:
        assert answer.headers["X-RateLimit-Limit"] == "3"
        assert time.time() < int(answer.headers["X-RateLimit-Reset"]) <= time.time() + 61
        assert "Retry-After" not in answer.headers
    assert_rate_limited(refused)
    assert "x-should-retry" not in refused.headers  # ours: the SDK may wait and retry
    assert other_client.status_code == 200
    assert remaining(other_client) == 2
    assert len(upstream.requests) == 4  # the refused request never reached the upstream


def test_call_chatgpt_answers_its_429_as_one_text_line(token_service: Service) -> None:
    url = f"{token_service.url}/callChatGPT"
    for _ in range(3):
        assert requests.post(url, data={"input": "hi"}, headers=bearer("carol"), timeout=10).ok

    refused = requests.post(url, data={"input": "hi"}, headers=bearer("carol"), timeout=10)

    assert refused.status_code == 429
    assert refused.headers["Content-Type"].startswith("text/plain")
    assert re.fullmatch(r"error: [^\n]+\n", refused.text), refused.text
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining"] == "0"


def test_pages_probes_usage_and_conversations_are_not_counted(token_service: Service) -> None:
    url = token_service.url
    uncounted = [
        lambda: requests.get(f"{url}/", timeout=10),
        lambda: requests.get(f"{url}/qa", timeout=10),
        lambda: requests.get(f"{url}/healthz", timeout=10),
        lambda: requests.get(f"{url}/readyz", timeout=10),
        lambda: requests.get(f"{url}/usage", headers=bearer("dave"), timeout=10),
        lambda: requests.get(f"{url}/chat/conversations", headers=bearer("dave"), timeout=10),
        lambda: requests.options(
            f"{url}/chat",
            headers={"Origin": "http://page.example", "Access-Control-Request-Method": "POST"},
            timeout=10,
        ),
    ]
    for call in uncounted * 4:  # more than the allowance, and none of it spent
        response = call()
        assert response.status_code in (200, 204), response.text
        assert "X-RateLimit-Limit" not in response.headers

    counted = requests.get(f"{url}/v1/models", headers=bearer("dave"), timeout=10)

    assert remaining(counted) == 2


def test_failed_authentications_count_against_the_address(
    token_service: Service, upstream: FakeUpstream
) -> None:
    url = token_service.url
    wrong = {"Authorization": "Bearer tok-guess-00000000"}
    with client_from("127.0.0.2") as guesser, client_from("127.0.0.3") as neighbour:
        failures = [
            guesser.get(f"{url}/usage", headers=wrong, timeout=10),
            guesser.post(f"{url}/chat", json=CHAT, headers=wrong, timeout=10),
            guesser.get(f"{url}/v1/models", timeout=10),  # no token at all
        ]
        locked = guesser.get(f"{url}/v1/models", headers=wrong, timeout=10)
        # A valid token is a client of its own: its address's failures do not refuse it.
        right_token = guesser.get(f"{url}/v1/models", headers=bearer("erin"), timeout=10)
        other_failure = neighbour.get(f"{url}/v1/models", headers=wrong, timeout=10)

    assert [failure.status_code for failure in failures] == [401, 401, 401]
    assert locked.status_code == 429, locked.text
    assert locked.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(locked.headers["Retry-After"]) <= 60
    assert right_token.status_code == 200, right_token.text
    assert other_failure.status_code == 401
    assert len(upstream.requests) == 1


def test_failed_authentications_are_counted_while_redis_is_down(
    services: Services, redis_server: RedisServer
) -> None:
    service = services.start(
        ACCESS_TOKENS=ACCESS_TOKENS, RATE_LIMIT="2/minute", RATELIMIT_STORAGE_URI=redis_server.url
    )
    redis_server.stop()

    wrong = {"Authorization": "Bearer tok-guess-00000000"}
    answered = [
        requests.get(f"{service.url}/usage", headers=wrong, timeout=10).status_code
        for _ in range(3)
    ]

    assert answered == [401, 401, 429]


# --- A client without a token is its address; TRUST_PROXY_HEADERS -------------------------------


def test_a_forged_x_forwarded_for_changes_nothing_without_trusted_proxies(
    open_service: Service,
) -> None:
    url = f"{open_service.url}/v1/models"
    with client_from("127.0.0.4") as client, client_from("127.0.0.5") as other_client:
        spent = [
            client.get(url, headers={"X-Forwarded-For": f"198.51.100.{n}"}, timeout=10)
            for n in range(1, 7)
        ]
        other_address = other_client.get(url, timeout=10)

    assert [response.status_code for response in spent] == [200] * 5 + [429]
    assert_rate_limited(spent[-1])
    assert other_address.status_code == 200
    assert remaining(other_address) == 4


def test_through_one_trusted_proxy_the_limit_follows_the_right_most_forwarded_address(
    services: Services,
) -> None:
    url = f"{services.start(TRUST_PROXY_HEADERS='1', RATE_LIMIT='2/minute').url}/v1/models"

    def through_proxy(forwarded_for: str) -> int:
        return requests.get(url, headers={"X-Forwarded-For": forwarded_for}, timeout=10).status_code

    client = [through_proxy("203.0.113.7") for _ in range(3)]
    another_client = through_proxy("203.0.113.8")
    # A client that writes its own header: the proxy appends the address it saw, which counts.
    forging_client = through_proxy("203.0.113.7, 203.0.113.9")
    the_proxy_itself = requests.get(url, timeout=10).status_code

    assert client == [200, 200, 429]
    assert (another_client, forging_client, the_proxy_itself) == (200, 200, 200)


# --- Storage: one limit for the instance, the workers, the machines -----------------------------


def test_the_default_memory_storage_holds_one_limit_for_the_whole_instance(
    open_service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(*[delay(0.3, answer_like_openai)] * 10)  # all ten in flight together

    answered = statuses([get_models(open_service)] * 10)

    assert sorted(answered) == [200] * 5 + [429] * 5
    assert len(upstream.requests) == 5


def test_several_workers_on_memory_storage_log_that_the_limit_is_per_process(
    services: Services,
) -> None:
    service = services.start(WEB_CONCURRENCY="2", RATE_LIMIT="5/minute")

    warnings = wait_for_log(service, r"WARNING .*memory://.*WEB_CONCURRENCY=2", count=2)

    assert warnings, service.log_tail()
    assert all("per process" in line or "each worker" in line for line in warnings)


def test_the_workers_of_one_instance_share_a_redis_limit(
    services: Services, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    service = services.start(
        WEB_CONCURRENCY="2", RATE_LIMIT="5/minute", RATELIMIT_STORAGE_URI=redis_server.url
    )
    upstream.enqueue(*[delay(0.3, answer_like_openai)] * 10)

    answered = statuses([get_models(service)] * 10)

    assert sorted(answered) == [200] * 5 + [429] * 5
    assert len(wait_for_log(service, r"Booting worker", count=2)) == 2, service.log_tail()
    assert "WEB_CONCURRENCY" not in service.log_text()  # nothing to warn about


def test_two_instances_sharing_redis_hold_one_limit(
    services: Services, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    first, second = services.start_pair(
        RATE_LIMIT="4/minute", RATELIMIT_STORAGE_URI=redis_server.url
    )

    one, two = get_models(first)(), get_models(second)()
    answered = statuses([get_models(first), get_models(second)] * 3)

    assert (remaining(one), remaining(two)) == (3, 2)  # the second instance saw the first's
    assert sorted(answered) == [200] * 2 + [429] * 4
    assert len(upstream.requests) == 4
    assert ready(first)["checks"]["rate_limit_storage"] == "ok"


def test_without_redis_requests_keep_succeeding_readyz_degrades_and_redis_is_shared_again(
    services: Services, redis_server: RedisServer
) -> None:
    first, second = services.start_pair(
        RATE_LIMIT="3/minute", RATELIMIT_STORAGE_URI=redis_server.url
    )
    assert [ready(service)["status"] for service in (first, second)] == ["ok", "ok"]

    redis_server.stop()
    during_outage = [get_models(service)().status_code for service in (first, second) * 3]
    over_the_process_limit = get_models(first)()
    readiness = [ready(service) for service in (first, second)]

    # Each process counts on its own: 3 + 3 answered where Redis would have allowed 3.
    assert during_outage == [200] * 6
    assert_rate_limited(over_the_process_limit)
    for document in readiness:
        assert document["status"] == "degraded"
        assert document["checks"]["rate_limit_storage"] == "unreachable"
    for service in (first, second):
        assert len(wait_for_log(service, r"storage unreachable")) == 1, service.log_tail()

    redis_server.start()
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while any(ready(service)["status"] != "ok" for service in (first, second)):
        assert time.monotonic() < deadline, "the services did not go back to Redis"
        time.sleep(0.5)

    with client_from("127.0.0.6") as client:
        shared = [
            client.get(f"{service.url}/v1/models", timeout=10) for service in (first, second) * 2
        ]
    assert [response.status_code for response in shared] == [200, 200, 200, 429]
    assert [remaining(response) for response in shared] == [2, 1, 0, 0]
    for service in (first, second):
        assert wait_for_log(service, r"storage recovered"), service.log_tail()
