"""
A handshake flood against a proxy while one healthy session receives a
steady stream: C{python -m bench.flood --help} (C{bench/run.sh flood}).

For each target (wsproxy; wsproxy with C{AUTH_MODE=jwt}, HS256 or ES256,
whose flood carries forged JWTs: one per request, for its own session,
signed with a key of the right kind the proxy does not know; and the
Node.js bridge of C{../shared/peers/node_bridge.js} when it can be started)
in one run, on one private redis-server, C{--rounds} times with the order
swapping every round (then a summary line of medians and ratios to node):

  - one healthy session is connected with a valid token and a publisher
    sends it a timestamped, numbered message every C{--interval} ms;
  - after a quiet baseline, a separate flooder process sends
    C{--requests} upgrade requests with wrong tokens, C{--concurrency} at a
    time, from C{--sources} loopback addresses (127.0.0.2, .3, ...);
  - printed per target: refusals per second, the server process's CPU per
    refusal (from C{/proc}), the answers by status, and the healthy
    session's delivery latency p50/p99/max before and during the flood and
    how many of its messages were lost.
"""
