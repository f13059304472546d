"""
The image's HEALTHCHECK: exit 0 when C{GET /health} answers 200, else 1.

It asks the port the proxy listens on: C{HEALTHCHECK_URL} if set, else
C{http://HOST:PORT/health} from the proxy's own settings, read as the
proxy reads them (the environment over a C{.env} in the working
directory; C{HOST} 0.0.0.0 or :: means loopback). With C{LISTEN} (TLS, a
unix socket, another endpoint), set C{HEALTHCHECK_URL} or replace the
HEALTHCHECK.
"""

import os
import sys
import urllib.request

from dotenv import dotenv_values


def url() -> str:
    settings = {**dotenv_values(".env"), **os.environ}
    explicit = settings.get("HEALTHCHECK_URL")
    if explicit:
        return explicit
    host = settings.get("HOST") or "0.0.0.0"
    if host in ("0.0.0.0", "::", "*"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.get('PORT') or '8080'}/health"


def main() -> int:
    try:
        with urllib.request.urlopen(url(), timeout=2.5) as response:
            return 0 if response.status == 200 else 1
    except Exception as e:  # 503, refused, timeout: all unhealthy
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
