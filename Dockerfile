# syntax=docker/dockerfile:1
# The wsproxy image: `bin/dev image` builds it (see docs/operations/deployment.md).
#
#   docker build --network host -t wsproxy .
#
# Build arguments:
#   BASE       the Python image both stages start from (Python 3.11+ with
#              venv). Default: the official slim image. Where Docker Hub is
#              out of reach, `bin/dev image` makes one from Debian packages
#              (debootstrap) and passes it here.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL  another package index for the build.
# An extra CA bundle for pip (behind a TLS-intercepting proxy): put it in
# deploy/docker/ca/ as a *.pem or *.crt file before building. It is used by
# the builder stage only and never reaches the runtime image.

ARG BASE=python:3.11-slim

# ---- builder: wheels at the versions the lock names, installed into a venv
FROM ${BASE} AS builder
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
COPY deploy/docker/ca/ /tmp/ca/
RUN set -eu; \
    extra=$(find /tmp/ca -name '*.pem' -o -name '*.crt' | sort); \
    if [ -n "$extra" ]; then cat $extra > /tmp/pip-ca.pem; fi; \
    python3 -m venv /opt/wsproxy
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY requirements/constraints.txt requirements/
COPY wsproxy/ wsproxy/
COPY twisted/ twisted/
COPY clients/python/ clients/python/
# the lock (requirements/constraints.txt) pins every runtime dependency;
# `pip wheel` resolves only what wsproxy needs (no dev extras), each at its
# locked version, then the venv installs exactly those wheels, offline
RUN set -eu; \
    if [ -f /tmp/pip-ca.pem ]; then export PIP_CERT=/tmp/pip-ca.pem; fi; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    /opt/wsproxy/bin/pip wheel --wheel-dir /wheels -c requirements/constraints.txt . ; \
    /opt/wsproxy/bin/pip install --no-index --find-links /wheels wsproxy; \
    # twistd's plugin cache, written now: the root filesystem is read-only at run time
    /opt/wsproxy/bin/python -c "from twisted.application.service import IServiceMaker; \
from twisted.plugin import getPlugins; \
assert 'wsproxy' in [p.tapname for p in getPlugins(IServiceMaker)]"; \
    # the fast path's borrowed internals are checked against what was installed
    /opt/wsproxy/bin/python -m wsproxy.fast; \
    # the examples' venv (the `examples` target, compose.yaml's backend):
    # the same wheels plus the examples extra (redis-py, websockets) and the
    # Python client (clients/python: examples/ws_client.py runs on it)
    /opt/wsproxy/bin/pip wheel --wheel-dir /wheels -c requirements/constraints.txt \
        '.[examples]' ./clients/python; \
    python3 -m venv /opt/examples; \
    /opt/examples/bin/pip install -q --no-index --find-links /wheels 'wsproxy[examples]' \
        wsproxy-client; \
    # nothing installs packages at run time
    for venv in /opt/wsproxy /opt/examples; do \
        $venv/bin/pip uninstall -y -q pip setuptools wheel 2>/dev/null || true; \
    done

# ---- examples: the scripts in examples/ with what they need (compose.yaml's
# backend service, and `docker compose run backend python examples/…`)
FROM ${BASE} AS examples
COPY --from=builder /opt/examples /opt/examples
COPY examples/ /opt/examples/examples/
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin wsproxy
WORKDIR /opt/examples
ENV PATH=/opt/examples/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
CMD ["python", "examples/session_backend.py"]

# ---- runtime (the default target): the base image, the venv and an
# unprivileged user; no build tools, no pip
FROM ${BASE} AS runtime
COPY --from=builder /opt/wsproxy /opt/wsproxy
COPY deploy/docker/healthcheck.py /opt/wsproxy/healthcheck.py
RUN set -eu; \
    groupadd --system --gid 10001 wsproxy; \
    useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin wsproxy; \
    mkdir -p /srv/wsproxy
# a .env mounted at /srv/wsproxy/.env is read too; environment variables win
WORKDIR /srv/wsproxy
# (no settings here: wsproxy's defaults, 0.0.0.0:8080 among them, hold, and a
# mounted .env can still set anything)
ENV PATH=/opt/wsproxy/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
# `wsproxy` is `twistd --nodaemon --pidfile= wsproxy` as PID 1 (exec form: no
# shell in between), so `docker stop`'s SIGTERM starts the graceful shutdown
# (close 1001, drain, exit 0). Give it SHUTDOWN_DRAIN_SECS +
# SHUTDOWN_GRACE_PERIOD_SECS (default 5 + 30): `docker stop -t 40`,
# `--stop-timeout 40`, compose's stop_grace_period.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/wsproxy/bin/python", "/opt/wsproxy/healthcheck.py"]
ENTRYPOINT ["/opt/wsproxy/bin/wsproxy"]
