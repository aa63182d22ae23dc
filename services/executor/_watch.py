"""Keeping every open order's record in step with the broker: polls, chases, repairs, the update stream."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from services.executor._protection import ProtectiveExits
from services.executor._records import parse_time, run_pass
from shared.errors import (
    BrokerError,
    OrderNotFound,
)
from shared.logging import get_logger
from shared.models import (
    CLIENT_ORDER_PREFIX,
    OrderStatus,
)
from shared.redis.boundary import unavailable
from shared.redis.client import reply_text
from shared.stop import Stoppable

__all__ = ["OrderWatch"]

log = get_logger(component="executor")


_WATCH_TICK_S = 0.5


class OrderWatch(ProtectiveExits):
    """Closes gaps: polls open orders, chases unknown ones, adopts untracked ones, follows trade updates."""

    def poll_orders(self, *, full: bool = True) -> int:
        """Look orders up at the broker: every order held open (``full``), else only the unknown
        ones due a look-up; a ``pending_submit`` older than ``stale_pending_s`` becomes unknown.
        With ``full``, also the broker's open orders we do not track. Returns how many were looked up.
        """
        members: Any = self.client.smembers(self.keys.open_orders)
        cids = sorted(reply_text(m) for m in members)
        with self.client.pipeline(transaction=False) as pipe:
            for cid in cids:
                pipe.hgetall(self.keys.order(cid))
            raws = pipe.execute()
        now = self.clock.now()
        looked = 0
        for cid, raw in zip(cids, raws, strict=True):
            record = {reply_text(k): reply_text(v) for k, v in raw.items()}
            if not record:
                continue
            status = OrderStatus(record["status"])
            if status is OrderStatus.PENDING_SUBMIT:
                age = (now - parse_time(record["created_at"])).total_seconds()
                if age > self.settings.executor.stale_pending_s:
                    self._mark_unknown(cid, f"pending_submit for {age:.0f}s with no submit seen")
                continue  # the order consumer owns it until then
            if status is OrderStatus.UNKNOWN:
                due = record.get("next_lookup_at")
                if due is None or now >= parse_time(due):
                    self._chase(cid, record)
                    looked += 1
            elif full:
                self._look_up(cid)
                looked += 1
        if full:
            self._adopt_untracked(set(cids))
        return looked

    def _look_up(self, cid: str) -> None:
        try:
            self.apply_broker_order(self.broker.get_order(cid))
        except OrderNotFound:
            log.warning("executor.order_not_found_at_broker", client_order_id=cid)

    def _chase(self, cid: str, record: Mapping[str, str]) -> None:
        """Look an unknown order up: shown, it is tracked; not found ``unknown_lookup_limit`` times
        in a row, it was never placed (its reservation is released)."""
        try:
            found = self.broker.get_order(cid)
        except OrderNotFound:
            misses = int(record.get("lookups", "0")) + 1
            limit = self.settings.executor.unknown_lookup_limit
            if misses >= limit:
                self._give_up(cid, record, OrderStatus.REJECTED,
                              f"never placed: the broker did not find it {misses} times in a row",
                              never_placed=True)
                return
            wait = min(0.5 * 2 ** misses, self.settings.executor.unknown_backoff_max_s)
            self.client.hset(self.keys.order(cid), mapping={
                "lookups": str(misses),
                "next_lookup_at": (self.clock.now() + timedelta(seconds=wait)).isoformat()})
            log.info("executor.unknown_not_found", client_order_id=cid, misses=misses, next_in_s=wait)
            return
        log.info("executor.unknown_resolved", client_order_id=cid, status=found.status.value)
        self.client.hdel(self.keys.order(cid), "lookups", "next_lookup_at")
        self.apply_broker_order(found)

    def _adopt_untracked(self, tracked: set[str]) -> None:
        """The broker's open orders that we do not hold open: ours are applied (adopted, or a
        never-placed one reopened), another's are alerted (and cancelled, with the setting)."""
        for order in self.broker.open_orders():
            if order.client_order_id in tracked:
                continue
            if order.client_order_id.startswith(CLIENT_ORDER_PREFIX):
                self.apply_broker_order(order)
            else:
                self._foreign(order.client_order_id, f"{order.side} {order.quantity} {order.symbol}")

    def run_repairs(self) -> int:
        """Look up each order the reconciler asked about and apply what the broker reports; a
        request is removed once that succeeded. Returns how many were done."""
        raw: Any = self.client.hgetall(self.keys.repair_requests)
        done = 0
        for cid in sorted(reply_text(k) for k in raw):
            try:
                self.apply_broker_order(self.broker.get_order(cid))
            except OrderNotFound:
                log.warning("executor.repair_not_found", client_order_id=cid)
            self.client.hdel(self.keys.repair_requests, cid)
            log.warning("executor.repaired", client_order_id=cid)
            done += 1
        return done

    def watch_orders(self, stop: Stoppable, tick_s: float = _WATCH_TICK_S) -> None:
        """Every ``tick_s``: chase unknown orders that are due and carry out repair requests; every
        ``poll_interval_s``, and at the tick after a stream reconnect, poll every open order. A
        failed pass is logged and the next one tries again."""
        next_poll = self.clock.monotonic()

        def one_pass() -> None:
            nonlocal next_poll
            full = self.poll_requested.is_set() or self.clock.monotonic() >= next_poll
            if full:
                self.poll_requested.clear()
                next_poll = self.clock.monotonic() + self.settings.executor.poll_interval_s
            self.poll_orders(full=full)
            self.run_repairs()
            self.protect_pending()

        while not stop.is_set():
            run_pass("orders", one_pass)
            stop.wait(tick_s)

    def follow_trade_updates(self, stop: Any) -> None:
        """Apply the broker's trade updates until ``stop``; once listening, and whenever the
        stream reconnected by itself (updates meanwhile are lost), ask the order watcher
        (:meth:`watch_orders`) to poll every open order -- on its own thread, so updates are not
        kept waiting behind the look-ups.

        A failure -- the stream lost, Redis unavailable, an update that cannot be applied -- is
        logged, and a second later the executor listens again and a poll follows: an update lost
        with the failure is applied from the poll (reports carry cumulative fills)."""
        while not stop.is_set():
            updates = self.broker.trade_updates()
            try:
                if not updates.wait_ready(10.0):
                    log.warning("executor.trade_updates_not_ready")
                    continue
                seen = updates.connections
                self.poll_requested.set()  # anything missed while we were not listening
                while not stop.is_set():
                    event = updates.get(timeout=0.5)
                    if event is not None:
                        self.apply_event(event)
                    if updates.connections != seen:
                        seen = updates.connections
                        log.warning("executor.trade_updates_reconnected", connections=seen)
                        self.poll_requested.set()
            except BrokerError as exc:
                log.warning("executor.trade_updates_lost", error=str(exc))
            except Exception as exc:
                if unavailable(exc):
                    log.warning("executor.trade_updates_redis_unavailable", error=str(exc))
                else:
                    log.exception("executor.trade_updates_failed")
            finally:
                updates.close()
            stop.wait(1.0)
