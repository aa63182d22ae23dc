"""The asset list: which symbols the exchange trades.

Tradable: the configured symbols (the ingester's ``ingester.symbols`` and the extra
``paper_exchange.symbols``), every symbol the exchange has seen a bar for or holds a position in,
and every symbol the ingester has published a bar for (its last-price hash, written in the same
script as the bar: an order placed on a bar the exchange has not consumed yet still finds its
asset). Every asset is an active, tradable US equity; an asset is found by its symbol (any case)
or by its id (a UUID derived from the symbol, stable across restarts).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import services.paper_exchange._render as render
from services.paper_exchange._requests import ApiError
from services.paper_exchange._store import Store

__all__ = ["Assets"]


class Assets:
    """The configured symbols plus those the book and the ingester know of."""

    def __init__(self, configured: Iterable[str], store: Store) -> None:
        self.configured = frozenset(symbol.upper() for symbol in configured)
        self.store = store

    def _local(self) -> set[str]:
        return set(self.configured) | set(self.store.prices()) | set(self.store.positions())

    def symbols(self) -> list[str]:
        """Every tradable symbol, sorted."""
        return sorted(self._local() | self.store.ingested_symbols())

    def find(self, name: str) -> str | None:
        """The symbol named by ``name`` (a symbol in any case, or an asset id), or None."""
        symbol = name.upper()
        if symbol in self._local() or self.store.ingested_price(symbol) is not None:
            return symbol
        try:
            uuid.UUID(name)
        except ValueError:
            return None
        return next((s for s in self.symbols() if render.asset_id(s) == name.lower()), None)

    def get(self, name: str) -> str:
        """:meth:`find`, or Alpaca's 404 ``asset not found``."""
        symbol = self.find(name)
        if symbol is None:
            raise ApiError(404, 40410000, "asset not found")
        return symbol

    def check_tradable(self, symbol: str) -> None:
        """Refuse an order for a symbol the exchange does not trade, as Alpaca does (422)."""
        if symbol.upper() not in self._local() and self.store.ingested_price(symbol) is None:
            raise ApiError(422, 42210000, f'asset "{symbol}" not found: the paper exchange trades the '
                                          "ingester's symbols, paper_exchange.symbols and any symbol "
                                          "with a bar")

    def listing(self, query: dict[str, Any], shortable: bool) -> list[dict[str, Any]]:
        """GET /v2/assets: every asset, filtered by ``status``, ``asset_class``, ``exchange`` and
        ``attributes`` as Alpaca filters (every asset here is active, us_equity, NASDAQ, with no
        attributes)."""
        if query.get("status", "active") != "active" or query.get("asset_class", "us_equity") != "us_equity":
            return []
        if query.get("exchange", "NASDAQ") != "NASDAQ" or query.get("attributes"):
            return []
        return [render.asset(symbol, shortable) for symbol in self.symbols()]
