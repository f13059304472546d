"""``python -m bench.loadtest``: see ``--help``."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

from bench.errors import Fatal
from .options import parse_args
from .report import PROG, Console, emit

if importlib.util.find_spec("redis") is None:  # pragma: no cover - the project venv has it
    sys.stderr.write(f"{PROG}: error: the 'redis' package (redis-py) is required\n")
    sys.exit(2)

from .runner import run  # noqa: E402 - needs redis


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    console = Console(enabled=not options.json_only)
    try:
        result = run(options, console)
    except Fatal as e:
        console.done()
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        console.done()
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    return emit(result, options.json_only)


if __name__ == "__main__":
    sys.exit(main())
