"""A test-only strategy plugin for the strategy API's process test (list it in ``strategy.modules``).

``account_echo`` keeps in its state the trade_count of every bar it is fed, warm-up history
apart, emits a buy on every bar (so a test sees that warm-up never trades) and, inside each
commit, appends to ``<prefix>:account-echo`` one JSON line per live bar: its trade_count and the
account it saw.
"""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from redis.client import Pipeline

from services.strategy import Strategy, register
from shared.keys import Keys
from shared.models import Bar, Intent, Side


class EchoParams(BaseModel):
    pass


class EchoState(BaseModel):
    seen: list[int] = []
    warm: list[int] = []


@register
class AccountEcho(Strategy[EchoParams, EchoState]):
    name = "account_echo"
    params_model = EchoParams
    state_model = EchoState

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.echoes: list[str] = []

    def on_bar(self, bar: Bar) -> list[Intent]:
        seq = bar.trade_count or 0
        self.state.seen = [*self.state.seen, seq]
        if self.warming_up:
            self.state.warm = [*self.state.warm, seq]
        else:
            echo = {"seq": seq, "account": dataclasses.asdict(self.account)}
            self.echoes.append(json.dumps(echo, default=str))
        return [self.intent(bar, Side.BUY, Decimal(1), f"seq {seq}")]

    def queue_effects(self, pipe: Pipeline, keys: Keys) -> None:
        if self.echoes:
            pipe.rpush(f"{keys.prefix}:account-echo", *self.echoes)
