"""``python -m services.redis``: run the embedded Redis in the foreground."""

import sys

from services.redis.service import main

if __name__ == "__main__":
    sys.exit(main())
