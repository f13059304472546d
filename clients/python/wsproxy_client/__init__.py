"""
wsproxy_client: an asyncio client for wsproxy, on ``websockets``.

    from wsproxy_client import WsProxyClient

    async with WsProxyClient("ws://127.0.0.1:8080", "my-session", token=token) as client:
        await client.send("hello")
        async for message in client:          # Message(data, topic, position, binary)
            print(message.data)

It is the Python counterpart of the JavaScript client (``clients/js``,
``@wsproxy/client``, which the browser example re-exports) and follows the
same rules, listed here; where it differs (what Python can do and a
browser cannot) it says so.

Credentials. Give exactly one of:

- ``token``: a static token. wsproxy resets the token's TTL on every
  successful connect, so the same token keeps working for a reconnecting
  client.
- ``get_token``: ``async (attempt, code) -> str``, called before every
  attempt (the first one and every reconnect; ``attempt`` counts the
  attempts made, ``code`` is the close code that ended the last connection
  or attempt, None at the first): for ``AUTH_MODE=jwt``. Return a token
  valid now (a cached one is fine until its exp).
- ``get_ticket``: the same, returning a single-use connect ticket
  (``Backend.issue_ticket``), sent as ``?ticket=``; no token goes with it.

The token travels as ``token_in`` says: ``"header"`` (``Authorization:
Bearer``, the default; a browser cannot do this), ``"subprotocol"`` (the pair
``bearer, <token>``: the token must be an HTTP token, as JWTs are) or
``"query"`` (``?access_token=``: it then ends up in URLs and logs along
the way). The client never logs, shows or keeps a token or ticket:
:attr:`WsProxyClient.socket_url` has none from a callback, and only a
callback's error message ends up in a state change's ``error``.

Reconnection (as the JavaScript client). After any close of an open connection
other than a normal closure (1000) or :meth:`WsProxyClient.close` -- an
abnormal close (1006), a server restart (1001), 1011, a backend's 4000-4999
... -- the client reconnects after an exponential backoff with jitter
(``backoff`` seconds doubling up to ``max_backoff``; each delay drawn from
``[d/2, d]``). A connection that stayed open ``stable`` seconds resets the
backoff. A 1000 from the server ends the client ("closed").

- Close 3000 ("token expired", ``JWT_EXPIRE_CONNECTIONS=true``) with
  ``get_token`` or ``get_ticket``: a fresh credential and a reconnect at
  once (delay 0), not counted against the backoff; only the first of
  consecutive 3000 closes of connections open less than ``stable`` seconds
  is immediate, the following ones wait the usual backoff (a callback that
  keeps handing out tokens about to expire cannot make it spin). With a
  static token, 3000 is a close like any other.
- Attempts that never opened (refused, unreachable, timed out, a callback
  that raised, returned no string or did not answer within
  ``connect_timeout``) are counted; after ``max_failures`` in a row the
  client gives up ("failed": iterating raises :class:`ConnectionFailed`).
  Unlike a browser this client sees a refusal's HTTP status and reason
  (:attr:`StateChange.status`, :attr:`ConnectionFailed.status`) but retries
  it all the same, as the JavaScript client does: a 403 for an expired token
  may be cured by the next ``get_token``, a 503 by a restarted proxy. A
  ``get_token`` token that cannot travel as a subprotocol fails at once.
- ``reconnect=False`` (not in the JavaScript client): no reconnection at all;
  the first attempt that does not open fails the client, the end of the
  connection ends it ("closed", with :attr:`close_code` and
  :attr:`close_reason`).

States (:class:`State`, reported to ``on_state``): connecting, open,
reconnecting (waiting ``delay`` seconds), closed (final: normal closure by
:meth:`close` or by the server), failed (final: gave up).
:meth:`connect` starts over from closed or failed.

Resumable sessions (``resume=True``; the proxy needs ``RESUME=true``, or
every attempt is refused with 400). Every attempt asks for
``?resume=<last position received>``, so that what the backend published
with ``wsproxy_publish`` while the client was away is replayed once each,
in order. ``on_recovery`` gets a :class:`Recovery` after each open (and
whenever a later gap could not be filled): ``recovered`` False means
messages were lost. A recoverable message whose sequence number is not
after the last one delivered (same epoch) is dropped: never delivered
twice; after a ``recovered`` False, counting goes on from the position the
server gives. :attr:`position` can be saved with the application's state
and passed back as ``position=``.

Acknowledged messages (``ack=True``; the proxy needs ``UPSTREAM=stream``).
:meth:`send` queues the message (also while not connected) under an id (a
random prefix and a counter unless given) and returns the id; it stays in
:attr:`unacked` until its ``ack`` (``on_ack``). After every (re)connect
every unacknowledged message is sent again, in the order first sent, with
the same id; after a ``nack`` (``on_nack``) it is sent again ``nack_retry``
seconds later. Backends drop the copies by id: delivery is at least once.
:meth:`flush` waits until every message is acknowledged.

Topics (``labels=True``; the proxy needs ``TOPICS=true``). Every
:class:`Message` says where it came from: ``topic`` (None for the session's
own), ``position`` (recoverable messages) and ``binary``. With ``resume``
too, positions are kept per topic (:attr:`topic_positions`) and each
reconnect asks for ``?resume_topic=T@<position>``; each topic has its own
recovery reports (``Recovery.topic``) and its own duplicate safeguard.
:meth:`forget_topic` drops a topic's position.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
import re
import secrets
import ssl as _ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Optional, TypeVar, Union
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

__all__ = [
    "Ack",
    "ConnectionFailed",
    "CredentialCallback",
    "Message",
    "Nack",
    "NotConnected",
    "Recovery",
    "State",
    "StateChange",
    "TooManyUnacked",
    "WsProxyClient",
    "WsProxyError",
]

__version__ = "0.1.0"

log = logging.getLogger("wsproxy_client")

#: ``async (attempt, code) -> credential``: see the module's docstring
CredentialCallback = Callable[[int, Optional[int]], Awaitable[str]]
TokenIn = Literal["header", "query", "subprotocol"]
Data = Union[str, bytes]
_T = TypeVar("_T")

TOKEN_CHARS: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP token (RFC 9110)
POSITION: Final = re.compile(r"^([0-9a-f]{1,32}):([0-9]{1,19})-([0-9]{1,19})$")
MESSAGE_ID: Final = re.compile(r"^[A-Za-z0-9._~:-]{1,64}$")
TOPIC: Final = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")  # the session-id rule
TOKEN_EXPIRED: Final = 3000
SUBPROTOCOL_TOKEN_HELP: Final = (
    "only letters, digits and !#$%&'*+-.^_`|~; use hex, base64url or JWT tokens, "
    'or token_in="header"')


class State(str, enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True)
class Message:
    """
    A message from the backend: C{data} is C{str} for a text frame, C{bytes}
    for a binary one. With labels: C{topic} (None: the session's own) and
    C{position} (recoverable messages; with resume, also without labels).
    """

    data: Data
    topic: Optional[str] = None
    position: Optional[str] = None

    @property
    def binary(self) -> bool:
        return isinstance(self.data, bytes)


@dataclass(frozen=True)
class Recovery:
    """
    A recovery report: C{recovered} False means messages were lost
    (C{reason} says why); C{topic} is None for the session's own history.
    """

    recovered: bool
    replayed: int
    position: Optional[str]
    reason: str
    topic: Optional[str] = None


@dataclass(frozen=True)
class Ack:
    id: str
    position: str


@dataclass(frozen=True)
class Nack:
    id: str
    reason: str


@dataclass(frozen=True)
class StateChange:
    """
    What C{on_state} gets. C{code}/C{reason}: the close that led here (1006
    for an attempt that never opened); C{status}/C{status_reason}: a refused
    handshake's HTTP answer; C{delay}: seconds until the next attempt
    (reconnecting); C{error}: why an attempt failed (never a credential).
    """

    state: State
    previous: State
    attempt: int
    reconnects: int
    failures: int
    code: Optional[int] = None
    reason: str = ""
    status: Optional[int] = None
    status_reason: str = ""
    delay: Optional[float] = None
    expired: bool = False
    by_client: bool = False
    error: str = ""
    message: str = ""


class WsProxyError(Exception):
    pass


class ConnectionFailed(WsProxyError):
    """
    The client gave up (state failed); C{detail} is the last state change,
    C{status} the last refusal's HTTP status, if any.
    """

    def __init__(self, detail: StateChange) -> None:
        super().__init__(detail.message or detail.error or "connection failed")
        self.detail = detail

    @property
    def status(self) -> Optional[int]:
        return self.detail.status

    @property
    def status_reason(self) -> str:
        return self.detail.status_reason


class NotConnected(WsProxyError):
    """
    send() without ack while no connection is open.
    """


class TooManyUnacked(WsProxyError):
    """
    send() with ack while C{max_unacked} messages wait for their ack.
    """


@dataclass(frozen=True)
class _Position:
    text: str
    epoch: str
    seq: int


def _parse_position(text: str) -> Optional[_Position]:
    match = POSITION.match(text)
    return _Position(text, match.group(1), int(match.group(3))) if match else None


@dataclass
class _Attempt:
    """
    How an attempt or a connection ended.
    """

    code: Optional[int] = None
    reason: str = ""
    status: Optional[int] = None
    status_reason: str = ""
    error: str = ""


class _End:
    pass


@dataclass
class _Failure:
    error: ConnectionFailed


_Item = Union[Message, _End, _Failure]


@dataclass
class _Connection:
    ws: ClientConnection
    serial: int
    sent: set[str] = field(default_factory=set)  # ack ids sent on this connection


class WsProxyClient:
    """
    A wsproxy client: see the module's docstring for the rules.

    @param url: the proxy's base URL (C{ws://host:port} or C{wss://...}),
        no path.
    @param session: the session id; C{agent} the agent label of the path.
    """

    def __init__(
        self,
        url: str,
        session: str,
        *,
        agent: str = "app",
        token: Optional[str] = None,
        get_token: Optional[CredentialCallback] = None,
        get_ticket: Optional[CredentialCallback] = None,
        token_in: TokenIn = "header",
        resume: bool = False,
        position: Optional[str] = None,
        ack: bool = False,
        labels: bool = False,
        topic_positions: Optional[Mapping[str, str]] = None,
        reconnect: bool = True,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_failures: int = 10,
        connect_timeout: float = 10.0,
        stable: float = 10.0,
        nack_retry: float = 1.0,
        max_unacked: int = 10000,
        compression: Optional[str] = None,
        ssl: Optional[_ssl.SSLContext] = None,
        headers: Optional[Mapping[str, str]] = None,
        on_state: Optional[Callable[[StateChange], object]] = None,
        on_recovery: Optional[Callable[[Recovery], object]] = None,
        on_ack: Optional[Callable[[Ack], object]] = None,
        on_nack: Optional[Callable[[Nack], object]] = None,
    ) -> None:
        given = sum(1 for c in (token, get_token, get_ticket) if c)
        if not url or not session or given == 0:
            raise ValueError("url, session and token (or get_token, or get_ticket) are required")
        if given > 1:
            raise ValueError("give one of token, get_token and get_ticket "
                             "(the proxy refuses two credentials)")
        if token_in not in ("header", "query", "subprotocol"):
            raise ValueError(f'token_in must be "header", "query" or "subprotocol", not {token_in!r}')
        if token and token_in == "subprotocol" and not TOKEN_CHARS.match(token):
            raise ValueError(f"this token cannot travel as a subprotocol ({SUBPROTOCOL_TOKEN_HELP})")
        last = None
        if position:
            last = _parse_position(position)
            if not resume or last is None:
                raise ValueError("position needs resume=True and the form <epoch>:<ms>-<seq>, "
                                 f"not {position!r}")
        topic_last: dict[str, _Position] = {}
        if topic_positions:
            if not resume or not labels:
                raise ValueError("topic_positions needs resume=True and labels=True")
            for topic, text in topic_positions.items():
                p = _parse_position(text)
                if not TOPIC.match(topic) or p is None:
                    raise ValueError("topic_positions needs topic names and positions "
                                     f"<epoch>:<ms>-<seq>, not {topic!r}: {text!r}")
                topic_last[topic] = p
        self.url = url.rstrip("/")
        self.session = session
        self.agent = agent
        self._token = token
        self._get_token = get_token
        self._get_ticket = get_ticket
        self.token_in: TokenIn = token_in
        self.resume = resume
        self.ack = ack
        self.labels = labels
        self.reconnect = reconnect
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_failures = max_failures if reconnect else 1
        self.connect_timeout = connect_timeout
        self.stable = stable
        self.nack_retry = nack_retry
        self.max_unacked = max_unacked
        self.compression = compression
        self.ssl = ssl
        self.headers = dict(headers or {})
        self.on_state = on_state
        self.on_recovery = on_recovery
        self.on_ack = on_ack
        self.on_nack = on_nack

        self.state = State.CLOSED
        self.attempts = 0  # connection attempts made
        self.reconnects = 0  # successful opens after the first one
        self.failures = 0  # consecutive attempts that never opened
        #: the close that ended the last connection (received from the server)
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.protocol: Optional[str] = None  # the subprotocol the server chose
        self._last = last
        self._topic_last = topic_last
        self._unacked: dict[str, Data] = {}  # id -> data, in the order first sent
        self._id_prefix = secrets.token_hex(4)
        self._next_id = 0
        self._conn: Optional[_Connection] = None
        self._serial = 0
        self._send_lock = asyncio.Lock()
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: Optional[asyncio.Task[None]] = None
        self._wake = asyncio.Event()  # ends a backoff wait early (close())
        self._opened = asyncio.Event()  # the first open, or a final state
        self._stopped = True
        self._ever_opened = False
        self._backoff_step = 0
        self._quick_expiries = 0
        self._timers: set[asyncio.Task[None]] = set()
        self._failure: Optional[ConnectionFailed] = None

    # --- what the application reads -------------------------------------------------

    @property
    def position(self) -> str:
        """
        With resume: the last position received ("" before the first).
        """
        return self._last.text if self._last else ""

    @property
    def topic_positions(self) -> dict[str, str]:
        """
        With resume and labels: {topic: the last position received on it}.
        """
        return {topic: p.text for topic, p in self._topic_last.items()}

    def forget_topic(self, topic: str) -> bool:
        """
        With resume and labels: forget a topic's position (the session left
        the topic), so that reconnects no longer ask to resume it.
        """
        return self._topic_last.pop(topic, None) is not None

    @property
    def unacked(self) -> list[str]:
        """
        With ack: the ids of the messages not acknowledged yet, oldest first.
        """
        return list(self._unacked)

    @property
    def socket_url(self) -> str:
        """
        The WebSocket URL, without any credential but a static token that
        goes in the query.
        """
        return self._socket_url(self._token, None)

    def _socket_url(self, token: Optional[str], ticket: Optional[str]) -> str:
        url = f"{self.url}/{quote(self.agent, safe='')}/ws/{quote(self.session, safe='')}"
        query = []
        if token and self.token_in == "query":
            query.append(f"access_token={quote(token, safe='')}")
        if ticket:
            query.append(f"ticket={quote(ticket, safe='')}")
        if self.resume:
            query.append(f"resume={quote(self.position, safe='')}")
        if self.labels:
            query.append("labels=1")
        if self.resume and self.labels:
            for topic, last in self._topic_last.items():
                query.append(f"resume_topic={quote(f'{topic}@{last.text}', safe='')}")
        if self.ack:
            query.append("ack=1")
        return f"{url}?{'&'.join(query)}" if query else url

    # --- starting and stopping -------------------------------------------------------

    async def connect(self, wait: bool = True) -> WsProxyClient:
        """
        Start connecting (again, after closed or failed). With C{wait}, return
        once the first connection is open; raise L{ConnectionFailed} if the
        client gives up first.
        """
        if self._stopped:
            if self._task is not None:
                await asyncio.shield(self._task)  # the last run's end
            self._stopped = False
            self.failures = 0
            self._backoff_step = 0
            self._quick_expiries = 0
            self._failure = None
            self._opened = asyncio.Event()
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        if wait:
            await self._opened.wait()
            if self._failure is not None:
                raise self._failure
        return self

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """
        Close normally and stop reconnecting; the message iterator ends.
        """
        self._stopped = True
        self._wake.set()
        conn = self._conn
        if conn is not None:
            try:
                await conn.ws.close(code, reason)
            except Exception:  # pragma: no cover - closing a broken socket
                pass
        if self._task is not None:
            await asyncio.shield(self._task)
        for timer in list(self._timers):
            timer.cancel()

    async def __aenter__(self) -> WsProxyClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> WsProxyClient:
        return self

    async def __anext__(self) -> Message:
        """
        The next message; the iteration ends when the client is closed
        (state closed) and raises L{ConnectionFailed} when it gave up.
        """
        if self._task is None:
            raise StopAsyncIteration  # never connected
        item = await self._queue.get()
        if isinstance(item, Message):
            return item
        self._queue.put_nowait(item)  # every later call ends the same way
        if isinstance(item, _Failure):
            raise item.error
        raise StopAsyncIteration

    async def receive(self) -> Message:
        """
        The next message (L{ConnectionFailed} if the client gave up,
        L{WsProxyError} if it is closed).
        """
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise WsProxyError("the client is closed") from None

    # --- sending ---------------------------------------------------------------------

    async def send(self, data: Union[Data, bytearray, memoryview],
                   id: Optional[str] = None) -> Optional[str]:
        """
        Without ack: send C{data} (str: a text frame, bytes: binary) now;
        L{NotConnected} if no connection is open. With ack: queue it (also
        while not connected), send it if connected, and return its id
        (C{id}, or a random prefix and a counter); L{TooManyUnacked} if
        C{max_unacked} messages are waiting already.
        """
        if not isinstance(data, (str, bytes)):
            data = bytes(data)
        if not self.ack:
            conn = self._conn
            if conn is None:
                raise NotConnected("not connected")
            try:
                await conn.ws.send(data)
            except ConnectionClosed:
                raise NotConnected("the connection closed") from None
            return None
        if id is None:
            id = f"{self._id_prefix}-{self._next_id}"
            self._next_id += 1
        if not MESSAGE_ID.match(id):
            raise ValueError(f"invalid message id {id!r}: 1-64 of [A-Za-z0-9._~:-]")
        if len(self._unacked) >= self.max_unacked and id not in self._unacked:
            raise TooManyUnacked(f"{len(self._unacked)} messages wait for their ack")
        self._unacked[id] = data
        self._all_acked.clear()
        conn = self._conn  # None: the next open sends it
        if conn is not None:
            await self._transmit(conn, id)
        return id

    async def flush(self, timeout: Optional[float] = None) -> None:
        """
        With ack: wait until every message sent is acknowledged
        (C{TimeoutError} after C{timeout} seconds).
        """
        await asyncio.wait_for(self._all_acked.wait(), timeout)

    async def _transmit(self, conn: _Connection, id: str, again: bool = False) -> None:
        """
        One unacknowledged message on C{conn}, "<id>\\n<message>", unless
        it was sent there already (C{again}: after a nack) or acknowledged.
        """
        async with self._send_lock:
            await self._transmit_locked(conn, id, again)

    async def _transmit_locked(self, conn: _Connection, id: str, again: bool) -> None:
        if self._conn is not conn or id not in self._unacked:
            return
        if id in conn.sent and not again:
            return
        conn.sent.add(id)
        data = self._unacked[id]
        frame: Data = f"{id}\n{data}" if isinstance(data, str) else id.encode() + b"\n" + data
        try:
            await conn.ws.send(frame)
        except ConnectionClosed:
            pass  # the next connection sends it again

    # --- the connection loop -----------------------------------------------------------

    async def _run(self) -> None:
        code: Optional[int] = None
        try:
            while not self._stopped:
                ended, opened_for = await self._attempt(code)
                if self._failure is not None:
                    break
                if self._stopped:
                    self._set_state(State.CLOSED, ended, by_client=True)
                    break
                code = ended.code
                if opened_for is None:
                    if not self._not_opened(ended):
                        break
                    await self._retry(ended, self._next_delay())
                    continue
                if ended.code == 1000 or not self.reconnect:
                    self._stopped = True
                    self._set_state(State.CLOSED, ended)
                    break
                stable = opened_for >= self.stable
                if stable:
                    self._backoff_step = 0
                fresh = self._get_token is not None or self._get_ticket is not None
                if fresh and ended.code == TOKEN_EXPIRED:
                    # a fresh token at once; only repeated quick expiries back off
                    self._quick_expiries = 0 if stable else self._quick_expiries + 1
                    if self._quick_expiries <= 1:
                        await self._retry(ended, 0.0, expired=True)
                        continue
                else:
                    self._quick_expiries = 0
                await self._retry(ended, self._next_delay())
        finally:
            self._conn = None
            self._stopped = True
            if self._failure is None and self.state not in (State.CLOSED, State.FAILED):
                # close() during a backoff wait or while getting a credential
                self._set_state(State.CLOSED, _Attempt(), by_client=True)
            self._opened.set()
            if self._failure is not None:
                self._queue.put_nowait(_Failure(self._failure))
            else:
                self._queue.put_nowait(_End())

    def _not_opened(self, ended: _Attempt) -> bool:
        """
        An attempt that never opened: counted; False once the client gives
        up (max_failures in a row).
        """
        self.failures += 1
        if self.failures >= self.max_failures:
            self._stopped = True
            what = (
                "get_token failed, or its token was refused" if self._get_token else
                "get_ticket failed, or its ticket was refused" if self._get_ticket else
                "the token was refused")
            refused = (f"last answer: HTTP {ended.status} {ended.status_reason}"
                       if ended.status is not None else ended.error or "no answer")
            message = (f"gave up after {self.failures} attempts that never connected "
                       f"({what}, or the proxy refused a parameter or is unreachable; {refused})")
            self._failure = ConnectionFailed(self._set_state(State.FAILED, ended, message=message))
            return False
        return True

    async def _retry(self, ended: _Attempt, delay: float, expired: bool = False) -> None:
        self._set_state(State.RECONNECTING, ended, delay=delay, expired=expired)
        self._wake.clear()
        if delay > 0 and not self._stopped:
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def _next_delay(self) -> float:
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** self._backoff_step)
        if ceiling < self.max_backoff:
            self._backoff_step += 1
        return ceiling / 2 + random.random() * ceiling / 2

    async def _credential(self) -> tuple[Optional[str], Optional[str], str]:
        """
        (token, ticket, error) for this attempt.
        """
        fetcher = self._get_token or self._get_ticket
        if fetcher is None:
            return self._token, None, ""
        name = "get_token" if self._get_token else "get_ticket"
        try:
            value = await asyncio.wait_for(fetcher(self.attempts, self._last_code),
                                           self.connect_timeout)
        except TimeoutError:
            return None, None, f"{name} did not answer within {self.connect_timeout:g} s"
        except Exception as e:
            return None, None, f"{name} failed: {e}"
        if not isinstance(value, str) or not value:
            return None, None, f"{name} gave no string"
        return (value, None, "") if self._get_token else (None, value, "")

    _last_code: Optional[int] = None

    async def _attempt(self, code: Optional[int]) -> tuple[_Attempt, Optional[float]]:
        """
        One attempt, and if it opened, the connection's whole life: how it
        ended, and how long it was open (None: it never opened).
        """
        self.attempts += 1
        self._last_code = code
        loop = asyncio.get_running_loop()
        self._set_state(State.CONNECTING, _Attempt(code=code))
        started = loop.time()
        token, ticket, error = await self._credential()
        if error:
            return _Attempt(error=error), None
        if self._stopped:
            return _Attempt(), None
        if (self._get_token is not None and self.token_in == "subprotocol"
                and not TOKEN_CHARS.match(token or "")):
            self._stopped = True
            message = ("get_token gave a token that cannot travel as a subprotocol "
                       f"({SUBPROTOCOL_TOKEN_HELP})")
            self._failure = ConnectionFailed(self._set_state(
                State.FAILED, _Attempt(error="get_token gave a token that cannot travel as a "
                                       "subprotocol"), message=message))
            return _Attempt(), None
        headers = dict(self.headers)
        subprotocols: Optional[list[Subprotocol]] = None
        if token and self.token_in == "header":
            headers["Authorization"] = f"Bearer {token}"
        elif token and self.token_in == "subprotocol":
            subprotocols = [Subprotocol("bearer"), Subprotocol(token)]
        remaining = max(0.001, self.connect_timeout - (loop.time() - started))
        try:
            ws = await connect(
                self._socket_url(token, ticket), additional_headers=headers,
                subprotocols=subprotocols, compression=self.compression, ssl=self.ssl,
                open_timeout=remaining, max_size=None, user_agent_header="wsproxy-client")
        except InvalidURI:
            # a malformed URL: retrying cannot help (and the error names the
            # URL, which may hold a token: not repeated)
            self._stopped = True
            self._failure = ConnectionFailed(self._set_state(
                State.FAILED, _Attempt(error="cannot connect: not a valid WebSocket URL"),
                message=f"cannot connect: not a valid WebSocket URL: {self.socket_url_for_logs}"))
            return _Attempt(), None
        except InvalidStatus as e:
            return _Attempt(code=1006, status=e.response.status_code,
                            status_reason=e.response.reason_phrase,
                            error=f"refused: HTTP {e.response.status_code} "
                                  f"{e.response.reason_phrase}"), None
        except (OSError, TimeoutError, InvalidHandshake) as e:
            error = f"cannot connect: {type(e).__name__}: {e}"
            for secret in (token, ticket):
                if secret:  # never shown, even if an error message quotes it
                    error = error.replace(secret, "<credential>").replace(
                        quote(secret, safe=""), "<credential>")
            return _Attempt(code=1006, error=error), None
        self._serial += 1
        conn = _Connection(ws, self._serial)
        opened_at = loop.time()
        self.failures = 0
        if self._ever_opened:
            self.reconnects += 1
        self._ever_opened = True
        self.protocol = ws.subprotocol
        self.close_code, self.close_reason = None, ""
        if self._stopped:  # close() while the handshake was under way
            await ws.close()
            return _Attempt(code=1000), 0.0
        self._set_state(State.OPEN, _Attempt())
        self._opened.set()
        # what the last connection did not get acknowledged, again, same ids,
        # in the order first sent, before anything sent from now on (send()
        # waits for the lock)
        async with self._send_lock:
            self._conn = conn
            for id in list(self._unacked):
                await self._transmit_locked(conn, id, False)
        try:
            async for frame in ws:
                if self.resume or self.ack or self.labels:
                    self._receive(frame)
                else:
                    self._queue.put_nowait(Message(frame))
        except ConnectionClosed:
            pass
        finally:
            self._conn = None
        received = ws.protocol.close_rcvd
        ended = _Attempt(code=received.code if received else 1006,
                         reason=received.reason if received else "")
        self.close_code, self.close_reason = ended.code, ended.reason
        return ended, loop.time() - opened_at

    # --- what arrives --------------------------------------------------------------------

    def _receive(self, frame: Data) -> None:
        """
        A frame with a header (resume, ack or labels): "!" + JSON (text) is
        a control frame, anything else "<header>\\n<message>", split at the
        first newline. The header is a position, empty for plain messages;
        with labels also "#T" or "#T <position>".
        """
        message: Data
        if isinstance(frame, str):
            if frame.startswith("!"):
                self._control(frame[1:])
                return
            header, newline, rest = frame.partition("\n")
            header, message = (header, rest) if newline else ("", frame)
        else:
            raw, split, body = frame.partition(b"\n")
            header, message = (raw.decode(errors="replace"), body) if split else ("", frame)
        topic: Optional[str] = None
        position = header
        if self.labels and header.startswith("#"):
            name, _, position = header[1:].partition(" ")
            topic = name
        if position:
            p = _parse_position(position)
            if p is None:
                log.warning("a message with a malformed position (%s) was delivered unchecked",
                            position)
            else:
                last = self._last if topic is None else self._topic_last.get(topic)
                if last is not None and last.epoch == p.epoch and p.seq <= last.seq:
                    return  # had it already
                if topic is None:
                    self._last = p
                elif self.resume:
                    self._topic_last[topic] = p
        self._queue.put_nowait(Message(message, topic, position or None))

    def _control(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            log.warning("a control frame that is not JSON was ignored")
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind in ("ack", "nack"):
            self._answer(event)
            return
        if kind != "recovery":
            return  # other kinds: for later versions
        raw_position = event.get("position")
        position = _parse_position(raw_position) if isinstance(raw_position, str) else None
        raw_topic = event.get("topic")
        topic = raw_topic if isinstance(raw_topic, str) and self.labels else None
        if topic is not None and not TOPIC.match(topic):
            log.warning("a recovery report for a malformed topic name was ignored")
            return
        last = self._last if topic is None else self._topic_last.get(topic)
        next_ = last
        if not event.get("recovered"):
            # continuity is broken (the application is told): the server's
            # position is where the stream goes on from, even if it is lower
            next_ = position
        elif last is None and not event.get("replayed"):
            # a fresh start: where the history stood, so that messages
            # published before the next one arrives are replayed after a reconnect
            next_ = position
        if topic is None:
            self._last = next_
        elif self.resume:
            if next_ is not None:
                self._topic_last[topic] = next_
            else:
                self._topic_last.pop(topic, None)
        replayed = event.get("replayed")
        report = Recovery(
            recovered=bool(event.get("recovered")),
            replayed=replayed if isinstance(replayed, int) else 0,
            position=raw_position if isinstance(raw_position, str) else None,
            reason=str(event.get("reason") or ""),
            topic=topic)
        self._call(self.on_recovery, report)

    def _answer(self, event: dict[str, object]) -> None:
        id = str(event.get("id"))
        if event.get("type") == "ack":
            self._unacked.pop(id, None)
            if not self._unacked:
                self._all_acked.set()
            self._call(self.on_ack, Ack(id, str(event.get("position") or "")))
            return
        # not stored (a Redis error, or the proxy lost Redis with it in
        # flight): sent again later on this connection (a new one sends it anyway)
        self._call(self.on_nack, Nack(id, str(event.get("reason") or "")))
        conn = self._conn
        if conn is None:
            return

        async def again() -> None:
            await asyncio.sleep(self.nack_retry)
            await self._transmit(conn, id, again=True)

        timer = asyncio.get_running_loop().create_task(again())
        self._timers.add(timer)
        timer.add_done_callback(self._timers.discard)

    # --- reporting -----------------------------------------------------------------------

    def _set_state(self, state: State, ended: _Attempt, *, delay: Optional[float] = None,
                   expired: bool = False, by_client: bool = False,
                   message: str = "") -> StateChange:
        previous, self.state = self.state, state
        change = StateChange(
            state=state, previous=previous, attempt=self.attempts, reconnects=self.reconnects,
            failures=self.failures, code=ended.code, reason=ended.reason, status=ended.status,
            status_reason=ended.status_reason, delay=delay, expired=expired,
            by_client=by_client, error=ended.error, message=message)
        if state in (State.CLOSED, State.FAILED):
            self._opened.set()
        log.debug("%s: %s (code %s, %s)", self.socket_url_for_logs, state.value, ended.code,
                  ended.error or ended.reason)
        self._call(self.on_state, change)
        return change

    @property
    def socket_url_for_logs(self) -> str:
        # the path only: no query, so never a token
        return f"{self.url}/{quote(self.agent, safe='')}/ws/{quote(self.session, safe='')}"

    @staticmethod
    def _call(callback: Optional[Callable[[_T], object]], value: _T) -> None:
        if callback is None:
            return
        try:
            callback(value)
        except Exception:
            log.exception("a wsproxy_client callback raised")
