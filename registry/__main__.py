"""`python -m registry` runs the command line."""

import sys

from registry.cli import main

sys.exit(main())
