// @wsproxy/client: a dependency-free client for wsproxy (an ES module), for
// browsers and Node (22+, or 20/21 with --experimental-websocket, or any
// WebSocket class given as the WebSocket option).
//
//   import { WsProxyClient } from "@wsproxy/client";
//
//   const client = new WsProxyClient({
//     url: "wss://proxy.example.com",   // the proxy's base URL, no path
//     agent: "app", session: sessionId, token,
//     // or, for JWTs and connect tickets, fresh ones per attempt (see below):
//     // getToken: async () => (await fetch("/ws-token", { method: "POST" })).text(),
//     // getTicket: async () => (await fetch("/ws-ticket", { method: "POST" })).text(),
//   });
//   client.onmessage = (data, isBinary) => { ... };   // string, or ArrayBuffer if isBinary
//   client.onstatechange = (state, detail) => { ... };
//   client.connect();
//   client.send("hello");                             // false if not connected right now
//   client.close();                                   // normal closure, no reconnect
//
// The token travels as the subprotocol pair ["bearer", token] (the server
// answers "bearer"), or as ?access_token= with tokenIn: "query" (the token
// then ends up in URLs and proxy logs along the way: prefer the subprotocol).
//
// Reconnection. wsproxy resets the token's TTL on every successful connect,
// so the same token keeps working for a reconnecting client: after any close
// other than a normal closure (1000) or close() - an abnormal close (1006), a
// server restart (1001 "going away"), 1011, ... - the client reconnects with
// the same token after an exponential backoff with jitter (backoffMs doubling
// up to maxBackoffMs; each delay is drawn from [d/2, d]).
//
// Fresh credentials per attempt (for AUTH_MODE=jwt and connect tickets).
// Instead of a static token, give one of:
//
//   getToken: async ({ attempt, code }) => jwt,      // sent as the token above
//   getTicket: async ({ attempt, code }) => ticket,  // sent as ?ticket=<ticket>
//
// It is called before every attempt, the first one and every reconnect
// (attempt: this.attempts; code: the close code that ended the last
// connection or attempt, undefined after connect()), and must resolve to
// a non-empty string; the client keeps no credential between attempts.
// - getToken: the token travels as with token (tokenIn), so under
//   tokenIn: "subprotocol" it must be an HTTP token (JWTs are). Return a
//   token that is valid now: cached ones are fine until their exp.
// - getTicket: a single-use ticket (the backend's Backend.issue_ticket,
//   session:{id}:ticket:<ticket> with a short TTL); the proxy consumes it
//   with the first attempt that reaches it, so every attempt needs a new
//   one. No token is sent with it (the proxy refuses two credentials).
// - A callback that throws, rejects, returns no string, or has not
//   resolved within connectTimeoutMs counts as an attempt that never
//   opened (see maxFailures below); under tokenIn: "subprotocol", a token
//   that cannot travel there ends the client at once ("failed").
// - Close 3000 ("token expired": the proxy has JWT_EXPIRE_CONNECTIONS=true
//   and the token's exp passed): the client asks getToken again and
//   reconnects at once (delay 0), without counting it against the backoff.
//   So that a callback that keeps handing out tokens about to expire cannot
//   make it spin, only the first of consecutive 3000 closes of connections
//   open less than stableMs is immediate; the following ones wait the usual
//   backoff. With a static token, 3000 is a close like any other.
// The client never logs, shows or keeps a token or ticket (socketUrl has
// none of them with a callback); only the callbacks' error messages end up
// in the state detail (detail.error).
//
// A browser cannot see why a handshake failed: a 401/403 (token unknown,
// expired or wrong, Origin refused) looks exactly like an unreachable proxy,
// close code 1006. So the client counts consecutive attempts that never
// reached "open" and gives up after maxFailures of them (state "failed").
// Choose maxFailures so the attempts outlast a proxy restart: the defaults
// (10 attempts, 0.5 s doubling to 30 s) keep trying for one to two minutes.
//
// States: "connecting" (an attempt is under way), "open", "reconnecting"
// (waiting detail.delay ms before the next attempt), "closed" (normal
// closure, by close() or by the server: final), "failed" (gave up: final).
// connect() starts over from "closed" or "failed".
//
// Resumable sessions (opt-in: resume: true; the proxy needs RESUME=true, or
// every attempt is refused with 400 and ends as "failed"). The client asks
// for ?resume=<last position received> on every attempt, so that messages
// the backend published with wsproxy_publish while it was away (a proxy
// restart, a network drop) are replayed on reconnect, once each and in order.
//
//   const client = new WsProxyClient({ ..., resume: true });
//   client.onrecovery = ({ recovered, replayed, position, reason }) => { ... };
//
// - onmessage gets the message only, as without resume: the "<position>\n"
//   prefix is taken off (text stays a string, binary an ArrayBuffer).
// - onrecovery (and a "recovery" event) follows each open and tells whether
//   everything missed was replayed: recovered true (replayed = how many
//   messages follow), or false with a reason (the history expired, started
//   over or no longer reaches back that far; also later, if a gap cannot be
//   filled): messages were lost, reload the application's state.
// - A recoverable message whose sequence number is not after the last one
//   delivered (same epoch) is dropped: never delivered twice. (After a
//   recovered: false, counting goes on from the position the server gives.)
//   Messages a backend sent with a plain PUBLISH have no position and pass
//   unchanged.
// - The last position lives in this object only (client.position), across
//   reconnects and connect() after close(); a new page starts fresh. An
//   application that saves its state (sessionStorage, IndexedDB) can save
//   client.position with it, in the same step, and pass it back as the
//   position option: a position saved apart from the state it belongs to
//   would skip or repeat messages after a reload.
//
// Acknowledged messages (opt-in: ack: true; the proxy needs UPSTREAM=stream,
// or every attempt is refused with 400 and ends as "failed"). The client asks
// for ?ack=1; each message it sends carries an id ("<id>\n<message>" on the
// wire) and stays in client.unacked until the proxy says Redis stored it:
//
//   const client = new WsProxyClient({ ..., ack: true });
//   const id = client.send("hello");        // the message id (or send(data, id))
//   client.onack = ({ id, position }) => { ... };    // stored: position = entry id
//   client.onnack = ({ id, reason }) => { ... };     // not stored (yet): sent again
//
// - send() queues the message even while not connected and returns its id
//   (a random prefix and a counter unless given: 1-64 of [A-Za-z0-9._~:-]);
//   Blobs cannot be sent this way (ArrayBuffers and typed arrays can).
// - After every (re)connect, every unacknowledged message is sent again, in
//   the order first sent, with the same id; after a nack it is sent again
//   nackRetryMs later. Backends drop the copies by id (docs/guide/durable-upstream.md's recipe):
//   delivery to the backend is at least once, and in order except for
//   messages sent again.
// - At most maxUnacked messages wait; beyond that send() returns false.
// - Messages from the backend arrive as "\n<message>" (the same envelope as
//   resume); onmessage gets the message only.
//
// Topics, labelled (opt-in: labels: true; the proxy needs TOPICS=true, or
// every attempt is refused with 400 and ends as "failed"). A session may be
// in topics (group channels its backend joins it to); without labels a
// topic's messages arrive like the session's own, indistinguishable. With
// labels the client asks for ?labels=1 and every message says where it
// came from:
//
//   const client = new WsProxyClient({ ..., labels: true, resume: true });
//   client.onmessage = (data, { topic, position, isBinary }) => { ... };
//   client.onrecovery = ({ topic, recovered, replayed, position, reason }) => { ... };
//
// - onmessage's second argument is then an object, not isBinary: topic is
//   the topic's name, or null for a message to the session itself;
//   position is the message's position (recoverable messages, with resume)
//   or null; isBinary as before. (Without labels: onmessage(data, isBinary),
//   unchanged.) The "message" event's detail has the same fields and data.
// - On the wire each frame is "<header>\n<message>", the header being empty
//   (the session), "<position>" (a recoverable session message), "#T" (on
//   topic T) or "#T <position>" (a recoverable message on topic T); the
//   client takes it off.
// - With resume too, positions are kept per topic (client.topicPositions,
//   {topic: position}) besides the session's (client.position), and each
//   reconnect asks for ?resume_topic=T@<position> for every topic with a
//   position; the proxy replays what each topic missed. A topic the client
//   has no position for starts live (from the end of its history).
// - Each topic has its own recovery report, with its name in topic (the
//   session's has topic null): after the session's at each open, when the
//   backend joins the session to a topic while connected (nothing
//   replayed), and whenever a topic's gap could not be filled (recovered
//   false: that topic's messages were lost). They update the topic's
//   position as the session's reports do the session's.
// - The duplicate safeguard is per topic: a topic message whose sequence
//   number is not after the last one delivered on that topic (same epoch)
//   is dropped.
// - Saved state: pass topicPositions back as an option, beside position
//   (needs resume and labels). forgetTopic(T) drops a topic's position (the
//   session left it: it is not asked for again).
//
// Transports. Each attempt is carried by a transport: by default the one
// WebSocket transport (webSocketTransport(), with the global WebSocket, or
// the class given as the WebSocket option). transports: [a, b, ...] gives
// an ordered list instead: the client stays with the transport that opened
// last, and after an attempt that never opened (or whose transport could
// not even start) it uses the next one in the list for the following
// attempt, round the list. Everything else (credentials, backoff, resume,
// acks, labels) is the client's and works the same over any transport.
//
// A transport is { name, open(target, events) }:
// - target: { url, protocols }: the WebSocket URL of the attempt with its
//   query (?access_token=, ?ticket=, ?resume=, ?labels=1, ?ack=1, ...), and
//   ["bearer", token] when the token travels as the subprotocol (else
//   undefined). A transport that cannot send subprotocols sends that token
//   its own way (an Authorization header).
// - events: call events.open(protocol) once the connection is open,
//   events.message(data) for each frame (a string for text, an ArrayBuffer
//   for binary) and events.close({ code, reason, wasClean }) once at the
//   end, also when the attempt never opened (1006); never synchronously
//   from open().
// - open() returns the connection: { send(data) (a string or an
//   ArrayBuffer), close(code, reason), isOpen() }; it may throw if the
//   transport cannot start here (no WebSocket class, a malformed URL).

const TOKEN_CHARS = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/; // an HTTP token (RFC 9110)
// <epoch>:<ms>-<seq>, as wsproxy writes it
const POSITION = /^([0-9a-f]{1,32}):([0-9]{1,19})-([0-9]{1,19})$/;
const DECODER = new TextDecoder();
const TOKEN_EXPIRED = 3000; // JWT_EXPIRE_CONNECTIONS: the token's exp passed
const SUBPROTOCOL_TOKEN_HELP =
  "only letters, digits and !#$%&'*+-.^_`|~; use hex, base64url or JWT tokens, or tokenIn: \"query\"";

/** {text, epoch, seq} (seq a BigInt: up to 19 digits), or null if malformed. */
function parsePosition(text) {
  const match = POSITION.exec(text);
  return match ? { text, epoch: match[1], seq: BigInt(match[3]) } : null;
}

export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
  FAILED: "failed",
});

const DEFAULTS = {
  agent: "app",
  tokenIn: "subprotocol", // or "query"
  backoffMs: 500,
  maxBackoffMs: 30000,
  maxFailures: 10, // consecutive attempts that never opened
  connectTimeoutMs: 10000, // an attempt not open by then counts as failed
  stableMs: 10000, // a connection open this long resets the backoff
  resume: false, // resumable session: ?resume=<last position>, see above
  position: "", // with resume: the position to resume from at the first connect
  ack: false, // acknowledged messages: ?ack=1, see above
  labels: false, // topics: ?labels=1, every message says its topic; see above
  topicPositions: null, // with resume and labels: {topic: position} to resume from at the first connect
  nackRetryMs: 1000, // with ack: how long after a nack the message is sent again
  maxUnacked: 10000, // with ack: messages waiting for their ack at most
  WebSocket: null, // the WebSocket class of the default transport (null: the global one)
  transports: null, // [transport, ...] in order of preference (null: [webSocketTransport()])
};

/**
 * The WebSocket transport (see "Transports" above): the global WebSocket at
 * each attempt, or the class given (Node's undici, the ws package, ...).
 */
export function webSocketTransport({ WebSocket: Socket = null } = {}) {
  return {
    name: "websocket",
    open({ url, protocols }, events) {
      const Impl = Socket || globalThis.WebSocket;
      if (typeof Impl !== "function") {
        throw new Error("no WebSocket class here: use Node 22+, node --experimental-websocket (Node 20, 21), or the WebSocket option");
      }
      const ws = protocols ? new Impl(url, protocols) : new Impl(url);
      const OPEN = Impl.OPEN ?? 1;
      let opened = false;
      let ended = false;
      let fallback = null;
      const end = (info) => {
        clearTimeout(fallback);
        if (ended) return;
        ended = true;
        events.close(info);
      };
      const abnormal = { code: 1006, reason: "", wasClean: false };
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        opened = true;
        events.open(ws.protocol);
      };
      ws.onmessage = (event) => events.message(event.data);
      // The error event says nothing useful. Browsers follow it with a close
      // event (1006 before the open); Node 20's WebSocket, after a refused
      // handshake, does not: so an error before the open ends the attempt
      // (1006), and one after it does if no close event follows soon.
      ws.onerror = () => {
        if (!opened) end(abnormal);
        else if (!ended && fallback === null) fallback = setTimeout(() => end(abnormal), 1000);
      };
      ws.onclose = (event) => end({ code: event.code, reason: event.reason, wasClean: event.wasClean });
      return {
        send: (data) => ws.send(data),
        close: (code, reason) => (code === undefined ? ws.close() : ws.close(code, reason)),
        isOpen: () => ws.readyState === OPEN,
      };
    },
  };
}

const MESSAGE_ID = /^[A-Za-z0-9._~:-]{1,64}$/;
const TOPIC = /^[A-Za-z0-9._~-]{1,128}$/; // a topic name: the session-id rule
const ENCODER = new TextEncoder();

export class WsProxyClient extends EventTarget {
  constructor(options) {
    super();
    const o = { ...DEFAULTS, ...options };
    const given = [o.token, o.getToken, o.getTicket].filter(Boolean).length;
    if (!o.url || !o.session || given === 0) {
      throw new Error("WsProxyClient: url, session and token (or getToken, or getTicket) are required");
    }
    if (given > 1) {
      throw new Error("WsProxyClient: give one of token, getToken and getTicket (the proxy refuses two credentials)");
    }
    for (const name of ["getToken", "getTicket"]) {
      if (o[name] && typeof o[name] !== "function") {
        throw new Error(`WsProxyClient: ${name} must be a function returning a string or a promise of one`);
      }
    }
    if (o.tokenIn !== "subprotocol" && o.tokenIn !== "query") {
      throw new Error(`WsProxyClient: tokenIn must be "subprotocol" or "query", not ${o.tokenIn}`);
    }
    if (o.token && o.tokenIn === "subprotocol" && !TOKEN_CHARS.test(o.token)) {
      throw new Error(`WsProxyClient: this token cannot travel as a subprotocol (${SUBPROTOCOL_TOKEN_HELP})`);
    }
    let last = null;
    if (o.position) {
      last = parsePosition(String(o.position));
      if (!o.resume || !last) {
        throw new Error(`WsProxyClient: position needs resume: true and the form <epoch>:<ms>-<seq>, not ${o.position}`);
      }
    }
    const topicLast = new Map();
    if (o.topicPositions) {
      if (!o.resume || !o.labels || typeof o.topicPositions !== "object") {
        throw new Error("WsProxyClient: topicPositions needs resume: true, labels: true and an object {topic: position}");
      }
      for (const [topic, text] of Object.entries(o.topicPositions)) {
        const p = parsePosition(String(text));
        if (!TOPIC.test(topic) || !p) {
          throw new Error(`WsProxyClient: topicPositions needs topic names and positions <epoch>:<ms>-<seq>, not ${topic}: ${text}`);
        }
        topicLast.set(topic, p);
      }
    }
    const transports = o.transports || [webSocketTransport({ WebSocket: o.WebSocket })];
    if (!Array.isArray(transports) || !transports.length || !transports.every((t) => t && typeof t.open === "function")) {
      throw new Error("WsProxyClient: transports must be a non-empty array of { name, open(target, events) }");
    }
    this.options = o;
    this._transports = transports;
    this._transportIndex = 0; // the transport of the next attempt
    this.state = State.CLOSED;
    this.reconnects = 0; // successful opens after the first one
    this.attempts = 0; // connection attempts made
    this.failures = 0; // consecutive attempts that never reached open
    this.onmessage = null; // (data, isBinary) => void; with labels (data, {topic, position, isBinary})
    this.onstatechange = null; // (state, detail) => void
    this.onrecovery = null; // ({recovered, replayed, position, reason}) => void, with resume (and topic, with labels)
    this._last = last; // the last recoverable message delivered: {text, epoch, seq}
    this._topicLast = topicLast; // with labels and resume: topic -> the same, per topic
    this._conn = null; // the current attempt's connection (from its transport)
    this._timer = null;
    this._stopped = true;
    this._everOpened = false;
    this._backoffStep = 0;
    this._run = 0; // the current attempt's number: a late credential of an older one is dropped
    this._quickExpiries = 0; // consecutive 3000 closes of connections open less than stableMs
    this.onack = null; // ({id, position}) => void, with ack
    this.onnack = null; // ({id, reason}) => void, with ack
    this._unacked = new Map(); // id -> data, in the order first sent
    this._idPrefix = Math.random().toString(36).slice(2, 10);
    this._nextId = 0;
  }

  /** With ack: the ids of the messages not acknowledged yet, oldest first. */
  get unacked() {
    return Array.from(this._unacked.keys());
  }

  /** The name of the transport the current or next attempt uses ("websocket"). */
  get transport() {
    const t = this._transports[this._transportIndex];
    return t.name || String(this._transportIndex);
  }

  /**
   * The WebSocket URL (without the token unless a static token goes in the
   * query; never with a token or ticket from getToken or getTicket).
   */
  get socketUrl() {
    return this._socketUrl(this.options.token ? { token: this.options.token } : {});
  }

  // the URL with these credentials: {token} (in the query if tokenIn says
  // so) or {ticket}
  _socketUrl({ token, ticket }) {
    const o = this.options;
    const base = String(o.url).replace(/\/+$/, "");
    const url = `${base}/${encodeURIComponent(o.agent)}/ws/${encodeURIComponent(o.session)}`;
    const query = [];
    if (token && o.tokenIn === "query") query.push(`access_token=${encodeURIComponent(token)}`);
    if (ticket) query.push(`ticket=${encodeURIComponent(ticket)}`);
    if (o.resume) query.push(`resume=${encodeURIComponent(this.position)}`);
    if (o.labels) query.push("labels=1");
    if (o.resume && o.labels) {
      for (const [topic, last] of this._topicLast) {
        query.push(`resume_topic=${encodeURIComponent(`${topic}@${last.text}`)}`);
      }
    }
    if (o.ack) query.push("ack=1");
    return query.length ? `${url}?${query.join("&")}` : url;
  }

  /** With resume: the last position received ("" before the first). */
  get position() {
    return this._last ? this._last.text : "";
  }

  /** With resume and labels: {topic: the last position received on it}. */
  get topicPositions() {
    const out = {};
    for (const [topic, last] of this._topicLast) out[topic] = last.text;
    return out;
  }

  /**
   * With resume and labels: forget a topic's position (the session left
   * the topic), so that reconnects no longer ask to resume it.
   */
  forgetTopic(topic) {
    return this._topicLast.delete(String(topic));
  }

  /** Start connecting (again, after "closed" or "failed"). */
  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    this.failures = 0;
    this._backoffStep = 0;
    this._quickExpiries = 0;
    this._transportIndex = 0;
    this._attempt(undefined);
    return this;
  }

  /**
   * Send a string, ArrayBuffer, typed array or Blob; false if not open.
   * With ack: queue it (also while not connected) and return its id, or
   * false if maxUnacked messages are waiting already.
   */
  send(data, id) {
    if (this.options.ack) return this._sendAcked(data, id);
    if (!this._conn || !this._conn.isOpen()) return false;
    this._conn.send(data);
    return true;
  }

  _sendAcked(data, id) {
    if (id === undefined) id = `${this._idPrefix}-${this._nextId++}`;
    id = String(id);
    if (!MESSAGE_ID.test(id)) throw new Error(`WsProxyClient: invalid message id ${id}`);
    if (typeof Blob !== "undefined" && data instanceof Blob) {
      throw new Error("WsProxyClient: with ack, send a string, ArrayBuffer or typed array");
    }
    if (this._unacked.size >= this.options.maxUnacked && !this._unacked.has(id)) return false;
    this._unacked.set(id, data);
    this._transmit(id);
    return id;
  }

  // one unacknowledged message on the wire, if connected: "<id>\n<message>"
  _transmit(id) {
    const conn = this._conn;
    if (!conn || !conn.isOpen() || !this._unacked.has(id)) return;
    const data = this._unacked.get(id);
    if (typeof data === "string") {
      conn.send(`${id}\n${data}`);
      return;
    }
    const head = ENCODER.encode(`${id}\n`);
    const body = ArrayBuffer.isView(data)
      ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
      : new Uint8Array(data);
    const frame = new Uint8Array(head.length + body.length);
    frame.set(head);
    frame.set(body, head.length);
    conn.send(frame.buffer);
  }

  /** Close normally and stop reconnecting. */
  close(code = 1000, reason = "") {
    this._stopped = true;
    this._run += 1; // an attempt waiting for its credential is dropped
    clearTimeout(this._timer);
    this._timer = null;
    if (this._conn) {
      this._conn.close(code, reason); // its close event reports "closed"
    } else if (this.state !== State.CLOSED) {
      this._setState(State.CLOSED, { code, reason, byClient: true });
    }
  }

  // One attempt: with getToken or getTicket, ask for a fresh credential
  // first (code: the close code that led here), then open the socket.
  _attempt(code) {
    this._timer = null;
    this.attempts += 1;
    const o = this.options;
    const fetcher = o.getToken || o.getTicket;
    if (!fetcher) {
      this._open({ token: o.token }, 0);
      return;
    }
    const run = ++this._run;
    const started = Date.now();
    this._setState(State.CONNECTING, { attempt: this.attempts, url: o.url });
    let timedOut = false;
    const deadline = setTimeout(() => {
      timedOut = true;
      if (run === this._run && !this._stopped) {
        this._notOpened({ error: `${o.getToken ? "getToken" : "getTicket"} did not answer within ${o.connectTimeoutMs} ms` });
      }
    }, o.connectTimeoutMs);
    let pending;
    try {
      pending = Promise.resolve(fetcher.call(null, { attempt: this.attempts, code }));
    } catch (err) {
      pending = Promise.reject(err);
    }
    pending.then(
      (value) => {
        clearTimeout(deadline);
        if (timedOut || run !== this._run || this._stopped) return; // closed, or given up on
        if (typeof value !== "string" || !value) {
          this._notOpened({ error: `${o.getToken ? "getToken" : "getTicket"} gave no string` });
        } else if (o.getToken && o.tokenIn === "subprotocol" && !TOKEN_CHARS.test(value)) {
          this._stopped = true;
          this._setState(State.FAILED, {
            error: "getToken gave a token that cannot travel as a subprotocol",
            message: `getToken gave a token that cannot travel as a subprotocol (${SUBPROTOCOL_TOKEN_HELP})`,
          });
        } else {
          this._open(o.getToken ? { token: value } : { ticket: value }, Date.now() - started);
        }
      },
      (err) => {
        clearTimeout(deadline);
        if (timedOut || run !== this._run || this._stopped) return;
        const name = o.getToken ? "getToken" : "getTicket";
        this._notOpened({ error: `${name} failed: ${(err && err.message) || err}` });
      },
    );
  }

  // The connection of an attempt, with its credential ({token} or
  // {ticket}), over the current transport; spent: how much of
  // connectTimeoutMs getting the credential took.
  _open(credential, spent) {
    const o = this.options;
    const fresh = Boolean(o.getToken || o.getTicket);
    const transport = this._transports[this._transportIndex];
    let conn = null;
    let openedAt = 0;
    let deadline = null;
    const events = {
      open: (protocol) => {
        clearTimeout(deadline);
        if (this._conn !== conn || openedAt) return;
        openedAt = Date.now();
        this.failures = 0;
        if (this._everOpened) this.reconnects += 1;
        this._everOpened = true;
        this._setState(State.OPEN, { protocol, reconnects: this.reconnects, transport: transport.name });
        // what the last connection did not get acknowledged, again, same ids
        for (const id of this._unacked.keys()) this._transmit(id);
      },
      message: (data) => {
        if (this._conn !== conn) return;
        if (o.resume || o.ack || o.labels) this._receive(data);
        else this._deliver(data);
      },
      close: (info) => {
        clearTimeout(deadline);
        this._closed(conn, info, openedAt, fresh);
      },
    };
    try {
      const url = this._socketUrl(credential);
      const protocols = credential.token && o.tokenIn === "subprotocol" ? ["bearer", credential.token] : undefined;
      conn = transport.open({ url, protocols }, events);
    } catch (err) {
      if (this._transports.length > 1) {
        // this transport cannot start here: the next one, next attempt
        this._nextTransport();
        this._notOpened({ error: String(err), transport: transport.name });
        return;
      }
      // a malformed URL: retrying cannot help
      this._stopped = true;
      this._setState(State.FAILED, { error: String(err), message: `cannot connect: ${err.message}` });
      return;
    }
    this._conn = conn;
    if (!fresh) this._setState(State.CONNECTING, { attempt: this.attempts, url: o.url });
    // fails the attempt: 1006
    deadline = setTimeout(() => conn.close(), Math.max(0, o.connectTimeoutMs - spent));
  }

  // The end of an attempt's connection (conn), open since openedAt (0: it
  // never opened).
  _closed(conn, { code, reason, wasClean }, openedAt, fresh) {
    if (this._conn !== conn) return;
    this._conn = null;
    const o = this.options;
    const detail = { code, reason, wasClean };
    if (this._stopped) {
      this._setState(State.CLOSED, { ...detail, byClient: true });
      return;
    }
    if (openedAt && code === 1000) {
      this._stopped = true;
      this._setState(State.CLOSED, { ...detail, byClient: false });
      return;
    }
    if (!openedAt) {
      this._nextTransport();
      this._notOpened(detail);
      return;
    }
    const stable = Date.now() - openedAt >= o.stableMs;
    if (stable) this._backoffStep = 0;
    if (fresh && code === TOKEN_EXPIRED) {
      // a fresh token at once; only repeated quick expiries back off
      this._quickExpiries = stable ? 0 : this._quickExpiries + 1;
      if (this._quickExpiries <= 1) {
        this._retry({ ...detail, expired: true }, 0);
        return;
      }
    } else {
      this._quickExpiries = 0;
    }
    this._retry(detail, this._nextDelay());
  }

  // After an attempt that never opened: the next transport in the list
  // (round it), for the next attempt.
  _nextTransport() {
    this._transportIndex = (this._transportIndex + 1) % this._transports.length;
  }

  // An attempt that never opened (refused, unreachable, timed out, or no
  // credential): counted; the client gives up after maxFailures in a row.
  _notOpened(detail) {
    const o = this.options;
    this.failures += 1;
    if (this.failures >= o.maxFailures) {
      this._stopped = true;
      this._setState(State.FAILED, {
        ...detail,
        failures: this.failures,
        message:
          `gave up after ${this.failures} attempts that never connected: ` +
          (o.getToken ? "getToken failed, or its token was refused (401/403: invalid or expired), " :
            o.getTicket ? "getTicket failed, or its ticket was refused (403: unknown, used or expired), " :
              "the token was refused (401/403: unknown, expired or deleted), ") +
          "the Origin is not allowed, " +
          (o.resume ? "the proxy does not accept ?resume= (400: RESUME=true not set), " : "") +
          (o.ack ? "the proxy does not accept ?ack=1 (400: UPSTREAM=stream not set), " : "") +
          (o.labels ? "the proxy does not accept ?labels=1 (400: TOPICS=true not set), " : "") +
          "or the proxy is unreachable",
      });
      return;
    }
    this._retry(detail, this._nextDelay());
  }

  _retry(detail, delay) {
    this._setState(State.RECONNECTING, { ...detail, delay, failures: this.failures });
    this._timer = setTimeout(() => this._attempt(detail.code), delay);
  }

  // info: with labels, {topic, position} (the frame's header)
  _deliver(data, info) {
    const isBinary = typeof data !== "string";
    if (!this.options.labels) {
      if (this.onmessage) this.onmessage(data, isBinary);
      this.dispatchEvent(new CustomEvent("message", { detail: { data, isBinary } }));
      return;
    }
    const full = { topic: info.topic, position: info.position, isBinary };
    if (this.onmessage) this.onmessage(data, full);
    this.dispatchEvent(new CustomEvent("message", { detail: { data, ...full } }));
  }

  // A frame with a header (resume, ack or labels): "!" + JSON (text) is a
  // control frame, anything else "<header>\n<message>", split at the first
  // newline (the message may hold more). The header is a position, empty
  // for plain messages; with labels also "#T" or "#T <position>".
  _receive(data) {
    let header, message;
    if (typeof data === "string") {
      if (data.startsWith("!")) {
        this._control(data.slice(1));
        return;
      }
      const newline = data.indexOf("\n");
      header = newline < 0 ? "" : data.slice(0, newline);
      message = data.slice(newline + 1);
    } else {
      const newline = new Uint8Array(data).indexOf(10);
      header = newline < 0 ? "" : DECODER.decode(new Uint8Array(data, 0, newline));
      message = data.slice(newline + 1);
    }
    let topic = null;
    let position = header;
    if (this.options.labels && header.startsWith("#")) {
      const space = header.indexOf(" ");
      topic = space < 0 ? header.slice(1) : header.slice(1, space);
      position = space < 0 ? "" : header.slice(space + 1);
    }
    if (position) {
      const p = parsePosition(position);
      if (!p) {
        console.warn(`wsproxy: a message with a malformed position (${position}) was delivered unchecked`);
      } else {
        const last = topic === null ? this._last : this._topicLast.get(topic);
        if (last && last.epoch === p.epoch && p.seq <= last.seq) return; // had it already
        if (topic === null) this._last = p;
        else if (this.options.resume) this._topicLast.set(topic, p);
      }
    }
    this._deliver(message, { topic, position: position || null });
  }

  _control(json) {
    let event;
    try {
      event = JSON.parse(json);
    } catch {
      console.warn("wsproxy: a control frame that is not JSON was ignored");
      return;
    }
    if (event && (event.type === "ack" || event.type === "nack")) {
      this._answer(event);
      return;
    }
    if (!event || event.type !== "recovery") return; // other kinds: for later versions
    const position = typeof event.position === "string" ? parsePosition(event.position) : null;
    const topic = typeof event.topic === "string" && this.options.labels ? event.topic : null;
    if (topic !== null && !TOPIC.test(topic)) {
      console.warn("wsproxy: a recovery report for a malformed topic name was ignored");
      return;
    }
    const last = topic === null ? this._last : this._topicLast.get(topic) || null;
    let next = last;
    if (!event.recovered) {
      // continuity is broken (the application is told): the server's
      // position is where the stream goes on from, even if it is lower
      // (a history restored from an older copy counts again)
      next = position;
    } else if (!last && !event.replayed) {
      // a fresh start: where the history stood, so that messages published
      // before the next message arrives are replayed after a reconnect
      next = position;
    }
    if (topic === null) {
      this._last = next;
    } else if (this.options.resume) {
      if (next) this._topicLast.set(topic, next);
      else this._topicLast.delete(topic);
    }
    const info = {
      ...(this.options.labels ? { topic } : {}),
      recovered: Boolean(event.recovered),
      replayed: Number(event.replayed) || 0,
      position: event.position ?? null,
      reason: event.reason || "",
    };
    if (this.onrecovery) this.onrecovery(info);
    this.dispatchEvent(new CustomEvent("recovery", { detail: info }));
  }

  _answer(event) {
    const id = String(event.id);
    if (event.type === "ack") {
      this._unacked.delete(id);
      const info = { id, position: event.position };
      if (this.onack) this.onack(info);
      this.dispatchEvent(new CustomEvent("ack", { detail: info }));
      return;
    }
    // not stored (a Redis error, or the proxy lost Redis with it in flight)
    const info = { id, reason: event.reason || "" };
    if (this.onnack) this.onnack(info);
    this.dispatchEvent(new CustomEvent("nack", { detail: info }));
    const conn = this._conn;
    setTimeout(() => {
      if (this._conn === conn) this._transmit(id); // a new connection sends it anyway
    }, this.options.nackRetryMs);
  }

  _nextDelay() {
    const o = this.options;
    const ceiling = Math.min(o.maxBackoffMs, o.backoffMs * 2 ** this._backoffStep);
    if (ceiling < o.maxBackoffMs) this._backoffStep += 1;
    return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
  }

  _setState(state, detail = {}) {
    const previous = this.state;
    this.state = state;
    const full = { ...detail, state, previous, reconnects: this.reconnects, failures: this.failures };
    if (this.onstatechange) this.onstatechange(state, full);
    this.dispatchEvent(new CustomEvent("statechange", { detail: full }));
  }
}
