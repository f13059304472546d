"""
Send a message to every client of every session in a topic (TOPICS=true):
PUBLISH topic:{topic}:down, or, with --recoverable, FCALL wsproxy_publish on
the topic's history (RESUME=true: clients resuming with
?resume_topic=TOPIC@<position> get what they missed).

    python examples/topic_publisher.py news '{"headline": "hello"}'
    python examples/topic_publisher.py room-7 'kept for reconnects' --recoverable
    python examples/topic_publisher.py news --hex 00ff10

Prints how many wsproxy processes received it (0: no socket is in the
topic), or with --recoverable the message's position in the topic's
history. A session is put in a topic by its backend:
auth_token_setter.py --topic, or Backend.join_topics.
"""

import redis

from _common import parser
from wsproxy.backend import Backend


def main() -> None:
    p = parser(__doc__)
    p.add_argument("topic")
    p.add_argument("message", nargs="?", default="", help="text to send")
    p.add_argument("--hex", help="send these bytes (hex) instead of the text")
    p.add_argument(
        "--recoverable", action="store_true",
        help="publish a recoverable message (kept in the topic's history)",
    )
    p.add_argument(
        "--kind", choices=("auto", "text", "binary"), default="auto",
        help="with --recoverable: the frame type clients get (auto: text if UTF-8)",
    )
    args = p.parse_args()
    payload = bytes.fromhex(args.hex) if args.hex else args.message.encode()
    backend = Backend(redis.Redis.from_url(args.redis_url))
    if args.recoverable:
        print(backend.publish_topic_recoverable(args.topic, payload, args.kind))
    else:
        print(backend.publish_topic(args.topic, payload))


if __name__ == "__main__":
    main()
