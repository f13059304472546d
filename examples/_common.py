"""
Shared command-line bits of the example scripts.
"""

import argparse
import os


def parser(description: str) -> argparse.ArgumentParser:
    # the description is the script's docstring: keep its example lines
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
        help="Redis URL (default: $REDIS_URL or redis://127.0.0.1:6379)",
    )
    return p
