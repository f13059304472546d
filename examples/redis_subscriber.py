"""
Print what the clients of a session send: SUBSCRIBE session:{id}:up.

    python examples/redis_subscriber.py my-session
    python examples/redis_subscriber.py '*'          # every session (PSUBSCRIBE)
"""

import redis

from _common import parser


def main() -> None:
    p = parser(__doc__)
    p.add_argument("session_id")
    args = p.parse_args()
    pubsub = redis.Redis.from_url(args.redis_url).pubsub()
    channel = f"session:{args.session_id}:up"
    if "*" in args.session_id:
        pubsub.psubscribe(channel)
    else:
        pubsub.subscribe(channel)
    print(f"listening on {channel}", flush=True)
    for message in pubsub.listen():
        if message["type"] in ("message", "pmessage"):
            data = message["data"]
            try:
                shown = data.decode("utf-8")
            except UnicodeDecodeError:
                shown = "0x" + data.hex()
            print(f"{message['channel'].decode()}: {shown}", flush=True)


if __name__ == "__main__":
    main()
