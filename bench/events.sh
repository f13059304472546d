#!/usr/bin/env bash
# The cost of lifecycle events (EVENTS): proxy CPU per connection opened and
# closed, and per downstream message, with events off and on, runs alternated
# against one Redis with the same load tool.
#
#   bench/events.sh [ROUNDS] [EVENTS]      default: 3 rounds, EVENTS=all,stream
#
# Each run: a fresh proxy, 2,000 clients connect (200 handshakes in flight),
# receive 20 messages each, and close. "conn_us" is the proxy CPU of the whole
# run minus its down phase, per connection (open + close); "down_us" the
# down phase's CPU per delivered message. Prints one JSON line per run and a
# summary with the medians and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
EVENTS_ON=${2:-all,stream}
PY=$(pwd)/.venv/bin/python
[ -x "$PY" ] || bin/dev setup
. bench/servers.sh
start_redis
cpu_seconds() { awk '{printf "%.2f\n", ($14 + $15) / 100}' "/proc/$1/stat"; }

echo "bench/events: $(nproc) cores, HEAD $(git rev-parse --short HEAD), EVENTS off vs $EVENTS_ON, $ROUNDS rounds" >&2
results="$tmp/results.jsonl"
for round in $(seq "$ROUNDS"); do
    for events in "" "$EVENTS_ON"; do
        start_proxy EVENTS="$events"
        before=$(cpu_seconds "$ppid")
        line=$("$PY" -m bench.loadtest --url "ws://127.0.0.1:$PPORT" \
            --redis-url "redis://127.0.0.1:$RPORT" --pid "$ppid" --json-only \
            --clients 2000 --concurrency 200 --burst 20 --phases connect,down)
        # the tool has closed every client: wait for the proxy to see it
        for _ in $(seq 100); do
            open=$(curl -fs "http://127.0.0.1:$PPORT/health" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["active_connections"])')
            [ "$open" = 0 ] && break
            sleep 0.1
        done
        after=$(cpu_seconds "$ppid")
        stop_proxy
        echo "$line" | "$PY" -c '
import json, sys
events, rnd, before, after = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
data = json.loads(sys.stdin.read())
down = data["phases"]["down"]
clients = data["phases"]["connect"]["ok"]
conn_us = (after - before - down["proxy_cpu_seconds"]) / clients * 1e6
print(json.dumps({"events": events or "off", "round": rnd, "clients": clients,
                  "conn_us": round(conn_us, 1), "down_us": down["proxy_cpu_us_per_msg"],
                  "lost": down["lost"]}))
' "$events" "$round" "$before" "$after" | tee -a "$results"
    done
done
"$PY" - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
summary = {}
for key in ("conn_us", "down_us"):
    off = statistics.median(r[key] for r in rows if r["events"] == "off")
    on = statistics.median(r[key] for r in rows if r["events"] != "off")
    summary[key] = {"off": off, "on": on, "ratio": round(on / off, 3)}
print(json.dumps({"summary": summary}))
PY
