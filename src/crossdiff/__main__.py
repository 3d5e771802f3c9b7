"""`python -m crossdiff ...`: the same as the `crossdiff` command."""

import sys

from crossdiff.cli import main

sys.exit(main())
