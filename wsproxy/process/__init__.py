"""
The process: the twistd plugin's options and service (L{tap}), start-up
order, signals and graceful shutdown (L{daemon}), C{WORKERS=N} (L{workers}),
how a proxy is put together from its parts (L{build}), and what one process
can hold (L{fdlimit}).

The top of the package: it may import every other room; nothing imports it.
"""
