"""Tests for shared.portfolio.locks: fencing tokens, typed timeouts, owner-only release, extend, and the lock
protocol between two holders in one process (each bounded by a short timeout, so a broken protocol
fails in seconds with a message saying what broke, not in a multi-process test's timeout)."""

from __future__ import annotations

import itertools
import threading
from decimal import Decimal
from typing import Any

import fakeredis
import pytest
import redis

from shared.clock import LiveClock, SimulatedClock
from shared.config import LockSettings, PortfolioSettings
from shared.errors import LockError, LockNotOwned, LockTimeout, RedisUnavailable, StaleFencingToken
from shared.keys import Keys
from shared.portfolio import Portfolio, lock_resource, verify
from shared.portfolio.locks import FencedLock, LockedRead
from tests.support.portfolio import StallsBeforeWriting
from tests.support.processes import free_port, wait_for


def fence(client: redis.Redis, keys: Keys, resource: str = "r") -> int:
    """The resource's fencing counter (0 before its first acquire)."""
    return int(client.get(keys.fence(resource)) or 0)


def make(client: redis.Redis, keys: Keys, resource: str = "r", **kwargs: object) -> FencedLock:
    options: dict[str, object] = {"lease_ms": 5000, "wait_ms": 200, "clock": SimulatedClock()}
    options.update(kwargs)
    return FencedLock(client, keys, resource, **options)  # type: ignore[arg-type]


class _Refusing(fakeredis.FakeRedis):
    """A client every script call of which the store answers with the error reply ``reply``."""

    reply = ""

    def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        raise redis.ResponseError(self.reply)


class _RecordingClock(SimulatedClock):
    """A simulated clock that records how long each sleep was."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


class _RefusedRelease(FencedLock):
    """A FencedLock whose release the store answers with the error reply ``reply``."""

    reply = ""

    def do_release(self, expected_token: str) -> None:
        raise redis.ResponseError(self.reply)


class TestFencedLock:
    def test_every_acquire_gets_a_larger_fencing_token(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Each successive holder of one resource gets a strictly larger token (the INCR counter)."""
        tokens = []
        for _ in range(3):
            with make(redis_client, keys) as lock:
                assert lock.fencing_token is not None
                tokens.append(lock.fencing_token)
        assert tokens == sorted(tokens) and len(set(tokens)) == 3
        assert fence(redis_client, keys) == tokens[-1]

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
            assert fence(redis_client, keys) == first.fencing_token

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

    def test_a_clean_block_whose_lease_was_lost_raises_on_exit(self, redis_client: redis.Redis,
                                                                keys: Keys) -> None:
        """Leaving a block that raised nothing after the lease was lost raises LockNotOwned; a block
        that raised keeps its own exception."""
        with pytest.raises(LockNotOwned), make(redis_client, keys):
            redis_client.delete(keys.lock("r"))  # what the lease expiring does
        with pytest.raises(RuntimeError, match="boom"), make(redis_client, keys):
            redis_client.delete(keys.lock("r"))
            raise RuntimeError("boom")

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
        with make(redis_client, keys) as lock, pytest.raises(LockError, match="re-entrant"):
            lock.acquire()

    def test_the_owner_token_given_is_the_one_stored(self, redis_client: redis.Redis, keys: Keys) -> None:
        """acquire(token=...) stores that owner token under the lock key (redis-py's contract)."""
        lock = make(redis_client, keys)
        lock.acquire(token="mine")
        assert lock.owner_token == b"mine" == redis_client.get(keys.lock("r"))
        lock.release()

    def test_redis_pys_single_attempt_hook_takes_a_token_only_from_a_free_lock(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """do_acquire (redis-py's one-attempt hook) is True on a free lock, spending the first token,
        and False on a held one."""
        assert make(redis_client, keys).do_acquire(b"first") is True and fence(redis_client, keys) == 1
        assert make(redis_client, keys).do_acquire(b"second") is False
        assert redis_client.get(keys.lock("r")) == b"first"

    def test_waits_back_off_exponentially_with_jitter_up_to_the_cap(self, redis_client: redis.Redis,
                                                                     keys: Keys) -> None:
        """Between attempts on a held lock the waits double from backoff_ms[0] to the cap backoff_ms[1],
        each within +-50% jitter, and the last is cut to the deadline."""
        clock = _RecordingClock()
        with make(redis_client, keys), pytest.raises(LockTimeout):
            make(redis_client, keys, clock=clock, wait_ms=100, backoff_ms=(0.5, 20.0)).acquire()
        assert len(clock.sleeps) >= 8
        for k, slept in enumerate(clock.sleeps[:-1]):
            base = min(0.5 * 2 ** k, 20.0) / 1000
            assert 0.5 * base <= slept <= 1.5 * base, f"wait {k}: {slept * 1000:g} ms, base {base * 1000:g}"
        assert clock.monotonic() == pytest.approx(0.1)

    def test_a_queued_release_answered_with_an_error_is_a_lock_error(self, redis_client: redis.Redis,
                                                                     keys: Keys) -> None:
        """An error reply to a queued release is a LockError (not a crash reading it as a count)."""
        with pytest.raises(LockError, match="release failed"):
            make(redis_client, keys).released_from(redis.ResponseError("ERR boom"))

    @pytest.mark.parametrize(("reply", "raised"), [
        ("MISCONF Errors writing to the AOF file: No space left on device", RedisUnavailable),
        ("READONLY You can't write against a read only replica.", RedisUnavailable),
        ("ERR something else", LockError)])
    def test_an_acquire_the_store_refuses_is_translated(self, keys: Keys, reply: str,
                                                        raised: type[Exception]) -> None:
        """An acquire refused because Redis refuses writes is RedisUnavailable (wait and retry); any
        other error reply is a LockError."""
        client = _Refusing(server=fakeredis.FakeServer(version=(7, 4)))
        client.reply = reply
        with pytest.raises(raised) as caught:
            make(client, keys).acquire()
        assert type(caught.value) is raised

    def test_reads_run_after_the_lock_is_taken(self, redis_client: redis.Redis, keys: Keys) -> None:
        """The Lua of ``reads`` runs in the acquire script after the SET NX, so it sees the lock held."""
        lock = make(redis_client, keys)
        lock.acquire(reads=LockedRead("return redis.call('get', KEYS[1]) .. ARGV[1]", [keys.lock("r")],
                                      ["!"]))
        assert lock.owner_token is not None and lock.reads == lock.owner_token + b"!"
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
        assert first.fencing_token == fence(redis_client, keys)
        second = make(redis_client, keys)
        with redis_client.pipeline(transaction=False) as pipe:
            second.queue_try(pipe, read)
            [reply] = pipe.execute()
        assert not second.tried_from(reply)
        assert second.reads == first.owner_token and second.fencing_token is None
        assert fence(redis_client, keys) == first.fencing_token
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

    @pytest.mark.parametrize(("reply", "raised"), [
        ("MISCONF Errors writing to the AOF file: No space left on device", RedisUnavailable),
        ("ERR something else", LockError)])
    def test_a_release_the_store_refuses_is_translated(self, redis_client: redis.Redis, keys: Keys,
                                                       reply: str, raised: type[Exception]) -> None:
        """A release refused because Redis refuses writes is RedisUnavailable (the lease expires it);
        any other error reply is a LockError."""
        lock = _RefusedRelease(redis_client, keys, "r", lease_ms=5000, wait_ms=0, clock=SimulatedClock())
        lock.reply = reply
        lock.acquire()
        with pytest.raises(raised) as caught:
            lock.release()
        assert type(caught.value) is raised

    def test_redis_down_is_translated(self, keys: Keys) -> None:
        """A refused connection surfaces as RedisUnavailable, not a redis-py error."""
        client = redis.Redis(port=free_port(), socket_connect_timeout=1)
        with pytest.raises(RedisUnavailable):
            make(client, keys).acquire()


def _holds(client: redis.Redis, keys: Keys, lock: FencedLock, resource: str = "r") -> bool:
    return client.get(keys.lock(resource)) == lock.owner_token


def _expired(client: redis.Redis, keys: Keys, resource: str = "r") -> None:
    """Wait (at most 5 s) for a short lease to run out in Redis."""
    wait_for(lambda: not client.exists(keys.lock(resource)), timeout=5, interval=0.01,
             message=f"the lease on {resource!r} to expire")


class _CountingLock(FencedLock):
    """A FencedLock that records what each acquire attempt returned (0: the lock was held)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: list[int] = []

    def _attempt(self, owner: str | bytes, reads: LockedRead | None) -> int:
        fence = super()._attempt(owner, reads)
        self.attempts.append(fence)
        return fence


@pytest.mark.timeout(15)
class TestLockProtocol:
    def test_a_second_holder_cannot_take_a_held_lock(self, redis_client: redis.Redis, keys: Keys) -> None:
        """While A holds the lock, B's acquire times out (no token spent) and A still holds it."""
        first = make(redis_client, keys)
        token = first.acquire()
        second = make(redis_client, keys, wait_ms=50)
        try:
            stolen = second.acquire()
        except LockTimeout:
            pass
        else:
            pytest.fail(f"B took the lock (token {stolen}) while A held it (token {token}): "
                        "no mutual exclusion")
        assert _holds(redis_client, keys, first), "A lost the lock to B's failed attempt"
        assert fence(redis_client, keys) == token, "B's failed attempt spent a fencing token"
        first.release()

    def test_a_waiting_holder_gets_the_lock_only_after_it_is_released(self, redis_client: redis.Redis,
                                                                      keys: Keys) -> None:
        """B blocked in acquire keeps failing while A holds the lock, and gets it, with a larger token,
        once A releases it."""
        first = make(redis_client, keys)
        token = first.acquire()
        second = _CountingLock(redis_client, keys, "r", lease_ms=5000, wait_ms=5000, clock=LiveClock())
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(second.acquire()))
        waiter.start()
        wait_for(lambda: len(second.attempts) >= 3, timeout=5, interval=0.001,
                 message="B to try the held lock three times")
        assert not got and set(second.attempts) == {0}, "B got the lock while A held it"
        first.release()
        waiter.join(timeout=5)
        assert not waiter.is_alive(), "B did not get the lock within 5 s of A releasing it"
        assert got and got[0] > token, f"B's token {got} is not above A's {token}"
        second.release()

    def test_tokens_strictly_increase_across_holders_and_takeovers(self, redis_client: redis.Redis,
                                                                   keys: Keys) -> None:
        """Released, taken over after a lease expired, or taken again: each hold's token is larger
        than every earlier one, and equals the resource's fence counter."""
        a, b = make(redis_client, keys, lease_ms=100), make(redis_client, keys, lease_ms=100)
        tokens = [a.acquire()]
        a.release()
        tokens.append(b.acquire())
        _expired(redis_client, keys)
        tokens.append(a.acquire(blocking=False))
        assert fence(redis_client, keys) == tokens[-1]
        a.release()
        tokens.append(a.acquire(blocking=False))
        assert all(x < y for x, y in itertools.pairwise(tokens)), f"tokens {tokens}"
        a.release()

    def test_release_by_a_non_owner_is_refused(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Neither a lock object that never acquired, nor one holding someone else's owner token, nor
        a holder whose lease passed to another can delete the owner's lock."""
        owner = make(redis_client, keys)
        owner.acquire()
        with pytest.raises(LockError, match="not held"):
            make(redis_client, keys).release()
        forger = make(redis_client, keys)
        forger.local.token = b"not-the-owner"
        with pytest.raises(LockNotOwned):
            forger.release()
        assert _holds(redis_client, keys, owner), "a non-owner's release deleted the owner's lock"
        owner.release()
        stale = make(redis_client, keys, lease_ms=100)
        stale.acquire()
        _expired(redis_client, keys)
        taker = make(redis_client, keys)
        taker.acquire(blocking=False)
        with pytest.raises(LockNotOwned):
            stale.release()
        assert _holds(redis_client, keys, taker), "the stale holder's release deleted the new holder's lock"
        taker.release()

    def test_an_expired_lease_lets_another_take_it_with_a_larger_token(self, redis_client: redis.Redis,
                                                                        keys: Keys) -> None:
        """Once A's lease runs out, B takes the lock at once with a larger token; A no longer owns it
        and cannot extend it."""
        a = make(redis_client, keys, lease_ms=100)
        a_token = a.acquire()
        _expired(redis_client, keys)
        b = make(redis_client, keys)
        b_token = b.acquire(blocking=False)
        assert b_token > a_token
        assert not a.owned() and b.owned()
        with pytest.raises(LockNotOwned):
            a.extend(1)
        b.release()

    @pytest.mark.parametrize("b_wrote", [True, False], ids=["b-wrote", "b-holds"])
    def test_the_stale_holders_portfolio_write_is_refused(self, redis_client: redis.Redis, keys: Keys,
                                                          b_wrote: bool) -> None:
        """A decides under token t, stalls past its lease, B takes the lock (token t+1; it writes, or
        only holds it): A's write is refused (StaleFencingToken) and changes nothing."""
        lease = LockSettings(lease_ms=100, wait_ms=2000)
        a = StallsBeforeWriting(redis_client, keys, "acct", settings=PortfolioSettings(account="acct"),
                    lock_settings=lease, clock=LiveClock())
        a.open(Decimal(1000))
        b = Portfolio(redis_client, keys, "acct", settings=PortfolioSettings(account="acct"),
                      lock_settings=LockSettings(lease_ms=5000, wait_ms=2000), clock=LiveClock())
        resource = lock_resource("acct")
        b_lock = FencedLock(redis_client, keys, resource, lease_ms=5000, wait_ms=0, clock=LiveClock())
        seen: dict[str, Any] = {}

        def stall_past_the_lease() -> None:
            _expired(redis_client, keys, resource)
            if b_wrote:
                b.reserve("b1", "MSFT", "buy", Decimal(1), Decimal(10))
            else:
                b_lock.acquire(blocking=False)
            seen["state"] = b.read()

        a.stall = stall_past_the_lease
        with pytest.raises(StaleFencingToken):
            a.reserve("a1", "AAPL", "buy", Decimal(1), Decimal(10))
        after = b.read()
        assert after == seen["state"], "the stale holder's refused write changed the account"
        assert "a1" not in after.reservations
        if not b_wrote:
            assert _holds(redis_client, keys, b_lock, resource), "the stale holder released B's lock"
            b_lock.release()
        assert verify(redis_client, keys, "acct", allow_short=False).ok
