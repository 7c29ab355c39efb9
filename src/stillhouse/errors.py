"""The two ways a stillhouse command stops early, each with its exit code.

Anything else that escapes a command is a bug: the CLI turns these into one clear line on stderr.
"""


class StillhouseError(Exception):
    """Bad input or config: the message names the file/key and says what to do. Exit code 2."""

    exit_code = 2


class GateError(StillhouseError):
    """The stage ran, but a gate said no (license, eval threshold, redteam verdict). Exit code 1."""

    exit_code = 1
