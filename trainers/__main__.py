"""`python -m dtlab.trainers ...` is the `dtlab` command."""

import sys

from dtlab.trainers.cli.main import main

sys.exit(main())
