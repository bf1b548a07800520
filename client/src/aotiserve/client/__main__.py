"""``python -m aotiserve.client``: the ``aotiserve`` command."""

import sys

from aotiserve.client.cli import main

sys.exit(main())
