"""
How a Redis connection is made (TCP, TLS with verification, or a Unix
socket) and, when an attempt fails, why: described in one line an operator
can act on, counted by reason and logged once per distinct reason (then at
most once a minute), whichever of the process's connections meets it.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Callable, Optional

from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import RedisAddress, Settings


def encode_command(*args: bytes | str) -> bytes:
    """
    One Redis command in RESP, as written on the wire.
    """
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)


class SentinelError(Exception):
    """
    The sentinels could not name a usable master (see L{wsproxy.redis.sentinel}).
    """


def client_endpoint(reactor: Any, settings: Settings) -> IStreamClientEndpoint:
    """
    The client endpoint for C{REDIS_URL}: TCP, TLS (certificate and hostname
    verified) or a Unix socket.
    """
    address: RedisAddress = settings.redis
    if address.path is not None:
        return endpoints.UNIXClientEndpoint(reactor, address.path, timeout=5)
    endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
        reactor, address.host, address.port, timeout=5
    )
    if address.tls:
        endpoint = endpoints.wrapClientTLS(tls_options(settings), endpoint)
    return endpoint


def tls_options(settings: Settings, host: Optional[str] = None) -> Any:
    """
    TLS for Redis (or a sentinel): the certificate chain is verified against
    the system's CAs or REDIS_TLS_CA_FILE and must be valid for C{host}
    (REDIS_URL's by default); REDIS_TLS_CERT_FILE is presented if set.
    """
    from twisted.internet import ssl

    trust_root: Any = ssl.platformTrust()
    if settings.redis_tls_ca_file:
        trust_root = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(pem) for pem in _trusted_pems(settings)]
        )
    client_cert = None
    if settings.redis_tls_cert_file:
        with open(settings.redis_tls_cert_file, "rb") as f:
            pem = f.read()
        if settings.redis_tls_key_file:
            with open(settings.redis_tls_key_file, "rb") as f:
                pem += b"\n" + f.read()
        client_cert = ssl.PrivateCertificate.loadPEM(pem)
    return ssl.optionsForClientTLS(
        host or settings.redis.host, trustRoot=trust_root, clientCertificate=client_cert
    )


def _split_pem(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part + marker for part in data.split(marker) if b"-----BEGIN" in part]


def _trusted_pems(settings: Settings) -> list[bytes]:
    assert settings.redis_tls_ca_file is not None
    with open(settings.redis_tls_ca_file, "rb") as f:
        return _split_pem(f.read())


# -- why a connection attempt failed -------------------------------------------


def describe_failure(reason: Failure, tls: Any, settings: Settings) -> tuple[str, str]:
    """
    What an operator needs to read about a failed connection attempt: a
    short category (the label of C{wsproxy_redis_connect_failures_total})
    and one line of text naming the actual cause.

    @param tls: the attempt's C{OpenSSL.SSL.Connection} if it used TLS
        (to tell I{why} a certificate failed verification), else C{None}.
    """
    from OpenSSL import SSL
    from service_identity import VerificationError

    if reason.check(SentinelError):
        return "sentinel", str(reason.value)
    if reason.check(VerificationError):
        return "tls_hostname", (
            f"TLS certificate does not match the host name {settings.redis.host!r} "
            "(certificate hostname mismatch)"
        )
    if reason.check(SSL.Error):
        args = reason.value.args if reason.value is not None else ()
        openssl = [
            entry[2] for entry in (args[0] if args and isinstance(args[0], list) else ())
            if isinstance(entry, tuple) and len(entry) == 3 and entry[2]
        ]
        text = "; ".join(openssl) or str(reason.value) or "TLS error"
        if "certificate verify failed" in text:
            detail = _verify_error(tls, settings)
            return "tls_verify", "TLS " + text + (f": {detail}" if detail else "")
        return "tls", f"TLS handshake failed: {text}"
    if reason.check(error.ConnectionRefusedError):
        return "refused", "connection refused"
    if reason.check(error.DNSLookupError):
        return "dns", f"DNS lookup failed for {settings.redis.host!r}"
    if reason.check(error.TimeoutError, error.TCPTimedOutError):
        return "timeout", "connection attempt timed out"
    if reason.check(error.ConnectionDone, error.ConnectionLost, error.ConnectionAborted):
        return "closed", "connection closed before Redis answered (" + (
            reason.getErrorMessage().rstrip(".") + ")"
        )
    if reason.check(error.ConnectError):
        return "connect", reason.getErrorMessage().rstrip(".")
    return "other", reason.getErrorMessage()


#: OpenSSL's texts for the verification errors a Redis operator meets;
#: anything else is reported by number
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}


def _verify_error(tls: Any, settings: Settings) -> Optional[str]:
    """
    OpenSSL reports only "certificate verify failed" for a failed handshake;
    verifying the chain Redis presented against the same trust store again
    gives the reason (unknown issuer, expired, ...).
    """
    if tls is None:
        return None
    try:
        from OpenSSL import crypto

        chain = tls.get_peer_cert_chain()
        if not chain:
            return None
        store = crypto.X509Store()
        if settings.redis_tls_ca_file:
            for pem in _trusted_pems(settings):
                store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
        else:
            import ssl

            # the system's CAs, as platformTrust() uses them
            paths = ssl.get_default_verify_paths()
            cafile = paths.cafile or paths.openssl_cafile
            capath = paths.capath or paths.openssl_capath
            store.load_locations(
                cafile if cafile and os.path.exists(cafile) else None,
                capath if capath and os.path.isdir(capath) else None,
            )
        crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
    except crypto.X509StoreContextError as e:
        code = e.errors[0] if e.errors else None
        return _VERIFY_ERRORS.get(code, str(e.errors[2]) if len(e.errors) > 2 else None) if (
            isinstance(code, int)
        ) else None
    except Exception:
        return None
    return None


def setup_category(why: str) -> str:
    lowered = why.lower()
    if "auth" in lowered or "wrongpass" in lowered or "password" in lowered:
        return "auth"
    if "select" in lowered or "db index" in lowered:
        return "select"
    return "setup"


class ConnectFailures:
    """
    Failed attempts to get a usable Redis connection, shared by a process's
    links: counted by category (for C{/metrics}) and logged as one line per
    distinct reason, repeated at most once per C{interval} with the number of
    attempts in between. Reconnection is attempted about once a second, so
    without this a down Redis would log a line per second per connection.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, where: str, interval: float = 60.0) -> None:
        self._clock = clock
        self._where = where
        self.interval = interval
        self.counts: Counter[str] = Counter()
        #: reason text -> [when last logged, attempts since]
        self._logged: dict[str, list[float]] = {}

    def failed(self, category: str, reason: str) -> None:
        self.counts[category] += 1
        now = self._clock.seconds()
        entry = self._logged.get(reason)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return
        if entry is None and len(self._logged) >= 32:
            self._logged.clear()  # bounded, whatever the failures say
        repeated = 0 if entry is None else int(entry[1])
        self._logged[reason] = [now, 0]
        self._log.error(
            "redis {where}: connection failed: {reason}; retrying{repeated}",
            where=self._where,
            reason=reason,
            category=category,
            repeated=f" ({repeated} more failed attempts since the last report)"
            if repeated else "",
        )

    def recovered(self) -> None:
        """
        A connection became usable: the next failure is news again.
        """
        self._logged.clear()


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """
    Passes connection attempts on to C{endpoint} and tells C{on_failure}
    why one failed (refused, timeout, DNS): C{ClientService} only schedules
    the next attempt.
    """

    def __init__(
        self, endpoint: IStreamClientEndpoint, on_failure: Callable[[Failure], None]
    ) -> None:
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        def failed(reason: Failure) -> Failure:
            # an attempt cancelled (the link stopped: shutdown, or a cluster
            # node retired) is no failure: a TCP attempt fails with
            # ConnectingCancelledError, whose text is only the address
            if not reason.check(defer.CancelledError, error.ConnectingCancelledError):
                self._on_failure(reason)
            return reason

        connecting: defer.Deferred[Any] = self._endpoint.connect(factory)
        return connecting.addErrback(failed)
