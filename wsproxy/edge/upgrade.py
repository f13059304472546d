"""
A WebSocket upgrade request, whichever parser read it, and the one decision
on whether it is an acceptable opening handshake (L{refusal}).

Two parsers read requests on the proxy's port: L{lean_upgrade}, for the
plain upgrades browsers, apps and load balancers send, and twisted.web for
everything else (L{wsproxy.edge.site}). Both make an L{Upgrade}, and L{refusal}
decides on it the same way, right after the failed-authorization screen
(429) and before the token is looked at: a refused request costs no Redis
command, never renews a token's TTL and never counts as a failed
authorization.

It refuses everything Autobahn's server handshake refuses
(C{WebSocketServerProtocol.processHandshake}, and the compression offers
C{succeedHandshake} parses after C{onConnect}), with the status Autobahn
gives, so that Autobahn, which reads the request again, only ever sees
requests it accepts; and what HTTP and the RFCs ask of an upgrade on top of
that:

  - HTTP/1.1 only (RFC 6455 section 4.1): 505, as Autobahn answers an
    HTTP/1.0 request line;
  - no body: no C{Transfer-Encoding} and no C{Content-Length} but a
    single C{Content-Length: 0} (which some HTTP client libraries add to
    every request, and which announces no body); a body would otherwise be
    read as WebSocket frames (RFC 9112 section 6);
  - a request target of visible ASCII without a fragment;
  - no control bytes (but HTAB) in header values, nor NEL (Python's
    C{str.splitlines()} splits on it);
  - exactly one C{Host}, a valid C{host[:port]} (RFC 9112 section 3.2);
  - C{Upgrade} naming C{websocket}, C{Connection} naming C{upgrade};
  - one C{Sec-WebSocket-Version}, 13 or 8 (else 400 with the versions
    supported, RFC 6455 section 4.2.2);
  - no subprotocol offered twice; at most one, valid, C{Origin};
  - one C{Sec-WebSocket-Key}, the base64 form of 16 bytes;
  - at most one C{Sec-WebSocket-Extensions}, whose compression offers parse;
  - the token presented at most once (L{wsproxy.session.auth.repeated_token}).

Which requests are upgrades at all (L{names_websocket}) is decided once too:
a C{GET} whose C{Upgrade} header lines mention C{websocket}.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

from autobahn.websocket.compress import PERMESSAGE_COMPRESSION_EXTENSION

from ..session.auth import REPEATED_TOKEN, repeated_token
from ..refusal import Refusal

#: the longest request head the lean parser reads (longer ones, rare and
#: legitimate or not, are twisted.web's, with its limits and its 431)
LEAN_HEAD_MAX = 8192
#: the most header lines it reads
LEAN_HEADERS_MAX = 64
#: a request head the lean parser reads: C{GET}, an origin-form target of
#: visible ASCII, HTTP/1.1, then header lines with token names (no blank
#: before the colon) and values without control bytes (but HTAB), DEL or
#: NEL (which str.splitlines() splits on); one pass, linear (a value cannot
#: hold the CR that starts the next line)
_LEAN_HEAD = re.compile(
    rb"GET (/[\x21-\x7e]*) HTTP/1\.1"
    rb"((?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\x84\x86-\xff]*)*)\Z"
)
#: one header line of a head L{_LEAN_HEAD} matched: name, value
_LEAN_LINE = re.compile(rb"\r\n([^:]+):([^\r]*)")
#: bytes never accepted in a header value: any control byte but HTAB (CR
#: and LF included), DEL, and NEL (as L{_LEAN_HEAD})
_UNSAFE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f\x85]")
#: what no request target may hold: anything but visible ASCII, a fragment
_BAD_TARGET = re.compile(rb"[^\x21-\x7e]|#")
#: RFC 9112 section 3.2 / RFC 3986 section 3.2.2: an IP literal or a
#: reg-name (which covers IPv4 addresses), and an optional port
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]+)?\Z")
#: the base64 form of 16 bytes (RFC 6455 section 4.1, item 7)
_KEY = re.compile(rb"[A-Za-z0-9+/]{21}[AQgw]==\Z")
#: the WebSocket versions spoken (Autobahn's: RFC 6455, and hybi-10's 8)
_VERSIONS = (b"13", b"8")
#: sent with a refused version (RFC 6455 section 4.2.2)
SUPPORTED_VERSIONS = ("Sec-WebSocket-Version", "13, 8")


class Upgrade:
    """
    A WebSocket upgrade request as the site decides on it.

    @ivar target: the request target (path and query), as sent.
    @ivar version: the HTTP version of the request line (C{b"HTTP/1.1"}).
    @ivar headers: values by lower-case name, in the order sent, one per
        header line.
    @ivar raw: the request as Autobahn is to read it, and whatever the
        client sent behind it.
    @ivar lean: read by L{lean_upgrade}: its head is C{raw}'s, and
        C{headers} is what Autobahn would read from it (the WebSocket
        protocol then takes them as they are, L{wsproxy.fast.handshake}).
    """

    __slots__ = ("target", "version", "headers", "raw", "lean")

    def __init__(self, target: bytes, headers: dict[bytes, list[bytes]], raw: bytes,
                 version: bytes = b"HTTP/1.1", lean: bool = False) -> None:
        self.target = target
        self.version = version
        self.headers = headers
        self.raw = raw
        self.lean = lean

    @property
    def path(self) -> str:
        return self.target.partition(b"?")[0].decode("latin-1")

    def header(self, name: str) -> Optional[str]:
        """
        A header's value by lower-case name (repeated headers joined with
        commas), or C{None}.
        """
        values = self.headers.get(name.encode("latin-1"))
        return b",".join(values).decode("latin-1") if values else None


def names_websocket(upgrade: Sequence[bytes]) -> bool:
    """
    Whether C{Upgrade} header lines (all of them) make a C{GET} request a
    WebSocket upgrade, to be decided by L{refusal}; a request that does not
    is an ordinary one (C{/health}, 404, 426 Upgrade Required).
    """
    return b"websocket" in b",".join(upgrade).lower()


def lean_upgrade(head: bytes, raw: bytes) -> Optional[Upgrade]:
    """
    Read a request head (up to its blank line, excluded) if it is a plain
    WebSocket upgrade: C{GET <origin-form target> HTTP/1.1}, header lines
    C{name: value} with token names, no control bytes, no
    C{Content-Length} and no C{Transfer-Encoding}, C{Upgrade} lines naming
    C{websocket} (L{names_websocket}), at most L{LEAN_HEADERS_MAX} headers.
    Anything else, valid or not (HTTP/1.0, obsolete line folding, a body,
    odd bytes), is C{None}: twisted.web reads it, as every other request.
    What is read here is what twisted.web would have read (the same target,
    the same values, stripped of blanks alike), so L{refusal} decides it as
    it would have.

    Browsers, apps and the load balancers in front of them send upgrades
    in this form: reading them here spares each one twisted.web's request
    and header objects (a third of a refused upgrade's CPU).
    """
    match = _LEAN_HEAD.match(head)
    if match is None:
        return None
    lines = _LEAN_LINE.findall(match.group(2))
    if len(lines) > LEAN_HEADERS_MAX:
        return None
    headers: dict[bytes, list[bytes]] = {}
    for name, value in lines:
        headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    if b"content-length" in headers or b"transfer-encoding" in headers:
        # the body's framing (and its errors) are twisted.web's
        return None
    upgrade = headers.get(b"upgrade")
    if upgrade is None or not names_websocket(upgrade):
        return None
    return Upgrade(match.group(1), headers, raw, lean=True)


#: the one C{Content-Length} an upgrade may carry: it announces no body
_NO_BODY = [b"0"]


def _bad(reason: str, *headers: tuple[str, str]) -> Refusal:
    return Refusal(400, reason, headers)


def _lists(values: Optional[list[bytes]], word: str) -> bool:
    """
    Whether comma-separated header lines name C{word} (as Autobahn reads
    C{Upgrade} and C{Connection}: items stripped, case-insensitive).
    """
    if values is None:
        return False
    return any(item.strip().lower() == word
               for value in values for item in value.decode("latin-1").split(","))


def _valid_host(value: bytes) -> bool:
    match = _HOST.match(value)
    if match is None:
        return False
    host = match.group(1)
    if host.startswith(b"["):
        try:
            ipaddress.IPv6Address(host[1:-1].decode("ascii"))
        except ValueError:
            return False
    return True


@lru_cache(maxsize=64)
def _valid_origin(value: str) -> bool:
    """
    Whether Autobahn reads C{value} as an origin (C{_url_to_origin}): C{null},
    a C{file:} URL, or a URL with a host and a valid port. Which origins are
    allowed is L{wsproxy.session.proxy.Proxy.precheck}'s (403).
    """
    if value.lower() == "null":
        return True
    try:
        parts = urlsplit(value)
        if parts.scheme.lower() == "file":
            return True
        host = parts.hostname
        parts.port
    except ValueError:
        return False
    return bool(host)


def _extension_offers(header: str) -> list[tuple[str, dict[str, list[Any]]]]:
    """
    C{Sec-WebSocket-Extensions} as Autobahn parses it
    (C{WebSocketProtocol._parseExtensionsHeader}): (name, parameters).
    """
    offers = []
    for offer in (item.strip() for item in header.split(",")):
        if not offer:
            continue
        parts = [part.strip() for part in offer.split(";")]
        params: dict[str, list[Any]] = {}
        for param in parts[1:]:
            pieces = [piece.strip() for piece in param.split("=")]
            value: Any = True
            if len(pieces) > 1:
                value = "=".join(pieces[1:])
                if value[:1] == '"':
                    value = value[1:]
                if value[-1:] == '"':
                    value = value[:-1]
            params.setdefault(pieces[0].lower(), []).append(value)
        offers.append((parts[0].lower(), params))
    return offers


@lru_cache(maxsize=64)
def _valid_extensions(value: bytes) -> bool:
    """
    Whether Autobahn accepts C{Sec-WebSocket-Extensions: value}: its
    compression offers parse. (Browsers send a few values over and over:
    the answers are kept.)
    """
    for name, params in _extension_offers(value.decode("latin-1")):
        compression = PERMESSAGE_COMPRESSION_EXTENSION.get(name)
        if compression is not None:
            offer: Any = compression["Offer"]
            try:
                offer.parse(params)
            except Exception:
                return False
    return True


def refusal(upgrade: Upgrade) -> Optional[Refusal]:
    """
    Whether a WebSocket upgrade request (L{names_websocket}) is refused as a
    handshake, and how (see the module docstring for the rules, in the
    order they are applied); C{None} if it is acceptable, which leaves the
    path, the origin's policy, the token and everything else that needs
    state to the admission (L{wsproxy.session.proxy.Proxy}).
    """
    if upgrade.version != b"HTTP/1.1":
        return Refusal(505, "HTTP Version Not Supported")
    target = upgrade.target
    if _BAD_TARGET.search(target):
        return _bad("Invalid request target")
    if b"[" in target or b"]" in target:
        try:
            urlsplit(target.decode("ascii"))
        except ValueError:
            return _bad("Invalid request target")
    headers = upgrade.headers
    if _UNSAFE.search(b"".join(map(b"".join, headers.values()))):
        return _bad("Invalid header")
    if b"transfer-encoding" in headers or headers.get(b"content-length", _NO_BODY) != _NO_BODY:
        return _bad("Upgrade request with a body")
    host = headers.get(b"host")
    if host is None:
        return _bad("Host header missing")
    if len(host) != 1:
        return _bad("Host header repeated")
    if not _valid_host(host[0]):
        return _bad("Invalid Host header")
    if not _lists(headers.get(b"upgrade"), "websocket"):
        return _bad("Upgrade header does not name websocket")
    if not _lists(headers.get(b"connection"), "upgrade"):
        return _bad("Connection header does not name upgrade")
    version = headers.get(b"sec-websocket-version")
    if version is None or len(version) != 1 or version[0] not in _VERSIONS:
        return _bad("Unsupported WebSocket version", SUPPORTED_VERSIONS)
    protocols: list[str] = []
    offered = headers.get(b"sec-websocket-protocol")
    if offered is not None:
        protocols = [item.strip() for value in offered
                     for item in value.decode("latin-1").split(",")]
        if len(set(protocols)) != len(protocols):
            return _bad("Duplicate subprotocol")
    origin = headers.get(b"origin" if version[0] == b"13" else b"sec-websocket-origin")
    if origin is not None and (
        len(origin) != 1 or not _valid_origin(origin[0].decode("latin-1").strip())
    ):
        return _bad("Invalid Origin header")
    key = headers.get(b"sec-websocket-key")
    if key is None or len(key) != 1 or not _KEY.match(key[0]):
        return _bad("Invalid Sec-WebSocket-Key")
    extensions = headers.get(b"sec-websocket-extensions")
    if extensions is not None and (len(extensions) != 1 or not _valid_extensions(extensions[0])):
        return _bad("Invalid Sec-WebSocket-Extensions")
    authorization = headers.get(b"authorization", [])
    _, _, query = target.partition(b"?")
    if (len(authorization) > 1 or query or protocols) and repeated_token(
        [value.decode("latin-1") for value in authorization], protocols,
        query.decode("ascii"),
    ):
        return Refusal(*REPEATED_TOKEN)
    return None
