"""`python -m proxy`: the same command line as `appcircle-proxy`."""

import sys

from .cli.main import main

sys.exit(main())
