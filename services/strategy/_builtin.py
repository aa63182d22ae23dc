"""The strategies Bastion ships: SMA crossover, VWAP mean reversion and a Donchian breakout.

Each keeps a ``holding`` flag: whether its last entry still holds shares, as its own signals and
the events of its orders say. It is set by a buy signal and cleared by the sell signal, or by
``on_order_event`` when risk refused the entry, the broker ended it unfilled, or its protective
stop (or take-profit) sold the shares -- so the strategy neither sells what it does not hold nor
skips an entry. An entry carries a stop-loss (``stop_bps`` under the close, 200 by default, or
``stop_atr`` average true ranges for the breakout, with a ``target_atr`` take-profit), which the
executor places once the entry fills; with no ``quantity`` (the default) risk sizes the entry -- to risk
``risk.max_risk_fraction`` of equity down to the stop, else ``risk.position_fraction`` of
equity -- and an exit sells the whole position (docs/RISK.md).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.strategy._api import Strategy, register
from shared.models import Bar, ExitReason, Intent, IntentRejected, OrderEvent, OrderStatus, Side

__all__ = ["DonchianBreakout", "DonchianParams", "DonchianState", "HoldingState", "SmaCrossover", "SmaParams",
           "SmaState", "VwapParams", "VwapReversion", "VwapState", "entry_ended"]

BPS = Decimal("10000")
ZERO = Decimal(0)
PositiveQuantity = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]
PositiveDecimal = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]


def stop_below(price: Decimal, bps: Decimal | None) -> Decimal | None:
    """The stop ``bps`` basis points under ``price`` (None: no stop)."""
    return None if bps is None else price * (1 - bps / BPS)


def entry_ended(event: OrderEvent | IntentRejected, entry: str) -> bool:
    """True when ``event`` says the entry intent ``entry`` holds no shares any more: risk refused
    it, the broker ended the buy with nothing filled, or an exit that protects it (a stop, a
    take-profit, a flatten: they carry the entry's intent id) filled."""
    if not entry or event.intent_id != entry:
        return False
    if isinstance(event, IntentRejected):
        return True
    if event.side is Side.BUY:
        return event.status.is_terminal and event.filled_quantity == 0
    return event.status is OrderStatus.FILLED


class HoldingState(BaseModel):
    """Whether the strategy's last entry holds shares, and that entry's intent id."""

    model_config = ConfigDict(extra="forbid")

    holding: bool = False
    entry: str = ""


ParamsT = TypeVar("ParamsT", bound=BaseModel)
StateT = TypeVar("StateT", bound=HoldingState)


class _Holding(Strategy[ParamsT, StateT]):
    """Enters with :meth:`enter`, leaves with :meth:`leave`; ``holding`` follows its orders' events."""

    def enter(self, bar: Bar, quantity: Decimal | None, reason: str, stop_loss: Decimal | None,
              take_profit: Decimal | None = None) -> list[Intent]:
        """A buy of ``bar``, remembered as the entry whose events clear ``holding``."""
        intent = self.intent(bar, Side.BUY, quantity, reason, stop_loss=stop_loss, take_profit=take_profit)
        self.state.holding, self.state.entry = True, intent.id
        return [intent]

    def leave(self, bar: Bar, quantity: Decimal | None, reason: str,
              why: ExitReason = ExitReason.SIGNAL) -> list[Intent]:
        """A sell of ``bar`` closing the entry."""
        self.forget()
        return [self.intent(bar, Side.SELL, quantity, reason, exit_reason=why)]

    def forget(self) -> None:
        """No entry holds shares any more."""
        self.state.holding, self.state.entry = False, ""

    def on_order_event(self, event: OrderEvent | IntentRejected) -> list[Intent]:
        if not entry_ended(event, self.state.entry):
            return []
        # one stop filled while another still covers shares of the entry (it filled in parts): holding
        if isinstance(event, IntentRejected) or event.side is Side.BUY or self.account.position_qty <= 0:
            self.forget()
        return []


class SmaParams(BaseModel):
    """``fast`` and ``slow`` windows in bars (fast < slow); ``quantity`` per signal (None: sized by
    risk); ``stop_bps`` the entry's stop-loss under the close (None: no protective stop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fast: Annotated[int, Field(gt=0)] = 10
    slow: Annotated[int, Field(gt=1)] = 30
    quantity: PositiveQuantity | None = None
    stop_bps: PositiveDecimal | None = Decimal("200")

    @model_validator(mode="after")
    def _fast_below_slow(self) -> SmaParams:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be below slow ({self.slow})")
        return self


class SmaState(HoldingState):
    """The last ``slow`` closes, which side of the slow average the fast one was, and holding."""

    closes: list[Decimal] = []
    fast_above: bool | None = None


@register
class SmaCrossover(_Holding[SmaParams, SmaState]):
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
            stop = stop_below(bar.close, params.stop_bps)
            return self.enter(bar, params.quantity, f"cross up: {detail}", stop)
        if not above and state.holding:
            return self.leave(bar, params.quantity, f"cross down: {detail}")
        return []


class VwapParams(BaseModel):
    """Buy ``band_bps`` below the session VWAP; sell at ``exit_bps`` above it; ``min_bars`` warm-up;
    ``quantity`` and ``stop_bps`` as for :class:`SmaParams`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    band_bps: PositiveDecimal = Decimal("50")
    exit_bps: Annotated[Decimal, Field(allow_inf_nan=False)] = Decimal("0")
    min_bars: Annotated[int, Field(gt=0)] = 5
    quantity: PositiveQuantity | None = None
    stop_bps: PositiveDecimal | None = Decimal("200")


class VwapState(HoldingState):
    """The session (UTC date) and its running price x volume and volume; holding."""

    session: str = ""
    price_volume: Decimal = Decimal(0)
    volume: Decimal = Decimal(0)
    bars: int = 0


@register
class VwapReversion(_Holding[VwapParams, VwapState]):
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
            reason = f"close {bar.close} <= {lower:.4f} ({params.band_bps} bps under VWAP {vwap:.4f})"
            return self.enter(bar, params.quantity, reason, stop_below(bar.close, params.stop_bps))
        if state.holding and bar.close >= upper:
            reason = f"close {bar.close} >= {upper:.4f} (VWAP {vwap:.4f} + {params.exit_bps} bps)"
            return self.leave(bar, params.quantity, reason)
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


class DonchianState(HoldingState):
    """The recent bars' highs, lows and true ranges; the open trade's stop and target."""

    highs: list[Decimal] = []
    lows: list[Decimal] = []
    ranges: list[Decimal] = []
    last_close: Decimal | None = None
    stop: Decimal | None = None
    target: Decimal | None = None


@register
class DonchianBreakout(_Holding[DonchianParams, DonchianState]):
    """A Donchian channel breakout with an ATR stop and an ATR target (placed by the executor as
    one OCO pair once the entry fills)."""

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
        """The signal of ``bar`` against the channel of the bars before it (the stop and the target
        are the broker's: their fill ends the entry through :meth:`on_order_event`)."""
        params, state = self.params, self.state
        if state.holding:
            floor = min(state.lows[-params.exit_bars:])
            if bar.close < floor:
                reason = f"close {bar.close} under the {params.exit_bars}-bar low {floor}"
                return self.leave(bar, None, reason)
            return []
        ceiling = max(state.highs[-params.entry_bars:])
        if bar.close <= ceiling:
            return []
        atr = sum(state.ranges, ZERO) / len(state.ranges)
        stop, target = bar.close - params.stop_atr * atr, bar.close + params.target_atr * atr
        reason = (f"close {bar.close} over the {params.entry_bars}-bar high {ceiling}; "
                  f"ATR {atr:.4f}, stop {stop:.4f}, target {target:.4f}")
        out = self.enter(bar, params.quantity, reason, stop, target)
        state.stop, state.target = stop, target
        return out

    def forget(self) -> None:
        super().forget()
        self.state.stop = self.state.target = None
