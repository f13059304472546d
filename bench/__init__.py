"""
Performance tooling: ``run.sh`` (the scenarios of docs/benchmarks.md against
a private redis-server and proxy), ``compare.sh`` and ``events.sh`` (side by
side runs), ``compression.py`` (permessage-deflate cost), ``loadtest`` (the
load-test tool, ``python -m bench.loadtest``) and the scenarios that start
their own servers (``resume``, ``versus``, ``flood``, ``cluster``,
``upstream``).

What they share, each in one place:

- ``servers``: the private redis-server and wsproxy processes a run starts
  and stops (``python -m bench.servers`` for the shell scripts, through
  ``servers.sh``); ``ports``: free loopback ports for them.
- ``children``: the forked processes that make the load (their pipes,
  commands and replies, progress counters in shared memory, stopping them).
- ``pipeline``: pipelined writes to Redis, as a burst or on a paced schedule.
- ``errors``: the error that ends a run with one line.
"""
