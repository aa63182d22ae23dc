"""Risk sizes the intents that name no size, and carries their protective exits onto the order."""

from __future__ import annotations

from decimal import Decimal

from shared.models import ExitReason, Side
from tests.services.risk.test_risk import Desk, intent


class TestSizedByRisk:
    def test_entry_sized_by_risk_over_the_stop(self) -> None:
        """$10,000 equity, 1% at risk, a stop $2.50 under a $150 mark: 40 shares, with the stop and
        target carried onto the order."""
        desk = Desk()
        desk.send(intent(quantity=None, stop_loss="147.50", take_profit="160"))
        [order] = desk.orders()
        assert (order.quantity, order.stop_loss, order.take_profit) == (Decimal(40), Decimal("147.50"),
                                                                        Decimal(160))

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
        assert (order.side, order.quantity, order.exit_reason) == (Side.SELL, Decimal(12), ExitReason.STOP_LOSS)
        assert order.stop_loss is None

    def test_exit_does_not_carry_protection(self) -> None:
        """Protective prices belong to entries: an exit's order carries none."""
        desk = Desk()
        desk.hold("AAPL", "12")
        desk.send(intent(Side.SELL, quantity=Decimal(5), take_profit="140"))
        [order] = desk.orders()
        assert (order.take_profit, order.stop_loss) == (None, None)
