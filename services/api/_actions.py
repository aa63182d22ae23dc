"""What the POST routes do, through the calls the ``bastion`` command makes.

* kill switch on/off, and flatten: :class:`~shared.safety.trading_state.KillSwitch` ``engage``, as
  ``bastion kill-switch on|off [--cancel-orders] [--flatten]`` does; ``by`` is ``api:<role>``.
* a manual order: :func:`services.cli.commands.order.manual_intent`, ``send`` and ``decision``,
  the path of ``bastion order``: risk decides it like any intent.
* cancel one order: :func:`shared.safety.protective_stops.cancel_on_purpose` (the record is marked
  with who cancelled it and why, then the broker is asked by client_order_id), as risk cancels; the
  executor books the cancel when the broker reports it. A protective stop is refused here: the
  executor would not replace a stop cancelled on purpose, leaving its position uncovered (flatten
  closes the position and its stops together).

Each function is blocking, run by the routes in a worker thread, and takes the request body
validated by its model (unknown fields are an error).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from services.api._auth import Role
from services.api._desk import ApiError, Desk
from services.cli.commands.order import decision, manual_intent, send
from shared.errors import BrokerError, ConfigError, OrderNotFound, OrderRejected, Unavailable
from shared.models import Order, OrderStatus, Side
from shared.redis.client import reply_text
from shared.safety.protective_stops import cancel_on_purpose
from shared.safety.trading_state import KillSwitch, TradingState

__all__ = ["CancelRequest", "FlattenRequest", "KillSwitchRequest", "OrderRequest", "cancel", "flatten",
           "kill_switch", "place_order"]

MAX_WAIT_S = 30.0  # the longest a manual order request waits for risk's decision


class _Action(BaseModel):
    """Every action says why (recorded with it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field(min_length=1, max_length=500)

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("reason must not be blank")
        return value.strip()


class KillSwitchRequest(_Action):
    """Engage (``state``, HALTED by default, with the executor's requests) or release."""

    engaged: StrictBool
    state: Literal["HALTED", "REDUCING"] = "HALTED"
    cancel_orders: StrictBool = False
    flatten: StrictBool = False

    @model_validator(mode="after")
    def _requests_need_engaged(self) -> KillSwitchRequest:
        if not self.engaged and (self.cancel_orders or self.flatten):
            raise ValueError("cancel_orders and flatten need engaged: true")
        return self


class FlattenRequest(_Action):
    """Close every position: the kill switch engaged with ``flatten`` (``kill-switch on --flatten``)."""

    state: Literal["HALTED", "REDUCING"] = "HALTED"
    cancel_orders: StrictBool = False


class OrderRequest(_Action):
    """A manual order (``bastion order``): checked again as an :class:`~shared.models.Intent`."""

    side: Side
    symbol: str
    quantity: Decimal
    limit_price: Decimal | None = None
    override_locks: str | None = None
    wait_s: float = Field(default=0.0, ge=0, le=MAX_WAIT_S, allow_inf_nan=False)

    @field_validator("symbol")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()  # as the CLI takes it


class CancelRequest(_Action):
    """Cancel one order."""


def kill_switch(desk: Desk, role: Role, body: KillSwitchRequest) -> dict[str, Any]:
    """Set the trading state; reply with the change."""
    state = TradingState(body.state) if body.engaged else TradingState.ACTIVE
    return _engage(desk, role, body.reason, state, cancel=body.cancel_orders, flatten=body.flatten)


def flatten(desk: Desk, role: Role, body: FlattenRequest) -> dict[str, Any]:
    """Engage the kill switch asking the executor to close every position."""
    return _engage(desk, role, body.reason, TradingState(body.state), cancel=body.cancel_orders, flatten=True)


def _engage(desk: Desk, role: Role, reason: str, state: TradingState, *, cancel: bool,
            flatten: bool) -> dict[str, Any]:
    by = f"api:{role}"
    change = KillSwitch(desk.redis, desk.keys, desk.clock).engage(
        state, by, reason, cancel_open_orders=cancel, flatten_positions=flatten)
    return {"outcome": change.outcome, "seq": change.seq, "previous": change.previous.value,
            "state": change.state.value, "by": by, "cancel_orders": cancel, "flatten": flatten}


def place_order(desk: Desk, role: Role, body: OrderRequest) -> tuple[int, dict[str, Any]]:
    """Send a manual intent to risk and wait up to ``wait_s`` for its decision: (HTTP status, reply)."""
    try:
        intent = manual_intent(desk.clock, body.side, body.symbol, body.quantity, limit=body.limit_price,
                               override_locks=body.override_locks, reason=f"api:{role}: {body.reason}")
    except ValidationError as exc:
        raise ApiError.invalid(exc) from exc
    cursors = send(desk.redis, desk.keys, intent)
    found = decision(desk.redis, cursors, intent.id, body.wait_s, desk.clock) if body.wait_s else None
    if found is None:
        return 202, {"intent_id": intent.id, "decision": "pending"}
    if isinstance(found, Order):
        return 200, {"intent_id": intent.id, "decision": "approved", "client_order_id": found.client_order_id,
                     "quantity": str(found.quantity)}
    return 200, {"intent_id": intent.id, "decision": "refused", "reason": found.reason}


def cancel(desk: Desk, role: Role, client_order_id: str, body: CancelRequest) -> dict[str, Any]:
    """Ask the broker to cancel an open order of ours; the executor books it when the broker reports it."""
    raw: Any = desk.redis.hgetall(desk.keys.order(client_order_id))
    record = {reply_text(k): reply_text(v) for k, v in raw.items()}
    if not record:
        raise ApiError(404, f"no order {client_order_id!r}")
    status = OrderStatus(record["status"])
    if status.is_terminal:
        raise ApiError(409, f"order {client_order_id} is already {status.value}")
    if record.get("protects"):
        raise ApiError(409, f"order {client_order_id} is the protective stop of {record['protects']}: "
                            "flatten closes a position with its stops")
    try:
        broker = desk.broker()
        cancel_on_purpose(desk.redis, desk.keys, client_order_id, f"api:{role}: {body.reason}", broker.cancel)
    except ConfigError as exc:
        raise ApiError(503, f"no broker to ask: {exc}") from exc
    except OrderNotFound as exc:
        raise ApiError(409, f"the broker does not show order {client_order_id} (yet): {exc}") from exc
    except OrderRejected as exc:
        raise ApiError(409, f"the broker refused to cancel order {client_order_id}: {exc}") from exc
    except BrokerError as exc:  # away for now (503: try again), or an answer we cannot use (502)
        away = isinstance(exc, Unavailable)
        raise ApiError(503 if away else 502, f"broker {'unavailable' if away else 'error'}, order "
                                             f"{client_order_id} not cancelled: {exc}") from exc
    return {"client_order_id": client_order_id, "cancel_requested": True, "status": status.value}
