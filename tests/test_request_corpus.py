"""
One decision per request, whatever reads it.

A seeded corpus of a few thousand upgrade requests (every handshake header
missing, repeated, in other cases and spacings, with invalid values;
reordered headers; other HTTP versions and methods; bodies; fragments and
odd targets; tokens presented once, twice, in several ways; control bytes;
heads over the lean parser's and twisted.web's limits) goes through the
in-memory proxy twice: with the lean parser (L{wsproxy.edge.upgrade.lean_upgrade})
and with it switched off (twisted.web reads every request). Everything the
client and Redis see must be identical: the response (all of it but
C{Date}), whether the connection was closed, every Redis command, every
message published, the counted outcomes and the failed authorizations.
A subset is sent a byte at a time too.

Each request is also held to the rules that made this necessary
(L{check_rules}): a refused handshake sends no Redis command (so it never
renews a token's TTL nor counts as a failed authorization); a request with
a body never becomes a WebSocket; no response names a C{Server}.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from twisted.trial.unittest import SynchronousTestCase

import txaio

from .memory import WS_KEY, MemoryProxy, MemoryTestCase, client_frame, memory_settings

PATH = "/agent/ws/s1"
TOKEN = "tok"
TTL = 600

#: a browser's upgrade, plus an Authorization header
BASE: list[tuple[str, str]] = [
    ("Host", "proxy.example"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", WS_KEY),
    ("Sec-WebSocket-Version", "13"),
    ("Authorization", f"Bearer {TOKEN}"),
]

#: headers a request may add
EXTRA: list[tuple[str, str]] = [
    ("Origin", "https://app.example"),
    ("Sec-WebSocket-Protocol", "chat"),
    ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
    ("User-Agent", "corpus/1.0"),
    ("X-Forwarded-For", "192.0.2.1"),
    ("Expect", "100-continue"),
    ("Cookie", "a=b"),
]

#: other values, valid or not, for each header
VALUES: dict[str, list[str]] = {
    "Host": ["proxy.example:443", "proxy.example:abc", "a b", "", "[::1]", "[::1]:8080",
             "[zz]", "proxy.example:", "127.0.0.1", "x/y", "ex\u00e4mple", "a:1:2", "::1",
             "h%41st", "host:99999", "proxy.example "],
    "Upgrade": ["WebSocket", "websocketx", "notwebsocket", "h2c, websocket", "websocket/13",
                "", "h2c", "WEBSOCKET ", "web socket"],
    "Connection": ["upgrade", "keep-alive, Upgrade", "xupgrade", "close", "", "Upgrade, close",
                   "upgrades"],
    "Sec-WebSocket-Key": ["x" * 24, "dGhlIHNhbXBsZSBub25jZQ=", "dGhlIHNhbXBsZSBub25jZR==",
                          "!GhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA==", "",
                          "dGhlIHNhbXBsZSBub25jZQ==x", "dGhlIHNhbXBsZSBub25jZQ"],
    "Sec-WebSocket-Version": ["8", "99", "12", "013", "13, 8", "thirteen", "", "7", " 13"],
    "Authorization": ["Bearer nope", "bearer tok", "Bearer", "Basic dG9rOg==", "Bearer  tok ",
                      "Token tok", "Bearer t\u00f6k"],
    "Origin": ["null", "https://app.example:443", "http://[::1", "https://a:b", "file:///x",
               "no-scheme", "https://", "HTTPS://APP.EXAMPLE"],
    "Sec-WebSocket-Protocol": ["bearer, tok", "chat, chat", "bearer", "chat, bearer, tok",
                               "bearer, nope", ", ,"],
    "Sec-WebSocket-Extensions": ["permessage-deflate; bogus", "permessage-deflate; "
                                 "server_max_window_bits=99", "x-unknown", "permessage-deflate",
                                 "permessage-deflate; client_max_window_bits=10"],
    "User-Agent": ["", "\u00ff"],
    "X-Forwarded-For": ["", "not-an-address"],
    "Expect": ["100-continue", "200-ok"],
    "Cookie": [""],
}

TARGETS = [
    PATH, f"{PATH}?access_token={TOKEN}", f"{PATH}?access_token=nope",
    f"{PATH}?access_token={TOKEN}&access_token=nope", f"{PATH}?access_token=&access_token={TOKEN}",
    f"{PATH}?access%5Ftoken={TOKEN}&access_token={TOKEN}", f"{PATH}#frag",
    f"{PATH}?access_token={TOKEN}#frag", f"{PATH}#", f"{PATH};p", "/agent/ws/s%31",
    "/agent/ws/bad:id", "/agent/ws/", "/nope", "/health", "/ready", "/metrics", "*",
    f"http://proxy.example{PATH}", f"//proxy.example{PATH}", "//[::1" + PATH, "agent/ws/s1",
    f"{PATH}?x=\u00a0", f"{PATH}?resume=", f"{PATH}?x=1&y=2", f"{PATH}?access_token",
    f"{PATH}?ack=1",
]

VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "http/1.1", "HTTP/1.1 x", "HTTP/0.9"]
METHODS = ["GET", "HEAD", "POST", "OPTIONS", "get", "PUT"]

FRAME = client_frame(b"from-the-body")


@dataclass
class Request:
    """
    A request to build: its parts, so that mutations compose.
    """

    method: str = "GET"
    target: str = PATH
    version: str = "HTTP/1.1"
    headers: Optional[list[tuple[str, str]]] = None
    body: bytes = b""
    #: what ends the head's lines (but the last)
    line_end: str = "\r\n"
    #: what the client sends right behind the request
    behind: bytes = b""

    def encode(self) -> bytes:
        headers = BASE if self.headers is None else self.headers
        lines = [f"{self.method} {self.target} {self.version}"]
        lines += [f"{name}: {value}" for name, value in headers]
        head = (self.line_end.join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        if any(ord(c) > 255 for c in self.target + "".join(v for _, v in headers)):
            head = (self.line_end.join(lines) + "\r\n\r\n").encode("utf-8")
        return head + self.body + self.behind


def with_headers(headers: list[tuple[str, str]], **kwargs: Any) -> Request:
    return Request(headers=headers, **kwargs)


def corpus(seed: int = 22) -> Iterator[tuple[str, bytes]]:
    """
    The requests, named, in a fixed order.
    """
    rng = random.Random(seed)
    full = BASE + EXTRA
    yield "base", Request().encode()
    yield "full", with_headers(full).encode()
    for i, (name, value) in enumerate(full):
        others = [h for h in full if h[0] != name]
        yield f"{name} missing", with_headers(others).encode()
        yield f"{name} twice", with_headers(full[:i + 1] + [(name, value)] + full[i + 1:]).encode()
        for alternative in VALUES.get(name, []):
            replaced = full[:i] + [(name, alternative)] + full[i + 1:]
            yield f"{name}: {alternative!r}", with_headers(replaced).encode()
            yield f"{name} and {alternative!r}", with_headers(
                full[:i + 1] + [(name, alternative)] + full[i + 1:]).encode()
        for spelled in (name.upper(), name.lower(), name.swapcase()):
            yield f"{spelled}", with_headers(full[:i] + [(spelled, value)] + full[i + 1:]).encode()
        # spacing around the value, and before the colon
        for fmt in ("{n}:{v}", "{n}:  {v}  ", "{n}:\t{v}\t", "{n} : {v}", "{n}:{v} \t "):
            line = fmt.format(n=name, v=value)
            raw = with_headers(full).encode().replace(
                f"{name}: {value}".encode("latin-1"), line.encode("latin-1"), 1)
            yield f"{name} spaced {fmt!r}", raw
        # obsolete line folding
        raw = with_headers(full).encode().replace(
            f"{name}: {value}".encode("latin-1"), f"{name}:\r\n {value}".encode("latin-1"), 1)
        yield f"{name} folded", raw
        # odd bytes in the value
        for byte in (b"\x00", b"\x01", b"\x0b", b"\x7f", b"\x85", b"\xa0", b"\n", b"\r", b"\xff"):
            raw = with_headers(full).encode().replace(
                f"{name}: {value}".encode("latin-1"),
                f"{name}: {value}".encode("latin-1") + byte + b"x", 1)
            yield f"{name} with {byte!r}", raw
    for target in TARGETS:
        yield f"target {target!r}", Request(target=target).encode()
        yield f"target {target!r} no auth", with_headers(BASE[:-1], target=target).encode()
    for version in VERSIONS:
        yield f"version {version}", Request(version=version).encode()
        yield f"version {version}, two Hosts", with_headers(
            [("Host", "a.example")] + BASE, version=version).encode()
    for method in METHODS:
        yield f"method {method}", Request(method=method).encode()
        yield f"method {method} *", Request(method=method, target="*").encode()
    # bodies
    for announced, body in (
        (f"Content-Length: {len(FRAME)}", FRAME),
        ("Content-Length: 0", b""),
        ("Content-Length: 3", FRAME),
        ("Content-Length: abc", FRAME),
        (f"Content-Length: {len(FRAME)}\r\nContent-Length: {len(FRAME)}", FRAME),
        ("Transfer-Encoding: chunked", b"%x\r\n" % len(FRAME) + FRAME + b"\r\n0\r\n\r\n"),
        ("Transfer-Encoding: identity", FRAME),
        ("Content-Length: 70000", FRAME),
        ("Transfer-Encoding: gzip", FRAME),
        (f"Transfer-Encoding: chunked\r\nContent-Length: {len(FRAME)}", FRAME),
    ):
        for version in ("HTTP/1.1", "HTTP/1.0"):
            raw = Request(version=version).encode().replace(
                b"\r\n\r\n", b"\r\n" + announced.encode() + b"\r\n\r\n", 1) + body
            yield f"body {announced!r} {version}", raw
            raw = Request(version=version, target=f"{PATH}?access_token=nope").encode().replace(
                b"\r\n\r\n", b"\r\n" + announced.encode() + b"\r\n\r\n", 1) + body
            yield f"body {announced!r} {version} wrong token", raw
    # frames right behind the request (no body: they are the WebSocket's)
    yield "frames behind", Request(behind=FRAME + client_frame(b"two")).encode()
    # tokens in several ways
    for target in (PATH, f"{PATH}?access_token={TOKEN}", f"{PATH}?access_token=nope"):
        for auth in ([], [("Authorization", f"Bearer {TOKEN}")],
                     [("Authorization", "Bearer nope")],
                     [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")],
                     [("Authorization", "Basic x")]):
            for protocol in ([], [("Sec-WebSocket-Protocol", f"bearer, {TOKEN}")],
                             [("Sec-WebSocket-Protocol", "bearer, nope")]):
                yield (f"tokens {target} {auth} {protocol}",
                       with_headers(BASE[:-1] + auth + protocol, target=target).encode())
    # limits: the lean parser's, twisted.web's
    yield "65 headers", with_headers(BASE + [(f"X-{i}", "v") for i in range(65)]).encode()
    yield "head over 8 KiB", with_headers(BASE + [("X-Pad", "p" * 8200)]).encode()
    yield "head over 16 KiB in lines", with_headers(
        BASE + [(f"X-Pad-{i}", "p" * 1000) for i in range(17)]).encode()
    yield "501 headers", with_headers(BASE + [(f"X-{i}", "") for i in range(501)]).encode()
    yield "one line over 16 KiB", with_headers(BASE + [("X-Pad", "p" * 17000)]).encode()
    yield "bare LF line ends", Request(line_end="\n").encode()
    yield "empty line first", b"\r\n" + Request().encode()
    yield "two requests", Request().encode() + Request().encode()
    yield "double space", Request().encode().replace(b"GET /", b"GET  /", 1)
    # reordered and combined
    for n in range(1200):
        headers = list(full)
        rng.shuffle(headers)
        for _ in range(rng.randrange(0, 4)):
            i = rng.randrange(len(headers))
            name, value = headers[i]
            choice = rng.randrange(5)
            if choice == 0:
                del headers[i]
            elif choice == 1:
                headers.insert(i, (name, value))
            elif choice == 2 and VALUES.get(name):
                headers[i] = (name, rng.choice(VALUES[name]))
            elif choice == 3:
                headers.insert(rng.randrange(len(headers) + 1),
                               (name, rng.choice(VALUES.get(name) or [value])))
            else:
                headers[i] = (rng.choice([name.upper(), name.lower()]), value)
        target = rng.choice(TARGETS[:12])
        version = rng.choice(["HTTP/1.1"] * 6 + ["HTTP/1.0"])
        yield f"mixed {n}", with_headers(headers, target=target, version=version).encode()


@dataclass(frozen=True)
class Outcome:
    """
    What the client and Redis saw of one request.
    """

    response: bytes
    closed: bool
    commands: tuple[tuple[Any, ...], ...]
    published: tuple[tuple[bytes, bytes], ...]
    outcomes: tuple[tuple[str, int], ...]
    auth_failures: int
    ttl: Optional[int]

    @property
    def status(self) -> Optional[int]:
        match = re.match(rb"HTTP/1\.[01] (\d{3})", self.response)
        return int(match.group(1)) if match else None


def _own(args: tuple[Any, ...]) -> bool:
    """
    A command of the process's own (canary, control): not the request's.
    """
    for arg in args[:2]:
        if isinstance(arg, bytes):
            arg = arg.decode("latin-1")
        if isinstance(arg, str) and arg.startswith("wsproxy:"):
            return True
    return False


_DATE = re.compile(rb"\r\nDate: [^\r]*", re.I)


class Site:
    """
    One in-memory proxy whose site reads plain upgrades itself or not.
    """

    def __init__(self, lean: bool) -> None:
        self.memory = MemoryProxy(memory_settings(auth_fail_limit=0))
        site = self.memory.site
        site.lean = lean
        #: how many requests twisted.web read
        self.read_by_twisted = 0
        factory = site.requestFactory

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.read_by_twisted += 1
            return factory(*args, **kwargs)

        site.requestFactory = counting  # type: ignore[assignment]
        #: handshakes Autobahn refused on its own (not an admission's
        #: Refusal): the site's rules are to leave it none
        self.autobahn_refused: list[str] = []
        protocol = site.ws_factory.protocol
        fail = protocol.failHandshake

        def failHandshake(proto: Any, reason: str, code: int = 400, headers: Any = None) -> None:
            if proto._refusal is None:
                self.autobahn_refused.append(f"{code} {reason}")
            fail(proto, reason, code, headers)

        protocol.failHandshake = failHandshake  # type: ignore[method-assign]

    def send(self, data: bytes, chunk: int = 0) -> Outcome:
        memory = self.memory
        redis = memory.redis
        redis.authorize("s1", TOKEN, ttl=TTL)
        start = len(redis.log)
        published = len(redis.published)
        outcomes = dict(memory.proxy.stats.outcomes)
        failures = memory.proxy.auth_limit.failures
        client = memory.connect()
        if chunk:
            for i in range(0, len(data), chunk):
                client.send(data[i:i + chunk])
        else:
            client.send(data)
        memory.clock.advance(0)
        if not client.closed and b" 101 " not in client.transport.value()[:16]:
            # a request left waiting (an announced body not sent in full):
            # the head deadline ends it
            memory.clock.advance(memory.settings.handshake_timeout + 1)
        response = _DATE.sub(b"", client.transport.value())
        if b"\r\n# HELP " in response:
            # /metrics: the counters of this proxy (timings differ)
            response = response.partition(b"\r\n")[0]
        closed = bool(client.closed)
        ttl = redis.ttl.get("session:s1:auth")
        if not closed:
            client.leave()
        memory.clock.advance(0)
        now = memory.proxy.stats.outcomes
        return Outcome(
            response=response,
            closed=closed,
            commands=tuple(c.args for c in redis.log[start:] if not _own(c.args)),
            published=tuple(p for p in redis.published[published:] if not _own(p)),
            outcomes=tuple(sorted((k, now[k] - outcomes.get(k, 0)) for k in now
                                  if now[k] != outcomes.get(k, 0))),
            auth_failures=memory.proxy.auth_limit.failures - failures,
            ttl=ttl,
        )

    def stop(self) -> None:
        self.memory.stop()


def announces_body(data: bytes) -> bool:
    head = data.partition(b"\r\n\r\n")[0].lower()
    lengths = re.findall(rb"\ncontent-length:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n|$)", head)
    return lengths not in ([], [b"0"]) or b"\ntransfer-encoding:" in head


def check_rules(test: SynchronousTestCase, name: str, data: bytes, outcome: Outcome) -> None:
    """
    The rules every request is held to, whichever parser read it.
    """
    status = outcome.status
    test.assertNotIn(b"\r\nserver:", outcome.response.partition(b"\r\n\r\n")[0].lower(), name)
    if [c for c in outcome.commands if c != ("PING",)]:
        # Redis was asked (but by /health): only after the request was
        # accepted as a handshake
        test.assertIn(status, (101, 401, 403), (name, outcome))
    if status in (400, 431, 505):
        test.assertEqual(outcome.commands, (), name)
        test.assertEqual(outcome.ttl, TTL, name)
        test.assertEqual(outcome.auth_failures, 0, name)
    if announces_body(data):
        test.assertNotEqual(status, 101, name)
        test.assertEqual(outcome.published, (), name)


class RequestCorpusTests(MemoryTestCase):
    """
    The lean parser and twisted.web decide every request of the corpus
    alike, and by the rules.
    """

    def setUp(self) -> None:
        super().setUp()
        self.lean, self.full = Site(lean=True), Site(lean=False)
        self.addCleanup(self.lean.stop)
        self.addCleanup(self.full.stop)

    def both(self, name: str, data: bytes, chunk: int = 0) -> Outcome:
        txaio.config.loop = self.lean.memory.clock
        lean = self.lean.send(data, chunk)
        txaio.config.loop = self.full.memory.clock
        full = self.full.send(data, chunk)
        self.assertEqual(lean, full, f"{name}: {data[:300]!r}")
        check_rules(self, name, data, lean)
        return lean

    def test_corpus(self) -> None:
        """
        Over a thousand requests: identical outcomes with and without the
        lean parser, every one by the rules, none refused by Autobahn
        itself (the site's decision comes first); and a spread of statuses
        (the corpus does reach the 101, every refusal and twisted.web's own
        answers).
        """
        statuses: dict[Optional[int], int] = {}
        count = 0
        for name, data in corpus():
            outcome = self.both(name, data)
            statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
            count += 1
        self.assertGreater(count, 1500)
        for status in (101, 200, 400, 401, 403, 404, 413, 426, 431, 505):
            self.assertIn(status, statuses)
        # Autobahn never had to refuse a request itself
        self.assertEqual(self.lean.autobahn_refused + self.full.autobahn_refused, [])
        # twisted.web read every request of one, a share of the other's
        self.assertGreaterEqual(self.full.read_by_twisted, count)
        self.assertLess(self.lean.read_by_twisted, self.full.read_by_twisted - 1000)

    def test_split_at_every_byte(self) -> None:
        """
        A subset, sent a byte at a time: the same outcome as sent at once,
        with and without the lean parser.
        """
        rng = random.Random(7)
        requests = list(corpus())
        for name, data in rng.sample(requests, 40) + requests[:2]:
            whole = self.both(name, data)
            self.assertEqual(self.both(name, data, chunk=1), whole, name)
