"""
Credentials for AUTH_MODE=jwt, or a single-use connect ticket (any mode).

    python examples/jwt_token.py my-session --secret "$JWT_SECRET"
    python examples/jwt_token.py my-session --secret "$JWT_SECRET" --expires-in 3600 --agent app
    python examples/jwt_token.py my-session --key private.pem --algorithm ES256 --kid 2026-12
    python examples/jwt_token.py my-session --ticket --ttl 30

Prints a JWT signed for the session (claims session_id and iat, and exp,
agent_id as asked), or with --ticket a ticket stored in Redis that admits one
connection within --ttl seconds (ws://.../ws/my-session?ticket=<ticket>).
"""

import os

import redis

from _common import parser
from wsproxy.backend import Backend, sign_token


def main() -> None:
    p = parser(__doc__)
    p.add_argument("session_id")
    p.add_argument("--secret", default=os.environ.get("JWT_SECRET"),
                   help="HMAC secret (default: $JWT_SECRET)")
    p.add_argument("--key", help="PEM private key file (RS*, PS*, ES*, EdDSA)")
    p.add_argument("--algorithm", default="HS256", help="signing algorithm (HS256)")
    p.add_argument("--kid", help="key id header: the key of the proxy's JWK Set")
    p.add_argument("--expires-in", type=int, help="seconds until exp (default: no exp)")
    p.add_argument("--agent", help="agent_id claim: only that agent's path admits it")
    p.add_argument("--ticket", action="store_true", help="issue a single-use ticket instead")
    p.add_argument("--ttl", type=int, default=30, help="seconds a ticket is valid (30)")
    args = p.parse_args()
    if args.ticket:
        print(Backend(redis.Redis.from_url(args.redis_url)).issue_ticket(args.session_id, args.ttl))
        return
    if args.key:
        with open(args.key) as f:
            key = f.read()
    elif args.secret:
        key = args.secret
    else:
        p.error("give --secret (or set JWT_SECRET), --key, or --ticket")
    print(sign_token(key, args.session_id, agent_id=args.agent, expires_in=args.expires_in,
                     algorithm=args.algorithm, key_id=args.kid))


if __name__ == "__main__":
    main()
