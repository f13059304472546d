"""
The token: where a client presents it, and whether it matches the one the
backend stored in C{session:{id}:auth}.

    ====================================  ======
    no token presented                     401 (with WWW-Authenticate: Bearer)
    key missing, expired or different      403
    token presented more than once         400 (L{repeated_token}, decided
                                           with the request's other rules
                                           before any Redis command)
    ====================================  ======

A failed check never touches the key; a successful one sets its TTL to the
grace period, which is what lets a client reconnect with the same token
until the grace period runs out. Redis errors are not decided here: they
propagate to the admission (L{wsproxy.session.proxy.Proxy.admit}), which answers
503 or 504.

One round trip: the comparison and the TTL reset are one Lua script
(L{CHECK_SCRIPT}, sent as C{EVALSHA}; on C{NOSCRIPT}, as after a failover
to a master whose script cache is empty or a C{SCRIPT FLUSH}, as C{EVAL},
which caches it again). It touches nothing on a mismatch, and its single
key routes it by slot on a Redis Cluster. Where the ACL user may not run
scripts (C{NOPERM}) or scripting is disabled, the check falls back to
C{GET}, a comparison here, then C{EXPIRE} (two round trips; the
C{EXPIRE} is L{wsproxy.session.authn}'s), with one warning per Redis
connection (L{TokenScript}).

Constant time: the script compares SHA-1 digests (the stored token's,
computed by Redis, and the presented token's, computed here), never the
tokens themselves. How long a comparison takes then says at most how many
leading digits of two digests agree, which tells nothing about the stored
token; and the token never reaches Redis (not in C{MONITOR}, C{SLOWLOG}
or a script argument). The fallback compares with C{hmac.compare_digest}.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional, Sequence
from urllib.parse import parse_qsl, unquote

import txredisapi
from twisted.logger import Logger

from ..names import auth_key
from ..refusal import Refusal

#: the subprotocol name that marks a token in Sec-WebSocket-Protocol
BEARER_SUBPROTOCOL = "bearer"

REALM_HEADER = ("WWW-Authenticate", 'Bearer realm="wsproxy"')

TokenSource = Literal["header", "subprotocol", "query", "ticket"]


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
    C{access_token} query parameter (RFC 6750 section 2.3); else a
    single-use connect ticket, the C{ticket} query parameter
    (L{wsproxy.session.authn}).

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
    tickets = params.get("ticket")
    if tickets and tickets[0]:
        return Credentials(tickets[0], "ticket")
    return None


#: a token presented more than once (RFC 6750 section 3.1, C{invalid_request})
REPEATED_TOKEN = (400, "Token presented more than once")


def repeated_token(
    authorization: Sequence[str], protocols: Sequence[str], query: str
) -> bool:
    """
    Whether a request presents a token more than once, which makes it a
    malformed request (RFC 6750 section 2: one method per request; section
    3.1: C{invalid_request}, 400), decided before any token is looked at:
    more than one C{Authorization} header line, more than one
    C{access_token} or C{ticket} query parameter (empty ones included), or
    tokens by more than one of the four means L{extract_token} knows (a
    bearer C{Authorization} header, the C{bearer, <token>} subprotocol pair,
    the C{access_token} parameter, a C{ticket}). An empty or non-bearer
    C{Authorization} header, a C{bearer} subprotocol with no token after it
    and an empty C{access_token} or C{ticket} are no token
    (L{extract_token} ignores them).

    @param authorization: the C{Authorization} header lines' values.
    @param protocols: the offered subprotocols, as Autobahn lists them.
    @param query: the request target's query (after C{?}), as sent.
    """
    if len(authorization) > 1:
        return True
    ways = 0
    if query:
        unquoted = unquote(query)
        for name in ("access_token", "ticket"):
            if name in unquoted:
                given = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == name]
                if len(given) > 1:
                    return True
                if given and given[0]:
                    ways += 1
    if authorization:
        scheme, _, value = authorization[0].strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            ways += 1
    if BEARER_SUBPROTOCOL in protocols:
        index = protocols.index(BEARER_SUBPROTOCOL)
        if index + 1 < len(protocols) and protocols[index + 1]:
            ways += 1
    return ways > 1


def tokens_match(stored: object, presented: str) -> bool:
    """
    Compare in constant time (for tokens of equal length).
    """
    if not isinstance(stored, bytes):
        return False
    return hmac.compare_digest(stored, presented.encode("utf-8"))


def bearer_refusal(reason: str, error: str = "invalid_token") -> Refusal:
    """
    A 403 with its RFC 6750 section 3 challenge: C{error} and, as the
    description, the reason (a fixed text, never anything from the token).
    The JWT and ticket refusals; the Redis token's 403 has none (its
    answer is as it always was).
    """
    challenge = f'{REALM_HEADER[1]}, error="{error}", error_description="{reason}"'
    return Refusal(403, reason, (("WWW-Authenticate", challenge),))


#: the 401 refusal's code, reason and headers
MISSING_TOKEN = (401, "Missing bearer token", (REALM_HEADER,))
#: a token that is not the stored one, or none stored (expired, never set)
INVALID_TOKEN = (403, "Invalid or expired token")

#: sends one Redis command on the command connection's lean path, like
#: L{wsproxy.redis.redislink.RedisLink.send}: C{send(on_reply, *args)}; the reply
#: (or the exception: a Redis error, L{RedisUnavailable}, L{RedisTimeout})
#: goes to C{on_reply}
Send = Callable[..., None]

#: compare the stored token's digest with the presented one's (KEYS[1] the
#: auth key, ARGV[1] the presented token's SHA-1 in hex, ARGV[2] the grace
#: period) and, only if they are equal, reset the key's TTL: 1 matched and
#: renewed, 0 no such key, -1 a different token (both answered 403)
CHECK_SCRIPT = """\
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
if redis.sha1hex(stored) ~= ARGV[1] then return -1 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
CHECK_SHA = hashlib.sha1(CHECK_SCRIPT.encode()).hexdigest()
CHECK_SHA_BYTES = CHECK_SHA.encode()
MATCHED = 1


class TokenScript:
    """
    Whether the token check may use L{CHECK_SCRIPT}: until Redis refuses
    scripts to this user (C{NOPERM}) or knows no C{EVALSHA}; then the
    check uses C{GET} and C{EXPIRE} until the next command connection
    (L{reset}), where an ACL change may have allowed scripts.
    """

    _log = Logger()

    def __init__(self) -> None:
        self.usable = True
        self._warned = False

    def reset(self) -> None:
        """
        A new command connection: try the script again.
        """
        self.usable = True
        self._warned = False

    def refused(self, error: Exception) -> None:
        self.usable = False
        if not self._warned:
            self._warned = True
            self._log.warn(
                "token check: Redis refuses scripts ({why}); using GET and EXPIRE "
                "(two round trips per connection set-up) until the next Redis connection",
                why=str(error),
            )


def _scripts_refused(error: txredisapi.ResponseError) -> bool:
    """
    Whether Redis refused to run scripts at all (an ACL without C{EVAL} or
    C{EVALSHA}; scripting disabled or renamed), as opposed to an error in
    what the script did (a key of the wrong type, no permission on the key).
    """
    text = str(error)
    lower = text.lower()
    if text.startswith("NOPERM"):
        return "'evalsha'" in lower or "'eval'" in lower
    return text.startswith("ERR unknown command") and "eval" in lower


def token_digest(token: str) -> str:
    return hashlib.sha1(token.encode("utf-8")).hexdigest()


#: what a token check found: equal, and its TTL reset in the same step (the
#: script); equal, its TTL still to reset (GET where scripts are refused);
#: different or absent (403)
RENEWED, EQUAL, DIFFERENT = "renewed", "equal", "different"

Found = Literal["renewed", "equal", "different"]


class TokenCheck:
    """
    One comparison of a presented token with the stored one, on the
    command connection's lean path (no Deferred: a handshake's token check
    is a good part of its cost): L{CHECK_SCRIPT} by C{EVALSHA}, by C{EVAL}
    after C{NOSCRIPT}, by C{GET} and a comparison here where Redis refuses
    scripts. C{done} gets L{RENEWED}, L{EQUAL} or L{DIFFERENT}, or the
    exception of a Redis failure; once, and never after L{cancel}.
    """

    __slots__ = ("_send", "_key", "_token", "_grace", "_script", "_done", "_evaled")

    def __init__(self, send: Send, session_id: str, token: str, grace_period: int,
                 script: Optional[TokenScript], done: Callable[[object], None]) -> None:
        self._send = send
        self._key = auth_key(session_id).encode()
        self._token = token
        self._grace = b"%d" % grace_period
        self._script = script
        self._done: Optional[Callable[[object], None]] = done
        self._evaled = False

    def start(self) -> "TokenCheck":
        script = self._script
        if script is not None and script.usable:
            self._send(self._scripted, b"EVALSHA", CHECK_SHA_BYTES, b"1", self._key,
                       token_digest(self._token).encode(), self._grace)
        else:
            self._send(self._fetched, b"GET", self._key)
        return self

    def cancel(self) -> None:
        """
        The answer is no longer wanted (the client left, or the deadline
        passed); a command already sent still runs in Redis.
        """
        self._done = None

    def _finish(self, result: object) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(result)

    def _scripted(self, reply: object) -> None:
        if self._done is None:
            return
        if isinstance(reply, txredisapi.ResponseError):
            if str(reply).startswith("NOSCRIPT") and not self._evaled:
                # a master that never ran it (failover, restart, SCRIPT FLUSH)
                self._evaled = True
                self._send(self._scripted, b"EVAL", CHECK_SCRIPT.encode(), b"1", self._key,
                           token_digest(self._token).encode(), self._grace)
                return
            if _scripts_refused(reply) and self._script is not None:
                self._script.refused(reply)
                self._send(self._fetched, b"GET", self._key)
                return
        if isinstance(reply, Exception):
            self._finish(reply)
        else:
            self._finish(RENEWED if reply == MATCHED else DIFFERENT)

    def _fetched(self, reply: object) -> None:
        if isinstance(reply, Exception):
            self._finish(reply)
        else:
            self._finish(EQUAL if tokens_match(reply, self._token) else DIFFERENT)
