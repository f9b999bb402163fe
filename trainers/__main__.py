"""`python -m dtlab.trainers ...` is the `dtlab` command."""

import sys

from .cli import main

sys.exit(main())
