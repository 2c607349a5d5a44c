"""Errors a user can act on, with the exit code scripts can trust."""

# Exit codes, documented in README.md and `opsctl --help`.
OK = 0
FAILED = 1
USAGE = 2
UNHEALTHY = 3
INTERRUPTED = 130


class OpsError(Exception):
    """A failure explained in words: what is wrong and what to do about it."""

    def __init__(self, message: str, hint: str = "", code: int = FAILED):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error from a library, short enough for a one-line reason."""
    return (str(error).splitlines() or [type(error).__name__])[0][:limit]


class UsageError(OpsError):
    """Bad input from the user: a flag, a file, a name."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint, USAGE)


class Interrupted(Exception):
    """The run was cancelled (Ctrl-C) while a step waited."""
