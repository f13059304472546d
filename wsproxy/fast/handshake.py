"""
The opening handshake of a request the site already read, without Autobahn
reading it a second time.

The site's lean parser (L{wsproxy.edge.upgrade.lean_upgrade}) reads a plain
upgrade request, and L{wsproxy.edge.upgrade.refusal} refuses everything
Autobahn's server handshake refuses, so the request the WebSocket protocol
is handed (L{wsproxy.edge.handoff}) is one Autobahn accepts. Autobahn's
C{processHandshake} would still parse its head again, the request target
with C{urlparse}, and check each header again: about a tenth of a set-up's
CPU. L{read} sets what C{processHandshake} sets on the protocol, from the
values the site read, and goes on exactly as it does (the
C{ConnectionRequest}, C{onConnect}, then C{succeedHandshake} or
C{failHandshake}).

L{read} takes only what it reads exactly as Autobahn would: anything else
(a target C{urlparse} would split otherwise, an origin Autobahn would not
allow, a version it does not speak, an option such as C{trustXForwardedFor}
that makes Autobahn read more) is left to Autobahn, which then reads the
bytes itself (L{read} returns C{False}, having changed nothing). The
start-up check (L{wsproxy.fast.borrowed}, C{autobahn.server-handshake})
compares both on sample requests, attribute by attribute, and switches
this off (L{ENABLED}) if they differ.
"""

from __future__ import annotations

import re
from typing import Any
from urllib import parse

import txaio
from autobahn.websocket import protocol as _autobahn
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest

#: switched off by the start-up check (wsproxy.fast.borrowed) when
#: Autobahn's handshake no longer reads a request as L{read} does
ENABLED = True

_CONNECTING = _autobahn.WebSocketProtocol.STATE_CONNECTING
#: (the module the start-up check probes)
AUTOBAHN = _autobahn
#: a key as Autobahn checks it: 24 characters, 22 of the base64 alphabet, "=="
_KEY = re.compile(r"[A-Za-z0-9+/]{22}==\Z")


def _lists(value: str | None, word: str) -> bool:
    # as Autobahn reads Upgrade and Connection (the one word alone first)
    return value is not None and (value.lower() == word or any(
        item.strip().lower() == word for item in value.split(",")))


def read(protocol: Any, headers: dict[bytes, list[bytes]], data: bytes) -> bool:
    """
    Start the opening handshake of C{protocol} (an Autobahn server
    protocol, just connected) with the request in C{data} (its head, and
    whatever the client sent behind it), whose header lines the lean parser
    read into C{headers} (values by lower-case name, stripped, in order).

    @return: C{False} if Autobahn is to read C{data} itself (nothing was
        changed); C{True} if the handshake went on as Autobahn's would.
    """
    factory = protocol.factory
    if (not ENABLED or protocol.state != _CONNECTING or protocol.data
            or protocol.trustXForwardedFor or protocol.logOctets
            or protocol.maxConnections or factory.externalPort):
        return False
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = data[:end + 4]
    line = head[:head.find(b"\r\n")].decode("latin-1").strip(" ")
    words = line.split()
    # what urlparse makes of an origin-form target without params or fragment
    if len(words) != 3 or words[0] != "GET" or words[2] != "HTTP/1.1":
        return False
    uri = words[1]
    if uri[:1] != "/" or uri[:2] == "//" or ";" in uri or "#" in uri:
        return False
    # (as parseHttpHeader joins the lines of a repeated header)
    http_headers = {name.decode("latin-1"): values[0].decode("latin-1") if len(values) == 1
                    else ", ".join([v.decode("latin-1") for v in values])
                    for name, values in headers.items()}
    host = http_headers.get("host")
    version_value = http_headers.get("sec-websocket-version")
    key = http_headers.get("sec-websocket-key")
    if (host is None or version_value is None or key is None or len(headers[b"host"]) != 1
            or len(headers[b"sec-websocket-version"]) != 1
            or len(headers[b"sec-websocket-key"]) != 1
            or not _lists(http_headers.get("upgrade"), "websocket")
            or not _lists(http_headers.get("connection"), "upgrade")):
        return False
    path, _, query = uri.partition("?")
    host = host.strip()
    if ":" in host and not host.endswith("]"):
        host, port = host.rsplit(":", 1)
        try:
            int(port.strip())
        except ValueError:
            return False
    try:
        version = int(version_value)
    except ValueError:
        return False
    if version not in protocol.versions:
        return False
    protocols: list[str] = []
    offered = http_headers.get("sec-websocket-protocol")
    if offered is not None:
        protocols = [str(x.strip()) for x in offered.split(",")]
        if len(set(protocols)) != len(protocols):
            return False
    origin_key = "sec-websocket-origin" if version < 13 else "origin"
    origin = ""
    origin_value = http_headers.get(origin_key)
    if origin_value is not None:
        if len(headers[origin_key.encode()]) > 1:
            return False
        origin = origin_value.strip()
        try:
            origin_tuple = _autobahn._url_to_origin(origin)
        except ValueError:
            return False
        if not (origin_tuple == "null" and factory.allowNullOrigin) and not (
            _autobahn._is_same_origin(
                origin_tuple, "https" if factory.isSecure else "http",
                factory.externalPort or factory.port, protocol.allowedOriginsPatterns,
            )
        ):
            return False
    key = key.strip()
    if not _KEY.match(key):
        return False
    extensions: list[Any] = []
    offers = http_headers.get("sec-websocket-extensions")
    if offers is not None:
        if len(headers[b"sec-websocket-extensions"]) > 1:
            return False
        extensions = protocol._parseExtensionsHeader(offers)
    # as Autobahn's _dataReceived counts them (the class's shared counters)
    protocol.trafficStats.preopenIncomingOctetsWireLevel += len(data)
    # what processHandshake sets, in its order
    protocol.http_request_data = head
    protocol.http_status_line = line
    protocol.http_headers = http_headers
    protocol.http_request_uri = uri
    protocol.http_request_path = path
    protocol.http_request_params = parse.parse_qs(query) if query else {}
    protocol.http_request_host = host
    protocol.websocket_version = version
    protocol.websocket_protocols = protocols
    protocol.websocket_origin = origin
    protocol.websocket_extensions = extensions
    protocol.data = data[end + 4:]
    protocol._wskey = key
    request = ConnectionRequest(
        protocol.peer, http_headers, host, path, protocol.http_request_params, version,
        origin, protocols, extensions,
    )

    def forward_error(err: Any) -> Any:
        # as processHandshake's own
        if isinstance(err.value, ConnectionDeny):
            protocol.failHandshake(err.value.reason, err.value.code)
            return None
        protocol.log.warn("Unexpected exception in onConnect ['{err.value}']", err=err)
        protocol.log.warn("{tb}", tb=txaio.failure_format_traceback(err))  # type: ignore[attr-defined]
        return protocol.failHandshake(
            f"Internal server error: {err.value}", ConnectionDeny.INTERNAL_SERVER_ERROR,
        )

    txaio.add_callbacks(  # type: ignore[attr-defined]
        txaio.as_future(protocol.onConnect, request),  # type: ignore[attr-defined]
        protocol.succeedHandshake, forward_error,
    )
    return True
