"""
Benchmarks of resumable sessions: C{python -m bench.resume --help}.

C{failover} (L{bench.resume.failover}) kills and restarts wsproxy processes
under a steady numbered stream and checks that every resuming session got
every message once and in order; C{cost} (L{bench.resume.cost}) measures
what recovery costs per message and per connection next to the plain path.

Both start their own servers (L{bench.servers}: redis-server and
C{python -m wsproxy} processes) and fork their load: client worker
processes (L{bench.resume.workers}, holding the sessions of
L{bench.resume.client} on the load-test tool's raw WebSocket client) and
one publisher (L{bench.resume.publisher}). L{bench.resume.stream} is the
message format and the per-session ledger the checks are made against.
"""
