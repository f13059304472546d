"""The error that ends a run early."""

from __future__ import annotations

import sys
from collections.abc import Callable


class Fatal(Exception):
    """An error that ends the run with one clear line and exit status 2."""


def exit_status(prog: str, body: Callable[[], int]) -> int:
    """C{body()}'s exit status; a L{Fatal} is printed as one line on stderr and gives 2."""
    try:
        return body()
    except Fatal as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
