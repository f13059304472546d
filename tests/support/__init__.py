"""
Test support, one module per kind of fixture; the names most tests need
are re-exported here.

  - L{tests.support.base}: C{ROOT}, L{wait_for} (a deadline on a
    condition, never a sleep), L{clean_autobahn_timers}, L{free_port}.
  - L{tests.support.redis}: real redis-servers (plain, TLS-only, Unix
    socket only, a sentinel watching one) and L{RedisTestCase}.
  - L{tests.support.sentinel}, L{tests.support.cluster}: the Redis
    Sentinel and Redis Cluster rigs (real processes; also what
    C{bin/dev sentinel} and C{bin/dev cluster} run).
  - L{tests.support.daemon}: the real daemon as a child process, with a
    clean environment, always stopped at clean-up.
  - L{tests.support.proxy}: the proxy in the test's reactor.
  - L{tests.support.clients}: WebSocket clients (Autobahn).
  - L{tests.support.senders}: many acknowledging clients sending numbered
    messages, and what a stream holds of them (planned failovers).
  - L{tests.support.http}: upgrade requests, raw HTTP and raw-socket
    clients.
  - L{tests.support.frames}: WebSocket frames on the wire.
  - L{tests.support.balancers}: HAProxy and nginx with the committed
    configurations of C{deploy/}, always stopped at clean-up.
  - L{tests.support.fakes}: the fake Redis (server and links) and the
    other stand-ins for collaborators.

Test modules import from here, never from one another.
"""

from .base import ROOT, clean_autobahn_timers, free_port, wait_for
from .clients import (BackendListener, Client, EventLog, collector, connect, exchange_messages,
                      up_listener)
from .daemon import (
    LISTENING,
    PYTHON_M_WSPROXY,
    SETTING_VARIABLES,
    TWISTD,
    TWISTD_WSPROXY,
    Daemon,
    ProcessOutput,
    clean_environ,
    daemon_env,
    run_process,
    start_daemon,
)
from .http import (
    WS_ACCEPT,
    WS_KEY,
    RawClient,
    attempt,
    http_get,
    open_raw,
    raw_exchange,
    raw_upgrade,
    stalled_socket,
    stalled_upgrade,
    status_of,
    tls_endpoint,
    upgrade_request,
)
from .proxy import ProxyTestCase, RunningProxy, settings_for, start_proxy
from .redis import (
    RedisServer,
    RedisTestCase,
    SentinelServer,
    TlsRedisServer,
    UnixRedisServer,
    redis_server,
    redis_server_binary,
)
from .sentinel import start_rig

__all__ = [
    "LISTENING", "PYTHON_M_WSPROXY", "ROOT", "SETTING_VARIABLES", "TWISTD", "TWISTD_WSPROXY",
    "WS_ACCEPT", "WS_KEY", "BackendListener", "Client", "EventLog", "Daemon", "ProxyTestCase", "RawClient", "RedisServer",
    "RedisTestCase", "RunningProxy", "ProcessOutput", "SentinelServer", "TlsRedisServer",
    "UnixRedisServer", "attempt", "clean_autobahn_timers", "clean_environ", "collector",
    "connect", "daemon_env", "exchange_messages", "free_port", "http_get", "open_raw",
    "raw_exchange", "raw_upgrade", "run_process", "redis_server", "redis_server_binary", "start_rig", "settings_for", "stalled_socket", "stalled_upgrade",
    "start_daemon", "start_proxy", "status_of", "tls_endpoint", "up_listener", "upgrade_request", "wait_for",
]
