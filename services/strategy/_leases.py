"""Partition leases: which strategy worker serves which bar partition.

Partition ``n`` is served by whoever holds ``<prefix>:lease:strategy:<n>``: a key set with
``SET NX PX lease_ms`` to the worker's instance id, renewed every ``lease_ms/3`` by a script
that extends it only if it is still the owner, and deleted (by its owner only) on a clean stop
or when rebalancing. Each worker aims for a fair share, ``ceil(partitions / live workers)``,
counting live workers from heartbeats: it releases partitions above its share and takes free
ones below it. A dead worker's leases expire after ``lease_ms`` and are taken by the others on
their next upkeep (once its heartbeat has expired, their share grows to cover them).

A lease is not a lock on the effects by itself: between a lease expiring and its holder
noticing, the holder may still be computing. The worker therefore WATCHes the lease key and
checks the owner inside the transaction that writes state (see ``_worker``)::

    time 0    worker A holds lease 3, reads a batch of partition 3
    time 0.1  A stalls (GC pause, SIGSTOP, a slow network)
    time 5    the lease expires; time 5.4 worker B's upkeep takes it (SET NX)
    time 5.5  B re-reads partition 3's pending entries and applies them
    time 9    A wakes and runs EXEC: the WATCHed lease changed, EXEC fails, A writes nothing,
              finds the lease is B's and drops partition 3
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import redis

from shared.keys import Keys
from shared.logging import get_logger
from shared.redis.boundary import redis_errors

__all__ = ["PartitionLeases", "lease_resource"]

log = get_logger(component="strategy")

# KEYS[1] = a lease key
# ARGV[1] = the caller's instance id; ARGV[2] = the lease length in ms
# returns 1 if the caller still owned the lease (and it now lasts ARGV[2] ms more), else 0
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS[1] = a lease key
# ARGV[1] = the caller's instance id
# returns 1 if the caller owned the lease and it was deleted, else 0 (someone else's: untouched)
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_resource(partition: int) -> str:
    """The lease resource name of a bar partition (for :meth:`Keys.lease`)."""
    return f"strategy:{partition}"


class PartitionLeases:
    """The partitions one worker holds, and the upkeep that keeps its fair share of them."""

    def __init__(self, client: redis.Redis, keys: Keys, owner: str, partitions: int, lease_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.owner = owner
        self.partitions = partitions
        self.lease_ms = lease_ms
        self.held: list[int] = []  # in the order acquired
        self._release = client.register_script(RELEASE_SCRIPT)
        # start the search for free partitions at a point that differs between workers
        self._offset = zlib.crc32(owner.encode()) % partitions

    def key(self, partition: int) -> str:
        """The lease key of ``partition``."""
        return self.keys.lease(lease_resource(partition))

    def share(self, live_workers: int) -> int:
        """How many partitions one of ``live_workers`` workers should hold."""
        return math.ceil(self.partitions / max(1, live_workers))

    def upkeep(self, live_workers: int) -> tuple[list[int], list[int]]:
        """Renew what is held, then release or acquire to reach the fair share.

        Returns (gained, lost) partitions; released partitions count as lost.
        """
        with redis_errors("lease upkeep"):
            with self.client.pipeline(transaction=False) as pipe:  # every renewal in one round trip
                for partition in self.held:
                    pipe.eval(RENEW_SCRIPT, 1, self.key(partition), self.owner, self.lease_ms)
                renewed = pipe.execute()
            lost = [n for n, ok in zip(self.held, renewed, strict=True) if not ok]
            self.held = [n for n in self.held if n not in lost]
            share = self.share(live_workers)
            while len(self.held) > share:
                partition = self.held[-1]
                self.release([partition])
                lost.append(partition)
            gained: list[int] = []
            for step in range(self.partitions):
                if len(self.held) >= share:
                    break
                partition = (self._offset + step) % self.partitions
                if partition in self.held:
                    continue
                if self.client.set(self.key(partition), self.owner, nx=True, px=self.lease_ms):
                    self.held.append(partition)
                    gained.append(partition)
        if gained or lost:
            log.info("strategy.leases_changed", gained=gained, lost=lost, held=sorted(self.held), share=share,
                     live_workers=live_workers)
        return gained, lost

    def drop(self, partition: int) -> None:
        """Forget ``partition`` without touching Redis (its lease is no longer ours)."""
        if partition in self.held:
            self.held.remove(partition)
            log.warning("strategy.lease_lost", partition=partition)

    def release(self, partitions: Iterable[int]) -> None:
        """Give up ``partitions`` (only deletes leases still ours)."""
        for partition in list(partitions):
            if partition in self.held:
                self.held.remove(partition)
            self._release(keys=[self.key(partition)], args=[self.owner])

    def release_all(self) -> None:
        """Give up every held partition (a clean stop)."""
        self.release(list(self.held))
