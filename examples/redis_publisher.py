"""
Send a message to every client of a session: PUBLISH session:{id}:down.

    python examples/redis_publisher.py my-session '{"hello": "world"}'
    python examples/redis_publisher.py my-session --tag b --hex 00ff10   # FRAME_MODE=tagged

Prints how many wsproxy processes received it (0: nobody is connected).
"""

import redis

from _common import parser


def main() -> None:
    p = parser(__doc__)
    p.add_argument("session_id")
    p.add_argument("message", nargs="?", default="", help="text to send")
    p.add_argument("--hex", help="send these bytes (hex) instead of the text")
    p.add_argument(
        "--tag", choices=("t", "b"),
        help="prefix the FRAME_MODE=tagged frame type (t: text, b: binary)",
    )
    args = p.parse_args()
    payload = bytes.fromhex(args.hex) if args.hex else args.message.encode()
    if args.tag:
        payload = args.tag.encode() + payload
    receivers = redis.Redis.from_url(args.redis_url).publish(
        f"session:{args.session_id}:down", payload
    )
    print(receivers)


if __name__ == "__main__":
    main()
