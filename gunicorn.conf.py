"""gunicorn settings for chatgpt-proxy: `gunicorn -c gunicorn.conf.py wsgi:app`.

Worker model: gevent. A proxy spends its time waiting on two sockets, and a chat stream holds
its request open for a minute or more; the tutorial's 10 sync workers could hold 10 streams,
gthread one thread per stream. A gevent worker holds thousands of streams in one process, each
costing a greenlet rather than a thread, and one process also means the default `memory://`
rate limit is one limit for the whole service. Set WEB_CONCURRENCY for more processes (use a
shared RATELIMIT_STORAGE_URI then; `-w` on the command line would leave /metrics per process).

Stopping (SIGTERM): the gevent worker is `app.worker.GeventWorker`, which closes idle keep-alive
connections at once, lets streams run for GUNICORN_GRACEFUL_TIMEOUT less a small margin, and then
ends them with an error their clients can read; docs/operations.md has the details.
"""

import atexit
import gc
import ipaddress
import os
import shutil
import sys
import tempfile
from pathlib import Path

worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
gevent_worker = worker_class == "gevent"
if gevent_worker:
    # Patch before anything imports ssl (requests does, through the app), as gevent asks;
    # the worker would patch only after the master had imported it.
    from gevent import monkey

    monkey.patch_all()

    worker_class = "app.worker.GeventWorker"

workers = int(os.environ.get("WEB_CONCURRENCY", "1"))


def _remove_metrics_dir(path: str, master_pid: int) -> None:
    if os.getpid() == master_pid:  # workers inherit this exit handler too
        shutil.rmtree(path, ignore_errors=True)


# Several workers write their metrics to files that /metrics adds up: prometheus_client wants
# the directory named before it is imported (the app imports it) and empty at start. One named
# by PROMETHEUS_MULTIPROC_DIR is emptied; else a new one is made, and removed when the master
# exits. A reload (SIGHUP) reads this file again in the same process: it changes nothing then.
if "app.metrics" not in sys.modules:
    given = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if given and given == os.environ.get("CHATPROXY_METRICS_DIR"):
        given = None  # made by the master that started this one (USR2): it will remove it
    if workers > 1 or given:
        metrics_dir = given
        if not metrics_dir:
            metrics_dir = tempfile.mkdtemp(prefix="chatgpt-proxy-metrics-")
            atexit.register(_remove_metrics_dir, metrics_dir, os.getpid())
            os.environ["CHATPROXY_METRICS_DIR"] = metrics_dir
        for leftover in Path(metrics_dir).glob("*.db"):
            leftover.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

# The package without the app (`create_app` imports Flask, SQLAlchemy and the rest in the worker):
# the master stays at ~42 MB instead of ~74 MB.
from app import log_startup, logs, metrics, settings_or_exit  # noqa: E402

settings = settings_or_exit()  # a bad value stops here, in the master, with one line

bind = [os.environ.get("BIND", "127.0.0.1:8000")]
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
# One line per request, written by the app (app/requestlog.py) when the response ends, with the
# request ID, client, upstream attempts and tokens; gunicorn's own access line would repeat it.
logger_class = "app.worker.Logger"
forwarded_allow_ips = "*" if settings.trust_proxy_headers else "127.0.0.1,::1"

# The upstream connection pool of each worker matches how many requests it serves at once.
os.environ.setdefault("UPSTREAM_POOL_SIZE", str(worker_connections if gevent_worker else threads))


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


def child_exit(server, worker):
    """A worker that exited no longer counts in the live gauges (streams in progress)."""
    metrics.mark_process_dead(worker.pid)


def pre_fork(server, worker):
    """The worker shares the master's memory until it writes to it: frozen objects are never
    written by the worker's garbage collector (~5 MB less PSS for the tree)."""
    gc.freeze()
