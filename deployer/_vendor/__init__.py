"""Pure-Python libraries the host side ships for Pythons whose standard library
lacks them (see README.md here). Standard library only, like the host side."""
