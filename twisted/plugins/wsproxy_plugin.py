"""
twistd plugin for wsproxy: ``twistd wsproxy --help``.

This file is deliberately not named ``wsproxy.py`` (it would shadow the
package) and ``twisted/plugins/`` has no ``__init__.py``.
"""

from twisted.application.service import ServiceMaker

wsproxy = ServiceMaker(
    "wsproxy",
    "wsproxy.process.tap",
    "WebSocket proxy bridging clients to Redis Pub/Sub",
    "wsproxy",
)
