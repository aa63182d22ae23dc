"""Tests for shared.locks: fencing tokens, typed timeouts, owner-only release, extend."""

from __future__ import annotations

import pytest
import redis

from shared.clock import SimulatedClock
from shared.errors import LockError, LockNotOwned, LockTimeout, RedisUnavailable
from shared.keys import Keys
from shared.locks import FencedLock, LockedRead
from tests.support.processes import free_port


def make(client: redis.Redis, keys: Keys, resource: str = "r", **kwargs: object) -> FencedLock:
    options: dict[str, object] = {"lease_ms": 5000, "wait_ms": 200, "clock": SimulatedClock()}
    options.update(kwargs)
    return FencedLock(client, keys, resource, **options)  # type: ignore[arg-type]


class TestFencedLock:
    def test_every_acquire_gets_a_larger_fencing_token(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Each successive holder of one resource gets a strictly larger token (the INCR counter)."""
        tokens = []
        for _ in range(3):
            with make(redis_client, keys) as lock:
                assert lock.fencing_token is not None
                tokens.append(lock.fencing_token)
        assert tokens == sorted(tokens) and len(set(tokens)) == 3
        assert int(redis_client.get(keys.fence("r"))) == tokens[-1]

    def test_second_acquirer_times_out_with_typed_error_and_no_token(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """While one holder has the lock, another waits out its deadline: LockTimeout, and no token burnt."""
        clock = SimulatedClock()
        with make(redis_client, keys) as first:
            second = make(redis_client, keys, clock=clock, wait_ms=300)
            with pytest.raises(LockTimeout) as caught:
                second.acquire()
            assert caught.value.name == "r"
            assert clock.monotonic() >= 0.3
            assert int(redis_client.get(keys.fence("r"))) == first.fencing_token

    def test_non_blocking_attempt_fails_at_once(self, redis_client: redis.Redis, keys: Keys) -> None:
        """``blocking=False`` makes one attempt and raises LockTimeout without sleeping."""
        clock = SimulatedClock()
        with make(redis_client, keys), pytest.raises(LockTimeout):
            make(redis_client, keys, clock=clock).acquire(blocking=False)
        assert clock.monotonic() == 0

    def test_released_on_exception(self, redis_client: redis.Redis, keys: Keys) -> None:
        """An exception inside the block propagates and the lock key is deleted."""
        with pytest.raises(RuntimeError), make(redis_client, keys):
            assert redis_client.exists(keys.lock("r"))
            raise RuntimeError("boom")
        assert not redis_client.exists(keys.lock("r"))

    def test_release_after_lease_lost_raises_lock_not_owned(self, redis_client: redis.Redis,
                                                            keys: Keys) -> None:
        """A holder whose lease expired and was taken over cannot release the new holder's lock."""
        lock = make(redis_client, keys)
        lock.acquire()
        redis_client.delete(keys.lock("r"))  # what the lease expiring does
        other = make(redis_client, keys)
        other_token = other.acquire()
        with pytest.raises(LockNotOwned):
            lock.release()
        assert redis_client.exists(keys.lock("r"))
        assert other.fencing_token == other_token
        other.release()

    def test_extend_prolongs_the_lease_and_fails_once_lost(self, redis_client: redis.Redis,
                                                           keys: Keys) -> None:
        """extend() adds to the lease while held, and raises LockNotOwned after the lease is gone."""
        lock = make(redis_client, keys, lease_ms=1000)
        lock.acquire()
        lock.extend(10)
        assert redis_client.pttl(keys.lock("r")) > 5000
        redis_client.delete(keys.lock("r"))
        with pytest.raises(LockNotOwned):
            lock.extend(1)

    def test_not_reentrant(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Acquiring a FencedLock object that is already held is refused rather than deadlocking."""
        with make(redis_client, keys) as lock, pytest.raises(LockError):
            lock.acquire()

    def test_reads_run_after_the_lock_is_taken(self, redis_client: redis.Redis, keys: Keys) -> None:
        """The Lua of ``reads`` runs in the acquire script after the SET NX, so it sees the lock held."""
        lock = make(redis_client, keys)
        lock.acquire(reads=LockedRead("return redis.call('get', KEYS[1]) .. ARGV[1]", [keys.lock("r")],
                                      ["!"]))
        assert lock.reads == lock.owner_token + b"!"
        lock.release()

    def test_a_queued_attempt_takes_a_free_lock_and_reads_either_way(self, redis_client: redis.Redis,
                                                                     keys: Keys) -> None:
        """An attempt queued on a caller's pipeline takes a free lock (its read sees it held) and,
        on a busy one, takes nothing, burns no token, and still returns its read."""
        read = LockedRead("return redis.call('get', KEYS[1]) or 'free'", [keys.lock("r")])
        first = make(redis_client, keys)
        with redis_client.pipeline(transaction=False) as pipe:
            first.queue_try(pipe, read)
            [reply] = pipe.execute()
        assert first.tried_from(reply) and first.reads == first.owner_token
        assert first.fencing_token == int(redis_client.get(keys.fence("r")))
        second = make(redis_client, keys)
        with redis_client.pipeline(transaction=False) as pipe:
            second.queue_try(pipe, read)
            [reply] = pipe.execute()
        assert not second.tried_from(reply)
        assert second.reads == first.owner_token and second.fencing_token is None
        assert int(redis_client.get(keys.fence("r"))) == first.fencing_token
        first.release()
        assert not redis_client.exists(keys.lock("r"))

    def test_a_queued_release_frees_the_lock_and_only_its_own(self, redis_client: redis.Redis,
                                                              keys: Keys) -> None:
        """A release queued on a caller's pipeline frees the lock (the holder forgets its token at
        once); one queued after the lease was lost leaves the new holder's lock and says so."""
        lock = make(redis_client, keys)
        lock.acquire()
        with redis_client.pipeline(transaction=False) as pipe:
            lock.queue_release(pipe)
            assert lock.fencing_token is None and lock.owner_token is None
            [reply] = pipe.execute()
        lock.released_from(reply)
        assert not redis_client.exists(keys.lock("r"))
        with pytest.raises(LockError, match="not held"):
            lock.queue_release(redis_client.pipeline())
        lock.acquire()
        redis_client.delete(keys.lock("r"))  # what the lease expiring does
        other = make(redis_client, keys)
        other.acquire()
        with redis_client.pipeline(transaction=False) as pipe:
            lock.queue_release(pipe)
            [reply] = pipe.execute()
        with pytest.raises(LockNotOwned):
            lock.released_from(reply)
        assert redis_client.get(keys.lock("r")) == other.owner_token
        other.release()

    def test_store_released_lock_is_forgotten(self, redis_client: redis.Redis, keys: Keys) -> None:
        """After a store's script deleted the key by owner token, the holder no longer claims the lock."""
        lock = make(redis_client, keys)
        lock.acquire()
        assert redis_client.get(keys.lock("r")) == lock.owner_token
        redis_client.delete(keys.lock("r"))
        lock.released_by_store()
        assert lock.owner_token is None and lock.fencing_token is None
        with pytest.raises(LockError):
            lock.release()

    def test_redis_down_is_translated(self, keys: Keys) -> None:
        """A refused connection surfaces as RedisUnavailable, not a redis-py error."""
        client = redis.Redis(port=free_port(), socket_connect_timeout=1)
        with pytest.raises(RedisUnavailable):
            make(client, keys).acquire()
