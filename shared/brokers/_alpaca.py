"""The one Broker implementation: alpaca-py's TradingClient and TradingStream, with our policy.

alpaca-py retries 429 and 504 on every request (POST /orders included: a blind resubmit) and
sets no request timeout. This adapter turns both off on the client it owns and decides itself:

* **Every request has a timeout** (``broker.timeout_s``).
* **429** waits as the broker says (``Retry-After``, else ``X-Ratelimit-Reset``), up to
  ``rate_limit_retries`` times, then raises RateLimited. A 429 placed nothing, so a submit is
  retried too. After a reply with ``X-Ratelimit-Remaining: 0`` the next request waits for the reset.
* **Reads** (and cancel) are retried ``read_retries`` times on a timeout, a dropped connection or a
  5xx, then raise BrokerUnavailable.
* **Submit is never sent twice.** A timeout, dropped connection or 5xx leaves the outcome unknown;
  the adapter then looks the order up by client_order_id (``resolve_attempts`` times,
  ``resolve_interval_s`` apart). Found: that is the answer. Not found after a 503 or a refused
  connection: BrokerUnavailable (nothing was placed). Otherwise: AmbiguousSubmit, and the caller
  keeps the order in flight and resolves it later by the same id.

Why look up and not resend, as a timeline::

    time 0   POST /v2/orders cid=abc; the broker places the order
    time 1   the reply is lost (timeout); alpaca-py alone would POST again: a second order, or a 422
    time 1   here: GET /v2/orders:by_client_order_id?client_order_id=abc -> the order, status new

Left to the caller: an AmbiguousSubmit is not a failure; do not submit the same intent under a
new client_order_id until the old one is known not to exist.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import certifi
import urllib3
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from requests.utils import select_proxy
from urllib3.exceptions import ConnectTimeoutError, ProtocolError

import shared.brokers._mapping as mapping
from shared.brokers._stream import AlpacaTradeUpdates
from shared.brokers._types import SUBMIT_ENDPOINT, Account, BrokerOrder, OrderRequest, Position
from shared.clock import Clock, LiveClock
from shared.config import BrokerSettings
from shared.errors import (
    AmbiguousSubmit,
    BrokerError,
    BrokerUnavailable,
    InsufficientBuyingPower,
    OrderNotFound,
    OrderRejected,
    PatternDayTrading,
    RateLimited,
    RateLimitTimeout,
)
from shared.logging import get_logger
from shared.models import OrderStatus
from shared.safety.rate_limit import RateLimiter

__all__ = ["AlpacaBroker"]

log = get_logger(component="broker")


@dataclass(frozen=True)
class _Reply:
    """An error reply, as alpaca-py's APIError reads it (``http_error.response``)."""

    status_code: int
    headers: Mapping[str, str]


@dataclass(frozen=True)
class _HttpError:
    response: _Reply


class _Client(TradingClient):
    """TradingClient with alpaca-py's retries off, a timeout on every request, headers kept, and
    requests sent with urllib3 directly.

    alpaca-py sends through a requests Session, which re-merges its settings, cookies and hooks
    on every request: a third to a half of the client's CPU per request. urllib3 (what requests
    sends with) keeps one connection pool; the proxy and CA bundle are read from the environment
    once, as requests would read them. Failures stay urllib3's: a connect timeout or refusal is
    :class:`ConnectTimeoutError` (nothing was sent), anything later another ``urllib3`` error.
    """

    def __init__(self, api_key: str, secret_key: str, *, paper: bool, url: str | None,
                 timeout: float) -> None:
        super().__init__(api_key=api_key, secret_key=secret_key, paper=paper, raw_data=True,
                         url_override=url)
        self._retry = 0  # RESTClient's own loop: one attempt; the adapter decides about retries
        self._retry_codes = []
        self.last_headers: Mapping[str, str] = {}
        found = self._session.merge_environment_settings(str(self._base_url), {}, None, None, None)
        verify = found["verify"]
        options: dict[str, Any] = {
            "retries": False, "timeout": urllib3.Timeout(connect=timeout, read=timeout), "maxsize": 2,
            "ca_certs": verify if isinstance(verify, str) else certifi.where()}
        proxy = select_proxy(str(self._base_url), found["proxies"])
        self._pool = urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)

    def _one_request(self, method: str, url: str, opts: dict[str, Any], retry: int) -> Any:
        headers = dict(opts["headers"])
        body = None
        if opts.get("json") is not None:
            body = json.dumps(opts["json"], allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        params = opts.get("params")
        if params:
            url += "?" + urlencode([(k, v) for k, v in params.items() if v is not None], doseq=True)
        reply = self._pool.request(method, url, body=body, headers=headers, redirect=False)
        self.last_headers = reply.headers
        text = reply.data.decode("utf-8", errors="replace")
        if reply.status >= 400:
            error = _HttpError(_Reply(reply.status, reply.headers))
            raise APIError(text, error)  # type: ignore[no-untyped-call]
        try:
            return json.loads(text) if text != "" else None
        except ValueError:
            raise ProtocolError(f"HTTP {reply.status} reply is not JSON: {text[:200]!r}") from None


class _Ambiguous(Exception):
    """A submit whose outcome is unknown; ``placed_nothing`` when the failure says so (503, refused)."""

    def __init__(self, detail: str, *, placed_nothing: bool) -> None:
        self.detail = detail
        self.placed_nothing = placed_nothing
        super().__init__(detail)


class AlpacaBroker:
    """Broker over alpaca-py (the paper exchange or Alpaca). Thread-safe: calls are serialised."""

    def __init__(self, settings: BrokerSettings, *, api_key: str, secret_key: str, base_url: str | None,
                 stream_url: str | None, clock: Clock | None = None,
                 limiter: RateLimiter | None = None) -> None:
        self.settings = settings
        self.clock = clock or LiveClock()
        self.limiter = limiter  # shared by every process: a request waits for its slot, a 429 pauses all
        self._client = _Client(api_key, secret_key, paper=not settings.live, url=base_url,
                               timeout=settings.timeout_s)
        self._stream_args = {"api_key": api_key, "secret_key": secret_key, "paper": not settings.live,
                             "url": stream_url}
        self._lock = threading.Lock()
        self._not_before = 0.0  # monotonic time before which no request is sent (quota exhausted)

    # -- the Broker interface -----------------------------------------------------------------

    def submit(self, request: OrderRequest, *, prepaid: bool = False) -> BrokerOrder:
        """Place ``request``; see the module docstring for every outcome. ``prepaid``: its slot of
        the shared rate limit is taken already (a retry after a 429 takes a new one)."""
        cid = request.client_order_id
        body = mapping.order_body(request)
        try:
            raw = self._call(SUBMIT_ENDPOINT, lambda: self._client.post("/orders", body), cid=cid,
                             submit=True, prepaid=prepaid)
        except _Ambiguous as exc:
            log.warning("broker.submit_ambiguous", client_order_id=cid, detail=exc.detail)
            return self._resolve(cid, exc)
        except OrderRejected as exc:
            if "client_order_id must be unique" not in exc.reason:
                raise
            try:
                existing = self.get_order(cid)
            except OrderNotFound:  # the broker says the id is taken but cannot show the order
                raise AmbiguousSubmit(f"submit of {cid!r}: the broker says the client_order_id is used "
                                      "but does not find it: resolve it later", client_order_id=cid) from exc
            if (existing.symbol, existing.side, existing.quantity) != (request.symbol, request.side,
                                                                      request.quantity):
                raise OrderRejected(f"client_order_id {cid!r} is already used by a different order "
                                    f"({existing.side} {existing.quantity} {existing.symbol})",
                                    client_order_id=cid) from exc
            log.info("broker.submit_duplicate", client_order_id=cid, broker_order_id=existing.broker_order_id)
            return existing
        placed = mapping.order(raw)
        log.info("broker.submitted", client_order_id=cid, broker_order_id=placed.broker_order_id,
                 status=placed.status)
        return placed

    def cancel(self, client_order_id: str) -> None:
        """Cancel the order. Idempotent: an order already canceled is fine (a retried DELETE).

        OrderNotFound if the broker has none; OrderRejected if it is done otherwise (filled...).
        """
        found = self.get_order(client_order_id)
        if found.status == OrderStatus.CANCELED:
            return
        try:
            self._call("cancel", lambda: self._client.cancel_order_by_id(found.broker_order_id),
                       cid=client_order_id)
        except OrderRejected:
            if self.get_order(client_order_id).status != OrderStatus.CANCELED:
                raise

    def get_order(self, client_order_id: str) -> BrokerOrder:
        """The order with ``client_order_id`` (OrderNotFound if none)."""
        raw = self._call("get_order", lambda: self._client.get_order_by_client_id(client_order_id),
                         cid=client_order_id)
        return mapping.order(raw)

    def open_orders(self) -> list[BrokerOrder]:
        """Every open order (legs listed on their own)."""
        raw = self._call("open_orders", lambda: self._client.get("/orders", {"status": "open", "limit": 500}))
        return [mapping.order(item) for item in raw or []]

    def positions(self) -> list[Position]:
        """Every open position."""
        raw = self._call("positions", self._client.get_all_positions)
        return [mapping.position(item) for item in raw or []]

    def account(self) -> Account:
        """Balances and trading flags."""
        return mapping.account(self._call("account", self._client.get_account))

    def market_open(self) -> bool:
        """Whether the market is open now, by the broker's clock (GET /v2/clock)."""
        raw = self._call("clock", self._client.get_clock)
        return bool(raw and raw.get("is_open"))

    def trade_updates(self) -> AlpacaTradeUpdates:
        """Open the trade_updates stream (call ``wait_ready`` before relying on it)."""
        return AlpacaTradeUpdates(**self._stream_args)  # type: ignore[arg-type]

    # -- policy -------------------------------------------------------------------------------

    def _resolve(self, cid: str, cause: _Ambiguous) -> BrokerOrder:
        for attempt in range(self.settings.resolve_attempts):
            if attempt:
                self.clock.sleep(self.settings.resolve_interval_s)
            try:
                found = self.get_order(cid)
            except (OrderNotFound, BrokerUnavailable, RateLimited) as exc:
                log.info("broker.resolve_miss", client_order_id=cid, attempt=attempt + 1, error=str(exc))
                continue
            log.info("broker.resolved", client_order_id=cid, broker_order_id=found.broker_order_id,
                     status=found.status)
            return found
        if cause.placed_nothing:
            raise BrokerUnavailable(f"submit of {cid!r} failed before the broker took it ({cause.detail}); "
                                    "not found by client_order_id", client_order_id=cid)
        raise AmbiguousSubmit(f"submit of {cid!r} may have been placed ({cause.detail}); not found after "
                              f"{self.settings.resolve_attempts} look-ups by client_order_id: "
                              "resolve it later",
                              client_order_id=cid)

    def _call(self, op: str, fn: Callable[[], Any], *, cid: str | None = None, submit: bool = False,
              prepaid: bool = False) -> Any:
        rate_limited = failures = 0
        while True:
            wait = self._not_before - self.clock.monotonic()
            if wait > 0:
                self.clock.sleep(wait)
            if not prepaid:
                self._take_slot(op, cid)
            prepaid = False  # a retry takes its own slot
            try:
                with self._lock:
                    result = fn()
                    headers = self._client.last_headers
                self._note_quota(headers)
                return result
            except APIError as exc:
                status = exc.status_code or 0
                headers = exc.response.headers if exc.response is not None else {}
                if status == 429:
                    delay = self._rate_limit_delay(headers)
                    rate_limited += 1
                    limit = self.settings
                    if rate_limited > limit.rate_limit_retries or delay > limit.max_rate_limit_wait_s:
                        raise RateLimited(f"{op}: broker rate limit (429) persists; retry in {delay:.2f}s",
                                          retry_after=delay, client_order_id=cid) from exc
                    log.warning("broker.rate_limited", op=op, wait_s=round(delay, 3), attempt=rate_limited)
                    if self.limiter is not None:
                        self.limiter.pause(delay)  # every process sharing the limit waits too
                    self.clock.sleep(delay)
                    continue
                if status >= 500:
                    if submit:
                        raise _Ambiguous(f"HTTP {status}", placed_nothing=status == 503) from exc
                    if failures < self.settings.read_retries:
                        failures += 1
                        self.clock.sleep(min(0.1 * 2 ** failures, 2.0))
                        continue
                raise _translate(op, status, exc, cid) from exc
            except urllib3.exceptions.HTTPError as exc:
                refused = isinstance(exc, ConnectTimeoutError)  # no connection: nothing reached the broker
                if submit and not refused:
                    raise _Ambiguous(f"{type(exc).__name__}: {exc}", placed_nothing=False) from exc
                if not submit and failures < self.settings.read_retries:
                    failures += 1
                    self.clock.sleep(min(0.1 * 2 ** failures, 2.0))
                    continue
                what = "connection refused" if refused else f"{type(exc).__name__}"
                raise BrokerUnavailable(f"{op}: broker unreachable ({what}): {exc}",
                                        client_order_id=cid) from exc

    def _take_slot(self, op: str, cid: str | None) -> None:
        """Wait for the shared rate limit to grant this request (RateLimited past the longest wait)."""
        if self.limiter is None:
            return
        try:
            self.limiter.acquire(op, timeout=self.settings.max_rate_limit_wait_s)
        except RateLimitTimeout as exc:
            wait = self.settings.max_rate_limit_wait_s
            raise RateLimited(f"{op}: shared rate limit has no slot within {wait:g}s", retry_after=wait,
                              client_order_id=cid) from exc

    def _rate_limit_delay(self, headers: Mapping[str, str]) -> float:
        retry_after = headers.get("Retry-After")
        if retry_after:
            try:
                return max(float(retry_after), 0.0)
            except ValueError:
                try:
                    return max((parsedate_to_datetime(retry_after) - self.clock.now()).total_seconds(), 0.0)
                except (TypeError, ValueError):
                    pass
        reset = headers.get("X-Ratelimit-Reset")
        if reset:
            try:
                return max(float(reset) - self.clock.now().timestamp(), 0.0)
            except ValueError:
                pass
        return 1.0

    def _note_quota(self, headers: Mapping[str, str]) -> None:
        if headers.get("X-Ratelimit-Remaining") == "0":
            delay = min(self._rate_limit_delay({"X-Ratelimit-Reset": headers.get("X-Ratelimit-Reset", "")}),
                        self.settings.max_rate_limit_wait_s)
            self._not_before = self.clock.monotonic() + delay


def _message(exc: APIError) -> str:
    try:
        return str(json.loads(str(exc))["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc)[:300]


def _translate(op: str, status: int, exc: APIError, cid: str | None) -> BrokerError:
    message = _message(exc)
    lowered = message.lower()
    if status == 404:
        return OrderNotFound(f"{op}: broker has no such order ({message})", client_order_id=cid)
    if status == 401:
        return BrokerError(f"{op}: broker refused the API keys (401): check broker.api_key/secret_key",
                           client_order_id=cid)
    if status == 403 and "pattern day" in lowered:
        return PatternDayTrading(message, client_order_id=cid)
    if status == 403 and "buying power" in lowered:
        return InsufficientBuyingPower(message, client_order_id=cid)
    if status >= 500:
        return BrokerUnavailable(f"{op}: broker failed (HTTP {status}): {message}", client_order_id=cid)
    return OrderRejected(f"{message} (HTTP {status} on {op})", client_order_id=cid)
