"""
Throwaway X.509 material for the TLS tests, generated at test time with the
C{cryptography} package: a private CA issuing server and client
certificates, and self-signed certificates. Everything is written to a
temporary directory (PEM files) and nothing is kept or committed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256 keys are generated in microseconds (RSA would take much longer)
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


class CertDir:
    """
    A temporary directory of PEM files. Call L{cleanup} when done.
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="wsproxy-certs-")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write_key(self, name: str, key: ec.EllipticCurvePrivateKey) -> str:
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            )
        os.chmod(path, 0o600)
        return path

    def write_cert(self, name: str, cert: x509.Certificate) -> str:
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Authority:
    """
    A private certificate authority whose certificate is in C{ca_file}.
    """

    def __init__(self, certs: CertDir, label: str = "ca") -> None:
        self.certs = certs
        self.label = label
        self.key = _key()
        name = _name(f"wsproxy test {label}")
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                critical=False,
            )
        )
        self.cert = _validity(builder).sign(self.key, hashes.SHA256())
        self.ca_file = certs.write_cert(f"{label}.pem", self.cert)

    def issue(
        self, stem: str, names: Sequence[str], client: bool = False
    ) -> tuple[str, str]:
        """
        A leaf certificate for C{names} (DNS names or IP addresses, as
        subjectAltName), for server or client authentication.

        @return: (certificate path, key path).
        """
        key = _key()
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(_san(names), critical=False)
        )
        cert = _validity(builder).sign(self.key, hashes.SHA256())
        return (
            self.certs.write_cert(f"{stem}.crt", cert),
            self.certs.write_key(f"{stem}.key", key),
        )


def self_signed(certs: CertDir, stem: str, names: Sequence[str]) -> tuple[str, str]:
    """
    A self-signed server certificate for C{names}; it is its own trust root.

    @return: (certificate path, key path).
    """
    key = _key()
    name = _name(names[0])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
    )
    cert = _validity(builder).sign(key, hashes.SHA256())
    return certs.write_cert(f"{stem}.crt", cert), certs.write_key(f"{stem}.key", key)
