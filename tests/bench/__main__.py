"""``python -m tests.bench`` (``make bench``): run every benchmark module's ``main()`` in turn.

A benchmark is any module of this package (found with pkgutil) that defines a callable
``main()``; each prints its own JSON line to stdout. ``bus`` and ``portfolio`` run first, the
rest in name order. A benchmark that raises is reported on stderr and the others still run;
the exit status is then 1. There are no thresholds here: figures are printed, not judged.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback

import tests.bench

FIRST = ("bus", "portfolio")


def modules() -> list[str]:
    """The benchmark module names, in the order they run."""
    names = [info.name for info in pkgutil.iter_modules(tests.bench.__path__)
             if not info.name.startswith("_")]
    return [name for name in FIRST if name in names] + sorted(n for n in names if n not in FIRST)


def main() -> int:
    """Run each benchmark's ``main()``; 1 if any of them raised."""
    failed = []
    for name in modules():
        module = importlib.import_module(f"tests.bench.{name}")
        run = getattr(module, "main", None)
        if not callable(run):
            continue
        try:
            run()
        except Exception:
            failed.append(name)
            print(f"benchmark {name} failed:", file=sys.stderr)
            traceback.print_exc()
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
