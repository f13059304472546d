"""
Redis: the command and subscriber connections (L{redislink}), how a
connection is made (L{redisendpoint}), the shared subscription hub
(L{pubsub}), Sentinel (L{sentinel}) and Cluster (L{cluster}).

Imports the fast path and the shared base modules only. Absolute imports
of the C{redis} client library (redis-py, used by the tests and
L{wsproxy.backend}) are unaffected by this package's name.
"""
