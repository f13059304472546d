"""
The request rules, one finding each (issue 22), on the in-memory proxy:
each test sends the request as the outside check did, with the lean parser
and with twisted.web reading it (L{both}), and pins what the client and
Redis see. The same findings against the real daemon and redis-server are
in C{tests/test_hostile.py} (L{tests.test_hostile.RequestRuleTests}).
"""

from __future__ import annotations

from typing import Any, Iterator

from .memory import (
    MemoryClient,
    MemoryProxy,
    MemoryTestCase,
    client_frame,
    upgrade_request,
)

PATH = "/agent/ws/s1"
GOOD = {"Authorization": "Bearer tok"}
WRONG = {"Authorization": "Bearer nope"}


class RequestRulesTests(MemoryTestCase):

    def both(self) -> Iterator[MemoryProxy]:
        """
        A fresh proxy with the lean parser, then one without it (twisted.web
        reads every request), each with C{tok} stored for C{s1} (TTL 600).
        """
        for lean in (True, False):
            memory = self.start()
            memory.site.lean = lean
            memory.redis.authorize("s1", "tok", ttl=600)
            yield memory

    def send(self, memory: MemoryProxy, data: bytes) -> MemoryClient:
        client = memory.connect()
        client.send(data)
        return client

    def assert_refused_untouched(self, memory: MemoryProxy, client: MemoryClient,
                                 status: str) -> Any:
        """
        C{client} was answered C{status} and the connection closed; no
        Redis command was sent (the token's TTL is as stored), nothing was
        published, no failed authorization counted, one refusal counted.
        """
        response = client.response()
        self.assertEqual(response.status, status)
        self.assertTrue(client.closed)
        self.assertEqual([c.args for c in memory.redis.log], [])
        self.assertEqual(memory.redis.ttl["session:s1:auth"], 600)
        self.assertEqual(memory.redis.published, [])
        self.assertEqual(memory.proxy.auth_limit.failures, 0)
        self.assertEqual(memory.proxy.stats.outcomes, {status.split()[1]: 1})
        return response

    # -- finding 1 ---------------------------------------------------------

    def test_upgrade_with_a_body(self) -> None:
        """
        An upgrade request with a body (here a masked frame, announced by
        Content-Length, or chunked; any Content-Length but a single C{0},
        see L{test_content_length_zero}) is refused 400 before any Redis
        command: the body is never read as WebSocket frames, never
        published.
        """
        frame = client_frame(b"smuggled")
        for announced, body in ((b"Content-Length: %d" % len(frame), frame),
                                (b"Transfer-Encoding: chunked",
                                 b"%x\r\n" % len(frame) + frame + b"\r\n0\r\n\r\n"),
                                (b"Content-Length: 00", b"")):
            for memory in self.both():
                request = upgrade_request(PATH, GOOD).replace(
                    b"\r\n\r\n", b"\r\n" + announced + b"\r\n\r\n") + body
                client = self.send(memory, request)
                self.assert_refused_untouched(
                    memory, client, "HTTP/1.1 400 Upgrade request with a body")

    def test_content_length_zero(self) -> None:
        """
        One C{Content-Length: 0} announces no body (some HTTP client
        libraries add it to every request): the upgrade is admitted by
        either parser, and a frame sent right behind the request is the
        WebSocket's, published as the client's first message.
        """
        frame = client_frame(b"first")
        for memory in self.both():
            request = upgrade_request(PATH, GOOD).replace(
                b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n")
            client = self.send(memory, request + frame)
            self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
            self.assertEqual(memory.redis.published, [(b"session:s1:up", b"first")])

    # -- finding 2 ---------------------------------------------------------

    def test_http_1_0(self) -> None:
        """
        An HTTP/1.0 upgrade is refused 505 (RFC 6455 section 4.1 needs
        HTTP/1.1; Autobahn's answer to an HTTP/1.0 request line), with one
        Host line or two, by either parser, before any Redis command.
        """
        for extra in (b"", b"Host: other.example\r\n"):
            for memory in self.both():
                request = upgrade_request(PATH, GOOD).replace(
                    b"HTTP/1.1\r\n", b"HTTP/1.0\r\n" + extra)
                client = self.send(memory, request)
                self.assert_refused_untouched(
                    memory, client, "HTTP/1.1 505 HTTP Version Not Supported")

    # -- finding 3 ---------------------------------------------------------

    def test_refused_handshakes_never_reach_the_token(self) -> None:
        """
        Requests the WebSocket handshake refuses are refused (400) before
        the token is looked at, with a good token (its TTL not renewed) and
        with a wrong one (not answered 403, not counted towards
        AUTH_FAIL_LIMIT).
        """
        plain = upgrade_request(PATH).decode()
        cases = {
            "two Hosts": plain.replace("Host:", "Host: a.example\r\nHost:"),
            "websocketx": plain.replace("Upgrade: websocket", "Upgrade: websocketx"),
            "notwebsocket": plain.replace("Upgrade: websocket", "Upgrade: notwebsocket"),
            "xupgrade": plain.replace("Connection: Upgrade", "Connection: xupgrade"),
            "key not of 16 bytes": plain.replace("dGhlIHNhbXBsZSBub25jZQ==", "x" * 24),
            "port not a number": plain.replace("Host: proxy.example", "Host: proxy.example:abc"),
            "fragment": plain.replace(PATH, PATH + "#f"),
            "compression offer": plain.replace(
                "\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate; bogus\r\n\r\n"),
        }
        for name, text in cases.items():
            for token in (GOOD, WRONG):
                for memory in self.both():
                    request = text.replace("\r\n\r\n", "\r\nAuthorization: "
                                           + token["Authorization"] + "\r\n\r\n")
                    client = self.send(memory, request.encode())
                    status = client.response().status
                    self.assertTrue(status.startswith("HTTP/1.1 400 "), (name, status))
                    self.assertEqual([c.args for c in memory.redis.log], [], name)
                    self.assertEqual(memory.redis.ttl["session:s1:auth"], 600, name)
                    self.assertEqual(memory.proxy.auth_limit.failures, 0, name)
                    self.assertEqual(memory.proxy.stats.outcomes, {"400": 1}, name)

    def test_ack_refused_before_the_token(self) -> None:
        """
        C{?ack=1} on a Pub/Sub proxy is refused 400 by the admission before
        its token check, also with a header token (which the site would
        otherwise have compared, and its TTL renewed, first).
        """
        for memory in self.both():
            client = self.send(memory, upgrade_request(PATH + "?ack=1", GOOD))
            self.assert_refused_untouched(
                memory, client, "HTTP/1.1 400 Acknowledgements need UPSTREAM=stream")

    # -- finding 5 ---------------------------------------------------------

    def test_unsupported_version_names_the_supported(self) -> None:
        """
        A refused Sec-WebSocket-Version (99, none, two) is answered 400
        with the versions spoken (RFC 6455 section 4.2.2).
        """
        plain = upgrade_request(PATH, GOOD)
        for request in (plain.replace(b"Version: 13", b"Version: 99"),
                        plain.replace(b"Sec-WebSocket-Version: 13\r\n", b""),
                        plain.replace(b"Version: 13", b"Version: 13\r\nSec-WebSocket-Version: 13")):
            for memory in self.both():
                client = self.send(memory, request)
                self.assertEqual(client.response().header("Sec-WebSocket-Version"), "13, 8")
                client._read = 0
                self.assert_refused_untouched(
                    memory, client, "HTTP/1.1 400 Unsupported WebSocket version")

    # -- finding 6 ---------------------------------------------------------

    def test_invalid_host(self) -> None:
        """
        A Host that is not C{host[:port]} (RFC 9112 section 3.2) is
        refused 400; valid ones (a name, an IPv4 or bracketed IPv6 address,
        with or without a port) are admitted.
        """
        for host in ("a b", "", "x/y", "proxy.example:", "[zz]", "::1", "a:1:2"):
            for memory in self.both():
                request = upgrade_request(PATH, GOOD).replace(
                    b"Host: proxy.example", b"Host: " + host.encode())
                client = self.send(memory, request)
                self.assert_refused_untouched(memory, client, "HTTP/1.1 400 Invalid Host header")
        for host in ("proxy.example:443", "127.0.0.1", "[::1]:8080", "xn--bcher-kva.example"):
            for memory in self.both():
                request = upgrade_request(PATH, GOOD).replace(
                    b"Host: proxy.example", b"Host: " + host.encode())
                client = self.send(memory, request)
                self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")

    # -- finding 7 ---------------------------------------------------------

    def test_repeated_token(self) -> None:
        """
        A token presented twice is a malformed request (RFC 6750 section
        3.1, invalid_request): 400 before any Redis command, whether in two
        query parameters, two Authorization headers, or two ways at once
        (header and query, header and subprotocol, subprotocol and query).
        """
        plain = upgrade_request(PATH)
        cases = {
            "two parameters": upgrade_request(PATH + "?access_token=tok&access_token=nope"),
            "an empty one first": upgrade_request(PATH + "?access_token=&access_token=tok"),
            "two headers": plain.replace(
                b"\r\n\r\n", b"\r\nAuthorization: Bearer tok\r\nAuthorization: Bearer nope\r\n\r\n"),
            "header and query": upgrade_request(PATH + "?access_token=tok", GOOD),
            "header and subprotocol": upgrade_request(
                PATH, {**GOOD, "Sec-WebSocket-Protocol": "bearer, tok"}),
            "subprotocol and query": upgrade_request(
                PATH + "?access_token=tok", {"Sec-WebSocket-Protocol": "bearer, tok"}),
        }
        for name, request in cases.items():
            for memory in self.both():
                client = self.send(memory, request)
                self.assert_refused_untouched(
                    memory, client, "HTTP/1.1 400 Token presented more than once")

    def test_one_token_one_way(self) -> None:
        """
        A token presented once, in any of the three ways, with a
        non-bearer Authorization header or an empty parameter beside it,
        is checked as before.
        """
        cases = [
            upgrade_request(PATH, GOOD),
            upgrade_request(PATH + "?access_token=tok"),
            upgrade_request(PATH, {"Sec-WebSocket-Protocol": "bearer, tok"}),
            upgrade_request(PATH + "?access_token=tok", {"Authorization": "Basic eDp5"}),
            upgrade_request(PATH + "?access_token=", GOOD),
        ]
        for request in cases:
            for memory in self.both():
                client = self.send(memory, request)
                self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols",
                                 request)

    # -- finding 8 ---------------------------------------------------------

    def test_asterisk_form(self) -> None:
        """
        C{OPTIONS *} is answered 200 with the methods served, C{GET *} 400;
        neither names a Server (nor does any other answer).
        """
        for memory in self.both():
            client = self.send(memory, b"OPTIONS * HTTP/1.1\r\nHost: proxy.example\r\n\r\n")
            response = client.response()
            self.assertEqual(response.status, "HTTP/1.1 200 OK")
            self.assertEqual(response.header("Allow"), "GET, HEAD")
            self.assertEqual(response.header("Content-Length"), "0")
            self.assertIsNone(response.header("Server"))
            client = self.send(memory, b"GET * HTTP/1.1\r\nHost: proxy.example\r\n\r\n")
            response = client.response()
            self.assertEqual(response.status, "HTTP/1.1 400 Bad Request")
            self.assertIsNone(response.header("Server"))

    # -- finding 9 ---------------------------------------------------------

    def test_head_over_16_kib_in_lines(self) -> None:
        """
        A request head over 16 KiB in lines of 1 KiB each, and one of more
        header lines than twisted.web takes, are answered 431 (as one line
        over 16 KiB is), not an empty 400; each is counted as a refusal.
        """
        lines = {f"X-Pad-{i}": "p" * 1000 for i in range(17)}
        many = {f"X-{i}": "" for i in range(501)}
        for headers in (lines, many, {"X-Pad": "p" * 17000}):
            for memory in self.both():
                client = self.send(memory, upgrade_request(PATH, {**GOOD, **headers}))
                self.assertEqual(client.response().status,
                                 "HTTP/1.1 431 Request Header Fields Too Large")
                self.assertTrue(client.closed)
                self.assertEqual(memory.redis.log, [])
                self.assertEqual(memory.proxy.stats.outcomes, {"431": 1})
