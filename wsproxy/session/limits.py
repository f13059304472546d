"""
Limits per client address on failed authorization, and who the client is
behind trusted reverse proxies.

After C{AUTH_FAIL_LIMIT} failed token checks (401 or 403) from one address
within C{AUTH_FAIL_WINDOW_SECS}, further upgrades from it are answered 429
with C{Retry-After} by L{wsproxy.edge.site} before anything else is done (no
Autobahn, no Redis), until the window that began with its first failure has
passed. Valid tokens never count: a reconnect storm of legitimate clients
is never limited, however large.

The table of addresses is bounded (C{AUTH_FAIL_TABLE_SIZE}): when full, the
address whose last failure is the oldest is forgotten, so an attacker with
many addresses can only make the proxy forget, never grow.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

from twisted.internet.interfaces import IReactorTime

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _address(text: str) -> Optional[Address]:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:192.0.2.1 is 192.0.2.1 (an IPv6 socket accepting IPv4)
        return address.ipv4_mapped
    return address


def in_networks(text: str, networks: Sequence[Network]) -> bool:
    """
    Whether the address C{text} is in one of C{networks} (C{False} for
    anything that is not an IP address).
    """
    if not networks:
        return False
    address = _address(text)
    return address is not None and any(address in network for network in networks)


def _forwarded_for(value: str) -> list[str]:
    """
    The C{for=} node of each element of a C{Forwarded} header (RFC 7239),
    left to right, without port, brackets or quotes ("" when an element
    has none or an obfuscated one).
    """
    nodes = []
    for element in value.split(","):
        node = ""
        for pair in element.split(";"):
            name, _, text = pair.strip().partition("=")
            if name.strip().lower() == "for":
                node = text.strip().strip('"')
                if node.startswith("["):
                    node = node[1:].partition("]")[0]
                elif node.count(":") == 1:
                    node = node.partition(":")[0]
        nodes.append(node)
    return nodes


def client_address(
    peer: str, header: Callable[[str], Optional[str]], trusted: Sequence[Network]
) -> str:
    """
    The client's address: the TCP peer, unless the peer is a trusted proxy;
    then the nearest address, walking C{Forwarded} (or, without it,
    C{X-Forwarded-For}) from the right, that is not itself a trusted proxy.
    A malformed or obfuscated entry stops the walk at the last trusted hop:
    nothing a client wrote left of it is believed.

    @param header: a request header's value by lower-case name (repeated
        headers joined with commas), or C{None}.
    """
    if not in_networks(peer, trusted):
        return peer
    forwarded = header("forwarded")
    if forwarded is not None:
        hops = _forwarded_for(forwarded)
    else:
        hops = [hop.strip() for hop in (header("x-forwarded-for") or "").split(",")]
    client = peer
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        client = str(address)
        if not any(address in network for network in trusted):
            break
    return client


class FailedAuthLimit:
    """
    Failed token checks per client address within a window.

    @ivar limited: upgrades refused because their address was limited.
    @ivar failures: failed token checks counted.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int,
        window: float,
        max_addresses: int,
        exempt: Sequence[Network] = (),
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._exempt = tuple(exempt)
        #: address -> [start of its window, failures in it]; least recently
        #: failed first
        self._table: OrderedDict[str, list[float]] = OrderedDict()
        self.limited = 0
        self.failures = 0
        #: with WORKERS > 1, told of every failure counted here, so that the
        #: supervisor counts them over all workers (L{wsproxy.process.workers})
        self.relay: Optional[Callable[[str], None]] = None

    def __len__(self) -> int:
        return len(self._table)

    def retry_after(self, address: str) -> Optional[int]:
        """
        Whether upgrades from C{address} are refused now: the whole seconds
        until they are not, else C{None}. One dictionary lookup for an
        address with no recent failure.
        """
        entry = self._table.get(address)
        if entry is None:
            return None
        left = entry[0] + self.window - self._clock.seconds()
        if left <= 0:
            del self._table[address]
            return None
        if entry[1] < self.limit:
            return None
        self.limited += 1
        return max(1, math.ceil(left))

    def failed(self, address: str, count: int = 1) -> Optional[float]:
        """
        C{count} token checks from C{address} failed (401 or 403).

        @return: if these made the address limited, the seconds its window
            has left; else C{None}.
        """
        if not self.limit or in_networks(address, self._exempt):
            return None
        self.failures += count
        if self.relay is not None:
            self.relay(address)
        now = self._clock.seconds()
        entry = self._entry(address, now)
        before = entry[1]
        entry[1] += count
        if before < self.limit <= entry[1]:
            return entry[0] + self.window - now
        return None

    def impose(self, address: str, left: float) -> None:
        """
        Upgrades from C{address} are refused for the next C{left} seconds:
        another worker of this instance saw it reach the limit (see
        L{wsproxy.process.workers}).
        """
        now = self._clock.seconds()
        entry = self._entry(address, now)
        if entry[1] < self.limit or entry[0] + self.window < now + left:
            entry[0] = now + left - self.window  # its window ends in left seconds
        entry[1] = max(entry[1], self.limit)

    def _entry(self, address: str, now: float) -> list[float]:
        """
        C{address}'s entry, a new one if its window has passed; the table
        kept within C{max_addresses}, the least recently failed forgotten
        first.
        """
        table = self._table
        entry = table.get(address)
        if entry is None or now - entry[0] >= self.window:
            if entry is None:
                while len(table) >= self.max_addresses:
                    table.popitem(last=False)
            entry = table[address] = [now, 0]
        else:
            table.move_to_end(address)
        return entry
