"""
JSON Web Tokens (C{AUTH_MODE=jwt}): whether a token is a valid JWT for the
session and agent of the request, decided on the CPU alone.

What is accepted (the original project's tokens unchanged: HS256 with
C{JWT_SECRET}, claims C{session_id} and C{iat}, no C{exp}):

  - a JWS in compact form, three base64url parts without padding, at most
    C{JWT_MAX_TOKEN_BYTES}; a header that is a JSON object with a string
    C{alg}, an optional string C{kid} and no C{crit} (no extension is
    understood, so RFC 7515 section 4.1.11 says refuse); a payload that is
    a JSON object, read only once the signature holds;
  - an C{alg} in C{JWT_ALGORITHMS} for which a key of its kind is
    configured (HS* secrets, RS*/PS* RSA keys, ES256/ES384/ES512 keys on
    their own curve, EdDSA Ed25519/Ed448 keys): an HS256 token is only ever
    checked against secrets, never against a public key, which is what
    defeats algorithm confusion; C{none} is never accepted;
  - a signature that verifies with one of those keys: the key whose C{kid}
    the header names when the configured keys have ids (a JWKS); every key
    of the kind otherwise;
  - claims: C{session_id}, a string equal to the path's session; C{agent_id},
    if present, a string equal to the path's agent; C{exp}, C{nbf}, C{iat},
    if present, numbers, with C{exp} in the future, C{nbf} and C{iat} not in
    it (each with C{JWT_LEEWAY_SECS}); C{exp} required with
    C{JWT_REQUIRE_EXP=true}; C{aud} (a string or a list of strings) must
    name C{JWT_AUDIENCE} when that is set and is refused when present but
    not configured (RFC 7519 section 4.1.3); C{iss} must equal C{JWT_ISSUER}
    when that is set; C{jti}, if present, a string; C{topics}, if present,
    a list of topic names (L{wsproxy.names.valid_topic}): the topics the
    connection joins besides the session's set (C{TOPICS=true}).

Every refusal is 403 with a reason of its own (L{REFUSALS}, the table in
the docs), and C{WWW-Authenticate: Bearer realm="wsproxy",
error="invalid_token"} (C{insufficient_scope} for a valid token of another
session or agent), per RFC 6750 section 3.1; the reason, never the token,
is what the log line shows.

Why parse here rather than call C{jwt.decode}: PyJWT's full decode costs
about 26 µs per token on the reference machine, this about 6 µs, and a
connection set-up is 150-250 µs in all. The parts that need a cryptographer
(the signature checks, key loading, PEM and JWK parsing, HMAC key hygiene)
are PyJWT's and C{cryptography}'s; the compact form and the claims are
simple, strict, and checked against PyJWT's own verdicts by the tests.
"""

from __future__ import annotations

import binascii
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from jwt.algorithms import Algorithm, get_default_algorithms

from ..config import JWT_ALGORITHMS
from ..names import valid_topic
from ..refusal import Refusal
from .auth import bearer_refusal

#: what C{JWT_ALGORITHMS} may name (PyJWT's, without C{none} and ES256K)
SUPPORTED_ALGORITHMS = JWT_ALGORITHMS

#: the kind of key each algorithm needs
KIND = {
    "HS256": "oct", "HS384": "oct", "HS512": "oct",
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "P-256", "ES384": "P-384", "ES512": "P-521",
    "EdDSA": "OKP",
}

_ALGORITHMS: dict[str, Algorithm] = {
    name: alg for name, alg in get_default_algorithms().items() if name in SUPPORTED_ALGORITHMS
}

#: HS* checked with the standard library's one-shot HMAC (what PyJWT's
#: HMAC algorithm computes, without its per-call objects)
_HMAC = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}

#: decodes UTF-8 JSON text (JWS says UTF-8; json.loads on bytes would also
#: guess UTF-16 and UTF-32, and costs a guess per call)
_decode_json = json.JSONDecoder().decode

#: decoded headers by their base64url text: a backend's tokens share one
#: or a few headers (alg, typ, kid), so most checks decode only the
#: payload; bounded, and never filled by what fails to decode
_HEADERS: dict[str, dict[str, Any]] = {}
_HEADERS_MAX = 64


#: every JWT refusal, by what went wrong (the docs' table is built from it)
REFUSALS: dict[str, Refusal] = {
    "too_large": bearer_refusal("Token too large"),
    "malformed": bearer_refusal("Malformed token"),
    "not_json": bearer_refusal("Token is not JSON"),
    "unsupported_header": bearer_refusal("Unsupported token header"),
    "algorithm": bearer_refusal("Token algorithm not allowed"),
    "unknown_kid": bearer_refusal("Unknown key id"),
    "signature": bearer_refusal("Invalid token signature"),
    "expired": bearer_refusal("Token expired"),
    "not_yet_valid": bearer_refusal("Token not yet valid"),
    "no_exp": bearer_refusal("Token without expiry"),
    "claim_type": bearer_refusal("Invalid token claims"),
    "no_session": bearer_refusal("Token without session_id"),
    "audience": bearer_refusal("Invalid token audience"),
    "issuer": bearer_refusal("Invalid token issuer"),
    "other_session": bearer_refusal("Token for another session", "insufficient_scope"),
    "other_agent": bearer_refusal("Token for another agent", "insufficient_scope"),
    "revoked": bearer_refusal("Token revoked"),
}


class TokenRefused(Exception):
    """
    A JWT was refused: C{refusal} is the answer, C{why} its key in
    L{REFUSALS}.
    """

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
        self.refusal = REFUSALS[why]


@dataclass(frozen=True)
class Key:
    """
    One verification key: C{kind} (L{KIND}'s values), the key as PyJWT's
    algorithms take it, its C{kid} if it has one, and where it came from
    (for logs).
    """

    kind: str
    key: Any
    kid: Optional[str] = None
    source: str = ""
    #: the one algorithm the key may be used with (a JWK's C{alg}), if set
    alg: Optional[str] = None


@dataclass(frozen=True)
class Grant:
    """
    A token accepted: when it expires (C{exp}, seconds since the epoch, or
    C{None}), its C{jti}, if any, and the topics it names (C{topics}).
    """

    expires: Optional[float] = None
    jti: Optional[str] = None
    topics: tuple[str, ...] = ()


#: a grant for a token without exp or jti (shared)
NO_EXPIRY = Grant()


class KeySet:
    """
    The keys in use at one moment, by kind; replaced whole when keys are
    reloaded (L{wsproxy.session.keys}).

    @ivar keyed: whether any key has a C{kid}: then a token's C{kid} must
        name one of them.
    """

    def __init__(self, keys: Iterable[Key] = ()) -> None:
        self.keys = tuple(keys)
        self.by_kind: dict[str, tuple[Key, ...]] = {}
        for key in self.keys:
            self.by_kind[key.kind] = self.by_kind.get(key.kind, ()) + (key,)
        self.by_kid = {key.kid: key for key in self.keys if key.kid is not None}
        self.keyed = bool(self.by_kid)

    def __len__(self) -> int:
        return len(self.keys)


def _b64(part: str) -> bytes:
    """
    Strict base64url without padding (RFC 7515 section 2).

    @raise ValueError: anything else.
    """
    if "=" in part or "+" in part or "/" in part:
        raise ValueError("not base64url")
    text = part.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    return binascii.a2b_base64(text, strict_mode=True)


def _json_object(part: str) -> dict[str, Any]:
    try:
        raw = _b64(part)
    except (ValueError, binascii.Error):
        raise TokenRefused("malformed") from None
    try:
        value = _decode_json(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise TokenRefused("not_json") from None
    if not isinstance(value, dict):
        raise TokenRefused("not_json")
    return value


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def unverified_header(token: str) -> Optional[dict[str, Any]]:
    """
    The header of a token that looks like a JWS (three parts, a JSON-object
    header), else C{None}: no signature is checked.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        return _HEADERS.get(parts[0]) or _json_object(parts[0])
    except TokenRefused:
        return None


class Verifier:
    """
    Checks tokens against a L{KeySet} and the claim rules (the module
    docstring). L{keys} may be replaced at any time (a reload); a check
    uses the set in place when it starts.

    @ivar on_unknown_kid: called with the C{kid} when a token names a key
        that is not in the set: a JWKS URL then refreshes, within its floor,
        and this returns the refresh under way (whose end is worth waiting
        for: the key may be in the new set), or C{None}.
    """

    def __init__(
        self,
        keys: KeySet,
        algorithms: Sequence[str] = SUPPORTED_ALGORITHMS,
        require_exp: bool = False,
        leeway: float = 0.0,
        audience: Sequence[str] = (),
        issuer: Optional[str] = None,
        max_bytes: int = 8192,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.algorithms = frozenset(algorithms)
        self.require_exp = require_exp
        self.leeway = leeway
        self.audience = frozenset(audience)
        self.issuer = issuer
        self.max_bytes = max_bytes
        self.clock = clock
        self.on_unknown_kid: Callable[[str], Optional[Any]] = lambda kid: None

    def verify(self, token: str, session_id: str, agent_id: str) -> Grant:
        """
        The token's L{Grant} if it is valid for this session and agent.

        @raise TokenRefused: otherwise, saying why.
        """
        if len(token) > self.max_bytes:
            raise TokenRefused("too_large")
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenRefused("malformed")
        head, body, signature = parts
        header = _HEADERS.get(head)
        if header is None:
            header = _json_object(head)
            if len(_HEADERS) < _HEADERS_MAX:
                _HEADERS[head] = header
        name = header.get("alg")
        if not isinstance(name, str):
            raise TokenRefused("malformed")
        kid = header.get("kid")
        if (kid is not None and not isinstance(kid, str)) or "crit" in header:
            raise TokenRefused("unsupported_header")
        algorithm = _ALGORITHMS.get(name)
        if algorithm is None or name not in self.algorithms:
            raise TokenRefused("algorithm")
        keys = self.keys
        candidates = keys.by_kind.get(KIND[name], ())
        if not candidates:
            raise TokenRefused("algorithm")
        if kid is not None and keys.keyed:
            key = keys.by_kid.get(kid)
            if key is None:
                raise TokenRefused("unknown_kid")
            if key.kind != KIND[name] or (key.alg is not None and key.alg != name):
                raise TokenRefused("algorithm")
            candidates = (key,)
        elif any(key.alg is not None for key in candidates):
            candidates = tuple(key for key in candidates if key.alg in (None, name))
            if not candidates:
                raise TokenRefused("algorithm")
        try:
            raw_signature = _b64(signature)
        except (ValueError, binascii.Error):
            raise TokenRefused("malformed") from None
        try:
            signed = token[: len(head) + 1 + len(body)].encode("ascii")
        except UnicodeEncodeError:
            raise TokenRefused("malformed") from None
        digest = _HMAC.get(name)
        for candidate in candidates:
            if digest is not None:
                if hmac.compare_digest(raw_signature, hmac.digest(candidate.key, signed, digest)):
                    break
            elif algorithm.verify(signed, candidate.key, raw_signature):
                break
        else:
            raise TokenRefused("signature")
        # the payload is read only once its signature holds: a forged
        # token costs no JSON parsing, and nothing unsigned is ever parsed
        return self._claims(_json_object(body), session_id, agent_id)

    def _claims(self, claims: Mapping[str, Any], session_id: str, agent_id: str) -> Grant:
        # the types first: a claim of the wrong type is that, whatever else
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        jti, aud = claims.get("jti"), claims.get("aud")
        claimed, claimed_agent = claims.get("session_id"), claims.get("agent_id")
        topics = claims.get("topics")
        named = [aud] if isinstance(aud, str) else aud
        if (
            (exp is not None and not _number(exp))
            or (nbf is not None and not _number(nbf))
            or (iat is not None and not _number(iat))
            or (jti is not None and not isinstance(jti, str))
            or (claimed is not None and not isinstance(claimed, str))
            or (claimed_agent is not None and not isinstance(claimed_agent, str))
            or (named is not None and not (
                isinstance(named, list) and all(isinstance(a, str) for a in named)))
            or (topics is not None and not (
                isinstance(topics, list)
                and all(isinstance(t, str) and valid_topic(t) for t in topics)))
        ):
            raise TokenRefused("claim_type")
        now = self.clock()
        leeway = self.leeway
        if exp is None:
            if self.require_exp:
                raise TokenRefused("no_exp")
        elif exp <= now - leeway:
            raise TokenRefused("expired")
        if (nbf is not None and nbf > now + leeway) or (iat is not None and iat > now + leeway):
            raise TokenRefused("not_yet_valid")
        if named is not None:
            if not self.audience.intersection(named):
                raise TokenRefused("audience")
        elif self.audience:
            raise TokenRefused("audience")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise TokenRefused("issuer")
        if claimed is None:
            raise TokenRefused("no_session")
        if claimed != session_id:
            raise TokenRefused("other_session")
        if claimed_agent is not None and claimed_agent != agent_id:
            raise TokenRefused("other_agent")
        if exp is None and jti is None and not topics:
            return NO_EXPIRY
        return Grant(None if exp is None else float(exp), jti, tuple(topics or ()))
