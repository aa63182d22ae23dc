"""The executor: submits approved orders and turns the broker's reports into portfolio changes.

Guarantees (the failure table in docs/OPERATIONS.md says what each fault does):

* **One order per client_order_id.** An order is recorded (``pending_submit``) before its submit.
  A redelivered order still ``pending_submit`` (we died mid-submit) is looked up at the broker
  first and submitted again only if it is not there; the adapter resolves a duplicate by the id.
* **The orders stream is not a back door.** Only an order whose reservation is open and matches
  it (symbol, side, quantity) is submitted; anything else is dead-lettered with the reason.
* **A possibly-live order is never given up.** An ambiguous submit (placed? reply lost) is
  ``unknown``, keeps its reservation, and is chased by client_order_id with back-off until the
  broker shows it or has not found it ``unknown_lookup_limit`` times in a row ("never placed":
  released). An order whose handling fails on its last delivery, or a ``pending_submit`` older
  than ``stale_pending_s``, is chased the same way. The broker down or rate limiting keeps the
  order in hand (:class:`~shared.errors.Unavailable`): it is not counted as the order's failure.
* **A fill is a fact, booked exactly once.** Reports carry the order's cumulative filled quantity;
  the increase over the record's ``applied_qty`` is booked in the portfolio's atomic write
  together with the record's new ``applied_qty`` (compare-and-set: a racing report retries), so
  the two never part. A fill beyond the reservation is booked, alerted CRITICAL, and moves
  trading to REDUCING when cash goes negative. A reservation is released only when the broker
  reports the order terminal, refused it, or never placed it.
* **Gaps are closed.** Every order held open is looked up every ``poll_interval_s`` and after each
  reconnect of the trade-update stream; the broker's open orders with our prefix that we do not
  track are adopted, others alerted (and cancelled with ``cancel_foreign_orders``); orders the
  reconciler asks about (``repair-requests``) are looked up at once.
* **Kill switch requests** (:mod:`shared.safety.trading_state`) are carried out once per change ``seq``:
  cancel every open order (a pending or unknown one the broker does not show yet keeps the pass
  open until it resolves) and flatten every position (client_order_id ``bst-flat-<seq>-<SYMBOL>``).

Concurrency: four threads -- the order consumer, the trade-update reader, the order watcher
(polls, chases, repairs) and the trading-state watcher. The events of one symbol's orders are
applied one at a time (a lock per symbol); submits take no lock. No background thread ends
before the stop: a failed pass is logged and tried again. Run one executor per account.
"""

from __future__ import annotations

import threading

from services.executor._kill_switch import KillSwitchActions
from services.executor._watch import OrderWatch
from shared.brokers import build_broker
from shared.keys import ORDERS
from shared.service import ServiceContext

__all__ = ["Executor", "main"]


class Executor(OrderWatch, KillSwitchActions):
    """Submits orders and applies broker reports; all state lives in Redis."""


def main(ctx: ServiceContext) -> None:
    """Run the executor until stopped."""
    broker = build_broker(ctx.settings, client=ctx.redis, clock=ctx.clock)
    executor = Executor(ctx.redis, ctx.keys, ctx.settings, ctx.clock, broker, ctx.publisher())
    executor.portfolio.open()
    threads = [threading.Thread(target=target, args=(ctx.stop,), name=name, daemon=True)
               for name, target in (("trade-updates", executor.follow_trade_updates),
                                    ("orders", executor.watch_orders),
                                    ("trading-state", executor.watch_trading_state))]
    for thread in threads:
        thread.start()
    ctx.consumer(ORDERS, ctx.settings.executor.consumer_group, executor.handle_order).run(ctx.stop)
    for thread in threads:
        thread.join(ctx.settings.bus.grace_seconds)
