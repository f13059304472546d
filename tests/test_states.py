"""
The states of a proxied WebSocket connection (L{wsproxy.websocket.states}):
each transition in the table, illegal ones ignored, and the path real
connections take through them (in memory, L{tests.memory}).
"""

from __future__ import annotations

from typing import Any

from tests.memory import CLOSE, MemoryTestCase, close_payload
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.websocket import states
from wsproxy.websocket.states import ADMITTING, CLOSED, CLOSING, ENDED, OPEN, State


class _Holder:
    """
    Anything with a C{_state}.
    """

    def __init__(self, state: State) -> None:
        self._state = state


class TransitionTests(SynchronousTestCase):
    """
    L{states.advance} moves along L{states.TRANSITIONS} only.
    """

    def assertMoves(self, start: State, to: State) -> None:
        holder = _Holder(start)
        self.assertTrue(states.advance(holder, to), f"{start.name} -> {to.name}")
        self.assertIs(holder._state, to)

    def assertStays(self, start: State, to: State) -> None:
        holder = _Holder(start)
        self.assertFalse(states.advance(holder, to), f"{start.name} -> {to.name}")
        self.assertIs(holder._state, start)

    def test_admitting_opens(self) -> None:
        """
        An admitted connection goes from ADMITTING to OPEN.
        """
        self.assertMoves(ADMITTING, OPEN)

    def test_admitting_ends(self) -> None:
        """
        A refused connection, or a client that left mid-admission, goes from
        ADMITTING straight to ENDED.
        """
        self.assertMoves(ADMITTING, ENDED)

    def test_open_closing(self) -> None:
        """
        The proxy deciding to close moves OPEN to CLOSING.
        """
        self.assertMoves(OPEN, CLOSING)

    def test_open_ends(self) -> None:
        """
        The first close frame, or the TCP connection's end, moves OPEN to ENDED.
        """
        self.assertMoves(OPEN, ENDED)

    def test_closing_again(self) -> None:
        """
        A later decision (the shutdown's 1001) may follow an earlier one:
        CLOSING to CLOSING.
        """
        self.assertMoves(CLOSING, CLOSING)

    def test_closing_ends(self) -> None:
        """
        The proxy's close frame sent ends the session: CLOSING to ENDED.
        """
        self.assertMoves(CLOSING, ENDED)

    def test_ended_closed(self) -> None:
        """
        The TCP connection's end moves ENDED to CLOSED.
        """
        self.assertMoves(ENDED, CLOSED)

    def test_every_listed_transition_tested(self) -> None:
        """
        The table holds exactly the transitions tested above.
        """
        listed = {(start, to) for start, targets in states.TRANSITIONS.items() for to in targets}
        self.assertEqual(listed, {
            (ADMITTING, OPEN), (ADMITTING, ENDED), (OPEN, CLOSING), (OPEN, ENDED),
            (CLOSING, CLOSING), (CLOSING, ENDED), (ENDED, CLOSED),
        })

    def test_illegal_ignored(self) -> None:
        """
        Every other transition is refused and leaves the state as it was:
        a session ends once, never reopens, and a closed connection stays
        closed.
        """
        legal = {(start, to) for start, targets in states.TRANSITIONS.items() for to in targets}
        for start in State:
            for to in State:
                if (start, to) not in legal:
                    self.assertStays(start, to)

    def test_session_open(self) -> None:
        """
        The session counts as open in OPEN and CLOSING only.
        """
        self.assertEqual(states.SESSION_OPEN, {OPEN, CLOSING})


class ConnectionStateTests(MemoryTestCase):
    """
    The states real connections go through.
    """

    def protocol(self, memory: Any) -> Any:
        (protocol,) = memory.proxy.connections
        return protocol

    def test_open_then_client_closes(self) -> None:
        """
        OPEN once admitted; the client's close frame answered ends the
        session, and (the memory transport closes at once) the connection.
        """
        memory = self.start()
        client = memory.open()
        protocol = self.protocol(memory)
        self.assertIs(protocol._state, OPEN)
        client.send_frame(close_payload(1000), CLOSE)
        self.assertIs(protocol._state, CLOSED)
        self.assertEqual(memory.proxy.stats.open_connections, 0)

    def test_ended_while_tcp_lives(self) -> None:
        """
        The proxy's close frame ends the session (ENDED: no longer counted)
        while the TCP connection waits for the client's answer; the answer
        closes it (CLOSED).
        """
        memory = self.start()
        client = memory.open()
        protocol = self.protocol(memory)
        protocol.server_close(4000, "bye")
        self.assertIs(protocol._state, ENDED)
        self.assertEqual(memory.proxy.stats.open_connections, 0)
        self.assertFalse(client.closed)
        client.send_frame(close_payload(4000), CLOSE)
        self.assertIs(protocol._state, CLOSED)

    def test_admitting_until_subscribed(self) -> None:
        """
        ADMITTING while Redis has not confirmed the subscription; a client
        leaving then ends it without ever opening.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("SUBSCRIBE")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        protocol = self.protocol(memory)
        self.assertIs(protocol._state, ADMITTING)
        client.leave()
        self.assertIs(protocol._state, CLOSED)
        self.assertEqual(memory.proxy.stats.outcomes.get("accepted", 0), 0)

    def test_server_close_goes_through_closing(self) -> None:
        """
        A backend's close request: CLOSING (nothing more is sent), then
        ENDED as its close frame is sent, in the same call.
        """
        memory = self.start()
        memory.open()
        protocol = self.protocol(memory)
        seen: list[State] = []
        advance = states.advance

        def recording(connection: Any, to: State) -> bool:
            moved = advance(connection, to)
            if moved:
                seen.append(to)
            return moved

        self.patch(states, "advance", recording)
        protocol.server_close(4000, "bye")
        self.assertEqual(seen, [CLOSING, ENDED])
        self.assertIs(protocol._state, ENDED)
