"""The HTTP API: a desk watched and steered over JSON, on 127.0.0.1 by default (docs/API.md).

Consumes: no stream; it reads the keys ``bastion status`` reads. Produces: what the ``bastion``
command's actions write, through the same calls -- the kill switch (flatten and cancel-all are its
requests), a manual intent on ``intents`` for risk, and an order's cancel at the broker by
client_order_id. Every route but ``GET /health`` needs a bearer token: the read-only one, or the
operator one for the actions; both are generated at first start into files beside the embedded
Redis's password. Every action is logged with the token's role and the caller's reason. The
routes and replies are described by ``openapi.yaml`` beside this file.
Run it with ``python -m services.api``; see :mod:`services.api.service`.
"""

from services.api._app import build_app
from services.api._auth import Role, Tokens
from services.api._desk import ApiError, Desk
from services.api.service import main, serve

__all__ = ["ApiError", "Desk", "Role", "Tokens", "build_app", "main", "serve"]
