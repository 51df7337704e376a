"""The one exception type users see: its message is a single line that says what
was wrong and how to fix it. The CLI prints it without a traceback."""


class NnpqError(Exception):
    """A user-facing error with a one-line, actionable message."""
