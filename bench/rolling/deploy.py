"""
What a rolling deploy is made of here: wsproxy containers of the real image
(C{docker run --network host}, each on its own port, a fresh name for every
start) and HAProxy (a host process, a generated configuration) in front of
them, health-checking each container's C{/ready}.

Every container this run starts is named C{<prefix>-<n>} with a prefix of
its own (C{wsproxy-rolling-<pid>}), and L{Containers.remove_all} removes
exactly those, never another container of the same daemon.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.errors import Fatal
from bench.ports import free_port
from bench.servers import LOOPBACK, stop_process

#: the HAProxy configuration the deployment guide ships, run as committed
#: but for its server lines (one per container slot here) and a stats
#: socket to read the servers' states and the retry counters from
SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
SERVER_LINE = re.compile(r'(?m)^    server ws\d+ "\$\{WSPROXY_\d+\}"\n')
RETRY_ON_LINE = re.compile(r"(?m)^    retry-on .*\n")

GLOBAL = """\
global
    stats socket {socket} mode 600 level admin

"""


def haproxy_config(shipped: str, socket_path: Path, ports: list[int], retry: str) -> str:
    """
    C{shipped} (deploy/haproxy/haproxy.cfg) with a server line per port in
    place of its own, a stats socket, and (C{retry} "conn") without its
    C{retry-on} line, i.e. HAProxy's default retries: a refused connection
    only, not a draining wsproxy's 503.
    """
    servers = "".join(f"    server p{i} {LOOPBACK}:{port}\n" for i, port in enumerate(ports))
    config, count = SERVER_LINE.subn("", shipped)
    if count == 0:
        raise Fatal(f"no server lines to replace in {SHIPPED_CONFIG}")
    config = config.rstrip("\n") + "\n" + servers
    if retry == "conn":
        config, count = RETRY_ON_LINE.subn("", config)
        if count != 1:
            raise Fatal(f"no retry-on line in {SHIPPED_CONFIG}")
    return GLOBAL.format(socket=socket_path) + config


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """A docker command's standard output; L{Fatal} if it fails and C{check}."""
    try:
        done = subprocess.run(["docker", *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise Fatal("docker is not installed (the rolling benchmark needs it)") from None
    if check and done.returncode != 0:
        raise Fatal(f"docker {' '.join(args[:2])}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def require_image(image: str) -> None:
    """L{Fatal} unless the docker daemon answers and has C{image}."""
    docker("version", "--format", "{{.Server.Version}}", timeout=30)
    if not docker("images", "-q", image, timeout=30):
        raise Fatal(f"no image {image}: build it with bin/dev image")


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        connection.close()


@dataclass
class Stopped:
    """How a container ended."""

    name: str
    signal: str  # "SIGTERM" (docker stop) or "SIGKILL" (docker kill)
    exit_code: int
    stop_s: float  # from the signal to the container's exit
    shutdown_complete: bool  # its log says "shutdown complete"
    connections: int | None  # its open connections just before


class Containers:
    """The run's wsproxy containers: one slot per port, a container per start."""

    def __init__(self, image: str, env: dict[str, str], slots: int, workdir: Path,
                 prefix: str) -> None:
        self.image = image
        self.ports = [free_port() for _ in range(slots)]
        self.names: list[str | None] = [None] * slots
        self._env = env
        self._workdir = workdir
        self._prefix = prefix
        self._started: list[str] = []

    def start(self, slot: int) -> str:
        """A new container on the slot's port, with a fresh name."""
        name = f"{self._prefix}-{len(self._started)}"
        env = {**self._env, "HOST": LOOPBACK, "PORT": str(self.ports[slot])}
        args = ["run", "-d", "--name", name, "--network", "host"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        self._started.append(name)
        docker(*args, self.image)
        self.names[slot] = name
        return name

    def wait_ready(self, slot: int, timeout: float = 60) -> float:
        """Seconds until the slot's container answered C{/ready} with 200."""
        name = self.names[slot]
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if http_status(self.ports[slot], "/ready") == 200:
                return time.monotonic() - started
            if docker("inspect", "-f", "{{.State.Running}}", str(name), check=False) != "true":
                raise Fatal(f"container {name} exited:\n{self.logs(str(name))[-3000:]}")
            time.sleep(0.05)
        raise Fatal(f"container {name} not ready after {timeout:.0f}s")

    def active_connections(self, slot: int) -> int | None:
        connection = http.client.HTTPConnection(LOOPBACK, self.ports[slot], timeout=2)
        try:
            connection.request("GET", "/health")
            body = json.loads(connection.getresponse().read())
            count = body.get("active_connections") if isinstance(body, dict) else None
            return count if isinstance(count, int) else None
        except (OSError, ValueError):
            return None
        finally:
            connection.close()

    def stop(self, slot: int, kill: bool, stop_timeout: int) -> Stopped:
        """
        C{docker stop -t stop_timeout} (SIGTERM, the graceful shutdown) or
        C{docker kill} (SIGKILL); waits for the exit and keeps the log.
        """
        name = self.names[slot]
        assert name is not None
        connections = self.active_connections(slot)
        started = time.monotonic()
        if kill:
            docker("kill", name)
        else:
            docker("stop", "-t", str(stop_timeout), name, timeout=stop_timeout + 60)
        exit_code = int(docker("wait", name, timeout=stop_timeout + 60))
        stop_s = time.monotonic() - started
        log = self.logs(name)
        self.names[slot] = None
        return Stopped(name, "SIGKILL" if kill else "SIGTERM", exit_code, round(stop_s, 2),
                       "shutdown complete" in log, connections)

    def logs(self, name: str) -> str:
        """The container's log (also saved in the run's directory)."""
        done = subprocess.run(["docker", "logs", name], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
        text = done.stdout + done.stderr
        (self._workdir / f"{name}.log").write_text(text)
        return text

    def remove_all(self) -> None:
        """Removes every container this run started (and only those)."""
        for name in self._started:
            if name in self.names:
                try:
                    self.logs(name)
                except (OSError, subprocess.SubprocessError):
                    pass
            docker("rm", "-f", name, check=False, timeout=60)


class HAProxy:
    """HAProxy on a loopback port, a backend server per container slot."""

    def __init__(self, ports: list[int], workdir: Path, binary: str = "haproxy",
                 retry: str = "503") -> None:
        self.port = free_port()
        self.socket = workdir / "haproxy.sock"
        config = workdir / "haproxy.cfg"
        config.write_text(haproxy_config(SHIPPED_CONFIG.read_text(), self.socket, ports, retry))
        self._log = workdir / "haproxy.log"
        try:
            with open(self._log, "wb") as log:
                self._process = subprocess.Popen(
                    [binary, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "WSPROXY_LB_BIND": f"{LOOPBACK}:{self.port}"})
        except FileNotFoundError:
            raise Fatal("no haproxy on PATH (apt-get install -y haproxy)") from None
        deadline = time.monotonic() + 10
        while not self.socket.exists() or self.status() is None:
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise Fatal(f"haproxy did not start:\n{self._log.read_text(errors='replace')}")
            time.sleep(0.05)

    def _stat(self) -> list[dict[str, str]] | None:
        """C{show stat} from the stats socket: one row per proxy and server."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.socket))
                sock.sendall(b"show stat\n")
                chunks = []
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError:
            return None
        lines = b"".join(chunks).decode(errors="replace").splitlines()
        if not lines or not lines[0].startswith("# "):
            return None
        header = lines[0][2:].split(",")
        return [dict(zip(header, line.split(","))) for line in lines[1:] if line]

    def status(self) -> dict[str, str] | None:
        """Each server's status (C{UP}, C{DOWN}, C{UP 1/2}, ...)."""
        rows = self._stat()
        if rows is None:
            return None
        return {row["svname"]: row["status"] for row in rows
                if row.get("pxname") == "wsproxy" and row.get("svname") != "BACKEND"}

    def counters(self) -> dict[str, int]:
        """
        The backend's totals so far: retries (C{wretr}), redispatches
        (C{wredis}), connection errors (C{econ}), 5xx answers (C{hrsp_5xx}).
        """
        for row in self._stat() or []:
            if row.get("pxname") == "wsproxy" and row.get("svname") == "BACKEND":
                return {name: int(row.get(key) or 0) for name, key in (
                    ("retries", "wretr"), ("redispatches", "wredis"),
                    ("connection_errors", "econ"), ("http_5xx", "hrsp_5xx"))}
        return {}

    def wait_up(self, slot: int, timeout: float = 30) -> float:
        """Seconds until HAProxy marks the slot's server UP."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if (self.status() or {}).get(f"p{slot}") == "UP":
                return time.monotonic() - started
            time.sleep(0.05)
        raise Fatal(f"haproxy did not mark p{slot} up within {timeout:.0f}s")

    def stop(self) -> None:
        stop_process(self._process)
