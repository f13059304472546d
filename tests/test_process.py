"""
The real daemon: C{twistd -n wsproxy} and C{python -m wsproxy} as child
processes, against a real redis-server.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from twisted.internet import error

from .support import (
    TWISTD,
    TWISTD_WSPROXY,
    Daemon,
    RedisTestCase,
    connect,
    daemon_env,
    raw_exchange,
    start_daemon,
    status_of,
    upgrade_request,
    wait_for,
)


def kill_pid_file(path: str) -> None:
    """
    Kill the daemon a pid file names, if any (a daemonized twistd is not
    our child: it would outlive a failed test).
    """
    try:
        with open(path) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass


class ProcessTests(RedisTestCase):
    timeout = 90

    def start(self, *args: str, **env: str) -> Daemon:
        base = daemon_env(self.redis.url, SHUTDOWN_GRACE_PERIOD_SECS="5", **env)
        return start_daemon(self, base, args or TWISTD_WSPROXY)

    async def test_sigterm_gives_1001_and_exit_0(self) -> None:
        """
        SIGTERM on twistd -n wsproxy: every client gets close 1001, the
        process exits with status 0.
        """
        daemon = self.start()
        port = await daemon.ready()
        client = self.r
        client.set("session:s1:auth", "tok", ex=60)
        clients = [
            await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok") for _ in range(3)
        ]
        daemon.signal(signal.SIGTERM)
        codes = [(await c.factory.closed)[0] for c in clients]
        self.assertEqual(codes, [1001, 1001, 1001])
        self.assertEqual(await daemon.out.ended, 0)
        self.assertIn(b"shutdown complete", daemon.out.output)

    async def test_drain_window_on_sigterm(self) -> None:
        """
        SIGTERM with SHUTDOWN_DRAIN_SECS=3: open clients get 1001 at once;
        for the window the port stays open, /ready answers 503 "draining"
        and a valid upgrade gets 503 with Retry-After; then the port is
        closed and the process exits 0.
        """
        daemon = self.start(SHUTDOWN_DRAIN_SECS="3")
        port = await daemon.ready()
        self.r.set("session:s1:auth", "tok", ex=60)
        client = await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok")
        signalled = time.monotonic()
        daemon.signal(signal.SIGTERM)
        self.assertEqual((await client.factory.closed)[0], 1001)
        response = await raw_exchange(port, b"GET /ready HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(response), 503)
        self.assertEqual(json.loads(response.partition(b"\r\n\r\n")[2]),
                         {"status": "draining"})
        response = await raw_exchange(
            port, upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok"})
        )
        self.assertEqual(status_of(response), 503, response)
        self.assertIn(b"\r\nRetry-After: 1\r\n", response)
        # both answers came well inside the window
        self.assertLess(time.monotonic() - signalled, 2.5)
        self.assertEqual(await daemon.out.ended, 0)
        self.assertGreaterEqual(time.monotonic() - signalled, 2.9)
        with self.assertRaises(error.ConnectionRefusedError):
            await raw_exchange(port, b"GET /ready HTTP/1.0\r\n\r\n")

    async def test_second_signal_ends_drain_window(self) -> None:
        """
        A second SIGTERM during a long drain window stops at once (exit 0).
        """
        daemon = self.start(SHUTDOWN_DRAIN_SECS="600")
        port = await daemon.port()
        daemon.signal(signal.SIGTERM)
        await wait_for(lambda: b"still listening for 600s" in daemon.out.output)
        response = await raw_exchange(port, b"GET /ready HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(response), 503)
        daemon.signal(signal.SIGTERM)
        self.assertEqual(await daemon.out.ended, 0)
        self.assertIn(b"ending the drain window", daemon.out.output)

    async def test_idle_daemon_exits_fast(self) -> None:
        """
        With no clients and SHUTDOWN_DRAIN_SECS=0, python -m wsproxy exits 0
        within a second of SIGINT.
        """
        daemon = self.start(sys.executable, "-m", "wsproxy")
        await daemon.port()
        started = time.monotonic()
        daemon.signal(signal.SIGINT)
        self.assertEqual(await daemon.out.ended, 0)
        self.assertLess(time.monotonic() - started, 1.5)

    async def test_configuration_error(self) -> None:
        """
        An invalid variable stops start-up with one line naming it and a
        non-zero status.
        """
        daemon = self.start(sys.executable, "-m", "wsproxy", LOG_LEVEL="chatty")
        status = await daemon.out.ended
        self.assertNotEqual(status, 0)
        lines = daemon.out.output.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("LOG_LEVEL", lines[0])

    async def test_unusable_listen_string(self) -> None:
        """
        A LISTEN string Twisted cannot use is a configuration error: one
        line naming LISTEN, exit status 2.
        """
        daemon = self.start(sys.executable, "-m", "wsproxy", LISTEN="carrier-pigeon:8080")
        self.assertEqual(await daemon.out.ended, 2)
        lines = daemon.out.output.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("configuration error: LISTEN: invalid value 'carrier-pigeon:8080'", lines[0])

    async def test_port_in_use(self) -> None:
        """
        A port that cannot be bound fails start-up with one line naming the
        address and status 1, no traceback: in the foreground (twistd -n)
        and daemonizing (the waiting parent reports it and exits 1 at once;
        no pid file is left), with one process or a supervisor.
        """
        first = self.start()
        port = await first.port()
        line = f"wsproxy: cannot listen on 127.0.0.1:{port}: [Errno 98]".encode()
        for workers in ("1", "2"):
            foreground = self.start(PORT=str(port), WORKERS=workers)
            await wait_for(lambda: foreground.out.ended.called, timeout=20)
            self.assertEqual(foreground.out.status, 1)
            output = foreground.out.output
            self.assertEqual(output.count(b"cannot listen"), 1, output)
            self.assertIn(line, output)
            self.assertNotIn(b"Traceback", output)

            daemonizing = self.start(
                TWISTD, "--pidfile=twistd.pid", "--logfile=twistd.log", "wsproxy",
                PORT=str(port), WORKERS=workers,
            )
            self.addCleanup(kill_pid_file, os.path.join(daemonizing.cwd, "twistd.pid"))
            await wait_for(lambda: daemonizing.out.ended.called, timeout=20)
            self.assertEqual(daemonizing.out.status, 1)
            self.assertIn(b"An error has occurred", daemonizing.out.output)
            self.assertIn(b"cannot listen", daemonizing.out.output)
            with open(os.path.join(daemonizing.cwd, "twistd.log"), "rb") as f:
                log = f.read()
            self.assertIn(line, log)
            self.assertNotIn(b"Traceback", log)
            self.assertFalse(os.path.exists(os.path.join(daemonizing.cwd, "twistd.pid")))

    async def test_port_of_workers_in_use(self) -> None:
        """
        WORKERS=2 listens with SO_REUSEPORT, one socket per worker; a second
        instance on the same port (itself with workers, so with
        SO_REUSEPORT too) is still refused with "Address already in use"
        rather than quietly joining the first one's group.
        """
        first = self.start(WORKERS="2")
        port = await first.port()
        second = self.start(PORT=str(port), WORKERS="2")
        await wait_for(lambda: second.out.ended.called, timeout=20)
        self.assertEqual(second.out.status, 1)
        self.assertIn(f"wsproxy: cannot listen on 127.0.0.1:{port}: [Errno 98]".encode(),
                      second.out.output)

    async def test_help_lists_every_option(self) -> None:
        """
        twistd wsproxy --help works from any directory and documents every
        environment variable.
        """
        from wsproxy.config import SETTINGS

        daemon = self.start(TWISTD, "wsproxy", "--help")
        await daemon.out.ended
        text = daemon.out.output.decode()
        for setting in SETTINGS:
            self.assertIn(f"--{setting.option}", text)
            self.assertIn(setting.env, text.replace("\n", " ").replace("  ", ""))

    async def test_tokens_never_logged(self) -> None:
        """
        At LOG_LEVEL=debug, neither failed nor successful handshakes with any
        token form print the token (Autobahn's request dump and the access
        log are off).
        """
        daemon = self.start(LOG_LEVEL="debug")
        port = await daemon.ready()
        self.r.set("session:s1:auth", "SECRET-good-123", ex=60)
        for headers, path in [
            ({"Authorization": "Bearer SECRET-bad-456"}, "/a/ws/s1"),
            ({}, "/a/ws/s1?access_token=SECRET-bad-789"),
            ({"Sec-WebSocket-Protocol": "bearer, SECRET-bad-000"}, "/a/ws/s1"),
        ]:
            response = await raw_exchange(port, upgrade_request(path, headers))
            self.assertEqual(status_of(response), 403)
        for kwargs in [
            {"token": "SECRET-good-123"},
            {"protocols": ["bearer", "SECRET-good-123"]},
        ]:
            c = await connect(f"ws://127.0.0.1:{port}/a/ws/s1", **kwargs)
            await c.close_and_wait()
        c = await connect(f"ws://127.0.0.1:{port}/a/ws/s1?access_token=SECRET-good-123")
        await c.close_and_wait()
        await wait_for(lambda: daemon.out.output.count(b"closed: session=s1") >= 3)
        self.assertIn(b"refused 403", daemon.out.output)
        self.assertNotIn(b"SECRET", daemon.out.output)

    async def test_json_logs(self) -> None:
        """
        LOG_FORMAT=json writes one JSON object per line, with the event's
        fields (session id, close code).
        """
        daemon = self.start(LOG_FORMAT="json")
        port = await daemon.ready()
        self.r.set("session:s1:auth", "tok", ex=60)
        c = await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok")
        await c.close_and_wait()
        await wait_for(lambda: b"closed: session=s1" in daemon.out.output)
        records = [json.loads(line) for line in daemon.out.output.splitlines() if line.strip()]
        closed = [r for r in records if r["message"].startswith("closed:")]
        self.assertEqual(closed[0]["session_id"], "s1")
        self.assertEqual(closed[0]["code"], 1000)
        self.assertIn(closed[0]["level"], ("info",))
