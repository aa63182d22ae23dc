"""Environment variables: keeping the outer environment's settings out of a test, and the environment
of the Bastion processes a test starts.

A setting is named ``section__field`` (``bus__block_ms=200``) and becomes its variable
(``BASTION_BUS__BLOCK_MS=200``); a dict or list is written as JSON, anything else with ``str``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from shared.keys import Keys
from tests.support.paper import KEY_ID, SECRET, PaperExchange

BIN = Path(sys.executable).parent  # the venv's bin (honcho, supervisord, ...)


def is_setting(name: str) -> bool:
    """A variable the settings read: REDIS_URL or BASTION_* (in any case)."""
    return name.upper().startswith("BASTION_") or name.upper() == "REDIS_URL"


def clean_env() -> dict[str, str]:
    """This process's environment without REDIS_URL or any BASTION_* variable: for a subprocess that
    must see only the settings its test gives it."""
    return {name: value for name, value in os.environ.items() if not is_setting(name)}


def clear_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset REDIS_URL and every BASTION_* variable for the rest of the test (``monkeypatch`` puts
    them back); the ``clean_environment`` fixture does this for a whole module."""
    for name in list(os.environ):
        if is_setting(name):
            monkeypatch.delenv(name)


def env_for(url: str, keys: Keys, settings: Mapping[str, object] | None = None, /,
            **overrides: object) -> dict[str, str]:
    """The environment of a Bastion process a test starts: the server at ``url``, the key prefix of
    ``keys``, INFO logs, then ``settings`` and ``overrides`` (which win) as BASTION_* variables."""
    env = {"REDIS_URL": url, "BASTION_KEY_PREFIX": keys.prefix, "BASTION_LOG__LEVEL": "INFO"}
    for name, value in {**(settings or {}), **overrides}.items():
        env[f"BASTION_{name.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return env


def desk_env(url: str, keys: Keys, settings: Mapping[str, object] | None = None, /, *,
             exchange: PaperExchange | None = None, inherit: bool = False,
             **overrides: object) -> dict[str, str]:
    """:func:`env_for` for the processes of a whole desk.

    ``exchange``: the running paper exchange the desk trades at (its port and the API keys it was
    started with); without one, the desk's own paper exchange generates the keys and stores them in
    Redis, where the other services read them. ``inherit``: on top of this process's environment,
    with the venv's bin first on PATH, for a process manager (which finds its programs by PATH and
    hands its environment to every service)."""
    env = env_for(url, keys, settings, **overrides)
    if exchange is not None:
        env |= {"BASTION_PAPER_EXCHANGE__PORT": str(exchange.port), "BASTION_PAPER_EXCHANGE__API_KEY": KEY_ID,
                "BASTION_PAPER_EXCHANGE__SECRET_KEY": SECRET}
    if inherit:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **env}
    return env
