"""
Free loopback ports for the servers the benchmarks and tests start.
"""

from __future__ import annotations

import random
import socket

#: ports handed out by free_port in this process
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """
    A port nothing listens on, below the kernel's ephemeral range. A port
    from that range (what binding port 0 gives) can be taken as the source
    port of any outgoing connection between the moment it is chosen and
    the moment a child process binds it, which a load run or the test
    suite's own clients make likely; below it, only a listener can take it.
    """
    low = min(_ephemeral_low(), 65536)
    for _ in range(1000):
        port = random.randrange(10000, low)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port between 10000 and {low}")


if __name__ == "__main__":
    print(free_port())
