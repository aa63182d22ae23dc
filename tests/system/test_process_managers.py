"""Smoke tests of the two ways users run the desk: honcho over the Procfile, and supervisor.

Both run on the session's real redis-server (the monitor's rq worker cannot run on fakeredis's
TCP server) with a private key prefix and a free port for the paper exchange. The check is that
every process comes up (a live heartbeat each), synthetic bars flow into trades, and a stop
request takes everything down cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from shared.heartbeat import alive_instances
from shared.keys import ORDERS, Keys
from tests.support.environment import BIN, desk_env
from tests.support.processes import REPO_ROOT, free_port, wait_for

pytestmark = pytest.mark.multiprocess
SERVICES = {"paper-exchange", "ingester", "strategy", "risk", "executor", "reconciler", "monitor",
            "rq-worker", "api"}


def managed_env(url: str, keys: Keys) -> dict[str, str]:
    """The environment both process managers pass to every service: this one's, the venv's bin
    first on PATH, free ports for the desk's own paper exchange and API, synthetic bars 20 times as fast."""
    return desk_env(url, keys, inherit=True, paper_exchange__port=free_port(), api__port=free_port(),
                    ingester__speed=20,
                    bus__block_ms=200,
                    strategy__params={"sma_crossover": {"fast": "2", "slow": "4", "quantity": "1"}})


def services_up(client: redis.Redis, keys: Keys) -> bool:
    """True once every service has a live heartbeat."""
    alive = {name.split(":", 1)[0] for name in alive_instances(client, keys)}
    return alive >= SERVICES


def test_honcho_runs_the_procfile(server_url: str, client: redis.Redis, keys: Keys, tmp_path: Path) -> None:
    """`honcho start` brings every Procfile process up, orders flow, and SIGTERM stops them all
    cleanly: each exits 0, and none prints a traceback or leaves work pending on its way out."""
    output = tmp_path / "honcho.log"
    with output.open("wb") as sink:
        proc = subprocess.Popen([str(BIN / "honcho"), "start"], cwd=REPO_ROOT,
                                env=managed_env(server_url, keys), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: services_up(client, keys), timeout=60, message="every service's heartbeat")
        wait_for(lambda: client.xlen(keys.stream(ORDERS)) > 0, timeout=90, message="an approved order")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        wait_for(lambda: not alive_instances(client, keys), timeout=30, message="every heartbeat gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = output.read_text(errors="replace")
    names = [line.split(":", 1)[0] for line in (REPO_ROOT / "Procfile").read_text().splitlines()
             if line and not line.startswith("#")]
    assert sorted(n for n in names if f"{n}.1 stopped (rc=0)" in text) == sorted(names), text[-3000:]
    for sign in ("Traceback", "stop_with_pending", "websocket error"):
        assert sign not in text, text[-3000:]


def test_supervisor_runs_ops_config(server_url: str, client: redis.Redis, keys: Keys) -> None:
    """supervisord with ops/supervisord.conf runs every service and three strategy workers, then stops."""
    (REPO_ROOT / "var").mkdir(exist_ok=True)
    conf = str(REPO_ROOT / "ops" / "supervisord.conf")
    proc = subprocess.Popen([str(BIN / "supervisord"), "-c", conf], cwd=REPO_ROOT,
                            env=managed_env(server_url, keys), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: services_up(client, keys), timeout=60, message="every service's heartbeat")
        wait_for(lambda: len(alive_instances(client, keys, "strategy")) == 3, timeout=30,
                 message="three strategy workers")
        wait_for(lambda: client.xlen(keys.stream(ORDERS)) > 0, timeout=90, message="an approved order")
        subprocess.run([str(BIN / "supervisorctl"), "-c", conf, "shutdown"], check=True, timeout=60,
                       capture_output=True)
        proc.wait(60)
        wait_for(lambda: not alive_instances(client, keys), timeout=30, message="every heartbeat gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
