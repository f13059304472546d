"""
The twistd plugin's options and service: C{twistd wsproxy --help}.

Every option mirrors an environment variable (L{wsproxy.config.SETTINGS});
an option given on the command line wins over the environment, which wins
over a C{.env} file in the working directory.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.python import usage

from ..config import SETTINGS, ConfigError, Settings, load_settings


class Options(usage.Options):
    """
    Command-line options of C{twistd wsproxy} and C{python -m wsproxy}.
    """

    synopsis = "[options]"
    longdesc = (
        "WebSocket proxy: clients connect to /{agent_id}/ws/{session_id} with a "
        "bearer token; messages are bridged to Redis Pub/Sub channels "
        "session:{session_id}:up and session:{session_id}:down. Every option "
        "can also be set with the environment variable in brackets, or in a "
        ".env file in the working directory."
    )
    optParameters = [
        [s.option, None, None, f"{s.help} [env {s.env}, default {s.default or 'unset'}]"]
        for s in SETTINGS
    ]

    settings: Settings

    def postOptions(self) -> None:
        overrides = {s.env: self[s.option] for s in SETTINGS}
        try:
            self.settings = load_settings(overrides)
        except ConfigError as e:
            # one clear line, not twistd's full usage text
            sys.stderr.write(f"wsproxy: configuration error: {e}\n")
            raise SystemExit(2)


def makeService(options: Options, reactor: Any = None) -> Any:
    """
    Build the service for parsed C{options}: the supervisor of C{WORKERS}
    worker processes, one of those workers (started by the supervisor,
    L{wsproxy.process.workers.Seat}), or a single proxy listening on C{LISTEN} or
    C{HOST}/C{PORT}. This is the only place that tells them apart.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from twisted.internet.endpoints import serverFromString

    from .daemon import ProxyService
    from ..logs import make_observer
    from .build import build_proxy
    from ..edge.site import ProxySite
    from .workers import Seat, Supervisor, worker_service

    settings = options.settings
    if "jwt" in settings.auth_mode:
        from ..session.keys import load_files

        try:
            # the key files, read once here so that a bad one stops even a
            # supervisor (whose workers would each fail) with one clear line
            load_files(settings)
        except ConfigError as e:
            sys.stderr.write(f"wsproxy: configuration error: {e}\n")
            raise SystemExit(2)
    observer = make_observer(settings.log_level, settings.log_format, _log_file(options))
    seat = Seat.from_environ(os.environ)
    if seat is None and settings.workers > 1:
        forwarded = [
            f"--{s.option}={options[s.option]}"
            for s in SETTINGS
            if options[s.option] is not None and s.env != "WORKERS"
        ]
        return Supervisor(settings, reactor, forwarded, log_observer=observer)
    if seat is not None:
        return worker_service(seat, build_proxy(reactor, settings), reactor, observer)
    try:
        endpoint = serverFromString(reactor, settings.endpoint)
    except Exception as e:
        # unknown endpoint type, bad argument, unreadable certificate, ...
        name = "LISTEN" if settings.listen else "HOST"
        sys.stderr.write(
            f"wsproxy: configuration error: {name}: cannot use {settings.endpoint!r}: {e}\n"
        )
        raise SystemExit(2)
    proxy = build_proxy(reactor, settings)
    return ProxyService(
        proxy, ProxySite(proxy), endpoint, reactor, log_observer=observer, handle_signals=True,
        manage_heap=True,
        lean_poll=True,
    )


def _log_file(options: Options) -> Any:
    """
    Standard output, unless twistd was given a --logfile (or is daemonizing,
    which defaults to twistd.log).
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    logfile = parent.get("logfile")
    if logfile == "-" or (not logfile and parent.get("nodaemon")):
        return None
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(logfile or "twistd.log")
