"""
C{python -m tests.cluster}: what C{bin/dev cluster} runs (and what
C{bench/cluster.py} imports). The rig itself is L{tests.support.cluster},
whose names this module re-exports.
"""

import sys

from tests.support.cluster import *  # noqa: F403
from tests.support.cluster import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
