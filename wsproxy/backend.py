"""
A small helper for Python backends that talk to their clients through
wsproxy: authorize a session, publish to it (plain or recoverable), read
what its clients send. It only spells the Redis commands the README
documents; backends in other languages send the same commands.

    import redis
    from wsproxy.backend import Backend

    backend = Backend(redis.Redis())
    token = backend.authorize("session-1")                 # give the token to the client
    backend.publish("session-1", '{"hello": "client"}')    # live only
    position = backend.publish_recoverable("session-1", "token 1 of the answer")
    for session_id, message in backend.listen_up("session-1"):
        ...

It needs redis-py (C{pip install wsproxy[examples]}, or any redis-py 5 you
already have); wsproxy itself does not.
"""

from __future__ import annotations

import secrets
from typing import Any, Iterator, Literal, Optional, Union

from .names import (
    auth_key,
    down_channel,
    history_key,
    meta_key,
    up_channel,
    valid_session_id,
)

Message = Union[bytes, str]
Kind = Literal["text", "binary", "auto"]


class Backend:
    """
    wsproxy's Redis contract, for one redis-py client.

    @param redis: a C{redis.Redis} (or compatible) client.
    """

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    @staticmethod
    def _checked(session_id: str) -> str:
        if not valid_session_id(session_id):
            raise ValueError(
                f"invalid session id {session_id!r}: 1 to 128 of [A-Za-z0-9._~-]"
            )
        return session_id

    def authorize(self, session_id: str, token: Optional[str] = None, ttl: int = 300) -> str:
        """
        C{SETEX session:{id}:auth <ttl> <token>}: the client may connect
        with C{token} within C{ttl} seconds (after it has, wsproxy extends
        the key to AUTH_GRACE_PERIOD_SECS).

        @return: the token (a random URL-safe one unless given).
        """
        token = token or secrets.token_urlsafe(24)
        self.redis.set(auth_key(self._checked(session_id)), token, ex=ttl)
        return token

    def revoke(self, session_id: str) -> None:
        """
        Delete the token: the session's clients cannot reconnect with it.
        """
        self.redis.delete(auth_key(self._checked(session_id)))

    def publish(self, session_id: str, message: Message) -> int:
        """
        C{PUBLISH session:{id}:down <message>}: to every open socket of the
        session, live only (a client that is reconnecting misses it).

        @return: how many wsproxy processes received it (0: nobody is
            connected).
        """
        return int(self.redis.publish(down_channel(self._checked(session_id)), message))

    def publish_recoverable(
        self, session_id: str, message: Message, kind: Kind = "auto"
    ) -> str:
        """
        C{FCALL wsproxy_publish 2 session:{id}:history session:{id}:meta
        <message> <kind>}: appended to the session's history and delivered
        live to resuming clients, which receive it exactly once even
        across reconnects (within the retention window). Needs a wsproxy
        with C{RESUME=true} (it loads the function into Redis).

        @param kind: the frame type clients get: C{text}, C{binary}, or
            C{auto} (text if the bytes are valid UTF-8).
        @return: the message's position, C{<epoch>:<ms>-<seq>}.
        """
        session_id = self._checked(session_id)
        position = self.redis.fcall(
            "wsproxy_publish", 2, history_key(session_id), meta_key(session_id), message, kind
        )
        return position.decode() if isinstance(position, bytes) else str(position)

    def listen_up(self, *session_ids: str, timeout: float = 1.0) -> Iterator[tuple[str, bytes]]:
        """
        Every message the clients of C{session_ids} send, as (session id,
        payload), for as long as the caller iterates. (Pub/Sub: messages
        sent while nothing listens are not kept.)
        """
        channels = {up_channel(self._checked(s)): s for s in session_ids}
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(*channels)
        try:
            while True:
                message = pubsub.get_message(timeout=timeout)
                if message is not None and message.get("type") == "message":
                    channel = message["channel"]
                    if isinstance(channel, str):
                        channel = channel.encode()
                    yield channels[channel], message["data"]
        finally:
            pubsub.close()
