"""The one exception type for user mistakes: CLIs print its message and exit 1, no traceback."""


class UserError(Exception):
    """Bad input from a user (file, key, flag); the message is one sentence saying what to do."""
