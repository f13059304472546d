"""
A small helper for Python backends that talk to their clients through
wsproxy: authorize a session, publish to it (plain or recoverable), read
what its clients send. It only spells the Redis commands that
docs/guide/backends.md documents; backends in other languages send the same
commands.

    import redis
    from wsproxy.backend import Backend

    backend = Backend(redis.Redis())
    token = backend.authorize("session-1")                 # give the token to the client
    backend.publish("session-1", '{"hello": "client"}')    # live only
    position = backend.publish_recoverable("session-1", "token 1 of the answer")
    for session_id, message in backend.listen_up("session-1"):
        ...

Topics (a wsproxy with C{TOPICS=true}): a message published once to a topic
reaches every socket of every session in it.

    backend.authorize("session-1", topics=["news", "room-7"])   # joined at connect
    backend.join_topics("session-1", "alerts")                  # now, and at reconnects
    backend.publish_topic("room-7", "hello, room")
    backend.publish_topic_recoverable("room-7", "kept in the topic's history")

With C{AUTH_MODE=jwt} there is nothing to store: sign a token instead
(L{sign_token}, PyJWT), and for URLs (C{EventSource}, links) issue a
single-use ticket (L{Backend.issue_ticket}):

    token = sign_token(JWT_SECRET, "session-1", expires_in=3600)
    ticket = backend.issue_ticket("session-1")            # ws://.../ws/session-1?ticket=...

It needs redis-py (C{pip install wsproxy[examples]}, or any redis-py 5 you
already have); wsproxy itself does not.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Optional, Union

from .names import (
    ALL_EVENTS_CHANNEL,
    live_channel,
    CONTROL_CHANNEL,
    EVENTS_STREAM,
    auth_key,
    down_channel,
    events_channel,
    history_key,
    instance_key,
    meta_key,
    revoked_jti_key,
    revoked_key,
    ticket_key,
    topic_channel,
    topic_history_key,
    topic_meta_key,
    topics_key,
    up_channel,
    upstream_partition,
    upstream_seen_key,
    upstream_stream,
    valid_session_id,
    valid_topic,
)

Message = Union[bytes, str]
Kind = Literal["text", "binary", "auto"]

_log = logging.getLogger(__name__)


def sign_token(
    key: Any,
    session_id: str,
    agent_id: Optional[str] = None,
    expires_in: Optional[float] = None,
    algorithm: str = "HS256",
    key_id: Optional[str] = None,
    topics: Optional[Iterable[str]] = None,
    **claims: Any,
) -> str:
    """
    A JWT for C{AUTH_MODE=jwt}: claims C{session_id} and C{iat} (the
    original project's shape), C{agent_id} if given (the proxy then admits
    it only on that agent's path), C{exp} C{expires_in} seconds from now if
    given, and any other C{claims} (C{aud}, C{iss}, C{jti}, ...).

    @param key: the HMAC secret (C{JWT_SECRET}) for HS256/384/512, or a
        private key (PEM text or a C{cryptography} key) for RS*, PS*, ES*
        and EdDSA.
    @param key_id: the C{kid} header: which key of the proxy's JWK Set
        verifies it.
    @param topics: the C{topics} claim (C{TOPICS=true}): topic names the
        connection joins, in addition to the session's Redis set.
    """
    import jwt

    now = int(time.time())
    payload: dict[str, Any] = {"session_id": valid(session_id), "iat": now}
    if agent_id is not None:
        payload["agent_id"] = agent_id
    if expires_in is not None:
        payload["exp"] = now + int(expires_in)
    if topics is not None:
        payload["topics"] = valid_topics(topics)
    payload.update(claims)
    headers = {"kid": key_id} if key_id is not None else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def valid(session_id: str) -> str:
    """
    The session id, if it is one wsproxy routes.

    @raise ValueError: otherwise.
    """
    if not valid_session_id(session_id):
        raise ValueError(
            f"invalid session id {session_id!r}: 1 to 128 of [A-Za-z0-9._~-]"
        )
    return session_id


def valid_topics(topics: Iterable[str]) -> list[str]:
    """
    The topic names, in the order given without repeats, if each is one
    wsproxy routes (the session-id rule).

    @raise ValueError: otherwise (a single string is refused too: pass a
        list).
    """
    if isinstance(topics, (str, bytes)):
        raise ValueError(f"topics must be a list of names, not the string {topics!r}")
    out: list[str] = []
    for topic in topics:
        if not isinstance(topic, str) or not valid_topic(topic):
            raise ValueError(f"invalid topic {topic!r}: 1 to 128 of [A-Za-z0-9._~-]")
        if topic not in out:
            out.append(topic)
    return out


class Backend:
    """
    wsproxy's Redis contract, for one redis-py client.

    @param hash_tags: the proxy runs with C{KEY_HASH_TAGS=true}.
    @param redis: a C{redis.Redis} (or compatible) client, or a
        C{redis.cluster.RedisCluster} for a wsproxy with C{REDIS_CLUSTER=true}:
        then messages are published with C{SPUBLISH}, read with
        C{SSUBSCRIBE}, and a revoke is two commands (a session's token and
        the control channel are in different slots).
    """

    def __init__(self, redis: Any, hash_tags: bool = False) -> None:
        self.redis = redis
        #: the proxy's KEY_HASH_TAGS: session:{<id>}:... names
        self.hash_tags = hash_tags
        #: a Redis Cluster client: sharded Pub/Sub
        self.sharded = hasattr(redis, "get_node_from_key")

    _checked = staticmethod(valid)

    def authorize(
        self, session_id: str, token: Optional[str] = None, ttl: int = 300,
        topics: Optional[Iterable[str]] = None,
    ) -> str:
        """
        C{SETEX session:{id}:auth <ttl> <token>}: the client may connect
        with C{token} within C{ttl} seconds (after it has, wsproxy extends
        the key to AUTH_GRACE_PERIOD_SECS).

        @param topics: (C{TOPICS=true}) the session's topics, joined by
            every connection at its admission: the set
            C{session:{id}:topics} is replaced by these names (C{DEL},
            C{SADD}, C{EXPIRE <ttl>}, in one pipeline with the token; none
            given: the set is left as it is; an empty list: it is deleted).
            Like the token, the set is extended to AUTH_GRACE_PERIOD_SECS
            at each connect, so it lives as long as the token does.
        @return: the token (a random URL-safe one unless given).
        """
        session_id = self._checked(session_id)
        token = token or secrets.token_urlsafe(24)
        if topics is None:
            self.redis.set(auth_key(session_id, self.hash_tags), token, ex=ttl)
            return token
        names = valid_topics(topics)
        key = topics_key(session_id, self.hash_tags)
        # one transaction where it can be (a cluster without hash tags has
        # the token and the set in different slots: a plain pipeline)
        pipe = self.redis.pipeline() if self.sharded else self.redis.pipeline(transaction=True)
        pipe.set(auth_key(session_id, self.hash_tags), token, ex=ttl)
        pipe.delete(key)
        if names:
            pipe.sadd(key, *names)
            pipe.expire(key, ttl)
        pipe.execute()
        return token

    def revoke(self, session_id: str) -> None:
        """
        Delete the token: the session's clients cannot reconnect with it.
        """
        self.redis.delete(auth_key(self._checked(session_id), self.hash_tags))

    def issue_ticket(self, session_id: str, ttl: int = 30) -> str:
        """
        A single-use connect ticket (C{?ticket=}, in any C{AUTH_MODE}): the
        proxy admits one connection with it within C{ttl} seconds, and
        deletes it as it does (C{GETDEL}). For URLs, where a token would end
        up in access logs and browser history.

        @return: the ticket (32 random base64url characters).
        """
        ticket = secrets.token_urlsafe(24)
        self.redis.set(ticket_key(self._checked(session_id), ticket, self.hash_tags), "1", ex=ttl)
        return ticket

    def deny_session(self, session_id: str, ttl: int = 3600) -> None:
        """
        C{JWT_DENYLIST=session}: no new connection of the session is
        admitted with any JWT for C{ttl} seconds (set it to the longest
        lifetime of the tokens you issued). Live sockets stay: close them
        with L{close}.
        """
        self.redis.set(revoked_key(self._checked(session_id), self.hash_tags), "1", ex=ttl)

    def deny_token(self, jti: str, ttl: int = 3600) -> None:
        """
        C{JWT_DENYLIST=jti}: the JWT with this C{jti} admits no new
        connection for C{ttl} seconds (until it would have expired).
        """
        self.redis.set(revoked_jti_key(jti), "1", ex=ttl)

    def publish(self, session_id: str, message: Message) -> int:
        """
        C{PUBLISH session:{id}:down <message>}: to every open socket of the
        session, live only (a client that is reconnecting misses it).

        @return: how many wsproxy processes received it (0: nobody is
            connected).
        """
        channel = down_channel(self._checked(session_id), self.hash_tags)
        return int(self._publish(channel, message))

    def _publish(self, channel: str, message: Message) -> Any:
        if self.sharded:
            return self.redis.spublish(channel, message)
        return self.redis.publish(channel, message)

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
            "wsproxy_publish", 2, history_key(session_id, self.hash_tags),
            meta_key(session_id, self.hash_tags), message, kind,
        )
        return position.decode() if isinstance(position, bytes) else str(position)

    # -- topics (TOPICS=true) ------------------------------------------------

    def _topic(self, topic: str) -> str:
        if not isinstance(topic, str) or not valid_topic(topic):
            raise ValueError(f"invalid topic {topic!r}: 1 to 128 of [A-Za-z0-9._~-]")
        return topic

    def publish_topic(self, topic: str, message: Message) -> int:
        """
        C{PUBLISH topic:T:down <message>} (C{SPUBLISH} on a cluster): to
        every open socket of every session in the topic, live only.

        @return: how many wsproxy processes received it (0: no socket is
            in the topic right now).
        """
        return int(self._publish(topic_channel(self._topic(topic), self.hash_tags), message))

    def publish_topic_recoverable(self, topic: str, message: Message, kind: Kind = "auto") -> str:
        """
        C{FCALL wsproxy_publish 2 topic:T:history topic:T:meta <message>
        <kind>}: kept in the topic's history (C{RESUME=true}); delivered to
        every socket of the topic, and replayed to clients that resume
        with C{?resume_topic=T@<position>}.

        @return: the message's position in the topic's history,
            C{<epoch>:<ms>-<seq>}.
        """
        topic = self._topic(topic)
        position = self.redis.fcall(
            "wsproxy_publish", 2, topic_history_key(topic, self.hash_tags),
            topic_meta_key(topic, self.hash_tags), message, kind,
        )
        return position.decode() if isinstance(position, bytes) else str(position)

    def join_topics(self, session_id: str, *topics: str) -> int:
        """
        Put the session in these topics: C{SADD session:{id}:topics ...}
        (kept for its next connections), then C{PUBLISH wsproxy:control
        {"subscribe": id, "topics": [...]}} (its open sockets join now, on
        every wsproxy instance).

        @return: how many wsproxy processes received the request.
        """
        return self._membership("subscribe", "sadd", session_id, topics)

    def leave_topics(self, session_id: str, *topics: str) -> int:
        """
        Take the session out of these topics: C{SREM session:{id}:topics
        ...}, then C{PUBLISH wsproxy:control {"unsubscribe": id, "topics":
        [...]}}.

        @return: how many wsproxy processes received the request.
        """
        return self._membership("unsubscribe", "srem", session_id, topics)

    def _membership(self, order: str, command: str, session_id: str, topics: Iterable[str]) -> int:
        session_id = self._checked(session_id)
        names = valid_topics(topics)
        if not names:
            raise ValueError("no topic given")
        # the set first: a socket that connects between the two commands
        # reads the new membership at its admission
        getattr(self.redis, command)(topics_key(session_id, self.hash_tags), *names)
        message = json.dumps({order: session_id, "topics": names})
        return int(self._publish(CONTROL_CHANNEL, message))

    def topics(self, session_id: str) -> set[str]:
        """
        The session's topics as stored (C{SMEMBERS session:{id}:topics}):
        what its next connection joins (plus a JWT's C{topics} claim).
        """
        members = self.redis.smembers(topics_key(self._checked(session_id), self.hash_tags))
        return {_text(m) for m in members}

    def listen_up(
        self, *session_ids: str, timeout: float = 1.0, reconnect_for: float = 30.0
    ) -> Iterator[tuple[str, bytes]]:
        """
        Every message the clients of C{session_ids} send, as (session id,
        payload), for as long as the caller iterates. (Pub/Sub: messages
        sent while nothing listens are not kept.)

        The subscriptions follow the Redis they are on (see L{_messages}):
        re-made on the new owner of a slot that moved (cluster), on the
        master the sentinels name after a failover (a Sentinel-managed
        client), on the same address after a lost connection.

        @param reconnect_for: how long, in seconds, to keep trying to
            subscribe again after the connection was lost before raising
            the error.
        """
        channels = {up_channel(self._checked(s), self.hash_tags): s for s in session_ids}
        for channel, data in self._messages(list(channels), timeout, reconnect_for):
            yield channels[channel], data

    #: at most this often (seconds) the slot map is asked again while a
    #: sharded subscription Redis dropped is not made again
    REPAIR_INTERVAL = 0.5

    def _messages(
        self, channels: list[Any], timeout: float, reconnect_for: float = 30.0
    ) -> Iterator[tuple[bytes, bytes]]:
        """
        (channel, payload) of every message on C{channels}, as they come,
        with no subscription silently lost:

          - on a cluster, a channel whose slot moved (Redis sends
            C{sunsubscribe} and forgets the subscription) is C{SSUBSCRIBE}d
            again on its slot's new owner, after the slot map is asked
            again (C{CLUSTER SLOTS}); after a lost connection (a master
            failed) the map is asked again before every channel is;
          - given a Sentinel-managed client (C{Sentinel.master_for}), a
            C{+switch-master} of its master from a sentinel closes the
            subscriber and C{SUBSCRIBE}s again on the master the sentinels
            now name (a graceful C{SENTINEL FAILOVER} leaves the old master
            up as a replica; it is left);
          - a lost connection is made again and every channel subscribed
            again; after C{reconnect_for} seconds of failed attempts the
            error is raised to the caller.

        Messages published while a subscription is being moved are lost,
        as Pub/Sub always is.
        """
        errors = _connection_errors()
        wanted = [c.encode() if isinstance(c, str) else c for c in channels]
        kind = "smessage" if self.sharded else "message"
        pubsub: Any = None
        watch = _MasterWatch(self.redis)
        failing_since: Optional[float] = None
        attempts = 0
        #: sharded channels Redis dropped, to subscribe again
        lost: set[bytes] = set()
        last_repair = 0.0
        try:
            while True:
                if pubsub is None:
                    try:
                        pubsub = self._subscribe(wanted, again=failing_since is not None)
                    except errors as e:
                        failing_since = _give_up_after(failing_since, reconnect_for, e)
                        # 0.1 s, doubling to 1 s between attempts
                        time.sleep(min(1.0, 0.1 * 2 ** attempts))
                        attempts += 1
                        continue
                try:
                    if self.sharded:
                        message = pubsub.get_sharded_message(timeout=timeout)
                    else:
                        message = pubsub.get_message(timeout=timeout)
                except errors as e:
                    if failing_since is None:
                        _log.warning("wsproxy.backend: subscriber connection lost (%s); "
                                     "subscribing again for up to %ss", e, reconnect_for)
                    pubsub.close()
                    pubsub = None
                    lost.clear()
                    failing_since = _give_up_after(failing_since, reconnect_for, e)
                    watch.refresh()
                    continue
                if failing_since is not None:
                    _log.warning("wsproxy.backend: subscribed again after %.1fs",
                                 time.monotonic() - failing_since)
                failing_since, attempts = None, 0
                if message is not None:
                    channel = message["channel"]
                    if isinstance(channel, str):
                        channel = channel.encode()
                    if message.get("type") == kind:
                        yield channel, message["data"]
                    elif message.get("type") == "sunsubscribe" and channel in wanted:
                        # never asked for: Redis dropped it (its slot moved)
                        lost.add(channel)
                if watch.switched():
                    _log.warning("wsproxy.backend: the sentinels switched master; "
                                 "subscribing again on the new one")
                    pubsub.close()
                    pubsub = None
                    lost.clear()
                    continue
                now = time.monotonic()
                if lost and now - last_repair >= self.REPAIR_INTERVAL:
                    last_repair = now
                    if self._resubscribe_sharded(pubsub, sorted(lost)):
                        lost.clear()
        finally:
            watch.close()
            if pubsub is not None:
                pubsub.close()

    def _subscribe(self, channels: list[bytes], again: bool = False) -> Any:
        """
        A new Pub/Sub connection subscribed to C{channels} (C{SSUBSCRIBE}
        on a cluster). C{again}: after a lost connection, when on a cluster
        the slot map is asked for first (the master may have failed and
        its replica been promoted).
        """
        if again and self.sharded:
            try:
                self.redis.nodes_manager.initialize()
            except Exception:  # no node answers yet: the map as it was
                pass
        pubsub = self.redis.pubsub()
        try:
            if self.sharded:
                pubsub.ssubscribe(*channels)
            else:
                pubsub.subscribe(*channels)
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    def _resubscribe_sharded(self, pubsub: Any, channels: list[bytes]) -> bool:
        """
        Ask the cluster for its slot map again and C{SSUBSCRIBE} each of
        C{channels} on the master that now owns its slot. redis-py (8.2)
        does not do it by itself: it takes a C{sunsubscribe} it did not ask
        for as news of nothing, keeps the channel recorded on the old owner
        and subscribes it nowhere. Given the new map, its C{ClusterPubSub}
        moves the channel (C{SUNSUBSCRIBE} on the old owner, whose answer
        comes back here as one more C{sunsubscribe} and costs one more,
        harmless, C{SSUBSCRIBE}); a map still stale sends it to the old
        owner, whose C{MOVED} redis-py follows.

        @return: whether the commands were sent (if not: retried on a later
            pass).
        """
        _log.warning("wsproxy.backend: %d sharded subscription(s) dropped by Redis "
                     "(slot moved or master failed); subscribing on the new owner",
                     len(channels))
        try:
            self.redis.nodes_manager.initialize()
            pubsub.ssubscribe(*channels)
        except Exception as e:  # the cluster is still settling: next pass
            _log.warning("wsproxy.backend: re-subscribing failed (%s); retrying", e)
            return False
        return True

    # -- session control -----------------------------------------------------

    def close(
        self, session_id: str, code: int = 1000, reason: str = "", revoke: bool = False
    ) -> int:
        """
        Close every socket of the session on every wsproxy instance:
        C{PUBLISH wsproxy:control {"close": id, "code": c, "reason": r}}.
        With C{revoke}, the token is deleted in the same transaction
        (C{MULTI; DEL session:{id}:auth; PUBLISH ...; EXEC}), so the client
        cannot reconnect with it.

        @param code: 1000, 1001, 1008 or 4000-4999 (the application's own).
        @param reason: at most 123 bytes of UTF-8.
        @return: how many wsproxy processes received the request.
        """
        session_id = self._checked(session_id)
        if not (code in (1000, 1001, 1008) or 4000 <= code <= 4999):
            raise ValueError("close code must be 1000, 1001, 1008 or 4000-4999")
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("close reason must be at most 123 bytes of UTF-8")
        order = json.dumps({"close": session_id, "code": code, "reason": reason})
        if revoke and self.sharded:
            # different slots: no transaction across them on a cluster
            self.redis.delete(auth_key(session_id, self.hash_tags))
        if not revoke or self.sharded:
            return int(self._publish(CONTROL_CHANNEL, order))
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(auth_key(session_id, self.hash_tags))
        pipe.publish(CONTROL_CHANNEL, order)
        return int(pipe.execute()[1])

    def is_connected(self, session_id: str) -> bool:
        """
        Whether some wsproxy process holds an open socket of the session
        (it is then subscribed to its :down channel, or :live for resuming
        clients): C{PUBSUB NUMSUB}.
        """
        session_id = self._checked(session_id)
        if self.sharded:
            # asked of the master that owns the channel's slot
            channel = down_channel(session_id, self.hash_tags)
            reply = self.redis.execute_command(
                "PUBSUB SHARDNUMSUB", channel,
                target_nodes=self.redis.get_node_from_key(channel),
            )
            return any(int(n) > 0 for _, n in reply)
        counts = self.redis.pubsub_numsub(
            down_channel(session_id, self.hash_tags), live_channel(session_id, self.hash_tags)
        )
        return any(int(n) > 0 for _, n in counts)

    def instance_alive(self, instance: str) -> bool:
        """
        Whether the proxy process named in events still runs (its
        heartbeat key is renewed every 5 s with a 15 s TTL; a killed
        process sends no close events, so its sockets must be taken as
        gone once this is false).
        """
        return bool(self.redis.exists(instance_key(instance)))

    def listen_events(
        self, *session_ids: str, timeout: float = 1.0, reconnect_for: float = 30.0
    ) -> Iterator[dict[str, Any]]:
        """
        Lifecycle events from Pub/Sub: of the given sessions
        (C{EVENTS=session}), or of every session (C{EVENTS=all}) when none
        is given. Events published while nothing listens are lost: use
        L{read_events} for at-least-once. The subscriptions follow failovers
        and moved slots as L{listen_up}'s do.
        """
        channels: list[Any] = (
            [events_channel(self._checked(s), self.hash_tags) for s in session_ids]
            if session_ids else [ALL_EVENTS_CHANNEL]
        )
        for _, data in self._messages(channels, timeout, reconnect_for):
            yield json.loads(data)

    def read_events(
        self, group: str, consumer: str, count: int = 100, block_ms: int = 1000
    ) -> list[tuple[str, dict[str, Any]]]:
        """
        At-least-once lifecycle events from C{wsproxy:events:stream}
        (C{EVENTS=stream}) with a consumer group (created at the start of
        the stream if missing): first this consumer's pending entries (read
        but not acknowledged before a restart), then new ones. Acknowledge
        each with L{ack_events} once handled.

        @return: (entry id, event) pairs.
        """
        try:
            self.redis.xgroup_create(EVENTS_STREAM, group, id="0", mkstream=True)
        except Exception as e:  # BUSYGROUP: it exists
            if "BUSYGROUP" not in str(e):
                raise
        pending = self.redis.xreadgroup(group, consumer, {EVENTS_STREAM: "0"}, count=count)
        entries = pending[0][1] if pending else []
        if not entries:
            fresh = self.redis.xreadgroup(
                group, consumer, {EVENTS_STREAM: ">"}, count=count, block=block_ms
            )
            entries = fresh[0][1] if fresh else []
        out = []
        for entry_id, fields in entries:
            raw = fields.get(b"event", fields.get("event"))
            if raw is None:
                continue
            out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                        json.loads(raw)))
        return out

    def ack_events(self, group: str, *entry_ids: str) -> int:
        """
        C{XACK wsproxy:events:stream <group> <id> ...}.
        """
        return int(self.redis.xack(EVENTS_STREAM, group, *entry_ids))


# -- keeping subscriptions through failovers and resharding ---------------------


def _connection_errors() -> tuple[type[BaseException], ...]:
    """
    What a lost or refused connection raises in redis-py (imported here:
    importing this module needs no redis-py).
    """
    from redis.exceptions import ConnectionError, TimeoutError

    return (ConnectionError, TimeoutError, OSError)


def _give_up_after(since: Optional[float], limit: float, error: BaseException) -> float:
    """
    When the failures began (now, for the first one); C{error} is raised
    once they have lasted C{limit} seconds.
    """
    now = time.monotonic()
    if since is None:
        return now
    if now - since >= limit:
        raise error
    return since


class _MasterWatch:
    """
    C{+switch-master} of a Sentinel-managed client's master, from the
    first sentinel that answers (for any other client: nothing). redis-py
    reconnects a lost subscriber through the sentinels but does not notice
    a graceful C{SENTINEL FAILOVER} that leaves its connection up on the
    old master, now a replica.
    """

    def __init__(self, client: Any) -> None:
        pool = getattr(client, "connection_pool", None)
        self.pool: Any = pool
        self.manager = getattr(pool, "sentinel_manager", None)
        self.service = getattr(pool, "service_name", None)
        self.pubsub: Any = None
        #: the master's address when last asked
        self.master: Any = None
        self.refresh()

    @property
    def active(self) -> bool:
        return self.manager is not None and self.service is not None

    def refresh(self) -> None:
        """
        (Re)subscribe to C{+switch-master} if not subscribed; a sentinel
        that does not answer is skipped, and none answering is tried again
        on the next call.
        """
        if not self.active or self.pubsub is not None:
            return
        errors = _connection_errors()
        assert self.manager is not None
        for sentinel in self.manager.sentinels:
            pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe("+switch-master")
                pubsub.get_message(timeout=0.5)  # the confirmation
            except errors:
                pubsub.close()
                continue
            self.pubsub = pubsub
            break
        if self.pubsub is not None and self.master is None:
            self.master = self._ask_master()

    def _ask_master(self) -> Any:
        """
        The master's address as the sentinels name it now (the pool then
        drops its idle connections to a previous one), or None.
        """
        try:
            return self.pool.get_master_address()
        except _connection_errors():
            return None

    def switched(self) -> bool:
        """
        Whether the sentinels announced a new master of this client's
        service since the last call (its pool then drops its idle
        connections to the old one).
        """
        if not self.active:
            return False
        self.refresh()
        if self.pubsub is None:
            return False
        errors = _connection_errors()
        switched = False
        try:
            while True:
                message = self.pubsub.get_message(timeout=0)
                if message is None:
                    break
                if message.get("type") != "message":
                    continue
                data = message["data"]
                fields = (data.decode() if isinstance(data, bytes) else str(data)).split()
                if fields and fields[0] == self.service:
                    switched = True
        except errors:
            # this sentinel went away (another one next time): a switch
            # meanwhile would have gone unheard, so ask
            self.pubsub.close()
            self.pubsub = None
            known, self.master = self.master, self._ask_master()
            return known is None or self.master != known
        if switched:
            self.master = self._ask_master()
        return switched

    def close(self) -> None:
        if self.pubsub is not None:
            self.pubsub.close()
            self.pubsub = None


# -- durable upstream (UPSTREAM=stream) -----------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class UpMessage:
    """
    One client message from a partition stream (C{UPSTREAM=stream}).

    @ivar stream: the partition stream it was read from.
    @ivar entry_id: its entry id there (what the client's ack carried as
        C{position}).
    @ivar message_id: the client's own id (C{?ack=1} clients), else C{None}.
    """

    stream: str
    entry_id: str
    session_id: str
    agent_id: str
    connection_id: str
    binary: bool
    data: bytes
    message_id: Optional[str]

    @classmethod
    def from_entry(cls, stream: Any, entry_id: Any, fields: dict[Any, Any]) -> "UpMessage":
        def get(name: str) -> Any:
            return fields.get(name.encode(), fields.get(name))

        message_id = get("id")
        data = get("data")
        return cls(
            stream=_text(stream),
            entry_id=_text(entry_id),
            session_id=_text(get("session")),
            agent_id=_text(get("agent") or b""),
            connection_id=_text(get("conn") or b""),
            binary=_text(get("type")) == "binary",
            data=data if isinstance(data, bytes) else str(data or "").encode(),
            message_id=None if message_id is None else _text(message_id),
        )


class DurableConsumer:
    """
    One consumer of a consumer group over every partition stream of
    durable upstream, as the docs' recipe (docs/guide/durable-upstream.md) spells it: C{XGROUP CREATE …
    MKSTREAM}, C{XREADGROUP} over all partitions, C{XACK}, C{XAUTOCLAIM}
    of a dead consumer's pending entries, and the record of client message
    ids handled, to drop the copies a client sent again.

        consumer = DurableConsumer(redis.Redis(), "workers", "worker-1", partitions=16)
        consumer.create_groups()
        for message in consumer.pending():     # mine, from before a restart
            ...
        while True:
            for message in consumer.claim(60_000) + consumer.read():
                if consumer.seen(message):
                    consumer.ack(message)       # a copy of one already handled
                    continue
                handle(message)
                consumer.mark_seen(message)
                consumer.ack(message)

    @param redis: a C{redis.Redis}, or a C{redis.cluster.RedisCluster} for
        proxies with C{REDIS_CLUSTER=true}: there one command cannot read
        streams in different slots, so with several partitions L{read} asks
        each partition without blocking and polls every
        L{CLUSTER_POLL_MS} until C{block_ms} have passed (a consumer given
        one partition, C{only=[p]}, blocks on it as usual).
    @param partitions: C{UPSTREAM_PARTITIONS} of the proxies.
    @param only: the partitions this consumer reads (default: all). Consumers
        of one group that all read every partition share the entries of a
        session among them (handled concurrently, in no set order); to keep
        a session's order, give each consumer its own partitions.
    @param hash_tags: the proxies run with C{KEY_HASH_TAGS=true}: the
        records of message ids handled are in their session's slot.
    """

    #: how often L{read} asks every partition on a Redis Cluster
    CLUSTER_POLL_MS = 50

    def __init__(
        self, redis: Any, group: str, consumer: str, partitions: int = 16,
        only: Optional[Iterable[int]] = None, hash_tags: bool = False,
    ) -> None:
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.partitions = partitions
        self.streams = [upstream_stream(p) for p in (range(partitions) if only is None else only)]
        self.hash_tags = hash_tags
        #: a Redis Cluster client: one stream (one slot) per command
        self.sharded = hasattr(redis, "get_node_from_key")

    def stream_of(self, session_id: str) -> str:
        """
        The partition stream a session's messages are appended to.
        """
        return upstream_stream(upstream_partition(session_id, self.partitions))

    def create_groups(self, start: str = "0") -> None:
        """
        C{XGROUP CREATE <stream> <group> 0 MKSTREAM} on every partition (a
        group that exists is left as it is): from the start of each stream,
        so that nothing appended before the group existed is skipped.
        """
        for stream in self.streams:
            try:
                self.redis.xgroup_create(stream, self.group, id=start, mkstream=True)
            except Exception as e:  # BUSYGROUP: it exists
                if "BUSYGROUP" not in str(e):
                    raise

    def _entries(self, reply: Any) -> list[UpMessage]:
        out = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                if fields:  # None: deleted (trimmed) while pending
                    out.append(UpMessage.from_entry(stream, entry_id, fields))
        return out

    def read(self, count: int = 100, block_ms: int = 1000) -> list[UpMessage]:
        """
        New messages, from every partition: C{XREADGROUP GROUP <group>
        <consumer> COUNT <count> BLOCK <ms> STREAMS <p0> … <pN-1> > … >}
        (on a cluster, see the class's docstring).
        """
        if not self.sharded or len(self.streams) == 1:
            reply = self.redis.xreadgroup(
                self.group, self.consumer, {s: ">" for s in self.streams}, count=count,
                block=block_ms,
            )
            return self._entries(reply)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            out = self._each_stream(">", count)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(self.CLUSTER_POLL_MS / 1000, max(0.0, deadline - time.monotonic())))

    def pending(self, count: int = 100) -> list[UpMessage]:
        """
        This consumer's own messages read but not acknowledged (before a
        crash or restart): C{XREADGROUP … STREAMS <p0> … 0 … 0}.
        """
        if self.sharded:
            return self._each_stream("0", count)
        reply = self.redis.xreadgroup(
            self.group, self.consumer, {s: "0" for s in self.streams}, count=count
        )
        return self._entries(reply)

    def _each_stream(self, start: str, count: int) -> list[UpMessage]:
        """
        C{XREADGROUP … STREAMS <p> <start>} on one partition after another
        (no blocking), until C{count} messages.
        """
        out: list[UpMessage] = []
        for stream in self.streams:
            if len(out) >= count:
                break
            reply = self.redis.xreadgroup(
                self.group, self.consumer, {stream: start}, count=count - len(out)
            )
            out.extend(self._entries(reply))
        return out

    def claim(self, min_idle_ms: int, count: int = 100) -> list[UpMessage]:
        """
        Take over messages another consumer read and has not acknowledged
        for C{min_idle_ms} (it died): C{XAUTOCLAIM <stream> <group>
        <consumer> <min idle> 0-0 COUNT <count>} on each partition, until
        each has none left or C{count} were taken.
        """
        out: list[UpMessage] = []
        for stream in self.streams:
            cursor: Any = "0-0"
            while len(out) < count:
                reply = self.redis.xautoclaim(
                    stream, self.group, self.consumer, min_idle_ms, cursor,
                    count=count - len(out),
                )
                cursor, entries = reply[0], reply[1]
                out.extend(self._entries([(stream, entries)]))
                if _text(cursor) == "0-0":
                    break
        return out

    def ack(self, *messages: UpMessage) -> int:
        """
        C{XACK <stream> <group> <entry id> …}, per stream.
        """
        by_stream: dict[str, list[str]] = {}
        for message in messages:
            by_stream.setdefault(message.stream, []).append(message.entry_id)
        return sum(int(self.redis.xack(s, self.group, *ids)) for s, ids in by_stream.items())

    def seen(self, message: UpMessage) -> bool:
        """
        Whether a message with this client message id of this session was
        handled already (C{EXISTS session:<id>:seen:<message id>}): a copy
        the client sent again after a nack or a reconnect. Messages without
        a client id are never seen.
        """
        if message.message_id is None:
            return False
        return bool(self.redis.exists(
            upstream_seen_key(message.session_id, message.message_id, self.hash_tags)))

    def mark_seen(self, message: UpMessage, ttl: int = 86400) -> None:
        """
        Record that the message was handled (C{SET session:<id>:seen:<message
        id> 1 EX <ttl>}): after handling it, before acknowledging it.
        """
        if message.message_id is not None:
            self.redis.set(
                upstream_seen_key(message.session_id, message.message_id, self.hash_tags), 1, ex=ttl
            )
