"""``python -m tributary.eventctl``."""

import sys

from tributary.eventctl.cli import main

sys.exit(main())
