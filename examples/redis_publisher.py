"""
Send a message to every client of a session: PUBLISH session:{id}:down, or,
with --recoverable, FCALL wsproxy_publish (resumable sessions, RESUME=true).

    python examples/redis_publisher.py my-session '{"hello": "world"}'
    python examples/redis_publisher.py my-session --tag b --hex 00ff10   # FRAME_MODE=tagged
    python examples/redis_publisher.py my-session 'chunk 1' --recoverable

Prints how many wsproxy processes received it (0: nobody is connected), or
with --recoverable the message's position in the session's history.
"""

import redis

from _common import parser
from wsproxy.backend import Backend


def main() -> None:
    p = parser(__doc__)
    p.add_argument("session_id")
    p.add_argument("message", nargs="?", default="", help="text to send")
    p.add_argument("--hex", help="send these bytes (hex) instead of the text")
    p.add_argument(
        "--tag", choices=("t", "b"),
        help="prefix the FRAME_MODE=tagged frame type (t: text, b: binary)",
    )
    p.add_argument(
        "--recoverable", action="store_true",
        help="publish a recoverable message (kept in the session's history)",
    )
    p.add_argument(
        "--kind", choices=("auto", "text", "binary"), default="auto",
        help="with --recoverable: the frame type clients get (auto: text if UTF-8)",
    )
    args = p.parse_args()
    payload = bytes.fromhex(args.hex) if args.hex else args.message.encode()
    if args.tag:
        payload = args.tag.encode() + payload
    backend = Backend(redis.Redis.from_url(args.redis_url))
    if args.recoverable:
        print(backend.publish_recoverable(args.session_id, payload, args.kind))
    else:
        print(backend.publish(args.session_id, payload))


if __name__ == "__main__":
    main()
