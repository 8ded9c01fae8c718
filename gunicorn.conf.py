"""gunicorn settings for chatgpt-proxy: `gunicorn -c gunicorn.conf.py wsgi:app`.

Worker model: gevent. A proxy spends its time waiting on two sockets, and a chat stream holds
its request open for a minute or more; the tutorial's 10 sync workers could hold 10 streams,
gthread one thread per stream. A gevent worker holds thousands of streams in one process, each
costing a greenlet rather than a thread, and one process also means the default `memory://`
rate limit is one limit for the whole service. Set WEB_CONCURRENCY for more processes (use a
shared RATELIMIT_STORAGE_URI then).
"""

import ipaddress
import os
import sys

worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
if worker_class == "gevent":
    # Patch before anything imports ssl (requests does, through the app), as gevent asks;
    # the worker would patch only after the master had imported it.
    from gevent import monkey

    monkey.patch_all()

from app import log_startup, logs, settings_or_exit  # noqa: E402

settings = settings_or_exit()  # a bad value stops here, in the master, with one line

bind = [os.environ.get("BIND", "127.0.0.1:8000")]
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "2000"))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
# A stream may stay open for MAX_STREAM_SECONDS; gevent workers heartbeat on their own, so the
# timeout only catches a worker that stopped scheduling altogether.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
# gunicorn's control socket lives in $HOME: two instances on one machine would share it.
control_socket_disable = True
loglevel = settings.log_level.lower()
logconfig_dict = logs.gunicorn_logconfig(settings.log_level, settings.log_format, settings.secrets)
# One access line per request, on stderr with the service's other lines (logconfig_dict). No
# query string: on /callChatGPT it holds the question, and message content stays out of logs.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
forwarded_allow_ips = "*" if settings.trust_proxy_headers else "127.0.0.1,::1"

# The upstream connection pool of each worker matches how many requests it serves at once.
os.environ.setdefault(
    "UPSTREAM_POOL_SIZE", str(worker_connections if "gevent" in worker_class else threads)
)


def _is_loopback(address: str) -> bool:
    if address.startswith(("unix:", "fd://")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def on_starting(server):
    """Refuses an open relay: a public bind with no ACCESS_TOKENS spends the key's money."""
    public = [address for address in server.cfg.bind if not _is_loopback(address)]
    if public and not settings.access_tokens and not settings.allow_open_access:
        print(
            f"chatgpt-proxy: configuration error: ACCESS_TOKENS: required when binding to "
            f"{', '.join(public)} (set ALLOW_OPEN_ACCESS=1 to serve without tokens)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    logs.configure(settings.log_level, settings.log_format, settings.secrets)
    log_startup(settings)
    os.environ["CHATPROXY_STARTUP_LOGGED"] = "1"
