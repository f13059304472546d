"""
C{python -m tests.sentinel}: what C{bin/dev sentinel} runs. The rig
itself is L{tests.support.sentinel}, whose names this module re-exports.
"""

import sys

from tests.support.sentinel import *  # noqa: F403
from tests.support.sentinel import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
