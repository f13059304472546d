"""
The token: where a client presents it, and whether it matches the one the
backend stored in C{session:{id}:auth}.

    ====================================  ======
    no token presented                     401 (with WWW-Authenticate: Bearer)
    key missing, expired or different      403
    ====================================  ======

A failed check never touches the key; a successful one sets its TTL to the
grace period, which is what lets a client reconnect with the same token
until the grace period runs out. Redis errors are not decided here: they
propagate to the admission (L{wsproxy.proxy.Proxy.admit}), which answers
503 or 504.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Mapping, Optional, Sequence

from .names import auth_key
from .refusal import Refusal

#: the subprotocol name that marks a token in Sec-WebSocket-Protocol
BEARER_SUBPROTOCOL = "bearer"

REALM_HEADER = ("WWW-Authenticate", 'Bearer realm="wsproxy"')

TokenSource = Literal["header", "subprotocol", "query"]


@dataclass(frozen=True)
class Credentials:
    """
    A presented token and how it came.

    @ivar source: for C{"subprotocol"} the server must answer with the
        C{bearer} subprotocol.
    """

    token: str
    source: TokenSource


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


def tokens_match(stored: object, presented: str) -> bool:
    """
    Compare in constant time (for tokens of equal length).
    """
    if not isinstance(stored, bytes):
        return False
    return hmac.compare_digest(stored, presented.encode("utf-8"))


#: the 401 refusal's code, reason and headers
MISSING_TOKEN = (401, "Missing bearer token", (REALM_HEADER,))

#: sends one Redis command and gives its reply, like L{RedisLink.execute}
Execute = Callable[..., Awaitable[object]]


async def compare_token(execute: Execute, session_id: str, token: str) -> None:
    """
    The first half of L{check_token}: C{GET} the stored token and compare.

    @raise Refusal: 403; Redis errors propagate as they are.
    """
    stored = await execute("GET", auth_key(session_id))
    if not tokens_match(stored, token):
        raise Refusal(403, "Invalid or expired token")


async def check_token(
    execute: Execute,
    session_id: str,
    credentials: Optional[Credentials],
    grace_period: int,
    compared: bool = False,
) -> None:
    """
    Check C{credentials} against C{session:{session_id}:auth} and, on
    success, reset the key's TTL to C{grace_period}.

    @param compared: the stored token was already found equal to this one
        (L{compare_token}, before the WebSocket handshake): only the TTL
        is reset.
    @raise Refusal: 401 or 403 (see the module docstring); Redis errors
        propagate as they are.
    """
    if credentials is None:
        raise Refusal(*MISSING_TOKEN)
    key = auth_key(session_id)
    if not compared:
        await compare_token(execute, session_id, credentials.token)
    renewed = await execute("EXPIRE", key, grace_period)
    if renewed in (0, b"0"):
        # the key expired between GET and EXPIRE
        raise Refusal(403, "Invalid or expired token")
