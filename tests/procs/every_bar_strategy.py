"""Benchmark strategy plugin (list this module in ``strategy.modules``): ``every_bar``.

``every_bar`` emits one market buy intent of ``quantity`` shares (default 1) on each bar it
applies whose ``trade_count`` is a multiple of ``every`` (default 1: every bar; a bar without a
``trade_count`` counts as 0, so it always orders), and nothing else. The pipeline benchmark
(``tests/bench/pipeline.py``) numbers the bars of its run in ``trade_count`` (a field nothing
else on the desk reads), so it knows, without reading any stream, which bars become orders:
with ``every=k``, the bars whose sequence number is a multiple of k, 1 in k of the bars every
stage consumes. Every other bar still goes through the worker in full (decoded, applied,
counted in the state, the state written back); it just yields no intent.

The intent id is the usual one (strategy, symbol, bar id, index 0), so the benchmark derives
each ordering bar's client_order_id without reading the intents stream. Its state counts the
bars applied and the intents emitted, so the worker writes a state document per batch as any
strategy does.
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, Field

from services.strategy import Strategy, register
from shared.models import Bar, Intent, Side


class EveryBarParams(BaseModel):
    quantity: Decimal = Decimal(1)
    every: int = Field(default=1, ge=1)  # order on a bar iff its trade_count is a multiple of this


class EveryBarState(BaseModel):
    bars: int = 0
    orders: int = 0


@register
class EveryBar(Strategy[EveryBarParams, EveryBarState]):
    name = "every_bar"
    params_model = EveryBarParams
    state_model = EveryBarState

    def on_bar(self, bar: Bar) -> list[Intent]:
        self.state.bars += 1
        if (bar.trade_count or 0) % self.params.every != 0:
            return []
        self.state.orders += 1
        reason = f"trade_count a multiple of {self.params.every}"
        return [self.intent(bar, Side.BUY, self.params.quantity, reason)]
