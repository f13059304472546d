"""
An interactive client: connects with a token, prints what arrives, sends
each line you type. It runs on the Python client package (clients/python,
wsproxy_client), without reconnecting: the first close ends it.

    python examples/ws_client.py ws://127.0.0.1:8080/demo/ws/my-session TOKEN
    python examples/ws_client.py ... --token-in query        # ?access_token=
    python examples/ws_client.py ... --token-in subprotocol  # bearer, TOKEN
    python examples/ws_client.py ... --labels    # TOPICS=true: ?labels=1, prints [#topic] message

With --labels every frame starts with a header line, taken off here: a
message on a topic is printed as "[#topic] message", one to the session
itself as "< message".
"""

import argparse
import asyncio
import os
import sys
import threading
from typing import Literal, cast
from urllib.parse import unquote, urlsplit, urlunsplit

try:
    from wsproxy_client import ConnectionFailed, Message, WsProxyClient
except ImportError:  # a checkout where clients/python is not installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    os.pardir, "clients", "python"))
    from wsproxy_client import ConnectionFailed, Message, WsProxyClient


TokenIn = Literal["header", "query", "subprotocol"]


def split_url(url: str) -> tuple[str, str, str]:
    """
    ws://host:port/{agent}/ws/{session} as (base URL, agent, session).
    """
    parts = urlsplit(url)
    segments = parts.path.split("/")
    if len(segments) != 4 or segments[0] or segments[2] != "ws" or parts.query:
        raise ValueError(f"not a wsproxy socket URL (ws://host:port/AGENT/ws/SESSION): {url}")
    base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    return base, unquote(segments[1]), unquote(segments[3])


def shown(message: Message) -> str:
    """
    A message as printed: "[#topic] message" on a topic (with --labels),
    "< message" for the session's own; binary ones as Python bytes.
    """
    body = repr(message.data) if isinstance(message.data, bytes) else message.data
    if message.topic is not None:
        return f"[#{message.topic}] {body}"
    return f"< {body}"


async def run(url: str, token: str, token_in: str, labels: bool = False) -> None:
    base, agent, session = split_url(url)
    # no reconnection: the first close ends the client, as it always has
    client = WsProxyClient(base, session, agent=agent, token=token,
                           token_in=cast(TokenIn, token_in),
                           labels=labels, reconnect=False)
    await client.connect()
    print("connected; type a line to send it, Ctrl-D to quit", file=sys.stderr)

    async def receive() -> None:
        async for message in client:
            print(shown(message), flush=True)

    async def send() -> None:
        # stdin is read in a daemon thread, so that the client exits as
        # soon as the server closes, without waiting for another line
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def read_stdin() -> None:
            try:
                for line in iter(sys.stdin.readline, ""):
                    loop.call_soon_threadsafe(lines.put_nowait, line)
                loop.call_soon_threadsafe(lines.put_nowait, "")
            except RuntimeError:
                pass  # the connection is over and the loop closed

        threading.Thread(target=read_stdin, daemon=True).start()
        while True:
            line = await lines.get()
            if not line:
                await client.close()
                return
            await client.send(line.rstrip("\n"))

    receiving = asyncio.ensure_future(receive())
    sending = asyncio.ensure_future(send())
    done, pending = await asyncio.wait([receiving, sending], return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await client.close()
    print(f"closed: code={client.close_code} reason={client.close_reason!r}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("token")
    p.add_argument("--token-in", choices=("header", "query", "subprotocol"), default="header")
    p.add_argument("--labels", action="store_true",
                   help="ask for ?labels=1 (TOPICS=true) and print each topic's messages "
                        "as [#topic] message")
    args = p.parse_args()
    try:
        asyncio.run(run(args.url, args.token, args.token_in, args.labels))
    except ValueError as e:
        sys.exit(str(e))
    except ConnectionFailed as e:
        if e.status is not None:
            sys.exit(f"refused: HTTP {e.status} {e.status_reason}")
        sys.exit(f"cannot connect: {e.detail.error}")


if __name__ == "__main__":
    main()
