#!/usr/bin/env bash
# Side-by-side cost of the plain path: this checkout's proxy against the proxy
# of another revision, same Redis, same load tool (this checkout's), runs
# alternated so that both see the same machine noise.
#
#   bench/compare.sh REV [ROUNDS] [SCENARIOS]   e.g. bench/compare.sh 402d325 3
#                                               bench/compare.sh main 5 conn
#                                               bench/compare.sh main 2 "down-turn up-turn"
#
# Each round runs the scenarios (default "down up", or $SCENARIOS) against
# each proxy, a fresh one per round and revision: "down" (1,000 sessions x
# 100 downstream 100-byte messages), "up" (1,000 clients x 100 upstream
# messages), "down-turn" and "up-turn" (10,000 messages/s over 1,000
# sessions for 10 s: about one message per socket per reactor turn, as
# bench.versus runs them), "conn" (10,000 connections, 500 handshakes in
# flight: set-up CPU per accepted connection, as bench/run.sh conn10k).
# Prints one JSON line per run and a summary: the median proxy CPU per
# message (or per connection, us) of each revision and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: bench/compare.sh REV [ROUNDS]}
ROUNDS=${2:-3}
SCENARIOS=${3:-${SCENARIOS:-down up}}
PY=$(pwd)/.venv/bin/python
[ -x "$PY" ] || bin/dev setup
. bench/servers.sh
other="$tmp/other"
trap 'stop_proxy; git worktree remove --force "$other" 2>/dev/null || true; stop_servers' EXIT
git worktree add -q --detach "$other" "$REV"
start_redis

echo "bench/compare: $(nproc) cores, HEAD $(git rev-parse --short HEAD) vs $REV, $ROUNDS rounds" >&2
results="$tmp/results.jsonl"
for round in $(seq "$ROUNDS"); do
    for side in head other; do
        dir=$(pwd); [ "$side" = other ] && dir=$other
        # the proxy whose code is in $dir: bench.servers puts it first on the
        # proxy's sys.path (its wsproxy package and twisted plugin are used)
        start_proxy --checkout "$dir"
        for scenario in $SCENARIOS; do
            case $scenario in
                down) args=(--clients 1000 --burst 100 --phases connect,down) ;;
                up)   args=(--clients 1000 --upstream 100 --phases connect,up) ;;
                down-turn) args=(--clients 1000 --rate 10000 --duration 10 --phases connect,paced) ;;
                up-turn)   args=(--clients 1000 --rate 10000 --duration 10 --phases connect,uppaced) ;;
                conn) args=(--clients 10000 --concurrency 500 --phases connect) ;;
                *)    echo "unknown scenario: $scenario (down, up, down-turn, up-turn, conn)" >&2; exit 2 ;;
            esac
            line=$("$PY" -m bench.loadtest --url "ws://127.0.0.1:$PPORT" \
                --redis-url "redis://127.0.0.1:$RPORT" --pid "$ppid" --json-only "${args[@]}")
            echo "$line" | "$PY" -c '
import json, sys
side, scenario, round_ = sys.argv[1:4]
data = json.loads(sys.stdin.read())
if scenario == "conn":
    phase = data["phases"]["connect"]
    cpu = phase.get("proxy_cpu_us_per_conn")
    lost = phase.get("failed")
else:
    phase = data["phases"][{"down-turn": "paced", "up-turn": "uppaced"}.get(scenario, scenario)]
    cpu = phase.get("proxy_cpu_us_per_msg")
    lost = phase.get("lost")
print(json.dumps({"side": side, "scenario": scenario, "round": int(round_),
                  "cpu_us_per_msg": cpu, "lost": lost}))
' "$side" "$scenario" "$round" | tee -a "$results"
        done
        stop_proxy
    done
done
"$PY" - "$results" "$REV" $SCENARIOS <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for scenario in sys.argv[3:]:
    med = {}
    for side in ("head", "other"):
        values = [r["cpu_us_per_msg"] for r in rows
                  if r["side"] == side and r["scenario"] == scenario and r["cpu_us_per_msg"]]
        med[side] = statistics.median(values) if values else None
    ratio = med["head"] / med["other"] if med["head"] and med["other"] else None
    print(json.dumps({"summary": scenario, "head_us": med["head"], sys.argv[2] + "_us": med["other"],
                      "ratio_head_over_rev": None if ratio is None else round(ratio, 3)}))
PY
