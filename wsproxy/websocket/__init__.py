"""
The WebSocket protocol: one Autobahn protocol per client and its factory
(L{protocol}): admission, frames both ways, slow consumers, closing.

Imports the session decisions, Redis and the fast path; only the edge and
the process import it.
"""
