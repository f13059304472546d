"""
Where the JWT verification keys come from, and how they change without a
restart.

Sources (any number of them together; L{load_files} reads the first four):

  - C{JWT_SECRET}: one HMAC secret, exactly as given (the original project's
    setting); no C{kid}.
  - C{JWT_SECRET_FILE}: HMAC secrets, one per line (blank lines and lines
    starting with C{#} skipped): rotation is adding the new secret, letting
    backends move to it, then removing the old one; no C{kid}.
  - C{JWT_PUBLIC_KEY_FILE}: a comma list of PEM files, each holding one or
    more public keys or certificates (RSA, EC P-256/P-384/P-521, Ed25519,
    Ed448); no C{kid}. A private key is refused: the proxy never needs one.
  - C{JWT_JWKS_FILE}: a JWK Set document; keys keep their C{kid} and C{alg}.
  - C{JWT_JWKS_URL}: a JWK Set fetched over HTTP(S), every
    C{JWT_JWKS_REFRESH_SECS}, and at once when a token names an unknown
    C{kid} (a key published before the proxy's next scheduled fetch), at
    most once per C{JWT_JWKS_MIN_REFRESH_SECS}: a flood of tokens with
    made-up ids costs one fetch per floor interval, not one per token.

The files are read at start-up (an unreadable or invalid one fails the
start, naming the setting) and again on SIGHUP (L{KeySource.reload}): an
invalid file then keeps the keys in use and logs an error. A failed URL
fetch keeps the last good set and logs a warning. A key set never goes
empty by a reload or a fetch: an empty result is treated as an error.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import PyJWTError
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..config import ConfigError, Settings
from .webtoken import SUPPORTED_ALGORITHMS, Key, KeySet, Verifier

#: the largest JWK Set accepted from a URL
MAX_JWKS_BYTES = 1 << 20

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.+?\r?\n-----END \1-----", re.DOTALL
)


def public_key_kind(key: Any) -> Optional[str]:
    """
    The L{webtoken.KIND} a public key serves, or C{None} for one no
    supported algorithm uses (an EC key on another curve, a DSA key).
    """
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVES.get(key.curve.name)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "OKP"
    return None


def secret_key(secret: str, source: str) -> Key:
    """
    An HMAC secret as a key.

    @raise ValueError: an empty secret, or one that is a PEM key or a JWK
        (PyJWT's check: a public key used as an HMAC secret is how algorithm
        confusion works).
    """
    try:
        prepared = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except PyJWTError as e:
        raise ValueError(str(e)) from None
    return Key("oct", prepared, source=source)


def pem_keys(data: bytes, source: str) -> list[Key]:
    """
    Every public key or certificate in a PEM document.

    @raise ValueError: a private key, no key at all, or a key no supported
        algorithm uses.
    """
    keys: list[Key] = []
    for match in _PEM_BLOCK.finditer(data):
        label = match.group(1).decode("ascii")
        if "PRIVATE" in label:
            raise ValueError("holds a private key: give the public key only")
        if label == "CERTIFICATE":
            public: Any = x509.load_pem_x509_certificate(match.group(0)).public_key()
        elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
            public = load_pem_public_key(match.group(0))
        else:
            continue
        kind = public_key_kind(public)
        if kind is None:
            raise ValueError(f"holds a key no supported algorithm uses ({type(public).__name__})")
        keys.append(Key(kind, public, source=source))
    if not keys:
        raise ValueError("holds no PEM public key or certificate")
    return keys


def jwks_keys(document: bytes, source: str, log: Optional[Logger] = None) -> list[Key]:
    """
    The usable keys of a JWK Set: signature keys (no C{use}, or C{sig}) of a
    supported kind; others are skipped with a warning.

    @raise ValueError: not a JWK Set, or no usable key in it.
    """
    try:
        parsed = json.loads(document)
    except ValueError:
        raise ValueError("is not JSON") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        raise ValueError('is not a JWK Set (an object with a "keys" list)')
    keys: list[Key] = []
    for index, jwk in enumerate(parsed["keys"]):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        alg = jwk.get("alg")
        try:
            if alg is not None and alg not in SUPPORTED_ALGORITHMS:
                raise ValueError(f"algorithm {alg!r} is not supported")
            if kid is not None and not isinstance(kid, str):
                raise ValueError("kid is not a string")
            loaded = PyJWK(jwk)
            if jwk.get("kty") == "oct":
                key = Key("oct", loaded.key, kid, source, alg)
            else:
                kind = public_key_kind(loaded.key)
                if kind is None:
                    raise ValueError("not a public key of a supported kind")
                key = Key(kind, loaded.key, kid, source, alg)
        except (PyJWTError, ValueError, TypeError) as e:
            if log is not None:
                log.warn("{source}: key {index} skipped: {why}", source=source, index=index,
                         why=str(e).split(":")[0])
            continue
        keys.append(key)
    if not keys:
        raise ValueError("holds no usable signature key")
    return keys


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_files(settings: Settings, log: Optional[Logger] = None) -> list[Key]:
    """
    The keys of C{JWT_SECRET}, C{JWT_SECRET_FILE}, C{JWT_PUBLIC_KEY_FILE} and
    C{JWT_JWKS_FILE}.

    @raise ConfigError: naming the setting whose source is unusable (never
        quoting a secret).
    """
    keys: list[Key] = []
    if settings.jwt_secret:
        try:
            keys.append(secret_key(settings.jwt_secret, "JWT_SECRET"))
        except ValueError as e:
            raise ConfigError(f"JWT_SECRET: unusable: {e}") from None
    if settings.jwt_secret_file:
        try:
            lines = _read(settings.jwt_secret_file).decode("utf-8").splitlines()
            secrets = [line.strip() for line in lines
                       if line.strip() and not line.lstrip().startswith("#")]
            if not secrets:
                raise ValueError("holds no secret")
            keys.extend(secret_key(secret, "JWT_SECRET_FILE") for secret in secrets)
        except (OSError, ValueError) as e:
            raise ConfigError(f"JWT_SECRET_FILE: {settings.jwt_secret_file}: {e}") from None
    for path in settings.jwt_public_key_files:
        try:
            keys.extend(pem_keys(_read(path), f"JWT_PUBLIC_KEY_FILE {path}"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"JWT_PUBLIC_KEY_FILE: {path}: {e}") from None
    if settings.jwt_jwks_file:
        try:
            keys.extend(jwks_keys(_read(settings.jwt_jwks_file), "JWT_JWKS_FILE", log))
        except (OSError, ValueError) as e:
            raise ConfigError(f"JWT_JWKS_FILE: {settings.jwt_jwks_file}: {e}") from None
    return keys


def build_verifier(settings: Settings, log: Optional[Logger] = None) -> Verifier:
    """
    A L{Verifier} with the file keys and the claim rules of C{settings}
    (the URL's keys come later, from L{KeySource}).
    """
    return Verifier(
        KeySet(load_files(settings, log)),
        algorithms=settings.jwt_algorithms,
        require_exp=settings.jwt_require_exp,
        leeway=settings.jwt_leeway,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer or None,
        max_bytes=settings.jwt_max_token_bytes,
    )


#: fetches a URL's body: C{fetch(url)} fires with the bytes (at most
#: L{MAX_JWKS_BYTES}) or fails
Fetch = Callable[[str], "defer.Deferred[bytes]"]


class KeySource:
    """
    Keeps a L{Verifier}'s keys current: the files on L{reload} (SIGHUP), the
    JWKS URL on a schedule and on an unknown C{kid} (the module docstring).
    """

    _log = Logger()

    def __init__(self, settings: Settings, verifier: Verifier, clock: IReactorTime,
                 fetch: Optional[Fetch] = None) -> None:
        self.settings = settings
        self.verifier = verifier
        self.clock = clock
        self._file_keys = list(verifier.keys.keys)
        self._url_keys: list[Key] = []
        self._fetch = fetch
        self._fetching: Optional[defer.Deferred[None]] = None
        self._last_fetch = -1e18
        self._loop: Optional[task.LoopingCall] = None
        #: URL fetches that succeeded and failed, and file reloads (metrics)
        self.fetched = 0
        self.fetch_failed = 0
        self.reloads = 0
        self.reload_failed = 0
        verifier.on_unknown_kid = self.unknown_kid

    @property
    def url(self) -> str:
        return self.settings.jwt_jwks_url

    def start(self) -> None:
        if not self.url:
            return
        if self._fetch is None:
            self._fetch = http_fetch(self.clock)
        loop = self._loop = task.LoopingCall(self.refresh)
        loop.clock = self.clock
        loop.start(self.settings.jwt_jwks_refresh, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _publish(self) -> None:
        self.verifier.keys = KeySet(self._file_keys + self._url_keys)

    def reload(self) -> bool:
        """
        Read the key files again (SIGHUP). On an error the keys in use stay.
        """
        try:
            keys = load_files(self.settings, self._log)
        except ConfigError as e:
            self._log.error("keys not reloaded, the previous ones stay in use: {why}", why=str(e))
            self.reload_failed += 1
            return False
        self._file_keys = keys
        self._publish()
        self.reloads += 1
        self._log.info("keys reloaded: {count} from files", count=len(keys))
        return True

    def unknown_kid(self, kid: str) -> "Optional[defer.Deferred[None]]":
        """
        A token named a key the set does not have: the fetch of the URL under
        way, or a new one unless the last began less than
        C{JWT_JWKS_MIN_REFRESH_SECS} ago (then C{None}: the token is
        refused at once).
        """
        if not self.url or self._fetch is None:
            return None
        if self._fetching is None and (
            self.clock.seconds() - self._last_fetch < self.settings.jwt_jwks_min_refresh
        ):
            return None
        return self.refresh()

    def refresh(self) -> "defer.Deferred[None]":
        """
        Fetch the JWKS URL (one fetch at a time); failures are logged.
        """
        if self._fetching is None:
            self._last_fetch = self.clock.seconds()
            self._fetching = defer.ensureDeferred(self._refresh())
        return self._fetching

    async def _refresh(self) -> None:
        fetch = self._fetch
        assert fetch is not None
        try:
            keys = jwks_keys(await fetch(self.url), "JWT_JWKS_URL", self._log)
        except Exception as e:
            self.fetch_failed += 1
            self._log.warn("JWKS fetch failed, the previous keys stay in use: {why}",
                           why=str(e) or type(e).__name__)
            return
        finally:
            self._fetching = None
        changed = {(k.kid, k.kind) for k in keys} != {(k.kid, k.kind) for k in self._url_keys}
        self._url_keys = keys
        self._publish()
        self.fetched += 1
        if changed:
            self._log.info("JWKS fetched: {count} keys", count=len(keys))


def http_fetch(clock: IReactorTime, timeout: float = 10.0) -> Fetch:
    """
    Fetch a URL with twisted.web's client: status 200 only, at most
    L{MAX_JWKS_BYTES}, within C{timeout} seconds.
    """
    from twisted.internet import reactor
    from twisted.web.client import Agent, readBody

    agent = Agent(cast(Any, reactor), connectTimeout=timeout)

    async def fetch(url: str) -> bytes:
        request = agent.request(b"GET", url.encode("ascii"))
        request.addTimeout(timeout, clock)
        response = await request
        reading = readBody(response)
        reading.addTimeout(timeout, clock)
        body = await reading
        if response.code != 200:
            raise ValueError(f"HTTP {response.code}")
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("JWK Set too large")
        return body

    return lambda url: defer.ensureDeferred(fetch(url))
