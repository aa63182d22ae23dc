"""Protective exits: every filled share of an entry with a ``stop_loss`` is covered at the broker.

An entry's record carries its ``stop_loss`` (and ``take_profit``); each booked fill of it puts its
client_order_id in ``Keys.unprotected``. A protection pass covers what is filled and not yet
covered, on the exit side, GTC, with its own reservation of the shares, so partial fills are
protected as they come: with a stop order (client_order_id ``<entry>-sl<n>``, ``exit_reason``
stop_loss), or, when the entry has a take-profit, an OCO pair (``<entry>-tp<n>``, a take-profit
limit, ``exit_reason`` take_profit, whose stop-loss leg the broker names; the leg is recorded
from the submit's reply, under the symbol's lock so no report of it comes first). What covers an
entry is read from its protective orders' records (field ``protections``; a pair counts once): a
live one covers its quantity, an ended one what it filled, one cancelled for an exit
(``cancel_reason``) its quantity -- so protection the broker cancels, expires or never places is
replaced.

A stop that cannot be placed (refused, broker down) is tried again after ``protect_backoff_s``,
doubling, ``protect_attempts`` times in all; then the uncovered shares are sold at market
(``<entry>-flat<n>``, exit_reason protection_failed) and a CRITICAL alert names the symbol
and the cause. Shares that other orders already hold (an exit in flight) are not covered twice.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

from services.executor._orders import OrderDesk
from services.executor._records import parse_time
from shared.bus import Delivery
from shared.errors import BrokerError, HandlerRejected, PortfolioError, Unavailable
from shared.keys import ORDERS
from shared.logging import get_logger
from shared.models import (
    AlertSeverity,
    ExitReason,
    Order,
    OrderEvent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
)
from shared.redis.client import reply_text
from shared.safety.symbols import SymbolProperties

__all__ = ["ProtectiveExits"]

log = get_logger(component="executor")
_ZERO = Decimal(0)
_FAILED = (OrderStatus.REJECTED, OrderStatus.CANCELED, OrderStatus.EXPIRED)


class ProtectiveExits(OrderDesk):
    """Places, replaces and, when it must, gives up on (flattening) the protective stops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._protect_guard = threading.Lock()  # one protection pass at a time

    def apply_event(self, event: OrderEvent) -> bool:
        """Apply ``event`` (:meth:`EventBook.apply_event`); an entry that needs protecting after
        it is protected at once."""
        if super().apply_event(event):
            self.protect(event.client_order_id)
        return False

    def protect_pending(self) -> int:
        """One pass over every entry that may be uncovered; returns how many were looked at."""
        members: Any = self.client.smembers(self.keys.unprotected)
        entries = sorted(reply_text(m) for m in members)
        for cid in entries:
            self.protect(cid)
        return len(entries)

    def protect(self, cid: str) -> None:
        """Cover entry ``cid``'s filled shares, or note when to try again."""
        with self._protect_guard:
            record = self._record(cid)
            if not record.get("stop_loss"):
                self.client.srem(self.keys.unprotected, cid)
                return
            next_at = record.get("protect_next_at")
            if next_at and self.clock.now() < parse_time(next_at):
                return
            filled = Decimal(record["applied_qty"])
            need = min(filled - self._covered(record), self._free_shares(record))
            if need <= 0:
                self.client.srem(self.keys.unprotected, cid)
                return
            tries = int(record.get("protect_attempts", "0")) + 1
            kind = "tp" if record.get("take_profit") else "sl"
            stop_cid = f"{cid}-{kind}{len(record.get('protections', '').split()) + 1}"
            cause = self._place_protection(cid, record, stop_cid, need)
            if cause is None:
                self._covered_by(cid, record, stop_cid, {"protect_attempts": "0", "protect_next_at": ""})
                log.info("executor.protected", client_order_id=cid, stop_client_order_id=stop_cid,
                         quantity=str(need), stop_price=record["stop_loss"],
                         take_profit=record.get("take_profit"))
            elif tries < self.settings.executor.protect_attempts:
                wait = self.settings.executor.protect_backoff_s * 2 ** (tries - 1)
                self._covered_by(cid, record, stop_cid, {
                    "protect_attempts": str(tries),
                    "protect_next_at": (self.clock.now() + timedelta(seconds=wait)).isoformat()})
                log.warning("executor.protection_failed", client_order_id=cid, attempt=tries, cause=cause,
                            retry_in_s=wait)
            else:
                self._give_up_protecting(cid, record, stop_cid, need, cause, tries)

    def _covered(self, record: dict[str, str]) -> Decimal:
        """What the entry's protective orders cover: a live one its quantity, one cancelled for
        an exit its quantity, an ended one what it filled (an OCO pair: the pair's quantity while
        one of it is live or it was cancelled for an exit, else what both filled)."""
        covered = _ZERO
        for stop_cid in record.get("protections", "").split():
            stop = self._record(stop_cid)
            if not stop:
                continue
            pair = [stop, *(self._record(m) for m in self.oco_members(stop_cid, stop))]
            whole = any(not OrderStatus(o.get("status", "canceled")).is_terminal or o.get("cancel_reason")
                        for o in pair)
            covered += Decimal(stop["quantity"]) if whole else sum(
                (Decimal(o.get("applied_qty", "0")) for o in pair), _ZERO)
        return covered

    def _free_shares(self, record: dict[str, str]) -> Decimal:
        """The entry's position that no other order holds (an exit in flight holds its shares)."""
        held = self.portfolio.snapshot().positions.get(record["symbol"])
        if held is None:
            return _ZERO
        long = Side(record["side"]) is Side.BUY
        free = held.qty - held.reserved if long else -held.qty - held.reserved
        return max(free, _ZERO)

    def _place_protection(self, cid: str, record: dict[str, str], stop_cid: str, quantity: Decimal
                          ) -> str | None:
        """Reserve and submit the protective stop, or OCO pair; None when the broker holds it, else
        the cause."""
        side = _exit_side(record)
        symbol = SymbolProperties(record["symbol"])
        stop_price = symbol.round_price(side, Decimal(record["stop_loss"]))
        if record.get("take_profit"):
            target = symbol.round_price(side, Decimal(record["take_profit"]))
            order = self._exit_order(cid, record, stop_cid, quantity, order_type=OrderType.LIMIT,
                                     limit_price=target, take_profit=target, stop_loss=stop_price,
                                     time_in_force=TimeInForce.GTC, exit_reason=ExitReason.TAKE_PROFIT)
        else:
            order = self._exit_order(cid, record, stop_cid, quantity, order_type=OrderType.STOP,
                                     stop_price=stop_price, time_in_force=TimeInForce.GTC,
                                     exit_reason=ExitReason.STOP_LOSS)
        try:
            with self._symbol_lock(record["symbol"]):  # no report of an OCO's leg before it is recorded
                self._submit_exit(order, stop_price)
        except Unavailable as exc:  # nothing was placed: the order ends here, its shares released
            self._give_up(stop_cid, self._record(stop_cid), OrderStatus.REJECTED, str(exc))
            return f"{type(exc).__name__}: {exc}"
        except (BrokerError, PortfolioError, HandlerRejected) as exc:
            return f"{type(exc).__name__}: {exc}"
        placed = self._record(stop_cid)
        status = OrderStatus(placed.get("status", OrderStatus.REJECTED.value))
        if status in _FAILED:
            return placed.get("reason") or f"the broker reports it {status.value}"
        return None

    def _covered_by(self, cid: str, record: dict[str, str], stop_cid: str, fields: dict[str, str]) -> None:
        """Note ``stop_cid`` among the entry's protective orders, with ``fields``."""
        names = record.get("protections", "").split()
        if stop_cid not in names:
            names.append(stop_cid)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.order(cid), mapping={**fields, "protections": " ".join(names)})  # type: ignore[dict-item]
            if not fields.get("protect_next_at"):
                pipe.srem(self.keys.unprotected, cid)
            pipe.execute()

    def _give_up_protecting(self, cid: str, record: dict[str, str], stop_cid: str, quantity: Decimal,
                            cause: str, tries: int) -> None:
        """No stop could be placed: sell the uncovered shares at market and alert CRITICAL."""
        flat_cid = f"{cid}-flat{stop_cid.rsplit('-', 1)[1][2:]}"  # numbered as the last protection tried
        mark = self.portfolio.marks().get(record["symbol"], Decimal(record["stop_loss"]))
        order = self._exit_order(cid, record, flat_cid, quantity, exit_reason=ExitReason.PROTECTION_FAILED)
        outcome = "flattened at market"
        try:
            self._submit_exit(order, mark)
        except (BrokerError, PortfolioError, HandlerRejected) as exc:
            outcome = f"and the flatten failed too ({type(exc).__name__}: {exc}); the position is UNPROTECTED"
        self._covered_by(cid, record, stop_cid, {"protect_attempts": str(tries), "protect_next_at": ""})
        self._covered_by(cid, self._record(cid), flat_cid, {})
        symbol = record["symbol"]
        text = (f"{symbol}: no protective stop at {record['stop_loss']} for {quantity} shares after "
                f"{tries} tries ({cause}); {outcome}")
        log.critical("executor.protection_abandoned", client_order_id=cid, symbol=symbol, cause=cause,
                     outcome=outcome)
        self._alert(AlertSeverity.CRITICAL, "protection_failed", text, cid, symbol=symbol, cause=cause)

    def _submit_exit(self, order: Order, price: Decimal) -> None:
        """Reserve ``order``'s shares (unless a pass that died did) and submit it, whatever the
        trading state (a protective exit only reduces)."""
        cid = order.client_order_id
        recorded = bool(self.client.exists(self.keys.order(cid)))
        if not recorded:
            self.portfolio.reserve(cid, order.symbol, order.side, order.quantity, price)
        self.handle_order(Delivery(ORDERS, f"protect-{order.protects}", order, 2 if recorded else 1),
                          bypass_state=True)

    def _exit_order(self, cid: str, record: dict[str, str], exit_cid: str, quantity: Decimal,
                    **kind: Any) -> Order:
        """The order that closes ``quantity`` of entry ``cid`` (paid by a reservation of its own id)."""
        return Order(time=self.clock.now(), intent_id=record.get("intent_id") or cid,
                     client_order_id=exit_cid, account=self.portfolio.account, symbol=record["symbol"],
                     side=_exit_side(record), quantity=quantity, reservation_id=exit_cid, protects=cid,
                     source=record.get("source", ""), **kind)


def _exit_side(record: dict[str, str]) -> Side:
    return Side.SELL if Side(record["side"]) is Side.BUY else Side.BUY
