"""Parse the ``bastion`` command line and run the subcommand.

Each public module of :mod:`services.cli.commands` defines ``register(subparsers)``, which adds its
subcommand and sets ``func`` -- a callable taking the parsed arguments and returning the exit
status. Exit statuses: 0 success, 1 a check failed or the request was refused, 2 bad usage or
configuration (an argument a message refuses included: an empty symbol), 3 Redis unreachable or
refusing writes (memory full, a failing disk, a replica), or (``verify --broker``) the broker
unreachable.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from services.cli import commands
from services.cli._context import EXIT_UNAVAILABLE, EXIT_USAGE
from shared.errors import ConfigError, RedisUnavailable
from shared.redis.boundary import redis_errors, refusing_writes

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="bastion", description="Watch and steer a Bastion deployment.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not module_info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{module_info.name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bastion`` console script."""
    args = build_parser().parse_args(argv)
    try:
        with redis_errors("Redis unreachable"):
            return int(args.func(args))
    except ConfigError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:  # an argument the message it builds refuses (an empty symbol...)
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'value'}: {e['msg']}"
                             for e in exc.errors())
        print(f"bastion {args.command}: error: {problems}", file=sys.stderr)
        return EXIT_USAGE
    except RedisUnavailable as exc:
        if exc.__cause__ is not None and refusing_writes(exc.__cause__):
            print(f"bastion: Redis refuses writes now, so nothing was written (memory full, a failing "
                  f"disk or a read-only replica): {exc}", file=sys.stderr)
        else:
            print(f"bastion: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE

