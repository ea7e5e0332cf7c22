"""`python -m deployer.master ...` (what `deployer master ...` passes through to)."""

import sys

from deployer.master.cli import main

sys.exit(main(sys.argv[1:]))
