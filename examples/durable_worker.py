"""
A backend worker for durable upstream (a wsproxy with UPSTREAM=stream):
reads client messages from every partition stream with a consumer group,
handles each (prints one line: session, client message id, message),
records its client message id and acknowledges it. Started again after a
crash under the same --consumer name, it first handles what it had read
but not acknowledged; it also claims messages a dead worker of the group
left pending for --claim-after seconds. Copies of a message a client sent
again (same client message id) are acknowledged and not handled twice.

    python examples/durable_worker.py --consumer worker-1
    python examples/durable_worker.py --group workers --consumer worker-2 --partitions 16

Run several with different --consumer names to share the load.
"""

import json
import signal
import sys
import time

import redis

from _common import parser
from wsproxy.backend import DurableConsumer, UpMessage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--group", default="workers", help="consumer group (workers)")
    p.add_argument("--consumer", default="worker-1", help="this worker's name (worker-1)")
    p.add_argument("--partitions", type=int, default=16,
                   help="UPSTREAM_PARTITIONS of the proxies (16)")
    p.add_argument("--claim-after", type=float, default=60.0,
                   help="seconds after which another worker's unacknowledged "
                        "messages are taken over (60)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    consumer = DurableConsumer(
        redis.Redis.from_url(args.redis_url), args.group, args.consumer, args.partitions
    )
    consumer.create_groups()

    def handle(message: UpMessage) -> None:
        if consumer.seen(message):
            consumer.ack(message)  # a copy of one handled already
            return
        # the application's work goes here; this worker prints the message
        print(json.dumps({
            "session": message.session_id,
            "id": message.message_id,
            "entry": message.entry_id,
            "binary": message.binary,
            "data": message.data.decode("utf-8", "replace"),
        }), flush=True)
        consumer.mark_seen(message)
        consumer.ack(message)

    print(f"durable worker {args.consumer} ready", flush=True)
    while True:
        backlog = consumer.pending()
        for message in backlog:
            handle(message)
        if not backlog:
            break
    claim_ms = int(args.claim_after * 1000)
    claimed_at = 0.0
    while True:
        messages = []
        if time.monotonic() - claimed_at >= 1.0:  # a dead worker's, once a second
            claimed_at = time.monotonic()
            messages = consumer.claim(claim_ms)
        for message in messages + consumer.read():
            handle(message)


if __name__ == "__main__":
    main()
