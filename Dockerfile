# chatgpt-proxy: gunicorn with the gevent worker, as in production without Docker.
#
#   docker build -t chatgpt-proxy .
#   docker run --rm -p 8000:8000 --env-file .env -v chatgpt-proxy-data:/srv/chatgpt-proxy/instance chatgpt-proxy
#
# The container binds 0.0.0.0, so the service refuses to start without ACCESS_TOKENS unless
# ALLOW_OPEN_ACCESS=1 (an open relay spends your money).
#
# Stopping: on SIGTERM streams in progress get GUNICORN_GRACEFUL_TIMEOUT (30 s) to finish, less
# a 2 s margin; give `docker stop -t` (or compose's stop_grace_period) at least that long.
# With WEB_CONCURRENCY above 1, the metrics of the workers are kept in a fresh directory in
# /tmp (PROMETHEUS_MULTIPROC_DIR to choose another).

# --- build: a virtual environment with the project and its dependencies ---------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install .

# --- runtime --------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/srv/chatgpt-proxy \
    BIND=0.0.0.0:8000

RUN useradd --system --user-group --uid 10001 --no-log-init \
        --home-dir /srv/chatgpt-proxy --no-create-home chatproxy

WORKDIR /srv/chatgpt-proxy
COPY --from=build /opt/venv /opt/venv
# The repository layout: the app finds templates/ and static/ beside its package, so the
# package is imported from here (PYTHONPATH) rather than from the venv's copy.
COPY app ./app
COPY templates ./templates
COPY static ./static
COPY wsgi.py gunicorn.conf.py ./
# The default DATABASE_URL (sqlite:///instance/chatproxy.db) writes here; mount a volume on it.
RUN mkdir instance && chown chatproxy:chatproxy instance

# Numeric, so that a runtime checking for a non-root user (runAsNonRoot) can tell.
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM

# No curl in slim images; the proxy handler is empty so that HTTP_PROXY does not catch it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('BIND', ':8000').rsplit(':', 1)[-1]; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
