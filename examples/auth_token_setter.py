"""
Authorize a session: SETEX session:{session_id}:auth <ttl> <token>.

    python examples/auth_token_setter.py my-session            # random token
    python examples/auth_token_setter.py my-session --token s3cret --ttl 60
    python examples/auth_token_setter.py my-session --topic news --topic room-7

Prints the token. The client must connect within --ttl seconds; after a
successful connect wsproxy extends the key to AUTH_GRACE_PERIOD_SECS.
With --topic (TOPICS=true), the session's topics are these: the set
session:{session_id}:topics is replaced, with the token's TTL, and every
connection of the session joins them.
"""

import redis

from _common import parser
from wsproxy.backend import Backend


def main() -> None:
    p = parser(__doc__)
    p.add_argument("session_id")
    p.add_argument("--token", default=None, help="token (default: a random one)")
    p.add_argument("--ttl", type=int, default=300, help="seconds the token is valid (300)")
    p.add_argument("--topic", action="append", dest="topics", metavar="TOPIC",
                   help="a topic the session is in (repeat for more; TOPICS=true)")
    args = p.parse_args()
    backend = Backend(redis.Redis.from_url(args.redis_url))
    print(backend.authorize(args.session_id, args.token, args.ttl, topics=args.topics))


if __name__ == "__main__":
    main()
