"""C{python -m bench.rolling}: see C{--help}."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.children import raise_open_files_limit
from bench.errors import Fatal
from bench.resume.report import Console, Report, emit, summary

from .deploy import require_image
from .options import PROG, parse_args
from .run import run_mode

# what the summary on stderr shows of each mode
SUMMARY_KEYS = ("deploy_s", "exit_codes", "shutdown_complete", "down_sent", "down_lost",
                "down_duplicates", "down_reordered", "down_incomplete", "up_produced",
                "up_lost", "up_duplicates_before_dedup", "up_duplicates", "up_reordered",
                "up_resent", "reconnects", "sessions_reconnected", "reconnect_p50_ms",
                "reconnect_p99_ms", "reconnect_max_ms", "reconnect_after_jitter_p50_ms",
                "reconnect_after_jitter_p99_ms", "close_codes", "connect_failures",
                "haproxy", "ok")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    raise_open_files_limit()
    console = Console(prog=PROG)
    workdir = Path(tempfile.mkdtemp(prefix="bench-rolling-"))
    prefix = f"wsproxy-rolling-{os.getpid()}"
    runs: list[Report] = []
    try:
        require_image(options.image)
        for mode in options.modes:
            runs.append(run_mode(options, mode, workdir / mode, f"{prefix}-{mode}", console))
    except Fatal as e:
        sys.stderr.write(f"{PROG}: error: {e}\n(logs kept in {workdir})\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted (logs in {workdir})\n")
        return 130
    if options.keep:
        sys.stderr.write(f"{PROG}: logs kept in {workdir}\n")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    for run in runs:
        sys.stderr.write(f"{PROG}: mode {run['mode']} ({run['clients']} clients, "
                         f"{run['containers']} containers)\n")
        summary(run, SUMMARY_KEYS)
    # the verdict: the graceful deploy if it ran, else the one that did
    judged = next((r for r in runs if r["mode"] == "drain"), runs[0])
    emit({"benchmark": "rolling", "ok": judged["ok"], "runs": runs})
    return 0 if judged["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
