"""The strategies Bastion ships: SMA crossover, VWAP mean reversion and a Donchian breakout.

Each keeps a ``holding`` flag: the strategy's own view of whether its last signal was a buy. It
is not the portfolio (risk may have rejected that buy); it only stops a strategy repeating a
signal. An entry may carry a stop-loss (``stop_bps`` under the close, off by default, or
``stop_atr`` average true ranges for the breakout), which the executor places as a protective
stop once the entry fills; with no ``quantity`` (the default) risk sizes the entry -- to risk
``risk.max_risk_fraction`` of equity down to the stop, else ``risk.position_fraction`` of
equity -- and an exit sells the whole position (docs/RISK.md).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.strategy._api import Strategy, register
from shared.models import Bar, ExitReason, Intent, Side

__all__ = ["DonchianBreakout", "DonchianParams", "DonchianState", "SmaCrossover", "SmaParams", "SmaState",
           "VwapParams", "VwapReversion", "VwapState"]

BPS = Decimal("10000")
ZERO = Decimal(0)
PositiveQuantity = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]
PositiveDecimal = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]


def stop_below(price: Decimal, bps: Decimal | None) -> Decimal | None:
    """The stop ``bps`` basis points under ``price`` (None: no stop)."""
    return None if bps is None else price * (1 - bps / BPS)


class SmaParams(BaseModel):
    """``fast`` and ``slow`` windows in bars (fast < slow); ``quantity`` per signal (None: sized by
    risk); ``stop_bps`` the entry's stop-loss under the close (None: no protective stop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fast: Annotated[int, Field(gt=0)] = 10
    slow: Annotated[int, Field(gt=1)] = 30
    quantity: PositiveQuantity | None = None
    stop_bps: PositiveDecimal | None = None

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
            return [self.intent(bar, Side.BUY, params.quantity, f"cross up: {detail}",
                                stop_loss=stop_below(bar.close, params.stop_bps))]
        if not above and state.holding:
            state.holding = False
            return [self.intent(bar, Side.SELL, params.quantity, f"cross down: {detail}")]
        return []


class VwapParams(BaseModel):
    """Buy ``band_bps`` below the session VWAP; sell at ``exit_bps`` above it; ``min_bars`` warm-up;
    ``quantity`` and ``stop_bps`` as for :class:`SmaParams`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    band_bps: PositiveDecimal = Decimal("50")
    exit_bps: Annotated[Decimal, Field(allow_inf_nan=False)] = Decimal("0")
    min_bars: Annotated[int, Field(gt=0)] = 5
    quantity: PositiveQuantity | None = None
    stop_bps: PositiveDecimal | None = None


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
            return [self.intent(bar, Side.BUY, params.quantity, reason,
                                stop_loss=stop_below(bar.close, params.stop_bps))]
        if state.holding and bar.close >= upper:
            state.holding = False
            reason = f"close {bar.close} >= {upper:.4f} (VWAP {vwap:.4f} + {params.exit_bps} bps)"
            return [self.intent(bar, Side.SELL, params.quantity, reason)]
        return []


class DonchianParams(BaseModel):
    """Enter above the ``entry_bars`` high, leave below the ``exit_bars`` low; the stop-loss
    ``stop_atr`` and the profit target ``target_atr`` average true ranges (over ``atr_bars``) from
    the entry; ``quantity`` as for :class:`SmaParams` (None: risk sizes it on the stop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entry_bars: Annotated[int, Field(gt=1)] = 20
    exit_bars: Annotated[int, Field(gt=1)] = 10
    atr_bars: Annotated[int, Field(gt=0)] = 14
    stop_atr: PositiveDecimal = Decimal("2")
    target_atr: PositiveDecimal = Decimal("4")
    quantity: PositiveQuantity | None = None


class DonchianState(BaseModel):
    """The recent bars' highs, lows and true ranges; the open trade's stop and target."""

    model_config = ConfigDict(extra="forbid")

    highs: list[Decimal] = []
    lows: list[Decimal] = []
    ranges: list[Decimal] = []
    last_close: Decimal | None = None
    holding: bool = False
    stop: Decimal | None = None
    target: Decimal | None = None


@register
class DonchianBreakout(Strategy[DonchianParams, DonchianState]):
    """A Donchian channel breakout with an ATR stop (placed by the executor) and an ATR target."""

    name = "donchian_breakout"
    params_model = DonchianParams
    state_model = DonchianState

    def on_bar(self, bar: Bar) -> list[Intent]:
        params, state = self.params, self.state
        out = self._decide(bar) if len(state.highs) >= params.entry_bars and state.ranges else []
        previous = state.last_close if state.last_close is not None else bar.open
        true_range = max(bar.high - bar.low, abs(bar.high - previous), abs(bar.low - previous))
        keep = max(params.entry_bars, params.exit_bars)
        state.highs = [*state.highs, bar.high][-keep:]
        state.lows = [*state.lows, bar.low][-keep:]
        state.ranges = [*state.ranges, true_range][-params.atr_bars:]
        state.last_close = bar.close
        return out

    def _decide(self, bar: Bar) -> list[Intent]:
        """The signal of ``bar`` against the channel of the bars before it."""
        params, state = self.params, self.state
        if state.holding:
            if state.stop is not None and bar.low <= state.stop:  # the executor's stop took it
                state.holding, state.stop, state.target = False, None, None
                return []
            floor = min(state.lows[-params.exit_bars:])
            if state.target is not None and bar.close >= state.target:
                return self._exit(bar, ExitReason.TAKE_PROFIT, f"close {bar.close} reached {state.target}")
            if bar.close < floor:
                return self._exit(bar, ExitReason.SIGNAL,
                                  f"close {bar.close} under the {params.exit_bars}-bar low {floor}")
            return []
        ceiling = max(state.highs[-params.entry_bars:])
        if bar.close <= ceiling:
            return []
        atr = sum(state.ranges, ZERO) / len(state.ranges)
        state.holding = True
        state.stop = bar.close - params.stop_atr * atr
        state.target = bar.close + params.target_atr * atr
        reason = (f"close {bar.close} over the {params.entry_bars}-bar high {ceiling}; "
                  f"ATR {atr:.4f}, stop {state.stop:.4f}, target {state.target:.4f}")
        return [self.intent(bar, Side.BUY, params.quantity, reason, stop_loss=state.stop)]

    def _exit(self, bar: Bar, why: ExitReason, reason: str) -> list[Intent]:
        self.state.holding, self.state.stop, self.state.target = False, None, None
        return [self.intent(bar, Side.SELL, None, reason, exit_reason=why)]
