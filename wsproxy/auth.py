"""
Who may open a session: session-id validation, token extraction and the
token check against Redis.

The decision table (every refusal is a L{Refusal} carrying the HTTP status):

    ====================================  ======
    no token presented                     401 (with WWW-Authenticate: Bearer)
    key missing, expired or different      403
    Redis unreachable                      503
    Redis did not answer in time           504
    ====================================  ======

A failed check never touches the key; a successful one sets its TTL to the
grace period, which is what lets a client reconnect with the same token
until the grace period runs out.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import unquote

import txredisapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from .redis import RedisTimeout, RedisUnavailable

SESSION_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}\Z")

#: the subprotocol name that marks a token in Sec-WebSocket-Protocol
BEARER_SUBPROTOCOL = "bearer"

REALM_HEADER = ("WWW-Authenticate", 'Bearer realm="wsproxy"')


@dataclass(frozen=True)
class Refusal(Exception):
    """
    The handshake is refused with an HTTP status and a short reason.
    """

    code: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"

    def response(self) -> bytes:
        """
        The complete HTTP response: status line, headers, the reason as a
        plain-text body, and C{Connection: close}.
        """
        body = (self.reason + "\n").encode("utf-8")
        head = [f"HTTP/1.1 {self.code} {self.reason}"]
        head += [f"{name}: {value}" for name, value in self.headers]
        head += [
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "",
            "",
        ]
        return "\r\n".join(head).encode("utf-8") + body


def parse_ws_path(path: str) -> Optional[tuple[str, str]]:
    """
    Split C{/{agent_id}/ws/{session_id}} into (agent_id, session_id).

    @return: C{None} if the path does not have that shape (404); the parts
        otherwise, percent-decoded. The session id still has to be checked
        with L{valid_session_id} (400).
    """
    parts = path.split("?", 1)[0].split("/")
    if len(parts) != 4 or parts[0] != "" or parts[2] != "ws" or not parts[1] or not parts[3]:
        return None
    return unquote(parts[1]), unquote(parts[3])


def valid_session_id(session_id: str) -> bool:
    return SESSION_ID.match(session_id) is not None


def auth_key(session_id: str) -> str:
    return f"session:{session_id}:auth"


def down_channel(session_id: str) -> str:
    return f"session:{session_id}:down"


def up_channel(session_id: str) -> bytes:
    return f"session:{session_id}:up".encode()


@dataclass(frozen=True)
class Credentials:
    """
    A presented token and how it came.

    @ivar source: C{"header"}, C{"query"} or C{"subprotocol"}; for the
        latter the server must answer with the C{bearer} subprotocol.
    """

    token: str
    source: str


def extract_token(
    headers: Mapping[str, str],
    params: Mapping[str, Sequence[str]],
    protocols: Sequence[str],
) -> Optional[Credentials]:
    """
    Find the bearer token in, by precedence, the C{Authorization} header,
    the C{Sec-WebSocket-Protocol} pair C{bearer, <token>}, or the
    C{access_token} query parameter (RFC 6750 section 2.3).

    @param headers: request headers with lower-case names.
    """
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return Credentials(value.strip(), "header")
    if BEARER_SUBPROTOCOL in protocols:
        index = protocols.index(BEARER_SUBPROTOCOL)
        if index + 1 < len(protocols) and protocols[index + 1]:
            return Credentials(protocols[index + 1], "subprotocol")
    tokens = params.get("access_token")
    if tokens and tokens[0]:
        return Credentials(tokens[0], "query")
    return None


def tokens_match(stored: Any, presented: str) -> bool:
    """
    Compare in constant time (for tokens of equal length).
    """
    if not isinstance(stored, bytes):
        return False
    return hmac.compare_digest(stored, presented.encode("utf-8"))


async def check_token(
    execute: Any,
    session_id: str,
    credentials: Optional[Credentials],
    grace_period: int,
) -> None:
    """
    Check C{credentials} against C{session:{session_id}:auth} and, on
    success, reset the key's TTL to C{grace_period}.

    @param execute: sends one Redis command, like L{RedisLink.execute}.
    @raise Refusal: 401, 403, 503 or 504 (see the module docstring).
    """
    if credentials is None:
        raise Refusal(401, "Missing bearer token", (REALM_HEADER,))
    key = auth_key(session_id)
    try:
        stored = await execute("GET", key)
        if not tokens_match(stored, credentials.token):
            raise Refusal(403, "Invalid or expired token")
        renewed = await execute("EXPIRE", key, grace_period)
    except (RedisUnavailable, txredisapi.ResponseError):
        # a Redis error (NOAUTH, NOPERM after an ACL change, ...) is the
        # server side's problem, never the client's
        raise Refusal(503, "Redis unavailable") from None
    except (RedisTimeout, defer.TimeoutError, defer.CancelledError):
        raise Refusal(504, "Redis timeout") from None
    if renewed in (0, b"0"):
        # the key expired between GET and EXPIRE
        raise Refusal(403, "Invalid or expired token")


def with_deadline(
    d: defer.Deferred, seconds: float, clock: IReactorTime
) -> defer.Deferred:
    """
    Fail C{d} with L{RedisTimeout} unless it fires within C{seconds}.
    Used once per handshake, never per message.
    """

    def timed_out(result: Any, timeout: float) -> Any:
        raise RedisTimeout(f"no answer within {timeout:g}s")

    return d.addTimeout(seconds, clock, onTimeoutCancel=timed_out)
