"""The strategies Bastion ships: SMA crossover and VWAP mean reversion.

Both keep a ``holding`` flag: the strategy's own view of whether its last signal was a buy. It
is not the portfolio (risk may have rejected that buy); it only stops a strategy repeating a
signal. Quantities are fixed per strategy (``quantity``); risk sizes and caps the order.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.strategy._api import Strategy, register
from shared.models import Bar, Intent, Side

__all__ = ["SmaCrossover", "SmaParams", "SmaState", "VwapParams", "VwapReversion", "VwapState"]

BPS = Decimal("10000")
ZERO = Decimal(0)
PositiveQuantity = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]


class SmaParams(BaseModel):
    """``fast`` and ``slow`` windows in bars (fast < slow); ``quantity`` per signal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fast: Annotated[int, Field(gt=0)] = 10
    slow: Annotated[int, Field(gt=1)] = 30
    quantity: PositiveQuantity = Decimal("1")

    @model_validator(mode="after")
    def _fast_below_slow(self) -> SmaParams:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be below slow ({self.slow})")
        return self


class SmaState(BaseModel):
    """The last ``slow`` closes, which side of the slow average the fast one was, and holding."""

    model_config = ConfigDict(extra="forbid")

    closes: list[Decimal] = []
    fast_above: bool | None = None
    holding: bool = False


@register
class SmaCrossover(Strategy[SmaParams, SmaState]):
    """Buy when the fast SMA crosses above the slow one; sell (if holding) when it crosses below."""

    name = "sma_crossover"
    params_model = SmaParams
    state_model = SmaState

    def on_bar(self, bar: Bar) -> list[Intent]:
        params, state = self.params, self.state
        state.closes = [*state.closes, bar.close][-params.slow:]
        if len(state.closes) < params.slow:
            return []
        fast = sum(state.closes[-params.fast:], ZERO) / params.fast
        slow = sum(state.closes, ZERO) / params.slow
        if fast == slow:
            return []
        above, was_above = fast > slow, state.fast_above
        if above != was_above:  # assigning a model field is not free: only on a change
            state.fast_above = above
        if was_above is None or above == was_above:
            return []
        detail = f"fast SMA({params.fast})={fast:.4f} slow SMA({params.slow})={slow:.4f}"
        if above and not state.holding:
            state.holding = True
            return [self.intent(bar, Side.BUY, params.quantity, f"cross up: {detail}")]
        if not above and state.holding:
            state.holding = False
            return [self.intent(bar, Side.SELL, params.quantity, f"cross down: {detail}")]
        return []


class VwapParams(BaseModel):
    """Buy ``band_bps`` below the session VWAP; sell at ``exit_bps`` above it; ``min_bars`` warm-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    band_bps: Annotated[Decimal, Field(gt=0, allow_inf_nan=False)] = Decimal("50")
    exit_bps: Annotated[Decimal, Field(allow_inf_nan=False)] = Decimal("0")
    min_bars: Annotated[int, Field(gt=0)] = 5
    quantity: PositiveQuantity = Decimal("1")


class VwapState(BaseModel):
    """The session (UTC date) and its running price x volume and volume; holding."""

    model_config = ConfigDict(extra="forbid")

    session: str = ""
    price_volume: Decimal = Decimal(0)
    volume: Decimal = Decimal(0)
    bars: int = 0
    holding: bool = False


@register
class VwapReversion(Strategy[VwapParams, VwapState]):
    """Mean reversion to the session VWAP (each bar weighted by its own vwap, else (h+l+c)/3)."""

    name = "vwap_reversion"
    params_model = VwapParams
    state_model = VwapState

    def on_bar(self, bar: Bar) -> list[Intent]:
        params, state = self.params, self.state
        session = bar.time.date().isoformat()
        if session != state.session:
            state.session, state.price_volume, state.volume, state.bars = session, Decimal(0), Decimal(0), 0
        price = bar.vwap if bar.vwap is not None else (bar.high + bar.low + bar.close) / 3
        state.price_volume += price * bar.volume
        state.volume += bar.volume
        state.bars += 1
        if state.bars < params.min_bars or not state.volume:
            return []
        vwap = state.price_volume / state.volume
        lower = vwap * (1 - params.band_bps / BPS)
        upper = vwap * (1 + params.exit_bps / BPS)
        if not state.holding and bar.close <= lower:
            state.holding = True
            reason = f"close {bar.close} <= {lower:.4f} ({params.band_bps} bps under VWAP {vwap:.4f})"
            return [self.intent(bar, Side.BUY, params.quantity, reason)]
        if state.holding and bar.close >= upper:
            state.holding = False
            reason = f"close {bar.close} >= {upper:.4f} (VWAP {vwap:.4f} + {params.exit_bps} bps)"
            return [self.intent(bar, Side.SELL, params.quantity, reason)]
        return []
