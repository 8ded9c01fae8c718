"""The service's configuration: read once from the environment, validated once, then frozen.

Every other module receives a `Settings`; nothing reads `os.environ` after start-up. A value that
cannot be used raises `ConfigError`, whose text is the one line the process prints before exiting.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from dotenv import dotenv_values
from limits import parse_many

DEFAULT_V1_ALLOWED_PATHS = (
    "GET models",
    "GET models/*",
    "POST chat/completions",
    "POST completions",
    "POST embeddings",
    "POST moderations",
    "POST responses",
    "POST images/generations",
    "POST images/edits",
    "POST images/variations",
    "POST audio/speech",
    "POST audio/transcriptions",
    "POST audio/translations",
)
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration value that cannot be used; `str()` is the line printed at start."""

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class ModelPrice:
    prompt: float  # USD per 1,000 prompt tokens
    completion: float  # USD per 1,000 completion tokens


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    base_url: str = "https://api.openai.com/v1"
    default_model: str = "gpt-4o-mini"
    allowed_models: tuple[str, ...] = ()
    system_prompt: str = ""
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retries: int = 2
    max_stream_seconds: float = 900.0
    proxies: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    ca_bundle: str | None = None
    # token -> client name; never printed.
    access_tokens: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    cors_origins: tuple[str, ...] = ("*",)
    rate_limit: str = "60/minute"
    daily_token_budget: int = 0
    ratelimit_storage_uri: str = "memory://"
    database_url: str = "sqlite:///instance/chatproxy.db"
    allow_open_access: bool = False
    v1_allowed_paths: tuple[str, ...] = DEFAULT_V1_ALLOWED_PATHS
    trust_proxy_headers: int = 0
    max_request_bytes: int = 8 * 1024 * 1024
    upstream_pool_size: int = 10  # connections kept open per process; gunicorn.conf.py sets it
    model_prices: Mapping[str, ModelPrice] = field(default_factory=lambda: MappingProxyType({}))
    log_level: str = "INFO"
    log_format: str = "text"

    @property
    def upstream_configured(self) -> bool:
        return bool(self.api_keys)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Everything that must never reach a log line or a response."""
        return self.api_keys + tuple(self.access_tokens)

    def model_allowed(self, model: str) -> bool:
        return not self.allowed_models or any(
            fnmatchcase(model, pattern) for pattern in self.allowed_models
        )

    def v1_path_allowed(self, method: str, path: str) -> bool:
        return any(_rule_matches(rule, method, path) for rule in self.v1_allowed_paths)


def _rule_matches(rule: str, method: str, path: str) -> bool:
    rule_method, pattern = _parsed_rule(rule)
    return (not rule_method or rule_method == method) and pattern.fullmatch(path) is not None


@functools.cache  # the rules come from the settings: a few, parsed once instead of per request
def _parsed_rule(rule: str) -> tuple[str, re.Pattern[str]]:
    """A rule is `glob` or `METHOD glob`; `*` stays within one path segment, `**` crosses them."""
    rule_method, _, glob = rule.partition(" ") if " " in rule else ("", "", rule)
    return rule_method, _glob_regex(glob)


def _glob_regex(glob: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", glob.strip("/"))
    wildcard = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcard.get(p, re.escape(p)) for p in parts))


def read_environment(env_file: str | os.PathLike = ".env") -> dict[str, str]:
    """The process environment over the `.env` file of the working directory."""
    merged = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    merged.update(os.environ)
    return merged


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Builds and validates `Settings`; raises `ConfigError` naming the first unusable variable."""
    env = _Env(read_environment() if environ is None else environ)
    base_url = env.url("OPENAI_BASE_URL", "https://api.openai.com/v1")
    read_timeout = env.number("UPSTREAM_TIMEOUT", 120.0)
    return Settings(
        api_keys=env.key_pool("OPENAI_API_KEY"),
        base_url=base_url,
        default_model=env.text("OPENAI_MODEL", "gpt-4o-mini") or "gpt-4o-mini",
        allowed_models=env.items("ALLOWED_MODELS"),
        system_prompt=env.text("SYSTEM_PROMPT", ""),
        connect_timeout=env.number("UPSTREAM_CONNECT_TIMEOUT", 10.0),
        read_timeout=read_timeout,
        retries=env.integer("UPSTREAM_RETRIES", 2, maximum=10),
        max_stream_seconds=env.number("MAX_STREAM_SECONDS", 900.0),
        proxies=MappingProxyType(env.proxies_for(base_url)),
        ca_bundle=env.text("REQUESTS_CA_BUNDLE", "") or env.text("CURL_CA_BUNDLE", "") or None,
        access_tokens=MappingProxyType(env.access_tokens("ACCESS_TOKENS")),
        cors_origins=env.items("CORS_ORIGINS") or ("*",),
        rate_limit=env.rate_limit("RATE_LIMIT", "60/minute"),
        daily_token_budget=env.integer("DAILY_TOKEN_BUDGET", 0),
        ratelimit_storage_uri=env.storage_uri("RATELIMIT_STORAGE_URI", "memory://"),
        database_url=env.text("DATABASE_URL", "sqlite:///instance/chatproxy.db"),
        allow_open_access=env.flag("ALLOW_OPEN_ACCESS", False),
        v1_allowed_paths=env.path_rules("V1_ALLOWED_PATHS"),
        trust_proxy_headers=env.integer("TRUST_PROXY_HEADERS", 0, maximum=10),
        max_request_bytes=env.integer("MAX_REQUEST_BYTES", 8 * 1024 * 1024, minimum=1),
        upstream_pool_size=env.integer("UPSTREAM_POOL_SIZE", 10, minimum=1),
        model_prices=MappingProxyType(env.prices("MODEL_PRICES")),
        log_level=env.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        log_format=env.choice("LOG_FORMAT", "text", ("text", "json")),
    )


class _Env:
    """Typed, validating reads of one environment snapshot."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ

    def text(self, name: str, default: str) -> str:
        value = self._environ.get(name)
        return default if value is None else value.strip()

    def items(self, name: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.text(name, "").split(",") if item.strip())

    def number(self, name: str, default: float) -> float:
        raw = self.text(name, "")
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(name, f"expected a number of seconds, got {raw!r}") from None
        if not (0 < value < float("inf")):
            raise ConfigError(name, f"must be a positive number, got {raw!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        raw = self.text(name, "")
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and at most {maximum}"
            raise ConfigError(name, f"must be at least {minimum}{upper}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name, "").lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"expected 1 or 0, got {raw!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...], upper=False) -> str:
        raw = self.text(name, "") or default
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise ConfigError(name, f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    def url(self, name: str, default: str) -> str:
        raw = self.text(name, "") or default
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(name, f"must be an http:// or https:// URL, got {raw!r}")
        if parts.query or parts.fragment:
            raise ConfigError(name, "must not have a query string or fragment")
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise ConfigError(name, f"has an invalid port: {raw!r}") from None
        return raw.rstrip("/")

    def key_pool(self, name: str) -> tuple[str, ...]:
        keys = self.items(name)
        if any(any(ch.isspace() for ch in key) for key in keys):
            raise ConfigError(name, "a key contains white space")
        return tuple(dict.fromkeys(keys))

    def access_tokens(self, name: str) -> dict[str, str]:
        """`name:token` pairs; a bare token is named `client-` + 8 hex of its SHA-256."""
        raw = self.text(name, "")
        if not raw:
            return {}
        tokens: dict[str, str] = {}
        for position, entry in enumerate(raw.split(","), start=1):
            entry = entry.strip()
            if ":" in entry:
                client, _, token = entry.partition(":")
                client, token = client.strip(), token.strip()
            else:
                token = entry
                client = "client-" + hashlib.sha256(token.encode()).hexdigest()[:8]
            if not client or not token:
                raise ConfigError(name, f"entry {position} has an empty name or token")
            if any(ch.isspace() for ch in token):
                raise ConfigError(name, f"the token of entry {position} contains white space")
            if token in tokens:
                raise ConfigError(name, f"entry {position} repeats a token")
            if client in tokens.values():
                raise ConfigError(name, f"entry {position} repeats the name {client!r}")
            tokens[token] = client
        return tokens

    def rate_limit(self, name: str, default: str) -> str:
        """Flask-Limiter's notation, read by the parser Flask-Limiter itself uses."""
        raw = self.text(name, "") or default
        try:
            items = parse_many(raw)
        except ValueError:
            raise ConfigError(
                name, f"expected limits such as '60/minute;1000/day', got {raw!r}"
            ) from None
        if any(item.amount < 1 for item in items):
            raise ConfigError(name, f"a limit must allow at least one request, got {raw!r}")
        return raw

    def storage_uri(self, name: str, default: str) -> str:
        raw = self.text(name, "") or default
        if urlsplit(raw).scheme not in ("memory", "redis", "rediss", "redis+unix"):
            raise ConfigError(name, f"expected memory:// or redis://host:port/db, got {raw!r}")
        return raw

    def path_rules(self, name: str) -> tuple[str, ...]:
        rules = self.items(name)
        if not rules:
            return DEFAULT_V1_ALLOWED_PATHS
        for rule in rules:
            method, _, glob = rule.rpartition(" ")
            if method and method.upper() not in HTTP_METHODS:
                raise ConfigError(name, f"unknown method in {rule!r}")
            if not glob.strip("/"):
                raise ConfigError(name, f"empty path in {rule!r}")
        return tuple(_normalise_rule(rule) for rule in rules)

    def proxies_for(self, url: str) -> dict[str, str]:
        """The outbound proxy for the upstream, decided once as `requests` would per request."""
        scheme = urlsplit(url).scheme
        proxy = self.text(f"{scheme.upper()}_PROXY", "") or self.text(f"{scheme}_proxy", "")
        proxy = proxy or self.text("ALL_PROXY", "") or self.text("all_proxy", "")
        no_proxy = self.text("NO_PROXY", "") or self.text("no_proxy", "")
        if not proxy:
            return {}
        # Imported only here: gunicorn's master reads the settings and is ~7 MB lighter without.
        from requests.utils import should_bypass_proxies

        if should_bypass_proxies(url, no_proxy=no_proxy or None):
            return {}
        if urlsplit(proxy if "://" in proxy else f"http://{proxy}").hostname is None:
            raise ConfigError(f"{scheme.upper()}_PROXY", "is not a proxy URL")
        return {scheme: proxy}

    def prices(self, name: str) -> dict[str, ModelPrice]:
        path = self.text(name, "")
        if not path:
            return {}
        try:
            table = json.loads(Path(path).read_text(encoding="utf-8"))
            return {
                str(model): ModelPrice(float(price["prompt"]), float(price["completion"]))
                for model, price in table.items()
            }
        except OSError as exc:
            raise ConfigError(name, f"cannot read {path}: {exc.strerror}") from None
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ConfigError(
                name, 'expected {"model": {"prompt": usd_per_1k, "completion": usd_per_1k}}'
            ) from None


def _normalise_rule(rule: str) -> str:
    method, _, glob = rule.rpartition(" ")
    return f"{method.upper()} {glob.strip('/')}" if method else glob.strip("/")
