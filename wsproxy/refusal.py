"""
A refused request: the HTTP status, a short reason and the complete
plain-text response sent for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure


@dataclass(frozen=True)
class Refusal(Exception):
    """
    The request is refused with an HTTP status and a short reason.
    """

    code: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"

    def response(self) -> bytes:
        """
        The complete HTTP response: status line, headers, the reason as a
        plain-text body, and C{Connection: close}. Made once per distinct
        refusal (L{_RESPONSES}): a flood of refused handshakes is answered
        with the same few responses.
        """
        key = (self.code, self.reason, self.headers)
        response = _RESPONSES.get(key)
        if response is None:
            response = self._response()
            if len(_RESPONSES) < _RESPONSES_KEPT:
                _RESPONSES[key] = response
        return response

    def _response(self) -> bytes:
        body = (self.reason + "\n").encode("utf-8")
        head = [f"HTTP/1.1 {self.code} {self.reason}"]
        head += [f"{name}: {value}" for name, value in self.headers]
        head += [
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "",
            "",
        ]
        return "\r\n".join(head).encode("utf-8") + body


#: each distinct refusal's response (by code, reason and headers: never
#: the refusal itself, whose traceback may hold a connection), up to
#: L{_RESPONSES_KEPT} of them (the reasons Autobahn words from a request,
#: and Retry-After values, may each be new)
_RESPONSES: dict[tuple[int, str, tuple[tuple[str, str], ...]], bytes] = {}
_RESPONSES_KEPT = 256


#: the refusal of a client that left before its handshake completed (it is
#: counted, never sent)
CLIENT_LEFT = Refusal(499, "Client went away")


def refusal_for(failure: Failure, log: Logger, doing: str) -> Refusal:
    """
    What a failed admission step is answered with: its own L{Refusal};
    L{CLIENT_LEFT} if it was cancelled (the client left); otherwise 500,
    with the unexpected failure logged as an error while C{doing}.
    """
    if failure.check(Refusal):
        return cast(Refusal, failure.value)
    if failure.check(CancelledError):
        return CLIENT_LEFT
    log.failure("unexpected error {doing}", failure, doing=doing)
    return Refusal(500, "Internal error")
