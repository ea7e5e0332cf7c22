"""Live-stage schema migrations: expand before the switch, contract after.

Host side: standard library only (sqlite3 built in; psycopg imported only for
postgresql:// URLs). Entry points: `deployer.migrations.cli.main(argv)` and
`Runner(directory, database_url).up(phase="expand")`.
"""

from deployer.migrations.runner import MigrationStatus, Runner

__all__ = ["MigrationStatus", "Runner"]
