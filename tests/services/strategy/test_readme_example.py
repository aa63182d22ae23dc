"""The strategy the README shows runs as written: it enters on a breakout with a stop-loss, sized
by risk, stays out while its entry holds, and may enter again once risk refused the entry or its
protective stop sold it."""

from __future__ import annotations

import importlib
import re
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from services.strategy._api import _REGISTRY
from shared.models import Bar, IntentRejected, OrderEvent, OrderStatus, Side

README = Path(__file__).resolve().parents[3] / "README.md"
T0 = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)


@pytest.fixture
def breakout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The README's strategy class, imported from a module holding the README's code block."""
    block = re.search(r"## Writing a strategy.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "the README lost its strategy example"
    (tmp_path / "readme_strategy.py").write_text(block[1])
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("readme_strategy")
    yield module.Breakout
    _REGISTRY.pop("breakout", None)
    sys.modules.pop("readme_strategy", None)


def bar(minute: int, price: str) -> Bar:
    value = Decimal(price)
    return Bar(time=T0 + timedelta(minutes=minute), symbol="AAPL", open=value, high=value, low=value,
               close=value, volume=Decimal(1000))


def test_enters_on_a_new_high_with_a_stop_and_no_size(breakout: Any) -> None:
    strategy = breakout("AAPL", breakout.params_model(lookback=3), breakout.state_model())
    assert [strategy.on_bar(bar(m, "100")) for m in range(3)] == [[], [], []]
    [intent] = strategy.on_bar(bar(3, "101"))
    assert (intent.side, intent.quantity, intent.stop_loss) == (Side.BUY, None, Decimal("98.98"))
    assert strategy.on_bar(bar(4, "102")) == []  # its entry holds: no second buy


def test_enters_again_after_a_refusal_or_a_stop_out(breakout: Any) -> None:
    strategy = breakout("AAPL", breakout.params_model(lookback=3), breakout.state_model())
    for m in range(3):
        strategy.on_bar(bar(m, "100"))
    [first] = strategy.on_bar(bar(3, "101"))
    strategy.on_order_event(IntentRejected(time=T0, intent_id=first.id, symbol="AAPL", reason="limits"))
    [second] = strategy.on_bar(bar(4, "102"))
    strategy.on_order_event(OrderEvent(time=T0, client_order_id="bst-x-sl1", intent_id=second.id,
                                       symbol="AAPL", side=Side.SELL, status=OrderStatus.PARTIALLY_FILLED,
                                       filled_quantity=Decimal(1)))
    assert strategy.on_bar(bar(5, "103")) == []  # part of the position is still held
    strategy.on_order_event(OrderEvent(time=T0, client_order_id="bst-x-sl1", intent_id=second.id,
                                       symbol="AAPL", side=Side.SELL, status=OrderStatus.FILLED,
                                       filled_quantity=Decimal(2)))
    [third] = strategy.on_bar(bar(6, "104"))
    assert len({first.id, second.id, third.id}) == 3
