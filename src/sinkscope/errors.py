"""The one exception type for user errors: the CLI prints its message as one line, with no traceback."""


class SinkscopeError(Exception):
    """A user-facing error whose message says what to do."""
