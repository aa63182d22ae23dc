"""A portfolio for tests that pauses between its decision and its write."""

from __future__ import annotations

from typing import Any

from shared.portfolio import Portfolio
from shared.portfolio.locks import FencedLock


class StallsBeforeWriting(Portfolio):
    """A portfolio whose next write first runs ``stall`` (a holder paused between decision and write)."""

    stall: Any = None

    def _commit(self, lock: FencedLock, token: int, state: Any, entry: Any, outcome: Any,
                then: Any = None, record: Any = None) -> tuple[Any, ...]:
        if self.stall is not None:
            stall, self.stall = self.stall, None
            stall()
        return super()._commit(lock, token, state, entry, outcome, then, record)
