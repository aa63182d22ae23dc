"""Tests for shared.config: every bad field named, unknown keys refused, secrets hidden."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from shared.config import Settings, load_settings, settings_or_exit
from shared.errors import ConfigError
from tests.support.environment import clean_env
from tests.support.processes import REPO_ROOT

pytestmark = pytest.mark.usefixtures("clean_environment")


def problems_of(**env: str) -> dict[str, str]:
    """The ConfigError problems, as {field: reason}, for settings read with only ``env`` set."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(ConfigError) as info:
            load_settings()
    return dict(info.value.problems)


class TestDefaults:
    def test_defaults_are_valid(self) -> None:
        """With no environment and no file, the defaults load: paper broker, no REDIS_URL."""
        settings = load_settings()
        assert settings.broker.kind == "paper"
        assert settings.redis_url is None
        assert settings.risk.max_risk_fraction == Decimal("0.01")

    def test_nested_environment_variable_is_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """BASTION_RISK__MAX_RISK_FRACTION sets risk.max_risk_fraction, exactly."""
        monkeypatch.setenv("BASTION_RISK__MAX_RISK_FRACTION", "0.0125")
        assert load_settings().risk.max_risk_fraction == Decimal("0.0125")

    @pytest.mark.parametrize("name", ["REDIS_URL", "BASTION_REDIS_URL"])
    def test_redis_url_alias(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        """REDIS_URL (without prefix) and BASTION_REDIS_URL both set redis_url."""
        monkeypatch.setenv(name, "redis://:pw@10.0.0.1:6379/2")
        url = load_settings().redis_url
        assert url is not None and url.get_secret_value() == "redis://:pw@10.0.0.1:6379/2"

    def test_keyword_override_beats_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A keyword argument to load_settings wins over the environment."""
        monkeypatch.setenv("BASTION_KEY_PREFIX", "from-env")
        assert load_settings(key_prefix="from-kwarg").key_prefix == "from-kwarg"

    def test_settings_are_frozen(self) -> None:
        """Settings cannot be changed after start-up."""
        settings = load_settings()
        with pytest.raises(ValueError, match="frozen"):
            settings.key_prefix = "other"  # type: ignore[misc]


class TestBadValues:
    def test_alpaca_without_keys(self) -> None:
        """broker.kind=alpaca without api_key and secret_key is refused, naming both keys."""
        problems = problems_of(BASTION_BROKER__KIND="alpaca")
        assert set(problems) == {"broker"}
        assert "api_key" in problems["broker"] and "secret_key" in problems["broker"]

    def test_alpaca_with_one_key(self) -> None:
        """broker.kind=alpaca with only api_key names just the missing secret_key."""
        problems = problems_of(BASTION_BROKER__KIND="alpaca", BASTION_BROKER__API_KEY="AKID")
        assert "secret_key" in problems["broker"] and "api_key" not in problems["broker"]

    def test_alpaca_with_both_keys(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """broker.kind=alpaca with both keys loads."""
        monkeypatch.setenv("BASTION_BROKER__KIND", "alpaca")
        monkeypatch.setenv("BASTION_BROKER__API_KEY", "AKID")
        monkeypatch.setenv("BASTION_BROKER__SECRET_KEY", "shh")
        assert load_settings().broker.kind == "alpaca"

    @pytest.mark.parametrize(("variable", "field"), [
        ("BASTION_BUS__BATCH", "bus.batch"),
        ("BASTION_BUS__MAXLEN", "bus.maxlen"),
        ("BASTION_LOCK__LEASE_MS", "lock.lease_ms"),
        ("BASTION_PORTFOLIO__STARTING_CASH", "portfolio.starting_cash"),
        ("BASTION_LIMITS__MAX_ORDER_NOTIONAL", "limits.max_order_notional"),
        ("BASTION_LIMITS__MIN_ORDER_NOTIONAL", "limits.min_order_notional"),
        ("BASTION_BROKER__TIMEOUT_S", "broker.timeout_s"),
        ("BASTION_EMBEDDED_REDIS__PORT", "embedded_redis.port"),
    ])
    def test_negative_size_named(self, variable: str, field: str) -> None:
        """A negative size, amount or duration is refused, naming the field."""
        problems = problems_of(**{variable: "-5"})
        assert set(problems) == {field}
        assert "greater than" in problems[field]

    @pytest.mark.parametrize("value", ["1.5", "1.0000001", "0", "-0.1", "NaN"])
    def test_risk_fraction_outside_zero_to_one(self, value: str) -> None:
        """A risk fraction above 1 (or not above 0, or NaN) is refused, naming the field."""
        assert set(problems_of(BASTION_RISK__MAX_RISK_FRACTION=value)) == {"risk.max_risk_fraction"}

    def test_risk_fraction_of_one_accepted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A fraction of exactly 1 is the upper bound and is accepted."""
        monkeypatch.setenv("BASTION_LIMITS__MAX_POSITION_FRACTION", "1")
        assert load_settings().limits.max_position_fraction == 1

    @pytest.mark.parametrize(("variable", "value", "field", "reason"), [
        ("BASTION_BUS__BLOCK_MS", "soon", "bus.block_ms", "valid integer"),
        ("BASTION_BUS__GRACE_SECONDS", "ten", "bus.grace_seconds", "valid number"),
        ("BASTION_BROKER__LIVE", "maybe", "broker.live", "valid boolean"),
        ("BASTION_RISK__MAX_RISK_FRACTION", "two percent", "risk.max_risk_fraction", "decimal"),
        ("BASTION_LOG__LEVEL", "LOUD", "log.level", "'INFO'"),
        ("BASTION_BROKER__KIND", "ibkr", "broker.kind", "'alpaca'"),
        ("BASTION_KEY_PREFIX", "has space", "key_prefix", "pattern"),
    ])
    def test_wrong_type_named(self, variable: str, value: str, field: str, reason: str) -> None:
        """A value of the wrong type is refused, naming the field and what was expected."""
        problems = problems_of(**{variable: value})
        assert set(problems) == {field}
        assert reason in problems[field]

    def test_every_bad_field_reported_together(self) -> None:
        """Several bad values (and an unknown variable) are all named in one ConfigError."""
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("BASTION_BUS__BATCH", "0")
            patch.setenv("BASTION_RISK__MAX_RISK_FRACTION", "3")
            patch.setenv("BASTION_EMBEDDED_REDIS__PORT", "six")
            patch.setenv("BASTION_BROKER__KIND", "alpaca")
            patch.setenv("BASTION_RISKK__MAX_RISK_FRACTION", "0.1")
            with pytest.raises(ConfigError) as info:
                load_settings()
        fields = [field for field, _ in info.value.problems]
        assert sorted(fields) == sorted(["bus.batch", "risk.max_risk_fraction", "embedded_redis.port",
                                         "broker", "BASTION_RISKK__MAX_RISK_FRACTION"])
        text = str(info.value)
        assert "5 problem(s)" in text
        assert all(f"  {field}: " in text for field in fields)

    def test_section_variable_that_is_not_json(self) -> None:
        """BASTION_RISK=<not JSON> is reported against the environment and names the section."""
        problems = problems_of(BASTION_RISK="strict")
        assert "config_file" not in problems
        assert '"risk"' in problems["environment"]


class TestUnknownKeys:
    @pytest.mark.parametrize("variable", ["BASTION_RISK_FRACTION", "BASTION_BROKERS__KIND", "bastion_typo",
                                          "Bastion_Bus_Batch"])
    def test_unknown_variable_refused(self, variable: str) -> None:
        """A BASTION_* variable (in any case) that names no setting is refused, naming the variable."""
        problems = problems_of(**{variable: "1"})
        assert list(problems) == [variable]
        assert "not a Bastion setting" in problems[variable]

    def test_misspelt_nested_key_refused(self) -> None:
        """A misspelt key inside a known section is refused, naming it."""
        problems = problems_of(BASTION_RISK__MAX_RISK_FRACTON="0.1")
        assert list(problems) == ["risk.max_risk_fracton"]

    def test_lowercase_variable_of_a_real_setting_is_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Names are case-insensitive, as pydantic-settings reads them: bastion_bus__batch sets bus.batch."""
        monkeypatch.setenv("bastion_bus__batch", "7")
        assert load_settings().bus.batch == 7


class TestConfigFile:
    def write(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
        path = tmp_path / "bastion.toml"
        path.write_text(text)
        monkeypatch.setenv("BASTION_CONFIG_FILE", str(path))
        return path

    def test_toml_file_read(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Values in the TOML file named by BASTION_CONFIG_FILE are used, Decimals exact."""
        path = self.write(tmp_path, monkeypatch, 'key_prefix = "desk"\n[risk]\nmax_risk_fraction = "0.015"\n'
                                                 '[bus]\nbatch = 16\nblock_ms = 250\n')
        settings = load_settings()
        assert settings.key_prefix == "desk"
        assert settings.risk.max_risk_fraction == Decimal("0.015")
        assert (settings.bus.batch, settings.bus.block_ms) == (16, 250)
        assert settings.config_file == path

    def test_nested_environment_beats_toml(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """BASTION_BUS__BATCH wins over [bus] batch, and the file's other [bus] keys still apply."""
        self.write(tmp_path, monkeypatch, "[bus]\nbatch = 16\nblock_ms = 250\n")
        monkeypatch.setenv("BASTION_BUS__BATCH", "99")
        settings = load_settings()
        assert (settings.bus.batch, settings.bus.block_ms) == (99, 250)

    def test_bad_value_in_toml_named(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bad value in the file is named like one from the environment."""
        self.write(tmp_path, monkeypatch, "[risk]\nmax_risk_fraction = 2\n[bus]\nbatch = -1\n")
        assert set(problems_of()) == {"risk.max_risk_fraction", "bus.batch"}

    def test_unknown_key_in_toml_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A misspelt key in the file is refused, top level or in a section."""
        self.write(tmp_path, monkeypatch, 'key_prefx = "x"\n[bus]\nbatchh = 1\n')
        assert set(problems_of()) == {"key_prefx", "bus.batchh"}

    def test_toml_syntax_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A file that is not TOML is reported against config_file with the parser's reason."""
        self.write(tmp_path, monkeypatch, "[risk\nmax_risk_fraction = 2\n")
        problems = problems_of()
        assert list(problems) == ["config_file"]
        assert "line 1" in problems["config_file"]

    def test_missing_file(self, tmp_path: Path) -> None:
        """BASTION_CONFIG_FILE naming no file is reported, naming the path."""
        missing = tmp_path / "nope.toml"
        problems = problems_of(BASTION_CONFIG_FILE=str(missing))
        assert str(missing) in problems["config_file"]


class TestSecrets:
    SECRETS = ("AKIDsecret123", "sk-very-secret-456", "hunter2pw")

    def load_with_secrets(self, monkeypatch: pytest.MonkeyPatch) -> Settings:
        monkeypatch.setenv("BASTION_BROKER__KIND", "alpaca")
        monkeypatch.setenv("BASTION_BROKER__API_KEY", self.SECRETS[0])
        monkeypatch.setenv("BASTION_BROKER__SECRET_KEY", self.SECRETS[1])
        monkeypatch.setenv("REDIS_URL", f"redis://:{self.SECRETS[2]}@127.0.0.1:6390/0")
        return load_settings()

    def test_secrets_never_in_repr_or_str(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """repr, str and JSON of settings show neither the API keys nor the Redis password."""
        settings = self.load_with_secrets(monkeypatch)
        assert settings.broker.api_key is not None
        assert settings.broker.api_key.get_secret_value() == self.SECRETS[0]
        for shown in (repr(settings), str(settings), repr(settings.broker), settings.model_dump_json()):
            assert not any(secret in shown for secret in self.SECRETS), shown
            assert "**********" in shown

    def test_secrets_never_in_config_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A ConfigError about other fields does not echo secret values."""
        monkeypatch.setenv("BASTION_BUS__BATCH", "x")
        with pytest.raises(ConfigError) as info:
            self.load_with_secrets(monkeypatch)
        assert not any(secret in str(info.value) for secret in self.SECRETS)


class TestSettingsOrExit:
    def test_exits_2_naming_fields(self, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
        """settings_or_exit prints every bad field on stderr and exits with status 2."""
        monkeypatch.setenv("BASTION_BUS__BATCH", "-1")
        monkeypatch.setenv("BASTION_RISK__MAX_RISK_FRACTION", "1.5")
        with pytest.raises(SystemExit) as info:
            settings_or_exit()
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "bus.batch" in err and "risk.max_risk_fraction" in err

    def test_returns_settings_when_valid(self) -> None:
        """settings_or_exit returns the settings when every value is valid."""
        assert settings_or_exit().key_prefix == "bastion"

    def test_service_entry_point_exits_2(self, tmp_path: Path) -> None:
        """`python -m services.redis` with a bad value exits 2 before starting anything, naming it."""
        env = clean_env() | {"BASTION_BUS__BATCH": "-1", "BASTION_EMBEDDED_REDIS__DATA_DIR": str(tmp_path),
                             "BASTION_BROKER__LIVE": "perhaps"}
        result = subprocess.run([sys.executable, "-m", "services.redis"], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, result.stderr
        assert "bus.batch" in result.stderr and "broker.live" in result.stderr
        assert "Traceback" not in result.stderr
        assert list(tmp_path.iterdir()) == []  # no password file, no AOF: nothing was started
