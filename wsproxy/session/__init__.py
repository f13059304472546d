"""
Session decisions that need no socket: admission and the process's state
(L{proxy}), tokens (L{auth}), failed-authorization limits and client
addresses (L{limits}), resumable sessions (L{resume}), durable upstream
(L{upstream}), session control and lifecycle events (L{control}), the
payload/frame mapping (L{frames}) and pausing client reads while Redis
falls behind (L{backpressure}).

Imports Redis, the fast path and the shared base modules only.
"""
