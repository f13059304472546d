"""The run's sessions: ids, tokens, and the tokens stored as a backend would."""

from __future__ import annotations

import secrets

import redis

from .workers import SessionSpec

# SETEX commands per pipeline round trip
TOKEN_BATCH = 2000


def make_sessions(prefix: str, count: int) -> list[SessionSpec]:
    """C{count} sessions C{<prefix>-<run id>-<index>}, one random token each."""
    run_id = secrets.token_hex(4)
    return [SessionSpec(i, f"{prefix}-{run_id}-{i}", secrets.token_urlsafe(18))
            for i in range(count)]


def authorize(client: redis.Redis, sessions: list[SessionSpec], ttl: int) -> None:
    """SETEX session:{id}:auth for every session."""
    pipe = client.pipeline(transaction=False)
    for i, spec in enumerate(sessions):
        pipe.setex(f"session:{spec.session_id}:auth", ttl, spec.token)
        if i % TOKEN_BATCH == TOKEN_BATCH - 1:
            pipe.execute()
    pipe.execute()
