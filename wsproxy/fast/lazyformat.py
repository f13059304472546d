"""
Autobahn's debug pretty-printing, computed only when a line is written.

Autobahn pretty-prints every protocol option for a debug line in each
connection's C{connectionMade} (C{autobahn.websocket.protocol.pformat},
the module's own name for C{pprint.pformat}), before the logger decides to
drop it (its namespace never logs below C{info}: L{wsproxy.logs}). That
was a fifth of the CPU a refused upgrade cost. L{install} replaces that
name, for the whole process, with L{LazyPformat}: a C{str} (empty) so
that callers that need one still get one, whose formatting gives the
text. Nothing else in the process is affected: only Autobahn's module
global is replaced, C{pprint} itself is not.
"""

from __future__ import annotations

import pprint
from typing import Any

import autobahn.websocket.protocol as _autobahn_protocol

#: the module whose C{pformat} is replaced
TARGET = _autobahn_protocol


class LazyPformat(str):
    """
    C{pprint.pformat(obj)}, computed only when the text is used.
    """

    _obj: Any

    def __new__(cls, obj: Any) -> "LazyPformat":
        text = super().__new__(cls, "")
        text._obj = obj
        return text

    def __str__(self) -> str:
        return pprint.pformat(self._obj)

    def __format__(self, spec: str) -> str:
        return format(pprint.pformat(self._obj), spec)

    def __repr__(self) -> str:
        return pprint.pformat(self._obj)


def install() -> bool:
    """
    Replace Autobahn's C{pformat}, if its module still has that name (a
    name it no longer uses is not created); C{True} if it now is.
    """
    if not hasattr(TARGET, "pformat"):
        return False
    setattr(TARGET, "pformat", LazyPformat)
    return True


def uninstall() -> None:
    """
    Give Autobahn's module back C{pprint.pformat}.
    """
    if getattr(TARGET, "pformat", None) is LazyPformat:
        setattr(TARGET, "pformat", pprint.pformat)
