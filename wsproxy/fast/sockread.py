"""
Reading a Redis connection into one reused buffer.

Twisted's C{tcp.Connection.doRead} allocates a new buffer of C{bufferSize}
bytes per read; above the C library's mmap threshold (128 KiB, and the
subscriber reads 4 MiB at a time) that is an mmap, an mremap and a munmap
per read, three system calls for a read of a message or two. L{read_into}
replaces the transport's C{doRead} (an instance attribute, which Twisted's
reactor calls like its own) by one that C{recv_into}s a buffer of its own
and hands the protocol the bytes read, answering the reactor as Twisted's
does (C{None}, C{CONNECTION_DONE} at end of stream, C{CONNECTION_LOST} on
an error). L{forget} takes it away again when the connection is lost
(the closure is a reference cycle through the protocol).

Only a plain TCP connection whose class still reads with Twisted's own
C{tcp.Connection.doRead} is changed; anything else (a Unix socket, TLS, a
Twisted whose transport no longer reads that way, or the start-up check,
L{wsproxy.fast.borrowed}, having switched this off) keeps Twisted's reads.
"""

from __future__ import annotations

from errno import EWOULDBLOCK
from typing import Any

from twisted.internet import main, tcp

#: cleared by the start-up check (L{wsproxy.fast.borrowed}) if Twisted's
#: transport no longer reads the way L{read_into} replaces
ENABLED = True


def read_into(transport: Any, proto: Any, size: int) -> bool:
    """
    Make a plain TCP transport read into one buffer of C{size} bytes,
    reused, and hand C{proto.received_into(buffer, n)} each read (what
    Twisted's C{doRead} does, without a new buffer per read); C{True} if
    it now does. Any other transport (TLS: its bytes must go through the
    TLS layer) keeps Twisted's reads.
    """
    if (not ENABLED or not isinstance(transport, tcp.Connection) or transport.TLS
            or type(transport).doRead is not tcp.Connection.doRead):
        return False  # a Unix socket (recvmsg) keeps Twisted's reads too
    sock = transport.socket
    buffer = bytearray(size)
    received = proto.received_into

    def doRead() -> Any:
        try:
            n = sock.recv_into(buffer)
        except OSError as error:
            if error.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        received(buffer, n)
        return None

    # an attribute of the transport (a reference cycle through the
    # protocol): dropped when the connection is lost (L{forget})
    transport.doRead = doRead  # type: ignore[method-assign]
    return True


def forget(transport: Any) -> None:
    """
    Give C{transport} back Twisted's own C{doRead}.
    """
    transport.__dict__.pop("doRead", None)
