"""The kill switch's actions, carried out once per trading-state change ``seq``."""

from __future__ import annotations

from typing import Any

from services.executor._orders import OrderDesk
from services.executor._records import (
    NOT_YET_SHOWN,
    run_pass,
)
from shared.bus import Delivery
from shared.errors import (
    BrokerError,
    HandlerRejected,
    OrderNotFound,
    PortfolioError,
)
from shared.keys import ORDERS
from shared.logging import get_logger
from shared.models import (
    ExitReason,
    Order,
    OrderStatus,
    Side,
)
from shared.safety.protective_stops import cancel_on_purpose, open_protective_stops
from shared.safety.trading_state import TradingStatus
from shared.stop import Stoppable

__all__ = ["KillSwitchActions"]

log = get_logger(component="executor")


class KillSwitchActions(OrderDesk):
    """Carries out each trading-state change once: cancel open orders, flatten positions."""

    def act_on_trading_state(self) -> bool:
        """Carry out the current change's cancel/flatten requests once per seq; True if it acted."""
        status = self.kill_switch.current()
        if not (status.cancel_open_orders or status.flatten_positions):
            return False
        acted = self.client.get(self.acted_key)
        if acted is not None and int(acted) >= status.seq:
            return False
        done = True
        if status.cancel_open_orders:
            done = self._cancel_open_orders(status) and done
        if status.flatten_positions:
            done = self._flatten(status) and done
        if done:
            self.client.set(self.acted_key, status.seq)
            log.warning("executor.trading_state_acted", seq=status.seq, state=status.state.value,
                        cancel_open_orders=status.cancel_open_orders, flatten=status.flatten_positions)
        return done

    def _cancel_open_orders(self, status: TradingStatus) -> bool:
        """Cancel every order we hold open, by client_order_id; False while one could not be
        cancelled, or is pending/unknown and not shown by the broker yet (it may still appear)."""
        members: Any = self.client.smembers(self.keys.open_orders)
        done = True
        for cid in sorted(m.decode() for m in members):
            if cid.startswith(f"bst-flat-{status.seq}-"):
                continue  # this change's own flatten orders
            protective = bool(self._record(cid).get("protects"))
            if protective and not status.flatten_positions:
                continue  # a protective stop stays while its position does
            try:
                if protective:  # not to be replaced: the flatten sells its shares
                    self._cancel_on_purpose(cid, status)
                else:
                    self.broker.cancel(cid)
                log.info("executor.cancel_requested", client_order_id=cid, seq=status.seq)
            except OrderNotFound:
                if self._record(cid).get("status") in NOT_YET_SHOWN:
                    log.info("executor.cancel_waits_for_order", client_order_id=cid)
                    done = False
                else:
                    log.warning("executor.cancel_unknown_order", client_order_id=cid)
            except BrokerError as exc:
                log.warning("executor.cancel_failed", client_order_id=cid, error=str(exc))
                done = False
        return done

    def _flatten(self, status: TradingStatus) -> bool:
        """A closing market order for every position (what other reservations do not already hold);
        a position protective stops hold waits until their cancel (requested here) frees it."""
        # the stops first: one that ended released its shares before it left the open set, so a
        # snapshot read after finds them free (read before, it could still count them reserved)
        protected = open_protective_stops(self.client, self.keys)
        snapshot = self.portfolio.snapshot()
        marks = self.portfolio.marks()
        done = True
        for symbol, position in sorted(snapshot.positions.items()):
            cid = f"bst-flat-{status.seq}-{symbol}"
            record = self._record(cid)
            if record and record["status"] != OrderStatus.PENDING_SUBMIT:
                continue  # submitted already; one still pending_submit is submitted again below
            if protected.get(symbol):
                self._cancel_protection(protected[symbol], status)
                done = False
                continue
            quantity = abs(position.qty) - position.reserved if position.qty > 0 else abs(position.qty)
            if quantity <= 0:
                continue
            side = Side.SELL if position.qty > 0 else Side.BUY
            price = marks.get(symbol, position.avg_cost)
            order = Order(time=self.clock.now(), intent_id=cid, client_order_id=cid,
                          account=self.portfolio.account, symbol=symbol, side=side, quantity=quantity,
                          reservation_id=cid, exit_reason=ExitReason.FLATTEN)
            try:
                if cid not in snapshot.reservations:
                    self.portfolio.reserve(cid, symbol, side, quantity, price)
                self.handle_order(Delivery(ORDERS, f"flatten-{status.seq}", order, 1), bypass_state=True)
            except (BrokerError, PortfolioError, HandlerRejected) as exc:
                log.warning("executor.flatten_failed", symbol=symbol, error=str(exc))
                done = False
        return done

    def _cancel_protection(self, stops: list[tuple[str, str]], status: TradingStatus) -> None:
        """Ask the broker to cancel protective stops on purpose (a failure is asked again next pass)."""
        for stop_cid, _ in stops:
            try:
                self._cancel_on_purpose(stop_cid, status)
            except BrokerError as exc:
                log.warning("executor.cancel_failed", client_order_id=stop_cid, error=str(exc))

    def _cancel_on_purpose(self, cid: str, status: TradingStatus) -> None:
        cancel_on_purpose(self.client, self.keys, cid, f"kill switch {status.seq}", self.broker.cancel)

    def watch_trading_state(self, stop: Stoppable, interval_s: float = 1.0) -> None:
        """Act on kill switch requests until ``stop``; a failed pass (broker or Redis unavailable, or
        a bug) is logged and the next one tries again, so no outage ends the watch."""
        while not stop.is_set():
            run_pass("trading_state", self.act_on_trading_state)
            stop.wait(interval_s)
