"""
A refused request: the HTTP status, a short reason and the complete
plain-text response sent for it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        plain-text body, and C{Connection: close}.
        """
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


#: the refusal of a client that left before its handshake completed (it is
#: counted, never sent)
CLIENT_LEFT = Refusal(499, "Client went away")
