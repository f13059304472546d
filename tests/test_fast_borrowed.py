"""
The borrowed internals of Twisted, Autobahn and CPython
(L{wsproxy.fast.borrowed}): one pin per internal against the installed
libraries, named after it, so that an upgrade that changes one fails here
by name; the check's warning and fallback for each; and, with each
internal broken the way a release could break it (monkeypatched), the
fallback engaging and the proxy still working.
"""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, reactor
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from wsproxy.process.daemon import ProxyService
from wsproxy.fast import (
    borrowed, handshake, heap, inframes, lazyformat, poll, sockread, sockwrite, timers,
)
from wsproxy.fast.__main__ import main

from .memory import BINARY, TEXT, Frame, MemoryTestCase
from .support import ROOT
from .support.fakes import FakeEndpoint, FakeProxy


def internal(name: str) -> borrowed.Internal:
    [found] = [i for i in borrowed.INTERNALS if i.name == name]
    return found


def broken(i: borrowed.Internal) -> borrowed.Internal:
    def probe(reactor: Any) -> None:
        raise borrowed.Broken("reported missing by the test")

    return replace(i, probe=probe)


#: for each internal: is its module on the fallback now?
FALLEN_BACK = {
    "twisted.epoll-turn": lambda: not poll.ENABLED,
    "twisted.tcp-write": lambda: not sockwrite.ENABLED,
    "twisted.tcp-read": lambda: not sockread.ENABLED,
    "autobahn.connection-state": lambda: not inframes.ENABLED,
    "autobahn.batched-timer": lambda: not timers.ENABLED,
    "autobahn.pformat": lambda: getattr(lazyformat.TARGET, "pformat", None)
    is not lazyformat.LazyPformat,
    "autobahn.highlight": lambda: getattr(lazyformat.TARGET, "hltype", None)
    is not lazyformat.lazy_hltype,
    "autobahn.server-handshake": lambda: not handshake.ENABLED,
    "autobahn.nvx-masker": lambda: inframes.large_masker() is inframes.unmask_pure,
    "cpython.gc-freeze": lambda: not heap.ENABLED,
}


class Checking(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(borrowed.restore)
        self.warnings: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "wsproxy.fast.borrowed":
                self.warnings.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def check_one(self, name: str) -> borrowed.Result:
        [result] = borrowed.check(reactor, (internal(name),))
        return result

    def assertInUse(self, name: str) -> None:
        result = self.check_one(name)
        self.assertIsNone(result.problem, f"{name}: {result.problem}")
        if result.note is None:  # (a note: not in use here, by the library's choice)
            self.assertFalse(FALLEN_BACK[name](), f"{name} fell back")
        self.assertEqual(self.warnings, [])

    def assertFellBack(self, name: str) -> borrowed.Result:
        result = self.check_one(name)
        self.assertIsNotNone(result.problem, f"{name} was not found broken")
        self.assertTrue(FALLEN_BACK[name](), f"{name} did not fall back")
        self.assertEqual(len(self.warnings), 1, "one warning")
        self.assertEqual(self.warnings[0]["name"], name)
        return result


class PinTests(Checking):
    """
    Each borrowed internal, probed against the installed Twisted, Autobahn
    and CPython: in use, no warning.
    """

    def test_twisted_epoll_turn(self) -> None:
        """
        The epoll reactor's poller, selectables, turn state and dispatch are
        what the lean turn (wsproxy.fast.poll) reads and replaces.
        """
        self.assertInUse("twisted.epoll-turn")

    def test_twisted_tcp_write(self) -> None:
        """
        A TCP transport's socket, buffers and closing state are what
        write_now (wsproxy.fast.sockwrite) reads.
        """
        self.assertInUse("twisted.tcp-write")

    def test_twisted_tcp_read(self) -> None:
        """
        A TCP transport reads with tcp.Connection.doRead, which
        wsproxy.fast.sockread replaces on the instance.
        """
        self.assertInUse("twisted.tcp-read")

    def test_autobahn_connection_state(self) -> None:
        """
        Autobahn's state of a connection tells when a read may be taken
        without it (frame/message in progress, pong awaited, compression).
        """
        self.assertInUse("autobahn.connection-state")

    def test_autobahn_batched_timer(self) -> None:
        """
        Autobahn schedules its handshake, ping and close deadlines on its
        factory's _batched_timer.
        """
        self.assertInUse("autobahn.batched-timer")

    def test_autobahn_pformat(self) -> None:
        """
        Autobahn's connectionMade formats its options with its module's
        pformat.
        """
        self.assertInUse("autobahn.pformat")

    def test_autobahn_highlight(self) -> None:
        """
        Autobahn's connection set-up highlights names for its debug lines
        with its modules' hltype.
        """
        self.assertInUse("autobahn.highlight")

    def test_autobahn_server_handshake(self) -> None:
        """
        Autobahn's server handshake leaves on the connection, and asks
        onConnect with, what wsproxy.fast.handshake sets from the lean
        parser's reading, for each sample request; both answer alike.
        """
        self.assertInUse("autobahn.server-handshake")

    def test_autobahn_nvx_masker(self) -> None:
        """
        Autobahn's native masker, when Autobahn uses it, unmasks a known
        vector.
        """
        self.assertInUse("autobahn.nvx-masker")

    def test_cpython_gc_freeze(self) -> None:
        """
        The collector's freeze, thresholds and callbacks are there and act.
        """
        self.assertInUse("cpython.gc-freeze")

    def test_every_internal_is_pinned(self) -> None:
        """
        Every internal in the list has its pin above and its fallback in
        FALLEN_BACK, and no name is listed twice.
        """
        names = [i.name for i in borrowed.INTERNALS]
        self.assertEqual(len(names), len(set(names)))
        pinned = {n[len("test_"):] for n in dir(PinTests) if n.startswith("test_")}
        self.assertEqual({n.replace(".", "_").replace("-", "_") for n in names},
                         pinned - {"every_internal_is_pinned"})
        self.assertEqual(set(names), set(FALLEN_BACK))


class CheckTests(Checking):
    def test_each_failed_probe_logs_one_warning_and_falls_back(self) -> None:
        """
        For every internal, a probe that fails logs one warning naming it
        (and the fallback) and switches its module to the fallback;
        restore switches it back.
        """
        for i in borrowed.INTERNALS:
            self.warnings.clear()
            [result] = borrowed.check(reactor, (broken(i),))
            self.assertEqual(result.problem, "reported missing by the test")
            self.assertTrue(FALLEN_BACK[i.name](), i.name)
            self.assertEqual([w["name"] for w in self.warnings], [i.name])
            self.assertIn(i.fallback, result.line())
            borrowed.restore()
            if i.name != "autobahn.nvx-masker" or inframes.native_masker() is not None:
                self.assertFalse(FALLEN_BACK[i.name](), i.name)

    def test_checking_again_gives_the_same_answer(self) -> None:
        """
        A second check after every internal fell back finds them all in
        use again (each is probed switched on, not as the last check left
        it).
        """
        borrowed.check(reactor, tuple(broken(i) for i in borrowed.INTERNALS))
        self.warnings.clear()
        results = borrowed.check(reactor)
        self.assertEqual([r.problem for r in results], [None] * len(results))
        self.assertEqual(self.warnings, [])

    def test_a_probe_that_raises_anything_is_a_failure(self) -> None:
        """
        A probe that raises something other than Broken (an AttributeError
        from a renamed attribute) counts as a failure, with its type.
        """
        def probe(reactor: Any) -> None:
            raise AttributeError("no such thing")

        [result] = borrowed.check(reactor, (replace(internal("twisted.tcp-read"), probe=probe),))
        self.assertEqual(result.problem, "AttributeError: no such thing")

    def test_main_prints_one_line_per_internal(self) -> None:
        """
        python -m wsproxy.fast prints one line per internal and exits 0
        when all are in use; a failure gives a FAIL line and status 1.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(main(), 0)
        lines = out.getvalue().splitlines()
        self.assertEqual([line.split()[:2] for line in lines],
                         [["ok", i.name] for i in borrowed.INTERNALS])
        out.truncate(0)
        out.seek(0)
        self.patch(borrowed, "INTERNALS",
                   tuple(broken(i) if i.name == "autobahn.pformat" else i
                         for i in borrowed.INTERNALS))
        self.assertEqual(main(), 1)
        [failed] = [line for line in out.getvalue().splitlines() if line.startswith("FAIL")]
        self.assertIn("autobahn.pformat", failed)

    def test_python_m_wsproxy_fast(self) -> None:
        """
        The command itself, in a process of its own: status 0, one "ok"
        line per internal.
        """
        done = subprocess.run([sys.executable, "-m", "wsproxy.fast"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": ROOT})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertEqual(len(done.stdout.splitlines()), len(borrowed.INTERNALS))

    def test_the_daemon_checks_at_start(self) -> None:
        """
        A ProxyService of a process of its own (lean_poll, manage_heap)
        runs the check when built; one built for a test does not.
        """
        ran: list[Any] = []
        self.patch(borrowed, "check", lambda r=None, i=None: ran.append(r) or [])
        ProxyService(FakeProxy(), object(), FakeEndpoint(defer.Deferred()),  # type: ignore[arg-type]
                     reactor)
        self.assertEqual(ran, [])
        ProxyService(FakeProxy(), object(), FakeEndpoint(defer.Deferred()),  # type: ignore[arg-type]
                     reactor, lean_poll=True)
        self.assertEqual(ran, [reactor])


class RealBreakTests(Checking):
    """
    Each internal broken the way a release could break it: the probe
    finds it, and the proxy falls back to the framework's own path.
    """

    def test_reactor_without_disconnectSelectable(self) -> None:
        """
        An epoll reactor without _disconnectSelectable: the check falls
        back, and the daemon leaves the reactor's own turn alone.
        """
        self.patch(EPollReactor, "_disconnectSelectable", None)
        self.assertFellBack("twisted.epoll-turn")
        service = ProxyService(FakeProxy(), object(),  # type: ignore[arg-type]
                               FakeEndpoint(defer.Deferred()), reactor)
        service.lean_poll = True
        service._running()
        self.assertNotIn("doIteration", reactor.__dict__)

    def test_not_an_epoll_reactor(self) -> None:
        """
        Any other reactor: the lean turn is reported unused.
        """
        from twisted.internet.task import Clock

        [result] = borrowed.check(Clock(), (internal("twisted.epoll-turn"),))
        self.assertIn("not the epoll reactor", result.problem or "")

    def test_abort_without_aborting_state(self) -> None:
        """
        A Twisted whose abortConnection no longer sets _aborting: write_now
        could not tell an aborted connection, so every write goes through
        transport.write (plain_socket says no).
        """
        from twisted.internet import tcp

        def abort(self: Any) -> None:
            self.stopReading()
            self.stopWriting()

        self.patch(tcp.Connection, "abortConnection", abort)
        self.assertFellBack("twisted.tcp-write")
        self.assertIn("_aborting", self.warnings[0]["problem"])

    def test_do_write_sends_nothing(self) -> None:
        """
        A Twisted whose doWrite no longer sends what the transport holds:
        the closing path could not offer a client that is not reading its
        close frame, so plain_socket says no everywhere (the client is
        reset, and frames go through transport.write).
        """
        from twisted.internet import tcp

        self.patch(tcp.Connection, "doWrite", lambda self: None)
        self.assertFellBack("twisted.tcp-write")
        self.assertIn("doWrite", self.warnings[0]["problem"])

    def test_transport_reads_otherwise(self) -> None:
        """
        A Twisted whose TCP server no longer reads with
        tcp.Connection.doRead: Redis connections keep Twisted's reads.
        """
        from twisted.internet import tcp

        def doRead(self: Any) -> Any:
            return tcp.Connection.doRead(self)

        self.patch(tcp.Server, "doRead", doRead)
        self.assertFellBack("twisted.tcp-read")

    def test_gc_without_freeze(self) -> None:
        """
        A Python without gc.freeze: the daemon installs no collector
        policy.
        """
        self.patch(gc, "freeze", None)
        self.assertFellBack("cpython.gc-freeze")
        service = ProxyService(FakeProxy(), object(),  # type: ignore[arg-type]
                               FakeEndpoint(defer.Deferred()), reactor)
        self.assertIsNone(service.heap)


def _rename_dataReceived(test: SynchronousTestCase) -> None:
    """
    An Autobahn whose private _dataReceived is now _data_received (its
    public dataReceived follows the rename).
    """
    original = WebSocketProtocol.__dict__["_dataReceived"]
    del WebSocketProtocol._dataReceived  # type: ignore[attr-defined]
    WebSocketProtocol._data_received = original  # type: ignore[attr-defined]

    def restore() -> None:
        del WebSocketProtocol._data_received  # type: ignore[attr-defined]
        WebSocketProtocol._dataReceived = original  # type: ignore[attr-defined]

    test.addCleanup(restore)

    def dataReceived(self: Any, data: bytes) -> None:
        self._data_received(data)

    test.patch(WebSocketServerProtocol, "dataReceived", dataReceived)


class AutobahnFallbackTests(MemoryTestCase):
    """
    The in-memory proxy with each Autobahn internal broken and the check
    run: client messages (small, fragmented, 59,908 bytes) still reach
    Redis, backend messages still reach the client.
    """

    def setUp(self) -> None:
        super().setUp()
        self.addCleanup(borrowed.restore)

    def check(self, name: str) -> None:
        [result] = borrowed.check(reactor, (internal(name),))
        self.assertIsNotNone(result.problem, name)
        self.assertTrue(FALLEN_BACK[name](), name)
        self.flushLoggedErrors()

    def assertProxyWorks(self, **settings: Any) -> Any:
        memory = self.start(**settings)
        client = memory.open()
        # 59,908 bytes: over inframes._SMALL (the large masker), under
        # 65,536 (a 16-bit length: read without Autobahn)
        big = bytes(range(256)) * 234 + b"tail"
        client.send_frame(b"hello")
        client.send_frame(big, BINARY)
        client.send(b"".join([
            _frame(b"frag", fin=False), _frame(b"ment", opcode=0),
        ]))
        self.assertEqual(memory.redis.published, [
            (b"session:s1:up", b"hello"),
            (b"session:s1:up", big),
            (b"session:s1:up", b"fragment"),
        ])
        memory.redis.publish("session:s1:down", b"down")
        self.assertEqual(client.frames(), [Frame(TEXT, b"down")])
        return memory, client

    def test_autobahn_renamed_dataReceived(self) -> None:
        """
        _dataReceived renamed: the probe finds it, every read goes to
        Autobahn's public dataReceived, and the proxy works.
        """
        _rename_dataReceived(self)
        self.check("autobahn.connection-state")
        self.assertProxyWorks()

    def test_without_native_masker(self) -> None:
        """
        Autobahn's native SIMD masker failing to load its module (the
        ImportError a frame over 2,048 bytes used to raise, dropping the
        connection): the probe finds it, large payloads are unmasked in
        pure Python.
        """
        if inframes.native_masker() is None:
            raise SkipTest("this Autobahn does not use NVX: nothing to break")
        from autobahn.nvx import _xormasker

        def unavailable(self: Any, mask: bytes) -> None:
            raise ImportError("No module named '_nvx_xormasker'")

        self.patch(_xormasker.XorMaskerShifted1, "__init__", unavailable)
        with self.assertRaises(ImportError):
            inframes.unmask(b"x" * 4096, b"abcd")  # what dropped the connection
        self.check("autobahn.nvx-masker")
        self.assertProxyWorks()

    def test_autobahn_no_longer_formats_with_pformat(self) -> None:
        """
        An Autobahn whose connectionMade no longer formats with its
        module's pformat: the probe finds it, and the module gets
        pprint.pformat back.
        """
        import pprint

        target: Any = lazyformat.TARGET
        made = WebSocketProtocol._connectionMade

        def connectionMade(self: Any) -> None:
            formatting = target.pformat
            target.pformat = pprint.pformat  # formats some other way
            try:
                made(self)
            finally:
                target.pformat = formatting

        self.patch(WebSocketProtocol, "_connectionMade", connectionMade)
        self.check("autobahn.pformat")
        self.assertIs(target.pformat, pprint.pformat)
        self.assertProxyWorks()

    def test_autobahn_no_longer_highlights_with_hlval(self) -> None:
        """
        An Autobahn whose Twisted adapter no longer has hlval (a release
        that highlights some other way): the probe finds it, the modules get
        autobahn.util's hltype and hlval back, and the name that is gone is
        not created.
        """
        import autobahn.util

        from autobahn.twisted import websocket as autobahn_twisted

        lazy = autobahn_twisted.hlval
        del autobahn_twisted.hlval
        self.addCleanup(setattr, autobahn_twisted, "hlval", lazy)
        self.check("autobahn.highlight")
        self.assertFalse(hasattr(autobahn_twisted, "hlval"))
        self.assertIs(autobahn_twisted.hltype, autobahn.util.hltype)
        self.assertIs(lazyformat.TARGET.hltype, autobahn.util.hltype)
        self.assertIs(lazyformat.TARGET.hlval, autobahn.util.hlval)
        # (this Autobahn's code still calls the name: its own function)
        autobahn_twisted.hlval = autobahn.util.hlval
        self.assertProxyWorks()

    def test_autobahn_handshake_sets_more(self) -> None:
        """
        An Autobahn whose server handshake leaves something more on the
        connection than wsproxy.fast.handshake sets: the probe finds it,
        and Autobahn reads every request again itself.
        """
        process = WebSocketServerProtocol.processHandshake

        def processHandshake(self: Any) -> None:
            process(self)
            self.http_request_fragment = ""

        self.patch(WebSocketServerProtocol, "processHandshake", processHandshake)
        self.check("autobahn.server-handshake")
        self.assertProxyWorks()

    def test_timer_fallback_uses_autobahns_own(self) -> None:
        """
        With the timer reported unused, the factory gives Autobahn back its
        own batched timer; pings and the handshake deadline still run.
        """
        [result] = borrowed.check(reactor, (broken(internal("autobahn.batched-timer")),))
        self.flushLoggedErrors()
        memory, client = self.assertProxyWorks(ping_interval=10.0, ping_timeout=5.0)
        factory = memory.site.ws_factory
        self.assertIs(factory._batched_timer, factory._autobahn_timer)
        memory.clock.advance(12)
        self.assertIn(0x9, [f.opcode for f in client.frames()], "a ping was sent")

    def test_bucket_timer_in_use_schedules_autobahns_deadlines(self) -> None:
        """
        With the timer in use, Autobahn's handshake deadline and pings are
        scheduled on the proxy's BucketTimer (not txaio's).
        """
        memory, client = self.assertProxyWorks(ping_interval=10.0, ping_timeout=5.0)
        factory = memory.site.ws_factory
        self.assertIsInstance(factory._batched_timer, timers.BucketTimer)
        self.assertGreater(len(factory._batched_timer), 0, "the next ping waits on it")
        memory.clock.advance(12)
        self.assertIn(0x9, [f.opcode for f in client.frames()], "a ping was sent")


def _frame(payload: bytes, opcode: int = TEXT, fin: bool = True) -> bytes:
    from .memory import client_frame

    return client_frame(payload, opcode, fin)
