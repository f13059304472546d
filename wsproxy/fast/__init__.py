"""
The fast path: the modules that borrow private internals of Twisted,
Autobahn and CPython to make the proxy cheaper per message, each with the
framework's own path to fall back to.

  - L{borrowed}: every borrowed internal named once (what, who uses it,
    the fallback), and the start-up check (C{python -m wsproxy.fast}).
  - L{poll}: the epoll reactor's turn without a legacy log context.
  - L{sockwrite}: frames and commands written straight to the socket, held
    for one C{send()} per read or turn (the write-batching invariants are
    in its docstring).
  - L{sockread}: the Redis connections read into one reused buffer.
  - L{inframes}: the common client frame read without Autobahn.
  - L{timers}: Autobahn's per-connection deadlines on O(1) buckets.
  - L{lazyformat}: Autobahn's debug pretty-printing and highlighting made lazy.
  - L{handshake}: the opening handshake of a request the site read, without
    Autobahn parsing it again.
  - L{heap}: the cycle collector kept from pausing the proxy.

Their tests are C{tests/test_fast_*.py}: run them (and
C{python -m wsproxy.fast}) after upgrading Twisted, Autobahn or Python.
"""
