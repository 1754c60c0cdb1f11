"""Errors that are the user's to fix: printed as one clear line, without a traceback."""


class UserError(RuntimeError):
    """Bad input, a missing path, an output that would be clobbered: say what and how to fix it."""
