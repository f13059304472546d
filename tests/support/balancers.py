"""
Real load balancers in front of real daemons: L{start_haproxy} and
L{start_nginx} run HAProxy and nginx with the committed configurations
(C{deploy/haproxy/haproxy.cfg}, C{deploy/nginx/wsproxy.conf}) on a free
loopback port, each in a temporary directory of its own (pid file, logs,
nginx's main configuration), and always stop them at the test's clean-up.

The committed files are used as they are: HAProxy's gets its addresses
from environment variables (which it expands itself); nginx's
envsubst-style placeholders are filled in exactly as
C{envsubst '${WSPROXY_LB_LISTEN} ${WSPROXY_1} ${WSPROXY_2}'} would, and
nothing else is changed.

A missing haproxy or nginx is a failure, never a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from typing import Optional

from twisted.internet import error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from .base import ROOT, free_port, wait_for
from .daemon import ProcessOutput

HAPROXY_CFG = os.path.join(ROOT, "deploy", "haproxy", "haproxy.cfg")
NGINX_CONF = os.path.join(ROOT, "deploy", "nginx", "wsproxy.conf")

#: what nginx's own main configuration around the include says, per test
NGINX_MAIN = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/wsproxy.conf;
}}
"""


def balancer_binary(name: str) -> str:
    """
    The haproxy or nginx to test with (Debian puts both in /usr/sbin,
    which a user's PATH may lack).

    @raise AssertionError: if there is none (the tests fail, they do not skip).
    """
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise AssertionError(
            f"no {name} found: install Debian's {name} package (bin/dev system-setup "
            f"does, as root); the load balancer tests need a real {name}")
    return found


def envsubst(text: str, values: dict[str, str]) -> str:
    """
    C{text} with each C{${NAME}} of C{values} replaced, as C{envsubst}
    given exactly those names does (nginx's own C{$variables} stay).

    @raise AssertionError: if a placeholder is left without a value.
    """
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    left = re.findall(r"\$\{\w+\}", text)
    if left:
        raise AssertionError(f"placeholders without a value: {left}")
    return text


def inherited() -> dict[str, str]:
    """
    This process's environment without the configurations' own variables
    (C{WSPROXY_LB_*}, C{WSPROXY_1}, ...): a balancer gets only those its
    test names.
    """
    return {k: v for k, v in os.environ.items() if not re.fullmatch(r"WSPROXY_(LB_\w+|\d+)", k)}


class Balancer:
    """
    A load balancer process listening on 127.0.0.1:C{port}, started in
    C{dir} (its own temporary directory).
    """

    def __init__(self, argv: list[str], env: dict[str, str], port: int, dir: str,
                 logs: tuple[str, ...] = ()) -> None:
        self.port = port
        self.dir = dir
        self.logs = logs
        self.out = ProcessOutput()
        self.process = reactor.spawnProcess(
            self.out, argv[0], argv, env={**inherited(), **env}, path=dir)

    @property
    def log(self) -> str:
        text = self.out.output.decode(errors="replace")
        for name in self.logs:
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    text += f"\n--- {name}\n" + f.read()
            except OSError:
                pass
        return text

    async def listening(self, timeout: float = 20.0) -> None:
        """
        Wait until the balancer accepts connections; fail with its output
        if it exits first or C{timeout} passes.
        """
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        deadline = time.monotonic() + timeout
        while True:
            if self.out.ended.called:
                raise AssertionError(f"exited with {self.out.status}: {self.log}")
            try:
                p = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
            except error.ConnectError:
                pass
            else:
                p.transport.abortConnection()
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not listening within {timeout:g}s: {self.log}")
            await task.deferLater(reactor, 0.05, lambda: None)

    async def stop(self) -> None:
        """
        SIGTERM (both stop at once on it), SIGKILL if that took too long;
        then remove its directory.
        """
        if not self.out.ended.called:
            self.process.signalProcess(signal.SIGTERM)
            try:
                await wait_for(lambda: self.out.ended.called, timeout=10)
            except AssertionError:
                try:
                    self.process.signalProcess(signal.SIGKILL)
                except error.ProcessExitedAlready:
                    pass
                await wait_for(lambda: self.out.ended.called, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _started(test: TestCase, balancer: Balancer) -> Balancer:
    test.addCleanup(balancer.stop)
    await balancer.listening()
    return balancer


async def start_haproxy(test: TestCase, servers: tuple[str, str],
                        port: Optional[int] = None, **env: str) -> Balancer:
    """
    HAProxy with C{deploy/haproxy/haproxy.cfg} in front of C{servers}
    (host:port each), in the foreground, with C{env} (the configuration's
    optional variables) in its environment; stopped at C{test}'s clean-up.
    """
    binary = balancer_binary("haproxy")
    port = port or free_port()
    dir = tempfile.mkdtemp(prefix="wsproxy-haproxy-")
    env = {"WSPROXY_LB_BIND": f"127.0.0.1:{port}",
           "WSPROXY_1": servers[0], "WSPROXY_2": servers[1], **env}
    argv = [binary, "-db", "-f", HAPROXY_CFG, "-p", os.path.join(dir, "haproxy.pid")]
    return await _started(test, Balancer(argv, env, port, dir))


async def start_nginx(test: TestCase, servers: tuple[str, str],
                      port: Optional[int] = None) -> Balancer:
    """
    nginx with C{deploy/nginx/wsproxy.conf} (placeholders filled in)
    included in a main configuration of its own, in front of C{servers};
    stopped at C{test}'s clean-up.
    """
    binary = balancer_binary("nginx")
    port = port or free_port()
    dir = tempfile.mkdtemp(prefix="wsproxy-nginx-")
    with open(NGINX_CONF) as f:
        text = envsubst(f.read(), {"WSPROXY_LB_LISTEN": f"127.0.0.1:{port}",
                                   "WSPROXY_1": servers[0], "WSPROXY_2": servers[1]})
    with open(os.path.join(dir, "wsproxy.conf"), "w") as f:
        f.write(text)
    main = os.path.join(dir, "nginx.conf")
    with open(main, "w") as f:
        f.write(NGINX_MAIN.format(dir=dir))
    argv = [binary, "-p", dir, "-c", main, "-e", os.path.join(dir, "error.log")]
    return await _started(test, Balancer(argv, {}, port, dir, logs=("error.log",)))
