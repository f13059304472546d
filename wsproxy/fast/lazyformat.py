"""
Autobahn's debug pretty-printing and highlighting, computed only when a
line is written.

Autobahn pretty-prints every protocol option for a debug line in each
connection's C{connectionMade} (C{autobahn.websocket.protocol.pformat},
the module's own name for C{pprint.pformat}), before the logger decides to
drop it (its namespace never logs below C{info}: L{wsproxy.logs}). That
was a fifth of the CPU a refused upgrade cost. L{install} replaces that
name, for the whole process, with L{LazyPformat}: a C{str} (empty) so
that callers that need one still get one, whose formatting gives the
text. Nothing else in the process is affected: only Autobahn's module
global is replaced, C{pprint} itself is not.

Likewise its highlighting (C{hltype}, C{hlval}: the qualified name of a
method and a value, coloured with C{click.style}), which Autobahn computes
for debug lines in C{connectionMade}, C{_connectionMade},
C{processHandshake}, C{sendData} and C{connectionLost}, four times per
connection set-up: about 7% of a set-up's CPU. L{install_highlight}
replaces those two names in the modules that call them
(L{HIGHLIGHT_TARGETS}) with L{LazyHltype} and L{LazyHlval}, formatted by
Autobahn's own function when the text is used.
"""

from __future__ import annotations

import pprint
from typing import Any, Callable

import autobahn.twisted.websocket as _autobahn_twisted
import autobahn.util as _autobahn_util
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


#: the modules whose C{hltype} and C{hlval} are replaced
HIGHLIGHT_TARGETS = (_autobahn_protocol, _autobahn_twisted)


class LazyHltype:
    """
    Autobahn's C{hltype(obj)}, computed only when the text is used (by
    C{str}, C{format} or C{repr}). Not a C{str}: Autobahn only passes it
    to its loggers, and an object with one slot is made in a fifth of the
    time a C{str} subclass with an attribute is.
    """

    __slots__ = ("_obj",)

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __str__(self) -> str:
        return str(_autobahn_util.hltype(self._obj))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return repr(str(self))


class LazyHlval:
    """
    Autobahn's C{hlval(val, ...)}, computed only when the text is used
    (as L{LazyHltype}).
    """

    __slots__ = ("_val", "_args", "_kwargs")

    def __init__(self, val: Any, *args: Any, **kwargs: Any) -> None:
        self._val = val
        self._args = args
        self._kwargs = kwargs

    def __str__(self) -> str:
        return str(_autobahn_util.hlval(self._val, *self._args, **self._kwargs))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return repr(str(self))


lazy_hltype = LazyHltype
lazy_hlval = LazyHlval


#: what each replaced name becomes
_LAZY_HIGHLIGHT: dict[str, Callable[..., Any]] = {"hltype": lazy_hltype, "hlval": lazy_hlval}


def install_highlight() -> bool:
    """
    Replace C{hltype} and C{hlval} in L{HIGHLIGHT_TARGETS}, if each module
    still has both names (a name a module no longer uses is not created);
    C{True} if they now are.
    """
    if not all(hasattr(module, name)
               for module in HIGHLIGHT_TARGETS for name in _LAZY_HIGHLIGHT):
        return False
    for module in HIGHLIGHT_TARGETS:
        for name, lazy in _LAZY_HIGHLIGHT.items():
            setattr(module, name, lazy)
    return True


def uninstall_highlight() -> None:
    """
    Give Autobahn's modules back C{autobahn.util}'s C{hltype} and C{hlval}.
    """
    for module in HIGHLIGHT_TARGETS:
        for name, lazy in _LAZY_HIGHLIGHT.items():
            if getattr(module, name, None) is lazy:
                setattr(module, name, getattr(_autobahn_util, name))
