"""Exit codes of every command, controller and host side (DESIGN.md)."""

EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed (and was rolled back where that applies)
EXIT_BAD_INPUT = 2  # bad input or configuration: the message names the file, key or argument
EXIT_LOCKED = 3  # another deploy holds the lock
