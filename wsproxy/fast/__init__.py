"""
The fast path: the modules that borrow private internals of Twisted,
Autobahn and CPython to make the proxy cheaper per message.
"""
