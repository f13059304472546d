// Credentials against a real proxy (AUTH_MODE=redis, the default): a static
// token as the bearer subprotocol and as ?access_token=, a refused token
// giving up after maxFailures, and single-use tickets, a fresh one per
// attempt from getTicket.

import { test } from "node:test";
import assert from "node:assert/strict";
import { WsProxyClient } from "../src/index.js";
import { closeAfter, env, needsProxy, newSession, recordStates, redisFor, until } from "./helpers.js";

const fast = { agent: "a", backoffMs: 50, maxBackoffMs: 200 };

test("a token in the bearer subprotocol: messages both ways, then a normal close", needsProxy, async (t) => {
  const redis = await redisFor(t);
  const up = await redisFor(t);
  const session = newSession("sub");
  await redis.command("SET", `session:${session}:auth`, "tok-sub", "EX", 300);
  const heard = [];
  await up.subscribe(`session:${session}:up`, (_channel, message) => heard.push(message));

  const client = closeAfter(t, new WsProxyClient({ ...fast, url: env.url, session, token: "tok-sub" }));
  const states = recordStates(client);
  const got = [];
  client.onmessage = (data, isBinary) => got.push([data, isBinary]);
  assert.equal(client.send("too early"), false);
  client.connect();
  await until(() => client.state === "open", () => `open, not ${JSON.stringify(states)}`);
  const opened = states.find((s) => s.state === "open");
  assert.equal(opened.protocol, "bearer");
  assert.equal(opened.transport, "websocket");
  assert.equal(client.transport, "websocket");
  assert.ok(!client.socketUrl.includes("tok-sub"));

  await until(async () => (await redis.command("PUBLISH", `session:${session}:down`, "hello")) === 1, "the proxy's subscription");
  await until(() => got.length === 1, () => `a message, got ${JSON.stringify(got)}`);
  assert.deepEqual(got[0], ["hello", false]);

  assert.equal(client.send("from node"), true);
  await until(() => heard.includes("from node"), "the upstream message in Redis");

  client.close();
  await until(() => client.state === "closed", "closed");
  assert.equal(states.at(-1).code, 1000);
  assert.equal(states.at(-1).byClient, true);
});

test("a token in the query (?access_token=)", needsProxy, async (t) => {
  const redis = await redisFor(t);
  const session = newSession("query");
  await redis.command("SET", `session:${session}:auth`, "tok-query", "EX", 300);
  const client = closeAfter(t, new WsProxyClient({ ...fast, url: env.url, session, token: "tok-query", tokenIn: "query" }));
  const states = recordStates(client);
  assert.ok(client.socketUrl.endsWith(`/a/ws/${session}?access_token=tok-query`), client.socketUrl);
  client.connect();
  await until(() => client.state === "open", () => `open, not ${JSON.stringify(states)}`);
  assert.equal(states.find((s) => s.state === "open").protocol, "");
});

test("a refused token: gives up after maxFailures attempts that never opened", needsProxy, async (t) => {
  const session = newSession("refused");
  const client = closeAfter(t, new WsProxyClient({ ...fast, url: env.url, session, token: "not-stored", maxFailures: 3 }));
  const states = recordStates(client);
  client.connect();
  await until(() => client.state === "failed", () => `failed, not ${JSON.stringify(states)}`);
  assert.equal(client.attempts, 3);
  assert.equal(states.at(-1).failures, 3);
  assert.match(states.at(-1).message, /the token was refused/);
});

test("tickets: getTicket gives a fresh single-use ticket for every attempt", needsProxy, async (t) => {
  const redis = await redisFor(t);
  const session = newSession("ticket");
  const asked = [];
  const issued = [];
  const getTicket = async (info) => {
    asked.push(info);
    const ticket = `ticket-${Math.random().toString(36).slice(2)}-${asked.length}`.padEnd(24, "x");
    await redis.command("SET", `session:${session}:ticket:${ticket}`, "1", "EX", 30);
    issued.push(ticket);
    return ticket;
  };
  const client = closeAfter(t, new WsProxyClient({ ...fast, url: env.url, session, getTicket }));
  const states = recordStates(client);
  assert.ok(!client.socketUrl.includes("?"), client.socketUrl);
  client.connect();
  await until(() => client.state === "open", () => `open, not ${JSON.stringify(states)}`);
  // consumed by the connect that presented it
  assert.equal(await redis.command("EXISTS", `session:${session}:ticket:${issued[0]}`), 0);

  // the backend closes the session's sockets (Backend.close): the client
  // reconnects, with a new ticket
  const order = JSON.stringify({ close: session, code: 4001, reason: "again" });
  assert.equal(await redis.command("PUBLISH", "wsproxy:control", order), 1);
  await until(() => client.reconnects === 1 && client.state === "open", () => `a reconnect, not ${JSON.stringify(states)}`);
  assert.equal(issued.length, 2);
  assert.notEqual(issued[0], issued[1]);
  assert.deepEqual(asked, [{ attempt: 1, code: undefined }, { attempt: 2, code: 4001 }]);
  assert.equal(await redis.command("EXISTS", `session:${session}:ticket:${issued[1]}`), 0);
  assert.ok(states.some((s) => s.state === "reconnecting" && s.code === 4001));
});
