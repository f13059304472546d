"""
The rolling-deploy benchmark: C{python -m bench.rolling --help}.

wsproxy containers of the real image behind HAProxy are replaced one at a
time (L{bench.rolling.deploy}) while resuming, acknowledging clients
(L{bench.rolling.clients}, on L{bench.resume}'s sessions and workers)
receive a numbered stream down and send one up that a backend thread
(L{bench.rolling.backend}) reads through a consumer group; at the end
(L{bench.rolling.run}) every message is accounted for, both ways.
"""
