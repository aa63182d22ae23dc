"""An operator's override of the protections' locks: one manual entry passes them, logged with its
reason; nothing else changes (strategies cannot override, limits still apply, the lock stays)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from shared.models import ExitReason, Side
from shared.safety.protections import ClosedTrade, Protections
from tests.services.risk.test_risk import KEYS, T0, Desk, intent


@pytest.fixture
def locked() -> Desk:
    """A desk whose AAPL entries a cooldown locks (an exit just closed a round trip)."""
    desk = Desk()
    Protections(desk.client, KEYS, desk.settings.protections, desk.clock).record_trade_closed(
        ClosedTrade("t1", "AAPL", Side.BUY, Decimal(5), exit_reason=ExitReason.SIGNAL, at=T0))
    return desk


def test_a_refused_manual_entry_says_how_to_override(locked: Desk) -> None:
    locked.send(intent())
    [reason] = locked.reasons()
    assert reason.startswith("protection_lock") and "cooldown" in reason
    assert "--override-locks REASON" in reason
    assert locked.orders() == []


def test_an_override_passes_the_lock_once_and_is_logged(locked: Desk) -> None:
    with capture_logs() as logs:
        locked.send(intent(override_locks="rebalancing by hand"))
    [order] = locked.orders()
    assert (order.side, order.quantity) == (Side.BUY, Decimal(10))
    [event] = [e for e in logs if e["event"] == "risk.locks_overridden"]
    assert event["override"] == "rebalancing by hand" and "cooldown" in event["lock"]
    locked.send(intent(quantity=Decimal(1)))  # the next entry without one is refused: the lock stays
    assert [r.split(":")[0] for r in locked.reasons()] == ["protection_lock"]


def test_an_override_does_not_pass_the_limits(locked: Desk) -> None:
    locked.send(intent(quantity=Decimal(1000), override_locks="big"))  # $150,000 on $10,000
    assert locked.orders() == []
    [reason] = locked.reasons()
    assert not reason.startswith("protection_lock")


def test_only_a_manual_intent_may_override() -> None:
    with pytest.raises(ValidationError, match="only a manual intent"):
        intent(source="strategy:sma_crossover", override_locks="no")


def test_a_strategy_refusal_carries_no_override_hint(locked: Desk) -> None:
    locked.send(intent(source="strategy:sma_crossover"))
    [reason] = locked.reasons()
    assert reason.startswith("protection_lock") and "override" not in reason
