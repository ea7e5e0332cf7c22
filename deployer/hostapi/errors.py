"""The errors both sides raise for a user, each with its exit code (hostapi.exits).

A CLI turns any of these into a message on stderr and the exit code, never a
traceback; anything else is a bug and keeps its traceback.
"""

from deployer.hostapi.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_LOCKED


class DeployerError(Exception):
    """An expected failure: message for the user plus an exit code."""

    exit_code = EXIT_FAILED


class BadInput(DeployerError):
    """Bad configuration or arguments: the message names the file, key or argument."""

    exit_code = EXIT_BAD_INPUT


class LockHeld(DeployerError):
    """Another deploy (or migration runner) holds the lock."""

    exit_code = EXIT_LOCKED
