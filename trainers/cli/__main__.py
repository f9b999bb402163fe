"""`python -m dtlab.trainers.cli` is the `dtlab` command."""

import sys

from dtlab.trainers.cli.main import main

sys.exit(main())
