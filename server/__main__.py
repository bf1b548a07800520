"""``python -m aotiserve.server`` == ``aotiserve serve``."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
