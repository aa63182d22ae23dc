"""The rq jobs the monitor schedules; run by ``python -m services.monitor.worker``.

Each job is a module-level function taking plain arguments (rq pickles the call), and finds its
Redis connection through :func:`rq.get_current_job`, so it works with whatever URL the worker
resolved. The work itself lives in functions taking a client, so it can be tested without rq.

* :func:`deliver_alert` POSTs one alert as JSON to the webhook. A non-2xx answer or a network
  error raises, and rq's ``Retry`` runs it again (``webhook_retries`` times, after
  ``webhook_retry_intervals_s``). The attempt that gives up records the alert in
  ``<prefix>:monitor:failed-deliveries`` and counts it before raising, so the job ends in rq's
  failed registry *and* in a list ``bastion status`` reads: a failing webhook is never silent.
* :func:`refresh_balance` reads the broker account into ``<prefix>:monitor:balance``.
* :func:`daily_summary` writes ``<prefix>:monitor:daily-summary`` and publishes it as an INFO
  alert (so it reaches the webhook too).

Delivery is at least once: a worker killed after the POST and before the job is marked done
runs it again, so a receiver may see an alert twice (the payload's ``id`` identifies it).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import redis
from rq import get_current_job

from shared.brokers import Broker, build_broker
from shared.bus import publish
from shared.clock import Clock, LiveClock
from shared.config import load_settings
from shared.keys import ALERTS, Keys, MonitorKeys
from shared.logging import get_logger
from shared.models import Alert, AlertSeverity
from shared.portfolio import Portfolio
from shared.redis.client import reply_text

__all__ = [
    "WebhookFailed",
    "daily_summary",
    "deliver_alert",
    "post_json",
    "refresh_balance",
    "summarize",
    "write_balance",
]

log = get_logger(component="monitor.jobs")


class WebhookFailed(Exception):
    """The webhook did not accept a delivery (status or network error in the message)."""


def post_json(url: str, payload: Mapping[str, Any], timeout_s: float) -> int:
    """POST ``payload`` as JSON; return the status, or raise WebhookFailed unless it is 2xx."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "bastion"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        raise WebhookFailed(f"webhook answered {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise WebhookFailed(f"webhook unreachable: {exc}") from exc
    if not 200 <= status < 300:
        raise WebhookFailed(f"webhook answered {status}")
    return status


def _connection() -> redis.Redis:
    job = get_current_job()
    if job is None:
        raise RuntimeError("this function runs as an rq job")
    return job.connection


def deliver_alert(url: str, payload: dict[str, Any], prefix: str, timeout_s: float, keep: int) -> int:
    """rq job: POST one alert (``payload``) to ``url``; record it when the last retry fails."""
    job = get_current_job()
    client = _connection()
    names = MonitorKeys(Keys(prefix))
    try:
        status = post_json(url, payload, timeout_s)
    except WebhookFailed as exc:
        last = job is None or not job.retries_left
        record_failed_attempt(client, names, payload, str(exc), last=last, keep=keep,
                              job_id=job.id if job else "", clock=LiveClock())
        raise
    client.hincrby(names.deliveries, "delivered", 1)
    log.info("monitor.alert_delivered", alert_id=payload.get("id"), status=status)
    return status


def record_failed_attempt(client: redis.Redis, names: MonitorKeys, payload: Mapping[str, Any], error: str, *,
                          last: bool, keep: int, job_id: str, clock: Clock) -> None:
    """Count a failed try; on the ``last`` one also keep the alert in the failed-deliveries list."""
    with client.pipeline(transaction=True) as pipe:
        pipe.hincrby(names.deliveries, "attempt_failed", 1)
        if last:
            pipe.hincrby(names.deliveries, "failed", 1)
            record = {"alert": dict(payload), "error": error, "job_id": job_id, "at": clock.now().isoformat()}
            pipe.lpush(names.failed_deliveries, json.dumps(record, default=str))
            pipe.ltrim(names.failed_deliveries, 0, keep - 1)
        pipe.execute()
    if last:
        log.error("monitor.alert_delivery_failed", alert_id=payload.get("id"), error=error, job_id=job_id)
    else:
        log.warning("monitor.alert_delivery_retry", alert_id=payload.get("id"), error=error, job_id=job_id)


def write_balance(client: redis.Redis, keys: Keys, broker: Broker, clock: Clock) -> dict[str, str]:
    """Read the broker account and store its balances in ``<prefix>:monitor:balance``."""
    account = broker.account()
    fields = {"account_id": account.account_id, "currency": account.currency, "cash": str(account.cash),
              "buying_power": str(account.buying_power), "equity": str(account.equity),
              "trading_blocked": "1" if account.trading_blocked else "0",
              "pattern_day_trader": "1" if account.pattern_day_trader else "0",
              "at": clock.now().isoformat()}
    client.hset(MonitorKeys(keys).balance, mapping=fields)  # type: ignore[arg-type]
    return fields


def refresh_balance(prefix: str) -> dict[str, str]:
    """rq job: refresh the broker account balances (settings from the worker's environment)."""
    client = _connection()
    settings = load_settings()
    clock = LiveClock()
    broker = build_broker(settings, client=client, clock=clock)
    return write_balance(client, Keys(prefix), broker, clock)


def summarize(client: redis.Redis, keys: Keys, account: str, clock: Clock) -> dict[str, str]:
    """Gather the day's summary: account, positions, open orders, trading state, deliveries."""
    snapshot = Portfolio(client, keys, account, clock=clock).snapshot()
    names = MonitorKeys(keys)
    raw_state: Any = client.hgetall(keys.trading_state)
    state = {reply_text(k): reply_text(v) for k, v in raw_state.items()}
    raw_deliveries: Any = client.hgetall(names.deliveries)
    raw_recon: Any = client.hget(keys.reconciliation, "status")
    positions = {s: str(p.qty) for s, p in sorted(snapshot.positions.items()) if p.qty}
    return {"at": clock.now().isoformat(), "account": account, "cash": str(snapshot.cash),
            "reserved": str(snapshot.reserved), "realized_pnl": str(snapshot.realized_pnl),
            "fees": str(snapshot.fees), "positions": json.dumps(positions),
            "open_orders": str(client.scard(keys.open_orders)),
            "trading_state": state.get("state", "ACTIVE"),
            "reconciliation": reply_text(raw_recon) if raw_recon is not None else "none",
            "deliveries": json.dumps({reply_text(k): int(v) for k, v in raw_deliveries.items()})}


def daily_summary(prefix: str, account: str) -> dict[str, str]:
    """rq job: store the daily summary and publish it as an INFO alert."""
    client = _connection()
    keys = Keys(prefix)
    clock = LiveClock()
    summary = summarize(client, keys, account, clock)
    client.hset(MonitorKeys(keys).daily_summary, mapping=summary)  # type: ignore[arg-type]
    text = (f"{account}: cash {summary['cash']}, realized PnL {summary['realized_pnl']}, positions "
            f"{summary['positions']}, {summary['open_orders']} open orders, "
            f"trading {summary['trading_state']}")
    publish(client, keys, ALERTS, Alert(time=clock.now(), severity=AlertSeverity.INFO, source="monitor",
                                        kind="daily_summary", text=text, details=summary))
    return summary
