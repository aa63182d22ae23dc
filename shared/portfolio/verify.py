"""Replaying an account's ledger to check it against the state in Redis."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from shared.errors import PortfolioError
from shared.keys import Keys
from shared.portfolio._state import State, apply_entry, dec, fmt, invariant_violations
from shared.portfolio.reads import read_ledger, read_state

__all__ = ["VerifyReport", "first_difference", "verify"]


@dataclass
class VerifyReport:
    """What :func:`verify` found: ``problems`` is empty when the ledger and the state agree."""

    entries: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(client: redis.Redis, keys: Keys, account: str, *, allow_short: bool) -> VerifyReport:
    """Replay ``account``'s ledger from zero, checking the invariants after every entry, and
    compare the result with the state in Redis. Stops at the first difference."""
    report = VerifyReport()
    replayed = State()
    controls = True  # until a fill was booked beyond its reservation (see invariant_violations)
    for entry in read_ledger(client, keys, account):
        report.entries += 1
        where = f"ledger entry {report.entries} ({entry['id']}, op={entry.get('op')})"
        try:
            outcome = apply_entry(replayed, entry, allow_short=allow_short)
        except (PortfolioError, ValueError, KeyError) as exc:
            report.problems.append(f"{where}: cannot be replayed: {exc}")
            return report
        replayed.version += 1
        replayed.fence = max(replayed.fence, int(entry.get("fence", "0")))
        recorded = (entry.get("v"), entry.get("cash_after"), entry.get("reserved_after"))
        if not outcome.changed or recorded[0] != str(replayed.version) or \
                dec(recorded[1]) != replayed.cash or dec(recorded[2]) != replayed.reserved:
            report.problems.append(f"{where}: recorded v={recorded[0]} cash={recorded[1]} reserved="
                                   f"{recorded[2]}, replay gives v={replayed.version} cash="
                                   f"{fmt(replayed.cash)} reserved={fmt(replayed.reserved)}")
            return report
        controls = controls and not entry.get("beyond")
        broken = invariant_violations(replayed, allow_short=allow_short, controls=controls)
        if broken:
            report.problems.append(f"{where}: invariant broken: {broken[0]}")
            return report
    current = read_state(client, keys, account, history=True)
    difference = first_difference(replayed, current)
    if difference:
        report.problems.append(f"replayed ledger != state in Redis: {difference}")
    else:
        broken = invariant_violations(current, allow_short=allow_short, controls=controls)
        if broken:
            report.problems.append(f"state in Redis: invariant broken: {broken[0]}")
    return report


def first_difference(replayed: State, current: State) -> str | None:
    """The first field where two states differ, as ``name: replay X, redis Y`` (None if equal)."""
    for name in ("opened", "cash", "reserved", "realized_pnl", "fees", "version", "fence"):
        a, b = getattr(replayed, name), getattr(current, name)
        if a != b:
            return f"{name}: replay {a}, redis {b}"
    for name in ("positions", "reservations", "closed", "fills"):
        a, b = getattr(replayed, name), getattr(current, name)
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{name}[{key}]: replay {a.get(key)}, redis {b.get(key)}"
    return None
