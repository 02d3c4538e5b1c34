"""One exception hierarchy for mistakes a user can make or the host can cause.

The command line prints a LabError as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class LabError(Exception):
    """A problem with the user's input or the host, explained in one line."""


class TimeoutExpired(LabError):
    """A wait ran past its deadline."""
