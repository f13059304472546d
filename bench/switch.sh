#!/usr/bin/env bash
# Planned Redis changes under many sending clients: SENTINEL FAILOVER (durable
# upstream with acks, and Pub/Sub upstream), CLUSTER FAILOVER and a live slot
# migration of the upstream stream, each with SESSIONS clients sending a
# numbered message every 50 ms (tests/support/senders.py), the proxy in the
# test's process.
#
#   bench/switch.sh [SESSIONS] [ROUNDS]        default: 100 sessions, 1 round
#
# These are the tests of tests/test_sentinel.py (PlannedFailoverTests) and
# tests/test_cluster.py (FaultTests.test_*_under_sending_sessions) with more
# sessions: each checks that no client is closed or nacked and no acked
# message is missing, and prints one line of figures (the hold's length,
# messages held, the longest pause between two acks of one client, /health).
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${1:-100}
ROUNDS=${2:-1}
TRIAL=${TRIAL:-$(pwd)/.venv/bin/trial}
echo "bench/switch: $(nproc) cores, HEAD $(git rev-parse --short HEAD), $SESSIONS sessions, $ROUNDS round(s)" >&2
for round in $(seq "$ROUNDS"); do
    SWITCH_SESSIONS=$SESSIONS PYTHONPATH=$(pwd) "$TRIAL" \
        tests.test_sentinel.PlannedFailoverTests \
        tests.test_cluster.FaultTests.test_cluster_failover_under_sending_sessions \
        tests.test_cluster.FaultTests.test_slot_migration_under_sending_sessions \
        | grep -E '^ +(SENTINEL|CLUSTER|slot migration)|^(PASSED|FAILED)'
done
