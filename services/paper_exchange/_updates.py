"""The ``trade_updates`` websocket: authentication, listening, and the fan-out of the book's events.

Concurrency model: everything here runs on the server's asyncio loop. The book hands its events
over with :meth:`TradeUpdates.publish_threadsafe` (``call_soon_threadsafe``) while holding its
lock, so every listener receives them in commit order, unless a ``duplicate_updates`` or
``reorder_updates`` fault says otherwise. A client that connects late gets no replay.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from services.paper_exchange._faults import Faults

__all__ = ["TradeUpdates"]

_STREAM_FAULTS = frozenset({"duplicate_updates", "reorder_updates"})


class TradeUpdates:
    """The ``/stream`` handler and its listeners."""

    def __init__(self, faults: Faults, authorized: Callable[[str | None, str | None], bool]) -> None:
        self.faults = faults
        self.authorized = authorized
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listeners: set[asyncio.Queue[bytes | None]] = set()
        self.sockets: set[web.WebSocketResponse] = set()
        self._held: list[dict[str, Any]] = []  # an update held back by reorder_updates

    async def close(self) -> None:
        """Stop every writer and close every socket."""
        for queue in list(self.listeners):
            queue.put_nowait(None)
        for ws in list(self.sockets):
            await ws.close(message=b"server shutting down")

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """GET /stream: Alpaca's authenticate / listen protocol, then trade updates."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
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
                    authorized = self.authorized(payload.get("key_id", data.get("key")),
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
                        self.listeners.add(queue)
                        writer = asyncio.create_task(self._write_updates(ws, queue))
                    elif not streams and writer is not None:
                        self.listeners.discard(queue)
                    await self._send(ws, {"stream": "listening", "data": {"streams": streams}})
        finally:
            self.sockets.discard(ws)
            self.listeners.discard(queue)
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

    def publish_threadsafe(self, events: list[dict[str, Any]]) -> None:
        """Hand the book's committed events to the loop (any thread)."""
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
        for queue in list(self.listeners):
            queue.put_nowait(frame)
