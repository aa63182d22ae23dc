"""Validated settings for every service, read once at start-up and passed in.

Values come, highest priority first, from keyword arguments, environment variables
(prefix ``BASTION_``, nested sections joined with ``__``: ``BASTION_RISK__MAX_RISK_FRACTION``),
the TOML file named by ``BASTION_CONFIG_FILE``, then the defaults below. ``REDIS_URL`` is read
without a prefix. Unknown keys are an error (a misspelt setting must not be silently dropped).

An invalid value raises :class:`~shared.errors.ConfigError` naming every bad field;
:func:`settings_or_exit` turns that into a message on stderr and exit status 2. Secrets are
``SecretStr``: they print as ``**********`` and never reach a log line.
"""

from __future__ import annotations

import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from shared.errors import ConfigError

__all__ = [
    "ApiSettings", "BrokerSettings", "BusSettings", "EmbeddedRedisSettings", "ExecutorSettings",
    "IngesterSettings", "LimitSettings", "LockSettings", "LogSettings", "MonitorSettings",
    "PaperExchangeSettings", "PortfolioSettings", "ProtectionSettings", "ReconcilerSettings", "RiskSettings",
    "ServiceSettings", "Settings", "StrategySettings", "load_settings", "settings_or_exit",
]

PositiveInt = Annotated[int, Field(gt=0)]
PositiveDecimal = Annotated[Decimal, Field(gt=0)]
NonNegativeDecimal = Annotated[Decimal, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[Decimal, Field(gt=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddedRedisSettings(_Section):
    """The private redis-server started when no ``REDIS_URL`` is given."""

    port: Annotated[int, Field(gt=0, lt=65536)] = 6390
    data_dir: Path = Path("var/redis")
    # on a stop signal, how long the server keeps serving while other clients are still
    # connected (services finishing their work); longer than the paper exchange's own wait
    # (``paper_exchange.stop_wait_s``, after which it still finishes a read), and under honcho
    # below its 5 s SIGKILL
    stop_wait_s: Annotated[float, Field(ge=0)] = 4.0


class BusSettings(_Section):
    """Consumer-group behaviour shared by every stream consumer."""

    block_ms: PositiveInt = 1000
    batch: PositiveInt = 64
    claim_idle_ms: PositiveInt = 10_000
    claim_interval_ms: PositiveInt = 2_000
    max_deliveries: PositiveInt = 5
    maxlen: PositiveInt = 100_000
    trim_every: PositiveInt = 500
    grace_seconds: Annotated[float, Field(gt=0)] = 10.0
    idempotency_ttl_s: PositiveInt = 7 * 24 * 3600


class LogSettings(_Section):
    """structlog output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class LockSettings(_Section):
    """Distributed-lock leases and waits."""

    lease_ms: PositiveInt = 5_000
    wait_ms: PositiveInt = 10_000


class PortfolioSettings(_Section):
    """The account the portfolio service keeps."""

    account: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "paper"
    starting_cash: NonNegativeDecimal = Decimal("100000")
    fee_buffer_bps: NonNegativeDecimal = Decimal("10")
    allow_short: bool = False


class RiskSettings(_Section):
    """How risk sizes an intent without quantity or notional (docs/RISK.md, "Sizing"): equity x
    ``max_risk_fraction`` at risk to its stop-loss, else ``position_fraction`` of equity; and how
    many of its equity samples (one a minute) the API's history keeps."""

    max_risk_fraction: Fraction = Decimal("0.01")
    position_fraction: Fraction = Decimal("0.05")
    equity_history_keep: PositiveInt = 10_080  # a week of samples


class ProtectionSettings(_Section):
    """Freqtrade-style protections (see docs/RISK.md); durations and lookbacks in seconds.

    StoplossGuard locks after ``stoploss_guard_trade_limit`` stop-outs within its lookback, globally, per
    symbol, per side, or both; a stop-out is a stop exit (``ExitReason.is_stop``) whose PnL (money, after
    fees) is below ``stoploss_guard_required_profit``. MaxDrawdown halts every entry when account equity
    falls ``max_drawdown_fraction`` from its peak within the lookback. Cooldown locks a symbol after each
    exit. LowProfitPairs locks a symbol (each entry side apart with ``low_profit_per_side``) whose realised
    PnL over the lookback (at least ``low_profit_trade_limit`` trades) is below ``low_profit_required``.
    """

    stoploss_guard_enabled: bool = True
    stoploss_guard_trade_limit: PositiveInt = 4
    stoploss_guard_lookback_s: PositiveFloat = 3600.0
    stoploss_guard_duration_s: PositiveFloat = 3600.0
    stoploss_guard_per_symbol: bool = False
    stoploss_guard_per_side: bool = False
    stoploss_guard_required_profit: Annotated[Decimal, Field(allow_inf_nan=False)] = Decimal("0")
    max_drawdown_enabled: bool = True
    max_drawdown_fraction: Fraction = Decimal("0.10")
    max_drawdown_lookback_s: PositiveFloat = 86_400.0
    max_drawdown_duration_s: PositiveFloat = 43_200.0
    cooldown_enabled: bool = True
    cooldown_duration_s: PositiveFloat = 60.0
    low_profit_enabled: bool = False  # opt-in: its threshold is the strategy's to choose
    low_profit_lookback_s: PositiveFloat = 86_400.0
    low_profit_trade_limit: PositiveInt = 2
    low_profit_required: Annotated[Decimal, Field(allow_inf_nan=False)] = Decimal("0")
    low_profit_duration_s: PositiveFloat = 3600.0
    low_profit_per_side: bool = False


class LimitSettings(_Section):
    """Pre-trade limits, PDT, staleness, shared API rate limits, deferred intents (docs/RISK.md).

    ``None`` for ``max_position_quantity`` means no quantity cap (the equity fraction still
    applies). ``max_gross_leverage`` is gross exposure over equity (above 1 only on margin).
    ``endpoint_rate_limits`` maps an endpoint name to its own limit per ``api_rate_period_s``;
    every endpoint also counts against the account-wide ``api_rate_limit``.
    """

    max_position_quantity: PositiveDecimal | None = None
    max_position_fraction: Fraction = Decimal("0.25")
    max_order_notional: PositiveDecimal = Decimal("50000")
    min_order_notional: NonNegativeDecimal = Decimal("1")
    max_gross_leverage: PositiveDecimal = Decimal("1")
    max_open_orders: PositiveInt = 50
    max_orders_per_minute: PositiveInt = 60
    pdt_enabled: bool = True
    pdt_equity_threshold: NonNegativeDecimal = Decimal("25000")
    pdt_max_day_trades: PositiveInt = 3
    pdt_window_business_days: PositiveInt = 5
    stale_data_after_s: PositiveFloat = 120.0
    balance_max_age_s: PositiveFloat = 300.0
    balance_refresh_after_fills: PositiveInt = 10
    api_rate_limit: PositiveInt = 200
    api_rate_period_s: PositiveFloat = 60.0
    endpoint_rate_limits: dict[Annotated[str, Field(pattern=r"^[a-z0-9_.-]+$")], PositiveInt] = {}
    deferred_max_age_s: PositiveFloat = 900.0

    @model_validator(mode="after")
    def _min_below_max(self) -> LimitSettings:
        if self.min_order_notional > self.max_order_notional:
            raise ValueError("min_order_notional must not exceed max_order_notional")
        return self


class BrokerSettings(_Section):
    """Where orders go: the embedded paper exchange (default) or Alpaca."""

    kind: Literal["paper", "alpaca"] = "paper"
    base_url: str | None = None
    api_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    live: bool = False
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    stream_url: str | None = None  # trade_updates websocket; derived from base_url when unset
    rate_limit_retries: Annotated[int, Field(ge=0)] = 5  # 429s waited out before RateLimited
    max_rate_limit_wait_s: Annotated[float, Field(gt=0)] = 60.0
    read_retries: Annotated[int, Field(ge=0)] = 2  # timeouts/5xx retried on reads (never on submit)
    resolve_attempts: PositiveInt = 5  # look-ups by client_order_id after an ambiguous submit
    resolve_interval_s: Annotated[float, Field(ge=0)] = 0.5

    @model_validator(mode="after")
    def _alpaca_needs_keys(self) -> BrokerSettings:
        if self.kind == "alpaca":
            missing = [name for name in ("api_key", "secret_key") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"broker.kind is 'alpaca' but {', '.join(missing)} is not set")
        return self


class PaperExchangeSettings(_Section):
    """The embedded, Alpaca-compatible paper exchange."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(gt=0, lt=65536)] = 8790
    commission_per_share: NonNegativeDecimal = Decimal("0")
    slippage_bps: NonNegativeDecimal = Decimal("0")
    api_key: SecretStr | None = None  # both unset: a pair is generated and kept in Redis
    secret_key: SecretStr | None = None
    starting_cash: NonNegativeDecimal = Decimal("100000")
    max_volume_fraction: Fraction = Decimal("1")  # of a bar's volume one bar may fill
    allow_short: bool = False
    always_open: bool = True  # /v2/clock says open at any hour (bars drive the session)
    # tradable besides the ingester's symbols and every symbol a bar has been seen for
    symbols: list[Annotated[str, Field(pattern=r"^[A-Z0-9./-]+$")]] = []
    # a market order before its symbol's first price: checked against buying power at its first
    # fill and rejected then if it does not fit ("check_at_fill"), or refused when placed
    unpriced_orders: Literal["check_at_fill", "refuse"] = "check_at_fill"
    consumer_group: Annotated[str, Field(min_length=1)] = "paper-exchange"
    faults: str = ""  # a JSON fault plan (see docs/BROKERS.md); empty: no faults
    # on a stop, how long the exchange serves on while a trade-update stream or another service is up
    stop_wait_s: Annotated[float, Field(ge=0)] = 3.0


class ServiceSettings(_Section):
    """What every service process shares: heartbeats."""

    heartbeat_interval_s: Annotated[float, Field(gt=0)] = 2.0
    heartbeat_ttl_s: Annotated[float, Field(gt=0)] = 6.0

    @model_validator(mode="after")
    def _ttl_outlives_interval(self) -> ServiceSettings:
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must be longer than heartbeat_interval_s")
        return self


class IngesterSettings(_Section):
    """Market data in: where bars come from and when a symbol is stale."""

    source: Literal["synthetic", "csv", "alpaca"] = "synthetic"
    symbols: list[Annotated[str, Field(pattern=r"^[A-Z0-9./-]+$")]] = ["AAPL", "MSFT", "SPY"]
    csv_path: Path | None = None
    speed: Annotated[float, Field(gt=0)] = 2.0  # replay/synthetic bars per second of wall time, per symbol
    seed: int = 7
    stale_after_s: Annotated[float, Field(gt=0)] = 120.0
    partitions: Annotated[int, Field(gt=0, le=256)] = 8
    paced: bool = True  # False: publish as fast as Redis takes them (replays, benchmarks)
    max_bars: Annotated[int, Field(ge=0)] = 0  # read this many bars from the source, then exit; 0: all
    batch: Annotated[int, Field(gt=0, le=10_000)] = 256  # bars per dedup check + publish round trip
    alpaca_feed: Literal["iex", "sip", "delayed_sip"] = "iex"


class StrategySettings(_Section):
    """Strategy workers: which strategy runs on which symbol, partition leases, warm-up."""

    lease_ms: PositiveInt = 5_000
    plugins: dict[str, str] = {"*": "sma_crossover"}  # symbol (or "*") -> strategy name
    params: dict[str, dict[str, str]] = {}  # strategy name (or "name:SYMBOL") -> its parameters
    modules: list[str] = []  # modules imported at start-up that register more strategies
    batch: Annotated[int, Field(gt=0, le=10_000)] = 128  # partition entries applied per transaction
    idle_wait_ms: PositiveInt = 200  # longest wait for new bars before lease upkeep runs again
    warmup: Literal["none", "stream", "csv", "alpaca"] = "stream"  # history fed to a fresh state
    warmup_bars: Annotated[int, Field(gt=0, le=10_000)] = 200  # at most this many bars, newest
    warmup_csv_path: Path | None = None  # warmup="csv": Alpaca's bar columns plus symbol


class ExecutorSettings(_Section):
    """The order executor."""

    consumer_group: Annotated[str, Field(min_length=1)] = "executor"
    poll_interval_s: Annotated[float, Field(gt=0)] = 5.0  # every order we hold open is looked up this often
    unknown_lookup_limit: PositiveInt = 5  # not found this many times in a row: never placed
    unknown_backoff_max_s: Annotated[float, Field(gt=0)] = 30.0  # longest wait between look-ups of one
    stale_pending_s: Annotated[float, Field(gt=0)] = 120.0  # a pending_submit this old is chased as UNKNOWN
    cancel_foreign_orders: bool = False  # cancel open broker orders without our client_order_id prefix
    # tries to place a protective stop, protect_backoff_s apart (doubling), then flatten (docs/RISK.md)
    protect_attempts: PositiveInt = 3
    protect_backoff_s: Annotated[float, Field(ge=0)] = 0.5


class ReconcilerSettings(_Section):
    """Broker truth against ours."""

    interval_s: Annotated[float, Field(gt=0)] = 60.0
    cash_tolerance: NonNegativeDecimal = Decimal("0.01")
    quantity_tolerance: NonNegativeDecimal = Decimal("0")
    recheck_delay_s: Annotated[float, Field(ge=0)] = 2.0  # a difference is confirmed by a second look
    startup_retry_s: Annotated[float, Field(gt=0)] = 1.0  # retry while the start-up pass has not succeeded
    hold_until_reconciled: bool = True  # HALTED from start until a pass succeeds (fail closed)
    report_maxlen: PositiveInt = 1_000  # entries kept on the reconciliation stream
    repair_after_s: Annotated[float, Field(ge=0)] = 30.0  # an in-flight difference this old: ask for a repair
    repair_wait_s: Annotated[float, Field(gt=0)] = 30.0  # a repair not done within this: halt


class MonitorSettings(_Section):
    """The scheduler: heartbeats, lag, stale data, periodic rq jobs, alert delivery."""

    interval_s: Annotated[float, Field(gt=0)] = 5.0
    max_lag: PositiveInt = 1_000
    webhook_url: str | None = None
    webhook_retries: Annotated[int, Field(ge=0)] = 5
    balance_refresh_s: Annotated[float, Field(gt=0)] = 300.0
    webhook_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    webhook_retry_intervals_s: list[Annotated[int, Field(ge=0)]] = [5, 30, 120, 600, 1800]  # rq wants ints
    daily_summary_s: Annotated[float, Field(gt=0)] = 86_400.0
    startup_grace_s: Annotated[float, Field(ge=0)] = 30.0  # no dead-service/stale alerts before this
    expected_services: list[Annotated[str, Field(min_length=1)]] | None = None  # None: from the settings
    queue: Annotated[str, Field(min_length=1)] | None = None  # rq queue name; None: the key prefix
    require_worker: bool = True  # alert when no rq worker listens on the queue
    failed_keep: PositiveInt = 1_000  # failed webhook deliveries kept in the list
    extra_jobs: list[Annotated[str, Field(min_length=1)]] = []  # more "module.function"s the rq worker runs


class ApiSettings(_Section):
    """The HTTP API (docs/API.md): where it listens, and the files under ``embedded_redis.data_dir``
    (an absolute path is taken as it is) that keep its bearer tokens, generated at first start."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(gt=0, lt=65536)] = 8791
    read_token_file: Annotated[str, Field(min_length=1)] = "api-read-token"
    operator_token_file: Annotated[str, Field(min_length=1)] = "api-operator-token"


class Settings(BaseSettings):
    """Everything a Bastion process can be configured with."""

    model_config = SettingsConfigDict(
        env_prefix="BASTION_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        populate_by_name=True,
    )

    config_file: Path | None = None
    redis_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "BASTION_REDIS_URL", "redis_url")
    )
    key_prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "bastion"
    embedded_redis: EmbeddedRedisSettings = EmbeddedRedisSettings()
    bus: BusSettings = BusSettings()
    log: LogSettings = LogSettings()
    lock: LockSettings = LockSettings()
    portfolio: PortfolioSettings = PortfolioSettings()
    risk: RiskSettings = RiskSettings()
    protections: ProtectionSettings = ProtectionSettings()
    limits: LimitSettings = LimitSettings()
    broker: BrokerSettings = BrokerSettings()
    paper_exchange: PaperExchangeSettings = PaperExchangeSettings()
    service: ServiceSettings = ServiceSettings()
    ingester: IngesterSettings = IngesterSettings()
    strategy: StrategySettings = StrategySettings()
    executor: ExecutorSettings = ExecutorSettings()
    reconciler: ReconcilerSettings = ReconcilerSettings()
    monitor: MonitorSettings = MonitorSettings()
    api: ApiSettings = ApiSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("BASTION_CONFIG_FILE")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings; raise ConfigError naming every bad field."""
    problems = _unknown_environment_keys()
    path = os.environ.get("BASTION_CONFIG_FILE")
    if path and not Path(path).is_file():
        raise ConfigError([*problems, ("config_file", f"BASTION_CONFIG_FILE={path} does not exist")])
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems.extend(_problems(exc))
    except SettingsError as exc:  # a whole section given as an environment variable that is not JSON
        problems.append(("environment", str(exc)))
    except ValueError as exc:  # a TOML syntax error or an unreadable file
        problems.append(("config_file", str(exc)))
    if problems:
        raise ConfigError(problems)
    return settings


def settings_or_exit(**overrides: Any) -> Settings:
    """Load settings for a service's start-up: on error print every bad field and exit 2."""
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _unknown_environment_keys() -> list[tuple[str, str]]:
    """``BASTION_*`` variables that name no setting (pydantic-settings would ignore them)."""
    known = {name.upper() for name in Settings.model_fields}
    problems = []
    for variable in sorted(os.environ):
        if variable.upper().startswith("BASTION_"):  # pydantic-settings ignores the case of names
            head = variable[len("BASTION_"):].split("__", 1)[0].upper()
            if head not in known:
                problems.append((variable, "not a Bastion setting (misspelt?)"))
    return problems


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        problems.append((field, error["msg"]))
    return problems
