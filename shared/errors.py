"""Every error Bastion raises on purpose, in one hierarchy.

Third-party errors (redis-py, alpaca-py, httpx/requests, aiohttp) are translated at the boundary
that calls them -- the bus, the lock, the portfolio store, the broker adapter -- with
``raise Ours(...) from exc``; services only ever catch these types.

::

    BastionError
    ├── ConfigError                 bad settings: names every bad field
    ├── Unavailable                 a dependency is away for now: wait it out and retry, never
    │   │                           count it against the message at hand (also a base of the two
    │   │                           broker errors marked *)
    │   └── RedisUnavailable        Redis did not answer (connection refused, timeout, reset)
    │                               or refuses writes for now (memory full, disk failing)
    ├── RedisCommandFailed          Redis answered a command with an error that waiting will not fix
    ├── CodecError                  a message that cannot be decoded: dead-lettered, never retried
    │   └── UnknownSchema           a type or schema version this build does not know
    ├── HandlerRejected             a handler's verdict that a message can never succeed
    ├── LockError
    │   ├── LockTimeout             the lock was not acquired before the wait deadline
    │   └── LockNotOwned            release/extend/write by a holder whose lease is gone
    ├── PortfolioError
    │   ├── InsufficientFunds       cash minus reservations cannot cover a buy
    │   ├── InsufficientPosition    position minus sell reservations cannot cover a sell
    │   ├── UnknownReservation      release or fill for a reservation that does not exist
    │   ├── FillRefused             a fill that contradicts its reservation (wrong side or symbol)
    │   ├── StaleFencingToken       a write under a token older than one already accepted
    │   └── PortfolioConflict       the state changed between read and write (version check)
    ├── RateLimitTimeout            a shared rate limit did not grant a request before the deadline
    └── BrokerError
        ├── OrderRejected           the broker refused the order (reason attached)
        │   ├── InsufficientBuyingPower
        │   └── PatternDayTrading   Alpaca's PDT 403
        ├── OrderNotFound
        ├── RateLimited *           429; carries the seconds to wait
        ├── BrokerUnavailable *     5xx, refused connection: nothing was placed
        └── AmbiguousSubmit         timeout or dropped connection on submit: may have been placed
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

__all__ = [
    "AmbiguousSubmit",
    "BastionError",
    "BrokerError",
    "BrokerUnavailable",
    "CodecError",
    "ConfigError",
    "FillRefused",
    "HandlerRejected",
    "InsufficientBuyingPower",
    "InsufficientFunds",
    "InsufficientPosition",
    "LockError",
    "LockNotOwned",
    "LockTimeout",
    "OrderNotFound",
    "OrderRejected",
    "PatternDayTrading",
    "PortfolioConflict",
    "PortfolioError",
    "RateLimitTimeout",
    "RateLimited",
    "RedisCommandFailed",
    "RedisUnavailable",
    "StaleFencingToken",
    "Unavailable",
    "UnknownReservation",
    "UnknownSchema",
]


class BastionError(Exception):
    """Base of every error Bastion raises on purpose."""


class ConfigError(BastionError):
    """Settings failed validation; ``problems`` holds one ``(field, reason)`` per bad field."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {field}: {reason}" for field, reason in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class Unavailable(BastionError):
    """A dependency (Redis, the broker) cannot serve us for now: wait it out and try again."""


class RedisUnavailable(Unavailable):
    """Redis could not be reached, dropped the connection mid-command, or refuses writes for now."""


class RedisCommandFailed(BastionError):
    """Redis answered with an error reply that retrying will not fix (a bug or a bad key type)."""


class CodecError(BastionError):
    """A message could not be decoded; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnknownSchema(CodecError):
    """The message type or schema version is not one this build understands."""


class HandlerRejected(BastionError):
    """Raised by a handler for a message that will never succeed: dead-lettered at once."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class LockError(BastionError):
    """A distributed-lock failure for the lock ``name``."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"lock {name!r}: {message}")


class LockTimeout(LockError):
    """The lock was not acquired before the wait deadline."""


class LockNotOwned(LockError):
    """The caller no longer holds the lock (its lease expired or another holder took it)."""


class PortfolioError(BastionError):
    """A portfolio operation was refused; nothing was changed."""

    def __init__(self, account: str, message: str) -> None:
        self.account = account
        super().__init__(f"account {account!r}: {message}")


class InsufficientFunds(PortfolioError):
    """Cash minus reservations cannot cover the requested buy."""

    def __init__(self, account: str, needed: Decimal, available: Decimal) -> None:
        self.needed = needed
        self.available = available
        super().__init__(account, f"insufficient funds: need {needed}, available {available}")


class InsufficientPosition(PortfolioError):
    """Position minus quantity reserved for sells cannot cover the requested sell."""

    def __init__(self, account: str, symbol: str, needed: Decimal, available: Decimal) -> None:
        self.symbol = symbol
        self.needed = needed
        self.available = available
        super().__init__(account, f"insufficient {symbol}: need {needed}, available {available}")


class UnknownReservation(PortfolioError):
    """A release or fill named a reservation that does not exist (or is already closed)."""

    def __init__(self, account: str, reservation_id: str) -> None:
        self.reservation_id = reservation_id
        super().__init__(account, f"unknown reservation {reservation_id!r}")


class FillRefused(PortfolioError):
    """A fill that would corrupt state (more than the order, wrong side): alert-worthy."""

    def __init__(self, account: str, fill_id: str, reason: str) -> None:
        self.fill_id = fill_id
        self.reason = reason
        super().__init__(account, f"fill {fill_id!r} refused: {reason}")


class StaleFencingToken(PortfolioError):
    """A write carried a fencing token older than one the store already accepted."""

    def __init__(self, account: str, token: int, highest: int) -> None:
        self.token = token
        self.highest = highest
        super().__init__(account, f"fencing token {token} is older than accepted token {highest}")


class PortfolioConflict(PortfolioError):
    """The state version changed between the read and the write."""


class RateLimitTimeout(BastionError):
    """The shared rate limit on ``endpoint`` did not grant ``weight`` before the caller's deadline.

    ``retry_in`` is how many seconds the limiter last said to wait (Redis's clock).
    """

    def __init__(self, endpoint: str, weight: int, waited: float, retry_in: float) -> None:
        self.endpoint = endpoint
        self.weight = weight
        self.waited = waited
        self.retry_in = retry_in
        super().__init__(f"rate limit {endpoint!r}: weight {weight} not granted after {waited:.3f}s "
                         f"(next slot in {retry_in:.3f}s)")


class BrokerError(BastionError):
    """A broker call failed; ``client_order_id`` is set when the call concerned one order."""

    def __init__(self, message: str, *, client_order_id: str | None = None) -> None:
        self.client_order_id = client_order_id
        super().__init__(message)


class OrderRejected(BrokerError):
    """The broker refused the order; ``reason`` is its explanation."""

    def __init__(self, reason: str, *, client_order_id: str | None = None) -> None:
        self.reason = reason
        super().__init__(f"order rejected: {reason}", client_order_id=client_order_id)


class InsufficientBuyingPower(OrderRejected):
    """The broker says the account cannot afford the order."""


class PatternDayTrading(OrderRejected):
    """The broker refused the order under the pattern-day-trader rule (Alpaca's 403)."""


class OrderNotFound(BrokerError):
    """The broker has no order with that id."""


class RateLimited(BrokerError, Unavailable):
    """The broker answered 429; ``retry_after`` is the number of seconds to wait."""

    def __init__(self, message: str, *, retry_after: float, client_order_id: str | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, client_order_id=client_order_id)


class BrokerUnavailable(BrokerError, Unavailable):
    """The broker could not be reached or failed (5xx) before accepting anything."""


class AmbiguousSubmit(BrokerError):
    """A submit whose outcome is unknown (timeout, dropped reply): resolve by client_order_id."""
