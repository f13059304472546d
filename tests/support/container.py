"""
The container image as a test fixture: L{Container} runs the image with
C{docker run} (attached, so its output is the container's and its exit
status the container's) on the host's network, as L{Daemon} runs the
plain daemon; L{docker} and L{compose} run the Docker and Compose command
lines. Which image: C{WSPROXY_TEST_IMAGE} (default C{wsproxy:dev}, what
C{bin/dev image} builds; C{bin/dev test} builds it before the suite).

No Docker engine, or no image, fails the test that needs it with what to
run, never skips it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from typing import Any, Optional

from twisted.trial.unittest import TestCase

from .daemon import Daemon, run_process
from .base import wait_for

IMAGE = os.environ.get("WSPROXY_TEST_IMAGE", "wsproxy:dev")
EXAMPLES_IMAGE = os.environ.get("WSPROXY_TEST_EXAMPLES_IMAGE", "wsproxy-examples:dev")
#: Redis for compose.yaml: the official image where Docker Hub answers,
#: else the one bin/dev image builds from Debian's packages
REDIS_IMAGE = os.environ.get("WSPROXY_TEST_REDIS_IMAGE", "wsproxy-redis:dev")

#: how every test runs the image: as restricted as the Kubernetes manifests
#: run it (read-only root filesystem, no capabilities, no privilege gain)
RESTRICTED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")

_names = itertools.count(1)


def docker(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """
    Run C{docker args} to its end (short commands only: it blocks).
    """
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def require_image(image: str = IMAGE) -> None:
    """
    Fail (never skip) unless a Docker engine answers and has C{image}.
    """
    if shutil.which("docker") is None:
        raise AssertionError("no docker command: run bin/dev image (it installs docker.io)")
    info = docker("info", "--format", "{{.ServerVersion}}")
    if info.returncode != 0:
        raise AssertionError(f"no Docker engine answers ({info.stderr.strip()}): run bin/dev image")
    if docker("image", "inspect", image).returncode != 0:
        raise AssertionError(f"no image {image}: run bin/dev image")


def image_config(image: str = IMAGE) -> dict[str, Any]:
    """
    The image's configuration (C{docker image inspect}'s C{Config}).
    """
    result = docker("image", "inspect", image)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)[0]["Config"]
    return config


class Container(Daemon):
    """
    The image in a container named L{name}, on the host's network, with
    exactly C{env} as its settings (nothing else from this process's
    environment reaches it) and C{options} given to C{docker run}.
    L{signal} reaches the container (C{docker run} passes signals on);
    L{kill} and L{stop} act on the container itself.
    """

    def __init__(self, env: dict[str, str], options: tuple[str, ...] = RESTRICTED,
                 image: str = IMAGE) -> None:
        self.name = f"wsproxy-test-{os.getpid()}-{next(_names)}"
        argv = ["docker", "run", "--name", self.name, "--network", "host", *options]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        argv.append(image)
        super().__init__(argv, {})

    def kill(self) -> None:
        docker("kill", self.name)

    def inspect(self) -> dict[str, Any]:
        result = docker("inspect", self.name)
        assert result.returncode == 0, result.stderr
        state: dict[str, Any] = json.loads(result.stdout)[0]
        return state

    async def docker_stop(self, timeout: int) -> int:
        """
        C{docker stop -t timeout}, as an operator or Compose stops it:
        SIGTERM, then SIGKILL after C{timeout} seconds. Fires with the
        container's exit status once C{docker stop} has returned.
        """
        stopping = run_process(["docker", "stop", "-t", str(timeout), self.name])
        status = await stopping.ended
        assert status == 0, stopping.output
        await wait_for(lambda: self.out.ended.called, timeout=timeout + 20)
        exit_code: int = self.inspect()["State"]["ExitCode"]
        return exit_code

    async def stop(self) -> None:
        docker("rm", "-f", self.name)
        await super().stop()


def start_container(test: TestCase, env: dict[str, str],
                    options: tuple[str, ...] = RESTRICTED, image: str = IMAGE) -> Container:
    """
    Start the image with C{env}; the container is removed at C{test}'s
    clean-up, however the test ends.
    """
    require_image(image)
    container = Container(env, options, image)
    test.addCleanup(container.stop)
    return container


def compose_command() -> list[str]:
    """
    Compose v2 (C{docker compose}) where the plugin is installed, else
    Compose v1 (C{docker-compose}, Debian's package).
    """
    if docker("compose", "version").returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise AssertionError("no docker compose: run bin/dev image (it installs docker-compose)")


def compose(*args: str, env: Optional[dict[str, str]] = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """
    Run a Compose command on the repository's compose.yaml (blocking:
    and bounded by C{timeout}: C{up -d} returns once its health conditions hold).
    """
    from .base import ROOT

    return subprocess.run([*compose_command(), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
