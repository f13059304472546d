"""
A backend that echoes: every message a client sends (session:{id}:up) is
published back, bytes unchanged, to that session (session:{id}:down).

    python examples/echo_backend.py [--redis-url redis://127.0.0.1:6379]

Because the bytes are unchanged this works in both frame modes: with
FRAME_MODE=tagged the frame-type byte is echoed too, so text comes back as
text and binary as binary, exactly.
"""

import redis

from _common import parser


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("session:*:up")
    print("echo backend ready", flush=True)
    for message in pubsub.listen():
        if message["type"] != "pmessage":
            continue
        channel = message["channel"]
        client.publish(channel[: -len(b":up")] + b":down", message["data"])


if __name__ == "__main__":
    main()
