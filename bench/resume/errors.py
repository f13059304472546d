"""The one exception that ends a run early, with the reason."""


class Fatal(Exception):
    """The run cannot go on: the message says why."""
