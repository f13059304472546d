"""
Tokens signed by another implementation: C{jsonwebtoken} (npm), run with
node by C{tests/interop/sign.js}, presented to the real daemon
(C{AUTH_MODE=jwt}, a real redis-server) on real WebSocket upgrades. For
each token the proxy's answer must be what jsonwebtoken's own
C{jwt.verify} says with the equivalent options (accepted: 101, refused:
403), except where the proxy has rules jsonwebtoken does not know, each
refused with its own reason phrase: C{session_id} must be the path's
session, C{agent_id} (if present) the path's agent, and C{aud} is refused
when C{JWT_AUDIENCE} is not set (RFC 7519 section 4.1.3; jsonwebtoken
ignores C{aud} unless told an audience).

jsonwebtoken 9 has no EdDSA: those tokens are signed and verified by
sign.js with Node's crypto (the C{verifier} column says which).

Needs node and jsonwebtoken, installed by C{bin/dev system-setup} from
C{tests/interop/package-lock.json} into C{.cache/jwt-interop} (or the
folder C{$JWT_INTEROP_MODULES} names); without
them the test fails (it never skips), as the browser test does without
chromium.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet import threads

from .support import ROOT, raw_upgrade
from .support.daemon import EnvTestCase

SIGN_JS = os.path.join(ROOT, "tests", "interop", "sign.js")
#: where bin/dev system-setup installs tests/interop/package-lock.json
MODULES = os.environ.get("JWT_INTEROP_MODULES") or os.path.join(ROOT, ".cache", "jwt-interop")
NODE_PATH = os.path.join(MODULES, "node_modules")

AGENT = "a"
SESSION = "s1"
AUDIENCE = "wsproxy-interop"
ISSUER = "https://issuer.interop.test"
HOUR = 3600


def require_node() -> str:
    """
    The node binary, if it and jsonwebtoken are installed.

    @raise RuntimeError: otherwise (the test fails, it never skips).
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(
            "node not found: the JWT interop test needs node and npm "
            "(bin/dev system-setup, or apt-get install -y nodejs npm)"
        )
    if not os.path.isfile(os.path.join(NODE_PATH, "jsonwebtoken", "package.json")):
        raise RuntimeError(
            f"jsonwebtoken is not installed in {NODE_PATH}: run bin/dev system-setup "
            "(npm ci from tests/interop/package-lock.json)"
        )
    return node


def _pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pem_private(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Keys:
    """
    Every key of a test, written to C{directory}: what the daemon reads
    (C{JWT_SECRET}, the PEM files, the JWK Set) and what sign.js signs and
    verifies with (private and public PEM files, by name).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.secret = secrets.token_urlsafe(32)
        self.other_secret = secrets.token_urlsafe(32)
        generated = {
            "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "rsa-k1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-k1": ec.generate_private_key(ec.SECP256R1()),
            "ed-k1": ed25519.Ed25519PrivateKey.generate(),
            # configured nowhere: its tokens must be refused
            "stranger": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        }
        for name, key in generated.items():
            self._write(f"{name}.key", _pem_private(key))
            self._write(f"{name}.pub", _pem_public(key))
        self.public_key_files = ",".join(self.path(f"{name}.pub") for name in ("rsa", "ec"))
        jwks = []
        for kid, kind, alg in (("rsa-k1", RSAAlgorithm, "RS256"),
                               ("ec-k1", ECAlgorithm, "ES256"),
                               ("ed-k1", OKPAlgorithm, "EdDSA")):
            jwk = kind.to_jwk(generated[kid].public_key(), as_dict=True)
            jwks.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        self.jwks_file = self._write("jwks.json", json.dumps({"keys": jwks}).encode())

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _write(self, name: str, data: bytes) -> str:
        with open(self.path(name), "wb") as f:
            f.write(data)
        return self.path(name)


@dataclass
class Case:
    """
    One token: how jsonwebtoken signs it (C{alg}, the key by name, claims,
    jwt.sign's options, claims changed after signing) and whether
    jsonwebtoken is expected to accept it (checked, so a case cannot
    quietly stop testing what its name says).
    """

    name: str
    alg: str
    key: str = "secret"
    payload: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    tamper: Optional[dict[str, Any]] = None
    jsonwebtoken_accepts: bool = True
    #: the key jsonwebtoken verifies with (the one the daemon has for it)
    verify_key: Optional[str] = None


def _mine(**claims: Any) -> dict[str, Any]:
    return {"session_id": SESSION, **claims}


#: the daemon with neither JWT_AUDIENCE nor JWT_ISSUER
PLAIN_CASES = [
    Case("HS256 session_id only (the original project's form)", "HS256", payload=_mine()),
    Case("HS256 exp in 1 h", "HS256", payload=_mine(), options={"expiresIn": HOUR}),
    Case("HS256 expired 1 h ago", "HS256", payload=_mine(), options={"expiresIn": -HOUR},
         jsonwebtoken_accepts=False),
    Case("HS256 nbf in 1 h", "HS256", payload=_mine(), options={"notBefore": HOUR},
         jsonwebtoken_accepts=False),
    Case("HS256 nbf 1 min ago, exp in 1 h", "HS256", payload=_mine(),
         options={"notBefore": -60, "expiresIn": HOUR}),
    Case("HS256 iss (no JWT_ISSUER: not checked)", "HS256", payload=_mine(),
         options={"issuer": ISSUER}),
    Case("HS256 agent_id of the path", "HS256", payload=_mine(agent_id=AGENT)),
    Case("HS256 agent_id of another agent", "HS256", payload=_mine(agent_id="b")),
    Case("HS256 session_id of another session", "HS256", payload={"session_id": "s2"}),
    Case("HS256 no session_id", "HS256", payload={"sub": "user-1"}),
    Case("HS256 aud, no JWT_AUDIENCE", "HS256", payload=_mine(), options={"audience": AUDIENCE}),
    Case("HS256 wrong secret", "HS256", key="other_secret", payload=_mine(),
         jsonwebtoken_accepts=False),
    Case("alg none (unsigned)", "none", payload=_mine(), jsonwebtoken_accepts=False),
    Case("HS256 tampered payload (exp pushed out)", "HS256", payload=_mine(),
         options={"expiresIn": 60}, tamper={"exp": 4102444800}, jsonwebtoken_accepts=False),
    Case("HS256 tampered payload (session_id changed)", "HS256", payload={"session_id": "s2"},
         tamper={"session_id": SESSION}, jsonwebtoken_accepts=False),
    Case("RS256 PEM key, no kid", "RS256", key="rsa", payload=_mine(),
         options={"expiresIn": HOUR}),
    Case("RS256 JWKS key, kid", "RS256", key="rsa-k1", payload=_mine(agent_id=AGENT),
         options={"keyid": "rsa-k1", "expiresIn": HOUR}),
    Case("RS256 JWKS key, no kid", "RS256", key="rsa-k1", payload=_mine()),
    Case("RS256 unconfigured key", "RS256", key="stranger", payload=_mine(),
         verify_key="rsa", jsonwebtoken_accepts=False),
    Case("RS256 expired", "RS256", key="rsa", payload=_mine(), options={"expiresIn": -HOUR},
         jsonwebtoken_accepts=False),
    Case("RS256 tampered payload", "RS256", key="rsa", payload=_mine(),
         tamper={"agent_id": AGENT}, jsonwebtoken_accepts=False),
    Case("ES256 PEM key, no kid", "ES256", key="ec", payload=_mine(),
         options={"expiresIn": HOUR, "notBefore": -60}),
    Case("ES256 JWKS key, kid", "ES256", key="ec-k1", payload=_mine(),
         options={"keyid": "ec-k1", "expiresIn": HOUR}),
    Case("ES256 nbf in 1 h", "ES256", key="ec", payload=_mine(), options={"notBefore": HOUR},
         jsonwebtoken_accepts=False),
    Case("ES256 tampered payload", "ES256", key="ec-k1", payload={"session_id": "s2"},
         options={"keyid": "ec-k1"}, tamper={"session_id": SESSION},
         jsonwebtoken_accepts=False),
    Case("EdDSA JWKS key, kid", "EdDSA", key="ed-k1", payload=_mine(),
         options={"keyid": "ed-k1", "expiresIn": HOUR}),
    Case("EdDSA JWKS key, no kid", "EdDSA", key="ed-k1", payload=_mine(agent_id=AGENT)),
    Case("EdDSA expired", "EdDSA", key="ed-k1", payload=_mine(),
         options={"keyid": "ed-k1", "expiresIn": -HOUR}, jsonwebtoken_accepts=False),
    Case("EdDSA tampered payload", "EdDSA", key="ed-k1", payload=_mine(),
         options={"keyid": "ed-k1"}, tamper={"iat": 1}, jsonwebtoken_accepts=False),
]

#: the daemon with JWT_AUDIENCE and JWT_ISSUER (jwt.verify told the same)
CHECKED = {"audience": AUDIENCE, "issuer": ISSUER}
AUDIENCE_CASES = [
    Case("HS256 aud and iss right", "HS256", payload=_mine(), options={**CHECKED}),
    Case("HS256 aud a list naming ours", "HS256", payload=_mine(),
         options={"audience": ["other", AUDIENCE], "issuer": ISSUER, "expiresIn": HOUR}),
    Case("HS256 wrong aud", "HS256", payload=_mine(), options={**CHECKED, "audience": "other"},
         jsonwebtoken_accepts=False),
    Case("HS256 wrong iss", "HS256", payload=_mine(),
         options={**CHECKED, "issuer": "https://evil.test"}, jsonwebtoken_accepts=False),
    Case("HS256 no aud", "HS256", payload=_mine(), options={"issuer": ISSUER},
         jsonwebtoken_accepts=False),
    Case("HS256 no iss", "HS256", payload=_mine(), options={"audience": AUDIENCE},
         jsonwebtoken_accepts=False),
    Case("HS256 aud and iss right, expired", "HS256", payload=_mine(),
         options={**CHECKED, "expiresIn": -HOUR}, jsonwebtoken_accepts=False),
    Case("RS256 JWKS key, kid, aud and iss right", "RS256", key="rsa-k1",
         payload=_mine(agent_id=AGENT), options={**CHECKED, "keyid": "rsa-k1"}),
    Case("ES256 PEM key, aud and iss right, agent_id of another agent", "ES256", key="ec",
         payload=_mine(agent_id="b"), options={**CHECKED}),
    Case("RS256 aud and iss right, tampered iss", "RS256", key="rsa", payload=_mine(),
         options={**CHECKED}, tamper={"iss": "https://evil.test"},
         jsonwebtoken_accepts=False),
]


def _claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return value


def proxy_rule(claims: dict[str, Any], audience_configured: bool) -> Optional[str]:
    """
    The reason phrase of the proxy's own rules (those jsonwebtoken does
    not know) that refuse C{claims}, in the order webtoken.py checks them;
    C{None} if they admit them.
    """
    if "aud" in claims and not audience_configured:
        return "Invalid token audience"
    if "session_id" not in claims:
        return "Token without session_id"
    if claims["session_id"] != SESSION:
        return "Token for another session"
    if claims.get("agent_id", AGENT) != AGENT:
        return "Token for another agent"
    return None


class JsonwebtokenInteropTests(EnvTestCase):
    """
    Each case's token, signed by jsonwebtoken, presented to the real
    daemon: 101 exactly when jsonwebtoken's verdict and the proxy's own
    rules admit it, else 403 (with the rule's reason when jsonwebtoken
    accepted it).
    """

    timeout = 120

    def setUp(self) -> Any:
        self.node = require_node()
        result = super().setUp()
        directory = tempfile.mkdtemp(prefix="wsproxy-jwt-interop-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.keys = Keys(directory)
        return result

    def _request(self, case: Case, verify_options: dict[str, Any]) -> dict[str, Any]:
        def key(name: str, kind: str) -> dict[str, str]:
            if name in ("secret", "other_secret"):
                return {"secret": getattr(self.keys, name)}
            return {"key_file": self.keys.path(f"{name}.{kind}")}

        verify_key = case.verify_key or ("secret" if case.key == "other_secret" else case.key)
        request: dict[str, Any] = {
            "alg": case.alg, "payload": case.payload, "options": case.options,
            "verify": {**key(verify_key, "pub"), "options": verify_options},
        }
        if case.alg != "none":
            request.update(key(case.key, "key"))
        if case.tamper is not None:
            request["tamper"] = case.tamper
        return request

    def sign(self, cases: list[Case], verify_options: dict[str, Any]) -> list[dict[str, Any]]:
        """
        sign.js's answer for C{cases}: each token and jsonwebtoken's verdict.
        """
        requests = [self._request(case, verify_options) for case in cases]
        done = subprocess.run(
            [self.node, SIGN_JS], input=json.dumps(requests).encode(), capture_output=True,
            env={**os.environ, "NODE_PATH": NODE_PATH}, timeout=60, check=False)
        if done.returncode != 0:
            raise AssertionError(f"sign.js exited {done.returncode}: {done.stderr.decode()}")
        answers: list[dict[str, Any]] = json.loads(done.stdout)
        return answers

    async def present(self, token: str) -> tuple[int, str]:
        """
        The status and reason phrase of an upgrade with C{token}.
        """
        client = await raw_upgrade(self.port, f"/{AGENT}/ws/{SESSION}",
                                   {"Authorization": f"Bearer {token}"})
        client.transport.abortConnection()
        if client.head is None:
            raise AssertionError(f"no response head: {self.log}")
        status_line = client.head.split(b"\r\n", 1)[0].decode()
        _, status, reason = status_line.split(" ", 2)
        return int(status), reason

    async def compare(self, cases: list[Case], verify_options: dict[str, Any],
                      audience_configured: bool) -> None:
        answers = await threads.deferToThread(self.sign, cases, verify_options)
        rows, wrong = [], []
        for case, answer in zip(cases, answers):
            status, reason = await self.present(answer["token"])
            rule = proxy_rule(_claims(answer["token"]), audience_configured)
            expected = 101 if answer["accepted"] and rule is None else 403
            verdict = "accept" if answer["accepted"] else f"reject ({answer['error']})"
            rows.append(f"{case.name} | {answer['verifier']}: {verdict} | "
                        f"{rule or '-'} | {status} {reason}")
            if answer["accepted"] != case.jsonwebtoken_accepts:
                wrong.append(f"{case.name}: jsonwebtoken {verdict}, the case expects "
                             f"{'accept' if case.jsonwebtoken_accepts else 'reject'}")
            if status != expected or (answer["accepted"] and rule and reason != rule):
                wrong.append(f"{case.name}: proxy {status} {reason}, expected {expected}"
                             + (f" {rule}" if rule else ""))
        table = "\n".join(["case | reference verdict | proxy-only rule | proxy", *rows])
        print(table)
        self.assertEqual(wrong, [], "\n" + "\n".join(wrong) + "\n\n" + table)

    def start_jwt(self, **env: str) -> Any:
        return self.start(AUTH_MODE="jwt", JWT_SECRET=self.keys.secret,
                          JWT_PUBLIC_KEY_FILE=self.keys.public_key_files,
                          JWT_JWKS_FILE=self.keys.jwks_file, **env)

    async def test_no_audience_or_issuer_configured(self) -> None:
        """
        Without C{JWT_AUDIENCE} and C{JWT_ISSUER} (jwt.verify given neither):
        HS256, RS256, ES256 and EdDSA tokens from PEM keys and a JWK Set,
        with and without C{kid}, C{exp}, C{nbf}, C{iss}, C{agent_id}, are
        101 exactly when jsonwebtoken accepts them and the session, agent
        and C{aud} rules pass; expired, not yet valid, wrongly signed,
        unsigned and tampered tokens are 403.
        """
        await self.start_jwt()
        await self.compare(PLAIN_CASES, {}, audience_configured=False)

    async def test_audience_and_issuer_configured(self) -> None:
        """
        With C{JWT_AUDIENCE} and C{JWT_ISSUER} (jwt.verify given the same):
        a token must name the audience (a string or in a list) and the
        issuer, as jsonwebtoken decides.
        """
        await self.start_jwt(JWT_AUDIENCE=AUDIENCE, JWT_ISSUER=ISSUER)
        await self.compare(AUDIENCE_CASES, dict(CHECKED), audience_configured=True)
