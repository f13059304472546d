"""
Topics (issue 27), wsproxy and the Node.js bridge side by side:
C{python -m bench.topics --help} (C{bench/run.sh topics}).

One private redis-server; for every round, scenario and target a fresh
server (wsproxy with C{TOPICS=true}, C{WORKERS=1}, C{LOG_LEVEL=warn}, its
defaults else, C{RESUME=true} too for resume-mix; or the Node.js bridge
extended with the same fan-out, C{bench/topics/node_topics.js}, a copy of
C{../shared/peers/node_bridge.js}), its sessions written into Redis (token
and C{SADD session:S:topics}), one socket per session connected with
C{Authorization: Bearer} from client worker processes, then the delivery
phase: batches published one after the other, each once every socket has
the previous one (or after C{--settle} seconds). The proxy's CPU (user +
system, from C{/proc}) and redis-server's are read around the phase. The
targets (and the two ways of a comparison) alternate every round.

The scenarios (sizes are options; the defaults those of C{bench/run.sh topics}):

  fanout       one topic holding --sockets sockets (one session each),
               --publishes PUBLISHes on topic:T:down: proxy CPU per delivered
               message, wsproxy and node and the ratio (the issue's target:
               wsproxy at most half of node's), the time from each PUBLISH to
               its LAST socket's receipt (p50/p99 over the publishes), and
               that every socket got every message.
  per-session  the same sockets on one wsproxy, all in one topic: --publishes
               times one message to all of them, either as one PUBLISH per
               session on session:S:down (today's way) or as one PUBLISH on
               the topic: redis-server's and the proxy's CPU per delivery,
               both ways (ratio topic/per-session).
  centrifugo   --centrifugo-sockets sockets (a comma list: one line per size),
               each in its personal session and in one group topic of --group;
               --centrifugo-publishes batches, each one message per personal
               session and one per group topic, pipelined: deliveries per
               proxy CPU second (per core) and p99 latency, wsproxy and node.
  resume-mix   fan-out on one topic with RESUME=true: "plain" (every socket
               plain, PUBLISH topic:T:down) vs "recoverable" (half the sockets
               with ?resume=&labels=1, FCALL wsproxy_publish on the topic's
               history): proxy CPU per delivery of each, ratio recoverable/plain.

Printed: per scenario (centrifugo: per size) one JSON line on stdout with
every round's figures per column, the medians and the ratios (taken within
a round, then their median), and a table on stderr. Exit status 0; 1 if a
message was lost, duplicated or corrupt; 2 on a usage error or a server
that did not start. Without node or the bridge's npm packages the node
figures are absent and every line says why (C{node_unavailable}).
"""
