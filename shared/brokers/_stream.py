"""The trade_updates subscription over alpaca-py's TradingStream, in a thread of its own.

TradingStream runs its own asyncio loop (``run()`` blocks), reconnects by itself, and tells its
handler nothing about the subscription being confirmed; this wrapper notices the ``listening``
reply (``wait_ready``), hands raw updates to a queue, and turns them into OrderEvents through
:class:`~shared.brokers._mapping.UpdateFilter` (repeats removed, progress never regresses).

Left to the caller: updates sent while the connection was down are not replayed (Alpaca does not
replay either): watch :attr:`AlpacaTradeUpdates.connections` and, when it grows, look the open
orders up with ``Broker.get_order``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

import websockets
from alpaca.trading.stream import TradingStream

from shared.brokers._mapping import UpdateFilter
from shared.logging import get_logger
from shared.models import OrderEvent

__all__ = ["AlpacaTradeUpdates"]

log = get_logger(component="broker.stream")


class _Unreachable(websockets.exceptions.WebSocketException):
    """The stream's server could not be reached (refused, unreachable): nothing was said yet."""


class _Stream(TradingStream):
    """TradingStream that reports when the broker confirmed ``listen`` and can stop at once."""

    def __init__(self, *args: Any, ready: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ready = ready
        self.confirmations = 0  # how many times the broker confirmed listen: a reconnect adds one
        self._reconnect_min_backoff = 0.2  # alpaca-py: 1s doubling to 30s; an order stream should return fast
        self._reconnect_max_backoff = 5.0

    async def _start_ws(self) -> None:
        self._ready.clear()
        try:
            await super()._start_ws()  # type: ignore[no-untyped-call]
        except OSError as exc:  # alpaca-py logs a WebSocketException as one line and reconnects
            raise _Unreachable(f"trade-update stream unreachable: {exc}") from exc

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("stream") == "listening" and "trade_updates" in (msg.get("data") or {}).get("streams", []):
            self.confirmations += 1
            self._ready.set()
        await super()._dispatch(msg)

    async def _consume(self) -> None:
        try:
            await super()._consume()  # type: ignore[no-untyped-call]
        except websockets.ConnectionClosed:
            if self._should_run:
                raise  # the connection dropped: alpaca-py logs it and reconnects
            # our own stop closed it (stop_now): not an error, nothing to reconnect

    async def close(self) -> None:
        self._ready.clear()  # not listening until the broker confirms again after a reconnect
        await super().close()

    async def stop_now(self) -> None:
        await self.stop_ws()
        await self.close()


class AlpacaTradeUpdates:
    """A live trade_updates subscription (see :class:`~shared.brokers.TradeUpdates`)."""

    def __init__(self, *, api_key: str, secret_key: str, paper: bool, url: str | None) -> None:
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready = threading.Event()
        self._filter = UpdateFilter()
        self._stream = _Stream(api_key, secret_key, paper=paper, raw_data=True, url_override=url,
                               ready=self._ready)
        self._stream.subscribe_trade_updates(self._on_update)
        self._thread = threading.Thread(target=self._stream.run, name="trade-updates", daemon=True)
        self._thread.start()

    async def _on_update(self, message: dict[str, Any]) -> None:
        self._queue.put(message.get("data") or {})

    def wait_ready(self, timeout: float) -> bool:
        """Block until the broker confirmed the subscription."""
        return self._ready.wait(timeout)

    @property
    def connections(self) -> int:
        """How many times the broker confirmed the subscription: alpaca-py reconnects by itself, and
        each reconnect adds one (updates sent while it was away are not replayed)."""
        return self._stream.confirmations

    def get(self, timeout: float) -> OrderEvent | None:
        """The next new OrderEvent within ``timeout`` seconds (repeats are skipped), else None."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            try:
                event = self._filter.accept(data)
            except (KeyError, ValueError) as exc:
                log.error("broker.bad_trade_update", error=str(exc))
                continue
            if event is not None:
                return event
            log.info("broker.trade_update_skipped", update=data.get("event"),
                     execution_id=data.get("execution_id"))

    def close(self) -> None:
        """Stop the stream and its thread."""
        loop = self._stream._loop
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._stream.stop_now(), loop).result(timeout=10)
        else:
            self._stream._stop_stream_queue.put_nowait({"should_stop": True})
            self._stream._should_run = False
        self._thread.join(timeout=10)

    def __enter__(self) -> AlpacaTradeUpdates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
