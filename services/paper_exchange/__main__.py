"""``python -m services.paper_exchange``: run the embedded paper exchange."""

from services.paper_exchange.service import main

if __name__ == "__main__":
    raise SystemExit(main())
