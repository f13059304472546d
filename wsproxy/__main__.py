"""
C{python -m wsproxy [options]}: the same as C{twistd -n wsproxy [options]},
in the foreground and without a pid file.
"""

import sys


def main() -> None:
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "wsproxy", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
