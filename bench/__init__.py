"""
Performance tooling: ``run.sh`` (the scenarios of docs/benchmarks.md against
a private redis-server and proxy), ``compression.py`` (permessage-deflate cost) and
``loadtest`` (the load-test tool, ``python -m bench.loadtest``).
"""
