"""The one error type a user can meet; the CLI prints it as one line, no traceback."""


class FerflowError(Exception):
    """A problem the user can fix: bad params, a bad archive, an unreachable URI.

    The message names the file, key or URL and, where there is one, the fix.
    """

    exit_code = 1


class ConfigError(FerflowError):
    """Invalid params file or override (exit code 2, like a usage error)."""

    exit_code = 2
