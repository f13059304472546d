"""
CPU cost of permessage-deflate per message, measured in-process on the same
objects the proxy uses: Autobahn's PerMessageDeflate (server side, default
parameters: context takeover, 15-bit window) against the uncompressed frame
wsproxy builds (factory.prepareMessage).

    .venv/bin/python bench/compression.py [--size 100] [--count 20000]

Prints one JSON line: microseconds per message for both paths, their ratio,
and the compressed size. Ratios measured in the same run are what to
compare on a noisy machine.
"""

import argparse
import json
import random
import string
import time

from autobahn.websocket.compress_deflate import PerMessageDeflate
from autobahn.websocket.protocol import PreparedMessage


def payloads(size: int, count: int) -> list[bytes]:
    rnd = random.Random(1)
    out = []
    for i in range(count):
        body = "".join(rnd.choice(string.ascii_lowercase) for _ in range(max(0, size - 40)))
        out.append(json.dumps({"id": i, "type": "update", "v": body}).encode()[:size])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--count", type=int, default=20000)
    args = p.parse_args()
    data = payloads(args.size, args.count)

    started = time.process_time()
    for payload in data:
        PreparedMessage(payload, False, False, False)
    plain = (time.process_time() - started) / len(data)

    deflate = PerMessageDeflate(True, False, False, 15, 15, 8)
    compressed_bytes = 0
    started = time.process_time()
    for payload in data:
        deflate.start_compress_message()
        out = deflate.compress_message_data(payload) + deflate.end_compress_message()
        PreparedMessage(out, False, False, True)
        compressed_bytes += len(out)
    compressed = (time.process_time() - started) / len(data)

    print(json.dumps({
        "size": args.size,
        "messages": len(data),
        "uncompressed_us_per_msg": round(plain * 1e6, 2),
        "deflate_us_per_msg": round(compressed * 1e6, 2),
        "ratio": round(compressed / plain, 1),
        "mean_compressed_size": round(compressed_bytes / len(data), 1),
    }))


if __name__ == "__main__":
    main()
