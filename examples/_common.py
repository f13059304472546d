"""
Shared command-line bits of the example scripts.
"""

import argparse
import os


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
        help="Redis URL (default: $REDIS_URL or redis://127.0.0.1:6379)",
    )
    return p
