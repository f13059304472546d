"""The error that ends a run early."""


class Fatal(Exception):
    """An error that ends the run with one clear line and exit status 2."""
