"""The kill switch: ACTIVE / REDUCING / HALTED, kept in Redis so it survives every restart.

* ``ACTIVE``: every order the other rules allow.
* ``REDUCING``: only orders that reduce a position's size without going through zero.
* ``HALTED``: no new order at all (cancels are not orders: they always go).

Guarantee: the state lives in one Redis hash (``Keys.trading_state``); Redis runs with AOF, so
an engaged state outlives a restart of every service and of Redis itself, and nothing here
resets it at start-up (NautilusTrader's resets; ours does not). Each change is one script that
writes the hash *and* appends an entry to the never-trimmed ledger stream
``Keys.stream("trading-state")`` -- who, why, when, the previous state -- so the two never
disagree; an Alert goes to the ALERTS stream after it. A change carries a change id, so a retry
after a dropped connection is answered "dup" and not recorded twice. With ``escalate_only``
(for protections and the reconciler) a change may raise the state but never lower it, so an
automatic REDUCING never undoes a human's HALTED.

A hash with no state (never engaged) reads as ACTIVE.

Left to the caller: check :meth:`KillSwitch.allows` (or :meth:`TradingStatus.refusal`) for every
intent, reading the state fresh; the executor acts on ``cancel_open_orders`` /
``flatten_positions`` (requests recorded with the change, off by default) once per ``seq`` it has
not acted on yet -- this module only records the request. The alert is published after the
change, so a crash between them loses the alert, never the change (the ledger still has it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import redis
from redis.client import Pipeline

from shared.bus import publish
from shared.clock import Clock, LiveClock
from shared.keys import ALERTS, Keys
from shared.logging import get_logger
from shared.models import Alert, AlertSeverity, Side
from shared.redis.boundary import redis_errors
from shared.redis.client import reply_text, script
from shared.safety.limits import Refusal, Rule, is_reducing

__all__ = ["ENGAGE_SCRIPT", "LEDGER", "Change", "KillSwitch", "TradingState", "TradingStatus"]

log = get_logger(module="trading_state")
LEDGER = "trading-state"  # Keys.stream(LEDGER): every change, never trimmed


class TradingState(StrEnum):
    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"


_RANK = {TradingState.ACTIVE: 0, TradingState.REDUCING: 1, TradingState.HALTED: 2}

# KEYS[1] = the trading-state hash     keys.trading_state
# KEYS[2] = the trading-state ledger   keys.stream("trading-state")
# ARGV[1] = change id    ARGV[2] = new state     ARGV[3] = by     ARGV[4] = reason
# ARGV[5] = at (ISO, from the caller's Clock)    ARGV[6] = cancel_open_orders ("1"/"0")
# ARGV[7] = flatten_positions ("1"/"0")          ARGV[8] = escalate_only ("1"/"0")
# ARGV[9] = rank of the new state; ARGV[10..] = state, rank pairs for every known state
# returns {"ok", seq, previous state, ledger entry id} when recorded; {"dup", seq, state, ""} when
#         this change id is the last change (a retry); {"kept", seq, state, ""} when escalate_only
#         and the new state is lower than the current one (nothing written)
ENGAGE_SCRIPT = """
local current = redis.call('hget', KEYS[1], 'state') or 'ACTIVE'
local seq = tonumber(redis.call('hget', KEYS[1], 'seq') or '0')
if redis.call('hget', KEYS[1], 'change_id') == ARGV[1] then
    return {'dup', seq, current, ''}
end
if ARGV[8] == '1' then
    local rank = 0
    for i = 10, #ARGV, 2 do
        if ARGV[i] == current then rank = tonumber(ARGV[i + 1]) end
    end
    if tonumber(ARGV[9]) < rank then
        return {'kept', seq, current, ''}
    end
end
seq = seq + 1
redis.call('hset', KEYS[1], 'state', ARGV[2], 'by', ARGV[3], 'reason', ARGV[4], 'at', ARGV[5],
           'seq', seq, 'change_id', ARGV[1], 'previous', current,
           'cancel_open_orders', ARGV[6], 'flatten_positions', ARGV[7])
local entry = redis.call('xadd', KEYS[2], '*', 'seq', seq, 'state', ARGV[2], 'previous', current,
                         'by', ARGV[3], 'reason', ARGV[4], 'at', ARGV[5], 'change_id', ARGV[1],
                         'cancel_open_orders', ARGV[6], 'flatten_positions', ARGV[7])
return {'ok', seq, current, entry}
"""

@dataclass(frozen=True)
class TradingStatus:
    """The trading state as last recorded, with who set it, why and when."""

    state: TradingState
    by: str = ""
    reason: str = ""
    at: datetime | None = None
    seq: int = 0
    previous: TradingState | None = None
    cancel_open_orders: bool = False
    flatten_positions: bool = False

    def refusal(self, side: Side, position_qty: Decimal, quantity: Decimal | None = None) -> Refusal | None:
        """Why this state refuses an order of ``side`` against a position of ``position_qty`` (signed),
        or None: REDUCING lets through only an order that reduces the position (not past zero
        when ``quantity`` is given); HALTED lets through nothing."""
        if self.state is TradingState.HALTED:
            return Refusal(Rule.TRADING_HALTED, f"trading is HALTED by {self.by or '?'}: {self.reason}")
        if self.state is TradingState.REDUCING and not is_reducing(side, position_qty, quantity):
            return Refusal(Rule.TRADING_REDUCING,
                           f"trading is REDUCING (by {self.by or '?'}: {self.reason}); "
                           f"a {side} against a position of {position_qty} does not reduce it")
        return None

    def allows(self, side: Side, position_qty: Decimal, quantity: Decimal | None = None) -> bool:
        """True if an order of ``side`` against ``position_qty`` may go in this state."""
        return self.refusal(side, position_qty, quantity) is None


@dataclass(frozen=True)
class Change:
    """What :meth:`KillSwitch.engage` did: ``outcome`` is "ok", "dup" or "kept"."""

    outcome: str
    seq: int
    previous: TradingState
    state: TradingState
    entry_id: str


class KillSwitch:
    """Reads and changes the trading state of one Bastion installation (one key prefix)."""

    def __init__(self, client: redis.Redis, keys: Keys, clock: Clock | None = None) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock or LiveClock()

    def engage(self, state: TradingState | str, by: str, reason: str, *, cancel_open_orders: bool = False,
               flatten_positions: bool = False, escalate_only: bool = False,
               change_id: str | None = None) -> Change:
        """Set the trading state, recording who, why and when in the ledger; alert on ALERTS.

        ``cancel_open_orders``/``flatten_positions`` record a request for the executor (refused
        with ACTIVE). With ``escalate_only`` a lower state than the current one is not applied
        ("kept"). Pass the same ``change_id`` to retry a call whose outcome is unknown.
        """
        state = TradingState(state)
        if not by or not reason:
            raise ValueError("engage needs who (by) and why (reason)")
        if state is TradingState.ACTIVE and (cancel_open_orders or flatten_positions):
            raise ValueError("cancel_open_orders/flatten_positions only make sense when REDUCING or HALTED")
        change_id = change_id or uuid.uuid4().hex
        at = self.clock.now()
        ranks = [str(part) for name, rank in _RANK.items() for part in (name.value, rank)]
        args = [change_id, state.value, by, reason, at.isoformat(), _flag(cancel_open_orders),
                _flag(flatten_positions), _flag(escalate_only), str(_RANK[state]), *ranks]
        run = script(self.client, ENGAGE_SCRIPT)
        with redis_errors("trading state"):
            reply = run(keys=[self.keys.trading_state, self.keys.stream(LEDGER)], args=args,
                        client=self.client)
        outcome = reply_text(reply[0])
        previous = TradingState(reply_text(reply[2]))
        change = Change(outcome, int(reply[1]), previous, state if outcome != "kept" else previous,
                        reply_text(reply[3]))
        log.warning("trading_state.engage", outcome=outcome, state=state.value, previous=previous.value,
                    by=by, reason=reason, seq=change.seq, cancel_open_orders=cancel_open_orders,
                    flatten_positions=flatten_positions)
        if outcome != "kept":
            self._alert(change, by, reason, at, cancel_open_orders, flatten_positions, change_id)
        return change

    def current(self) -> TradingStatus:
        """The state as Redis has it now (ACTIVE if never set)."""
        with redis_errors("trading state"):
            return self.status_from(self.client.hgetall(self.keys.trading_state))

    def queue_current(self, pipe: Pipeline) -> None:
        """Queue on ``pipe`` the read :meth:`status_from` parses (for a caller batching reads)."""
        pipe.hgetall(self.keys.trading_state)

    @staticmethod
    def status_from(raw: Any) -> TradingStatus:
        """The status in a reply of the read :meth:`queue_current` queues."""
        fields = {reply_text(name): reply_text(value) for name, value in raw.items()}
        if "state" not in fields:
            return TradingStatus(TradingState.ACTIVE)
        at = fields.get("at")
        previous = fields.get("previous")
        return TradingStatus(
            state=TradingState(fields["state"]), by=fields.get("by", ""), reason=fields.get("reason", ""),
            at=datetime.fromisoformat(at) if at else None, seq=int(fields.get("seq", "0")),
            previous=TradingState(previous) if previous else None,
            cancel_open_orders=fields.get("cancel_open_orders") == "1",
            flatten_positions=fields.get("flatten_positions") == "1",
        )

    def allows(self, side: Side, position_qty: Decimal, quantity: Decimal | None = None) -> bool:
        """Whether the current state lets an order of ``side`` through against ``position_qty``."""
        return self.current().allows(side, position_qty, quantity)

    def refusal(self, side: Side, position_qty: Decimal, quantity: Decimal | None = None) -> Refusal | None:
        """Why the current state refuses the order, or None."""
        return self.current().refusal(side, position_qty, quantity)

    def history(self, count: int = 20) -> list[dict[str, str]]:
        """The newest ``count`` ledger entries, newest first (``bastion status``)."""
        with redis_errors("trading state"):
            entries: Any = self.client.xrevrange(self.keys.stream(LEDGER), count=count)
        return [{"id": reply_text(entry_id), **{reply_text(k): reply_text(v) for k, v in fields.items()}}
                for entry_id, fields in entries]

    def _alert(self, change: Change, by: str, reason: str, at: datetime, cancel: bool, flatten: bool,
               change_id: str) -> None:
        severity = {TradingState.HALTED: AlertSeverity.CRITICAL, TradingState.REDUCING: AlertSeverity.WARNING,
                    TradingState.ACTIVE: AlertSeverity.INFO}[change.state]
        alert = Alert(id=change_id, time=at, severity=severity, source=by, kind="trading_state",
                      text=f"trading state {change.previous} -> {change.state} by {by}: {reason}",
                      details={"state": change.state.value, "previous": change.previous.value,
                               "seq": str(change.seq), "cancel_open_orders": _flag(cancel),
                               "flatten_positions": _flag(flatten)})
        with redis_errors("trading state"):
            publish(self.client, self.keys, ALERTS, alert)



def _flag(value: bool) -> str:
    return "1" if value else "0"
