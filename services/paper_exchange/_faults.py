"""Fault injection: a seeded plan of rules, each matching one endpoint, that the server consults.

A plan is JSON (``paper_exchange.faults``, or ``PUT /_paper/faults`` at run time)::

    {"seed": 7, "rules": [
        {"endpoint": "POST /v2/orders", "kind": "reply_timeout", "seconds": 5, "count": 1},
        {"endpoint": "GET /v2/orders:by_client_order_id", "kind": "rate_limit", "retry_after": 0.2},
        {"endpoint": "stream", "kind": "duplicate_updates", "probability": 0.5}
    ]}

``endpoint`` is ``"<METHOD> <route>"`` as the router names it (``GET /v2/orders/{order_id}``),
``"*"`` for every HTTP endpoint, ``"stream"`` for the trade updates sent on the websocket
(``duplicate_updates``, ``reorder_updates``; its connect is the HTTP endpoint ``"GET /stream"``)
or ``"fills"`` for the matcher (``partial_fills``); a kind its endpoint never draws is refused. A
rule fires with ``probability`` (drawn from one ``random.Random(seed)``, so a plan replays the
same way for the same sequence of requests) at most ``count`` times (unlimited when absent).

Kinds, and what a client sees:

==================  =============================================================================
latency             the request waits ``seconds`` before it is handled
reply_timeout       the request is handled, then the reply waits ``seconds`` (a client timeout)
drop_before         the connection is closed without handling the request
drop_after          the request is handled, then the connection is closed without a reply
rate_limit          429 with Retry-After and X-Ratelimit-* headers (``retry_after`` seconds)
status              an error reply with ``status`` (500, 503...) without handling the request
refuse              the listening socket closes for ``seconds``: new connections are refused
hide_new_orders     an order placed by this request is "not found" for its next ``lookups`` look-ups
stale_positions     GET /v2/positions answers the list as it was when the rule first fired
duplicate_updates   a trade update is sent twice
reorder_updates     a trade update is held back and sent after the next one (or after ``seconds``)
partial_fills       each fill takes at most ``fraction`` of the order's remaining quantity
==================  =============================================================================
"""

from __future__ import annotations

import json
import random
import threading
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["FaultPlan", "FaultRule", "Faults", "parse_plan"]

Kind = Literal[
    "latency", "reply_timeout", "drop_before", "drop_after", "rate_limit", "status", "refuse",
    "hide_new_orders", "stale_positions", "duplicate_updates", "reorder_updates", "partial_fills",
]


_ENDPOINT_KINDS: dict[str, frozenset[str]] = {
    "stream": frozenset({"duplicate_updates", "reorder_updates"}),
    "fills": frozenset({"partial_fills"}),
}
_HTTP_KINDS = frozenset(get_args(Kind)) - {"duplicate_updates", "reorder_updates", "partial_fills"}


class FaultRule(BaseModel):
    """One fault: where it applies, how often, and its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(min_length=1)
    kind: Kind
    probability: Annotated[float, Field(ge=0, le=1)] = 1.0
    count: Annotated[int, Field(ge=1)] | None = None
    seconds: Annotated[float, Field(ge=0)] = 0.0
    status: Annotated[int, Field(ge=400, le=599)] = 503
    retry_after: Annotated[float, Field(ge=0)] = 1.0
    lookups: Annotated[int, Field(ge=1)] = 1
    fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5

    @model_validator(mode="after")
    def _applies(self) -> FaultRule:
        """A kind its endpoint never draws is refused, not silently inert (``refuse`` on
        ``"stream"`` would never fire: the websocket's connect is ``"GET /stream"``)."""
        allowed = _ENDPOINT_KINDS.get(self.endpoint, _HTTP_KINDS)
        if self.kind not in allowed:
            raise ValueError(f"{self.kind!r} never fires on endpoint {self.endpoint!r} "
                             f"(it takes {', '.join(sorted(allowed))})")
        return self


class FaultPlan(BaseModel):
    """A seed and the rules it drives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    rules: list[FaultRule] = Field(default_factory=list)


def parse_plan(text: str | bytes | dict[str, Any]) -> FaultPlan:
    """Parse a JSON plan; raise ValueError with every problem."""
    if isinstance(text, str | bytes):
        if not text.strip():
            return FaultPlan()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"fault plan is not JSON: {exc}") from None
    else:
        data = text
    try:
        return FaultPlan.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise ValueError(f"bad fault plan: {problems}") from None


class Faults:
    """The active plan; :meth:`draw` says which rule (if any) fires for an endpoint now."""

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self._lock = threading.Lock()
        self.set(plan or FaultPlan())

    def set(self, plan: FaultPlan) -> None:
        """Replace the plan (and reseed)."""
        with self._lock:
            self.plan = plan
            self._random = random.Random(plan.seed)
            self._fired = [0] * len(plan.rules)
            self.stale_positions: list[dict[str, Any]] | None = None

    def draw(self, endpoint: str, kinds: frozenset[str] | None = None) -> list[FaultRule]:
        """The rules that fire for ``endpoint`` now (each counted as fired)."""
        fired = []
        with self._lock:
            for index, rule in enumerate(self.plan.rules):
                if rule.endpoint not in (endpoint, "*") or (rule.endpoint == "*" and endpoint == "stream"):
                    continue
                if kinds is not None and rule.kind not in kinds:
                    continue
                if rule.count is not None and self._fired[index] >= rule.count:
                    continue
                if rule.probability < 1 and self._random.random() >= rule.probability:
                    continue
                self._fired[index] += 1
                fired.append(rule)
        return fired

    def active(self, endpoint: str, kind: str) -> bool:
        """Whether a rule of ``kind`` for ``endpoint`` has firings left (without firing it)."""
        with self._lock:
            return any(rule.endpoint == endpoint and rule.kind == kind
                       and (rule.count is None or self._fired[i] < rule.count)
                       for i, rule in enumerate(self.plan.rules))
