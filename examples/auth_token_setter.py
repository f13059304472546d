"""
Authorize a session: SETEX session:{session_id}:auth <ttl> <token>.

    python examples/auth_token_setter.py my-session            # random token
    python examples/auth_token_setter.py my-session --token s3cret --ttl 60

Prints the token. The client must connect within --ttl seconds; after a
successful connect wsproxy extends the key to AUTH_GRACE_PERIOD_SECS.
"""

import redis

from _common import parser
from wsproxy.backend import Backend


def main() -> None:
    p = parser(__doc__)
    p.add_argument("session_id")
    p.add_argument("--token", default=None, help="token (default: a random one)")
    p.add_argument("--ttl", type=int, default=300, help="seconds the token is valid (300)")
    args = p.parse_args()
    backend = Backend(redis.Redis.from_url(args.redis_url))
    print(backend.authorize(args.session_id, args.token, args.ttl))


if __name__ == "__main__":
    main()
