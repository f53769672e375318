"""The one exception users see: a short message, printed as one line by the CLI (exit code 2)."""


class UserError(ValueError):
    """Bad input from the user: a config value, a data row, a path. Never a bug of ours."""
