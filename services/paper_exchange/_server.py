"""The HTTP face of the exchange: Alpaca's Trading API v2 routes on aiohttp.

Every reply that is not a success is Alpaca's error shape, ``{"code": <int>, "message": <text>}``
with the HTTP status (so alpaca-py's ``APIError`` parses it): the book's refusals, an unknown path
(404), a method a route lacks (405, with ``Allow``), a malformed body (400), an endpoint the
exchange does not implement (501), and any unexpected failure (500, logged with its traceback).

Concurrency model: one asyncio loop serves HTTP and the ``trade_updates`` websocket
(:mod:`._updates`); the book (:class:`Exchange`) is a thread-safe object called from the loop and
from the bar-consumer thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

import services.paper_exchange._render as render
from services.paper_exchange._engine import ApiError, Exchange
from services.paper_exchange._faults import FaultRule, Faults, parse_plan
from services.paper_exchange._updates import TradeUpdates
from shared.clock import Clock
from shared.logging import get_logger

__all__ = ["Server"]

log = get_logger(component="paper_exchange.http")
_HTTP_FAULTS = frozenset({"latency", "reply_timeout", "drop_before", "drop_after", "rate_limit", "status",
                          "refuse", "hide_new_orders", "stale_positions"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


def _endpoint(request: web.Request) -> str:
    """``"<METHOD> <route>"``, as fault rules name endpoints (the path itself for no route)."""
    resource = request.match_info.route.resource
    return f"{request.method} {resource.canonical if resource is not None else request.path}"


_ANSWERED = (ApiError, web.HTTPError, json.JSONDecodeError)


def _error_reply(request: web.Request, exc: Exception) -> web.Response:
    """Alpaca's error shape for a refusal, an HTTP error of aiohttp's (404, 405, 413...) or a body
    that is not JSON."""
    if isinstance(exc, ApiError):
        return _error(exc.status, exc.code, exc.message)
    if isinstance(exc, json.JSONDecodeError):
        return _error(400, 40010000, f"request body is not valid JSON: {exc}")
    assert isinstance(exc, web.HTTPError)
    headers = {name: value for name, value in exc.headers.items()
               if name.lower() not in ("content-type", "content-length")}
    allowed = f" (allowed: {headers['Allow']})" if "Allow" in headers else ""
    message = f"{exc.reason.lower()}: {request.method} {request.path}{allowed}"
    return _error(exc.status, exc.status * 100000, message, headers=headers)


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object in the request body, numbers as Decimal (400 if not JSON, 422 if no object)."""
    body = json.loads(await request.text(), parse_float=Decimal, parse_int=Decimal)
    if not isinstance(body, dict):
        raise ApiError(422, 40010001, "request body must be a JSON object")
    return body


class Server:
    """Routes, authentication, fault injection and errors; the websocket is :class:`TradeUpdates`."""

    def __init__(self, exchange: Exchange, *, key_id: str, secret_key: str, faults: Faults, clock: Clock,
                 host: str, port: int, always_open: bool = True) -> None:
        self.exchange = exchange
        self.key_id = key_id
        self.secret_key = secret_key
        self.faults = faults
        self.clock = clock
        self.host = host
        self.port = port
        self.always_open = always_open
        self.updates = TradeUpdates(faults, self._authorized)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        exchange.publish = self.updates.publish_threadsafe
        exchange.partial_fraction = self._partial_fraction

    # -- lifecycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._middleware])
        r = app.router
        r.add_get("/_paper/health", self._health)
        r.add_get("/_paper/faults", self._get_faults)
        r.add_put("/_paper/faults", self._put_faults)
        r.add_get("/stream", self.updates.handle)
        r.add_get("/v2/account", self._account)
        r.add_get("/v2/account/portfolio/history", self._not_supported)
        r.add_post("/v2/orders", self._submit)
        r.add_get("/v2/orders", self._list_orders)
        r.add_delete("/v2/orders", self._cancel_all)
        r.add_get("/v2/orders:by_client_order_id", self._by_client_id)
        r.add_get("/v2/orders/{order_id}", self._get_order)
        r.add_patch("/v2/orders/{order_id}", self._replace)
        r.add_delete("/v2/orders/{order_id}", self._cancel)
        r.add_get("/v2/positions", self._positions)
        r.add_delete("/v2/positions", self._close_all)
        r.add_get("/v2/positions/{symbol_or_asset_id}", self._position)
        r.add_delete("/v2/positions/{symbol_or_asset_id}", self._close)
        r.add_get("/v2/clock", self._clock)
        r.add_get("/v2/assets", self._assets)
        r.add_get("/v2/assets/{symbol_or_asset_id}", self._asset)
        return app

    async def start(self) -> None:
        self.updates.loop = asyncio.get_running_loop()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await self._listen()
        log.info("paper_exchange.listening", host=self.host, port=self.port)

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    async def clients_gone(self, wait_s: float, others: Callable[[], list[str]]) -> list[str]:
        """Keep serving while a websocket client is connected or ``others()`` names anyone (the
        other services still running), at most ``wait_s``; return who is still there."""
        deadline = self.clock.monotonic() + wait_s
        while True:
            left = [*(["trade-update stream"] * len(self.updates.sockets)), *others()]
            if not left or self.clock.monotonic() >= deadline:
                return left
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.updates.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _refuse(self, seconds: float, current: web.Request) -> None:
        """Stop listening and drop every connection for ``seconds``: new connections are refused."""
        assert self._runner is not None and self._site is not None
        await self._site.stop()
        server = self._runner.server
        for protocol in list(getattr(server, "connections", []) if server else []):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abort()
        if current.transport is not None:
            current.transport.abort()
        log.warning("fault.refusing", seconds=seconds)
        await asyncio.sleep(seconds)
        await self._listen()
        log.warning("fault.listening_again")

    # -- middleware: errors, auth, faults --------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The outer middleware: it sees the router's 404/405 and any unexpected failure (500)."""
        try:
            return await handler(request)
        except _ANSWERED as exc:
            return _error_reply(request, exc)
        except Exception:
            log.exception("http.failed", endpoint=_endpoint(request))
            if request.path == "/stream":
                raise  # a websocket already answered: there is no reply left to send
            return _error(500, 50000000, "internal error in the paper exchange (see its log)")

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = _endpoint(request)
        path = endpoint.partition(" ")[2]
        if path == "/_paper/health":
            return await handler(request)
        if path != "/stream" and not self._authorized(request.headers.get("APCA-API-KEY-ID"),
                                                      request.headers.get("APCA-API-SECRET-KEY")):
            return _error(401, 40110000, "request is not authorized")
        if request.can_read_body:
            await request.read()  # received in full before any fault: a slow server still has it
        fired = self.faults.draw(endpoint, _HTTP_FAULTS) if not path.startswith("/_paper") else []
        after: list[FaultRule] = []
        for rule in fired:
            if rule.kind == "latency":
                await asyncio.sleep(rule.seconds)
            elif rule.kind == "drop_before":
                return self._drop(request)
            elif rule.kind == "rate_limit":
                reset = self.clock.now().timestamp() + rule.retry_after
                return _error(429, 42910000, "rate limit exceeded", headers={
                    "Retry-After": f"{rule.retry_after:g}", "X-Ratelimit-Limit": "200",
                    "X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": f"{reset:.3f}"})
            elif rule.kind == "status":
                return _error(rule.status, rule.status * 100000, f"injected fault: HTTP {rule.status}")
            elif rule.kind == "refuse":
                await self._refuse(rule.seconds, request)
                return web.Response(status=503)  # never delivered: the connection is gone
            elif rule.kind == "hide_new_orders":
                request["hide_lookups"] = rule.lookups
            elif rule.kind in ("reply_timeout", "drop_after"):
                after.append(rule)
            elif rule.kind == "stale_positions" and self.faults.stale_positions is None:
                self.faults.stale_positions = self.exchange.positions()
            if rule.kind == "stale_positions":
                request["stale"] = True
        try:
            response = await handler(request)
        except _ANSWERED as exc:  # an error reply is a reply: the faults after it still apply
            response = _error_reply(request, exc)
        for rule in after:
            if rule.kind == "reply_timeout":
                await asyncio.sleep(rule.seconds)
            else:
                return self._drop(request)
        return response

    def _drop(self, request: web.Request) -> web.Response:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=503)  # never delivered

    def _authorized(self, key_id: str | None, secret: str | None) -> bool:
        return (key_id is not None and secret is not None
                and hmac.compare_digest(key_id.encode(), self.key_id.encode())
                and hmac.compare_digest(secret.encode(), self.secret_key.encode()))

    def _partial_fraction(self) -> Decimal | None:
        fired = self.faults.draw("fills", frozenset({"partial_fills"}))
        return Decimal(str(fired[0].fraction)) if fired else None

    # -- admin --------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "listeners": len(self.updates.listeners)})

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.plan.model_dump())

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            plan = parse_plan(await request.text())
        except ValueError as exc:
            return _error(422, 40010001, str(exc))
        self.faults.set(plan)
        log.info("fault.plan_set", rules=len(plan.rules), seed=plan.seed)
        return web.json_response(plan.model_dump())

    # -- trading API --------------------------------------------------------------------------

    async def _account(self, request: web.Request) -> web.Response:
        return web.json_response(self.exchange.account())

    async def _not_supported(self, request: web.Request) -> web.Response:
        raise ApiError(501, 50100000, f"{_endpoint(request)} is not supported by the paper exchange")

    async def _submit(self, request: web.Request) -> web.Response:
        order = self.exchange.submit(await _body(request), hide_lookups=request.get("hide_lookups", 0))
        return web.json_response(order)

    async def _replace(self, request: web.Request) -> web.Response:
        order = self.exchange.replace(request.match_info["order_id"], await _body(request),
                                      hide_lookups=request.get("hide_lookups", 0))
        return web.json_response(order)

    async def _list_orders(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            limit = min(int(query.get("limit", "50")), 500)
        except ValueError:
            raise ApiError(422, 40010001, "limit must be an integer") from None
        symbols = {s for s in query.get("symbols", "").split(",") if s} or None
        orders = self.exchange.list_orders(status=query.get("status", "open"), limit=limit,
                                           direction=query.get("direction", "desc"),
                                           nested=query.get("nested", "false").lower() == "true",
                                           symbols=symbols)
        return web.json_response(orders)

    async def _cancel_all(self, request: web.Request) -> web.Response:
        return web.json_response(self.exchange.cancel_all(), status=207)

    async def _by_client_id(self, request: web.Request) -> web.Response:
        cid = request.query.get("client_order_id")
        if not cid:
            raise ApiError(422, 40010001, "client_order_id is required")
        return web.json_response(self.exchange.get_by_client_id(cid))

    async def _get_order(self, request: web.Request) -> web.Response:
        return web.json_response(self.exchange.get(request.match_info["order_id"]))

    async def _cancel(self, request: web.Request) -> web.Response:
        self.exchange.cancel(request.match_info["order_id"])
        return web.Response(status=204)

    async def _positions(self, request: web.Request) -> web.Response:
        if request.get("stale") and self.faults.stale_positions is not None:
            return web.json_response(self.faults.stale_positions)
        return web.json_response(self.exchange.positions())

    async def _position(self, request: web.Request) -> web.Response:
        return web.json_response(self.exchange.position(request.match_info["symbol_or_asset_id"]))

    async def _close(self, request: web.Request) -> web.Response:
        order = self.exchange.close_position(request.match_info["symbol_or_asset_id"], dict(request.query),
                                             hide_lookups=request.get("hide_lookups", 0))
        return web.json_response(order)

    async def _close_all(self, request: web.Request) -> web.Response:
        cancel = request.query.get("cancel_orders", "false").lower() == "true"
        return web.json_response(self.exchange.close_all_positions(cancel), status=207)

    async def _clock(self, request: web.Request) -> web.Response:
        return web.json_response(render.clock(self.clock.now(), self.always_open))

    async def _assets(self, request: web.Request) -> web.Response:
        return web.json_response(self.exchange.asset_list(dict(request.query)))

    async def _asset(self, request: web.Request) -> web.Response:
        return web.json_response(self.exchange.asset(request.match_info["symbol_or_asset_id"]))
