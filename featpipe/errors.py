"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or environment the user can fix: reported as one line, no traceback."""
