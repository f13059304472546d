# The start-up and stop of the private redis-server and proxies of run.sh,
# compare.sh and events.sh, through python -m bench.servers (see there).
# Sourced once $PY is set; everything it starts is stopped, and its
# directory $tmp (the servers' logs) removed, when the script exits.
#
#   start_redis                      RPORT, rpid: a redis-server in $tmp
#   start_proxy [--checkout DIR] [NAME=VALUE ...]
#                                    PPORT, ppid: a proxy on it, healthy
#   stop_proxy

servers() { "$PY" -m bench.servers "$@"; }
tmp=$(mktemp -d)
rpid=""; ppid=""; RPORT=""; PPORT=""
stop_servers() {
    [ -z "$ppid" ] || servers stop "$ppid"
    [ -z "$rpid" ] || servers stop "$rpid"
    ppid=""; rpid=""
    rm -rf "$tmp"
}
trap stop_servers EXIT
start_redis() {
    local out
    out=$(servers redis --dir "$tmp")
    read -r RPORT rpid <<<"$out"
}
start_proxy() {
    local out
    out=$(servers proxy --dir "$tmp" --redis-url "redis://127.0.0.1:$RPORT" "$@")
    read -r PPORT ppid <<<"$out"
}
stop_proxy() {
    [ -z "$ppid" ] || servers stop "$ppid"
    ppid=""
}
