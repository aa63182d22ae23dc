"""Routes, authentication and errors of the HTTP API, on aiohttp.

Every reply is JSON; an error is ``{"error": <text>}`` with its status: 400 a body that is not a
JSON object or a bad query parameter, 401 no token or a wrong one (with ``WWW-Authenticate``),
403 the read-only token on an action, 404 an unknown path, order or unopened account, 405 a method
a route lacks, 409 an order that cannot be cancelled now, 413 a body over 1 MiB, 422 a body its
model refuses, 502/503 the broker failing or away (a cancel), 503 Redis unavailable, 500 anything
unexpected (logged with its traceback). An unauthenticated caller gets 401 whatever the path.

Concurrency model: one asyncio loop; each route's Redis and broker calls (blocking redis-py and
alpaca-py) run in the loop's default thread pool, so a slow call holds a thread, never the loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

import services.api._actions as actions
import services.api._reads as reads
from services.api._auth import Role, Tokens
from services.api._desk import ApiError, Desk
from services.cli.commands.status import collect, open_orders, streams
from shared.errors import RedisUnavailable
from shared.logging import get_logger
from shared.redis.boundary import redis_errors

__all__ = ["MAX_LIMIT", "build_app"]

log = get_logger(component="api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
PREFIX = "/api/v1"
MAX_LIMIT = 500  # the most entries a ``limit`` query may ask for
DESK = web.AppKey("desk", Desk)
TOKENS = web.AppKey("tokens", Tokens)
ROLE = web.RequestKey("role", Role)  # the caller's, set by authentication


def build_app(desk: Desk, tokens: Tokens) -> web.Application:
    """The application serving ``desk`` to holders of ``tokens``."""
    app = web.Application(middlewares=[_errors, _authenticate])
    app[DESK] = desk
    app[TOKENS] = tokens
    r = app.router
    r.add_get("/health", _health)
    r.add_get(f"{PREFIX}/status", _status)
    r.add_get(f"{PREFIX}/portfolio", _portfolio)
    r.add_get(f"{PREFIX}/orders", _orders)
    r.add_post(f"{PREFIX}/orders", _place_order)
    r.add_post(f"{PREFIX}/orders/{{client_order_id}}/cancel", _cancel)
    r.add_get(f"{PREFIX}/fills", _fills)
    r.add_get(f"{PREFIX}/alerts", _alerts)
    r.add_get(f"{PREFIX}/equity", _equity)
    r.add_get(f"{PREFIX}/reconciliation", _reconciliation)
    r.add_get(f"{PREFIX}/streams", _streams)
    r.add_post(f"{PREFIX}/kill-switch", _kill_switch)
    r.add_post(f"{PREFIX}/flatten", _flatten)
    return app


# -- middleware ---------------------------------------------------------------------------------

def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outer middleware: every failure becomes a JSON error (see the module docstring)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message)
    except web.HTTPException as exc:  # the router's 404/405, the body's 413
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error(exc.status, f"{exc.reason.lower()}: {request.method} {request.path}", allow)
    except RedisUnavailable as exc:
        log.warning("api.redis_unavailable", path=request.path, error=str(exc))
        return _error(503, f"Redis unavailable: {exc}")
    except Exception:
        log.exception("api.failed", method=request.method, path=request.path)
        return _error(500, "internal error in the API (see its log)")


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 without a right token (before anything else is told), then 404/405, then 403 for the
    read-only token on anything but GET."""
    if request.path == "/health":
        return await handler(request)
    role = request.app[TOKENS].role(request.headers.get("Authorization"))
    if role is None:
        return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                      {"WWW-Authenticate": 'Bearer realm="bastion"'})
    unmatched = request.match_info.http_exception
    if unmatched is not None:
        raise unmatched
    if request.method not in ("GET", "HEAD") and role is not Role.OPERATOR:
        return _error(403, "this action needs the operator token")
    request[ROLE] = role
    return await handler(request)


# -- helpers ------------------------------------------------------------------------------------

async def _blocking(call: Callable[[], T]) -> T:
    """Run ``call`` in a worker thread, redis-py's errors translated (RedisUnavailable: 503)."""
    def run() -> T:
        with redis_errors("api"):
            return call()
    return await asyncio.to_thread(run)


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "50")
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_LIMIT):
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIMIT}, not {text!r}")
    return int(text)


async def _body(request: web.Request, model: type[M]) -> M:
    """The request's JSON object (numbers read exactly, as Decimal) validated by ``model``."""
    try:
        data = json.loads(await request.text(), parse_float=Decimal)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError.invalid(exc) from exc


async def _act(request: web.Request, action: str, reason: str, run: Callable[[Role], tuple[int, Any]],
               **about: Any) -> web.Response:
    """Carry out an action, logged with who (the token's role) and why, before and after."""
    role: Role = request[ROLE]
    log.info("api.action", action=action, role=role.value, reason=reason, **about)
    try:
        status, reply = await _blocking(lambda: run(role))
    except ApiError as exc:
        log.warning("api.action_refused", action=action, role=role.value, status=exc.status,
                    error=exc.message)
        raise
    log.info("api.action_done", action=action, role=role.value, status=status, result=reply)
    return web.json_response(reply, status=status)


# -- routes -------------------------------------------------------------------------------------

async def _health(request: web.Request) -> web.Response:
    try:
        await _blocking(request.app[DESK].redis.ping)
        redis = "ok"
    except RedisUnavailable:
        redis = "unreachable"
    return web.json_response({"status": "ok", "redis": redis})


async def _status(request: web.Request) -> web.Response:
    desk = request.app[DESK]
    return web.json_response(await _blocking(lambda: collect(desk, desk.clock)))


async def _portfolio(request: web.Request) -> web.Response:
    desk = request.app[DESK]
    return web.json_response(await _blocking(lambda: reads.portfolio(desk)))


async def _orders(request: web.Request) -> web.Response:
    desk, limit = request.app[DESK], _limit(request)
    return web.json_response(await _blocking(
        lambda: {"open": open_orders(desk), "recent": reads.recent_orders(desk, limit)}))


async def _fills(request: web.Request) -> web.Response:
    desk, limit = request.app[DESK], _limit(request)
    return web.json_response({"fills": await _blocking(lambda: reads.fills(desk, limit))})


async def _alerts(request: web.Request) -> web.Response:
    desk, limit = request.app[DESK], _limit(request)
    return web.json_response({"alerts": await _blocking(lambda: reads.alerts(desk, limit))})


async def _equity(request: web.Request) -> web.Response:
    desk, limit = request.app[DESK], _limit(request)
    return web.json_response({"equity": await _blocking(lambda: reads.equity(desk, limit))})


async def _reconciliation(request: web.Request) -> web.Response:
    desk, limit = request.app[DESK], _limit(request)
    return web.json_response(await _blocking(lambda: reads.reconciliation(desk, limit)))


async def _streams(request: web.Request) -> web.Response:
    desk = request.app[DESK]
    return web.json_response({"streams": await _blocking(lambda: streams(desk))})


async def _kill_switch(request: web.Request) -> web.Response:
    desk, body = request.app[DESK], await _body(request, actions.KillSwitchRequest)
    return await _act(request, "kill_switch", body.reason,
                      lambda role: (200, actions.kill_switch(desk, role, body)), engaged=body.engaged,
                      state=body.state, cancel_orders=body.cancel_orders, flatten=body.flatten)


async def _flatten(request: web.Request) -> web.Response:
    desk, body = request.app[DESK], await _body(request, actions.FlattenRequest)
    return await _act(request, "flatten", body.reason, lambda role: (200, actions.flatten(desk, role, body)),
                      state=body.state, cancel_orders=body.cancel_orders)


async def _place_order(request: web.Request) -> web.Response:
    desk, body = request.app[DESK], await _body(request, actions.OrderRequest)
    return await _act(request, "order", body.reason, lambda role: actions.place_order(desk, role, body),
                      side=body.side.value, symbol=body.symbol, quantity=str(body.quantity),
                      limit_price=str(body.limit_price) if body.limit_price is not None else None,
                      override_locks=body.override_locks)


async def _cancel(request: web.Request) -> web.Response:
    desk, body = request.app[DESK], await _body(request, actions.CancelRequest)
    cid = request.match_info["client_order_id"]
    return await _act(request, "cancel", body.reason,
                      lambda role: (202, actions.cancel(desk, role, cid, body)), client_order_id=cid)
