"""
The JWT rules on the CPU (L{wsproxy.session.webtoken}) and where keys come
from (L{wsproxy.session.keys}), without a daemon: every refusal by its
reason, the verdicts compared with PyJWT's own C{jwt.decode} over a corpus,
key files, JWK Sets, reloads and the unknown-kid refresh floor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
import time
from typing import Any, Optional

import jwt
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import load_settings
from wsproxy.session import keys as keysmod
from wsproxy.session.webtoken import (
    REFUSALS,
    Grant,
    KeySet,
    TokenRefused,
    Verifier,
)

from .support.jwts import SECRET, Keys, b64, forge, token

KEYS = Keys()


def verifier(**options: Any) -> Verifier:
    keys = [keysmod.secret_key(SECRET, "test")]
    keys += keysmod.pem_keys(Keys.public_pem(KEYS.rsa) + Keys.public_pem(KEYS.ec)
                             + Keys.public_pem(KEYS.ed), "test")
    return Verifier(KeySet(keys), **options)


class RefusalTests(SynchronousTestCase):
    """
    Each way a token can be wrong is refused with its own reason.
    """

    def refused(self, why: str, jwt_: str, v: Optional[Verifier] = None,
                session: str = "s1", agent: str = "a") -> None:
        with self.assertRaises(TokenRefused) as caught:
            (v or verifier()).verify(jwt_, session, agent)
        self.assertEqual(caught.exception.why, why)
        self.assertEqual(caught.exception.refusal.code, 403)

    def test_original_shape_accepted(self) -> None:
        """
        HS256, C{session_id} and C{iat}, no C{exp}: the original project's
        token, accepted with no expiry.
        """
        self.assertEqual(verifier().verify(token(), "s1", "a"), Grant())

    def test_every_asymmetric_kind(self) -> None:
        """
        RS256, PS256, ES256 and EdDSA tokens verify with their public keys.
        """
        v = verifier()
        for key, alg in ((KEYS.rsa, "RS256"), (KEYS.rsa, "PS256"), (KEYS.ec, "ES256"),
                         (KEYS.ed, "EdDSA")):
            v.verify(token(key=key, algorithm=alg), "s1", "a")

    def test_expiry_granted(self) -> None:
        exp = int(time.time()) + 60
        grant = verifier().verify(token({"exp": exp, "jti": "j1"}), "s1", "a")
        self.assertEqual(grant, Grant(float(exp), "j1"))

    def test_alg_none(self) -> None:
        self.refused("algorithm", forge({"alg": "none", "typ": "JWT"}, {"session_id": "s1"}))
        self.refused("algorithm", forge({"alg": "None"}, {"session_id": "s1"}))

    def test_algorithm_confusion(self) -> None:
        """
        An HS256 token whose secret is the RSA (or EC) public key's PEM:
        only secrets check HS256, so it is a bad signature here, and with no
        secret configured, an algorithm with no key.
        """
        for key in (KEYS.rsa, KEYS.ec):
            forged = forge({"alg": "HS256"}, {"session_id": "s1"}, secret=Keys.public_pem(key))
            self.refused("signature", forged)
            only_public = Verifier(KeySet(keysmod.pem_keys(Keys.public_pem(key), "t")))
            self.refused("algorithm", forged, only_public)

    def test_algorithm_not_allowed(self) -> None:
        self.refused("algorithm", token(), verifier(algorithms=("RS256",)))
        # a key of another kind does not verify an algorithm of this one
        self.refused("signature", token(key=KEYS.ec, algorithm="ES256"),
                     Verifier(KeySet(keysmod.pem_keys(
                         Keys.public_pem(Keys().ec), "other"))))

    def test_unknown_kid(self) -> None:
        keyed = Verifier(KeySet(keysmod.jwks_keys(
            json.dumps(KEYS.jwks(k1=KEYS.ec)).encode(), "t")))
        keyed.verify(token(key=KEYS.ec, algorithm="ES256", kid="k1"), "s1", "a")
        self.refused("unknown_kid", token(key=KEYS.ec, algorithm="ES256", kid="k2"), keyed)
        # without kid, every key of the kind is tried
        keyed.verify(token(key=KEYS.ec, algorithm="ES256"), "s1", "a")

    def test_expired_and_not_yet_valid(self) -> None:
        now = int(time.time())
        self.refused("expired", token({"exp": now - 5}))
        self.refused("not_yet_valid", token({"nbf": now + 60}))
        self.refused("not_yet_valid", token({"iat": now + 60}))
        lenient = verifier(leeway=30)
        lenient.verify(token({"exp": now - 5, "nbf": now + 20, "iat": now + 20}), "s1", "a")

    def test_tampered(self) -> None:
        good = token()
        head, body, sig = good.split(".")
        other = json.dumps({"session_id": "s1", "iat": int(time.time()), "admin": True})
        self.refused("signature", f"{head}.{b64(other.encode())}.{sig}")
        other_head = b64(b'{"alg":"HS256","x":1}')
        self.refused("signature", f"{other_head}.{body}.{sig}")
        self.refused("signature", f"{head}.{body}.{sig[:-4]}AAAA")

    def test_too_large(self) -> None:
        self.refused("too_large", token({"pad": "x" * 9000}))
        verifier(max_bytes=20000).verify(token({"pad": "x" * 9000}), "s1", "a")

    def test_malformed(self) -> None:
        for bad in ("abc", "a.b", "a.b.c.d", "", "..", token() + "=",
                    "é." + token().split(".", 1)[1], token().replace(".", ".é", 1)):
            with self.assertRaises(TokenRefused) as caught:
                verifier().verify(bad, "s1", "a")
            self.assertIn(caught.exception.why, ("malformed", "not_json"), bad)

    def test_payload_read_only_once_signed(self) -> None:
        """
        A payload is parsed only after its signature verified: a forged
        token whose payload is not even base64 is a bad signature; a
        correctly signed one of the same shape is malformed.
        """
        head, body, sig = token().split(".")
        self.refused("signature", f"{head}.!{body}.{sig}")
        text = f"{head}.!!!!"
        mac = hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).digest()
        self.refused("malformed", f"{text}.{b64(mac)}")

    def test_not_json(self) -> None:
        self.refused("not_json", forge({"alg": "HS256"}, None, raw_payload=b"not json"))
        self.refused("not_json", forge({"alg": "HS256"}, ["session_id", "s1"]))
        self.refused("not_json", f"{b64(b'nope')}.{token().split('.', 1)[1]}")

    def test_unsupported_header(self) -> None:
        self.refused("unsupported_header",
                     forge({"alg": "HS256", "crit": ["exp"]}, {"session_id": "s1"}))
        self.refused("unsupported_header", forge({"alg": "HS256", "kid": 7}, {"session_id": "s1"}))

    def test_claims_of_the_wrong_type(self) -> None:
        for claims in ({"session_id": 1}, {"exp": "tomorrow"}, {"nbf": True},
                       {"iat": [1]}, {"agent_id": 3}, {"jti": 5}, {"aud": 5}, {"aud": ["a", 1]}):
            self.refused("claim_type", token(claims), verifier(audience=("a",)))

    def test_session_and_agent(self) -> None:
        self.refused("no_session", token({"session_id": None}))
        self.refused("other_session", token(session="s2"))
        self.refused("other_agent", token({"agent_id": "b"}))
        verifier().verify(token({"agent_id": "a"}), "s1", "a")
        self.assertEqual(REFUSALS["other_session"].headers[0][1].split("error=")[1],
                         '"insufficient_scope", error_description="Token for another session"')

    def test_audience_and_issuer(self) -> None:
        self.refused("audience", token({"aud": "app"}))
        v = verifier(audience=("app", "web"), issuer="auth")
        v.verify(token({"aud": ["x", "web"], "iss": "auth"}), "s1", "a")
        self.refused("audience", token({"iss": "auth"}), v)
        self.refused("audience", token({"aud": "x", "iss": "auth"}), v)
        self.refused("issuer", token({"aud": "app"}), v)
        self.refused("issuer", token({"aud": "app", "iss": "evil"}), v)

    def test_require_exp(self) -> None:
        self.refused("no_exp", token(), verifier(require_exp=True))

    def test_challenge_never_quotes_the_token(self) -> None:
        for refusal in REFUSALS.values():
            name, value = refusal.headers[0]
            self.assertEqual(name, "WWW-Authenticate")
            self.assertTrue(value.startswith('Bearer realm="wsproxy", error="'))
            self.assertIn(f'error_description="{refusal.reason}"', value)


class AgreesWithPyJWTTests(SynchronousTestCase):
    """
    Over a corpus of well-formed tokens (every algorithm, good and wrong
    keys, tampered parts, every time claim, audiences and issuers), the
    verifier accepts exactly the tokens PyJWT's C{jwt.decode} accepts with
    the same options.
    """

    def test_corpus(self) -> None:
        now = int(time.time())
        other = Keys()
        signers = [(SECRET, "HS256"), ("a-different-secret-of-32-bytes-long!", "HS256"),
                   (SECRET, "HS512"), (KEYS.rsa, "RS256"), (KEYS.rsa, "PS384"),
                   (other.rsa, "RS256"), (KEYS.ec, "ES256"), (other.ec, "ES256"),
                   (KEYS.ed, "EdDSA"), (other.ed, "EdDSA")]
        claim_sets: list[dict[str, Any]] = [
            {}, {"exp": now + 60}, {"exp": now - 1}, {"exp": now - 40}, {"exp": float(now + 9)},
            {"nbf": now + 20}, {"nbf": now + 60}, {"iat": now + 20}, {"iat": now - 600},
            {"aud": "app"}, {"aud": ["x", "app"]}, {"aud": "x"}, {"iss": "auth"}, {"iss": "x"},
            {"exp": "soon"}, {"iat": "then"},
        ]
        public = {"HS": SECRET.encode(), "RS": KEYS.rsa.public_key(), "PS": KEYS.rsa.public_key(),
                  "ES": KEYS.ec.public_key(), "Ed": KEYS.ed.public_key()}
        configs = [dict(), dict(leeway=30, audience=("app",), issuer="auth")]
        checked = 0
        for config in configs:
            ours = verifier(**config)
            for key, alg in signers:
                for claims in claim_sets:
                    for tamper in (False, True):
                        t = token(claims, key=key, algorithm=alg)
                        if tamper:
                            head, body, sig = t.split(".")
                            t = f"{head}.{body}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
                        try:
                            jwt.decode(t, public[alg[:2]], algorithms=[alg],
                                       leeway=config.get("leeway", 0),
                                       audience=list(config.get("audience", ())) or None,
                                       issuer=config.get("issuer"),
                                       options={"require": ["iss"] if "issuer" in config else []})
                            theirs = True
                        except jwt.PyJWTError:
                            theirs = False
                        try:
                            ours.verify(t, "s1", "a")
                            mine = True
                        except TokenRefused:
                            mine = False
                        self.assertEqual(mine, theirs, (config, alg, claims, tamper))
                        checked += 1
        self.assertEqual(checked, 2 * len(signers) * len(claim_sets) * 2)


class KeyFileTests(SynchronousTestCase):
    """
    Key sources: what a file may hold, and what is refused at start-up.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_private_key_refused(self) -> None:
        from cryptography.hazmat.primitives import serialization

        pem = KEYS.ec.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        with self.assertRaises(ValueError) as caught:
            keysmod.pem_keys(pem, "t")
        self.assertIn("private key", str(caught.exception))

    def test_public_key_as_secret_refused(self) -> None:
        """
        A PEM public key given as an HMAC secret (the misconfiguration that
        makes algorithm confusion possible) fails start-up.
        """
        settings = load_settings({"AUTH_MODE": "jwt",
                                  "JWT_SECRET": Keys.public_pem(KEYS.rsa).decode()},
                                 environ={}, dotenv_path=None)
        with self.assertRaises(ValueError) as caught:
            keysmod.load_files(settings)
        self.assertIn("JWT_SECRET: unusable", str(caught.exception))
        self.assertNotIn("BEGIN", str(caught.exception))

    def test_secret_file_and_jwks_file(self) -> None:
        secrets = self.write("secrets", b"# current first\nnew-secret-of-at-least-32-bytes!!!\n\n"
                                        b"old-secret-of-at-least-32-bytes!!!\n")
        jwks = self.write("jwks.json", json.dumps(KEYS.jwks(e1=KEYS.ec, r1=KEYS.rsa)).encode())
        settings = load_settings({"AUTH_MODE": "jwt", "JWT_SECRET_FILE": secrets,
                                  "JWT_JWKS_FILE": jwks}, environ={}, dotenv_path=None)
        v = keysmod.build_verifier(settings)
        for secret in ("new-secret-of-at-least-32-bytes!!!", "old-secret-of-at-least-32-bytes!!!"):
            v.verify(token(key=secret), "s1", "a")
        v.verify(token(key=KEYS.rsa, algorithm="RS256", kid="r1"), "s1", "a")
        with self.assertRaises(TokenRefused):
            v.verify(token(key=KEYS.rsa, algorithm="RS256", kid="e1"), "s1", "a")

    def test_jwks_skips_encryption_keys(self) -> None:
        doc = KEYS.jwks(e1=KEYS.ec, r1=KEYS.rsa)
        doc["keys"][1]["use"] = "enc"
        keys = keysmod.jwks_keys(json.dumps(doc).encode(), "t")
        self.assertEqual([k.kid for k in keys], ["e1"])
        with self.assertRaises(ValueError):
            keysmod.jwks_keys(b'{"keys": []}', "t")
        with self.assertRaises(ValueError):
            keysmod.jwks_keys(b"[]", "t")

    def test_jwk_alg_binds_the_key(self) -> None:
        doc = KEYS.jwks(r1=KEYS.rsa)
        doc["keys"][0]["alg"] = "RS256"
        v = Verifier(KeySet(keysmod.jwks_keys(json.dumps(doc).encode(), "t")))
        v.verify(token(key=KEYS.rsa, algorithm="RS256", kid="r1"), "s1", "a")
        with self.assertRaises(TokenRefused) as caught:
            v.verify(token(key=KEYS.rsa, algorithm="PS256", kid="r1"), "s1", "a")
        self.assertEqual(caught.exception.why, "algorithm")

    def test_no_key_for_jwt_mode(self) -> None:
        with self.assertRaises(ValueError) as caught:
            load_settings({"AUTH_MODE": "jwt"}, environ={}, dotenv_path=None)
        self.assertIn("AUTH_MODE: jwt needs a key", str(caught.exception))


class KeySourceTests(SynchronousTestCase):
    """
    Reloads and the JWKS URL's refreshes, on a fake clock and fetch.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.secrets = os.path.join(self.dir, "secrets")
        with open(self.secrets, "w") as f:
            f.write("first-secret-of-at-least-32-bytes!!\n")

    def source(self, **env: str) -> tuple[keysmod.KeySource, list[Any]]:
        settings = load_settings({"AUTH_MODE": "jwt", "JWT_SECRET_FILE": self.secrets, **env},
                                 environ={}, dotenv_path=None)
        v = keysmod.build_verifier(settings)
        self.clock = task.Clock()
        fetches: list[defer.Deferred[bytes]] = []

        def fetch(url: str) -> defer.Deferred[bytes]:
            d: defer.Deferred[bytes] = defer.Deferred()
            fetches.append(d)
            return d

        return keysmod.KeySource(settings, v, self.clock, fetch), fetches

    def test_reload_rotates_and_keeps_on_error(self) -> None:
        source, _ = self.source()
        v = source.verifier
        v.verify(token(key="first-secret-of-at-least-32-bytes!!"), "s1", "a")
        with open(self.secrets, "w") as f:
            f.write("second-secret-of-at-least-32-bytes!\n")
        self.assertTrue(source.reload())
        v.verify(token(key="second-secret-of-at-least-32-bytes!"), "s1", "a")
        with self.assertRaises(TokenRefused):
            v.verify(token(key="first-secret-of-at-least-32-bytes!!"), "s1", "a")
        with open(self.secrets, "w") as f:
            f.write("\n")
        self.assertFalse(source.reload())
        v.verify(token(key="second-secret-of-at-least-32-bytes!"), "s1", "a")
        self.flushLoggedErrors()

    def test_url_schedule_and_unknown_kid_floor(self) -> None:
        source, fetches = self.source(JWT_JWKS_URL="http://keys.example/jwks",
                                      JWT_JWKS_REFRESH_SECS="300",
                                      JWT_JWKS_MIN_REFRESH_SECS="30")
        source.start()
        self.assertEqual(len(fetches), 1)
        fetches[0].callback(json.dumps(KEYS.jwks(k1=KEYS.ec)).encode())
        v = source.verifier
        v.verify(token(key=KEYS.ec, algorithm="ES256", kid="k1"), "s1", "a")
        # an unknown kid within the floor: no fetch
        self.assertIsNone(v.on_unknown_kid("k2"))
        self.assertEqual(len(fetches), 1)
        self.clock.advance(31)
        waiting = v.on_unknown_kid("k2")
        self.assertIsNotNone(waiting)
        self.assertEqual(len(fetches), 2)
        # while it is under way, more unknown kids wait for the same fetch
        self.assertIs(v.on_unknown_kid("k3"), waiting)
        self.assertEqual(len(fetches), 2)
        fetches[1].callback(json.dumps(KEYS.jwks(k2=KEYS.ed)).encode())
        v.verify(token(key=KEYS.ed, algorithm="EdDSA", kid="k2"), "s1", "a")
        # a failed fetch keeps the last good set
        self.clock.advance(300)
        self.assertEqual(len(fetches), 3)
        fetches[2].errback(ConnectionRefusedError("no"))
        v.verify(token(key=KEYS.ed, algorithm="EdDSA", kid="k2"), "s1", "a")
        self.assertEqual((source.fetched, source.fetch_failed), (2, 1))
        source.stop()
