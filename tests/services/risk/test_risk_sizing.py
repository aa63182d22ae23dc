"""Risk sizes the intents that name no size, and carries their protective exits onto the order."""

from __future__ import annotations

from decimal import Decimal

from shared.models import ExitReason, Side
from tests.services.risk.test_risk import KEYS, Desk, intent


class TestSizedByRisk:
    def test_entry_sized_by_risk_over_the_stop(self) -> None:
        """$10,000 equity, 1% at risk, a stop $2.50 under a $150 mark: 40 shares, with the stop
        carried onto the order."""
        desk = Desk()
        desk.send(intent(quantity=None, stop_loss="147.50"))
        [order] = desk.orders()
        assert (order.quantity, order.stop_loss) == (Decimal(40), Decimal("147.50"))

    def test_entry_without_stop_takes_the_position_fraction(self) -> None:
        """No stop: 5% of $10,000 at $150 is 3.33 shares, rounded down to the lot: 3."""
        desk = Desk()
        desk.send(intent(quantity=None))
        assert [o.quantity for o in desk.orders()] == [Decimal(3)]

    def test_sized_entry_cut_to_the_order_notional_cap(self) -> None:
        """Risk would take 400 shares; max_order_notional $3,000 at $150 allows 20."""
        desk = Desk(max_order_notional="3000")
        desk.send(intent(quantity=None, stop_loss="149.75"))
        assert [o.quantity for o in desk.orders()] == [Decimal(20)]

    def test_stop_above_a_long_entry_rejected(self) -> None:
        """A long entry whose stop is above the mark is rejected with the reason, not sized."""
        desk = Desk()
        desk.send(intent(quantity=None, stop_loss="151"))
        assert desk.orders() == []
        assert desk.reasons() == ["sizing: stop_loss 151 is not below the buy entry price 150"]

    def test_exit_without_size_sells_the_whole_position(self) -> None:
        """A sell with no size against 12 shares held sells 12, and keeps its exit reason."""
        desk = Desk()
        desk.hold("AAPL", "12")
        desk.send(intent(Side.SELL, quantity=None, exit_reason=ExitReason.STOP_LOSS))
        [order] = desk.orders()
        assert (order.side, order.quantity) == (Side.SELL, Decimal(12))
        assert order.exit_reason is ExitReason.STOP_LOSS
        assert order.stop_loss is None

    def test_exit_does_not_carry_protection(self) -> None:
        """Protective prices belong to entries: an exit's order carries none."""
        desk = Desk()
        desk.hold("AAPL", "12")
        desk.send(intent(Side.SELL, quantity=Decimal(5), stop_loss="160"))
        [order] = desk.orders()
        assert order.stop_loss is None


class TestExitsPastProtectiveStops:
    def protected(self, desk: Desk) -> None:
        """12 AAPL held, all reserved by the executor's protective stop ``bst-e-sl1``."""
        desk.hold("AAPL", "12")
        desk.risk.portfolio.reserve("bst-e-sl1", "AAPL", Side.SELL, Decimal(12), Decimal(140))
        desk.client.hset(KEYS.order("bst-e-sl1"), mapping={"symbol": "AAPL", "side": "sell",
                                                            "protects": "bst-e",
                                                            "status": "new"})
        desk.client.sadd(KEYS.open_orders, "bst-e-sl1")

    def test_strategy_exit_cancels_the_stop_and_waits(self) -> None:
        """A strategy's exit finds the shares held by a protective stop: the stop is cancelled at the
        broker (marked, so it is not replaced) and the exit waits; once the stop's shares are
        released the exit sells them."""
        desk = Desk()
        self.protected(desk)
        desk.send(intent(Side.SELL, quantity=None, source="strategy:s"))
        assert desk.orders() == [] and desk.reasons() == []
        assert [c.args for c in desk.broker.calls if c.method == "cancel"] == [("bst-e-sl1",)]
        assert desk.client.hget(KEYS.order("bst-e-sl1"), "cancel_reason").startswith(b"exit ")
        desk.risk.portfolio.release("bst-e-sl1")  # the executor, when the broker confirms the cancel
        desk.risk.tick()
        assert [(o.side, o.quantity) for o in desk.orders()] == [(Side.SELL, Decimal(12))]

    def test_manual_exit_says_what_holds_the_shares(self) -> None:
        """A manual sell is not deferred: it is rejected naming the stop being cancelled."""
        desk = Desk()
        self.protected(desk)
        desk.send(intent(Side.SELL, quantity=Decimal(5)))
        [reason] = desk.reasons()
        assert "held by protective stop(s) bst-e-sl1: cancelling them first" in reason
