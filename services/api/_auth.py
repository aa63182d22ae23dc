"""Bearer tokens: a read-only one and an operator one, generated at first start.

Each token is ``secrets.token_urlsafe(24)`` in its own file (mode 0600) beside the embedded Redis's
password (``embedded_redis.data_dir``; names ``api.read_token_file`` and
``api.operator_token_file``), made by :func:`shared.redis.server.secret_file`. A presented token
is compared with both in constant time (``hmac.compare_digest``). Left to the caller: keep the
files readable only by the operators they belong to, and never log a token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from shared.config import Settings
from shared.redis.server import secret_file

__all__ = ["Role", "Tokens"]


class Role(StrEnum):
    """What a token may do: ``read`` every GET route; ``operator`` the actions as well."""

    READ = "read"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Tokens:
    """The two tokens of one installation."""

    read: str
    operator: str

    @classmethod
    def load(cls, settings: Settings) -> Tokens:
        """The tokens in their files, generated there first if missing."""
        data_dir, api = settings.embedded_redis.data_dir, settings.api
        return cls(secret_file(data_dir, api.read_token_file), secret_file(data_dir, api.operator_token_file))

    @staticmethod
    def files(settings: Settings) -> list[Path]:
        """Where the tokens are kept (relative paths: to the repository)."""
        data_dir, api = settings.embedded_redis.data_dir, settings.api
        return [data_dir / api.read_token_file, data_dir / api.operator_token_file]

    def role(self, authorization: str | None) -> Role | None:
        """The role of the token in an ``Authorization: Bearer <token>`` header; None if absent or wrong."""
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not given:
            return None
        operator = hmac.compare_digest(given, self.operator.encode())
        read = hmac.compare_digest(given, self.read.encode())
        return Role.OPERATOR if operator else Role.READ if read else None
