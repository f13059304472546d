"""
The reactor's dispatch of ready sockets, without a log context per event.

Twisted's epoll reactor hands every ready socket to its handler through
C{twisted.python.log.callWithLogger}: it asks the socket for its log prefix
and pushes a context of the legacy logging system around the call (five
Python calls and a dictionary copy per event). When each Redis read and
each client frame is an event of its own (messages that come one at a
time, not in bursts), that is a tenth of the proxy's Python time per
message.

wsproxy logs through C{twisted.logger}, whose events never read that
context. The only lines that carried it are the legacy ones Twisted itself
writes when a read or write handler raises: they now say C{[-]} where they
said the connection's class and address. L{install} gives a running epoll
reactor a C{doIteration} that handles the turn's events in the same order,
and the commonest one itself: a socket that is readable and nothing else
is handled exactly as Twisted's C{_doReadOrWrite} handles it (a closed
descriptor, C{fileno()} -1, loses its connection with
C{ConnectionFdescWentAway}; else C{doRead} is called, and the connection
lost if it says so or raises anything, C{BaseException} included, which
is logged). Every other event (writable, hung up, in error) goes to the
reactor's own C{_doReadOrWrite}, without the log context. Anything raised
while losing a connection is logged here, as C{callWithLogger} logs it
(C{KeyboardInterrupt} excepted), and the turn's other events are still
handled.

After the events, the turn waits for the next ones itself unless the
reactor's loop has something to do first (a call from a thread or a
signal queued, a timed call added or due, the reactor stopping): the
loop's pass (running due timed calls, computing the wait, its error
handler) would only have come back here with the same timeout. Timed calls
run as before, at their time. A pass asked not to wait (C{timeout} 0: timed
calls due, or C{reactor.iterate()}) is one pass.

Any other reactor, or a Twisted whose epoll reactor no longer has the parts
used here, is left as it is.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.error import ConnectionFdescWentAway
from twisted.logger import Logger

_log = Logger()

#: why a selectable whose fileno() is -1 loses its connection (the value
#: of twisted.internet.posixbase._NO_FILEDESC, built from public parts)
_NO_FILEDESC = ConnectionFdescWentAway("File descriptor lost")

#: what the turn reads of the reactor to tell whether its loop has anything
#: to do before the next wait (twisted.internet.base.ReactorBase)
_TURN_STATE = ("threadCallQueue", "_newTimedCalls", "_pendingTimedCalls", "_justStopped",
               "running")
#: the longest wait epoll_wait takes, in seconds (2**31 ms)
_LONGEST_WAIT = 2147483


#: cleared by the start-up check (L{wsproxy.fast.borrowed}) if the epoll
#: reactor no longer behaves as this turn expects: L{install} then leaves
#: every reactor alone
ENABLED = True


def install(reactor: Any) -> bool:
    """
    Make C{reactor} dispatch ready sockets without a log context, if it is
    an epoll reactor; C{True} if it now does.
    """
    if not ENABLED:
        return False
    try:
        from select import EPOLLIN

        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    if type(reactor).doIteration is not EPollReactor.doPoll:
        return False  # a subclass with a loop of its own
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    handle = getattr(reactor, "_doReadOrWrite", None)
    disconnect = getattr(reactor, "_disconnectSelectable", None)
    if (poller is None or not isinstance(selectables, dict) or handle is None
            or disconnect is None):
        return False

    loops = all(hasattr(reactor, name) for name in _TURN_STATE)
    seconds = reactor.seconds

    def doPoll(timeout: Optional[float]) -> None:
        get = selectables.get
        # a pass that must not wait (reactor.iterate(), timed calls due)
        # is one pass
        again = loops and timeout != 0
        while True:
            # epoll.poll retries by itself when a signal interrupts it (PEP 475)
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
            for fd, event in events:
                selectable = get(fd)
                if selectable is None:
                    continue  # removed by an earlier event of this turn
                # as callWithLogger around _doReadOrWrite: anything raised
                # (but KeyboardInterrupt) is logged, the turn goes on
                try:
                    if event == EPOLLIN:
                        # _doReadOrWrite for a read event alone: a closed
                        # descriptor (fileno() -1) or anything doRead raises
                        # (BaseException, as Twisted) loses the connection
                        inRead = False
                        why: Any
                        try:
                            if selectable.fileno() == -1:
                                why = _NO_FILEDESC
                            else:
                                why = selectable.doRead()
                                inRead = True
                        except BaseException as e:
                            _log.failure("reading {selectable!r} failed", selectable=selectable)
                            why = e
                        if why:
                            disconnect(selectable, why, inRead)
                    else:
                        handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    _log.failure("handling an event of {selectable!r} failed",
                                 selectable=selectable)
            # Back to the reactor's loop if its next pass would do anything
            # but wait again: calls from threads (and signals) queued, timed
            # calls added or due, stopping. Else wait again from here, for
            # as long as it would have.
            if (not again or reactor.threadCallQueue or reactor._newTimedCalls
                    or reactor._justStopped or not reactor.running):
                return
            pending = reactor._pendingTimedCalls
            if pending:
                # capped as ReactorBase.timeout caps it: epoll_wait takes
                # a signed 32-bit count of milliseconds
                timeout = min(pending[0].time - seconds(), _LONGEST_WAIT)
                if timeout <= 0:
                    return
            else:
                timeout = None

    reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True


def uninstall(reactor: Any) -> None:
    """
    Give C{reactor} back its own C{doIteration}.
    """
    reactor.__dict__.pop("doIteration", None)
