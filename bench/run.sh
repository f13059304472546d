#!/usr/bin/env bash
# Reproducible performance runs: starts a private redis-server and wsproxy
# (loopback, LOG_LEVEL=warn) when a scenario of the load-test tool (python -m
# bench.loadtest) first needs them, runs the tool with --pid for each such
# scenario, prints one JSON line per scenario to stdout (tables on stderr),
# and stops everything.
#
#   bench/run.sh [scenario ...]        default: smoke down up paced conn10k
#   WORKERS=2 bench/run.sh down up     the same with two worker processes
#
# Scenarios (the targets in docs/benchmarks.md):
#   smoke    200 clients, 5 msgs down/up, paced 200/s for 3 s
#   down     1,000 sessions x 100 downstream 100-byte messages (burst)
#   up       1,000 clients x 100 upstream 100-byte messages (burst)
#   paced    10,000 sessions, 2,000 msgs/s for 10 s (latency)
#   conn10k  10,000 connections, 500 handshakes in flight (connect + RSS)
#   churn    10,000 connections opened and closed three times (RSS plateau,
#            leftover subscriptions)
#   scale    1,000, 10,000 and 19,000 idle connections on one (fresh) process in
#            turn (heartbeats at their defaults, 30 s idle each): RSS per
#            connection, idle CPU, then paced 2,000 msgs/s for 10 s (per-message
#            CPU and latency must not grow with the number of idle connections);
#            then the proxy's garbage-collection pauses from /metrics
#   scale100k  100,000 idle connections on one machine: run as
#            WORKERS=6 bench/run.sh scale100k (each process holds at most its
#            descriptor limit, 20,000 here), clients from 127.0.0.1-127.0.0.5
#   flood    10,000 upgrades with wrong tokens (200 in flight, one address) while
#            one healthy session receives a message every 10 ms: wsproxy (default
#            settings, and AUTH_FAIL_LIMIT=0) and the Node.js bridge in one run
#            (python -m bench.flood; its own redis-server and servers). The
#            bridge: $NODE_BRIDGE, default ../shared/peers/node_bridge.js; its
#            npm packages are installed once into .cache/node-bridge (gitignored)
#   versus   wsproxy (defaults, WORKERS=1) and the Node.js bridge side by side,
#            the same load tool against both, targets alternating, ROUNDS=2
#            rounds, a fresh server for every run (python -m bench.versus; its own
#            redis-server): down and up, each as a burst and at one message per
#            socket per turn (10,000 msgs/s over 1,000 sessions); RSS per idle
#            connection and set-up CPU (10,000 connections, 500 in flight); a
#            reconnect storm (10,000 clients all at once). Per scenario both
#            figures and the ratio wsproxy/node (JSON lines on stdout, a table on
#            stderr). The bridge and its npm packages as for flood
#   jwt      JWT authentication (AUTH_MODE=jwt) beside Redis tokens and the Node.js
#            bridge, ROUNDS=3 rounds, targets alternating (two commands, each its
#            own redis-server): python -m bench.versus with wsproxy (Redis tokens),
#            wsproxy-jwt-hs256, wsproxy-jwt-es256 and node: set-up CPU per
#            connection at 1,000, 10,000 and 19,000 connections (500 in flight,
#            from 127.0.0.1-2, idle 1 s), then a 10,000-client reconnect storm; and
#            python -m bench.flood: 10,000 forged JWTs (HS256, ES256; 200 in flight,
#            from 250 addresses, so AUTH_FAIL_LIMIT never trips) against wsproxy and
#            10,000 wrong Redis tokens against the bridge and wsproxy with Redis
#            tokens, with a healthy session's p99. Each prints whether the JWT
#            issue's targets are met
#
# Topics (python -m bench.topics; its own redis-server, a fresh server per run,
# wsproxy with TOPICS=true, WORKERS=1, beside bench/topics/node_topics.js, a
# copy of the Node.js bridge extended with the same per-process topic fan-out;
# its npm packages as for flood; ROUNDS=2 rounds, targets alternating):
#   topics   fanout: one topic of 10,000 sockets (a session each), 50 PUBLISHes
#            on topic:T:down, one after the other: proxy CPU per delivery
#            wsproxy vs node (target: wsproxy at most half), PUBLISH to the last
#            socket's receipt p50/p99, nothing lost; per-session: the same
#            10,000 sockets on wsproxy, a message to all of them as 10,000
#            PUBLISHes on session:S:down or one on the topic, 50 times: Redis
#            and proxy CPU per delivery both ways; centrifugo: 1,000 and 10,000
#            sockets, each in its personal session and a group topic of 10, 20
#            batches of one message per session and per group: deliveries per
#            proxy CPU second and p99, wsproxy and node; resume-mix: the fan-out
#            with RESUME=true, half the sockets ?resume=&labels=1 and FCALL
#            wsproxy_publish, vs plain PUBLISH and plain sockets: proxy CPU per
#            delivery of each and the ratio
#
# Resumable sessions (python -m bench.resume; these start, kill and restart
# their own redis-server and proxies, RESUME=true, WORKERS=1 each):
#   resume       1,000 resuming sessions, 1,000 numbered msgs/s for 30 s over two
#                proxies, one SIGKILLed and restarted every 5 s, clients back
#                after 0-2 s: gaps, duplicates, reordered, incomplete must be 0
#   resume-cost  1,000 sessions x 100 messages (a burst), plain vs resumable vs
#                "live" (the proxy's resumable path without the Redis function),
#                two rounds: proxy and Redis CPU per message, RSS per connection,
#                ratios to plain
#
# Rolling deploys (python -m bench.rolling; its own redis-server and HAProxy on
# the host, wsproxy containers of the image $IMAGE, default wsproxy:dev, built
# by bin/dev image; needs docker and haproxy):
#   rolling      1,000 resuming clients with ?ack=1 through HAProxy (the shipped
#                deploy/haproxy/haproxy.cfg) in front of
#                two containers, 1 msg/s each way per client; the containers
#                replaced one at a time, first with docker stop (SIGTERM: the
#                drain), then with docker kill (SIGKILL): lost, duplicated and
#                reordered messages both ways must be 0 (exit status 1 otherwise,
#                for the drain), reconnect time p50/p99, the deploy's duration,
#                the exit codes
#   rolling-delay  the same drain with SHUTDOWN_CLOSE_DELAY_SECS=3: clients
#                closed once HAProxy has taken the instance out
#
# Redis Cluster (python -m bench.cluster; starts its own redis-server and a
# 3-master + 3-replica cluster, and a proxy per target and round):
#   cluster      500 sessions x 100 100-byte messages down, then up, through a
#                single Redis and through the cluster, two rounds alternated:
#                proxy CPU per message, ratio, each master's share of the work
#
# Durable upstream (python -m bench.upstream; its own redis-server and proxies):
#   upstream-durable  500 clients x 100 upstream 100-byte messages (a burst) with
#                UPSTREAM=pubsub, UPSTREAM=stream and UPSTREAM=stream + ?ack=1,
#                alternating, three rounds: proxy CPU per message, Redis memory
#                per retained entry, ratios to pubsub
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || bin/dev setup
. bench/servers.sh
# the redis-server and proxy the load-test tool's scenarios share, started once
start_shared() {
    [ -z "$ppid" ] || return 0
    start_redis
    start_proxy WORKERS="${WORKERS:-1}"
}
# a fresh proxy on the shared Redis (RSS per connection from a clean heap)
restart_proxy() {
    start_shared
    stop_proxy
    start_proxy WORKERS="${WORKERS:-1}"
}
# the proxy's garbage-collection pauses so far, from /metrics (one JSON line)
gc_report() {
    curl -fs "http://127.0.0.1:$PPORT/metrics" | $PY -c '
import json, sys
from prometheus_client.parser import text_string_to_metric_families
pauses = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    if family.name != "wsproxy_gc_pause_seconds":
        continue
    for sample in family.samples:
        gen = pauses.setdefault("gen" + sample.labels["generation"], {"buckets": []})
        if sample.name.endswith("_count"):
            gen["collections"] = int(sample.value)
        elif sample.name.endswith("_sum"):
            gen["total_s"] = round(sample.value, 3)
        elif sample.name.endswith("_bucket"):
            gen["buckets"].append((float(sample.labels["le"]), sample.value))
for gen in pauses.values():
    # the smallest bucket bound that holds every pause
    gen["longest_at_most_s"] = min(le for le, n in gen.pop("buckets") if n >= gen["collections"])
print(json.dumps({"scenario": "gc", "pauses": pauses}))'
}
# the Node.js bridge's npm packages, installed once into the gitignored
# .cache/node-bridge (or $NODE_BRIDGE_MODULES); without npm the bridge is left out
node_modules() {
    export NODE_BRIDGE_MODULES=${NODE_BRIDGE_MODULES:-.cache/node-bridge}
    if command -v npm >/dev/null && [ ! -d "$NODE_BRIDGE_MODULES/node_modules/ioredis" ]; then
        mkdir -p "$NODE_BRIDGE_MODULES"
        npm install --silent --prefix "$NODE_BRIDGE_MODULES" ws ioredis bufferutil utf-8-validate >&2
    fi
}
echo "bench: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, WORKERS=${WORKERS:-1}, $(date -u +%F)" >&2
lt() { start_shared; $PY -m bench.loadtest --url "ws://127.0.0.1:$PPORT" --redis-url "redis://127.0.0.1:$RPORT" --pid "$ppid" "$@"; }
status=0
for scenario in "${@:-smoke down up paced conn10k}"; do
    for s in $scenario; do
        echo "== $s" >&2
        case "$s" in
            smoke)   lt --clients 200 --burst 5 --rate 200 --duration 3 --upstream 5 ;;
            down)    lt --clients 1000 --burst 100 --phases connect,down ;;
            up)      lt --clients 1000 --upstream 100 --phases connect,up ;;
            paced)   lt --clients 10000 --concurrency 500 --rate 2000 --duration 10 --phases connect,paced ;;
            conn10k) lt --clients 10000 --concurrency 500 --phases connect ;;
            scale)   for n in 1000 10000 19000; do
                         restart_proxy
                         lt --clients "$n" --concurrency 500 --idle 30 --rate 2000 --duration 10 \
                            --phases connect,paced --source-addresses 127.0.0.1,127.0.0.2 || exit 1
                         gc_report
                     done ;;
            scale100k)
                     [ "${WORKERS:-1}" -ge 6 ] || echo "scale100k: WORKERS=${WORKERS:-1}; each process holds at most its descriptor limit (run with WORKERS=6)" >&2
                     lt --clients 100000 --concurrency 500 --procs 6 --idle 60 --phases connect \
                        --connect-timeout 30 \
                        --source-addresses 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 ;;
            churn)   for i in 1 2 3; do lt --clients 10000 --concurrency 500 --phases connect; done
                     $PY - "$RPORT" "$ppid" <<'PY'
import json, sys, redis
port, pid = int(sys.argv[1]), sys.argv[2]
left = redis.Redis(port=port).pubsub_channels("session:*")
rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
print(json.dumps({"scenario": "churn", "leftover_session_channels": len(left),
                  "proxy_rss_mib_after": round(rss / 1024, 1)}))
PY
                     ;;
            flood)   node_modules
                     $PY -m bench.flood --targets wsproxy,wsproxy-nolimit,node ;;
            versus)  node_modules
                     $PY -m bench.versus --rounds "${ROUNDS:-2}" ;;
            jwt)     node_modules
                     $PY -m bench.versus --rounds "${ROUNDS:-3}" --scenarios conn,storm \
                         --targets wsproxy,wsproxy-jwt-hs256,wsproxy-jwt-es256,node \
                         --conn-clients 1000,10000,19000 --conn-sources 2 --idle 1 || status=1
                     $PY -m bench.flood --rounds "${ROUNDS:-3}" --requests 10000 --concurrency 200 \
                         --sources 250 --targets wsproxy,wsproxy-jwt,wsproxy-jwt-es256,node ;;
            topics)  node_modules
                     $PY -m bench.topics --rounds "${ROUNDS:-2}" ;;
            resume)  $PY -m bench.resume failover --sessions 1000 --proxies 2 --rate 1000 \
                         --duration 30 --kill-every 5 --down 1 --reconnect-max 2 ;;
            resume-cost)
                     $PY -m bench.resume cost --sessions 1000 --messages 100 \
                         --modes plain,resume,live --rounds 2 ;;
            rolling) $PY -m bench.rolling --clients 1000 --containers 2 --modes drain,kill \
                         --image "${IMAGE:-wsproxy:dev}" ;;
            rolling-delay)
                     $PY -m bench.rolling --clients 1000 --containers 2 --modes drain \
                         --close-delay 3 --image "${IMAGE:-wsproxy:dev}" ;;
            cluster) $PY -m bench.cluster --sessions 500 --messages 100 --rounds 2 ;;
            upstream-durable)
                     $PY -m bench.upstream --clients 500 --messages 100 --size 100 --rounds 3 ;;
            *) echo "unknown scenario $s" >&2; exit 2 ;;
        esac || status=1
    done
done
exit $status
