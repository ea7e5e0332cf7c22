"""Failures the runner reports, on top of the exit codes in deployer.hostapi.exits."""

from __future__ import annotations

from typing import Any

from deployer.hostapi.errors import BadInput, DeployerError, LockHeld
from deployer.hostapi.exits import EXIT_FAILED

__all__ = ["BadInput", "DatabaseUnavailable", "DeployerError", "LockHeld", "MigrationFailed"]


class DatabaseUnavailable(DeployerError):
    """The database could not be opened or reached (exit 1)."""


class MigrationFailed(DeployerError):
    """A migration raised: its transaction was rolled back and the run stopped (exit 1)."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        # name, file, line, statement, error, progress: what the rollout shows the operator
        self.details = {k: v for k, v in details.items() if v is not None}
