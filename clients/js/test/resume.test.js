// A resumable session (RESUME=true) across a daemon restart: the backend
// publishes numbered recoverable messages (FCALL wsproxy_publish) every
// 20 ms while the trial side restarts the daemon (SIGTERM, a new process on
// the same port); the client reconnects with ?resume=<position> and gets
// every number once, in order, reported recovered.

import { test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { WsProxyClient } from "../src/index.js";
import { closeAfter, control, env, needsProxy, newSession, recordStates, redisFor, until } from "./helpers.js";

const TOTAL = 150;

test("every recoverable message once, in order, across a daemon restart", needsProxy, async (t) => {
  const redis = await redisFor(t);
  const session = newSession("resume");
  await redis.command("SET", `session:${session}:auth`, "tok-resume", "EX", 300);
  const client = closeAfter(t, new WsProxyClient({
    url: env.url, agent: "a", session, token: "tok-resume", resume: true,
    backoffMs: 100, maxBackoffMs: 500, maxFailures: 50,
  }));
  const states = recordStates(client);
  const got = [];
  const recoveries = [];
  client.onmessage = (data, isBinary) => got.push([data, isBinary]);
  client.onrecovery = (info) => recoveries.push({ ...info, at: got.length });
  client.connect();
  await until(() => recoveries.length === 1, () => `the first recovery report, not ${JSON.stringify(states)}`);
  assert.equal(recoveries[0].recovered, true);
  assert.equal(recoveries[0].replayed, 0);
  // a fresh start: the position where the history stood, asked for next time
  assert.equal(client.position, recoveries[0].position);
  assert.ok(client.socketUrl.endsWith(`?resume=${encodeURIComponent(recoveries[0].position)}`), client.socketUrl);

  let published = 0;
  let positions = [];
  const publisher = (async () => {
    while (published < TOTAL) {
      positions.push((await redis.command("FCALL", "wsproxy_publish", 2, `session:${session}:history`,
        `session:${session}:meta`, String(published + 1), "text")).toString());
      published += 1;
      await sleep(20);
    }
  })();
  await until(() => got.length >= 40, "40 messages before the restart");
  await control("/restart");
  await publisher;
  await until(() => got.length >= TOTAL && client.state === "open", () => `${TOTAL} messages, got ${got.length}: ${JSON.stringify(states.slice(-3))}`, 30000);
  await sleep(200); // nothing more may come
  assert.deepEqual(got.map(([data]) => data), Array.from({ length: TOTAL }, (_, i) => String(i + 1)));
  assert.ok(got.every(([, isBinary]) => isBinary === false));
  assert.ok(client.reconnects >= 1, JSON.stringify(states));
  assert.ok(states.some((s) => s.state === "reconnecting" && s.code === 1001), JSON.stringify(states));
  assert.ok(recoveries.length >= 2, JSON.stringify(recoveries));
  assert.ok(recoveries.every((r) => r.recovered), JSON.stringify(recoveries));
  assert.equal(client.position, positions.at(-1));
  assert.ok(client.socketUrl.endsWith(`?resume=${encodeURIComponent(positions.at(-1))}`), client.socketUrl);
});
