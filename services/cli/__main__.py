"""``python -m services.cli``: the same as the ``bastion`` command."""

import sys

from services.cli.service import main

if __name__ == "__main__":
    sys.exit(main())
