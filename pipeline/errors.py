"""The one exception type for user error: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (file, option, data) that they can fix; never a traceback."""

    exit_code = 2
