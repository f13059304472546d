"""
Whether a connection's credentials admit it: one decision, the same for the
site's early check (a header token, before the WebSocket handshake) and the
admission's (L{CredentialCheck}).

By what was presented and C{AUTH_MODE}:

  - a ticket (C{?ticket=}, any mode): consumed with C{GETDEL
    session:{id}:ticket:<ticket>}; it admits once, within the TTL the
    backend gave it. A ticket that is not 16-128 base64url characters is
    refused without a Redis command. The auth key is not touched.
  - C{redis}: the token compared with C{session:{id}:auth}, whose TTL is
    then reset to the grace period (L{wsproxy.session.auth}).
  - C{jwt}: the token verified on the CPU (L{wsproxy.session.webtoken}).
    With C{JWT_DENYLIST}, then one C{EXISTS} (C{session:{id}:revoked}, or
    C{jwt:revoked:<jti>}): present, 403 C{Token revoked}.
  - C{jwt,redis}: a JWT that verifies is admitted; any other token is
    compared in Redis as with C{redis}. If both refuse it, the answer is
    the JWT's refusal for a token shaped like a JWT (its reason says more),
    C{Invalid or expired token} otherwise.

What the caller gets (C{done}, once, never after L{CredentialCheck.cancel}):
a L{Grant} (for a JWT, its C{exp}: C{JWT_EXPIRE_CONNECTIONS} closes the
connection then), a L{Refusal} (401, 403), or the exception of a Redis
failure (the caller answers 503 or 504). A check that needs no Redis
command decides inside L{CredentialCheck.start}.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..config import Settings
from ..names import TICKET_PATTERN, auth_key, revoked_jti_key, revoked_key, ticket_key
from ..refusal import Refusal
from . import auth
from .webtoken import NO_EXPIRY, REFUSALS, Grant, TokenRefused, Verifier, unverified_header

#: a ticket that does not exist: never stored, used, or past its TTL
INVALID_TICKET = auth.bearer_refusal("Invalid or used ticket")
#: a ticket that cannot be one (refused without a Redis command)
MALFORMED_TICKET = auth.bearer_refusal("Malformed ticket")
#: a Redis token that is not the stored one (as it always was: the plain
#: path's answers do not change with the JWT modes)
INVALID_TOKEN = Refusal(*auth.INVALID_TOKEN)
#: no credentials at all
MISSING_TOKEN = Refusal(*auth.MISSING_TOKEN)

Result = object  # Grant | Refusal | Exception
Done = Callable[[Result], None]


class Authenticator:
    """
    What checks credentials in this process: C{AUTH_MODE}, the command
    link's lean C{send}, the Redis token script's state, and the JWT
    verifier (C{None} unless C{AUTH_MODE} has C{jwt}).
    """

    def __init__(self, settings: Settings, send: auth.Send,
                 script: Optional[auth.TokenScript], verifier: Optional[Verifier]) -> None:
        self.send = send
        self.script = script
        self.verifier = verifier
        self.redis = "redis" in settings.auth_mode
        self.grace = settings.auth_grace_period
        self.denylist = settings.jwt_denylist
        #: tokens accepted and refused, by method (metrics)
        self.jwt_accepted = 0
        self.jwt_refused = 0

    def check(self, session_id: str, agent_id: str, credentials: auth.Credentials,
              done: Done) -> "CredentialCheck":
        """
        A check of C{credentials} for this session and agent, to be started.
        """
        return CredentialCheck(self, session_id, agent_id, credentials, done)


class CredentialCheck:
    """
    One decision about one connection's credentials (the module docstring).
    """

    __slots__ = ("_authn", "_session_id", "_agent_id", "_credentials", "_done",
                 "_token_check", "_jwt_refusal", "_grant")

    def __init__(self, authn: Authenticator, session_id: str, agent_id: str,
                 credentials: auth.Credentials, done: Done) -> None:
        self._authn = authn
        self._session_id = session_id
        self._agent_id = agent_id
        self._credentials = credentials
        self._done: Optional[Done] = done
        self._token_check: Optional[auth.TokenCheck] = None
        self._jwt_refusal: Optional[Refusal] = None
        self._grant: Grant = NO_EXPIRY

    def start(self) -> "CredentialCheck":
        authn = self._authn
        credentials = self._credentials
        if credentials.source == "ticket":
            ticket = credentials.token
            if TICKET_PATTERN.fullmatch(ticket) is None:
                self._finish(MALFORMED_TICKET)
            else:
                authn.send(self._ticket, b"GETDEL",
                           ticket_key(self._session_id, ticket).encode())
            return self
        if authn.verifier is not None:
            if self._verify(refetched=False):
                return self
        self._redis_token()
        return self

    def _verify(self, refetched: bool) -> bool:
        """
        Verify the token as a JWT; C{True} if that decided (or will: a key
        set being fetched), C{False} if the Redis token check is next.
        """
        authn = self._authn
        verifier = authn.verifier
        assert verifier is not None
        token = self._credentials.token
        try:
            grant = verifier.verify(token, self._session_id, self._agent_id)
        except TokenRefused as refused:
            if refused.why == "unknown_kid" and not refetched:
                fetching = verifier.on_unknown_kid(str((unverified_header(token) or {})["kid"]))
                if fetching is not None:
                    # the key may be in the set being fetched: ask again then
                    fetching.addBoth(self._refetched)
                    return True
            authn.jwt_refused += 1
            if not authn.redis:
                self._finish(refused.refusal)
                return True
            if unverified_header(token) is not None:
                self._jwt_refusal = refused.refusal
            return False
        authn.jwt_accepted += 1
        self._jwt_accepted(grant)
        return True

    def _refetched(self, _: object) -> None:
        if self._done is not None and not self._verify(refetched=True):
            self._redis_token()

    def _redis_token(self) -> None:
        authn = self._authn
        credentials = self._credentials
        self._token_check = auth.TokenCheck(
            authn.send, self._session_id, credentials.token, authn.grace, authn.script,
            self._compared,
        ).start()

    def cancel(self) -> None:
        """
        The answer is no longer wanted (the client left, or the deadline
        passed).
        """
        self._done = None
        if self._token_check is not None:
            self._token_check.cancel()

    def _finish(self, result: Result) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(result)

    # -- JWT ----------------------------------------------------------------

    def _jwt_accepted(self, grant: Grant) -> None:
        denylist = self._authn.denylist
        if denylist == "off":
            self._finish(grant)
            return
        if denylist == "session":
            key = revoked_key(self._session_id)
        elif grant.jti is None:
            # a denylist by jti cannot revoke a token without one
            self._finish(REFUSALS["claim_type"])
            return
        else:
            key = revoked_jti_key(grant.jti)
        self._grant = grant
        self._authn.send(self._revocation, b"EXISTS", key.encode())

    def _revocation(self, reply: object) -> None:
        if isinstance(reply, Exception):
            self._finish(reply)
        elif reply in (0, b"0"):
            self._finish(self._grant)
        else:
            self._finish(REFUSALS["revoked"])

    # -- tickets ------------------------------------------------------------

    def _ticket(self, reply: object) -> None:
        if isinstance(reply, Exception):
            self._finish(reply)
        elif reply is None:
            self._finish(INVALID_TICKET)
        else:
            self._finish(NO_EXPIRY)

    # -- the Redis token ------------------------------------------------------

    def _compared(self, found: object) -> None:
        if self._done is None:
            return
        if isinstance(found, Exception):
            self._finish(found)
        elif found == auth.RENEWED:
            self._finish(NO_EXPIRY)
        elif found == auth.EQUAL:
            # Redis refuses scripts: the TTL is reset by a command of its own
            self._authn.send(self._renewed, b"EXPIRE", auth_key(self._session_id).encode(),
                             b"%d" % self._authn.grace)
        else:
            self._finish(self._jwt_refusal or INVALID_TOKEN)

    def _renewed(self, reply: object) -> None:
        if isinstance(reply, Exception):
            self._finish(reply)
        elif reply in (0, b"0"):
            # the key expired between GET and EXPIRE
            self._finish(self._jwt_refusal or INVALID_TOKEN)
        else:
            self._finish(NO_EXPIRY)
