"""
Keys and tokens for the JWT tests: key pairs of every supported kind, PEM
and JWK Set files of their public halves, and tokens signed (or forged)
with them.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any, Optional

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

SECRET = "test-secret-of-at-least-32-bytes-long"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Keys:
    """
    One RSA, one EC P-256 and one Ed25519 key pair.
    """

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()

    @staticmethod
    def public_pem(key: Any) -> bytes:
        return bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ))

    def write_pem(self, directory: str, *keys: Any) -> str:
        """
        A PEM file of the public halves of C{keys}.
        """
        path = os.path.join(directory, "public-%d.pem" % len(os.listdir(directory)))
        with open(path, "wb") as f:
            f.write(b"".join(self.public_pem(key) for key in keys))
        return path

    def jwks(self, **kids: Any) -> dict[str, Any]:
        """
        A JWK Set of the public halves of the keys named by kid.
        """
        keys = []
        for kid, key in kids.items():
            public = key.public_key()
            if isinstance(key, rsa.RSAPrivateKey):
                jwk = json.loads(RSAAlgorithm.to_jwk(public))
            elif isinstance(key, ec.EllipticCurvePrivateKey):
                jwk = json.loads(ECAlgorithm.to_jwk(public))
            else:
                jwk = json.loads(OKPAlgorithm.to_jwk(public))
            jwk["kid"] = kid
            keys.append(jwk)
        return {"keys": keys}

    def write_jwks(self, directory: str, **kids: Any) -> str:
        path = os.path.join(directory, "jwks-%d.json" % len(os.listdir(directory)))
        with open(path, "w") as f:
            json.dump(self.jwks(**kids), f)
        return path


def token(claims: Optional[dict[str, Any]] = None, key: Any = SECRET, algorithm: str = "HS256",
          kid: Optional[str] = None, session: str = "s1") -> str:
    """
    A token for C{session} (claims C{session_id} and C{iat}, the original
    project's shape), with C{claims} on top (a C{None} value removes one).
    """
    payload: dict[str, Any] = {"session_id": session, "iat": int(time.time())}
    payload.update(claims or {})
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=algorithm,
                      headers={"kid": kid} if kid is not None else None)


def forge(header: dict[str, Any], payload: Any, secret: bytes = SECRET.encode(),
          raw_payload: Optional[bytes] = None) -> str:
    """
    A token built by hand: C{header} and C{payload} (or C{raw_payload}
    bytes, which need not be JSON), HMAC-SHA256-signed with C{secret}
    (C{alg: none}: no signature).
    """
    import hashlib
    import hmac

    head = b64(json.dumps(header).encode())
    body = b64(raw_payload if raw_payload is not None else json.dumps(payload).encode())
    if header.get("alg") == "none":
        return f"{head}.{body}."
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"
