"""
The browser example (examples/browser/) in a real headless Chromium, driven
by Selenium, against a real C{twistd -n wsproxy} process and a real
redis-server (with a static token, JWTs that expire, single-use tickets);
and the client module's resume bookkeeping and credential callbacks against
a scripted WebSocket in the page (what no real server does on purpose:
repeating messages, tokens expiring right after each open).

Needs Debian's C{chromium} and C{chromium-driver} and the C{selenium}
package; without them the test fails (it never skips), and nothing is ever
downloaded: chromedriver is given by path, so selenium-manager never runs.
A screenshot of the page is saved under C{artifacts/}.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
import zlib
from typing import Any, Callable, Optional

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from wsproxy.backend import Backend, sign_token
from wsproxy.names import CONTROL_CHANNEL, ticket_key

from .support import ROOT, TWISTD_WSPROXY, Daemon, free_port, redis_server, start_daemon, wait_for

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError as e:  # reported by setUp as a failure, not a skip
    webdriver = None
    _SELENIUM_MISSING: Optional[str] = str(e)
else:
    _SELENIUM_MISSING = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: the page, under the repository's root that StaticServer serves (its
#: wsproxy-client.js re-exports ../../clients/js/src/index.js, the package)
PAGE_PATH = "/examples/browser/index.html"
ARTIFACTS = os.path.join(ROOT, "artifacts")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1100,900",
]

# the page's reconnect settings for this test: 100 ms doubling to 1 s, give
# up after 12 attempts that never connected (4 s to 9 s of trying: longer
# than a proxy restart, which takes 1 to 2 s, short enough for the test)
MAX_FAILURES = 12
BACKOFF_MS = 100
MAX_BACKOFF_MS = 1000

# the JWT test's tokens expire this many seconds after they are signed
# (exp is whole seconds: 4 to 5 s of life), so the proxy closes with 3000
JWT_LIFETIME = 5

# the numbered stream of the resume test: one message every 20 ms, at most
# 400 (the page's log keeps 500 lines: the numbers, and a line per event)
STREAM_INTERVAL = 0.02
STREAM_LIMIT = 400

# what the page shows, read from its DOM
SNAPSHOT_JS = """
const text = (id) => document.getElementById(id).textContent;
return {
  state: document.getElementById("state").dataset.state,
  reconnects: Number(text("reconnects")),
  failures: Number(text("failures")),
  recovered: document.getElementById("recovery").dataset.recovered,
  notice: document.getElementById("notice").hidden ? "" : text("notice"),
  log: Array.from(document.querySelectorAll("#log li"), (li) => ({
    kind: li.dataset.kind,
    label: li.querySelector(".kind").textContent,
    body: li.querySelector(".body").textContent,
  })),
};
"""

# a scripted WebSocket in the page (FakeSocket: the test opens it, hands it
# frames, drops it) and nextSocket(n), the client's n-th attempt; the start
# of the scripts below
SCRIPTED_SOCKET_JS = r"""
const done = arguments[arguments.length - 1];
const sockets = [];
class FakeSocket {
  static OPEN = 1;
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    sockets.push(this);
  }
  open() { this.readyState = 1; this.onopen({}); }
  frame(data) { this.onmessage({ data }); }
  bytes(text, ...tail) {
    const head = new TextEncoder().encode(text);
    const out = new Uint8Array(head.length + tail.length);
    out.set(head);
    out.set(tail, head.length);
    this.frame(out.buffer);
  }
  drop(code) { this.readyState = 3; this.onclose({ code, reason: "", wasClean: false }); }
  close(code = 1000, reason = "") { setTimeout(() => this.drop(code, reason), 0); }
  send() {}
}
async function nextSocket(n) {
  const deadline = Date.now() + 5000;
  while (sockets.length < n) {
    if (Date.now() > deadline) throw new Error(`no reconnection attempt (${sockets.length} sockets)`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return sockets[n - 1];
}
"""


# wsproxy-client.js against a scripted WebSocket, in the page (see
# test_client_resume_bookkeeping); what the application saw comes back
FAKE_SOCKET_JS = SCRIPTED_SOCKET_JS + r"""
const recovery = (recovered, replayed, position, reason = "") =>
  "!" + JSON.stringify({ type: "recovery", recovered, replayed, position, reason });

async function run() {
  window.WebSocket = FakeSocket;
  const { WsProxyClient } = await import("./wsproxy-client.js");
  const out = { urls: [], got: [], recoveries: [], positions: [] };
  const base = { url: "ws://proxy.test/", agent: "a", session: "s1", token: "t0k", backoffMs: 1, maxBackoffMs: 1 };
  const record = (client) => {
    client.onmessage = (data, isBinary) =>
      out.got.push(isBinary ? Array.from(new Uint8Array(data)) : data);
    client.addEventListener("recovery", (e) => out.recoveries.push(e.detail));
  };

  // the default is unchanged: no ?resume=, frames delivered as they come
  const plain = new WsProxyClient(base);
  out.plainUrl = plain.socketUrl;
  record(plain);
  plain.connect();
  const p = await nextSocket(1);
  p.open();
  p.frame("e1:1-1\nas is");
  p.frame("!not a control frame");
  plain.close();

  const client = new WsProxyClient({ ...base, resume: true });
  record(client);
  client.connect();
  let ws = await nextSocket(2);
  out.urls.push(ws.url);
  ws.open();
  ws.frame(recovery(true, 0, "e1:100-2"));           // a fresh start: the history's end
  out.positions.push(client.position);
  ws.frame("e1:100-3\nthree");
  ws.frame("e1:100-3\nthree again");               // repeated: dropped
  ws.frame("e1:100-2\nolder");                     // older: dropped
  ws.frame("\nplain");                              // a plain PUBLISH: no position
  ws.bytes("e1:100-4\n", 0, 1, 10, 255);           // binary, a newline inside
  ws.frame("e1:100-5\nline 1\nline 2");
  ws.frame("!" + JSON.stringify({ type: "later", x: 1 })); // unknown control: ignored
  out.positions.push(client.position);
  ws.drop(1001);

  ws = await nextSocket(3);                          // resumes where it was
  out.urls.push(ws.url);
  ws.open();
  ws.frame(recovery(true, 2, "e1:100-7"));
  ws.frame("e1:100-5\nline 1\nline 2");           // the last one, repeated: dropped
  ws.frame("e1:100-6\nsix");
  ws.bytes("e1:100-6\n", 6);                       // binary repeat: dropped
  ws.frame("e1:100-7\nseven");
  // the history started over: counting goes on from the server's position
  ws.frame(recovery(false, 0, "e2:200-0", "the history started over (new epoch)"));
  ws.frame("e2:200-1\nnew one");
  ws.frame("e1:100-8\nold epoch");                  // another epoch: not comparable, delivered
  out.positions.push(client.position);
  // a restored older history in the same epoch: lower numbers count again
  ws.frame(recovery(false, 0, "e3:300-2", "position beyond the end of the history"));
  ws.frame("e3:300-3\nagain three");
  ws.frame(recovery(false, 0, null, "no history (expired or never written)"));
  out.positions.push(client.position);
  ws.drop(1006);

  ws = await nextSocket(4);
  out.urls.push(ws.url);
  client.close();

  // a saved position, and the token in the query string
  out.savedUrl = new WsProxyClient({ ...base, resume: true, tokenIn: "query", position: "e1:100-9" }).socketUrl;
  out.errors = [];
  for (const bad of [{ resume: true, position: "nope" }, { position: "e1:100-9" }]) {
    try {
      new WsProxyClient({ ...base, ...bad });
      out.errors.push(null);
    } catch (err) {
      out.errors.push(err.message);
    }
  }
  return out;
}
run().then(done, (err) => done({ error: String(err && err.stack || err) }));
"""


# wsproxy-client.js with labels: true against a scripted WebSocket (see
# test_client_labels_bookkeeping); what the application saw comes back
LABELS_JS = SCRIPTED_SOCKET_JS + r"""
const recovery = (fields) => "!" + JSON.stringify({ type: "recovery", reason: "", ...fields });

async function run() {
  window.WebSocket = FakeSocket;
  const { WsProxyClient } = await import("./wsproxy-client.js");
  const out = { urls: [], got: [], events: [], recoveries: [], positions: [] };
  const base = { url: "ws://proxy.test/", agent: "a", session: "s1", token: "t0k", backoffMs: 1, maxBackoffMs: 1 };
  const record = (client) => {
    client.onmessage = (data, info) => out.got.push([
      info.isBinary ? Array.from(new Uint8Array(data)) : data, info.topic, info.position]);
    client.addEventListener("message", (e) => out.events.push(e.detail.topic));
    client.onrecovery = (info) => out.recoveries.push(info);
  };

  // labels without resume: ?labels=1, headers taken off, no positions kept
  const live = new WsProxyClient({ ...base, labels: true });
  record(live);
  live.connect();
  let ws = await nextSocket(1);
  out.urls.push(ws.url);
  ws.open();
  ws.frame("\nto the session");
  ws.frame("#news\nto news\nline 2");
  ws.bytes("#room-7\n", 0, 10, 255);
  live.close();
  out.liveTopics = live.topicPositions;

  // labels and resume: per-topic positions, duplicates dropped per topic
  const client = new WsProxyClient({ ...base, labels: true, resume: true });
  record(client);
  client.connect();
  ws = await nextSocket(2);
  out.urls.push(ws.url);
  ws.open();
  ws.frame(recovery({ recovered: true, replayed: 0, position: "e1:100-2" }));
  ws.frame(recovery({ topic: "news", recovered: true, replayed: 0, position: "b1:5-7" }));
  ws.frame("e1:100-3\nsession three");
  ws.frame("#news b1:5-8\nnews eight");
  ws.frame("#news b1:5-8\nnews eight again");       // repeated on the topic: dropped
  ws.frame("#room-7 c1:9-8\nroom eight");            // same number, another topic: delivered
  ws.frame("#room-7\nplain on room-7");              // a plain topic PUBLISH: no position
  ws.frame("e1:100-3\nsession three again");         // dropped
  ws.bytes("#news b1:5-9\n", 1, 2);
  out.positions.push([client.position, client.topicPositions]);
  ws.drop(1001);

  ws = await nextSocket(3);                           // resumes the session and each topic
  out.urls.push(ws.url);
  ws.open();
  ws.frame(recovery({ recovered: true, replayed: 0, position: "e1:100-3" }));
  ws.frame(recovery({ topic: "news", recovered: true, replayed: 1, position: "b1:5-10" }));
  ws.frame("#news b1:5-9\nnine again");              // dropped
  ws.frame("#news b1:5-10\nnews ten");
  // joined while connected: where its history ends
  ws.frame(recovery({ topic: "alerts", recovered: true, replayed: 0, position: "d1:1-4" }));
  ws.frame("#alerts d1:1-5\nalert five");
  // a gap on room-7 that could not be filled: counting goes on from there
  ws.frame(recovery({ topic: "room-7", recovered: false, replayed: 0, position: "c2:1-0", reason: "gap" }));
  ws.frame("#room-7 c2:1-1\nroom new epoch");
  out.positions.push([client.position, client.topicPositions]);
  out.forgot = [client.forgetTopic("alerts"), client.forgetTopic("nope")];
  ws.drop(1006);

  ws = await nextSocket(4);
  out.urls.push(ws.url);
  client.close();

  out.savedUrl = new WsProxyClient({ ...base, labels: true, resume: true,
    position: "e1:100-9", topicPositions: { news: "b1:5-11" } }).socketUrl;
  out.errors = [];
  for (const bad of [{ resume: true, topicPositions: { news: "b1:5-1" } },
                     { labels: true, resume: true, topicPositions: { "a b": "b1:5-1" } },
                     { labels: true, resume: true, topicPositions: { news: "nope" } }]) {
    try {
      new WsProxyClient({ ...base, ...bad });
      out.errors.push(null);
    } catch (err) {
      out.errors.push(err.message);
    }
  }
  return out;
}
run().then(done, (err) => done({ error: String(err && err.stack || err) }));
"""


# a client with labels and resume against the real proxy (see
# test_topics_resume_across_proxy_restart): what it got, in window.topicOut
TOPIC_CLIENT_JS = r"""
const done = arguments[arguments.length - 1];
const [url, session, token] = arguments;
(async () => {
  const { WsProxyClient } = await import("./wsproxy-client.js");
  const client = new WsProxyClient({
    url, session, token, agent: "browser-test", labels: true, resume: true,
    backoffMs: 100, maxBackoffMs: 1000, maxFailures: 30,
  });
  const out = { got: [], recoveries: [], opens: 0, urls: [] };
  window.topicOut = out;
  window.topicClient = client;
  client.onmessage = (data, { topic, position }) => out.got.push([topic, data, position]);
  client.onrecovery = (info) => out.recoveries.push(info);
  client.onstatechange = (state) => {
    if (state === "connecting") out.urls.push(client.socketUrl);
    if (state === "open") out.opens += 1;
  };
  client.connect();
  done("started");
})().catch((err) => done({ error: String(err && err.stack || err) }));
"""


# WsProxyClient with ack: true against the real proxy (see
# test_acked_messages_across_proxy_restart): numbered messages, one every
# 10 ms; what the client saw is read back from window.ackOut
ACK_SENDER_JS = r"""
const done = arguments[arguments.length - 1];
const [url, session, token, total] = arguments;
(async () => {
  const { WsProxyClient } = await import("./wsproxy-client.js");
  const client = new WsProxyClient({
    url, session, token, agent: "browser-test", ack: true,
    backoffMs: 100, maxBackoffMs: 1000, maxFailures: 30, nackRetryMs: 200,
  });
  const out = { sent: 0, acks: 0, nacks: 0, opens: 0, unacked: 0, positions: [] };
  window.ackOut = out;
  client.onack = ({ position }) => { out.acks += 1; out.positions.push(position); };
  client.onnack = () => { out.nacks += 1; };
  client.onstatechange = (state) => { if (state === "open") out.opens += 1; };
  client.connect();
  const timer = setInterval(() => {
    if (out.sent >= total) {
      clearInterval(timer);
    } else {
      client.send(`message ${out.sent}`, `n${out.sent}`);
      out.sent += 1;
    }
    out.unacked = client.unacked.length;
  }, 10);
  done("started");
})().catch((err) => done({ error: String(err && err.stack || err) }));
"""


# wsproxy-client.js's getToken and getTicket against a scripted WebSocket
# (see test_client_credentials_per_attempt); what each attempt sent comes back
CREDENTIALS_JS = r"""
const done = arguments[arguments.length - 1];
const sockets = [];
class FakeSocket {
  static OPEN = 1;
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols === undefined ? null : protocols;
    this.readyState = 0;
    sockets.push(this);
  }
  open() { this.readyState = 1; this.onopen({}); }
  drop(code, reason = "") { this.readyState = 3; this.onclose({ code, reason, wasClean: true }); }
  close(code = 1000) { setTimeout(() => this.drop(code), 0); }
  send() {}
}
async function until(what, check) {
  const deadline = Date.now() + 5000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`not ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}
const nextSocket = (n) => until(`socket ${n}`, () => sockets.length >= n).then(() => sockets[n - 1]);

async function run() {
  window.WebSocket = FakeSocket;
  const { WsProxyClient } = await import("./wsproxy-client.js");
  const out = {};
  const base = { url: "ws://proxy.test", agent: "a", session: "s1", backoffMs: 40, maxBackoffMs: 40 };
  const delays = (client) => {
    const list = [];
    client.onstatechange = (state, d) => { if (state === "reconnecting") list.push({ code: d.code ?? null, delay: d.delay, error: d.error ?? null }); };
    return list;
  };

  // getToken: a new token for every attempt, in the subprotocol; a 3000
  // close reconnects at once, repeated quick ones back off
  let n = 0;
  const asked = [];
  const jwt = new WsProxyClient({ ...base, getToken: async (info) => { asked.push(info); return `h.p${++n}.s`; } });
  const jwtDelays = delays(jwt);
  out.jwtUrl = jwt.socketUrl;
  jwt.connect();
  for (let i = 1; i <= 3; i++) {
    const ws = await nextSocket(i);
    ws.open();
    ws.drop(3000, "token expired");
  }
  const ws4 = await nextSocket(4);
  ws4.open();
  ws4.drop(1006);                                  // any other close: backoff, and the count starts over
  const ws5 = await nextSocket(5);
  ws5.open();
  ws5.drop(3000, "token expired");
  await nextSocket(6);
  jwt.close();
  out.jwtSockets = sockets.slice(0, 6).map((ws) => [ws.url, ws.protocols]);
  out.jwtAsked = asked;
  out.jwtDelays = jwtDelays;

  // in the query with tokenIn: "query"
  const query = new WsProxyClient({ ...base, tokenIn: "query", getToken: () => "q.t.k" });
  query.connect();
  out.queryUrl = (await nextSocket(7)).url;
  query.close();

  // getTicket: ?ticket=, no subprotocol; a callback that fails counts as
  // an attempt that never opened, up to maxFailures
  let t = 0;
  const ticket = new WsProxyClient({
    ...base, maxFailures: 3,
    getTicket: () => {
      t += 1;
      if (t === 2) throw new Error("backend down");
      if (t === 3) return Promise.reject(new Error("still down"));
      return `ticket-${t}-0123456789abcdef`;
    },
  });
  const ticketDelays = delays(ticket);
  ticket.connect();
  const first = await nextSocket(8);
  first.open();
  first.drop(1001);
  const second = await nextSocket(9);
  second.drop(1006);                               // refused: the third attempt that never opened
  await until("failed", () => ticket.state === "failed");
  out.ticketState = ticket.state;
  out.ticketSockets = sockets.slice(7).map((ws) => [ws.url, ws.protocols]);
  out.ticketDelays = ticketDelays;

  // close() while the credential is on its way: no socket is opened
  let answer;
  const slow = new WsProxyClient({ ...base, getTicket: () => new Promise((resolve) => { answer = resolve; }) });
  slow.connect();
  await until("asked", () => answer !== undefined);
  slow.close();
  answer("late-ticket-0123456789abcdef");
  await new Promise((resolve) => setTimeout(resolve, 50));
  out.slow = { state: slow.state, sockets: sockets.length };

  // one credential only
  out.errors = [];
  for (const bad of [
    { token: "t0k", getTicket: () => "x" },
    { getToken: () => "x", getTicket: () => "y" },
    { getToken: "not a function" },
    {},
  ]) {
    try {
      new WsProxyClient({ ...base, ...bad });
      out.errors.push(null);
    } catch (err) {
      out.errors.push(err.message);
    }
  }
  return out;
}
run().then(done, (err) => done({ error: String(err && err.stack || err) }));
"""


def require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} not found: the browser test needs Debian's "
            "chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        )
    if _SELENIUM_MISSING is not None:
        raise RuntimeError(
            f"selenium is not installed ({_SELENIUM_MISSING}): pip install -e '.[dev]'"
        )


class NumberedStream(threading.Thread):
    """
    A backend publishing recoverable messages "1", "2", "3", ... with
    C{wsproxy_publish}, one every C{interval} seconds (late ticks are not
    made up in a burst), until L{stop} or C{limit}. C{count} is how many
    were published (acknowledged by Redis).
    """

    def __init__(self, r: Any, session: str, interval: float, limit: int) -> None:
        super().__init__(daemon=True)
        self.r = r
        self.keys = (f"session:{session}:history", f"session:{session}:meta")
        self.interval = interval
        self.limit = limit
        self.count = 0
        self.error: Optional[BaseException] = None
        self._stopping = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        try:
            while self.count < self.limit:
                if self._stopping.wait(max(0.0, next_at - time.monotonic())):
                    return
                self.r.fcall("wsproxy_publish", 2, *self.keys, str(self.count + 1), "text")
                self.count += 1
                next_at = max(next_at + self.interval, time.monotonic())
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)


class StaticServer:
    """
    The repository's root over HTTP on a loopback port, in a thread (the
    page is examples/browser/index.html; its client module imports the
    package's file, clients/js/src/index.js); and what a
    page's own backend would answer: C{routes} maps a path to a function
    whose string a C{POST} there gets (a fresh token or ticket), as plain
    text, never cached.
    """

    def __init__(self, directory: str) -> None:
        routes: dict[str, Callable[[], str]] = {}
        self.routes = routes

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                body = route().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        handler = functools.partial(Quiet, directory=directory)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_chromium(profile: str) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver by path: selenium-manager (which downloads drivers) never runs
    # (on a port outside the ephemeral range, which busy neighbours' outgoing
    # connections may take between selenium choosing it and chromedriver binding it)
    service = Service(executable_path=CHROMEDRIVER, port=free_port())
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(15)
    driver.set_script_timeout(10)
    return driver


class BrowserTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        require_browser()
        self.redis = redis_server(self)
        self.static = StaticServer(ROOT)
        self.addCleanup(self.static.stop)
        self.driver: Any = None
        self.daemons: list[Daemon] = []

    # -- helpers ---------------------------------------------------------

    def start_proxy(self, port: int, **extra_env: str) -> Daemon:
        env = {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "REDIS_URL": self.redis.url,
            "SHUTDOWN_GRACE_PERIOD_SECS": "5", "SHUTDOWN_DRAIN_SECS": "0",
            "AUTH_GRACE_PERIOD_SECS": "600",
            **extra_env,
        }
        daemon = start_daemon(self, env, TWISTD_WSPROXY)
        self.daemons.append(daemon)
        return daemon

    async def restart_proxy(self, daemon: Daemon, port: int, **extra_env: str) -> Daemon:
        daemon.signal(signal.SIGTERM)
        status = await daemon.out.ended
        self.assertEqual(status, 0, daemon.out.output.decode(errors="replace"))
        new = self.start_proxy(port, **extra_env)
        self.assertEqual(await new.port(), port)
        return new

    async def proxy_and_browser(self, **extra_env: str) -> tuple[Daemon, int]:
        """
        A proxy on a free port and Chromium, started side by side; the
        proxy and the port it listens on, once both are up.
        """
        daemon = self.start_proxy(free_port(), **extra_env)
        browser = defer.ensureDeferred(self.open_browser())
        port = await daemon.port()
        await browser
        return daemon, port

    async def load_page(self, port: int, params: str, max_failures: int = MAX_FAILURES,
                        query: str = "") -> str:
        """
        Load the example page configured by its fragment: C{params}, the
        proxy's URL and the retry settings (C{query}: a query string the
        page must ignore). Returns the page's URL.
        """
        fragment = (
            f"{params}&url=ws://127.0.0.1:{port}"
            f"&maxFailures={max_failures}&backoff={BACKOFF_MS}&maxBackoff={MAX_BACKOFF_MS}"
        )
        url = f"http://127.0.0.1:{self.static.port}{PAGE_PATH}{query}#{fragment}"
        await self.page(self.driver.get, url)
        return url

    async def open_browser(self) -> None:
        profile = tempfile.mkdtemp(prefix="wsproxy-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        self.driver = await threads.deferToThread(start_chromium, profile)
        self.addCleanup(threads.deferToThread, self.driver.quit)

    def snapshot(self) -> dict[str, Any]:
        return self.driver.execute_script(SNAPSHOT_JS)

    async def page(self, function: Callable[..., Any], *args: Any) -> Any:
        return await threads.deferToThread(function, *args)

    async def until(
        self, condition: Callable[[dict[str, Any]], Any], what: str, timeout: float = 15.0
    ) -> dict[str, Any]:
        """
        Poll the page until C{condition(snapshot)} holds; fail after
        C{timeout} seconds with what the page and the proxies showed.
        """
        deadline = time.monotonic() + timeout
        while True:
            snap = await self.page(self.snapshot)
            if condition(snap):
                return snap
            if time.monotonic() > deadline:
                await self.save_screenshot("browser-failure.png")
                logs = await self.page(self.driver.get_log, "browser")
                proxies = "\n---\n".join(d.out.output.decode(errors="replace") for d in self.daemons)
                self.fail(
                    f"page: not {what} within {timeout}s\npage: {snap}\n"
                    f"console: {logs}\nproxy output:\n{proxies}"
                )
            await task.deferLater(reactor, 0.1, lambda: None)

    async def save_screenshot(self, name: str) -> str:
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, name)
        await self.page(self.driver.save_screenshot, path)
        return path

    def up_message(self, pubsub: Any, timeout: float) -> Optional[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "message":
                return message["data"]
        return None

    async def delivered(self, r: Any, channel: str, message: str, timeout: float = 20.0) -> None:
        """
        Publish C{message} until a proxy process takes it (PUBLISH answers
        1): a short-lived connection may be between two sockets right then
        (a token that just expired); the socket that took it delivers it
        before any close frame.
        """
        await wait_for(lambda: r.publish(channel, message) == 1, timeout=timeout, interval=0.1)

    @staticmethod
    def bodies(snap: dict[str, Any], kind: str) -> list[str]:
        return [entry["body"] for entry in snap["log"] if entry["kind"] == kind]

    @staticmethod
    def labelled(snap: dict[str, Any], label: str) -> list[str]:
        return [entry["body"] for entry in snap["log"] if entry["label"] == label]

    # -- the tests -------------------------------------------------------

    async def test_client_resume_bookkeeping(self) -> None:
        """
        WsProxyClient with C{resume: true}, against a scripted WebSocket in
        the page: it asks for C{?resume=} and then C{?resume=<last
        position>} (URL-encoded) on each reconnect; the application gets
        messages without their position prefix (text as strings, binary as
        ArrayBuffers, split at the first newline only), each recoverable
        message once even when the server repeats it or sends an older one,
        plain messages unchanged, and every recovery report; a
        C{recovered: false} report resets the count to the server's
        position. Without C{resume} nothing changes.
        """
        await self.open_browser()
        await self.page(self.driver.get, f"http://127.0.0.1:{self.static.port}{PAGE_PATH}")
        out = await self.page(self.driver.execute_async_script, FAKE_SOCKET_JS)
        self.assertNotIn("error", out, out.get("error"))
        self.assertEqual(out["plainUrl"], "ws://proxy.test/a/ws/s1")
        self.assertEqual(
            out["urls"],
            [
                "ws://proxy.test/a/ws/s1?resume=",
                "ws://proxy.test/a/ws/s1?resume=e1%3A100-5",
                "ws://proxy.test/a/ws/s1?resume=",
            ],
        )
        self.assertEqual(
            out["got"],
            [
                "e1:1-1\nas is", "!not a control frame",  # resume off
                "three", "plain", [0, 1, 10, 255], "line 1\nline 2",
                "six", "seven", "new one", "old epoch", "again three",
            ],
        )
        self.assertEqual(out["positions"], ["e1:100-2", "e1:100-5", "e1:100-8", ""])
        self.assertEqual(
            [(r["recovered"], r["replayed"], r["position"], r["reason"]) for r in out["recoveries"]],
            [
                (True, 0, "e1:100-2", ""),
                (True, 2, "e1:100-7", ""),
                (False, 0, "e2:200-0", "the history started over (new epoch)"),
                (False, 0, "e3:300-2", "position beyond the end of the history"),
                (False, 0, None, "no history (expired or never written)"),
            ],
        )
        self.assertEqual(
            out["savedUrl"], "ws://proxy.test/a/ws/s1?access_token=t0k&resume=e1%3A100-9"
        )
        self.assertEqual(len(out["errors"]), 2)
        for message in out["errors"]:
            self.assertIn("position needs resume: true", message or "")


    async def test_client_labels_bookkeeping(self) -> None:
        """
        WsProxyClient with C{labels: true}, against a scripted WebSocket in
        the page: it asks for C{?labels=1}; the application gets each
        message without its header, with its topic (null for the session)
        and position; with C{resume} too, positions are kept per topic,
        each topic's repeats are dropped on their own, and every reconnect
        asks for C{resume_topic=T@<position>} for each topic with a
        position (URL-encoded); a topic's recovery reports (with its name)
        set its position as the session's do the session's.
        """
        await self.open_browser()
        await self.page(self.driver.get, f"http://127.0.0.1:{self.static.port}{PAGE_PATH}")
        out = await self.page(self.driver.execute_async_script, LABELS_JS)
        self.assertNotIn("error", out, out.get("error"))
        base = "ws://proxy.test/a/ws/s1"
        self.assertEqual(out["urls"], [
            f"{base}?labels=1",
            f"{base}?resume=&labels=1",
            f"{base}?resume=e1%3A100-3&labels=1&resume_topic=news%40b1%3A5-9"
            "&resume_topic=room-7%40c1%3A9-8",
            f"{base}?resume=e1%3A100-3&labels=1&resume_topic=news%40b1%3A5-10"
            "&resume_topic=room-7%40c2%3A1-1",
        ])
        self.assertEqual(out["got"], [
            ["to the session", None, None],
            ["to news\nline 2", "news", None],
            [[0, 10, 255], "room-7", None],
            ["session three", None, "e1:100-3"],
            ["news eight", "news", "b1:5-8"],
            ["room eight", "room-7", "c1:9-8"],
            ["plain on room-7", "room-7", None],
            [[1, 2], "news", "b1:5-9"],
            ["news ten", "news", "b1:5-10"],
            ["alert five", "alerts", "d1:1-5"],
            ["room new epoch", "room-7", "c2:1-1"],
        ])
        self.assertEqual(out["events"], [g[1] for g in out["got"]])
        self.assertEqual(out["liveTopics"], {})
        self.assertEqual(out["positions"], [
            ["e1:100-3", {"news": "b1:5-9", "room-7": "c1:9-8"}],
            ["e1:100-3", {"news": "b1:5-10", "room-7": "c2:1-1", "alerts": "d1:1-5"}],
        ])
        self.assertEqual(out["forgot"], [True, False])
        self.assertEqual(
            [(r["topic"], r["recovered"], r["replayed"], r["position"]) for r in out["recoveries"]],
            [
                (None, True, 0, "e1:100-2"), ("news", True, 0, "b1:5-7"),
                (None, True, 0, "e1:100-3"), ("news", True, 1, "b1:5-10"),
                ("alerts", True, 0, "d1:1-4"), ("room-7", False, 0, "c2:1-0"),
            ],
        )
        self.assertEqual(
            out["savedUrl"],
            f"{base}?resume=e1%3A100-9&labels=1&resume_topic=news%40b1%3A5-11",
        )
        self.assertEqual(len(out["errors"]), 3)
        for message in out["errors"][:1]:
            self.assertIn("topicPositions needs resume: true, labels: true", message or "")
        for message in out["errors"][1:]:
            self.assertIn("topicPositions needs topic names and positions", message or "")

    async def test_client_credentials_per_attempt(self) -> None:
        """
        WsProxyClient with C{getToken} or C{getTicket}, against a scripted
        WebSocket in the page: the callback is asked before every attempt
        (with the attempt number and the close code that led to it) and
        its answer is used for that attempt only: a token in the
        subprotocol (or C{?access_token=} with C{tokenIn: "query"}), a
        ticket as C{?ticket=} with no subprotocol; C{socketUrl} never shows
        either. A 3000 close reconnects at once; a second quick one in a row
        backs off, and any other close starts the count over. A callback
        that throws or rejects counts as an attempt that never opened, up to
        C{maxFailures}; C{close()} while a credential is on its way opens no
        socket; only one of C{token}, C{getToken} and C{getTicket} is taken.
        """
        await self.open_browser()
        await self.page(self.driver.get, f"http://127.0.0.1:{self.static.port}{PAGE_PATH}")
        out = await self.page(self.driver.execute_async_script, CREDENTIALS_JS)
        self.assertNotIn("error", out, out.get("error"))
        url = "ws://proxy.test/a/ws/s1"
        self.assertEqual(out["jwtUrl"], url)
        self.assertEqual(out["jwtSockets"], [[url, ["bearer", f"h.p{i}.s"]] for i in range(1, 7)])
        self.assertEqual(
            [(a["attempt"], a.get("code")) for a in out["jwtAsked"]],
            [(1, None), (2, 3000), (3, 3000), (4, 3000), (5, 1006), (6, 3000)],
        )
        codes = [d["code"] for d in out["jwtDelays"]]
        self.assertEqual(codes, [3000, 3000, 3000, 1006, 3000])
        delays = [d["delay"] for d in out["jwtDelays"]]
        self.assertEqual(delays[0], 0)  # the first expiry: at once
        for delay in delays[1:4]:  # quick again, and again; then a 1006
            self.assertTrue(20 <= delay <= 40, out["jwtDelays"])
        self.assertEqual(delays[4], 0)  # the count started over after the 1006
        self.assertEqual(out["queryUrl"], f"{url}?access_token=q.t.k")

        self.assertEqual(
            out["ticketSockets"],
            [[f"{url}?ticket=ticket-1-0123456789abcdef", None],
             [f"{url}?ticket=ticket-4-0123456789abcdef", None]],
        )
        self.assertEqual(
            [(d["code"], d["error"]) for d in out["ticketDelays"]],
            [(1001, None), (None, "getTicket failed: backend down"), (None, "getTicket failed: still down")],
        )
        self.assertEqual(out["ticketState"], "failed")
        self.assertEqual(out["slow"], {"state": "closed", "sockets": 9})
        errors = out["errors"]
        self.assertEqual(len(errors), 4, errors)
        self.assertIn("give one of token, getToken and getTicket", errors[0] or "")
        self.assertIn("give one of token, getToken and getTicket", errors[1] or "")
        self.assertIn("getToken must be a function", errors[2] or "")
        self.assertIn("are required", errors[3] or "")

    async def test_page_talks_reconnects_and_gives_up(self) -> None:
        """
        The example page connects with the token in the subprotocol, shows
        text and binary messages from the backend, sends what is typed
        byte-exact, reconnects by itself with the same token after a proxy
        restart (1001), and gives up visibly after its capped attempts once
        the token is gone.
        """
        started = time.monotonic()
        session, token = "browser-1", secrets.token_urlsafe(18)
        r = self.redis.client()
        r.set(f"session:{session}:auth", token, ex=60)

        daemon, port = await self.proxy_and_browser()
        # a query string that must be ignored: only the fragment configures the page
        page_url = await self.load_page(port, f"session={session}&token={token}&agent=browser-test",
                                        query="?session=wrong&token=wrong")

        # 1. connected with the token from the fragment; the TTL was reset
        snap = await self.until(lambda s: s["state"] == "open", "open")
        self.assertEqual(snap["reconnects"], 0)
        self.assertIn('subprotocol "bearer"', " ".join(self.bodies(snap, "event")))
        self.assertGreater(r.ttl(f"session:{session}:auth"), 60)

        # 2. backend -> page: a text and a binary message
        down = f"session:{session}:down"
        self.assertEqual(r.publish(down, "héllo from the backend ✓".encode()), 1)
        self.assertEqual(r.publish(down, b"\x00\x01\xfe\xff"), 1)
        snap = await self.until(
            lambda s: "héllo from the backend ✓" in self.bodies(s, "text")
            and "4 bytes: 00 01 fe ff" in self.bodies(s, "binary"),
            "showing the text and binary messages",
        )

        # 3. page -> backend, typed and sent with the button, byte-exact
        pubsub = r.pubsub(ignore_subscribe_messages=True)
        self.addCleanup(pubsub.close)
        pubsub.subscribe(f"session:{session}:up")
        typed = "héllo ✓ 你好"

        def type_and_send() -> None:
            box = self.driver.find_element(By.ID, "message")
            box.send_keys(typed)
            self.driver.find_element(By.ID, "send").click()

        await self.page(type_and_send)
        self.assertEqual(await self.page(self.up_message, pubsub, 10.0), typed.encode("utf-8"))
        snap = await self.until(lambda s: typed in self.bodies(s, "sent"), "logging the sent message")

        # 4. restart the proxy on the same port: the page gets 1001 and
        # reconnects by itself with the same token
        daemon = await self.restart_proxy(daemon, port)
        snap = await self.until(
            lambda s: s["state"] == "open" and s["reconnects"] == 1, "reconnected", timeout=20
        )
        self.assertTrue(
            any(body.startswith("1001 ") for body in self.bodies(snap, "event")),
            snap["log"],
        )
        self.assertEqual(r.publish(down, "after the restart".encode()), 1)
        snap = await self.until(
            lambda s: "after the restart" in self.bodies(s, "text"), "showing a message after the restart"
        )
        await self.save_screenshot("browser-reconnected.png")

        # 5. the token is gone and the proxy restarts: every attempt is
        # refused (403, which the page sees as 1006); it stops after
        # MAX_FAILURES attempts and says so
        r.delete(f"session:{session}:auth")
        daemon = await self.restart_proxy(daemon, port)
        snap = await self.until(lambda s: s["state"] == "failed", "failed", timeout=20)
        self.assertEqual(snap["failures"], MAX_FAILURES)
        self.assertEqual(snap["reconnects"], 1)
        self.assertIn("gave up after", snap["notice"])
        refusals = daemon.out.output.count(b"refused 403")
        self.assertGreaterEqual(refusals, 1, daemon.out.output)
        self.assertLessEqual(refusals, MAX_FAILURES)
        # and it really stopped: no attempt during twice the longest backoff
        await task.deferLater(reactor, 2 * MAX_BACKOFF_MS / 1000, lambda: None)
        self.assertEqual(daemon.out.output.count(b"refused 403"), refusals)
        later = await self.page(self.snapshot)
        self.assertEqual(later["state"], "failed")
        self.assertEqual(len(later["log"]), len(snap["log"]))

        # 6. what a person would see
        await self.save_screenshot("browser.png")

        # the backend authorizes again: the Connect button starts over
        r.set(f"session:{session}:auth", token, ex=60)
        await self.page(lambda: self.driver.find_element(By.ID, "toggle").click())
        snap = await self.until(lambda s: s["state"] == "open" and s["failures"] == 0, "open again")
        self.assertEqual(snap["notice"], "")

        # the ?access_token= form, asked for in the fragment (a new fragment
        # reloads the page)
        await self.page(self.driver.get, f"{page_url}&tokenIn=query")
        snap = await self.until(
            lambda s: s["state"] == "open" and s["reconnects"] == 0, "open with tokenIn=query"
        )
        target = await self.page(lambda: self.driver.find_element(By.ID, "target").text)
        self.assertIn("token via query", target)
        self.assertNotIn(token, target)
        self.assertEqual(r.publish(down, "via the query string"), 1)
        await self.until(lambda s: "via the query string" in self.bodies(s, "text"), "showing it")

        # Disconnect: a normal closure, and no reconnection after it
        await self.page(lambda: self.driver.find_element(By.ID, "toggle").click())
        snap = await self.until(lambda s: s["state"] == "closed", "closed by the page")
        await task.deferLater(reactor, 2 * MAX_BACKOFF_MS / 1000, lambda: None)
        later = await self.page(self.snapshot)
        self.assertEqual((later["state"], len(later["log"])), ("closed", len(snap["log"])))
        self.assertIn(b"code=1000", daemon.out.output)

        for d in self.daemons:
            self.assertNotIn(token.encode(), d.out.output)
        self.assertLess(time.monotonic() - started, 60)

    async def test_jwt_page_reconnects_with_a_fresh_token_when_it_expires(self) -> None:
        """
        The page with C{tokenUrl} (WsProxyClient's C{getToken}), against a
        proxy with C{AUTH_MODE=jwt} and C{JWT_EXPIRE_CONNECTIONS=true}: its
        backend signs a new JWT that expires a few seconds later for every
        attempt. When the token's exp passes the proxy closes with 3000
        "token expired"; the page asks for a new token and reconnects by
        itself at once, and messages published after that arrive. No token
        shows up in the proxy's output, the page or the browser's console.
        """
        session, agent = "browser-jwt", "browser-test"
        secret = secrets.token_urlsafe(32)
        issued: list[str] = []

        def fresh_token() -> str:
            token = sign_token(secret, session, agent_id=agent, expires_in=JWT_LIFETIME,
                               jti=secrets.token_hex(8))
            issued.append(token)
            return token

        self.static.routes["/ws-token"] = fresh_token
        r = self.redis.client()
        self.addCleanup(r.close)
        daemon, port = await self.proxy_and_browser(AUTH_MODE="jwt", JWT_SECRET=secret,
                                                    JWT_EXPIRE_CONNECTIONS="true")
        await self.load_page(port, f"session={session}&tokenUrl=/ws-token&agent={agent}")
        snap = await self.until(lambda s: s["state"] == "open", "open", timeout=20)
        self.assertEqual(snap["reconnects"], 0)
        self.assertIn('subprotocol "bearer"', " ".join(self.bodies(snap, "event")))
        target = await self.page(lambda: self.driver.find_element(By.ID, "target").text)
        self.assertIn("a fresh token per attempt via subprotocol", target)
        down = f"session:{session}:down"
        await self.delivered(r, down, "with the first token")
        await self.until(lambda s: "with the first token" in self.bodies(s, "text"), "showing it")

        # the token expires: 3000, and at once a new attempt with a new token
        def expired(s: dict[str, Any]) -> list[str]:
            return [b for b in self.bodies(s, "event") if b.startswith("3000 ")]

        snap = await self.until(
            lambda s: s["state"] == "open" and s["reconnects"] >= 1 and expired(s),
            "reconnected after the token expired", timeout=30,
        )
        self.assertEqual(expired(snap)[0], "3000 token expired; retrying in 0 ms", snap["log"])
        self.assertGreaterEqual(len(issued), 2)
        self.assertEqual(len(set(issued)), len(issued))
        self.assertIn(b"code=3000", daemon.out.output)

        await self.delivered(r, down, "after the fresh token")
        snap = await self.until(
            lambda s: "after the fresh token" in self.bodies(s, "text"), "showing a message after the reconnect"
        )
        self.assertEqual(snap["failures"], 0)
        self.assertEqual(self.bodies(snap, "error"), [])
        await self.save_screenshot("browser-jwt-renewed.png")

        console = str(await self.page(self.driver.get_log, "browser"))
        page_text = await self.page(lambda: self.driver.find_element(By.TAG_NAME, "body").text)
        for token in issued:
            for d in self.daemons:
                self.assertNotIn(token.encode(), d.out.output)
            self.assertNotIn(token, console)
            self.assertNotIn(token, page_text)

    async def test_ticket_page_reconnects_with_a_new_ticket(self) -> None:
        """
        The page with C{ticketUrl} (WsProxyClient's C{getTicket}): its
        backend issues a single-use ticket (C{Backend.issue_ticket}) for
        every attempt, and the session has no stored token at all. The page
        connects with C{?ticket=}, which the proxy consumes; when the
        backend closes the session (C{PUBLISH wsproxy:control}, code 4001)
        the page reconnects by itself with a new ticket (the first one is
        gone), never presenting a used one, and messages published after
        that arrive.
        """
        session = "browser-ticket"
        r = self.redis.client()
        self.addCleanup(r.close)
        backend = Backend(self.redis.client())
        self.addCleanup(backend.redis.close)
        tickets: list[str] = []

        def fresh_ticket() -> str:
            ticket = backend.issue_ticket(session, ttl=30)
            tickets.append(ticket)
            return ticket

        self.static.routes["/ws-ticket"] = fresh_ticket
        daemon, port = await self.proxy_and_browser()
        await self.load_page(port, f"session={session}&ticketUrl=/ws-ticket&agent=browser-test")
        snap = await self.until(lambda s: s["state"] == "open", "open", timeout=20)
        self.assertEqual(snap["reconnects"], 0)
        self.assertEqual(len(tickets), 1)
        self.assertEqual(r.exists(ticket_key(session, tickets[0])), 0)  # used up
        self.assertFalse(r.exists(f"session:{session}:auth"))
        target = await self.page(lambda: self.driver.find_element(By.ID, "target").text)
        self.assertIn("a new ticket per attempt via ?ticket=", target)
        down = f"session:{session}:down"
        await self.delivered(r, down, "with the first ticket")
        await self.until(lambda s: "with the first ticket" in self.bodies(s, "text"), "showing it")

        # the backend closes the session on every proxy process (which
        # listens on the control channel once its subscriber is ready)
        await wait_for(lambda: r.pubsub_numsub(CONTROL_CHANNEL)[0][1] >= 1, timeout=20)
        self.assertEqual(backend.close(session, 4001, "test drop"), 1)
        snap = await self.until(
            lambda s: s["state"] == "open" and s["reconnects"] == 1, "reconnected", timeout=30
        )
        self.assertTrue(
            any(body.startswith("4001 test drop; retrying in ") for body in self.bodies(snap, "event")),
            snap["log"],
        )
        self.assertEqual(len(tickets), 2, "one ticket per attempt, and one attempt was enough")
        self.assertNotEqual(tickets[0], tickets[1])
        self.assertEqual(r.exists(ticket_key(session, tickets[1])), 0)
        self.assertNotIn(b"refused 403", daemon.out.output)  # no ticket presented twice

        await self.delivered(r, down, "after the new ticket")
        snap = await self.until(
            lambda s: "after the new ticket" in self.bodies(s, "text"), "showing a message after the reconnect"
        )
        self.assertEqual(self.bodies(snap, "error"), [])
        console = str(await self.page(self.driver.get_log, "browser"))
        for ticket in tickets:
            self.assertNotIn(ticket.encode(), daemon.out.output)
            self.assertNotIn(ticket, console)

    async def test_resume_across_proxy_restart(self) -> None:
        """
        The page with C{resume=1}, against a proxy with C{RESUME=true}: a
        backend publishes a numbered stream of recoverable messages every
        20 ms; the proxy is restarted (SIGTERM, a new process on the same
        port) in the middle of it. The page reconnects with its last
        position, says the session was recovered with the missed messages
        replayed, goes on with live ones, and ends with every number
        exactly once, in order.
        """
        session, token = "browser-resume", secrets.token_urlsafe(18)
        r = self.redis.client()
        self.addCleanup(r.close)
        r.set(f"session:{session}:auth", token, ex=120)

        daemon, port = await self.proxy_and_browser(RESUME="true")
        # the proxy loads wsproxy_publish into Redis; the backend needs it
        await wait_for(lambda: b"wsproxy" in str(r.function_list()).encode(), timeout=20)

        # a margin for a slow restart on a busy machine: 30 failed attempts
        # (about 25 s at 1 s apart) before the page would give up
        await self.load_page(port, f"session={session}&token={token}&agent=browser-test&resume=1",
                             max_failures=30)
        # subscribed: the proxy said where the (empty) history stands
        snap = await self.until(
            lambda s: s["state"] == "open" and s["recovered"] == "true", "open and recovered"
        )
        self.assertEqual(self.labelled(snap, "recovery"), ["recovered: 0 missed messages replayed"])

        def numbers(s: dict[str, Any]) -> list[str]:
            return self.bodies(s, "text")

        backend = self.redis.client()
        self.addCleanup(backend.close)
        stream = NumberedStream(backend, session, STREAM_INTERVAL, STREAM_LIMIT)
        self.addCleanup(stream.stop)
        stream.start()
        await self.until(lambda s: len(numbers(s)) >= 40, "showing the first 40 numbers", timeout=20)

        # the restart, with the stream going on
        daemon = await self.restart_proxy(daemon, port, RESUME="true")
        snap = await self.until(
            lambda s: s["state"] == "open" and s["reconnects"] == 1
            and len(self.labelled(s, "recovery")) == 2,
            "reconnected and told how recovery went", timeout=30,
        )
        self.assertTrue(any(body.startswith("1001 ") for body in self.bodies(snap, "event")), snap["log"])
        self.assertEqual(snap["recovered"], "true", snap["log"])
        report = self.labelled(snap, "recovery")[1]
        replayed = re.fullmatch(r"recovered: (\d+) missed messages? replayed", report)
        assert replayed is not None, report
        # the page was away for at least the restart: messages were missed
        self.assertGreater(int(replayed.group(1)), 0, report)

        # live messages after the resume, then the backend stops
        wanted = min(stream.count + 50, STREAM_LIMIT)
        await self.until(lambda s: len(numbers(s)) >= wanted, f"showing {wanted} numbers", timeout=30)
        await threads.deferToThread(stream.stop)
        self.assertIsNone(stream.error)
        total = stream.count

        snap = await self.until(
            lambda s: str(total) in numbers(s), f"showing the last number ({total})", timeout=20
        )
        got = numbers(snap)
        events = [e for e in snap["log"] if e["kind"] != "text"]
        self.assertEqual(got, [str(i) for i in range(1, total + 1)], events)
        self.assertEqual(len(self.labelled(snap, "recovery")), 2)
        self.assertEqual(snap["notice"], "")
        self.assertEqual(self.bodies(snap, "error"), [])
        await self.save_screenshot("browser-resumed.png")
        for d in self.daemons:
            self.assertNotIn(token.encode(), d.out.output)

    async def test_topics_resume_across_proxy_restart(self) -> None:
        """
        WsProxyClient with C{labels: true, resume: true} against a proxy
        with C{TOPICS=true} and C{RESUME=true}, the session authorized in
        topic C{news} (C{Backend.authorize(topics=)}): it gets the topic's
        plain and recoverable messages with their topic and positions, and
        the session's own with topic null. The proxy is stopped and
        recoverable topic messages are published while it is down; started
        again, the client reconnects with C{resume_topic=news@<last
        position>} and gets exactly the missed ones, once each, in order,
        then live ones. A topic joined while connected (C{join_topics})
        reports its recovery and delivers at once. The example page with
        C{labels=1} shows a topic's messages under C{#news}.
        """
        session, token = "browser-topics", secrets.token_urlsafe(18)
        backend = Backend(self.redis.client())
        self.addCleanup(backend.redis.close)
        backend.authorize(session, token, ttl=120, topics=["news"])
        env = {"RESUME": "true", "TOPICS": "true"}
        daemon, port = await self.proxy_and_browser(**env)
        await wait_for(lambda: b"wsproxy" in str(backend.redis.function_list()).encode(),
                       timeout=20)
        await self.page(self.driver.get, f"http://127.0.0.1:{self.static.port}{PAGE_PATH}")
        started = await self.page(self.driver.execute_async_script, TOPIC_CLIENT_JS,
                                  f"ws://127.0.0.1:{port}", session, token)
        self.assertEqual(started, "started")

        async def out() -> dict[str, Any]:
            return await self.page(self.driver.execute_script, "return window.topicOut;")  # type: ignore[no-any-return]

        async def until(condition: Callable[[dict[str, Any]], Any], what: str,
                        timeout: float = 20.0) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while True:
                state = await out()
                if condition(state):
                    return state
                if time.monotonic() > deadline:
                    logs = await self.page(self.driver.get_log, "browser")
                    proxies = "\n---\n".join(d.log for d in self.daemons)
                    self.fail(f"not {what} within {timeout}s: {state}\nconsole: {logs}\n"
                              f"proxy output:\n{proxies}")
                await task.deferLater(reactor, 0.1, lambda: None)

        def topic_reports(state: dict[str, Any], topic: str) -> list[dict[str, Any]]:
            return [r for r in state["recoveries"] if r.get("topic") == topic]

        state = await until(lambda s: s["opens"] == 1 and topic_reports(s, "news"),
                            "open and told where news stands")
        self.assertIn("labels=1", state["urls"][0])
        self.assertNotIn("resume_topic", state["urls"][0])
        first = topic_reports(state, "news")[0]
        self.assertEqual((first["recovered"], first["replayed"]), (True, 0), first)

        # live: recoverable and plain on the topic, and to the session
        positions = [backend.publish_topic_recoverable("news", f"news {i}") for i in (1, 2)]
        await wait_for(lambda: backend.publish_topic("news", "plain news") == 1, timeout=10)
        backend.publish(session, "to the session")
        state = await until(lambda s: len(s["got"]) >= 4, "showing 4 messages")
        self.assertEqual(state["got"], [
            ["news", "news 1", positions[0]], ["news", "news 2", positions[1]],
            ["news", "plain news", None], [None, "to the session", None],
        ])

        # the proxy goes away; recoverable messages are published meanwhile
        daemon.signal(signal.SIGTERM)
        self.assertEqual(await daemon.out.ended, 0, daemon.log)
        missed = [backend.publish_topic_recoverable("news", f"missed {i}") for i in (1, 2, 3)]
        daemon = self.start_proxy(port, **env)
        self.assertEqual(await daemon.port(), port)
        state = await until(lambda s: s["opens"] == 2 and len(topic_reports(s, "news")) == 2,
                            "reconnected and told how news was recovered", timeout=30)
        resumed = [u for u in state["urls"] if "resume_topic=" in u]
        self.assertTrue(resumed, state["urls"])
        self.assertIn(f"resume_topic=news%40{positions[1].replace(':', '%3A')}", resumed[-1])
        report = topic_reports(state, "news")[1]
        self.assertEqual((report["recovered"], report["replayed"], report["position"]),
                         (True, 3, missed[-1]), report)
        after = backend.publish_topic_recoverable("news", "after")
        state = await until(lambda s: ["news", "after", after] in s["got"], "showing a live one")
        self.assertEqual(state["got"][4:], [
            ["news", "missed 1", missed[0]], ["news", "missed 2", missed[1]],
            ["news", "missed 3", missed[2]], ["news", "after", after],
        ])

        # joined while connected: a recovery report, then its messages
        self.assertEqual(backend.join_topics(session, "late"), 1)
        state = await until(lambda s: topic_reports(s, "late"), "told about the new topic")
        self.assertEqual(topic_reports(state, "late")[0]["replayed"], 0)
        late = backend.publish_topic_recoverable("late", "late one")
        state = await until(lambda s: ["late", "late one", late] in s["got"], "showing it")
        texts = [g[1] for g in state["got"]]
        self.assertEqual(len(texts), len(set(texts)), state["got"])  # none twice
        self.assertEqual(self.bodies_errors(await self.page(self.driver.get_log, "browser")), [])

        # the example page, labelled
        await self.load_page(port, f"session={session}&token={token}&agent=browser-test"
                                   "&resume=1&labels=1")
        await self.until(lambda s: s["state"] == "open" and "recovery #news" in
                         [e["label"] for e in s["log"]], "open with news recovered")
        backend.publish_topic_recoverable("news", "on the page")
        backend.publish(session, "session on the page")
        await self.until(
            lambda s: "on the page" in self.labelled(s, "#news")
            and "session on the page" in self.labelled(s, "text"),
            "showing the labelled messages")
        await self.save_screenshot("browser-topics.png")
        for d in self.daemons:
            self.assertNotIn(token.encode(), d.out.output)

    @staticmethod
    def bodies_errors(console: list[dict[str, Any]]) -> list[str]:
        """
        The client module's own warnings in the console (they start with
        "wsproxy: "; failed connection attempts are the browser's).
        """
        return [e["message"] for e in console
                if e.get("level") in ("WARNING", "SEVERE") and "wsproxy: " in e["message"]]

    async def test_acked_messages_across_proxy_restart(self) -> None:
        """
        WsProxyClient with C{ack: true} against a proxy with
        C{UPSTREAM=stream}: 400 numbered messages, one every 10 ms, with the
        proxy restarted (SIGTERM, a new process on the same port) in the
        middle. The client keeps what was not acknowledged and sends it
        again with the same id after reconnecting: in the end nothing is
        waiting, and every id is in the session's partition stream (copies
        allowed: backends drop them by id).
        """
        session, token, total = "browser-ack", secrets.token_urlsafe(18), 400
        r = self.redis.client()
        self.addCleanup(r.close)
        r.set(f"session:{session}:auth", token, ex=120)
        daemon, port = await self.proxy_and_browser(UPSTREAM="stream")
        await self.page(self.driver.get, f"http://127.0.0.1:{self.static.port}{PAGE_PATH}")
        started = await self.page(self.driver.execute_async_script, ACK_SENDER_JS,
                                  f"ws://127.0.0.1:{port}", session, token, total)
        self.assertEqual(started, "started")

        async def out() -> dict[str, Any]:
            return await self.page(self.driver.execute_script, "return window.ackOut;")  # type: ignore[no-any-return]

        deadline = time.monotonic() + 30
        while (await out())["acks"] < 100:
            self.assertLess(time.monotonic(), deadline, await out())
            await task.deferLater(reactor, 0.05, lambda: None)
        try:
            daemon = await self.restart_proxy(daemon, port, UPSTREAM="stream")
        except AssertionError as e:
            outputs = "\n---\n".join(d.out.output.decode(errors="replace") for d in self.daemons)
            self.fail(f"{e}\nproxy output:\n{outputs}")
        deadline = time.monotonic() + 60
        while True:
            state = await out()
            if state["sent"] == total and state["unacked"] == 0 and state["opens"] >= 2:
                break
            self.assertLess(time.monotonic(), deadline, state)
            await task.deferLater(reactor, 0.1, lambda: None)
        key = f"wsproxy:up:{{p{zlib.crc32(session.encode()) % 16}}}"
        stored = [fields[b"id"].decode() for _, fields in r.xrange(key)]
        self.assertEqual(set(stored), {f"n{i}" for i in range(total)})
        self.assertGreaterEqual(state["acks"], total)
        for d in self.daemons:
            self.assertNotIn(token.encode(), d.out.output)
