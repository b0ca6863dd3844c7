"""Errors the command line reports as a bad argument (exit code 2) rather than a traceback."""


class BadArgument(ValueError):
    """An argument out of range; the message names it and the range."""
