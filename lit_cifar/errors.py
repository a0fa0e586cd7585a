"""The one error type for bad input a user can fix: entry points print it without a traceback."""


class UserError(ValueError):
    """A bad input (path, file, setting). The message names the problem and the fix."""
