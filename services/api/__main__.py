"""``python -m services.api``: run the HTTP API."""

from services.api.service import main

if __name__ == "__main__":
    raise SystemExit(main())
