// Topics with labels (TOPICS=true, RESUME=true): every message says where it
// came from; recoverable topic messages carry their position, kept per topic
// and asked for again on reconnect (?resume_topic=T@<position>); a topic the
// backend joins the session to while it is connected delivers at once.

import { test } from "node:test";
import assert from "node:assert/strict";
import { WsProxyClient } from "../src/index.js";
import { closeAfter, env, needsProxy, newSession, recordStates, redisFor, until } from "./helpers.js";

const publishRecoverable = async (redis, topic, message, kind = "text") =>
  (await redis.command("FCALL", "wsproxy_publish", 2, `topic:${topic}:history`, `topic:${topic}:meta`, message, kind)).toString();

test("labelled topic messages, positions per topic, a topic joined while connected", needsProxy, async (t) => {
  const redis = await redisFor(t);
  const session = newSession("topics");
  const news = `news-${session}`;
  const late = `late-${session}`;
  await redis.command("SET", `session:${session}:auth`, "tok-topics", "EX", 300);
  await redis.command("SADD", `session:${session}:topics`, news);
  const client = closeAfter(t, new WsProxyClient({
    url: env.url, agent: "a", session, token: "tok-topics", labels: true, resume: true,
    backoffMs: 50, maxBackoffMs: 200, maxFailures: 20,
  }));
  const states = recordStates(client);
  const got = [];
  const recoveries = [];
  client.onmessage = (data, info) => got.push({ data: typeof data === "string" ? data : Array.from(new Uint8Array(data)), ...info });
  client.onrecovery = (info) => recoveries.push(info);
  const events = [];
  client.addEventListener("message", (event) => events.push(event.detail));
  client.connect();
  await until(() => recoveries.some((r) => r.topic === news), () => `the topic's recovery report, not ${JSON.stringify({ states, recoveries })}`);
  assert.deepEqual(recoveries.find((r) => r.topic === null), { topic: null, recovered: true, replayed: 0, position: recoveries[0].position, reason: "" });
  const fresh = recoveries.find((r) => r.topic === news).position;
  assert.ok(client.socketUrl.includes(`&labels=1&resume_topic=${encodeURIComponent(`${news}@${fresh}`)}`), client.socketUrl);

  assert.equal(await redis.command("PUBLISH", `topic:${news}:down`, "plain news"), 1);
  const kept = await publishRecoverable(redis, news, "kept news");
  const bytes = await publishRecoverable(redis, news, Buffer.from([0, 255, 10]), "binary");
  assert.equal(await redis.command("PUBLISH", `session:${session}:down`, "to the session"), 1);
  await until(() => got.length === 4, () => `4 messages, got ${JSON.stringify(got)}`);
  assert.deepEqual(got, [
    { data: "plain news", topic: news, position: null, isBinary: false },
    { data: "kept news", topic: news, position: kept, isBinary: false },
    { data: [0, 255, 10], topic: news, position: bytes, isBinary: true },
    { data: "to the session", topic: null, position: null, isBinary: false },
  ]);
  assert.equal(events.length, 4);
  assert.equal(events[1].data, "kept news");
  assert.equal(events[1].topic, news);
  assert.deepEqual(client.topicPositions, { [news]: bytes });

  // the backend joins the session to another topic (Backend.join_topics)
  await redis.command("SADD", `session:${session}:topics`, late);
  await redis.command("PUBLISH", "wsproxy:control", JSON.stringify({ subscribe: session, topics: [late] }));
  await until(() => recoveries.some((r) => r.topic === late), () => `the joined topic's report, not ${JSON.stringify(recoveries)}`);
  assert.equal(await redis.command("PUBLISH", `topic:${late}:down`, "joined while connected"), 1);
  await until(() => got.some((m) => m.topic === late), "the joined topic's message");

  // dropped (the backend closes the socket) while a recoverable message is
  // published: replayed once after the reconnect, through resume_topic
  await redis.command("PUBLISH", "wsproxy:control", JSON.stringify({ close: session, code: 4001, reason: "drop" }));
  await until(() => client.state !== "open", "the close");
  const missed = await publishRecoverable(redis, news, "missed news");
  await until(() => got.some((m) => m.data === "missed news"), () => `the missed message, not ${JSON.stringify({ got, states: states.slice(-3) })}`);
  assert.equal(client.reconnects, 1);
  assert.equal(got.filter((m) => m.data === "missed news").length, 1);
  assert.deepEqual(got.at(-1), { data: "missed news", topic: news, position: missed, isBinary: false });
  assert.ok(client.socketUrl.includes(`resume_topic=${encodeURIComponent(`${news}@${missed}`)}`), client.socketUrl);
  assert.equal(client.forgetTopic(news), true);
  assert.ok(!client.socketUrl.includes(`resume_topic=${news}`), client.socketUrl);
});

test("without labels, a topic's messages arrive as the session's own", needsProxy, async (t) => {
  const redis = await redisFor(t);
  const session = newSession("unlabelled");
  const topic = `room-${session}`;
  await redis.command("SET", `session:${session}:auth`, "tok-plain", "EX", 300);
  await redis.command("SADD", `session:${session}:topics`, topic);
  const client = closeAfter(t, new WsProxyClient({ url: env.url, agent: "a", session, token: "tok-plain" }));
  const got = [];
  client.onmessage = (data, isBinary) => got.push([data, isBinary]);
  client.connect();
  await until(() => client.state === "open", "open");
  await until(async () => (await redis.command("PUBLISH", `topic:${topic}:down`, "for the room")) === 1, "the topic's subscription");
  await until(() => got.length === 1, "the topic's message");
  assert.deepEqual(got, [["for the room", false]]);
});
