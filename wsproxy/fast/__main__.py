"""
C{python -m wsproxy.fast}: check every borrowed internal against the
installed Twisted, Autobahn and CPython (L{wsproxy.fast.borrowed}); one
line per internal, exit status 1 if any is missing or misbehaves.
"""

from __future__ import annotations

import sys


def main() -> int:
    from twisted.internet import reactor

    from .borrowed import check

    results = check(reactor)
    for result in results:
        print(result.line())
    return 1 if any(r.problem is not None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
