"""
An interactive client: connects with a token, prints what arrives, sends
each line you type.

    python examples/ws_client.py ws://127.0.0.1:8080/demo/ws/my-session TOKEN
    python examples/ws_client.py ... --token-in query        # ?access_token=
    python examples/ws_client.py ... --token-in subprotocol  # bearer, TOKEN
    python examples/ws_client.py ... --labels    # TOPICS=true: ?labels=1, prints [#topic] message

With --labels every frame starts with a header line, taken off here: a
message on a topic is printed as "[#topic] message", one to the session
itself as "< message"; control frames ("!{...}") as they come.
"""

import argparse
import asyncio
import sys
import threading
from urllib.parse import quote

import websockets


def labelled(message: "str | bytes") -> str:
    """
    A ?labels=1 frame as printed: "<header>\n<message>", the header empty
    (the session), a position, "#T" or "#T <position>" (topic T).
    """
    if isinstance(message, str):
        if message.startswith("!"):
            return f"< {message}"
        header, _, body = message.partition("\n")
        shown = body
    else:
        raw_header, _, raw_body = message.partition(b"\n")
        header, shown = raw_header.decode(errors="replace"), repr(raw_body)
    if header.startswith("#"):
        return f"[{header.split(' ', 1)[0]}] {shown}"
    return f"< {shown}"


async def run(url: str, token: str, token_in: str, labels: bool = False) -> None:
    if labels:
        url += ("&" if "?" in url else "?") + "labels=1"
    headers = {}
    subprotocols = None
    if token_in == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token_in == "query":
        url += ("&" if "?" in url else "?") + "access_token=" + quote(token)
    else:
        subprotocols = ["bearer", token]
    async with websockets.connect(
        url, additional_headers=headers, subprotocols=subprotocols, compression=None
    ) as ws:
        print("connected; type a line to send it, Ctrl-D to quit", file=sys.stderr)

        async def receive() -> None:
            async for message in ws:
                if labels:
                    print(labelled(message), flush=True)
                else:
                    print(f"< {message!r}" if isinstance(message, bytes) else f"< {message}",
                          flush=True)

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
                    await ws.close()
                    return
                await ws.send(line.rstrip("\n"))

        done, pending = await asyncio.wait(
            [asyncio.ensure_future(receive()), asyncio.ensure_future(send())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for task in pending:
            task.cancel()
        print(f"closed: code={ws.close_code} reason={ws.close_reason!r}", file=sys.stderr)


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
    except websockets.exceptions.InvalidStatus as e:
        sys.exit(f"refused: HTTP {e.response.status_code} {e.response.reason_phrase}")
    except OSError as e:
        sys.exit(f"cannot connect: {e}")


if __name__ == "__main__":
    main()
