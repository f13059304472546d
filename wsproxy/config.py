"""
Configuration: one typed L{Settings} object built from, in increasing order
of precedence, built-in defaults, a C{.env} file, the process environment and
command-line options.

Every setting is declared once, as a field of L{Settings} (environment
variable, default as text, parser, help); L{SETTINGS} lists them, and the
twistd options, the C{--help} text, the environment variable names and the
validation all come from that list.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Literal, Mapping, TypeVar, cast, get_args
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

#: how messages map to frames (L{wsproxy.session.frames}); declared here, the
#: bottom of the package, so that settings import nothing above them
FrameMode = Literal["auto", "tagged"]
FRAME_MODES: tuple[FrameMode, ...] = get_args(FrameMode)

EventTarget = Literal["session", "all", "stream"]
LogLevelName = Literal["debug", "info", "warn", "error"]
LogFormat = Literal["text", "json"]
UpstreamMode = Literal["pubsub", "stream"]
UPSTREAM_MODES: tuple[UpstreamMode, ...] = get_args(UpstreamMode)
LOG_LEVELS: tuple[LogLevelName, ...] = get_args(LogLevelName)
#: AUTH_MODE's methods, in the order a token is tried
AuthMethod = Literal["jwt", "redis"]
AUTH_METHODS: tuple[AuthMethod, ...] = get_args(AuthMethod)
DenyList = Literal["off", "session", "jti"]
DENY_LISTS: tuple[DenyList, ...] = get_args(DenyList)
#: what JWT_ALGORITHMS may name (wsproxy.session.webtoken checks the same list)
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
)
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)


class ConfigError(ValueError):
    """
    A configuration value is invalid. The message names the variable and
    never repeats a secret.
    """


@dataclass(frozen=True)
class RedisAddress:
    """
    Where and how to reach Redis, parsed from C{REDIS_URL}.

    @ivar path: the socket path for C{unix://} addresses, else C{None}.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int | None = None

    def describe(self) -> str:
        """
        A printable form of the address without credentials, for logs.
        """
        if self.path is not None:
            where = "unix://" + self.path
        else:
            scheme = "rediss" if self.tls else "redis"
            host = f"[{self.host}]" if ":" in self.host else self.host
            where = f"{scheme}://{host}:{self.port}"
        if self.db:
            where += f"/{self.db}"
        return where


def parse_redis_url(value: str) -> RedisAddress:
    """
    Parse C{redis://[user:pass@]host[:port][/db]}, C{rediss://...} (TLS) or
    C{unix:///path/redis.sock[?db=N]}.

    @raise ValueError: with a message that does not include the password.
    """
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL") from None
    scheme = parts.scheme.lower()
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is None and username is not None and ":" not in parts.netloc.rpartition("@")[0]:
        # redis://secret@host is the conventional way to give only a password
        username, password = None, username
    db: int | None = None
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError("missing host")
        dbpart = parts.path.strip("/")
        if dbpart:
            if not dbpart.isdigit():
                raise ValueError("database must be a number")
            db = int(dbpart)
        return RedisAddress(
            host=parts.hostname,
            port=port if port is not None else 6379,
            tls=scheme == "rediss",
            username=username or None,
            password=password,
            db=db,
        )
    if scheme == "unix":
        if not parts.path:
            raise ValueError("missing socket path")
        for item in parts.query.split("&"):
            key, _, val = item.partition("=")
            if key == "db":
                if not val.isdigit():
                    raise ValueError("database must be a number")
                db = int(val)
        return RedisAddress(
            path=parts.path, username=username, password=password, db=db
        )
    raise ValueError("scheme must be redis://, rediss:// or unix://")


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be between 0 and 65535")
    return port


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be a number >= 0")
    return number


def _positive_float(value: str) -> float:
    number = _non_negative_float(value)
    if number == 0:
        raise ValueError("must be a number > 0")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be an integer >= 0")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be an integer >= 1")
    return number


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _choice(value: str, choices: tuple[str, ...]) -> str:
    lowered = value.strip().lower()
    if lowered == "warning":
        lowered = "warn"
    if lowered not in choices:
        raise ValueError("must be one of " + ", ".join(choices))
    return lowered


def _event_targets(value: str) -> tuple[EventTarget, ...]:
    """
    C{EVENTS}: a comma list of C{session}, C{all}, C{stream} (empty: off).
    """
    items = [item.strip().lower() for item in value.split(",") if item.strip()]
    targets: list[EventTarget] = []
    for item in items:
        if item not in ("session", "all", "stream"):
            raise ValueError("each item must be session, all or stream")
        target = cast(EventTarget, item)
        if target not in targets:
            targets.append(target)
    return tuple(targets)


def _auth_mode(value: str) -> tuple[AuthMethod, ...]:
    """
    C{AUTH_MODE}: C{redis}, C{jwt} or C{jwt,redis} (in any order).
    """
    items = {item.strip().lower() for item in value.split(",") if item.strip()}
    if not items or not items <= {"redis", "jwt"}:
        raise ValueError("must be redis, jwt or jwt,redis")
    return tuple(m for m in AUTH_METHODS if m in items)


def _jwt_algorithms(value: str) -> tuple[str, ...]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError("must name at least one algorithm")
    for item in items:
        if item not in JWT_ALGORITHMS:
            raise ValueError("each item must be one of " + ", ".join(JWT_ALGORITHMS))
    return tuple(dict.fromkeys(items))


def _names(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _claim_values(value: str) -> tuple[str, ...]:
    """
    C{JWT_AUDIENCE}: a comma list of the values a claim may have, without
    control characters (a tab or a newline there is a mistake).
    """
    names = _names(value)
    if any(not name.isprintable() for name in names):
        raise ValueError("must not contain control characters")
    return names


def _claim_value(value: str) -> str:
    """
    C{JWT_ISSUER}: the value a claim must have (empty: not checked).
    """
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


def _deny_list(value: str) -> DenyList:
    return cast(DenyList, _choice(value, DENY_LISTS))


def _optional_files(value: str) -> tuple[str, ...]:
    return tuple(cast(str, _optional_file(item)) for item in _names(value))


def _http_url(value: str) -> str:
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return value


def _frame_mode(value: str) -> FrameMode:
    return cast(FrameMode, _choice(value, FRAME_MODES))


def _log_level(value: str) -> LogLevelName:
    return cast(LogLevelName, _choice(value, LOG_LEVELS))


def _log_format(value: str) -> LogFormat:
    return cast(LogFormat, _choice(value, LOG_FORMATS))


def _upstream(value: str) -> UpstreamMode:
    return cast(UpstreamMode, _choice(value, UPSTREAM_MODES))


def _partitions(value: str) -> int:
    number = _positive_int(value)
    if number > 1024:
        raise ValueError("must be an integer from 1 to 1024")
    return number


_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)


def _host(value: str) -> str:
    """
    An IP address or a host name (empty: every interface).
    """
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if value and not _HOST_NAME.match(value):
            raise ValueError("must be an IP address or a host name") from None
    return value


def _endpoint(value: str) -> str:
    """
    A Twisted server endpoint string, checked by building the endpoint
    (which reads an ssl: endpoint's key and certificate) without listening.
    """
    if value:
        from twisted.internet.endpoints import serverFromString

        try:
            serverFromString(None, value)
        except Exception as e:
            raise ValueError(f"not a usable endpoint: {e}") from None
    return value


def _optional_text(value: str) -> str | None:
    return value or None


def _name(value: str) -> str:
    if any(c.isspace() for c in value):
        raise ValueError("must not contain spaces")
    return value


def _host_ports(value: str, what: str) -> tuple[tuple[str, int], ...]:
    """
    A comma list of C{host:port} (C{[v6]:port} for IPv6).
    """
    addresses = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"each {what} must be host:port")
        addresses.append((host, int(port_text)))
    return tuple(addresses)


def _sentinels(value: str) -> tuple[tuple[str, int], ...]:
    """
    C{REDIS_SENTINELS}: a comma list of C{host:port}.
    """
    return _host_ports(value, "sentinel")


def _cluster_nodes(value: str) -> tuple[tuple[str, int], ...]:
    """
    C{REDIS_CLUSTER_NODES}: a comma list of C{host:port}.
    """
    return _host_ports(value, "node")


def _optional_file(value: str) -> str | None:
    if value and not (os.path.isfile(value) and os.access(value, os.R_OK)):
        raise ValueError("no such readable file")
    return value or None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: str) -> tuple[Network, ...]:
    """
    A comma list of IP addresses or CIDR networks (C{10.0.0.0/8},
    C{2001:db8::/32}, C{127.0.0.1}); empty: none.
    """
    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                "each item must be an IP address or a CIDR network such as 10.0.0.0/8"
            ) from None
    return tuple(networks)


_ORIGIN = re.compile(r"^(\*|null|https?://[^/\s]+)$")


def _origins(value: str) -> tuple[str, ...]:
    """
    A comma-separated list of origins (C{https://app.example.com}, with an
    optional port, C{null} for opaque origins, or C{*}); empty means any
    origin.
    """
    items = tuple(item.strip().rstrip("/") for item in value.split(",") if item.strip())
    for item in items:
        if not _ORIGIN.match(item):
            raise ValueError(
                "each origin must look like https://host[:port] (or be null or *)"
            )
    return items


@dataclass(frozen=True)
class Setting:
    """
    How one configuration item is given: its environment variable, default
    (as the text a user would write), parser and help text. The attribute
    of L{Settings} it fills is C{attr}.
    """

    env: str
    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    attr: str = ""

    @property
    def option(self) -> str:
        return self.env.lower().replace("_", "-")


T = TypeVar("T")


def setting(
    env: str, default: str, parse: Callable[[str], T], help: str, secret: bool = False
) -> T:
    """
    Declare a field of L{Settings}: its typed default is C{parse(default)},
    so the default is written once, as text, and is valid by construction.
    """
    return field(
        default=parse(default),
        metadata={"setting": Setting(env, default, parse, help, secret)},
    )


@dataclass(frozen=True)
class Settings:
    """
    The proxy's whole configuration, already validated and typed. Each field
    is declared once, here: its environment variable (the twistd option is
    its lower-case, dashed form), default, parser and help text.
    """

    host: str = setting("HOST", "0.0.0.0", _host, "listen interface")
    port: int = setting("PORT", "8080", _port, "listen port")
    listen: str = setting(
        "LISTEN",
        "",
        _endpoint,
        "Twisted endpoint string (tcp:8080:interface=127.0.0.1, "
        "ssl:8443:privateKey=key.pem:certKey=cert.pem); overrides HOST/PORT",
    )
    listen_backlog: int = setting(
        "LISTEN_BACKLOG",
        "4096",
        _positive_int,
        "connections the kernel completes and queues for the proxy to accept "
        "(capped by net.core.somaxconn): a reconnect storm waits in it instead "
        "of having its SYNs dropped and retried a second later (HOST/PORT; "
        "with LISTEN, its own backlog= option)",
    )
    redis: RedisAddress = setting(
        "REDIS_URL",
        "redis://127.0.0.1:6379",
        parse_redis_url,
        "redis://[user:pass@]host[:port][/db], rediss://... (TLS) "
        "or unix:///path/redis.sock",
        secret=True,
    )
    redis_sentinels: tuple[tuple[str, int], ...] = setting(
        "REDIS_SENTINELS",
        "",
        _sentinels,
        "host:port,host:port of Redis Sentinels: the master is asked of them "
        "(REDIS_URL then gives only credentials, database and TLS)",
    )
    redis_sentinel_master: str = setting(
        "REDIS_SENTINEL_MASTER", "", _name, "the master's name, as the sentinels monitor it"
    )
    redis_sentinel_username: str | None = setting(
        "REDIS_SENTINEL_USERNAME", "", _optional_text, "ACL user for the sentinels"
    )
    redis_sentinel_password: str | None = setting(
        "REDIS_SENTINEL_PASSWORD", "", _optional_text, "password for the sentinels",
        secret=True,
    )
    redis_sentinel_tls: bool = setting(
        "REDIS_SENTINEL_TLS",
        "false",
        _boolean,
        "talk TLS to the sentinels (REDIS_TLS_CA_FILE and REDIS_TLS_CERT_FILE apply)",
    )
    redis_cluster: bool = setting(
        "REDIS_CLUSTER",
        "false",
        _boolean,
        "REDIS_URL names a node of a Redis Cluster: commands are routed by slot "
        "and sessions use sharded Pub/Sub (SSUBSCRIBE/SPUBLISH)",
    )
    redis_cluster_nodes: tuple[tuple[str, int], ...] = setting(
        "REDIS_CLUSTER_NODES",
        "",
        _cluster_nodes,
        "host:port,host:port: more nodes to discover the cluster from, besides "
        "REDIS_URL's (REDIS_CLUSTER=true)",
    )
    key_hash_tags: bool = setting(
        "KEY_HASH_TAGS",
        "false",
        _boolean,
        "spell a session's keys and channels session:{<id>}:... (one Redis Cluster "
        "slot per session; needed for RESUME with REDIS_CLUSTER)",
    )
    redis_tls_ca_file: str | None = setting(
        "REDIS_TLS_CA_FILE",
        "",
        _optional_file,
        "PEM file of CA certificates trusted for rediss:// (default: system CAs)",
    )
    redis_tls_cert_file: str | None = setting(
        "REDIS_TLS_CERT_FILE",
        "",
        _optional_file,
        "PEM client certificate (with its key, or see REDIS_TLS_KEY_FILE) for rediss://",
    )
    redis_tls_key_file: str | None = setting(
        "REDIS_TLS_KEY_FILE", "", _optional_file, "PEM private key of the client certificate"
    )
    auth_timeout: float = setting(
        "AUTH_TIMEOUT_SECS",
        "5",
        _positive_float,
        "deadline for the token check against Redis (then 504)",
    )
    auth_grace_period: int = setting(
        "AUTH_GRACE_PERIOD_SECS",
        "10800",
        _positive_int,
        "TTL set on the token after a successful connect",
    )
    auth_mode: tuple[AuthMethod, ...] = setting(
        "AUTH_MODE",
        "redis",
        _auth_mode,
        "how tokens are checked: redis (the token stored in session:{id}:auth), jwt "
        "(a JSON Web Token, checked on the CPU), or jwt,redis (either: for migrations)",
    )
    jwt_secret: str = setting(
        "JWT_SECRET", "", str, "AUTH_MODE=jwt: an HMAC secret (HS256/384/512), as given",
        secret=True,
    )
    jwt_secret_file: str | None = setting(
        "JWT_SECRET_FILE",
        "",
        _optional_file,
        "AUTH_MODE=jwt: HMAC secrets, one per line, all accepted (rotation); "
        "re-read on SIGHUP",
    )
    jwt_public_key_files: tuple[str, ...] = setting(
        "JWT_PUBLIC_KEY_FILE",
        "",
        _optional_files,
        "AUTH_MODE=jwt: comma list of PEM files of public keys or certificates "
        "(RSA, EC, Ed25519); re-read on SIGHUP",
    )
    jwt_jwks_file: str | None = setting(
        "JWT_JWKS_FILE",
        "",
        _optional_file,
        "AUTH_MODE=jwt: a JWK Set file (keys chosen by kid); re-read on SIGHUP",
    )
    jwt_jwks_url: str = setting(
        "JWT_JWKS_URL",
        "",
        _http_url,
        "AUTH_MODE=jwt: a JWK Set URL, fetched every JWT_JWKS_REFRESH_SECS and on "
        "a token with an unknown kid",
    )
    jwt_jwks_refresh: float = setting(
        "JWT_JWKS_REFRESH_SECS", "300", _positive_float,
        "how often JWT_JWKS_URL is fetched",
    )
    jwt_jwks_min_refresh: float = setting(
        "JWT_JWKS_MIN_REFRESH_SECS",
        "30",
        _non_negative_float,
        "an unknown kid fetches JWT_JWKS_URL at once, but at most once per this many seconds",
    )
    jwt_algorithms: tuple[str, ...] = setting(
        "JWT_ALGORITHMS",
        ",".join(JWT_ALGORITHMS),
        _jwt_algorithms,
        "comma list of the accepted algorithms (a token's alg also needs a key of its "
        "kind); none is never accepted",
    )
    jwt_require_exp: bool = setting(
        "JWT_REQUIRE_EXP", "false", _boolean, "refuse tokens without an exp claim"
    )
    jwt_leeway: float = setting(
        "JWT_LEEWAY_SECS", "0", _non_negative_float,
        "clock skew allowed when checking exp, nbf and iat",
    )
    jwt_audience: tuple[str, ...] = setting(
        "JWT_AUDIENCE",
        "",
        _claim_values,
        "comma list: a token's aud must name one of them (empty: a token with an aud "
        "is refused)",
    )
    jwt_issuer: str = setting(
        "JWT_ISSUER", "", _claim_value, "a token's iss must equal it (empty: iss not checked)"
    )
    jwt_max_token_bytes: int = setting(
        "JWT_MAX_TOKEN_BYTES", "8192", _positive_int, "longer tokens are refused unread"
    )
    jwt_expire_connections: bool = setting(
        "JWT_EXPIRE_CONNECTIONS",
        "false",
        _boolean,
        "close a connection when its token's exp passes (close code 3000, token "
        "expired); false: a connection outlives its token",
    )
    jwt_denylist: DenyList = setting(
        "JWT_DENYLIST",
        "off",
        _deny_list,
        "off, session (refuse while session:{id}:revoked exists) or jti (refuse while "
        "jwt:revoked:{jti} exists): one Redis read per JWT connection",
    )
    ping_interval: float = setting(
        "WS_PING_INTERVAL_SECS", "30", _non_negative_float, "server ping interval (0 disables)"
    )
    sse_retry_ms: int = setting(
        "SSE_RETRY_MS",
        "2000",
        _non_negative_int,
        "Server-Sent Events: the reconnection delay a stream tells EventSource "
        "(its first line, retry:), in milliseconds",
    )
    ping_timeout: float = setting(
        "WS_PING_TIMEOUT_SECS",
        "10",
        _positive_float,
        "close the connection if no pong arrives within this",
    )
    shutdown_grace_period: float = setting(
        "SHUTDOWN_GRACE_PERIOD_SECS",
        "30",
        _non_negative_float,
        "how long shutdown waits for clients to close",
    )
    shutdown_drain: float = setting(
        "SHUTDOWN_DRAIN_SECS",
        "5",
        _non_negative_float,
        "on shutdown, keep listening this long (/ready and new upgrades 503) "
        "so load balancers notice; 0 stops listening at once",
    )
    shutdown_close_delay: float = setting(
        "SHUTDOWN_CLOSE_DELAY_SECS",
        "0",
        _non_negative_float,
        "on shutdown, keep serving open clients this long (/ready already 503) "
        "before closing them with 1001, so that a load balancer has taken the "
        "instance out before they reconnect; at most SHUTDOWN_DRAIN_SECS; 0 "
        "closes them at once",
    )
    max_message_size: int = setting(
        "MAX_MESSAGE_SIZE_BYTES",
        "1048576",
        _positive_int,
        "largest client message accepted (larger: close 1009)",
    )
    max_send_buffer: int = setting(
        "WS_MAX_SEND_BUFFER_BYTES",
        "1048576",
        _positive_int,
        "per-connection outbound buffer cap (past it: close 1008 slow consumer)",
    )
    handshake_timeout: float = setting(
        "HANDSHAKE_TIMEOUT_SECS",
        "5",
        _positive_float,
        "deadline for a client to complete the opening handshake",
    )
    max_connections: int = setting(
        "MAX_CONNECTIONS",
        "0",
        _non_negative_int,
        "cap on concurrent WebSocket connections per process (0 = as many as the file "
        "descriptor limit allows; beyond it 503)",
    )
    gc_full_collection: float = setting(
        "GC_FULL_COLLECTION_SECS",
        "3600",
        _non_negative_float,
        "seconds between full garbage collections of every object, long-lived ones "
        "too (0 = never; see the docs, Deployment › Garbage collection)",
    )
    auth_fail_limit: int = setting(
        "AUTH_FAIL_LIMIT",
        "50",
        _non_negative_int,
        "failed token checks (401/403) from one client address within "
        "AUTH_FAIL_WINDOW_SECS after which its upgrades get 429 until the window "
        "ends (0 = no limit)",
    )
    auth_fail_window: float = setting(
        "AUTH_FAIL_WINDOW_SECS",
        "60",
        _positive_float,
        "the window of AUTH_FAIL_LIMIT, from an address's first failure",
    )
    auth_fail_table_size: int = setting(
        "AUTH_FAIL_TABLE_SIZE",
        "100000",
        _positive_int,
        "client addresses with recent failures remembered (past it, the least "
        "recently failed is forgotten)",
    )
    auth_fail_exempt: tuple[Network, ...] = setting(
        "AUTH_FAIL_EXEMPT",
        "",
        _networks,
        "comma list of addresses/CIDR networks never limited by AUTH_FAIL_LIMIT",
    )
    trusted_proxies: tuple[Network, ...] = setting(
        "TRUSTED_PROXIES",
        "",
        _networks,
        "comma list of addresses/CIDR networks of reverse proxies whose "
        "Forwarded/X-Forwarded-For names the client (empty: the TCP peer is the client)",
    )
    handshakes_per_turn: int = setting(
        "HANDSHAKES_PER_TURN",
        "16",
        _non_negative_int,
        "new connections whose request is read per event-loop turn; the others "
        "wait (unread) for the next turns, so open sessions are served first "
        "(0 = no bound)",
    )
    allowed_origins: tuple[str, ...] = setting(
        "ALLOWED_ORIGINS",
        "",
        _origins,
        "comma list of allowed Origin values (empty: any origin)",
    )
    require_origin: bool = setting(
        "REQUIRE_ORIGIN",
        "false",
        _boolean,
        "refuse upgrades without an Origin header (403; for browser-only deployments)",
    )
    require_json: bool = setting(
        "REQUIRE_JSON",
        "false",
        _boolean,
        "reject client text messages that are not valid JSON",
    )
    compression: bool = setting(
        "WS_COMPRESSION", "false", _boolean, "accept permessage-deflate (RFC 7692) offers"
    )
    resume: bool = setting(
        "RESUME",
        "false",
        _boolean,
        "resumable sessions: load the wsproxy Redis functions and let clients "
        "opt in with ?resume= to receive recoverable messages with positions",
    )
    history_max_length: int = setting(
        "HISTORY_MAX_LENGTH",
        "1000",
        _positive_int,
        "recoverable messages kept per session (approximately; oldest trimmed first)",
    )
    history_max_age: float = setting(
        "HISTORY_MAX_AGE_SECS",
        "300",
        _positive_float,
        "how long recoverable messages are kept; an idle session's history "
        "expires this long after its last message",
    )
    topics: bool = setting(
        "TOPICS",
        "false",
        _boolean,
        "group channels: each connection also receives the topics its session is in "
        "(the set session:<id>:topics read at admission, a JWT's topics claim, "
        "subscribe/unsubscribe on wsproxy:control); one PUBLISH topic:<name>:down "
        "reaches every socket of the topic",
    )
    topics_max_per_connection: int = setting(
        "TOPICS_MAX_PER_CONNECTION",
        "64",
        _positive_int,
        "topics one connection may be in; beyond it the rest are not joined "
        "(a warning names the session)",
    )
    topic_history_max_length: int = setting(
        "TOPIC_HISTORY_MAX_LENGTH",
        "1000",
        _positive_int,
        "recoverable messages kept per topic (approximately; oldest trimmed first)",
    )
    topic_history_max_age: float = setting(
        "TOPIC_HISTORY_MAX_AGE_SECS",
        "300",
        _positive_float,
        "how long recoverable topic messages are kept; an idle topic's history "
        "expires this long after its last message",
    )
    events: tuple[EventTarget, ...] = setting(
        "EVENTS",
        "",
        _event_targets,
        "lifecycle events (open/close of each socket), a comma list of: session "
        "(session:<id>:events), all (wsproxy:events), stream (wsproxy:events:stream); "
        "empty: off",
    )
    events_stream_max_length: int = setting(
        "EVENTS_STREAM_MAX_LENGTH",
        "100000",
        _positive_int,
        "events kept in wsproxy:events:stream (approximately; oldest trimmed first)",
    )
    upstream: UpstreamMode = setting(
        "UPSTREAM",
        "pubsub",
        _upstream,
        "pubsub: client messages are PUBLISHed on session:<id>:up; stream: appended "
        "(XADD) to the partition streams wsproxy:up:{p<n>}, for consumer groups",
    )
    upstream_partitions: int = setting(
        "UPSTREAM_PARTITIONS",
        "16",
        _partitions,
        "UPSTREAM=stream: number of partition streams (1-1024); a session always "
        "goes to partition crc32(session id) mod this. All instances and backends "
        "must agree on it",
    )
    upstream_stream_max_length: int = setting(
        "UPSTREAM_STREAM_MAX_LENGTH",
        "1000000",
        _positive_int,
        "UPSTREAM=stream: entries kept per partition stream (XADD MAXLEN ~; oldest "
        "trimmed first, read or not)",
    )
    upstream_max_in_flight: int = setting(
        "UPSTREAM_MAX_IN_FLIGHT",
        "128",
        _positive_int,
        "UPSTREAM=stream: appends per connection awaiting Redis's answer; beyond "
        "it reading from that client pauses",
    )
    frame_mode: FrameMode = setting(
        "FRAME_MODE",
        "auto",
        _frame_mode,
        "auto: UTF-8 payloads become text frames; tagged: payloads carry a "
        "t/b frame-type byte",
    )
    workers: int = setting(
        "WORKERS",
        "1",
        _positive_int,
        "worker processes sharing the listening socket (HOST/PORT only)",
    )
    log_level: LogLevelName = setting(
        "LOG_LEVEL", "info", _log_level, "debug, info, warn or error"
    )
    log_format: LogFormat = setting("LOG_FORMAT", "text", _log_format, "text or json")

    @property
    def jwt_key_sources(self) -> list[str]:
        """
        The settings that give JWT keys, of those set (C{AUTH_MODE=jwt}
        needs one).
        """
        return [name for name, given in (
            ("JWT_SECRET", self.jwt_secret), ("JWT_SECRET_FILE", self.jwt_secret_file),
            ("JWT_PUBLIC_KEY_FILE", self.jwt_public_key_files),
            ("JWT_JWKS_FILE", self.jwt_jwks_file), ("JWT_JWKS_URL", self.jwt_jwks_url),
        ) if given]

    @property
    def redis_description(self) -> str:
        """
        Where Redis is, for logs (never credentials).
        """
        if self.redis_sentinels:
            sentinels = ",".join(f"{h}:{p}" for h, p in self.redis_sentinels)
            return f"sentinel master {self.redis_sentinel_master!r} via {sentinels}"
        if self.redis_cluster:
            seeds = [self.redis.describe().split("://", 1)[-1]] + [
                f"{h}:{p}" for h, p in self.redis_cluster_nodes
            ]
            return f"cluster via {','.join(seeds)}"
        return self.redis.describe()

    @property
    def endpoint(self) -> str:
        """
        The server endpoint string to listen on.
        """
        if self.listen:
            return self.listen
        host = self.host.replace(":", "\\:")
        # Twisted's default backlog (50) drops SYNs when hundreds of clients
        # connect at once (e.g. all reconnecting after a restart)
        return f"tcp:{self.port}:interface={host}:backlog={self.listen_backlog}"


#: every setting, in declaration order: drives the twistd options, --help,
#: the environment variables, .env and validation
SETTINGS: tuple[Setting, ...] = tuple(
    replace(f.metadata["setting"], attr=f.name) for f in fields(Settings)
)


def load_settings(
    overrides: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | None = ".env",
) -> Settings:
    """
    Build L{Settings} from defaults, the C{.env} file, the environment and
    C{overrides} (keyed by environment variable name; C{None} values are
    ignored), later sources winning.

    @raise ConfigError: naming the first invalid variable.
    """
    raw: dict[str, str] = {s.env: s.default for s in SETTINGS}
    if dotenv_path and os.path.isfile(dotenv_path):
        for key, value in dotenv_values(dotenv_path).items():
            if key in raw and value is not None:
                raw[key] = value
    for key, value in (os.environ if environ is None else environ).items():
        if key in raw:
            raw[key] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    values = {}
    for setting in SETTINGS:
        text = raw[setting.env]
        try:
            values[setting.attr] = setting.parse(text.strip())
        except ValueError as e:
            shown = "" if setting.secret else f" {text!r}"
            reason = str(e) if setting.secret or not str(e).startswith(
                ("invalid literal", "could not convert")
            ) else "must be a number"
            raise ConfigError(f"{setting.env}: invalid value{shown}: {reason}") from None
    settings = Settings(**values)
    if settings.workers > 1 and settings.listen:
        raise ConfigError(
            "WORKERS: more than one worker needs HOST/PORT (the workers share a "
            "plain TCP socket); unset LISTEN or terminate TLS in front"
        )
    tls_files = [name for name, given in (
        ("REDIS_TLS_CA_FILE", settings.redis_tls_ca_file),
        ("REDIS_TLS_CERT_FILE", settings.redis_tls_cert_file),
        ("REDIS_TLS_KEY_FILE", settings.redis_tls_key_file),
    ) if given]
    if tls_files and not (settings.redis.tls or settings.redis_sentinel_tls):
        raise ConfigError(f"{tls_files[0]}: only valid with a rediss:// REDIS_URL")
    if settings.redis_sentinels and not settings.redis_sentinel_master:
        raise ConfigError("REDIS_SENTINEL_MASTER: required with REDIS_SENTINELS")
    sentinel_only: tuple[tuple[str, object], ...] = (
        ("REDIS_SENTINEL_MASTER", settings.redis_sentinel_master),
        ("REDIS_SENTINEL_USERNAME", settings.redis_sentinel_username),
        ("REDIS_SENTINEL_PASSWORD", settings.redis_sentinel_password),
        ("REDIS_SENTINEL_TLS", settings.redis_sentinel_tls),
    )
    for name, given in sentinel_only:
        if given and not settings.redis_sentinels:
            raise ConfigError(f"{name}: only valid with REDIS_SENTINELS")
    if settings.redis_sentinels and settings.redis.path is not None:
        raise ConfigError("REDIS_URL: a unix:// address cannot be combined with REDIS_SENTINELS")
    if settings.redis_cluster_nodes and not settings.redis_cluster:
        raise ConfigError("REDIS_CLUSTER_NODES: only valid with REDIS_CLUSTER=true")
    if settings.redis_cluster:
        if settings.redis_sentinels:
            raise ConfigError(
                "REDIS_CLUSTER: cannot be combined with REDIS_SENTINELS (a cluster fails "
                "over by itself)"
            )
        if settings.redis.path is not None:
            raise ConfigError("REDIS_URL: a unix:// address cannot be combined with REDIS_CLUSTER")
        if settings.redis.db:
            raise ConfigError("REDIS_URL: a Redis Cluster has only database 0")
        if settings.resume and not settings.key_hash_tags:
            raise ConfigError(
                "RESUME: on a Redis Cluster resumable sessions need KEY_HASH_TAGS=true "
                "(a session's history, meta and live channel in one slot)"
            )
    if "jwt" in settings.auth_mode and not settings.jwt_key_sources:
        raise ConfigError(
            "AUTH_MODE: jwt needs a key: JWT_SECRET, JWT_SECRET_FILE, JWT_PUBLIC_KEY_FILE, "
            "JWT_JWKS_FILE or JWT_JWKS_URL"
        )
    if settings.redis_tls_key_file and not settings.redis_tls_cert_file:
        raise ConfigError("REDIS_TLS_KEY_FILE: only valid with REDIS_TLS_CERT_FILE")
    return settings
