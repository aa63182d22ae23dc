"""``python -m services.api`` as a real OS process against the shared test Redis (fakeredis's TCP
server and a real redis-server): tokens generated into 0600 files, auth over real HTTP, the status
it serves equal to ``bastion status --json``'s, an action logged without its token, a clean stop."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.config import PortfolioSettings
from shared.keys import Keys
from shared.models import Side
from shared.portfolio import Portfolio
from shared.safety.trading_state import KillSwitch, TradingState
from tests.conftest import SERVER_BACKENDS
from tests.services.api.client import check_reply
from tests.support.environment import env_for
from tests.support.factories import fill
from tests.support.processes import REPO_ROOT, free_port, spawn, stop_all, wait_for

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("clean_environment")]


def call(base: str, method: str, path: str, token: str | None = None,
         body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One HTTP request: (status, JSON body), error statuses included."""
    request = urllib.request.Request(f"{base}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    reply = json.loads(raw)
    check_reply(method, path, status, reply)
    return status, reply


def answering(base: str) -> bool:
    """True once GET /health answers."""
    try:
        return call(base, "GET", "/health")[0] == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
def test_the_api_process_authenticates_and_serves_status(server_url: str, client: redis.Redis, keys: Keys,
                                                         tmp_path: Path) -> None:
    """The process makes its tokens (0600) at start, refuses a request without one (401) and an
    action with the read-only one (403), serves the account `bastion status --json` shows, carries
    out an operator's kill switch logging who and why but no token, and exits 0 on SIGTERM."""
    portfolio = Portfolio(client, keys, "paper", settings=PortfolioSettings())
    portfolio.open()
    portfolio.reserve("h", "AAPL", Side.BUY, Decimal(7), Decimal("101.5"))
    portfolio.apply_fill("h", fill("h:1", "7", "101.5"))
    client.hset(keys.last_price, "AAPL", "102.25")
    port, log = free_port(), tmp_path / "api.log"
    env = env_for(server_url, keys, api__port=port, embedded_redis__data_dir=str(tmp_path / "secrets"))
    proc = spawn("services.api", env=env, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answering(base) or proc.poll() is not None, timeout=60, message="the API to answer")
        assert proc.poll() is None, log.read_text()
        files = [tmp_path / "secrets" / "api-read-token", tmp_path / "secrets" / "api-operator-token"]
        assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)
        read, operator = (path.read_text().strip() for path in files)

        assert call(base, "GET", "/api/v1/status")[0] == 401
        assert call(base, "GET", "/api/v1/status", "wrong")[0] == 401
        status, report = call(base, "GET", "/api/v1/status", read)
        assert status == 200 and any(name.startswith("api:") for name in report["services"])
        cli = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json"], cwd=REPO_ROOT,
                             env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert cli.returncode == 0, cli.stderr
        shown = json.loads(cli.stdout)
        assert (report["account"], report["positions"]) == (shown["account"], shown["positions"])
        assert Decimal(report["account"]["equity"]) == 100_000 + 7 * (Decimal("102.25") - Decimal("101.5"))

        halt = {"engaged": True, "reason": "process test"}
        assert call(base, "POST", "/api/v1/kill-switch", read, halt)[0] == 403
        assert KillSwitch(client, keys).current().state is TradingState.ACTIVE
        status, change = call(base, "POST", "/api/v1/kill-switch", operator, halt)
        assert status == 200 and change["state"] == "HALTED"
        assert KillSwitch(client, keys).current().by == "api:operator"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        stop_all([proc])
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    [action] = [line for line in lines if line.get("event") == "api.action"]
    assert (action["role"], action["reason"], action["action"]) == ("operator", "process test", "kill_switch")
    assert read not in log.read_text() and operator not in log.read_text()
    assert any(line.get("event") == "api.listening" and line["port"] == port for line in lines)
