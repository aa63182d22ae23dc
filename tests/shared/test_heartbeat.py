"""Heartbeats: a beat makes an instance alive, an expired key or a clean stop makes it gone."""

from __future__ import annotations

import redis

from shared.clock import LiveClock
from shared.heartbeat import Heartbeat, alive_instances
from shared.keys import Keys


def heartbeat(client: redis.Redis, keys: Keys, service: str, instance: str) -> Heartbeat:
    return Heartbeat(client, keys, service, instance, LiveClock(), interval_s=1.0, ttl_s=60.0)


class TestAliveInstances:
    def test_a_beat_is_alive_with_its_status_and_found_per_service(self, redis_client: redis.Redis,
                                                                  keys: Keys) -> None:
        """Each beating instance is listed with its status; a service filter lists only its own."""
        risk = heartbeat(redis_client, keys, "risk", "r1")
        risk.status["role"] = "intents"
        risk.beat()
        heartbeat(redis_client, keys, "strategy", "s1").beat()
        heartbeat(redis_client, keys, "strategy", "s2").beat()
        alive = alive_instances(redis_client, keys)
        assert sorted(alive) == ["risk:r1", "strategy:s1", "strategy:s2"]
        assert alive["risk:r1"]["role"] == "intents"
        assert sorted(alive_instances(redis_client, keys, "strategy")) == ["strategy:s1", "strategy:s2"]

    def test_an_expired_heartbeat_is_gone_until_it_beats_again(self, redis_client: redis.Redis,
                                                                keys: Keys) -> None:
        """A key that expired (simulated by deleting it) is not alive and leaves the index; the next
        beat brings the instance back."""
        beating = heartbeat(redis_client, keys, "executor", "e1")
        beating.beat()
        redis_client.delete(keys.heartbeat("executor", "e1"))
        assert alive_instances(redis_client, keys) == {}
        assert redis_client.smembers(keys.heartbeats) == set()
        beating.beat()
        assert list(alive_instances(redis_client, keys)) == ["executor:e1"]

    def test_a_clean_stop_removes_the_instance(self, redis_client: redis.Redis, keys: Keys) -> None:
        """stop() deletes the key and the index entry: the instance is not alive, not dead-and-listed."""
        beating = heartbeat(redis_client, keys, "monitor", "m1")
        beating.start()
        assert list(alive_instances(redis_client, keys, "monitor")) == ["monitor:m1"]
        beating.stop()
        assert alive_instances(redis_client, keys) == {}
        assert redis_client.smembers(keys.heartbeats) == set()
        assert redis_client.exists(keys.heartbeat("monitor", "m1")) == 0

    def test_other_keys_are_never_listed(self, redis_client: redis.Redis, keys: Keys) -> None:
        """Keys that merely look like heartbeats (written without beating) are not instances."""
        redis_client.set(f"{keys.prefix}:heartbeat-archive:risk:old", "{}")
        heartbeat(redis_client, keys, "risk", "r1").beat()
        assert list(alive_instances(redis_client, keys)) == ["risk:r1"]
