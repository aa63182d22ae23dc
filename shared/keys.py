"""Every Redis key and stream name Bastion uses, in one place.

Read this module to learn what to type into ``redis-cli``. With the default prefix ``bastion``:

==================================  ==========================================================
``bastion:stream:bars``             market data from the ingester (bounded)
``bastion:stream:intents``          strategy signals / manual orders, consumed by risk (bounded)
``bastion:stream:orders``           orders approved by risk, consumed by the executor (bounded)
``bastion:stream:order-events``     order lifecycle and fills from the executor (bounded)
``bastion:stream:alerts``           alerts for the monitor to deliver (bounded)
``bastion:stream:rejections``       intents refused by risk, with the reason (bounded)
``bastion:stream:dead-letter``      messages that could not be processed, with the reason (bounded)
``bastion:ledger:{<account>}``      every portfolio mutation, append-only, never trimmed
``bastion:portfolio:{<account>}``   the account's current state (a hash)
``bastion:lock:<resource>``         a distributed lock's owner token (expires with its lease)
``bastion:fence:<resource>``        the lock's fencing counter (only grows)
``bastion:applied:<scope>:<id>``    idempotency marker: message ``id`` already applied by ``scope``
``bastion:heartbeat:<service>:<instance>``  expires when the process stops beating
``bastion:heartbeats``                 set of ``<service>:<instance>`` that have beaten (an index)
``bastion:paper:*``                 the embedded paper exchange's own state
``bastion:stream:bars:<n>``         bars of the symbols hashed to partition n, for strategy workers,
                                    with the events of the strategies' orders on those symbols
``bastion:lease:<resource>``        a worker's lease (a strategy partition), expires unless renewed
``bastion:strategy:<name>:<SYM>``   a strategy's persisted per-symbol state
``bastion:last-bar``                symbol -> time of its newest bar (market time: the ingester's gate)
``bastion:bar-arrival``             symbol -> when the ingester accepted its newest bar (stale data)
``bastion:last-price``              symbol -> close of its newest bar (marks: equity, sizing)
``bastion:order:<client_order_id>`` an order the executor tracks (hash)
``bastion:open-orders``             client_order_ids of orders not yet terminal (set)
``bastion:trading-state``           ACTIVE / REDUCING / HALTED with who, why, when (hash)
``bastion:trading-state:acted``     the trading-state change the executor last carried out
``bastion:protection-locks``        active protection locks with their expiry (hash)
``bastion:protection-locks:trades`` closed round trips for the protections (sorted set, score µs)
``bastion:protection-locks:equity`` equity samples for the drawdown protection (sorted set, score µs)
``bastion:equity-history``          equity and cash sampled by risk, kept for the API (stream, bounded)
``bastion:ratelimit:<name>``        a shared token bucket
``bastion:deferred``                intents waiting to be executed (hash, one per symbol and side)
``bastion:reconciliation``          the reconciler's latest report (hash; history on stream:reconciliation)
``bastion:repair-requests``         orders the reconciler asks the executor to look up again (hash)
``bastion:monitor:health``          the monitor's latest check, JSON (services, lag, stale, problems)
``bastion:monitor:problems``        current problems: ``<kind>:<subject>`` -> JSON (hash)
``bastion:monitor:schedule``        periodic job -> next due time, ISO UTC (hash)
``bastion:monitor:balance``         the broker account's latest balances (hash)
``bastion:monitor:daily-summary``   the latest daily summary (hash)
``bastion:monitor:deliveries``      alert delivery counters (hash: enqueued, delivered,
                                    attempt_failed, failed, logged)
``bastion:monitor:failed-deliveries``  alerts whose webhook delivery gave up, newest first
``bastion:monitor:recent-alerts``   the newest alerts the monitor consumed, JSON (list)
==================================  ==========================================================

Keys that one Lua script touches together share a hash tag (``{<account>}``) so they live on
one slot of a Redis Cluster.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = [
    "ALERTS",
    "BARS",
    "DEAD_LETTER",
    "INTENTS",
    "ORDERS",
    "ORDER_EVENTS",
    "REJECTIONS",
    "Keys",
    "MonitorKeys",
    "partition_of",
]

BARS = "bars"
INTENTS = "intents"
ORDERS = "orders"
ORDER_EVENTS = "order-events"
ALERTS = "alerts"
REJECTIONS = "rejections"
DEAD_LETTER = "dead-letter"


def partition_of(symbol: str, partitions: int) -> int:
    """The bar partition of ``symbol``: ``crc32(symbol) % partitions`` (stable across hosts)."""
    return zlib.crc32(symbol.encode()) % partitions


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix; tests use a fresh prefix each so they never collide."""

    prefix: str = "bastion"

    def stream(self, name: str) -> str:
        """The stream called ``name`` (one of the module's stream constants)."""
        return f"{self.prefix}:stream:{name}"

    @property
    def dead_letter(self) -> str:
        """Where undeliverable messages go, each with its reason and original fields."""
        return self.stream(DEAD_LETTER)

    def applied(self, scope: str, message_id: str) -> str:
        """Marker that ``scope`` (usually a consumer group) has applied message ``message_id``."""
        return f"{self.prefix}:applied:{scope}:{message_id}"

    def heartbeat(self, service: str, instance: str) -> str:
        """A service instance's heartbeat; it expires when the process stops beating."""
        return f"{self.prefix}:heartbeat:{service}:{instance}"

    @property
    def heartbeats(self) -> str:
        """The set of ``<service>:<instance>`` names that have beaten (their keys may have expired)."""
        return f"{self.prefix}:heartbeats"

    def lock(self, resource: str) -> str:
        """The owner key of the distributed lock on ``resource``."""
        return f"{self.prefix}:lock:{resource}"

    def fence(self, resource: str) -> str:
        """The fencing counter of the lock on ``resource``: INCR on every acquire."""
        return f"{self.prefix}:fence:{resource}"

    def portfolio(self, account: str) -> str:
        """The hash holding ``account``'s current state."""
        return f"{self.prefix}:portfolio:{{{account}}}"

    def portfolio_part(self, account: str, part: str) -> str:
        """A further key of ``account``'s state (positions, reservations, applied fills...)."""
        return f"{self.prefix}:portfolio:{{{account}}}:{part}"

    def ledger(self, account: str) -> str:
        """``account``'s append-only ledger stream (durable: never trimmed)."""
        return f"{self.prefix}:ledger:{{{account}}}"

    def paper(self, name: str) -> str:
        """A key of the embedded paper exchange."""
        return f"{self.prefix}:paper:{name}"

    def bar_partition(self, partition: int) -> str:
        """Stream name (for :meth:`stream`) of bar partition ``partition`` (:func:`partition_of`)."""
        return f"{BARS}:{partition}"

    def strategy_feed(self, source: str, symbol: str, partitions: int) -> str | None:
        """The stream key carrying ``symbol``'s bars to its strategy, where the events of an order
        or rejection of an intent from ``source`` also go; None unless a strategy sent it."""
        if not source.startswith("strategy:"):
            return None
        return self.stream(self.bar_partition(partition_of(symbol, partitions)))

    def lease(self, resource: str) -> str:
        """A worker's lease on ``resource``."""
        return f"{self.prefix}:lease:{resource}"

    def strategy_state(self, strategy: str, symbol: str) -> str:
        """``strategy``'s persisted state for ``symbol``."""
        return f"{self.prefix}:strategy:{strategy}:{symbol}"

    @property
    def last_bar(self) -> str:
        """Hash: symbol -> ISO time of its newest bar (market time: what the ingester's gate compares)."""
        return f"{self.prefix}:last-bar"

    @property
    def bar_arrival(self) -> str:
        """Hash: symbol -> ISO time, on the ingester's clock, at which it accepted the symbol's newest
        bar (whether the feed still delivers it, whatever the bar's own time)."""
        return f"{self.prefix}:bar-arrival"

    @property
    def last_price(self) -> str:
        """Hash: symbol -> close of its newest bar (the mark positions are valued at)."""
        return f"{self.prefix}:last-price"

    def order(self, client_order_id: str) -> str:
        """The executor's record of one order."""
        return f"{self.prefix}:order:{client_order_id}"

    @property
    def open_orders(self) -> str:
        """Set of client_order_ids not yet in a terminal state."""
        return f"{self.prefix}:open-orders"

    @property
    def unprotected(self) -> str:
        """Set of entry client_order_ids with filled shares a protective stop may not yet cover."""
        return f"{self.prefix}:unprotected"

    @property
    def round_trips(self) -> str:
        """Hash: symbol -> realised PnL after fees of the round trip still open in it."""
        return f"{self.prefix}:round-trips"

    @property
    def trading_state(self) -> str:
        """The kill switch / trading state hash."""
        return f"{self.prefix}:trading-state"

    @property
    def trading_state_acted(self) -> str:
        """The ``seq`` of the trading-state change whose actions the executor has carried out."""
        return f"{self.trading_state}:acted"

    @property
    def protection_locks(self) -> str:
        """Active protection locks."""
        return f"{self.prefix}:protection-locks"

    @property
    def closed_trades(self) -> str:
        """Sorted set: closed round trips the protections count (score: µs since epoch)."""
        return f"{self.protection_locks}:trades"

    @property
    def equity_history(self) -> str:
        """Stream: risk's equity samples (``time``, ``equity``, ``cash``), the newest
        ``risk.equity_history_keep`` kept, for the API's chart."""
        return f"{self.prefix}:equity-history"

    @property
    def equity_samples(self) -> str:
        """Sorted set: sampled equity for the drawdown protection (score: µs since epoch)."""
        return f"{self.protection_locks}:equity"

    def rate_limit(self, name: str) -> str:
        """A shared token bucket."""
        return f"{self.prefix}:ratelimit:{name}"

    @property
    def deferred(self) -> str:
        """Deferred intents."""
        return f"{self.prefix}:deferred"

    @property
    def reconciliation(self) -> str:
        """Hash: the reconciler's latest report."""
        return f"{self.prefix}:reconciliation"

    @property
    def repair_requests(self) -> str:
        """Hash: client_order_id -> when the reconciler asked the executor to look it up and apply
        what the broker reports (an in-flight difference that lasted too long)."""
        return f"{self.prefix}:repair-requests"

    def monitor(self, name: str) -> str:
        """One of the monitor's keys (health, problems, deliveries...)."""
        return f"{self.prefix}:monitor:{name}"

    def pattern(self) -> str:
        """A SCAN pattern matching every key under this prefix."""
        return f"{self.prefix}:*"


@dataclass(frozen=True)
class MonitorKeys:
    """Key names of the monitor and its jobs under one prefix."""

    keys: Keys

    def _key(self, name: str) -> str:
        return self.keys.monitor(name)

    @property
    def health(self) -> str:
        return self._key("health")

    @property
    def problems(self) -> str:
        return self._key("problems")

    @property
    def schedule(self) -> str:
        return self._key("schedule")

    @property
    def balance(self) -> str:
        return self._key("balance")

    @property
    def daily_summary(self) -> str:
        return self._key("daily-summary")

    @property
    def deliveries(self) -> str:
        return self._key("deliveries")

    @property
    def failed_deliveries(self) -> str:
        return self._key("failed-deliveries")

    @property
    def recent_alerts(self) -> str:
        return self._key("recent-alerts")
