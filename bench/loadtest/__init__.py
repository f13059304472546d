"""
The load-test tool behind docs/benchmarks.md's figures and ``bench/run.sh``:
``python -m bench.loadtest --help``.

One process drives the run (``runner``: set-up, the phases in order,
teardown); the load itself comes from child processes it forks:

- ``workers``: client worker processes, each holding a slice of the WebSocket
  connections (``wsclient``: a lean raw RFC 6455 client on asyncio) and
  counting what arrives on them.
- ``redis_io``: publisher processes (pipelined PUBLISH for the downstream
  phases) and the subscriber process (PSUBSCRIBE for the upstream phase).

They talk over pipes (typed command and reply objects) and report progress
through counters in shared memory (``bench.children``; ``pool`` names the
run's children); the publishers write through ``bench.pipeline``.
``phases`` runs each phase and turns what came back into figures, ``procstat`` reads CPU and memory from
``/proc``, ``target`` checks the proxy and Redis before anything starts,
``messages`` is the payload format, and ``report`` prints the table and the
JSON line and decides the exit status. ``options`` holds the command line.
"""
