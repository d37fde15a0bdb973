"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or environment the user can fix: reported as one line, no traceback."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line, for one-line reports ("" when it has none: EOFError())."""
    return str(e).partition("\n")[0]
