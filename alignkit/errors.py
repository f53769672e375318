"""What users see when a run cannot go on: one line, and an exit code that says why.

| exception   | exit code | when                                                                    |
|-------------|-----------|-------------------------------------------------------------------------|
| UserError   | 2         | bad input: a config value, a data row, a path (nothing was trained)     |
| RunError    | 1         | the run had to stop: disk full while saving, losses that stay NaN       |
| Interrupted | 130 / 143 | SIGINT / SIGTERM: the current step was finished and a checkpoint saved  |
"""


class UserError(ValueError):
    """Bad input from the user: a config value, a data row, a path. Never a bug of ours."""


class RunError(RuntimeError):
    """A run that started had to stop; the message says what is kept and what to do."""


class Interrupted(Exception):
    """Stopped by a signal after saving a checkpoint; `code` is 128 + the signal number."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
