"""`python -m cli ...` is the `dba` console script."""

import sys

from cli.main import main

sys.exit(main())
