"""
The keys of a benchmark's C{AUTH_MODE=jwt} proxies (C{bench.versus},
C{bench.flood}), made afresh in the run's folder: an HMAC secret for HS256
and a P-256 key pair for ES256, each as the proxy reads it (C{JWT_SECRET},
C{JWT_PUBLIC_KEY_FILE}) and as the load tool reads it (C{--jwt-key-file});
and a second key of each kind the proxy does not know, to forge tokens with.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHMS = ("HS256", "ES256")


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class JwtKeys:
    secret: str
    secret_file: Path  # the load tool's --jwt-key-file for HS256
    private_key: ec.EllipticCurvePrivateKey
    private_key_file: Path  # ... for ES256
    public_key_file: Path  # the proxy's JWT_PUBLIC_KEY_FILE
    # what forged tokens are signed with: right kind, wrong key
    wrong_secret: str
    wrong_private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls, workdir: Path) -> JwtKeys:
        secret = secrets.token_urlsafe(32)
        private = ec.generate_private_key(ec.SECP256R1())
        secret_file = workdir / "jwt-secret"
        private_file = workdir / "jwt-es256.pem"
        public_file = workdir / "jwt-es256.pub.pem"
        secret_file.write_text(secret)
        private_file.write_bytes(_pem(private))
        public_file.write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return cls(secret, secret_file, private, private_file, public_file,
                   secrets.token_urlsafe(32), ec.generate_private_key(ec.SECP256R1()))

    def proxy_env(self, algorithm: str) -> dict[str, str]:
        """The settings of a proxy that accepts this run's tokens of ``algorithm``."""
        if algorithm == "HS256":
            return {"AUTH_MODE": "jwt", "JWT_SECRET": self.secret}
        return {"AUTH_MODE": "jwt", "JWT_PUBLIC_KEY_FILE": str(self.public_key_file)}

    def loadtest_args(self, algorithm: str) -> list[str]:
        """The load tool's options minting valid tokens of ``algorithm``."""
        key = self.secret_file if algorithm == "HS256" else self.private_key_file
        return ["--jwt-key-file", str(key), "--jwt-algorithm", algorithm]

    def sign(self, session_id: str, algorithm: str, forged: bool = False) -> str:
        """
        A JWT for ``session_id`` (claims C{session_id}, C{iat}); C{forged}:
        signed with a key of the right kind the proxy does not know, so
        that only the signature check refuses it.
        """
        from wsproxy.backend import sign_token

        if algorithm == "HS256":
            return sign_token(self.wrong_secret if forged else self.secret, session_id)
        key = self.wrong_private_key if forged else self.private_key
        return sign_token(key, session_id, algorithm="ES256")
