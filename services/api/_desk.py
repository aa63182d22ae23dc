"""What every route shares: the desk it reads and steers, and the error a route answers with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from shared.brokers import Broker
from shared.clock import Clock
from shared.config import Settings
from shared.keys import Keys

__all__ = ["ApiError", "Desk"]


@dataclass(frozen=True)
class Desk:
    """Settings, a Redis client, key names, the clock, and the broker (built on first use, for a
    cancel); a :class:`services.cli.commands.status.Source`, so the CLI's readers take it."""

    settings: Settings
    redis: redis.Redis
    keys: Keys
    clock: Clock
    broker: Callable[[], Broker]


class ApiError(Exception):
    """A reply other than success: the HTTP ``status`` and the text of ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)

    @classmethod
    def invalid(cls, exc: ValidationError) -> ApiError:
        """422 naming every field a model refused (``field: why; ...``)."""
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(part) for part in error["loc"])
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        return cls(422, "; ".join(problems))
