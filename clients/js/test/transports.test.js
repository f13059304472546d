// Transports, without a proxy: the client over scripted transports (see
// "Transports" in src/index.js), the way a second transport (SSE + POST)
// plugs in: an attempt that never opened moves on to the next transport in
// the list; the transport that opened stays; framing, acks and credentials
// are the client's whatever carries them. And the WebSocket transport with
// a WebSocket class given as an option.

import { test } from "node:test";
import assert from "node:assert/strict";
import { WsProxyClient, webSocketTransport } from "../src/index.js";
import { recordStates, until } from "./helpers.js";

/** A transport whose connections the test drives; what it was asked, in opened. */
function scripted(name, { throws = false } = {}) {
  const transport = {
    name,
    opened: [],
    open(target, events) {
      if (throws) throw new Error(`${name} cannot start here`);
      const conn = {
        target,
        sent: [],
        live: false,
        send: (data) => conn.sent.push(data),
        close: (code = 1005, reason = "") => setTimeout(() => conn.drop(code, reason), 0),
        isOpen: () => conn.live,
        accept: (protocol = "bearer") => {
          conn.live = true;
          events.open(protocol);
        },
        frame: (data) => events.message(data),
        drop: (code = 1006, reason = "") => {
          conn.live = false;
          events.close({ code, reason, wasClean: code !== 1006 });
        },
      };
      transport.opened.push(conn);
      return conn;
    },
  };
  return transport;
}

const base = { url: "ws://proxy.test", agent: "a", session: "s1", backoffMs: 1, maxBackoffMs: 1 };

test("an attempt that never opened moves to the next transport; the one that opened stays", async () => {
  const ws = scripted("websocket");
  const sse = scripted("sse");
  const client = new WsProxyClient({ ...base, token: "t0k", transports: [ws, sse], labels: true, resume: true, ack: true });
  const states = recordStates(client);
  const got = [];
  client.onmessage = (data, info) => got.push([data, info.topic, info.position]);
  const acked = [];
  client.onack = ({ id }) => acked.push(id);
  assert.equal(client.transport, "websocket");
  client.connect();
  ws.opened[0].drop(1006); // blocked: never opened
  await until(() => sse.opened.length === 1, "an attempt over the second transport");
  assert.equal(client.transport, "sse");
  const conn = sse.opened[0];
  assert.deepEqual(conn.target.protocols, ["bearer", "t0k"]);
  assert.equal(conn.target.url, "ws://proxy.test/a/ws/s1?resume=&labels=1&ack=1");
  conn.accept();
  assert.equal(states.at(-1).state, "open");
  assert.equal(states.at(-1).transport, "sse");
  // the same framing over any transport
  conn.frame("#news 0a:1-1\nhello");
  conn.frame("\nto the session");
  assert.deepEqual(got, [["hello", "news", "0a:1-1"], ["to the session", null, null]]);
  assert.equal(client.send("up", "m1"), "m1");
  assert.deepEqual(conn.sent, ["m1\nup"]);
  conn.frame('!{"type":"ack","id":"m1","position":"1-0"}');
  assert.deepEqual(acked, ["m1"]);
  // dropped after it opened: the same transport again
  conn.drop(1001);
  await until(() => sse.opened.length === 2, "a reconnect");
  assert.equal(ws.opened.length, 1);
  assert.ok(sse.opened[1].target.url.includes("resume_topic=news%400a%3A1-1"), sse.opened[1].target.url);
  // never opened: round the list, back to the first
  sse.opened[1].drop(1006);
  await until(() => ws.opened.length === 2, "the first transport again");
  client.close();
  await until(() => client.state === "closed", "closed");
});

test("a transport that cannot start here is skipped for the next attempt", async () => {
  const broken = scripted("broken", { throws: true });
  const good = scripted("good");
  const client = new WsProxyClient({ ...base, token: "t0k", tokenIn: "query", transports: [broken, good] });
  const states = recordStates(client);
  client.connect();
  await until(() => good.opened.length === 1, "the second transport");
  assert.equal(good.opened[0].target.protocols, undefined);
  assert.equal(good.opened[0].target.url, "ws://proxy.test/a/ws/s1?access_token=t0k");
  assert.match(states.find((s) => s.state === "reconnecting").error, /broken cannot start here/);
  good.opened[0].accept("");
  assert.equal(client.state, "open");
  client.close();
});

test("with one transport that cannot start, the client fails at once", () => {
  const client = new WsProxyClient({ ...base, token: "t0k", transports: [scripted("broken", { throws: true })] });
  client.connect();
  assert.equal(client.state, "failed");
});

test("the WebSocket transport with a WebSocket class given as an option", async () => {
  const made = [];
  class FakeWebSocket {
    static OPEN = 1;
    constructor(url, protocols) {
      made.push(this);
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
    }
    send(data) { this.sent.push(data); }
    close() { setTimeout(() => this.onclose({ code: 1005, reason: "", wasClean: true }), 0); }
  }
  const client = new WsProxyClient({ ...base, token: "t0k", WebSocket: FakeWebSocket });
  const got = [];
  client.onmessage = (data, isBinary) => got.push([data, isBinary]);
  client.connect();
  assert.equal(made.length, 1);
  assert.deepEqual(made[0].protocols, ["bearer", "t0k"]);
  assert.equal(made[0].binaryType, "arraybuffer");
  made[0].readyState = 1;
  made[0].onopen();
  made[0].onmessage({ data: "hi" });
  assert.deepEqual(got, [["hi", false]]);
  assert.equal(client.send("there"), true);
  assert.deepEqual(made[0].sent, ["there"]);
  // an error before any close event (Node 20 after a refused handshake)
  // still ends an attempt that never opened
  made[0].onclose({ code: 1001, reason: "going away", wasClean: true });
  await until(() => made.length === 2, "a reconnect");
  made[1].onerror({});
  await until(() => made.length === 3, "an attempt after the error");
  assert.equal(client.failures, 1);
  client.close();
  assert.equal(typeof webSocketTransport().open, "function");
});

test("options are checked", () => {
  assert.throws(() => new WsProxyClient({ ...base }), /token \(or getToken, or getTicket\) are required/);
  assert.throws(() => new WsProxyClient({ ...base, token: "a", getToken: async () => "b" }), /give one of/);
  assert.throws(() => new WsProxyClient({ ...base, token: "a b" }), /cannot travel as a subprotocol/);
  assert.throws(() => new WsProxyClient({ ...base, token: "a", transports: [] }), /transports must be/);
  assert.throws(() => new WsProxyClient({ ...base, token: "a", position: "0a:1-1" }), /position needs resume/);
});
