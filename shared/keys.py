"""Every Redis key and stream name Bastion uses, in one place.

Read this module to learn what to type into ``redis-cli``. With the default prefix ``bastion``:

==================================  ==========================================================
``bastion:stream:bars``             market data from the ingester (bounded)
``bastion:stream:intents``          strategy signals / manual orders, consumed by risk (bounded)
``bastion:stream:orders``           orders approved by risk, consumed by the executor (bounded)
``bastion:stream:order-events``     order lifecycle and fills from the executor (bounded)
``bastion:stream:alerts``           alerts for the monitor to deliver (bounded)
``bastion:stream:dead-letter``      messages that could not be processed, with the reason (bounded)
``bastion:ledger:{<account>}``      every portfolio mutation, append-only, never trimmed
``bastion:portfolio:{<account>}``   the account's current state (a hash)
``bastion:lock:<resource>``         a distributed lock's owner token (expires with its lease)
``bastion:fence:<resource>``        the lock's fencing counter (only grows)
``bastion:applied:<scope>:<id>``    idempotency marker: message ``id`` already applied by ``scope``
``bastion:heartbeat:<service>:<instance>``  expires when the process stops beating
``bastion:paper:*``                 the embedded paper exchange's own state
==================================  ==========================================================

Keys that one Lua script touches together share a hash tag (``{<account>}``) so they live on
one slot of a Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALERTS",
    "BARS",
    "DEAD_LETTER",
    "INTENTS",
    "ORDERS",
    "ORDER_EVENTS",
    "Keys",
]

BARS = "bars"
INTENTS = "intents"
ORDERS = "orders"
ORDER_EVENTS = "order-events"
ALERTS = "alerts"
DEAD_LETTER = "dead-letter"


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

    def pattern(self) -> str:
        """A SCAN pattern matching every key under this prefix."""
        return f"{self.prefix}:*"
