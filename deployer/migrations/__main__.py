"""`python -m deployer.migrations ...` (what the rollout runs on the migrations host)."""

import sys

from deployer.migrations.cli import main

sys.exit(main())
