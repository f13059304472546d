"""
A backend driven by session events (needs a wsproxy with EVENTS=all):
greets each client when its socket opens, streams numbered messages to it
while it is connected, stops when the socket closes, and ends a session
when its client sends "bye" (server-side close, token revoked).

    python examples/session_backend.py                       # every session
    python examples/session_backend.py --interval 0.5 --count 20

Try it: run wsproxy with EVENTS=all, authorize a session
(auth_token_setter.py), connect ws_client.py, watch the stream, type bye.
"""

import json
import threading

import redis

from _common import parser
from wsproxy.backend import Backend


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between messages (1)")
    p.add_argument("--count", type=int, default=10, help="messages per stream (10)")
    args = p.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    backend = Backend(client)
    streams: dict[str, threading.Event] = {}  # session id -> "stop streaming"
    sockets: dict[str, set[str]] = {}  # session id -> its open connections

    def stream(session_id: str, stop: threading.Event) -> None:
        for n in range(1, args.count + 1):
            if stop.wait(args.interval):
                return
            backend.publish(session_id, json.dumps({"n": n}))

    def on_up(session_id: str, message: bytes) -> None:
        if message.strip() == b"bye":
            backend.close(session_id, 4000, "bye", revoke=True)

    # the client's messages: one listener for every session (a pattern)
    def listen_up() -> None:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe("session:*:up")
        for item in pubsub.listen():
            if item["type"] == "pmessage":
                channel = item["channel"].decode()
                on_up(channel.split(":")[1], item["data"])

    threading.Thread(target=listen_up, daemon=True).start()
    print("session backend ready", flush=True)
    for event in backend.listen_events():
        session_id = event["session_id"]
        if event["event"] == "open":
            print(f"open  {session_id} ({event['connection_id']})", flush=True)
            sockets.setdefault(session_id, set()).add(event["connection_id"])
            backend.publish(session_id, json.dumps({"hello": session_id}))
            if session_id not in streams:
                stop = streams[session_id] = threading.Event()
                threading.Thread(target=stream, args=(session_id, stop), daemon=True).start()
        else:
            print(f"close {session_id} {event['code']} by {event['closed_by']}", flush=True)
            open_ones = sockets.get(session_id, set())
            open_ones.discard(event["connection_id"])
            if not open_ones:
                # the session's last socket is gone: stop the work for it
                sockets.pop(session_id, None)
                stop = streams.pop(session_id, None)
                if stop is not None:
                    stop.set()


if __name__ == "__main__":
    main()
