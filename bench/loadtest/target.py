"""
What the run is aimed at, checked before any load: the proxy's address (and
its ``/health``), Redis (and its pid when it is local, for CPU figures), the
sessions and tokens the run authorizes, and enough file descriptors.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from bench.children import raise_open_files_limit as open_files_limit
from bench.errors import Fatal

from .messages import MIN_SIZE
from .options import Options
from .procstat import cpu_seconds
from .report import Console
from .wsclient import error_name

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# SETEX / DEL commands per pipeline round trip
TOKEN_BATCH = 2000
MAX_HEALTH_RESPONSE = 1 << 20


@dataclass(frozen=True)
class ProxyAddress:
    host: str
    port: int
    host_header: str
    path_prefix: str

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS or self.host.startswith("127.")


@dataclass(frozen=True)
class Target:
    proxy: ProxyAddress
    redis: redis.Redis
    redis_pid: int | None  # when Redis runs on this host
    health: object  # the proxy's /health answer: JSON, else its first 200 characters


def parse_proxy_url(url: str) -> ProxyAddress:
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise Fatal(f"--url must be ws://HOST:PORT (got {url!r}); wss is not supported")
    if not parts.hostname:
        raise Fatal(f"--url has no host: {url!r}")
    return ProxyAddress(parts.hostname, parts.port or 80, parts.netloc.rpartition("@")[2],
                        parts.path.rstrip("/"))


def check_counts(options: Options) -> None:
    if options.size < MIN_SIZE:
        raise Fatal(f"--size must be at least {MIN_SIZE} bytes (the payload carries a header)")
    if (options.clients < 1 or options.procs < 1 or options.publishers < 1
            or options.concurrency < 1):
        raise Fatal("--clients, --procs, --publishers and --concurrency must be >= 1")
    if options.pid and cpu_seconds(options.pid) is None:
        raise Fatal(f"--pid {options.pid}: no such process "
                    f"(or /proc/{options.pid}/stat unreadable)")


def connect_redis(url: str) -> tuple[redis.Redis, int | None]:
    """A client for ``url`` that answered PING, and the server's pid if it runs on this host."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
        client.ping()
        info = client.info("server")
    except Exception as e:  # noqa: BLE001
        raise Fatal(f"cannot reach Redis at {url}: {e}") from None
    pid = info.get("process_id")
    host = urlsplit(url).hostname or "127.0.0.1"
    if pid and host in LOCAL_HOSTS and cpu_seconds(int(pid)) is not None:
        return client, int(pid)
    return client, None


def preflight(options: Options, console: Console) -> Target:
    """
    Checks the options, reaches Redis and the proxy's /health.

    @raise Fatal: with the reason, if any of them is wrong or unreachable.
    """
    proxy = parse_proxy_url(options.url)
    check_counts(options)
    client, redis_pid = connect_redis(options.redis_url)
    status, body = http_get(proxy, "/health")
    if status is None:
        raise Fatal(f"cannot reach wsproxy at {options.url}: {body}")
    health: object
    try:
        health = json.loads(body)
    except ValueError:
        health = body[:200]
    if status != 200:
        console.warn(f"wsproxy /health answered HTTP {status}: {body[:200]!r}")
    return Target(proxy, client, redis_pid, health)


def http_get(proxy: ProxyAddress, path: str) -> tuple[int | None, str]:
    """(status, body) of a plain GET, or (None, why it failed)."""
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=3)
    except OSError as e:
        return None, error_name(e)
    try:
        sock.sendall(f"GET {proxy.path_prefix}{path} HTTP/1.1\r\nHost: {proxy.host_header}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = _read_response(sock)
    except OSError as e:
        return None, error_name(e)
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, "not an HTTP server (bad /health response)"
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body.decode("utf-8", "replace")


def _read_response(sock: socket.socket) -> bytes:
    """Reads until the connection closes, the Content-Length is complete, or 5 s pass."""
    data = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(data) < MAX_HEALTH_RESPONSE:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        head, separator, rest = data.partition(b"\r\n\r\n")
        if separator:
            content_length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    content_length = int(value.strip())
            if content_length is not None and len(rest) >= content_length:
                break
    return data


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def raise_open_files_limit(options: Options, console: Console) -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (and the hard one too if root and needed)."""
    problem = open_files_limit(-(-options.clients // options.procs) + 256)
    if problem:
        console.warn(f"{problem} per worker; use more --procs or raise the limit")


def jwt_signing_key(key_file: str, algorithm: str) -> object:
    """
    What signs the run's JWTs: the HMAC secret in ``key_file`` as given
    (HS*; one trailing newline dropped, as an editor leaves it), else the
    private key in it (PEM), parsed once for all tokens.

    @raise Fatal: if the file cannot be read or holds no such key.
    """
    try:
        text = Path(key_file).read_text()
    except OSError as e:
        raise Fatal(f"--jwt-key-file {key_file}: {error_name(e)}") from None
    if algorithm.startswith("HS"):
        return text.removesuffix("\n")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        return load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as e:
        raise Fatal(f"--jwt-key-file {key_file}: not a private key in PEM ({e})") from None


class Sessions:
    """
    The run's sessions: ids ``lt-<run id>-<index>``, one random token each
    (stored in Redis by L{authorize}), or one JWT each (L{mint_jwts}).
    """

    def __init__(self, count: int) -> None:
        self.run_id = secrets.token_hex(4)
        self.ids = [f"lt-{self.run_id}-{i}" for i in range(count)]
        self.tokens = [secrets.token_urlsafe(18) for _ in range(count)]
        self.in_redis = True

    def mint_jwts(self, key_file: str, algorithm: str) -> None:
        """
        Every session's token becomes a JWT for it (C{AUTH_MODE=jwt}: claims
        C{session_id} and C{iat}, as L{wsproxy.backend.sign_token} writes
        them), and nothing goes to Redis.

        @raise Fatal: if the key cannot be read or the algorithm is unknown.
        """
        from wsproxy.backend import sign_token
        key = jwt_signing_key(key_file, algorithm)
        try:
            self.tokens = [sign_token(key, sid, algorithm=algorithm) for sid in self.ids]
        except Exception as e:  # noqa: BLE001 (PyJWT: unknown alg, a key of the wrong kind)
            raise Fatal(f"cannot sign {algorithm} JWTs with {key_file}: {e}") from None
        self.in_redis = False

    def authorize(self, client: redis.Redis, ttl: int) -> None:
        """SETEX session:{id}:auth for every session, as a backend would (not for JWTs)."""
        if not self.in_redis:
            return
        try:
            pipe = client.pipeline(transaction=False)
            for i, sid in enumerate(self.ids):
                pipe.setex(f"session:{sid}:auth", ttl, self.tokens[i])
                if i % TOKEN_BATCH == TOKEN_BATCH - 1:
                    pipe.execute()
            pipe.execute()
        except Exception as e:  # noqa: BLE001
            raise Fatal(f"Redis error while storing tokens: {e}") from None

    def revoke(self, client: redis.Redis, ttl: int, console: Console) -> None:
        """Deletes the tokens (they would expire after ``ttl`` seconds anyway)."""
        if not self.in_redis:
            return
        try:
            pipe = client.pipeline(transaction=False)
            for i, sid in enumerate(self.ids):
                pipe.delete(f"session:{sid}:auth")
                if i % TOKEN_BATCH == TOKEN_BATCH - 1:
                    pipe.execute()
            pipe.execute()
        except Exception as e:  # noqa: BLE001
            console.warn(f"could not delete the tokens (they expire after {ttl}s): {e}")
