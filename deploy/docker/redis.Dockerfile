# Redis from Debian's packages (redis-server, redis-sentinel, redis-tools),
# for compose.yaml where Docker Hub's redis image is out of reach:
# `bin/dev image` builds it as wsproxy-redis:dev from the same base as the
# proxy. Elsewhere compose.yaml uses the official redis image (REDIS_IMAGE).
ARG BASE=python:3.11-slim
FROM ${BASE}
RUN set -eu; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        redis-server redis-sentinel redis-tools >/dev/null; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /data; chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no", "--dir", "/data"]
