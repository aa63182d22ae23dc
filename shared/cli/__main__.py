"""``python -m shared.cli``: the same as the ``bastion`` command."""

import sys

from shared.cli import main

sys.exit(main())
