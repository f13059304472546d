"""One run from start to end: checks, set-up, the phases in order, teardown."""

from __future__ import annotations

import math

from bench.children import Counters

from .options import Options, selected_phases, source_addresses
from .phases import Run, close, connect, downstream, idle, upstream
from .pool import ChildProcesses
from .procstat import Sampler
from .report import Console, PhaseReport, RunResult
from .target import Sessions, Target, preflight, raise_open_files_limit
from .workers import COUNTERS_PER_WORKER, ClientSpec, WorkerConfig
from .wsclient import UpgradeRequest


def run(options: Options, console: Console) -> RunResult:
    """
    Runs the load test; its result, problems included.

    @raise Fatal: if the target is unreachable or the run cannot go on.
    """
    phases = selected_phases(options)
    target = preflight(options, console)
    raise_open_files_limit(options, console)
    sessions = Sessions(options.clients)
    children = ChildProcesses()
    if options.jwt_key_file:
        # before any load: minting is the backend's work, never measured
        sessions.mint_jwts(options.jwt_key_file, options.jwt_algorithm)
    try:
        sessions.authorize(target.redis, options.token_ttl)
        counters = Counters(children.context, options.procs, COUNTERS_PER_WORKER,
                            options.publishers, subscriber=True)
        children.start(_client_specs(options, sessions), _worker_config(options, target),
                       publishers=options.publishers if {"down", "paced"} & set(phases) else 0,
                       subscriber=bool({"up", "uppaced"} & set(phases)),
                       redis_url=options.redis_url,
                       counters=counters)
        pids = dict(children.pids)
        if options.pid:
            pids["proxy"] = options.pid
        if target.redis_pid:
            pids["redis"] = target.redis_pid
        state = Run(options, console, target.proxy.is_local, sessions, children, counters,
                    Sampler(pids))

        reports: dict[str, PhaseReport] = {}
        reports["connect"], opened = connect(state)
        if opened and options.idle > 0:
            reports["idle"] = idle(state, opened)
        if opened:
            for phase in phases[1:]:
                reports[phase] = (upstream(state, phase) if phase in ("up", "uppaced")
                                  else downstream(state, phase))
        close_report = close(state)
    finally:
        console.done()
        children.shutdown()
        sessions.revoke(target.redis, options.token_ttl, console)
    return {
        "tool": "wsproxy-load-test", "url": options.url, "redis_url": options.redis_url,
        "run_id": sessions.run_id,
        "config": {"clients": options.clients, "concurrency": options.concurrency,
                   "procs": options.procs, "publishers": options.publishers,
                   "burst": options.burst, "size": options.size, "rate": options.rate,
                   "duration": options.duration, "upstream": options.upstream,
                   "phases": phases, "binary": options.binary, "auth": options.auth,
                   "jwt_algorithm": options.jwt_algorithm if options.jwt_key_file else None,
                   "pid": options.pid, "idle": options.idle,
                   "source_addresses": list(source_addresses(options))},
        "health": target.health, "phases": reports, "close": close_report,
        "ok": not state.problems, "problems": state.problems,
    }


def _worker_config(options: Options, target: Target) -> WorkerConfig:
    proxy = target.proxy
    return WorkerConfig(
        host=proxy.host, port=proxy.port,
        request=UpgradeRequest(proxy.host_header.encode(), proxy.path_prefix, options.agent,
                               token_in_query=options.auth == "query"),
        size=options.size, binary=options.binary, connect_timeout=options.connect_timeout,
        concurrency=max(1, math.ceil(options.concurrency / options.procs)),
        source_addresses=source_addresses(options))


def _client_specs(options: Options, sessions: Sessions) -> list[list[ClientSpec]]:
    """Each worker's clients: every --procs-th session."""
    return [[ClientSpec(i, sessions.ids[i], sessions.tokens[i])
             for i in range(worker_id, options.clients, options.procs)]
            for worker_id in range(options.procs)]
