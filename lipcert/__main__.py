"""Allow ``python -m lipcert``."""

import sys

from lipcert.cli.app import main

sys.exit(main())
