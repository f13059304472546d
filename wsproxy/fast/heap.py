"""
Keeping Python's cycle collector from pausing the proxy.

CPython's cycle collector is not incremental: a full (generation 2)
collection walks every container object alive, with the whole process
stopped. Each open connection is about forty such objects, so with 19,000
connections a full collection stops every session for a second or more
(measured: p99 delivery latency of about 1 s at 19,000 idle connections,
`bench/run.sh scale`). Full collections come whenever the long-lived
objects have grown by a quarter since the last one: during every
connection storm, and from time to time in steady state.

The policy here, installed by the daemon in each proxy process:

  - after start-up, and after each full collection that paused the
    process for more than L{PAUSE_BUDGET}, everything alive is I{frozen}
    (C{gc.freeze()}): moved out of the collector's reach. A frozen object
    is still freed by reference counting when nothing uses it any more; it
    is only never I{scanned} again. So later full collections look at what
    was created since, and their pause follows the growth, not the size,
    of the process: a full collection that takes longer than the budget
    means many new long-lived objects (new connections), and freezes them.
  - only a collection over the budget freezes: a freeze also catches
    what is in flight at that moment (handshakes, Redis replies), and
    whatever of that ends up in a reference cycle can no longer be
    reclaimed by later collections. Cheap collections (a flood of refused
    handshakes, steady traffic: garbage, not growth) leave everything to
    the collector as usual.
  - the youngest generation is collected after L{THRESHOLDS}[0] new
    container objects rather than CPython's 700, and the middle one every
    second time: a handshake's short-lived objects (about a hundred, alive
    for a Redis round trip) are then mostly freed before any collection
    sees them, instead of being scanned, promoted and scanned again, and a
    connection storm triggers far fewer collections. Measured with 10,000
    connections set up 500 at a time (the conn scenario of
    C{bench/compare.sh}, 2 cores shared with other work): the collector's
    pauses summed 0.45-0.91 s with CPython's thresholds (about 1,300
    collections), 0.10-0.33 s with these (about 20), a tenth of the
    set-up's CPU; the longest pause was at most 25-100 ms either way.
  - a closed connection leaves no reference cycle
    (L{wsproxy.websocket.protocol.ProxyProtocol._break_cycles},
    L{wsproxy.edge.site._DeadlineChannel.release_hand_off}; C{tests/test_fast_heap.py}
    checks every way a connection ends), so frozen connections are freed
    when they close. What else frozen ends up in a cycle is reclaimed once
    an hour by a collection of everything (unfreeze, collect, freeze),
    logged with its duration and what it reclaimed: the one long pause
    left, once an hour instead of at every quarter of growth.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: cleared by the start-up check (L{wsproxy.fast.borrowed}) if the
#: collector's API lacks what the policy uses: the daemon then installs no
#: policy (CPython's collector as it comes)
ENABLED = True

#: seconds between the full collections of everything, frozen objects too
FULL_COLLECTION_INTERVAL = 3600.0

#: a full collection longer than this (seconds) freezes what survived it
PAUSE_BUDGET = 0.01

#: the collector's thresholds (C{gc.set_threshold}): new container objects
#: before a young collection, young collections before a middle one, middle
#: ones before a full one (which also waits for 25 % growth)
THRESHOLDS = (20_000, 2, 10)


class CollectorPolicy:
    """
    Installed with L{install}; see the module's docstring.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, gc_module: Any = gc,
                 interval: float = FULL_COLLECTION_INTERVAL,
                 timer: Callable[[], float] = time.perf_counter,
                 observe: Optional[Callable[[str], Any]] = None) -> None:
        """
        @param interval: seconds between collections of everything (0:
            never).
        @param observe: a histogram's C{labels}: each collection's pause
            is observed in C{observe(generation)}.
        """
        self._clock = clock
        self._gc = gc_module
        self._interval = interval
        self._timer = timer
        self._pauses = [observe(str(g)) for g in range(3)] if observe is not None else None
        self._loop: Optional[LoopingCall] = None
        self._collecting = False
        self._started = 0.0
        #: the thresholds before L{install}, restored by L{uninstall}
        self._thresholds: tuple[int, ...] = ()
        #: full collections over the budget, each followed by a freeze
        self.freezes = 0

    def install(self) -> None:
        self._gc.callbacks.append(self._collected)
        self._thresholds = self._gc.get_threshold()
        self._gc.set_threshold(*THRESHOLDS)
        # what start-up made (modules, classes, settings) lives as long as
        # the process
        self._gc.freeze()
        if self._interval > 0:
            loop = self._loop = LoopingCall(self.collect_everything)
            loop.clock = self._clock
            loop.start(self._interval, now=False)

    def uninstall(self) -> None:
        if self._collected in self._gc.callbacks:
            self._gc.callbacks.remove(self._collected)
            self._gc.set_threshold(*self._thresholds)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._gc.unfreeze()

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._timer()
            return
        pause = self._timer() - self._started
        generation = info["generation"]
        if self._pauses is not None:
            self._pauses[generation].observe(pause)
        if generation == 2 and pause > PAUSE_BUDGET and not self._collecting:
            self.freezes += 1
            self._gc.freeze()

    def collect_everything(self) -> None:
        """
        Collect all objects, frozen ones too, then freeze the survivors.
        """
        self._collecting = True
        started = time.perf_counter()
        try:
            self._gc.unfreeze()
            reclaimed = self._gc.collect()
            self._gc.freeze()
        finally:
            self._collecting = False
        self._log.info(
            "full garbage collection: {reclaimed} objects reclaimed in {seconds:.3f}s, "
            "{frozen} kept out of later scans",
            reclaimed=reclaimed, seconds=time.perf_counter() - started,
            frozen=self._gc.get_freeze_count(),
        )
