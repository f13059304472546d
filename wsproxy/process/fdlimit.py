"""
The process's file-descriptor limit and how many connections it allows.

Every WebSocket connection holds one descriptor. A process whose soft
limit is the common default of 1,024 refuses its thousandth client with an
C{EMFILE} inside C{accept()} (the kernel's answer, which the client sees as
a reset and Twisted logs as "Out of file descriptors"), long before the
machine is busy. So at start the soft limit is raised to the hard limit
(which an unprivileged process may do), the effective limit is logged, and
the connection cap is kept below it with a reserve for everything else the
process opens (Redis connections, the listening socket, log files, a
worker's supervisor channel, connections accepted and still in their
handshake): past the cap a client gets a clear 503 instead of a reset.

The choices, for operators:

  - C{MAX_CONNECTIONS=0} (unlimited, the default) means "as many as the
    descriptor limit allows": the cap becomes the limit minus L{RESERVE}.
  - a C{MAX_CONNECTIONS} above that is lowered to it, with a warning
    naming both numbers, because the process could not honour it anyway.
  - with C{WORKERS=n} each worker is its own process with its own limit:
    the figures apply per worker.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Callable, Optional

#: descriptors kept for what is not a client connection
RESERVE = 128

#: what an "unlimited" hard limit is taken as (Linux refuses RLIM_INFINITY
#: for RLIMIT_NOFILE; its default fs.nr_open is 1,048,576)
_UNLIMITED = 1 << 20


@dataclass(frozen=True)
class DescriptorLimit:
    """
    @ivar limit: the soft limit after start-up (what the process may open).
    @ivar before: the soft limit the process was started with.
    @ivar error: why the soft limit could not be raised, if it could not.
    """

    limit: int
    before: int
    error: Optional[str] = None

    @property
    def capacity(self) -> int:
        """How many client connections the limit leaves room for."""
        return max(1, self.limit - RESERVE)

    def cap(self, max_connections: int) -> int:
        """
        The connection cap to enforce: C{MAX_CONNECTIONS}, or the
        capacity if that is unlimited (0) or larger.
        """
        if max_connections == 0:
            return self.capacity
        return min(max_connections, self.capacity)

    def describe(self, max_connections: int) -> tuple[str, Optional[str]]:
        """
        The info line to log, and a warning if C{MAX_CONNECTIONS} (or its
        absence) asks for more than the limit allows.
        """
        raised = "" if self.limit == self.before else f", raised from {self.before}"
        info = (f"file descriptor limit {self.limit}{raised}: "
                f"up to {self.cap(max_connections)} connections")
        if self.error is not None:
            info += f" (could not raise it: {self.error})"
        warning = None
        if max_connections > self.capacity:
            warning = (f"MAX_CONNECTIONS={max_connections} exceeds what the file "
                       f"descriptor limit {self.limit} allows: connections past "
                       f"{self.capacity} get 503 (raise the hard limit, e.g. "
                       f"LimitNOFILE= in systemd or ulimit -Hn, or use WORKERS)")
        return info, warning


def raise_soft_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> DescriptorLimit:
    """
    Raise this process's soft C{RLIMIT_NOFILE} to its hard limit.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        return DescriptorLimit(soft, soft)
    if soft == resource.RLIM_INFINITY:
        return DescriptorLimit(_UNLIMITED, _UNLIMITED)
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        return DescriptorLimit(soft, soft, str(e) or e.__class__.__name__)
    return DescriptorLimit(target, soft)
