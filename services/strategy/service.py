"""The strategy worker's process: load plugins, validate the catalog, serve partitions."""

from __future__ import annotations

import importlib
import sys

from services.strategy._api import Catalog
from services.strategy._warmup import problems as warmup_problems
from services.strategy._worker import StrategyWorker
from shared.service import ServiceContext

__all__ = ["load_catalog", "main"]


def load_catalog(ctx: ServiceContext) -> Catalog:
    """Import ``strategy.modules`` and check ``strategy.plugins``/``params`` and the warm-up source;
    exit 2 naming each problem."""
    config = ctx.settings.strategy
    problems: list[str] = []
    for module in config.modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            problems.append(f"strategy.modules: cannot import {module!r}: {exc}")
    catalog = Catalog(config)
    problems.extend(catalog.validate())
    problems.extend(warmup_problems(ctx.settings))
    if problems:
        print("bastion: invalid strategy settings:\n  " + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(2)
    return catalog


def main(ctx: ServiceContext) -> None:
    """A strategy worker: scale by running several (``honcho start -c strategy=3``)."""
    catalog = load_catalog(ctx)
    worker = StrategyWorker(ctx.redis, ctx.keys, ctx.settings, ctx.clock, ctx.instance, catalog,
                            status=ctx.heartbeat.status)
    ctx.log.info("strategy.started", partitions=ctx.settings.ingester.partitions,
                 lease_ms=ctx.settings.strategy.lease_ms, plugins=ctx.settings.strategy.plugins,
                 warmup=ctx.settings.strategy.warmup, warmup_bars=ctx.settings.strategy.warmup_bars)
    stats = worker.run(ctx.stop)
    ctx.log.info("strategy.finished", applied=stats.applied, warmed=stats.warmed, skipped=stats.skipped,
                 intents=stats.intents, dead_lettered=stats.dead_lettered,
                 refused_commits=stats.refused_commits)
