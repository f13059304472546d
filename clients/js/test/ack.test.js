// Acknowledged upstream (UPSTREAM=stream): the client sends numbered
// messages with ack: true while the trial side restarts the daemon; it keeps
// what was not acknowledged and sends it again with the same id, so in the
// end nothing waits and every id is in the session's partition stream.

import { test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { WsProxyClient } from "../src/index.js";
import { closeAfter, control, env, fieldsOf, needsProxy, newSession, recordStates, redisFor, until } from "./helpers.js";

const TOTAL = 200;
// UPSTREAM_PARTITIONS=1 on the trial side: one stream
const STREAM = "wsproxy:up:{p0}";

test("every message acknowledged and in the stream, across a daemon restart", needsProxy, async (t) => {
  const redis = await redisFor(t);
  const session = newSession("ack");
  await redis.command("SET", `session:${session}:auth`, "tok-ack", "EX", 300);
  const client = closeAfter(t, new WsProxyClient({
    url: env.url, agent: "a", session, token: "tok-ack", ack: true,
    backoffMs: 100, maxBackoffMs: 500, maxFailures: 50, nackRetryMs: 200,
  }));
  const states = recordStates(client);
  const acks = new Map();
  client.onack = ({ id, position }) => acks.set(id, position);
  assert.match(client.socketUrl, /\?ack=1$/);
  // queued before the first connect, sent once open
  assert.equal(client.send("early", "n0"), "n0");
  assert.deepEqual(client.unacked, ["n0"]);
  client.connect();
  for (let i = 1; i < TOTAL; i++) {
    if (i === 60) await control("/restart");
    const id = i % 2 ? client.send(`message ${i}`, `n${i}`) : client.send(new TextEncoder().encode(`bytes ${i}`), `n${i}`);
    assert.equal(id, `n${i}`);
    await sleep(5);
  }
  await until(() => client.unacked.length === 0 && acks.size === TOTAL, () => `every ack, ${acks.size} so far, waiting ${client.unacked.length}: ${JSON.stringify(states.slice(-3))}`, 30000);
  assert.ok(client.reconnects >= 1, JSON.stringify(states));

  const entries = (await redis.command("XRANGE", STREAM, "-", "+")).map(fieldsOf);
  const ids = new Set(entries.filter((e) => e.fields.session === session).map((e) => e.fields.id));
  assert.deepEqual([...ids].sort(), Array.from({ length: TOTAL }, (_, i) => `n${i}`).sort());
  // each ack names the stream entry that holds it
  const byEntry = new Map(entries.map((e) => [e.entry, e.fields]));
  for (const [id, position] of acks) assert.equal(byEntry.get(position)?.id, id, `${id} at ${position}`);
  assert.equal(byEntry.get(acks.get("n0")).data, "early");
  assert.equal(byEntry.get(acks.get("n1")).data, "message 1");
});

test("a generated id for each message, and false beyond maxUnacked", needsProxy, async (t) => {
  const session = newSession("ack-ids");
  const client = closeAfter(t, new WsProxyClient({ url: env.url, agent: "a", session, token: "unused", ack: true, maxUnacked: 2 }));
  const first = client.send("a");
  const second = client.send("b");
  assert.match(first, /^[a-z0-9]+-0$/);
  assert.match(second, /^[a-z0-9]+-1$/);
  assert.equal(client.send("c"), false);
  assert.deepEqual(client.unacked, [first, second]);
  assert.throws(() => client.send("d", "not valid!"), /invalid message id/);
});
