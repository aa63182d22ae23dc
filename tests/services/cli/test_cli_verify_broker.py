"""``bastion verify --broker`` run in process: an unreachable broker, and money differences within the
tolerance (the books against a running paper exchange's are tests/system/test_verify_broker.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.cli._context import EXIT_UNAVAILABLE
from services.cli.service import main
from shared.keys import Keys
from shared.portfolio import Portfolio
from shared.redis.connection import connect_url
from tests.support.environment import clear_settings
from tests.support.paper import KEY_ID, SECRET
from tests.support.processes import free_port


def point_cli_at(monkeypatch: pytest.MonkeyPatch, redis_url: str, keys: Keys, port: int) -> None:
    """The CLI reads this Redis under the test's prefix and the paper exchange on ``port``."""
    clear_settings(monkeypatch)
    env = {"REDIS_URL": redis_url, "BASTION_KEY_PREFIX": keys.prefix,
           "BASTION_PAPER_EXCHANGE__PORT": str(port), "BASTION_PAPER_EXCHANGE__API_KEY": KEY_ID,
           "BASTION_PAPER_EXCHANGE__SECRET_KEY": SECRET, "BASTION_BROKER__READ_RETRIES": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)


class TestVerifyBrokerUnreachable:
    def test_unreachable_broker_exits_3_with_the_reason(self, real_redis_url: str, keys: Keys,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing listening where the paper exchange should be: exit 3, the reason on stderr, no
        traceback."""
        point_cli_at(monkeypatch, real_redis_url, keys, free_port())
        client = connect_url(real_redis_url)
        try:
            Portfolio(client, keys, "paper").open()
            assert main(["verify", "--broker"]) == EXIT_UNAVAILABLE
        finally:
            for key in client.scan_iter(match=keys.pattern(), count=1000):
                client.delete(key)
            client.close()
        captured = capsys.readouterr()
        assert "broker unreachable" in captured.err and "Traceback" not in captured.err
        assert captured.out.startswith("ok: account 'paper'")


def test_money_within_tolerance_is_printed_not_failed() -> None:
    """A cash difference within ``reconciler.cash_tolerance`` (a look-up's rounded average price)
    does not fail the check; one beyond it, or any order difference, does."""
    from services.cli.commands.verify import _failing
    from services.reconciler._compare import Ours, Theirs, compare

    ours = Ours(opened=True, cash=Decimal("598.109999"), reserved=Decimal(0), positions={}, open_orders={})
    close = compare(ours, Theirs(cash=Decimal("598.11"), positions={}, open_orders={}),
                    cash_tolerance=Decimal("0.01"), quantity_tolerance=Decimal(0))
    far = compare(ours, Theirs(cash=Decimal("599"), positions={}, open_orders={}),
                  cash_tolerance=Decimal("0.01"), quantity_tolerance=Decimal(0))
    assert [d.kind for d in close.differences] == ["cash"] and _failing(close) == []
    assert [d.kind for d in _failing(far)] == ["cash"]
