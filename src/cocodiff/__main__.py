"""`python -m cocodiff ...` runs the command line (`cocodiff.apps.cli`)."""

import sys

from .apps.cli import main

sys.exit(main())
