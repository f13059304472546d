#!/usr/bin/env python3
"""Load test for a running wsproxy (and the Redis it uses).

Phases (select with --phases, connect always runs because the others need it):

  connect  open --clients WebSocket connections, each with its own session and
           token (SETEX session:{sid}:auth), at most --concurrency handshakes in
           flight; success count, connect rate, handshake latency p50/p99/max.
  down     downstream burst: --burst K messages PUBLISHed to every session's
           session:{sid}:down as fast as Redis takes them; delivered/sent,
           delivery rate, latency p50/p99/max (publish time is in the payload).
  paced    --rate R messages/s spread round-robin over all sessions for
           --duration D seconds; latency p50/p99/max and loss.
  up       every client sends --upstream K messages of --size bytes; a
           PSUBSCRIBE session:lt-<run>-*:up counter reports arrived/sent, rate
           and latency.

With --pid PID (the proxy's process) the proxy's CPU time (user+sys from
/proc/PID/stat) is reported per delivered message for each phase, per
connection set-up, and its RSS growth (VmRSS) per open connection.  The Redis
server's CPU is reported the same way when Redis is local (INFO process_id).

The tool runs --procs worker processes (each owns a slice of the clients on a
lean asyncio raw-socket WebSocket client), --publishers publisher processes
(packed PUBLISH pipelines over redis-py connections) and, for the up phase, one
subscriber process.  It samples its own processes' CPU and says when it was
itself saturated during a phase.

Output: a readable table on stderr (unless --json-only) and exactly one JSON
line on stdout.  Exit status: 0 all good, 1 a message was lost / a connection
failed or dropped / a message was misrouted, duplicated or reordered,
2 usage error or target / Redis unreachable, 130 interrupted.

Examples:
  python examples/load_test.py --clients 200 --burst 5 --rate 200 --duration 3 --upstream 5   # CI smoke
  python examples/load_test.py --clients 1000 --burst 100 --phases connect,down,up --pid 1234
  python examples/load_test.py --clients 10000 --concurrency 500 --phases connect,paced --rate 2000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import random
import resource
import secrets
import signal
import socket
import sys
import time
from array import array
from collections import Counter
from urllib.parse import quote, urlsplit

try:
    import redis
except ImportError:  # pragma: no cover - the project venv has it
    sys.stderr.write("load_test: error: the 'redis' package (redis-py) is required\n")
    sys.exit(2)

time_ns = time.time_ns
CLK_TCK = os.sysconf("SC_CLK_TCK")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HEADER_LEN = 36  # tag(1) + time_ns(19) + session index(8) + seq(8)
MIN_SIZE = HEADER_LEN
PHASES = ("connect", "down", "paced", "up")
TAGS = {"down": ord("B"), "paced": ord("P"), "up": ord("U")}

# Shared progress counters (one int64 slot each).
W_OPEN, W_FAIL, W_DELIV, W_DROP = 0, 1, 2, 3
W_STRIDE = 4


class Fatal(Exception):
    """An error that ends the run with one clear line and exit status 2."""


# ---------------------------------------------------------------- /proc


def proc_family(pid):
    """The process and its direct children (WORKERS>1: the supervisor and its workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid] + [int(c) for c in f.read().split()]
    except OSError:
        return [pid]


def proc_cpu(pid):
    """user+sys CPU seconds of a process and its children, or None if it is not readable."""
    if not pid:
        return None
    total = 0.0
    for i, member in enumerate(proc_family(pid)):
        try:
            with open(f"/proc/{member}/stat", "rb") as f:
                data = f.read()
        except OSError:
            if i == 0:
                return None
            continue
        # the command name may contain spaces and parentheses: split after the last ')'
        fields = data[data.rindex(b")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def proc_rss(pid):
    """VmRSS in bytes of a process and its children, or None."""
    if not pid:
        return None
    total = None
    for member in proc_family(pid):
        try:
            with open(f"/proc/{member}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total = (total or 0) + int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def listen_overflows():
    """Host-wide TcpExt ListenOverflows (accept queue full: the SYN is dropped and retried
    after ~1 s), or None."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], values.split()[1:]))
            if "ListenOverflows" in d:
                return int(d["ListenOverflows"])
    return None


def host_cpu():
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            parts = f.readline().split()
    except OSError:
        return (0, 0)
    vals = [int(x) for x in parts[1:9]]
    total = sum(vals)
    idle = vals[3] + vals[4]
    return (total - idle, total)


# ---------------------------------------------------------------- payloads


def make_pad(size, binary):
    # 0xff never appears in valid UTF-8, so a binary payload can't be taken for text
    return (b"\xff" if binary else b".") * size


def client_frame(opcode, payload, _rand=random.getrandbits):
    """A masked client-to-server WebSocket frame (FIN set)."""
    n = len(payload)
    key = _rand(32).to_bytes(4, "big")
    if n:
        masked = (int.from_bytes(payload, "big")
                  ^ int.from_bytes((key * ((n + 3) >> 2))[:n], "big")).to_bytes(n, "big")
    else:
        masked = b""
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    return head + key + masked


def pct(sorted_vals, p):
    n = len(sorted_vals)
    if not n:
        return None
    i = min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))
    return sorted_vals[i]


def latency_summary(lat_ns):
    """p50/p99/max in ms (3 decimals) of a list/array of nanosecond values."""
    if not lat_ns:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    s = sorted(lat_ns)
    r = lambda v: round(v / 1e6, 3)  # noqa: E731
    return {"p50": r(pct(s, 50)), "p99": r(pct(s, 99)), "max": r(s[-1]), "n": len(s)}


# ---------------------------------------------------------------- worker: raw WebSocket client


class HandshakeError(Exception):
    pass


class Client(asyncio.Protocol):
    """Minimal RFC 6455 client: handshake, counts and times downstream messages."""

    __slots__ = ("w", "idx", "sid", "token", "tr", "open", "buf", "fut", "key",
                 "count", "last_seq", "frag_op", "frag", "closing", "got_close", "lost")

    def __init__(self, w, idx, sid, token):
        self.w = w
        self.idx = idx
        self.sid = sid
        self.token = token
        self.tr = None
        self.open = False
        self.buf = b""
        self.fut = w.loop.create_future()
        self.key = None
        self.count = 0
        self.last_seq = -1
        self.frag_op = 0
        self.frag = None
        self.closing = False
        self.got_close = None
        self.lost = False

    # -- asyncio callbacks
    def connection_made(self, tr):
        self.tr = tr
        w = self.w
        self.key = base64.b64encode(os.urandom(16))
        path = f"{w.path_prefix}/{w.agent}/ws/{self.sid}"
        auth = b""
        if w.auth_mode == "query":
            path += "?access_token=" + quote(self.token, safe="")
        else:
            auth = b"Authorization: Bearer " + self.token.encode() + b"\r\n"
        tr.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + w.host_header
                 + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
                 + self.key + b"\r\nSec-WebSocket-Version: 13\r\n" + auth + b"\r\n")

    def connection_lost(self, exc):
        self.lost = True
        w = self.w
        if not self.fut.done():
            self.fut.set_exception(HandshakeError(
                "closed during handshake" if exc is None else _errname(exc)))
        if self.open:
            self.open = False
            w.open_count -= 1
            if not self.closing:
                w.dropped += 1
                w.shared[w.base + W_DROP] = w.dropped
            if w.open_count == 0 and w.all_closed is not None:
                w.all_closed.set()

    def data_received(self, data):
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.open:
            if self.fut.done():
                return
            i = data.find(b"\r\n\r\n")
            if i < 0:
                if len(data) > 65536:
                    self._fail("oversized handshake response")
                else:
                    self.buf = data
                return
            head = data[:i].split(b"\r\n")
            data = data[i + 4:]
            status = head[0].split(b" ", 2)
            try:
                code = int(status[1])
            except (IndexError, ValueError):
                self._fail("bad status line")
                return
            if code != 101:
                self._fail(f"http {code}")
                return
            want = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
            ok = False
            for h in head[1:]:
                name, _, value = h.partition(b":")
                if name.strip().lower() == b"sec-websocket-accept":
                    ok = value.strip() == want
            if not ok:
                self._fail("bad Sec-WebSocket-Accept")
                return
            self.open = True
            w = self.w
            w.open_count += 1
            self.fut.set_result(None)
            if not data:
                return
        self._frames(data)

    def _fail(self, reason):
        if not self.fut.done():
            self.fut.set_exception(HandshakeError(reason))
        self.tr.abort()

    # -- frames
    def _frames(self, data):
        w = self.w
        now = time_ns()
        tag = w.tag
        n = len(data)
        pos = 0
        got = 0
        lat = w.lat
        while n - pos >= 2:
            b0 = data[pos]
            ln = data[pos + 1]
            hl = pos + 2
            if ln & 0x80:  # servers must not mask
                w.protocol_errors += 1
                self.tr.abort()
                return
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                hl = pos + 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2:pos + 10], "big")
                hl = pos + 10
            end = hl + ln
            if end > n:
                break
            op = b0 & 0x0F
            pos = end
            if op == 1 or op == 2:
                payload = data[hl:end]
                if not b0 & 0x80:  # first fragment
                    self.frag_op = op
                    self.frag = [payload]
                    continue
            elif op == 0:
                if self.frag is None:
                    w.protocol_errors += 1
                    continue
                self.frag.append(data[hl:end])
                if not b0 & 0x80:
                    continue
                payload = b"".join(self.frag)
                op = self.frag_op
                self.frag = None
            elif op == 9:  # ping -> pong
                if not self.closing:
                    self.tr.write(client_frame(10, data[hl:end]))
                continue
            elif op == 8:
                self._on_close(data[hl:end])
                continue
            else:  # pong or reserved
                continue
            # a complete data message
            if len(payload) >= HEADER_LEN and payload[0] == tag:
                try:
                    ts = int(payload[1:20])
                    idx = int(payload[20:28])
                    seq = int(payload[28:36])
                except ValueError:
                    w.corrupt += 1
                    continue
                lat.append(now - ts)
                got += 1
                self.count += 1
                if idx != self.idx:
                    w.misrouted += 1
                if seq <= self.last_seq:
                    w.out_of_order += 1
                self.last_seq = seq
                if op != w.expect_op:
                    w.wrong_opcode += 1
                if len(payload) != w.size:
                    w.bad_size += 1
            else:
                w.stray += 1
        if pos < n:
            self.buf = data[pos:]
        if got:
            w.delivered += got
            w.shared[w.base + W_DELIV] = w.delivered
            if not w.first_ns:
                w.first_ns = now
            w.last_ns = now

    def _on_close(self, body):
        code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
        if self.got_close is not None:
            return
        self.got_close = code
        if not self.closing:
            # server-initiated close: a drop.  Answer it; the server then closes the TCP
            # connection (RFC 6455 7.1.1), abort if it doesn't.
            w = self.w
            self.closing = True
            w.server_close_codes[code] += 1
            w.dropped += 1
            w.shared[w.base + W_DROP] = w.dropped
            self.tr.write(client_frame(8, body[:2]))
            w.loop.call_later(5.0, self.tr.abort)


def _errname(exc):
    if isinstance(exc, HandshakeError):
        return str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return type(exc).__name__


class Worker:
    def __init__(self, wid, clients, cfg, conn, shared):
        self.wid = wid
        self.specs = clients  # list of (idx, sid, token)
        self.cfg = cfg
        self.conn = conn
        self.shared = shared
        self.base = wid * W_STRIDE
        self.host = cfg["host"]
        self.port = cfg["port"]
        self.host_header = cfg["host_header"].encode()
        self.path_prefix = cfg["path_prefix"]
        self.agent = cfg["agent"]
        self.auth_mode = cfg["auth"]
        self.size = cfg["size"]
        self.expect_op = 2 if cfg["binary"] else 1
        self.clients = {}
        self.open_count = 0
        self.dropped = 0
        self.all_closed = None
        self.server_close_codes = Counter()
        self.loop = None
        self._reset(0)

    def _reset(self, tag):
        self.tag = tag
        self.lat = array("q")
        self.delivered = 0
        self.first_ns = 0
        self.last_ns = 0
        self.stray = 0
        self.misrouted = 0
        self.out_of_order = 0
        self.wrong_opcode = 0
        self.bad_size = 0
        self.corrupt = 0
        self.protocol_errors = 0
        for c in self.clients.values():
            c.count = 0
            c.last_seq = -1
        if self.shared is not None:
            self.shared[self.base + W_DELIV] = 0

    async def run(self):
        self.loop = loop = asyncio.get_running_loop()
        q = asyncio.Queue()

        def on_cmd():
            try:
                q.put_nowait(self.conn.recv())
            except (EOFError, OSError):
                loop.remove_reader(self.conn.fileno())
                q.put_nowait(("exit", None))

        loop.add_reader(self.conn.fileno(), on_cmd)
        while True:
            cmd, arg = await q.get()
            if cmd == "connect":
                self.conn.send(await self.connect_all())
            elif cmd == "reset":
                self._reset(arg)
                self.conn.send(sorted(i for i, c in self.clients.items() if c.open and not c.closing))
            elif cmd == "collect":
                self.conn.send(self.collect())
            elif cmd == "up":
                self.conn.send(self.send_up(arg))
            elif cmd == "close":
                self.conn.send(await self.close_all(arg))
            elif cmd == "exit":
                for c in self.clients.values():
                    if c.tr is not None:
                        c.tr.abort()
                return

    async def connect_all(self):
        cfg = self.cfg
        timeout = cfg["connect_timeout"]
        lat = array("q")
        failures = Counter()
        examples = {}
        it = iter(self.specs)
        shared = self.shared
        base = self.base
        opened = 0
        failed = 0

        async def one(idx, sid, token):
            c = Client(self, idx, sid, token)
            t0 = time.perf_counter_ns()
            try:
                await asyncio.wait_for(self._open(c), timeout)
            except Exception as e:  # noqa: BLE001 - every failure is counted
                if c.tr is not None:
                    c.tr.abort()
                return False, _errname(e)
            lat.append(time.perf_counter_ns() - t0)
            self.clients[idx] = c
            return True, None

        async def runner():
            nonlocal opened, failed
            for idx, sid, token in it:
                ok, why = await one(idx, sid, token)
                if ok:
                    opened += 1
                    shared[base + W_OPEN] = opened
                else:
                    failed += 1
                    failures[why] += 1
                    examples.setdefault(why, sid)
                    shared[base + W_FAIL] = failed

        t0 = time.perf_counter()
        n = max(1, min(cfg["concurrency_per_worker"], len(self.specs)))
        await asyncio.gather(*(runner() for _ in range(n)))
        return {"opened": opened, "failed": failed, "failures": dict(failures),
                "examples": examples, "lat": lat.tobytes(),
                "seconds": time.perf_counter() - t0}

    async def _open(self, c):
        await self.loop.create_connection(lambda: c, self.host, self.port)
        await c.fut

    def collect(self):
        counts = array("q")
        for idx, c in self.clients.items():
            counts.append(idx)
            counts.append(c.count)
        return {"delivered": self.delivered, "counts": counts.tobytes(), "lat": self.lat.tobytes(),
                "first_ns": self.first_ns, "last_ns": self.last_ns, "stray": self.stray,
                "misrouted": self.misrouted, "out_of_order": self.out_of_order,
                "wrong_opcode": self.wrong_opcode, "bad_size": self.bad_size,
                "corrupt": self.corrupt, "protocol_errors": self.protocol_errors,
                "dropped": self.dropped, "open": self.open_count}

    def send_up(self, arg):
        k = arg["k"]
        size = arg["size"]
        tag = arg["tag"]
        op = 2 if arg["binary"] else 1
        pad = make_pad(size, arg["binary"])[: size - HEADER_LEN]
        t0 = time_ns()
        sent = 0
        for idx, c in self.clients.items():
            if not c.open or c.closing or c.tr.is_closing():
                continue
            frames = [client_frame(op, b"%c%019d%08d%08d" % (tag, time_ns(), idx, seq) + pad)
                      for seq in range(k)]
            c.tr.write(b"".join(frames))
            sent += k
        return {"sent": sent, "t0": t0, "t1": time_ns()}

    async def close_all(self, timeout):
        self.all_closed = asyncio.Event()
        dropped_before = self.dropped
        frame = client_frame(8, (1000).to_bytes(2, "big"))
        closing = [c for c in self.clients.values() if c.open and not c.closing]
        for c in closing:
            c.closing = True
            c.tr.write(frame)
        if self.open_count > 0:
            try:
                await asyncio.wait_for(self.all_closed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        clean = sum(1 for c in closing if c.lost and c.got_close is not None)
        no_close_frame = sum(1 for c in closing if c.lost and c.got_close is None)
        aborted = 0
        for c in closing:
            if not c.lost:
                aborted += 1
                c.tr.abort()
        await asyncio.sleep(0)
        return {"closed": len(closing), "clean": clean, "no_close_frame": no_close_frame,
                "timed_out": aborted, "dropped": dropped_before,
                "server_close_codes": dict(self.server_close_codes)}


def worker_entry(wid, clients, cfg, conn, shared):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(Worker(wid, clients, cfg, conn, shared).run())
    except Exception as e:  # noqa: BLE001 - reported to the parent
        try:
            conn.send({"worker_error": f"{type(e).__name__}: {e}"})
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------- publisher / subscriber processes


def _redis_conn(url):
    pool = redis.ConnectionPool.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                        protocol=2)  # RESP2: pmessages as plain replies
    try:
        c = pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        c = pool.get_connection("PUBLISH")
    c.connect()
    return c


def _publish_prefix(sid, size):
    ch = f"session:{sid}:down".encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n" % (len(ch), ch, size)


def publisher_entry(pub_id, cfg, conn, shared, slot):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    c = None
    while True:
        try:
            cmd, arg = conn.recv()
        except (EOFError, OSError):
            return
        if cmd == "exit":
            return
        try:
            if c is None:
                c = _redis_conn(cfg["redis_url"])
            if cmd == "burst":
                res = _pub_burst(c, arg, shared, slot)
            elif cmd == "paced":
                res = _pub_paced(c, arg, shared, slot)
            else:
                res = {"error": f"unknown command {cmd}"}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            res = {"error": f"{type(e).__name__}: {e}"}
            c = None
        conn.send(res)


def _read_int_replies(c, n):
    zero = 0
    rr = c.read_response
    for _ in range(n):
        if rr() == 0:
            zero += 1
    return zero


def _pub_burst(c, arg, shared, slot):
    sessions = arg["sessions"]  # list of (idx, sid)
    k, size, tag, binary = arg["k"], arg["size"], arg["tag"], arg["binary"]
    batch = arg.get("batch", 256)
    pad = make_pad(size, binary)[: size - HEADER_LEN]
    pre = [(idx, _publish_prefix(sid, size)) for idx, sid in sessions]
    sent = 0
    zero = 0
    pending = 0  # replies of the previous batch still to read (keeps one batch in flight)
    parts = []
    t0 = time_ns()
    for seq in range(k):
        for idx, p in pre:
            parts.append(p + b"%c%019d%08d%08d" % (tag, time_ns(), idx, seq) + pad + b"\r\n")
            if len(parts) >= batch:
                c.send_packed_command([b"".join(parts)], check_health=False)
                if pending:
                    zero += _read_int_replies(c, pending)
                pending = len(parts)
                sent += pending
                shared[slot] = sent
                parts = []
    if parts:
        c.send_packed_command([b"".join(parts)], check_health=False)
        if pending:
            zero += _read_int_replies(c, pending)
        pending = len(parts)
        sent += pending
    if pending:
        zero += _read_int_replies(c, pending)
    shared[slot] = sent
    t1 = time_ns()
    per = array("q")
    for idx, _ in sessions:
        per.append(idx)
        per.append(k)
    return {"sent": sent, "no_receivers": zero, "t0": t0, "t1": t1, "per": per.tobytes(),
            "max_lag_ms": 0.0}


def _pub_paced(c, arg, shared, slot):
    sessions = arg["sessions"]
    rate, duration, size, tag, binary = (arg["rate"], arg["duration"], arg["size"], arg["tag"],
                                         arg["binary"])
    pad = make_pad(size, binary)[: size - HEADER_LEN]
    pre = [(idx, _publish_prefix(sid, size)) for idx, sid in sessions]
    nsess = len(pre)
    total = int(rate * duration)
    seqs = [0] * nsess
    sent = 0
    zero = 0
    ptr = 0
    max_lag = 0.0
    start = time.monotonic()
    t0 = time_ns()
    deadline = start + duration + 30.0  # hard bound even if the machine stalls
    while sent < total:
        now = time.monotonic()
        if now > deadline:
            break
        due = min(total, int((now - start) * rate) + 1)
        if due > sent:
            lag = now - (start + sent / rate)
            if lag > max_lag:
                max_lag = lag
            parts = []
            for _ in range(due - sent):
                idx, p = pre[ptr]
                parts.append(p + b"%c%019d%08d%08d" % (tag, time_ns(), idx, seqs[ptr]) + pad + b"\r\n")
                seqs[ptr] += 1
                ptr += 1
                if ptr == nsess:
                    ptr = 0
            c.send_packed_command([b"".join(parts)], check_health=False)
            zero += _read_int_replies(c, len(parts))
            sent = due
            shared[slot] = sent
        wait = start + sent / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    t1 = time_ns()
    per = array("q")
    for i, (idx, _) in enumerate(pre):
        per.append(idx)
        per.append(seqs[i])
    return {"sent": sent, "no_receivers": zero, "t0": t0, "t1": t1, "per": per.tobytes(),
            "max_lag_ms": round(max_lag * 1000, 3)}


def subscriber_entry(cfg, conn, shared, slot):
    """PSUBSCRIBEs to this run's up channels and counts/timestamps what arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cmd, arg = conn.recv()
        if cmd != "start":
            return
        c = _redis_conn(cfg["redis_url"])
        pattern = arg["pattern"].encode()
        c.send_command("PSUBSCRIBE", pattern)
        c.read_response()
        conn.send("ready")
        n = arg["n"]
        tag = arg["tag"]
        chans = arg["channels"]  # idx -> channel bytes (dict)
        counts = array("q", bytes(8 * n))
        lat = array("q")
        arrived = stray = misrouted = corrupt = 0
        first = last = 0
        deadline = time.monotonic() + arg["max_seconds"]
        while time.monotonic() < deadline:
            if conn.poll(0):
                conn.recv()  # "stop" (or "exit")
                break
            if not c.can_read(timeout=0.05):
                continue
            now = time_ns()
            got = 0
            while True:
                m = c.read_response()
                if m[0] == b"pmessage":
                    payload = m[3]
                    if len(payload) >= HEADER_LEN and payload[0] == tag:
                        try:
                            ts = int(payload[1:20])
                            idx = int(payload[20:28])
                        except ValueError:
                            corrupt += 1
                        else:
                            lat.append(now - ts)
                            got += 1
                            if 0 <= idx < n:
                                counts[idx] += 1
                                if chans.get(idx) != m[2]:
                                    misrouted += 1
                            else:
                                misrouted += 1
                    else:
                        stray += 1
                if not c.can_read(timeout=0):
                    break
            if got:
                arrived += got
                shared[slot] = arrived
                if not first:
                    first = now
                last = now
        try:
            c.disconnect()
        except Exception:  # noqa: BLE001
            pass
        conn.send({"arrived": arrived, "stray": stray, "misrouted": misrouted, "corrupt": corrupt,
                   "counts": counts.tobytes(), "lat": lat.tobytes(), "first_ns": first,
                   "last_ns": last})
    except Exception as e:  # noqa: BLE001 - reported to the parent
        try:
            conn.send({"error": f"{type(e).__name__}: {e}"})
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------- orchestration


class Progress:
    def __init__(self, enabled):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0
        self.dirty = False

    def show(self, text, force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self.last_print >= 0.2:
                sys.stderr.write("\r" + text + "\x1b[K")
                sys.stderr.flush()
                self.last_print = now
                self.dirty = True
        elif force or now - self.last_print >= 5.0:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self.last_print = now

    def done(self):
        if self.enabled and self.tty and self.dirty:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.dirty = False


class Sampler:
    """CPU seconds of named processes + host busy jiffies at one instant."""

    def __init__(self, procs):
        self.procs = procs  # name -> pid (tool processes) ; 'proxy' / 'redis' optional

    def sample(self):
        return (time.monotonic(), {n: proc_cpu(p) for n, p in self.procs.items()}, host_cpu())


def cpu_between(s0, s1):
    """Per-process CPU utilisation (fraction of one core) and host busy fraction."""
    dt = s1[0] - s0[0]
    out = {}
    for name, v0 in s0[1].items():
        v1 = s1[1].get(name)
        if v0 is None or v1 is None or dt <= 0:
            out[name] = None
        else:
            out[name] = (v1 - v0) / dt
    hb = s1[2][0] - s0[2][0]
    ht = s1[2][1] - s0[2][1]
    return out, (hb / ht if ht > 0 else None)


class Run:
    def __init__(self, args):
        self.a = args
        self.problems = []
        self.result = {}
        self.progress = Progress(not args.json_only)
        self.children = []

    # -- setup
    def preflight(self):
        a = self.a
        u = urlsplit(a.url)
        if u.scheme != "ws":
            raise Fatal(f"--url must be ws://HOST:PORT (got {a.url!r}); wss is not supported")
        if not u.hostname:
            raise Fatal(f"--url has no host: {a.url!r}")
        self.host = u.hostname
        self.port = u.port or 80
        self.host_header = u.netloc.rpartition("@")[2]
        self.local_target = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        self.path_prefix = u.path.rstrip("/")
        if a.size < MIN_SIZE:
            raise Fatal(f"--size must be at least {MIN_SIZE} bytes (the payload carries a header)")
        if a.clients < 1 or a.procs < 1 or a.publishers < 1 or a.concurrency < 1:
            raise Fatal("--clients, --procs, --publishers and --concurrency must be >= 1")
        if a.pid and proc_cpu(a.pid) is None:
            raise Fatal(f"--pid {a.pid}: no such process (or /proc/{a.pid}/stat unreadable)")
        # Redis
        try:
            self.r = redis.Redis.from_url(a.redis_url, socket_connect_timeout=3, socket_timeout=10)
            self.r.ping()
            info = self.r.info("server")
        except Exception as e:  # noqa: BLE001
            raise Fatal(f"cannot reach Redis at {a.redis_url}: {e}") from None
        self.redis_pid = None
        rp = info.get("process_id")
        rhost = urlsplit(a.redis_url).hostname or "127.0.0.1"
        if rp and rhost in ("127.0.0.1", "localhost", "::1") and proc_cpu(rp) is not None:
            self.redis_pid = int(rp)
        self.redis_version = info.get("redis_version")
        # wsproxy /health
        status, body = self.http_get("/health")
        if status is None:
            raise Fatal(f"cannot reach wsproxy at {a.url}: {body}")
        try:
            self.health = json.loads(body)
        except ValueError:
            self.health = body[:200]
        if status != 200:
            self.warn(f"wsproxy /health answered HTTP {status}: {body[:200]!r}")

    def http_get(self, path):
        try:
            s = socket.create_connection((self.host, self.port), timeout=3)
        except OSError as e:
            return None, _errname(e)
        try:
            s.sendall(f"GET {self.path_prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                      "Connection: close\r\n\r\n".encode())
            data = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(data) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    cl = None
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            cl = int(v.strip())
                    if cl is not None and len(rest) >= cl:
                        break
        except OSError as e:
            return None, _errname(e)
        finally:
            s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None, "not an HTTP server (bad /health response)"
        if b"transfer-encoding: chunked" in head.lower():
            out = b""
            while body:
                size_line, _, rest = body.partition(b"\r\n")
                try:
                    n = int(size_line.split(b";")[0], 16)
                except ValueError:
                    break
                if n == 0:
                    break
                out += rest[:n]
                body = rest[n + 2:]
            body = out
        return status, body.decode("utf-8", "replace")

    def warn(self, msg):
        self.progress.done()
        sys.stderr.write(f"load_test: warning: {msg}\n")

    def raise_nofile(self):
        """Soft RLIMIT_NOFILE up to the hard limit (and the hard one too if root and needed)."""
        need = -(-self.a.clients // self.a.procs) + 256
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and need > hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
                return
            except (ValueError, OSError):
                self.warn(f"RLIMIT_NOFILE hard limit {hard} < {need} descriptors needed per "
                          "worker; use more --procs or raise the limit")
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass

    def make_sessions(self):
        a = self.a
        self.run_id = secrets.token_hex(4)
        self.sids = [f"lt-{self.run_id}-{i}" for i in range(a.clients)]
        self.tokens = [secrets.token_urlsafe(18) for _ in range(a.clients)]
        self.auth_set = False
        try:
            pipe = self.r.pipeline(transaction=False)
            for i, sid in enumerate(self.sids):
                pipe.execute_command("SETEX", f"session:{sid}:auth", a.token_ttl, self.tokens[i])
                if i % 2000 == 1999:
                    pipe.execute()
            pipe.execute()
            self.auth_set = True
        except Exception as e:  # noqa: BLE001
            raise Fatal(f"Redis error while storing tokens: {e}") from None

    def cleanup_tokens(self):
        if not getattr(self, "sids", None):
            return
        try:
            pipe = self.r.pipeline(transaction=False)
            for i, sid in enumerate(self.sids):
                pipe.delete(f"session:{sid}:auth")
                if i % 2000 == 1999:
                    pipe.execute()
            pipe.execute()
        except Exception as e:  # noqa: BLE001
            self.warn(f"could not delete the tokens (they expire after {self.a.token_ttl}s): {e}")

    def spawn(self):
        a = self.a
        ctx = mp.get_context("fork")
        nslots = a.procs * W_STRIDE + a.publishers + 1
        self.shared = ctx.RawArray("q", nslots)
        self.pub_base = a.procs * W_STRIDE
        self.sub_slot = nslots - 1
        cfg = {"host": self.host, "port": self.port, "host_header": self.host_header,
               "path_prefix": self.path_prefix, "agent": a.agent, "auth": a.auth,
               "size": a.size, "binary": a.binary, "connect_timeout": a.connect_timeout,
               "concurrency_per_worker": max(1, math.ceil(a.concurrency / a.procs)),
               "redis_url": a.redis_url}
        self.workers = []
        for w in range(a.procs):
            specs = [(i, self.sids[i], self.tokens[i]) for i in range(w, a.clients, a.procs)]
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_entry, args=(w, specs, cfg, child, self.shared),
                            name=f"lt-worker-{w}", daemon=True)
            p.start()
            child.close()
            self.workers.append((p, parent))
            self.children.append(p)
        self.pubs = []
        if {"down", "paced"} & set(self.phases):
            for i in range(a.publishers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=publisher_entry,
                                args=(i, cfg, child, self.shared, self.pub_base + i),
                                name=f"lt-publisher-{i}", daemon=True)
                p.start()
                child.close()
                self.pubs.append((p, parent))
                self.children.append(p)
        self.sub = None
        if "up" in self.phases:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=subscriber_entry, args=(cfg, child, self.shared, self.sub_slot),
                            name="lt-subscriber", daemon=True)
            p.start()
            child.close()
            self.sub = (p, parent)
            self.children.append(p)
        procs = {f"worker{i}": p.pid for i, (p, _) in enumerate(self.workers)}
        procs.update({f"publisher{i}": p.pid for i, (p, _) in enumerate(self.pubs)})
        if self.sub:
            procs["subscriber"] = self.sub[0].pid
        if a.pid:
            procs["proxy"] = a.pid
        if self.redis_pid:
            procs["redis"] = self.redis_pid
        self.sampler = Sampler(procs)

    def shutdown_children(self):
        for p, conn in self.workers if hasattr(self, "workers") else []:
            try:
                conn.send(("exit", None))
            except Exception:  # noqa: BLE001
                pass
        aux = list(getattr(self, "pubs", []))
        if getattr(self, "sub", None):
            aux.append(self.sub)
        for p, conn in aux:
            try:
                conn.send(("exit", None))
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 5
        for p in self.children:
            p.join(max(0.05, deadline - time.monotonic()))
        for p in self.children:
            if p.is_alive():
                p.terminate()  # one of our own children, by its own handle
                p.join(2)

    # -- counters
    def sh(self, off):
        return sum(self.shared[w * W_STRIDE + off] for w in range(self.a.procs))

    def pub_sent(self):
        return sum(self.shared[self.pub_base + i] for i in range(self.a.publishers))

    # -- messaging
    def gather(self, conns, timeout, tick, what):
        replies = [None] * len(conns)
        pending = {id(c): i for i, c in enumerate(conns)}
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise Fatal(f"timed out after {timeout:.0f}s waiting for {what}")
            ready = mpc.wait([conns[i] for i in pending.values()], timeout=0.1)
            for c in ready:
                i = pending.pop(id(c))
                try:
                    r = c.recv()
                except (EOFError, OSError):
                    raise Fatal(f"a {what.split()[0]} process died") from None
                if isinstance(r, dict) and ("worker_error" in r):
                    raise Fatal(f"worker failed: {r['worker_error']}")
                replies[i] = r
            if tick:
                tick()
        return replies

    def ask_workers(self, msg, timeout, tick=None, what="worker replies"):
        conns = [c for _, c in self.workers]
        for c in conns:
            c.send(msg)
        return self.gather(conns, timeout, tick, what)

    # -- phases
    def tool_names(self):
        return [n for n in self.sampler.procs if n not in ("proxy", "redis")]

    def cpu_report(self, s0, s1, rep, msgs=None, conns=None):
        """Adds proxy/redis/tool CPU figures for the active window s0..s1 into rep."""
        util, hostu = cpu_between(s0, s1)
        tool = {n: util[n] for n in self.tool_names() if util.get(n) is not None}
        roles = {}
        for n, u in tool.items():
            role = n.rstrip("0123456789")
            roles[role] = max(roles.get(role, 0.0), u)
        top = max(tool.values()) if tool else 0.0
        rep["tool_cpu"] = {k: round(v, 3) for k, v in roles.items()}
        rep["host_cpu"] = round(hostu, 3) if hostu is not None else None
        rep["tool_saturated"] = bool(top >= self.a.saturation)
        # every core busy: the proxy, Redis and this tool (and anything else on the
        # host) compete for CPU, so the figures describe the host as much as the proxy
        rep["host_saturated"] = bool(hostu is not None and hostu >= 0.95)
        if rep["tool_saturated"]:
            busiest = max(tool, key=tool.get)
            rep["tool_note"] = (f"load tool saturated: {busiest} at {top:.0%} CPU; "
                                "figures are a lower bound (try more --procs/--publishers)")
        for name in ("proxy", "redis"):
            if name in self.sampler.procs and util.get(name) is not None:
                rep[f"{name}_cpu_util"] = round(util[name], 3)
        return rep

    def proxy_cost(self, rep, c0, c1, key, count, scale=1e6, unit="us"):
        for name in ("proxy", "redis"):
            if name not in self.sampler.procs:
                continue
            a0, a1 = c0[1].get(name), c1[1].get(name)
            if a0 is None or a1 is None or not count:
                continue
            rep[f"{name}_cpu_{unit}_per_{key}"] = round((a1 - a0) * scale / count, 2)
            rep[f"{name}_cpu_seconds"] = round(a1 - a0, 3)

    def phase_connect(self):
        a = self.a
        rep = {"clients": a.clients, "concurrency": a.concurrency}
        rss0 = proc_rss(a.pid) if a.pid else None
        lo0 = listen_overflows() if self.local_target else None
        s0 = self.sampler.sample()
        t0 = time.monotonic()

        def tick():
            self.progress.show(f"[connect] open {self.sh(W_OPEN)}/{a.clients}  failed {self.sh(W_FAIL)}"
                               f"  {time.monotonic() - t0:5.1f}s")

        timeout = a.connect_timeout + a.clients / max(1.0, a.concurrency) * a.connect_timeout + 60
        res = self.ask_workers(("connect", None), timeout, tick, "worker connect results")
        dt = time.monotonic() - t0
        s1 = self.sampler.sample()
        self.progress.show(f"[connect] open {self.sh(W_OPEN)}/{a.clients}  failed {self.sh(W_FAIL)}"
                           f"  {dt:5.1f}s", force=True)
        self.progress.done()
        rss1 = proc_rss(a.pid) if a.pid else None
        lo1 = listen_overflows() if self.local_target else None
        opened = sum(r["opened"] for r in res)
        failed = sum(r["failed"] for r in res)
        failures = Counter()
        examples = {}
        lat = array("q")
        for r in res:
            failures.update(r["failures"])
            for k, v in r["examples"].items():
                examples.setdefault(k, v)
            lat.frombytes(r["lat"])
        rep.update({"ok": opened, "failed": failed, "failures": dict(failures),
                    "seconds": round(dt, 3), "rate_per_s": round(opened / dt, 1) if dt > 0 else None,
                    "latency_ms": latency_summary(lat)})
        if lo0 is not None and lo1 is not None:
            rep["listen_overflows"] = lo1 - lo0
            if lo1 > lo0:
                self.warn(f"connect: the kernel dropped {lo1 - lo0} SYNs because a listen "
                          "backlog was full (host-wide TcpExt ListenOverflows); each costs the "
                          "client a ~1 s retry: the proxy's listen backlog is likely too small "
                          "for --concurrency")
        if failed:
            ex = ", ".join(f"{k} (e.g. {v})" for k, v in list(examples.items())[:3])
            self.problems.append(f"connect: {failed} of {a.clients} connections failed: {ex}")
        self.cpu_report(s0, s1, rep)
        self.proxy_cost(rep, s0, s1, "conn", opened)
        if rss0 is not None and rss1 is not None:
            rep["proxy_rss_mib_before"] = round(rss0 / 2**20, 1)
            rep["proxy_rss_mib_after"] = round(rss1 / 2**20, 1)
            if opened:
                rep["proxy_rss_kib_per_conn"] = round((rss1 - rss0) / 1024 / opened, 2)
        self.opened = opened
        return rep

    def reset_workers(self, tag):
        lists = self.ask_workers(("reset", tag), 30)
        return sorted(i for lst in lists for i in lst)

    def settle(self, target_fn, count_fn, label, busy_fn, t_start):
        """Waits for a phase to finish.  Returns (last_change_sample, end_sample)."""
        a = self.a
        last = -1
        last_change = time.monotonic()
        active_end = None
        hard = time.monotonic() + a.phase_timeout
        proxy_hist = []  # (time, proxy CPU seconds) to tell a stalled proxy from an idle one
        while True:
            now = time.monotonic()
            if a.pid:
                proxy_hist.append((now, proc_cpu(a.pid)))
                while len(proxy_hist) > 2 and proxy_hist[1][0] <= now - a.settle:
                    proxy_hist.pop(0)
            c = count_fn()
            target = target_fn()
            busy = busy_fn()
            if c != last:
                last = c
                last_change = now
                active_end = None
            if active_end is None:
                active_end = self.sampler.sample()
            self.progress.show(f"[{label}] conns {self.sh(W_OPEN) - self.sh(W_DROP)}  sent {target}"
                               f"  delivered {c}  {now - t_start:5.1f}s")
            if not busy:
                # done when everything arrived; else when arrivals stopped for --settle
                # (counted from the end of sending; before the first arrival, wait the
                # whole --settle-max: a busy proxy may hold everything back for a while)
                if c >= target:
                    break
                quiet = now - max(last_change, self.busy_end)
                if quiet >= a.settle and proxy_hist and proxy_hist[0][1] is not None \
                        and proxy_hist[-1][1] is not None and now - proxy_hist[0][0] > 0:
                    # still burning CPU: it is working through a backlog, keep waiting
                    if (proxy_hist[-1][1] - proxy_hist[0][1]) / (now - proxy_hist[0][0]) > 0.3:
                        quiet = 0.0
                if (c > 0 and quiet >= a.settle) or now - self.busy_end >= a.settle_max:
                    break
            if now > hard:
                self.problems.append(f"{label}: phase timed out after {a.phase_timeout}s")
                break
            yield_wait = 0.05 if busy else 0.02
            self._busy_poll(yield_wait)
        end = self.sampler.sample()
        self.progress.show(f"[{label}] sent {target_fn()}  delivered {count_fn()}", force=True)
        self.progress.done()
        return (active_end or end), end

    def _busy_poll(self, t):
        """Sleeps t seconds, collecting publisher / subscriber replies meanwhile."""
        conns = [c for c in self._await_conns if id(c) not in self._await_done]
        if not conns:
            time.sleep(t)
            return
        for c in mpc.wait(conns, timeout=t):
            try:
                self._await_done[id(c)] = c.recv()
            except (EOFError, OSError):
                raise Fatal("a publisher process died") from None
            if not [x for x in self._await_conns if id(x) not in self._await_done]:
                self.busy_end = time.monotonic()

    def _start_async(self, conns):
        self._await_conns = conns
        self._await_done = {}
        self.busy_end = time.monotonic() + 1e9

    def collect_workers(self):
        return self.ask_workers(("collect", None), 60)

    def phase_down(self, kind):
        a = self.a
        tag = TAGS[kind]
        sessions = self.reset_workers(tag)
        rep = {"sessions": len(sessions), "size": a.size}
        if kind == "down":
            rep["per_session"] = a.burst
        else:
            rep["rate"] = a.rate
            rep["duration"] = a.duration
        if not sessions:
            self.problems.append(f"{kind}: no open connection to publish to")
            return rep
        P = min(a.publishers, len(sessions))
        pubs = self.pubs[:P]
        for i in range(a.publishers):
            self.shared[self.pub_base + i] = 0
        s0 = self.sampler.sample()
        t0 = time.monotonic()
        for i, (_, conn) in enumerate(pubs):
            part = [(idx, self.sids[idx]) for idx in sessions[i::P]]
            if kind == "down":
                conn.send(("burst", {"sessions": part, "k": a.burst, "size": a.size, "tag": tag,
                                     "binary": a.binary}))
            else:
                conn.send(("paced", {"sessions": part, "rate": a.rate / P, "duration": a.duration,
                                     "size": a.size, "tag": tag, "binary": a.binary}))
        self._start_async([c for _, c in pubs])
        s_active, s_end = self.settle(self.pub_sent, lambda: self.sh(W_DELIV), kind,
                                      lambda: len(self._await_done) < len(pubs), t0)
        pres = [self._await_done.get(id(c)) for _, c in pubs]
        for r in pres:
            if r is None or "error" in r:
                raise Fatal(f"Redis error while publishing: {r and r.get('error')}")
        wres = self.collect_workers()
        sent = sum(r["sent"] for r in pres)
        sent_per = {}
        for r in pres:
            v = array("q")
            v.frombytes(r["per"])
            for j in range(0, len(v), 2):
                sent_per[v[j]] = v[j + 1]
        got_per = {}
        lat = array("q")
        agg = Counter()
        first = min((r["first_ns"] for r in wres if r["first_ns"]), default=0)
        last = max((r["last_ns"] for r in wres), default=0)
        for r in wres:
            v = array("q")
            v.frombytes(r["counts"])
            for j in range(0, len(v), 2):
                got_per[v[j]] = v[j + 1]
            lat.frombytes(r["lat"])
            for k in ("stray", "misrouted", "out_of_order", "wrong_opcode", "bad_size", "corrupt",
                      "protocol_errors"):
                agg[k] += r[k]
        delivered = sum(r["delivered"] for r in wres)
        lost = sum(max(0, s - got_per.get(i, 0)) for i, s in sent_per.items())
        dup = sum(max(0, got_per.get(i, 0) - s) for i, s in sent_per.items())
        lossy = sum(1 for i, s in sent_per.items() if got_per.get(i, 0) < s)
        pub_t0 = min(r["t0"] for r in pres)
        pub_t1 = max(r["t1"] for r in pres)
        rep.update({"sent": sent, "delivered": delivered, "lost": lost,
                    "sessions_with_loss": lossy, "duplicates": dup,
                    "publish_no_receiver": sum(r["no_receivers"] for r in pres),
                    "publish_seconds": round((pub_t1 - pub_t0) / 1e9, 3)})
        if kind == "down":
            rep["publish_rate_per_s"] = round(sent / max(1e-9, (pub_t1 - pub_t0) / 1e9), 1)
            if delivered and last > pub_t0:
                rep["delivery_rate_per_s"] = round(delivered / ((last - pub_t0) / 1e9), 1)
        else:
            rep["achieved_rate_per_s"] = round(sent / max(1e-9, (pub_t1 - pub_t0) / 1e9), 1)
            rep["publisher_max_lag_ms"] = max(r["max_lag_ms"] for r in pres)
            if rep["publisher_max_lag_ms"] > 50:
                self.warn(f"paced: publishers fell {rep['publisher_max_lag_ms']} ms behind schedule")
        rep["latency_ms"] = latency_summary(lat)
        for k, v in agg.items():
            if v:
                rep[k] = v
        if first:
            rep["first_delivery_ms"] = round((first - pub_t0) / 1e6, 3)
        self.cpu_report(s0, s_active, rep)
        self.proxy_cost(rep, s0, s_end, "msg", delivered)
        if lost:
            self.problems.append(f"{kind}: {lost} of {sent} messages lost "
                                 f"({lossy} sessions affected)")
        if dup:
            self.problems.append(f"{kind}: {dup} duplicate deliveries")
        for k in ("misrouted", "out_of_order", "corrupt", "wrong_opcode", "bad_size",
                  "protocol_errors"):
            if agg[k]:
                self.problems.append(f"{kind}: {agg[k]} messages {k.replace('_', ' ')}")
        if agg["stray"]:
            self.warn(f"{kind}: {agg['stray']} late messages from an earlier phase arrived")
        return rep

    def phase_up(self):
        a = self.a
        tag = TAGS["up"]
        sessions = self.reset_workers(tag)
        rep = {"clients": len(sessions), "per_client": a.upstream, "size": a.size}
        if not sessions:
            self.problems.append("up: no open connection to send from")
            return rep
        _, sconn = self.sub
        chans = {i: f"session:{self.sids[i]}:up".encode() for i in sessions}
        sconn.send(("start", {"pattern": f"session:lt-{self.run_id}-*:up", "n": a.clients,
                              "tag": tag, "channels": chans, "max_seconds": a.phase_timeout + 60}))
        ready = self.gather([sconn], 15, None, "subscriber start")[0]
        if ready != "ready":
            raise Fatal(f"Redis error in the subscriber: {ready.get('error') if isinstance(ready, dict) else ready}")
        s0 = self.sampler.sample()
        t0 = time.monotonic()
        conns = [c for _, c in self.workers]
        for c in conns:
            c.send(("up", {"k": a.upstream, "size": a.size, "tag": tag, "binary": a.binary}))
        self._start_async(conns)
        s_active, s_end = self.settle(lambda: sum(r["sent"] for r in self._await_done.values()),
                                      lambda: self.shared[self.sub_slot], "up",
                                      lambda: len(self._await_done) < len(conns), t0)
        wres = [self._await_done[id(c)] for c in conns]
        sconn.send(("stop", None))
        sres = self.gather([sconn], 60, None, "subscriber results")[0]
        if "error" in sres:
            raise Fatal(f"Redis error in the subscriber: {sres['error']}")
        sent = sum(r["sent"] for r in wres)
        counts = array("q")
        counts.frombytes(sres["counts"])
        lat = array("q")
        lat.frombytes(sres["lat"])
        per = a.upstream
        lost = sum(max(0, per - counts[i]) for i in sessions)
        dup = sum(max(0, counts[i] - per) for i in sessions)
        lossy = sum(1 for i in sessions if counts[i] < per)
        t_send0 = min(r["t0"] for r in wres)
        rep.update({"sent": sent, "arrived": sres["arrived"], "lost": lost,
                    "sessions_with_loss": lossy, "duplicates": dup,
                    "send_seconds": round((max(r["t1"] for r in wres) - t_send0) / 1e9, 3)})
        if sres["arrived"] and sres["last_ns"] > t_send0:
            rep["rate_per_s"] = round(sres["arrived"] / ((sres["last_ns"] - t_send0) / 1e9), 1)
        rep["latency_ms"] = latency_summary(lat)
        for k in ("misrouted", "corrupt", "stray"):
            if sres[k]:
                rep[k] = sres[k]
        self.cpu_report(s0, s_active, rep)
        self.proxy_cost(rep, s0, s_end, "msg", sres["arrived"])
        if lost:
            self.problems.append(f"up: {lost} of {sent} messages lost ({lossy} sessions affected)")
        if dup:
            self.problems.append(f"up: {dup} duplicate messages")
        if sres["misrouted"]:
            self.problems.append(f"up: {sres['misrouted']} messages on the wrong channel")
        return rep

    def phase_close(self):
        res = self.ask_workers(("close", self.a.close_timeout), self.a.close_timeout + 30)
        agg = Counter()
        codes = Counter()
        for r in res:
            for k in ("closed", "clean", "no_close_frame", "timed_out", "dropped"):
                agg[k] += r[k]
            codes.update(r["server_close_codes"])
        rep = dict(agg)
        if codes:
            rep["server_close_codes"] = {str(k): v for k, v in codes.items()}
        if agg["dropped"]:
            self.problems.append(f"{agg['dropped']} open connections were dropped during the run"
                                 + (f" (server close codes {dict(codes)})" if codes else ""))
        return rep

    # -- main
    def run(self):
        a = self.a
        phases = [p.strip() for p in a.phases.split(",") if p.strip()]
        bad = [p for p in phases if p not in PHASES]
        if bad:
            raise Fatal(f"unknown phase(s) {','.join(bad)}; choose from {','.join(PHASES)}")
        self.phases = [p for p in PHASES if p in phases or p == "connect"]
        self.preflight()
        self.raise_nofile()
        try:
            self.make_sessions()
            self.spawn()
            out = self.result
            out.update({"tool": "wsproxy-load-test", "url": a.url, "redis_url": a.redis_url,
                        "run_id": self.run_id,
                        "config": {"clients": a.clients, "concurrency": a.concurrency,
                                   "procs": a.procs, "publishers": a.publishers,
                                   "burst": a.burst, "size": a.size, "rate": a.rate,
                                   "duration": a.duration, "upstream": a.upstream,
                                   "phases": self.phases, "binary": a.binary, "auth": a.auth,
                                   "pid": a.pid},
                        "health": self.health, "phases": {}})
            ph = out["phases"]
            ph["connect"] = self.phase_connect()
            if self.opened:
                for p in self.phases[1:]:
                    if p in ("down", "paced"):
                        ph[p] = self.phase_down(p)
                    elif p == "up":
                        ph[p] = self.phase_up()
            out["close"] = self.phase_close()
        finally:
            self.progress.done()
            self.shutdown_children()
            self.cleanup_tokens()
        out["ok"] = not self.problems
        out["problems"] = self.problems
        return out


# ---------------------------------------------------------------- report


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def lat_str(d):
    if not d or d.get("p50") is None:
        return "-"
    return f"p50 {d['p50']:.3f}  p99 {d['p99']:.3f}  max {d['max']:.3f} ms"


def table(out):
    lines = []
    add = lines.append
    add(f"wsproxy load test  run {out['run_id']}  {out['url']}  redis {out['redis_url']}")
    cfg = out["config"]
    add(f"  clients {cfg['clients']}  concurrency {cfg['concurrency']}  procs {cfg['procs']}"
        f"  publishers {cfg['publishers']}  size {cfg['size']} B"
        f"{'  binary' if cfg['binary'] else ''}")
    W = 24

    def row(k, v):
        add(f"  {k:<{W}} {v}")

    def cpu_rows(p, per):
        for name in ("proxy", "redis"):
            key = f"{name}_cpu_us_per_{per}"
            if key in p:
                row(f"{name} CPU / {per}", f"{p[key]:,.2f} us  (busy {p.get(f'{name}_cpu_util', 0):.0%} of a core)")
        if p.get("tool_cpu") is not None:
            tc = "  ".join(f"{k} {v:.0%}" for k, v in p["tool_cpu"].items())
            hc = p.get("host_cpu")
            row("tool CPU (max/process)", tc + (f"   host {hc:.0%} of all cores" if hc is not None else ""))
        if p.get("tool_saturated"):
            row("!! SATURATED", p.get("tool_note", "load tool saturated"))
        if p.get("host_saturated"):
            row("!! host CPU", "all cores busy during the phase: proxy, Redis, this tool and "
                "other processes competed for CPU")

    ph = out["phases"]
    if "connect" in ph:
        p = ph["connect"]
        add("connect")
        row("opened / requested", f"{fmt(p['ok'])} / {fmt(p['clients'])}   failed {fmt(p['failed'])}"
            + (f"  {p['failures']}" if p["failures"] else ""))
        row("connect rate", f"{fmt(p['rate_per_s'])} /s   ({fmt(p['seconds'], 2)} s)")
        row("handshake latency", lat_str(p["latency_ms"]))
        cpu_rows(p, "conn")
        if "proxy_rss_kib_per_conn" in p:
            row("proxy RSS / conn", f"{p['proxy_rss_kib_per_conn']:,.2f} KiB  ({p['proxy_rss_mib_before']}"
                f" -> {p['proxy_rss_mib_after']} MiB)")
    for name, title in (("down", "downstream burst"), ("paced", "paced downstream")):
        if name not in ph:
            continue
        p = ph[name]
        add(f"{title}  ({p['sessions']:,} sessions"
            + (f", {p['per_session']} msgs each)" if name == "down" else f", {p['rate']}/s for {p['duration']} s)"))
        if "sent" not in p:
            continue
        row("delivered / sent", f"{fmt(p['delivered'])} / {fmt(p['sent'])}   lost {fmt(p['lost'])}"
            + (f"  duplicates {p['duplicates']}" if p["duplicates"] else ""))
        if name == "down":
            row("publish rate", f"{fmt(p.get('publish_rate_per_s'))} /s")
            row("delivery rate", f"{fmt(p.get('delivery_rate_per_s'))} /s")
        else:
            row("achieved rate", f"{fmt(p.get('achieved_rate_per_s'))} /s   (publisher lag max "
                f"{p.get('publisher_max_lag_ms')} ms)")
        row("latency", lat_str(p["latency_ms"]))
        cpu_rows(p, "msg")
    if "up" in ph:
        p = ph["up"]
        add(f"upstream burst  ({p['clients']:,} clients, {p['per_client']} msgs each)")
        if "sent" in p:
            row("arrived / sent", f"{fmt(p['arrived'])} / {fmt(p['sent'])}   lost {fmt(p['lost'])}")
            row("rate", f"{fmt(p.get('rate_per_s'))} /s")
            row("latency", lat_str(p["latency_ms"]))
            cpu_rows(p, "msg")
    if "close" in out:
        c = out["close"]
        add(f"close: {c.get('clean', 0):,} clean, {c.get('no_close_frame', 0):,} without close frame,"
            f" {c.get('timed_out', 0):,} timed out; dropped during run {c.get('dropped', 0):,}")
    add("RESULT: " + ("OK" if out["ok"] else "FAIL"))
    for pr in out["problems"]:
        add("  - " + pr)
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8080", help="wsproxy base URL (ws://HOST:PORT)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    ap.add_argument("--clients", type=int, default=200, help="connections, one session each")
    ap.add_argument("--concurrency", type=int, default=500, help="handshakes in flight")
    ap.add_argument("--burst", type=int, default=10, help="K messages per session (down phase)")
    ap.add_argument("--size", type=int, default=100, help=f"payload bytes (>= {MIN_SIZE})")
    ap.add_argument("--rate", type=float, default=2000, help="paced messages per second (total)")
    ap.add_argument("--duration", type=float, default=10, help="paced phase seconds")
    ap.add_argument("--upstream", type=int, default=10, help="K messages per client (up phase)")
    ap.add_argument("--phases", default="connect,down,paced,up")
    ap.add_argument("--pid", type=int, default=0, help="proxy process id for CPU / RSS figures (with WORKERS>1 the parent: its workers are counted too)")
    ap.add_argument("--json-only", action="store_true", help="only the JSON line, no table/progress")
    ap.add_argument("--token-ttl", type=int, default=600, help="seconds the tokens live in Redis")
    ap.add_argument("--agent", default="loadtest", help="agent id in the URL path")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="client worker processes")
    ap.add_argument("--publishers", type=int, default=1, help="publisher processes")
    ap.add_argument("--auth", choices=("header", "query"), default="header",
                    help="send the token as Authorization: Bearer or ?access_token=")
    ap.add_argument("--binary", action="store_true", help="non-UTF-8 payloads (binary frames)")
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=1.0,
                    help="end a phase when counts stop changing for this long")
    ap.add_argument("--settle-max", type=float, default=10.0,
                    help="longest wait for stragglers after publishing ends")
    ap.add_argument("--close-timeout", type=float, default=5.0)
    ap.add_argument("--phase-timeout", type=float, default=600.0, help="hard bound per phase")
    ap.add_argument("--saturation", type=float, default=0.85,
                    help="a tool process busier than this fraction of a core counts as saturated")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = Run(args)
    try:
        out = run.run()
    except Fatal as e:
        run.progress.done()
        sys.stderr.write(f"load_test: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        run.progress.done()
        sys.stderr.write("load_test: interrupted\n")
        return 130
    if not args.json_only:
        sys.stderr.write(table(out) + "\n")
    sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
