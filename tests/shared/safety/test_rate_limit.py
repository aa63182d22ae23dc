"""Tests for shared.safety.rate_limit: linked buckets, weights, waiting, the shared 429 pause (the
limit across 8 processes is tests/system/test_rate_limit_processes.py)."""

from __future__ import annotations

import pytest
import redis

from shared.clock import LiveClock, SimulatedClock
from shared.config import LimitSettings
from shared.errors import RateLimitTimeout
from shared.keys import Keys
from shared.safety.rate_limit import Denied, Grant, Limit, RateLimiter


def limiter(client: redis.Redis, keys: Keys, account: int = 3, period: float = 60.0,
            endpoints: dict[str, Limit] | None = None, clock: object | None = None) -> RateLimiter:
    return RateLimiter(client, keys, account=Limit(account, period), endpoints=endpoints,
                       clock=clock or SimulatedClock())  # type: ignore[arg-type]


class TestBuckets:
    def test_grants_up_to_the_limit_then_denies_with_the_wait(self, redis_client: redis.Redis,
                                                              keys: Keys) -> None:
        """Three grants of a 3-per-minute bucket, then a denial saying to wait under a minute."""
        rl = limiter(redis_client, keys)
        grants = [rl.try_acquire("account") for _ in range(3)]
        assert all(isinstance(g, Grant) for g in grants)
        denied = rl.try_acquire("account")
        assert isinstance(denied, Denied) and 0 < denied.retry_in <= 60

    def test_linked_endpoint_counts_against_both_and_a_denial_spends_nothing(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """orders (2/min) also spends the account's 3/min; a refused orders call takes from neither."""
        rl = limiter(redis_client, keys, endpoints={"orders": Limit(2, 60.0)})
        assert isinstance(rl.try_acquire("orders"), Grant)
        assert isinstance(rl.try_acquire("orders"), Grant)
        assert isinstance(rl.try_acquire("orders"), Denied)
        assert redis_client.zcard(rl.bucket_key("account")) == 2
        assert isinstance(rl.try_acquire("positions"), Grant)  # the account's third unit
        assert isinstance(rl.try_acquire("positions"), Denied)
        assert redis_client.zcard(rl.bucket_key("endpoint:orders")) == 2

    def test_weights_take_several_units_at_once(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Weight 3 of 5, then weight 3 is denied while weight 2 fits exactly."""
        rl = limiter(redis_client, keys, account=5)
        assert isinstance(rl.try_acquire("bars", weight=3), Grant)
        assert isinstance(rl.try_acquire("bars", weight=3), Denied)
        assert isinstance(rl.try_acquire("bars", weight=2), Grant)
        assert redis_client.zcard(rl.bucket_key("account")) == 5

    def test_a_queued_attempt_counts_like_one_and_a_refund_gives_it_back(self, redis_client: redis.Redis,
                                                                       keys: Keys) -> None:
        """An attempt queued on a pipeline takes units from every bucket; refunding it frees them all."""
        rl = limiter(redis_client, keys, account=2, endpoints={"orders": Limit(1, 60.0)})
        with redis_client.pipeline(transaction=False) as pipe:
            grant_id = rl.queue_try_acquire(pipe, "orders", weight=1)
            [reply] = pipe.execute()
        assert isinstance(rl.attempt_from(reply, "orders"), Grant)
        assert isinstance(rl.try_acquire("orders"), Denied)
        rl.refund("orders", grant_id)
        assert redis_client.zcard(rl.bucket_key("account")) == 0
        assert isinstance(rl.try_acquire("orders"), Grant)

    def test_weight_above_the_limit_can_never_be_granted(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A weight larger than a bucket's limit is a programming error, not a wait."""
        with pytest.raises(ValueError):
            limiter(redis_client, keys).try_acquire("x", weight=4)

    @pytest.mark.parametrize(("limit", "period"), [(0, 60.0), (-1, 60.0), (1, 0.0), (1, -1.0)])
    def test_a_limit_needs_a_unit_and_a_period(self, limit: int, period: float) -> None:
        """A limit of no unit or over no time is refused when it is made."""
        with pytest.raises(ValueError):
            Limit(limit, period)

    def test_a_bucket_outlives_its_period(self, redis_client: redis.Redis, keys: Keys) -> None:
        """After a grant of an hourly limit its bucket key lives at least the hour (plus a second's
        slack), so no grant is forgotten while it still counts."""
        rl = limiter(redis_client, keys, account=1, period=3600.0)
        rl.try_acquire("x")
        assert 3_600_000 <= redis_client.pttl(rl.bucket_key("account")) <= 3_601_000

    def test_default_settings_are_alpacas_200_per_minute(self, redis_client: redis.Redis, keys: Keys) -> None:
        """from_settings with defaults gives one account bucket of 200 per 60 s."""
        rl = RateLimiter.from_settings(redis_client, keys, LimitSettings(endpoint_rate_limits={"orders": 50}))
        assert rl.account == Limit(200, 60.0) and rl.endpoints == {"orders": Limit(50, 60.0)}


class TestAcquire:
    def test_timeout_raises_at_once_when_the_slot_is_beyond_it(self, redis_client: redis.Redis,
                                                               keys: Keys) -> None:
        """With the next slot a minute away and 5 s allowed, acquire raises without sleeping."""
        clock = SimulatedClock()
        rl = limiter(redis_client, keys, account=1, clock=clock)
        rl.acquire("x")
        with pytest.raises(RateLimitTimeout) as caught:
            rl.acquire("x", timeout=5)
        assert caught.value.endpoint == "x" and 55 < caught.value.retry_in <= 60
        assert clock.monotonic() == 0

    def test_acquire_waits_until_a_unit_frees_on_redis_time(self, redis_client: redis.Redis,
                                                            keys: Keys) -> None:
        """A 2-per-0.2 s bucket grants the third acquire no sooner than 0.2 s (Redis time) after the first."""
        rl = limiter(redis_client, keys, account=2, period=0.2, clock=LiveClock())
        grants = [rl.acquire("x", timeout=10) for _ in range(3)]
        assert grants[2].at_us - grants[0].at_us >= 200_000
        assert grants[1].at_us - grants[0].at_us < 200_000  # the burst went at once

    def test_pause_blocks_every_grant_until_it_ends(self, redis_client: redis.Redis, keys: Keys) -> None:
        """After pause(0.3) nothing is granted before the pause's end; the next grant is at or after it."""
        rl = limiter(redis_client, keys, account=100, clock=LiveClock())
        now, until = rl.pause(0.3)
        assert until - now == 300_000 and rl.paused_until() == until
        denied = rl.try_acquire("x")
        assert isinstance(denied, Denied) and 0 < denied.retry_in <= 0.3
        assert rl.acquire("x", timeout=10).at_us >= until

    def test_a_shorter_pause_never_shortens_a_longer_one(self, redis_client: redis.Redis, keys: Keys) -> None:
        """pause(60) then pause(1): still paused for about a minute; pause_until extends too."""
        rl = limiter(redis_client, keys)
        _, long_end = rl.pause(60)
        _, still = rl.pause(1)
        assert still == long_end
        _, later = rl.pause_until((long_end + 5_000_000) / 1_000_000)
        assert later == long_end + 5_000_000

    def test_a_pause_key_expires_with_the_pause(self, redis_client: redis.Redis, keys: Keys) -> None:
        """pause(60) keeps its key about a minute (and a second's slack), not longer."""
        rl = limiter(redis_client, keys)
        rl.pause(60)
        assert 59_000 <= redis_client.pttl(rl.bucket_key("pause")) <= 61_000

    def test_a_zero_pause_sets_nothing(self, redis_client: redis.Redis, keys: Keys) -> None:
        """pause(0) (a Retry-After of 0) writes no pause key and blocks no grant."""
        rl = limiter(redis_client, keys)
        now, until = rl.pause(0)
        assert until == now
        assert not redis_client.exists(rl.bucket_key("pause")) and rl.paused_until() == 0
        assert isinstance(rl.try_acquire("x"), Grant)

    def test_a_denied_request_records_nothing(self, redis_client: redis.Redis, keys: Keys) -> None:
        """While paused, attempts leave every bucket empty."""
        rl = limiter(redis_client, keys, endpoints={"orders": Limit(1, 60.0)})
        rl.pause(60)
        assert isinstance(rl.try_acquire("orders"), Denied)
        assert redis_client.zcard(rl.bucket_key("account")) == 0
        assert redis_client.zcard(rl.bucket_key("endpoint:orders")) == 0
