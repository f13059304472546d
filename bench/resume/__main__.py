"""C{python -m bench.resume}: see C{--help}."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.children import raise_open_files_limit
from bench.errors import Fatal

from .cost import SUMMARY_KEYS as COST_KEYS, run_cost
from .failover import SUMMARY_KEYS as FAILOVER_KEYS, run_failover
from .options import PROG, FailoverOptions, parse_args
from .report import Console, emit, summary


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    raise_open_files_limit()
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    keep = options.common.keep
    keys: tuple[str, ...]
    try:
        if isinstance(options, FailoverOptions):
            report = run_failover(options, workdir, console)
            keys = FAILOVER_KEYS
        else:
            report = run_cost(options, workdir, console)
            keys = COST_KEYS
    except Fatal as e:
        sys.stderr.write(f"{PROG}: error: {e}\n(logs kept in {workdir})\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted (logs in {workdir})\n")
        return 130
    if keep:
        sys.stderr.write(f"{PROG}: logs kept in {workdir}\n")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    summary(report, keys)
    emit(report)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
