"""
wsproxy: a WebSocket proxy that lets backends talk to clients through Redis
Pub/Sub. See README.md and the documentation in docs/.
"""

__version__ = "0.1.0"
