"""
Configuration: one typed L{Settings} object built from, in increasing order
of precedence, built-in defaults, a C{.env} file, the process environment and
command-line options.

Every setting is described once, in L{SETTINGS}; the twistd options, the
C{--help} text, the environment variable names and the validation all come
from that table.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

from .frames import FRAME_MODES

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")


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


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered == "warning":
            lowered = "warn"
        if lowered not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return lowered

    return parse


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


def _optional_file(value: str) -> str | None:
    if value and not (os.path.isfile(value) and os.access(value, os.R_OK)):
        raise ValueError("no such readable file")
    return value or None


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
    One configuration item: its environment variable, option name, default
    (as the text a user would write), parser and help text.
    """

    env: str
    attr: str
    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def option(self) -> str:
        return self.env.lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("HOST", "host", "0.0.0.0", _host, "listen interface"),
    Setting("PORT", "port", "8080", _port, "listen port"),
    Setting(
        "LISTEN",
        "listen",
        "",
        _endpoint,
        "Twisted endpoint string (tcp:8080:interface=127.0.0.1, "
        "ssl:8443:privateKey=key.pem:certKey=cert.pem); overrides HOST/PORT",
    ),
    Setting(
        "REDIS_URL",
        "redis",
        "redis://127.0.0.1:6379",
        parse_redis_url,
        "redis://[user:pass@]host[:port][/db], rediss://... (TLS) "
        "or unix:///path/redis.sock",
        secret=True,
    ),
    Setting(
        "REDIS_TLS_CA_FILE",
        "redis_tls_ca_file",
        "",
        _optional_file,
        "PEM file of CA certificates trusted for rediss:// (default: system CAs)",
    ),
    Setting(
        "REDIS_TLS_CERT_FILE",
        "redis_tls_cert_file",
        "",
        _optional_file,
        "PEM client certificate (with its key, or see REDIS_TLS_KEY_FILE) for rediss://",
    ),
    Setting(
        "REDIS_TLS_KEY_FILE",
        "redis_tls_key_file",
        "",
        _optional_file,
        "PEM private key of the client certificate",
    ),
    Setting(
        "AUTH_TIMEOUT_SECS",
        "auth_timeout",
        "5",
        _positive_float,
        "deadline for the token check against Redis (then 504)",
    ),
    Setting(
        "AUTH_GRACE_PERIOD_SECS",
        "auth_grace_period",
        "10800",
        _positive_int,
        "TTL set on the token after a successful connect",
    ),
    Setting(
        "WS_PING_INTERVAL_SECS",
        "ping_interval",
        "30",
        _non_negative_float,
        "server ping interval (0 disables)",
    ),
    Setting(
        "WS_PING_TIMEOUT_SECS",
        "ping_timeout",
        "10",
        _positive_float,
        "close the connection if no pong arrives within this",
    ),
    Setting(
        "SHUTDOWN_GRACE_PERIOD_SECS",
        "shutdown_grace_period",
        "30",
        _non_negative_float,
        "how long shutdown waits for clients to close",
    ),
    Setting(
        "SHUTDOWN_DRAIN_SECS",
        "shutdown_drain",
        "5",
        _non_negative_float,
        "on shutdown, keep listening this long (/ready and new upgrades 503) "
        "so load balancers notice; 0 stops listening at once",
    ),
    Setting(
        "MAX_MESSAGE_SIZE_BYTES",
        "max_message_size",
        "1048576",
        _positive_int,
        "largest client message accepted (larger: close 1009)",
    ),
    Setting(
        "WS_MAX_SEND_BUFFER_BYTES",
        "max_send_buffer",
        "1048576",
        _positive_int,
        "per-connection outbound buffer cap (past it: close 1008 slow consumer)",
    ),
    Setting(
        "HANDSHAKE_TIMEOUT_SECS",
        "handshake_timeout",
        "5",
        _positive_float,
        "deadline for a client to complete the opening handshake",
    ),
    Setting(
        "MAX_CONNECTIONS",
        "max_connections",
        "0",
        _non_negative_int,
        "cap on concurrent WebSocket connections (0 = unlimited; beyond it 503)",
    ),
    Setting(
        "ALLOWED_ORIGINS",
        "allowed_origins",
        "",
        _origins,
        "comma list of allowed Origin values (empty: any origin)",
    ),
    Setting(
        "REQUIRE_ORIGIN",
        "require_origin",
        "false",
        _boolean,
        "refuse upgrades without an Origin header (403; for browser-only deployments)",
    ),
    Setting(
        "REQUIRE_JSON",
        "require_json",
        "false",
        _boolean,
        "reject client text messages that are not valid JSON",
    ),
    Setting(
        "WS_COMPRESSION",
        "compression",
        "false",
        _boolean,
        "accept permessage-deflate (RFC 7692) offers",
    ),
    Setting(
        "FRAME_MODE",
        "frame_mode",
        "auto",
        _choice(*FRAME_MODES),
        "auto: UTF-8 payloads become text frames; tagged: payloads carry a "
        "t/b frame-type byte",
    ),
    Setting(
        "WORKERS",
        "workers",
        "1",
        _positive_int,
        "worker processes sharing the listening socket (HOST/PORT only)",
    ),
    Setting(
        "LOG_LEVEL",
        "log_level",
        "info",
        _choice(*LOG_LEVELS),
        "debug, info, warn or error",
    ),
    Setting("LOG_FORMAT", "log_format", "text", _choice(*LOG_FORMATS), "text or json"),
)


@dataclass(frozen=True)
class Settings:
    """
    The proxy's whole configuration, already validated and typed.
    """

    host: str = "0.0.0.0"
    port: int = 8080
    listen: str = ""
    redis: RedisAddress = field(default_factory=RedisAddress)
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    auth_timeout: float = 5.0
    auth_grace_period: int = 10800
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    shutdown_grace_period: float = 30.0
    shutdown_drain: float = 5.0
    max_message_size: int = 1048576
    max_send_buffer: int = 1048576
    handshake_timeout: float = 5.0
    max_connections: int = 0
    allowed_origins: tuple[str, ...] = ()
    require_origin: bool = False
    require_json: bool = False
    compression: bool = False
    frame_mode: str = "auto"
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"

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
        return f"tcp:{self.port}:interface={host}:backlog=1024"


assert {s.attr for s in SETTINGS} == {f.name for f in fields(Settings)}


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
    tls_files = [s.env for s in SETTINGS if s.parse is _optional_file and values[s.attr]]
    if tls_files and not settings.redis.tls:
        raise ConfigError(f"{tls_files[0]}: only valid with a rediss:// REDIS_URL")
    if settings.redis_tls_key_file and not settings.redis_tls_cert_file:
        raise ConfigError("REDIS_TLS_KEY_FILE: only valid with REDIS_TLS_CERT_FILE")
    return settings
