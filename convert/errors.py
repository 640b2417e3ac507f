"""The one error type of `heft convert`: a problem with the files given, named with its fix."""

from heft.model.checks import ConfigError


class ConvertError(ConfigError):
    """A checkpoint heft cannot convert; the one-line message names the problem and the fix.

    A ConfigError (hence a ValueError), so the `heft` command prints it as one line, no trace.
    """
