"""Test-only strategy plugins (list this module in ``strategy.modules``).

``recorder`` appends ``<symbol>:<trade_count>`` for every bar it applies to ``<prefix>:processed``
inside the same transaction as the state write, and emits a buy intent on every bar whose
trade_count is a multiple of ``every``: a test can check each bar was applied exactly once and
in order, and that no intent was lost or doubled. ``thief`` takes its partition's lease away
from its own worker in the middle of a batch (a stand-in for a holder that stalled past its
lease). ``boom`` raises on bars whose trade_count is a multiple of ``every``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from redis.client import Pipeline

from services.strategy import Strategy, register
from shared.keys import Keys
from shared.models import Bar, Intent, Side


class RecorderParams(BaseModel):
    every: int = 5


class RecorderState(BaseModel):
    count: int = 0
    last_seq: int = -1


@register
class Recorder(Strategy[RecorderParams, RecorderState]):
    name = "recorder"
    params_model = RecorderParams
    state_model = RecorderState

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.record: list[str] = []

    def on_bar(self, bar: Bar) -> list[Intent]:
        seq = bar.trade_count or 0
        self.state.count += 1
        self.state.last_seq = seq
        self.record.append(f"{bar.symbol}:{seq}")
        if seq % self.params.every == 0:
            return [self.intent(bar, Side.BUY, Decimal(1), f"seq {seq}")]
        return []

    def queue_effects(self, pipe: Pipeline, keys: Keys) -> None:
        if self.record:
            pipe.rpush(f"{keys.prefix}:processed", *self.record)


class ThiefParams(BaseModel):
    lease_key: str = ""


@register
class Thief(Strategy[ThiefParams, RecorderState]):
    name = "thief"
    params_model = ThiefParams
    state_model = RecorderState
    client: Any = None  # set by the test

    def on_bar(self, bar: Bar) -> list[Intent]:
        self.state.count += 1
        type(self).client.set(self.params.lease_key, "someone-else")
        return [self.intent(bar, Side.BUY, Decimal(1), "stolen")]


@register
class Boom(Strategy[RecorderParams, RecorderState]):
    name = "boom"
    params_model = RecorderParams
    state_model = RecorderState

    def on_bar(self, bar: Bar) -> list[Intent]:
        seq = bar.trade_count or 0
        if seq % self.params.every == 0:
            raise RuntimeError(f"boom at {seq}")
        self.state.count += 1
        self.state.last_seq = seq
        return [self.intent(bar, Side.BUY, Decimal(1), f"seq {seq}")]
