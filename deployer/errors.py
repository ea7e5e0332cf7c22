"""Errors a user can cause or meet, each with the exit code DESIGN.md gives it.

The CLI turns any of these into a message on stderr and the exit code, never a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3


class DeployerError(Exception):
    """An expected failure: message for the user plus an exit code."""

    exit_code = EXIT_FAILED


class BadInput(DeployerError):
    """Bad configuration or arguments: the message names the file, key or argument."""

    exit_code = EXIT_BAD_INPUT


class InventoryError(BadInput):
    """All problems found in one inventory file, reported at once."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = [f"{path}: {count}:"] + [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class HostSelectionError(BadInput):
    """A --hosts pattern selected nothing."""


class TransportError(DeployerError):
    """A host could not be reached, or refused us (host key, authentication)."""


class CommandFailed(DeployerError):
    """A command ran on a host and exited non-zero."""

    def __init__(self, result: object, message: str) -> None:
        self.result = result
        super().__init__(message)


class LockHeld(DeployerError):
    exit_code = EXIT_LOCKED
