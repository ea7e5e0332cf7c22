"""Errors a user can cause or meet, each with the exit code DESIGN.md gives it.

The base classes and exit codes are the host contract's (deployer.hostapi),
shared with the host side; these are the controller's own. The CLI turns any
of them into a message on stderr and the exit code, never a traceback.
"""

from __future__ import annotations

from deployer.hostapi.errors import BadInput, DeployerError, LockHeld
from deployer.hostapi.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_LOCKED, EXIT_OK

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_LOCKED",
    "EXIT_OK",
    "BadInput",
    "CommandFailed",
    "DeployerError",
    "HostSelectionError",
    "InventoryError",
    "LockHeld",
    "StepFailed",
    "TransportError",
]


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


class StepFailed(DeployerError):
    """A step on one host failed; says which host, which step, and why."""

    def __init__(self, host: str, step: str, message: str, exit_code: int = EXIT_FAILED) -> None:
        self.host, self.step, self.reason = host, step, message
        self.exit_code = exit_code  # EXIT_BAD_INPUT: the host refused (an unsafe layout)
        super().__init__(f"{host}: {step} failed: {message}")
