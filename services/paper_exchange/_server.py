"""The HTTP + websocket face of the exchange: Alpaca's Trading API v2 routes on aiohttp.

Concurrency model: one asyncio loop serves HTTP and websockets; the book (:class:`Exchange`) is
a thread-safe object called from the loop and from the bar-consumer thread. Trade updates are
handed to the loop with ``call_soon_threadsafe`` while the book's lock is held, so every
listener receives them in commit order (unless a fault says otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp import WSMsgType, web

from services.paper_exchange import _render as render
from services.paper_exchange._engine import ApiError, Exchange
from services.paper_exchange._faults import FaultRule, Faults, parse_plan
from shared.clock import Clock
from shared.logging import get_logger

__all__ = ["Server"]

log = get_logger(component="paper_exchange.http")
_STREAM_FAULTS = frozenset({"duplicate_updates", "reorder_updates"})
_HTTP_FAULTS = frozenset({"latency", "reply_timeout", "drop_before", "drop_after", "rate_limit", "status",
                          "refuse", "hide_new_orders", "stale_positions"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


class Server:
    """Routes, authentication, fault injection and the trade_updates fan-out."""

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
        self.loop: asyncio.AbstractEventLoop | None = None
        self._listeners: set[asyncio.Queue[bytes | None]] = set()
        self._sockets: set[web.WebSocketResponse] = set()
        self._held: list[dict[str, Any]] = []  # an update held back by reorder_updates
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        exchange.publish = self._publish_threadsafe
        exchange.partial_fraction = self._partial_fraction

    # -- lifecycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/_paper/health", self._health)
        r.add_get("/_paper/faults", self._get_faults)
        r.add_put("/_paper/faults", self._put_faults)
        r.add_get("/stream", self._stream)
        r.add_get("/v2/account", self._account)
        r.add_post("/v2/orders", self._submit)
        r.add_get("/v2/orders", self._list_orders)
        r.add_delete("/v2/orders", self._cancel_all)
        r.add_get("/v2/orders:by_client_order_id", self._by_client_id)
        r.add_get("/v2/orders/{order_id}", self._get_order)
        r.add_delete("/v2/orders/{order_id}", self._cancel)
        r.add_get("/v2/positions", self._positions)
        r.add_get("/v2/positions/{symbol}", self._position)
        r.add_get("/v2/clock", self._clock)
        r.add_get("/v2/assets", self._assets)
        r.add_get("/v2/assets/{symbol}", self._asset)
        return app

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
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
            left = [*(["trade-update stream"] * len(self._sockets)), *others()]
            if not left or self.clock.monotonic() >= deadline:
                return left
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for queue in list(self._listeners):
            queue.put_nowait(None)
        for ws in list(self._sockets):
            await ws.close(message=b"server shutting down")
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

    # -- middleware: auth, faults, errors -------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else request.path
        if path == "/_paper/health":
            return await handler(request)
        if path != "/stream" and not self._authorized(request.headers.get("APCA-API-KEY-ID"),
                                                      request.headers.get("APCA-API-SECRET-KEY")):
            return _error(401, 40110000, "request is not authorized")
        endpoint = f"{request.method} {path}"
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
        except ApiError as exc:
            response = _error(exc.status, exc.code, exc.message)
        except json.JSONDecodeError as exc:
            response = _error(400, 40010000, f"request body is not valid JSON: {exc}")
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
        return web.json_response({"status": "ok", "listeners": len(self._listeners)})

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

    async def _submit(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text(), parse_float=Decimal, parse_int=Decimal)
        if not isinstance(body, dict):
            raise ApiError(422, 40010001, "request body must be a JSON object")
        order = self.exchange.submit(body, hide_lookups=request.get("hide_lookups", 0))
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
        return web.json_response(self.exchange.position(request.match_info["symbol"]))

    async def _clock(self, request: web.Request) -> web.Response:
        return web.json_response(render.clock(self.clock.now(), self.always_open))

    async def _assets(self, request: web.Request) -> web.Response:
        shortable = self.exchange.settings.allow_short
        return web.json_response([render.asset(s, shortable) for s in self.exchange.known_symbols()])

    async def _asset(self, request: web.Request) -> web.Response:
        symbol = request.match_info["symbol"]
        if not symbol or len(symbol) > 32 or not all(c.isalnum() or c in "./-" for c in symbol):
            raise ApiError(404, 40410000, "asset not found")
        return web.json_response(render.asset(symbol.upper(), self.exchange.settings.allow_short))

    # -- trade_updates websocket ----------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        writer: asyncio.Task[None] | None = None
        authorized = False
        try:
            async for message in ws:
                if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                try:
                    data = json.loads(message.data)
                except ValueError:
                    await self._send(ws, {"stream": "error", "data": {"message": "invalid syntax"}})
                    continue
                action = data.get("action")
                payload = data.get("data") or {}
                if action in ("authenticate", "auth"):
                    authorized = self._authorized(payload.get("key_id", data.get("key")),
                                                  payload.get("secret_key", data.get("secret")))
                    status = "authorized" if authorized else "unauthorized"
                    reply: dict[str, Any] = {"status": status, "action": "authenticate"}
                    if not authorized:
                        reply["message"] = "access key verification failed"
                    await self._send(ws, {"stream": "authorization", "data": reply})
                    if not authorized:
                        break
                elif action == "listen":
                    if not authorized:
                        await self._send(ws, {"stream": "authorization", "data": {
                            "status": "unauthorized", "action": "listen", "message": "not authenticated"}})
                        break
                    streams = [s for s in payload.get("streams", []) if s == "trade_updates"]
                    if streams and writer is None:
                        self._listeners.add(queue)
                        writer = asyncio.create_task(self._write_updates(ws, queue))
                    elif not streams and writer is not None:
                        self._listeners.discard(queue)
                    await self._send(ws, {"stream": "listening", "data": {"streams": streams}})
        finally:
            self._sockets.discard(ws)
            self._listeners.discard(queue)
            if writer is not None:
                queue.put_nowait(None)
                await writer
            await ws.close()
        return ws

    async def _send(self, ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
        await ws.send_bytes(json.dumps(message).encode())  # Alpaca sends binary frames of JSON

    async def _write_updates(self, ws: web.WebSocketResponse, queue: asyncio.Queue[bytes | None]) -> None:
        while True:
            frame = await queue.get()
            if frame is None or ws.closed:
                return
            try:
                await ws.send_bytes(frame)
            except (ConnectionError, RuntimeError):
                return

    def _publish_threadsafe(self, events: list[dict[str, Any]]) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._fan_out, events)

    def _fan_out(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            out = [event]
            rules = {rule.kind: rule for rule in self.faults.draw("stream", _STREAM_FAULTS)}
            fired = set(rules)
            if "reorder_updates" in fired and not self._held:
                self._held.append(event)
                if rules["reorder_updates"].seconds > 0:  # else held until the next update
                    assert self.loop is not None
                    self.loop.call_later(rules["reorder_updates"].seconds, self._flush_held)
                continue
            if self._held:
                out = [event, *self._held]
                self._held.clear()
            if "duplicate_updates" in fired:
                out = [*out, event]
            for item in out:
                self._deliver(item)

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for event in held:
            self._deliver(event)

    def _deliver(self, event: dict[str, Any]) -> None:
        frame = json.dumps({"stream": "trade_updates", "data": event}).encode()
        for queue in list(self._listeners):
            queue.put_nowait(frame)
