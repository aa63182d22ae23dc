"""What every subcommand needs: settings, a Redis client and the key names."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis

from shared.config import Settings, load_settings
from shared.keys import Keys
from shared.redis.client import connect

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


@dataclass
class Context:
    """Settings read once; Redis connected on first use (a short wait: a CLI must not hang)."""

    settings: Settings

    @classmethod
    def load(cls) -> Context:
        """Read settings from the environment and config file (ConfigError if invalid)."""
        return cls(load_settings())

    @cached_property
    def redis(self) -> redis.Redis:
        """A connected client (RedisUnavailable after 5 s)."""
        return connect(self.settings, wait_s=5.0)

    @cached_property
    def keys(self) -> Keys:
        """Key names under the configured prefix."""
        return Keys(self.settings.key_prefix)
