"""Mutation sample of the money core: how many small, seeded mutations do the fast tests kill?

Run ``.venv/bin/python -m tests.mutation_sample`` (``--help`` for the options). It is a script,
not a test module: pytest does not collect it (no ``test_`` name).

What it does:

1. Lists every candidate mutation of the money-core modules (:data:`MODULES`): a comparison
   operator flipped (``<`` to ``<=``, ``==`` to ``!=``, ``is`` to ``is not``...), ``+`` and ``-``
   swapped (also ``+=``/``-=``), an integer constant changed by one, one operand of an
   ``and``/``or`` dropped, an ``if`` condition made ``False``, a ``not`` dropped, ``min`` and
   ``max`` swapped -- in Python by position in the AST, and the same kinds in the Lua scripts the
   modules hold as string constants. Docstrings, f-strings, log calls and constant indexes
   (``reply[0]``, ``KEYS[1]``: wiring, not arithmetic) are left alone.
2. Draws a seeded sample (``--count``, ``--seed``), a few from every module at least.
3. Works on a snapshot: the repository is copied once to a temporary directory (sampled,
   mutated and reported from that copy, so edits made meanwhile do not disturb a run; the
   working tree is never written), and that copy once per worker. It checks that the tests pass
   unmutated (a test that already fails is deselected and named), then for each mutant writes
   the mutated file into a worker's copy, runs the tests (the module's own first, the slow
   stateful test last) with ``-x -q`` under a per-mutant timeout, and puts the original back.
   Past ``--budget`` seconds the mutants not started are skipped (and counted as such).
4. Prints killed/survived per module and the diff of every survivor.

A mutant is *killed* if the tests fail (or time out); *survived* if they pass. Some survivors are
equivalent (they change no behaviour): :data:`EQUIVALENT` names the ones reviewed so, with why;
they are reported apart and left out of the kill rate of behaviour-changing mutants.

``--tests-rev REV`` runs the test files as they are at git revision ``REV`` (for a before/after
comparison); a listed test file that does not exist there is skipped.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = [
    "shared/portfolio/_state.py",
    "shared/portfolio/portfolio.py",
    "shared/portfolio/reads.py",
    "shared/portfolio/verify.py",
    "shared/portfolio/_scripts.py",
    "shared/portfolio/locks.py",
    "shared/safety/limits.py",
    "shared/safety/symbols.py",
    "shared/safety/rate_limit.py",
    "shared/bus/publisher.py",
    "shared/bus/consumer.py",
    "shared/bus/idempotency.py",
]
PORTFOLIO, SAFETY = "tests/shared/portfolio/", "tests/shared/safety/"  # the mirror tests of each package
TESTS = [
    PORTFOLIO + "test_portfolio.py",
    PORTFOLIO + "test_money_core.py",
    PORTFOLIO + "test_money_core_edges.py",
    PORTFOLIO + "test_portfolio_stateful.py",
    PORTFOLIO + "test_locks.py",
    SAFETY + "test_limits.py",
    SAFETY + "test_symbols.py",
    SAFETY + "test_rate_limit.py",
]
# A module none of TESTS exercises is also run against its own mirror test.
EXTRA_TESTS = {module: ["tests/shared/bus/test_bus.py"]
               for module in MODULES if module.startswith("shared/bus/")}
# The tests that run first for a module's mutants (with -x, a kill comes sooner; same verdicts).
FIRST = {
    "shared/portfolio/_state.py": [PORTFOLIO + "test_money_core.py", PORTFOLIO + "test_portfolio.py"],
    "shared/portfolio/portfolio.py": [PORTFOLIO + "test_money_core.py", PORTFOLIO + "test_portfolio.py"],
    "shared/portfolio/_scripts.py": [PORTFOLIO + "test_money_core.py", PORTFOLIO + "test_portfolio.py"],
    "shared/portfolio/locks.py": [PORTFOLIO + "test_locks.py"],
    "shared/safety/limits.py": [SAFETY + "test_limits.py", PORTFOLIO + "test_money_core.py"],
    "shared/safety/symbols.py": [SAFETY + "test_symbols.py", PORTFOLIO + "test_money_core.py"],
    "shared/safety/rate_limit.py": [SAFETY + "test_rate_limit.py", SAFETY + "test_limits.py"],
}


def tests_for(module: str) -> list[str]:
    """TESTS and the module's extra tests, its own first and the slow stateful test last."""
    chosen = EXTRA_TESTS.get(module, []) + FIRST.get(module, []) + TESTS
    ordered = list(dict.fromkeys(chosen))
    return sorted(ordered, key=lambda test: test.endswith("_stateful.py"))
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not multiprocess", "--hypothesis-seed=0"]
# Reviewed survivors that change no behaviour: (module, mutated line as written, mutant's
# description) -> why it is equivalent.
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("shared/safety/rate_limit.py", "if frees > wait then wait = frees end", "lua >->>="):
        "when frees == wait the assignment leaves wait as it was",
    ("shared/portfolio/portfolio.py", 'state = (state_from_held(held.raw, rid or "") if held is not None',
     "drop operand 2"):
        "with a held lock rid is always a reservation id (only reserve passes held): rid or '' is rid",
    ("shared/portfolio/_scripts.py", "return {'ok', version + 1, id, release()}", "lua +->swap"):
        "no caller reads the version of an 'ok' reply (only the verdict and the released flag)",
    ("shared/portfolio/_scripts.py", "local RECENT_OPS_CHARS = 16 * 33 - 1", "lua -->swap"):
        "two more characters keep a space and one character of a 17th id, which no 32-digit op id "
        "can match: the same 16 ids are recognised",
    ("shared/portfolio/_scripts.py", "local RECENT_OPS_CHARS = 16 * 33 - 1", "lua 33->34"):
        "16 more characters keep a space and 15 characters of a 17th id, which no 32-digit op id "
        "can match: the same 16 ids are recognised",
    ("shared/portfolio/_scripts.py", "return {'ok', version + 1, id, release()}", "lua 1->2"):
        "no caller reads the version of an 'ok' reply (only the verdict and the released flag)",
    ("shared/portfolio/reads.py", "def read_ledger(client: redis.Redis, keys: Keys, account: str, "
     "batch: int = 1000) -> Iterator[dict[str, str]]:", "1000->1001"):
        "the page size of a read that pages to the end: every batch size reads the same entries",
    ("shared/portfolio/_state.py", "if held == 0 or (held > 0) == (signed_qty > 0):", ">->>="):
        "held is not 0 past the first operand and signed_qty is never 0: > and >= agree",
    ("shared/portfolio/_state.py", "direction = 1 if held > 0 else -1", ">->>="):
        "held is not 0 on this path (a flat position grows instead): > and >= agree",
    ("shared/portfolio/_state.py", "MONEY_CONTEXT = Context(prec=40, rounding=ROUND_HALF_EVEN)", "40->41"):
        "one more digit before the average cost's quantize to 1E-10: amounts are exact already",
    ("shared/portfolio/_state.py", 'parts = dict(item.split("=", 1) for item in raw.split())', "1->2"):
        "no encoded value holds '=': splitting at most twice splits once",
    ("shared/portfolio/_state.py", "fence: int = 0", "0->1"):
        "fencing tokens start at 1, so max(1, token) is the token; reads set the fence explicitly",
    ("shared/portfolio/_state.py", "elif (new_qty > 0) != (held > 0):", ">->>="):
        "neither new_qty nor held is 0 on this path: > and >= agree",
    ("shared/portfolio/locks.py", "client, keys.lock(resource), timeout=lease_ms / 1000, blocking=True,",
     "1000->1001"):
        "redis-py's timeout is read only by Lock.do_acquire/reacquire, which FencedLock replaces or "
        "never calls: its lease is lease_ms, sent by _attempt",
    ("shared/portfolio/locks.py", "blocking_timeout=wait_ms / 1000, thread_local=False,", "1000->1001"):
        "redis-py's blocking_timeout is read only by Lock.acquire, which FencedLock replaces (it waits "
        "wait_ms)",
    **{("shared/safety/limits.py",
        "if not is_reducing(order.side, position) and not is_reducing(order.side, opened):", kind):
       "is_day_trade returns is_reducing(side, opened_today) whatever this guard says (its False is the "
       "final return's too); dropping a part of it can only matter on a snapshot whose opened_today is "
       "not within the position, which account_activity never builds"
       for kind in ("drop not", "drop operand 1", "drop operand 2", "if->False")},
    **{("shared/safety/limits.py", "group=self.GROUP, clock=clock or LiveClock())", kind):
        "RateLimiter defaults a missing clock to a LiveClock itself, and admit() never reads the clock"
       for kind in ("drop operand 1", "drop operand 2")},
    ("shared/safety/symbols.py", "ctx.prec = 60", "60->61"):
        "one more digit of working precision: the quotients rounded here are exact at 60 already",
    ("shared/safety/rate_limit.py", "if current > untl then untl = current end", "lua >->>="):
        "when current == untl the assignment leaves untl as it was",
    ("shared/bus/consumer.py",
     "rows = self.client.xpending_range(self.stream_key, self.group, lo, hi, len(ids) + 16,",
     "16->17"):
        "a count with one more row of slack: the rows are looked up by the ids asked for",
}

_PY_COMPARE = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==",
               "is": "is not", "is not": "is", "in": "not in", "not in": "in"}
_LUA_COMPARE = {b"<": b"<=", b"<=": b"<", b">": b">=", b">=": b">", b"==": b"~=", b"~=": b"=="}
_COMPARE_RE = re.compile(rb"<=|>=|==|!=|<|>|\bis\s+not\b|\bis\b|\bnot\s+in\b|\bin\b")


@dataclass(frozen=True)
class Mutant:
    """One mutation: replace ``source[start:end]`` (bytes) of ``module`` with ``new``."""

    module: str
    start: int
    end: int
    new: bytes
    kind: str
    line: int

    @property
    def ident(self) -> str:
        return f"{self.module}:{self.line}:{self.start}:{self.kind.replace(' ', '_')}"

    def apply(self, source: bytes) -> bytes:
        return source[:self.start] + self.new + source[self.end:]

    def line_text(self, source: bytes) -> str:
        return source.decode().splitlines()[self.line - 1].strip()

    def diff(self, source: bytes) -> str:
        old, new = source.decode().splitlines(), self.apply(source).decode().splitlines()
        return "\n".join(difflib.unified_diff(old, new, self.module, f"{self.module} (mutant)",
                                              n=1, lineterm=""))


# -- finding mutations ---------------------------------------------------------------------------

class _Finder(ast.NodeVisitor):
    """Collects the mutations of one module's source."""

    def __init__(self, module: str, source: bytes) -> None:
        self.module, self.src = module, source
        self.line_starts = [0]
        for index, byte in enumerate(source):
            if byte == 0x0A:
                self.line_starts.append(index + 1)
        self.found: list[Mutant] = []

    def offset(self, line: int, col: int) -> int:
        return self.line_starts[line - 1] + col  # ast columns are UTF-8 byte offsets

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.offset(node.lineno, node.col_offset),  # type: ignore[attr-defined]
                self.offset(node.end_lineno, node.end_col_offset))  # type: ignore[attr-defined]

    def add(self, start: int, end: int, new: bytes, kind: str) -> None:
        line = self.src.count(b"\n", 0, start) + 1
        self.found.append(Mutant(self.module, start, end, new, kind, line))

    def text(self, node: ast.AST) -> bytes:
        start, end = self.span(node)
        return self.src[start:end]

    # nodes left alone: docstrings, f-strings, log calls, __all__
    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "log":
            return
        if isinstance(func, ast.Name) and func.id in ("min", "max"):
            start, end = self.span(func)
            self.add(start, end, b"max" if func.id == "min" else b"min", f"{func.id}->swap")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        self.visit(node.value)  # an index (``reply[0]``, ``KEYS[1]``) is wiring, not a constant
        if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)):
            self.visit(node.slice)

    def visit_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for left, right in itertools.pairwise(operands):
            start, end = self.span(left)[1], self.span(right)[0]
            match = _COMPARE_RE.search(self.src, start, end)
            if match is not None:
                op = re.sub(rb"\s+", b" ", match.group()).decode()
                self.add(match.start(), match.end(), _PY_COMPARE[op].encode(), f"{op}->{_PY_COMPARE[op]}")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        textual = any(isinstance(x, ast.JoinedStr)
                      or (isinstance(x, ast.Constant) and isinstance(x.value, str))
                      for x in (node.left, node.right))
        if isinstance(node.op, ast.Add | ast.Sub) and not textual:
            start, end = self.span(node.left)[1], self.span(node.right)[0]
            sign = b"+" if isinstance(node.op, ast.Add) else b"-"
            at = self.src.find(sign, start, end)
            if at >= 0:
                self.add(at, at + 1, b"-" if sign == b"+" else b"+", f"{sign.decode()}->swap")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.op, ast.Add | ast.Sub):
            start, end = self.span(node.target)[1], self.span(node.value)[0]
            old = b"+=" if isinstance(node.op, ast.Add) else b"-="
            at = self.src.find(old, start, end)
            if at >= 0:
                self.add(at, at + 2, b"-=" if old == b"+=" else b"+=", f"{old.decode()}->swap")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        joiner = b" and " if isinstance(node.op, ast.And) else b" or "
        start, end = self.span(node)
        for index in range(len(node.values)):
            kept = [b"(" + self.text(v) + b")" for i, v in enumerate(node.values) if i != index]
            self.add(start, end, b"(" + joiner.join(kept) + b")", f"drop operand {index + 1}")
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        start, end = self.span(node.test)
        self.add(start, end, b"False", "if->False")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            start = self.span(node)[0]
            self.add(start, self.span(node.operand)[0], b"", "drop not")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, int) and not isinstance(value, bool):
            start, end = self.span(node)
            self.add(start, end, str(value + 1).encode(), f"{value}->{value + 1}")
        elif isinstance(value, str) and "redis.call" in value:
            start, end = self.span(node)
            body = self.src[start:end]
            quote = body[:3] if body[:3] in (b'"""', b"'''") else body[:1]
            if b"\\" not in body and quote in (b'"""', b"'''", b'"', b"'"):  # a plain literal
                self.found.extend(_lua_mutants(self, start + len(quote), end - len(quote)))


def _lua_mutants(finder: _Finder, start: int, end: int) -> Iterator[Mutant]:
    """The Lua script in ``src[start:end]``: comparisons, binary +/-, math.max/min, integers."""
    src, i = finder.src, start
    previous = b""  # the last significant byte before ``i`` (for telling binary minus)
    while i < end:
        two, one = src[i:i + 2], src[i:i + 1]
        if two == b"--":  # a comment, to the end of the line
            i = src.find(b"\n", i, end) if src.find(b"\n", i, end) >= 0 else end
            continue
        if one in (b"'", b'"'):  # a string literal
            close = src.find(one, i + 1, end)
            i, previous = (close + 1 if close >= 0 else end), one
            continue
        if two in _LUA_COMPARE:
            flipped = _LUA_COMPARE[two]
            yield _lua(finder, i, i + 2, flipped, f"lua {two.decode()}->{flipped.decode()}")
            i, previous = i + 2, two[-1:]
            continue
        if one in (b"<", b">"):
            flipped = _LUA_COMPARE[one]
            yield _lua(finder, i, i + 1, flipped, f"lua {one.decode()}->{flipped.decode()}")
        elif one in (b"+", b"-") and (previous.isalnum() or previous in (b")", b"]", b"_")):
            yield _lua(finder, i, i + 1, b"-" if one == b"+" else b"+", f"lua {one.decode()}->swap")
        elif src.startswith((b"math.max", b"math.min"), i):
            other = b"math.min" if src.startswith(b"math.max", i) else b"math.max"
            yield _lua(finder, i, i + 8, other, f"lua {src[i:i + 8].decode()}->swap")
            i, previous = i + 8, b"x"
            continue
        elif one.isdigit() and not (previous.isalnum() or previous in (b"_", b".", b"[")):
            stop = i
            while stop < end and src[stop:stop + 1].isdigit():
                stop += 1
            if not src[stop:stop + 1].isalpha() and src[stop:stop + 1] != b".":
                value = int(src[i:stop])
                yield _lua(finder, i, stop, str(value + 1).encode(), f"lua {value}->{value + 1}")
            i, previous = stop, b"0"
            continue
        if not one.isspace():
            previous = one
        i += 1


def _lua(finder: _Finder, start: int, end: int, new: bytes, kind: str) -> Mutant:
    line = finder.src.count(b"\n", 0, start) + 1
    return Mutant(finder.module, start, end, new, kind, line)


def candidates(root: Path) -> dict[str, list[Mutant]]:
    """Every candidate mutation, by module."""
    out: dict[str, list[Mutant]] = {}
    for module in MODULES:
        source = (root / module).read_bytes()
        finder = _Finder(module, source)
        finder.visit(ast.parse(source))
        out[module] = sorted(set(finder.found), key=lambda m: (m.start, m.kind))
    return out


def sample(found: dict[str, list[Mutant]], count: int, seed: int, floor: int = 3) -> list[Mutant]:
    """``count`` mutants: ``floor`` from every module, the rest shared in proportion to each module's
    candidates; each module's draw is seeded by ``seed`` and its name, so an edit to one module
    leaves the other modules' draws as they were."""
    total = sum(len(v) for v in found.values())
    spare = max(0, count - floor * len(found))
    shares = {m: spare * len(v) / total for m, v in found.items()}
    quota = {m: floor + int(share) for m, share in shares.items()}
    by_remainder = sorted(found, key=lambda m: (int(shares[m]) - shares[m], m))
    for module in by_remainder[:max(0, count - sum(quota.values()))]:
        quota[module] += 1
    picked: list[Mutant] = []
    for module, mutants in found.items():
        drawn = list(mutants)
        random.Random(f"{seed}:{module}").shuffle(drawn)
        picked += drawn[:quota[module]]
    return picked


# -- running -------------------------------------------------------------------------------------

def copy_repo(tests_rev: str | None) -> Path:
    """The repository (sources and tests, not .git or the venv) in a new temporary directory."""
    target = Path(tempfile.mkdtemp(prefix="bastion-mutants-"))
    ignore = shutil.ignore_patterns(".git", ".venv", "var", "__pycache__", ".hypothesis", ".pytest_cache",
                                    "*.egg-info", ".mypy_cache", ".ruff_cache")
    for name in ("shared", "services", "tests", "ops"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, target / name, ignore=ignore)
    for name in ("pyproject.toml", "constraints.txt"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, target / name)
    if tests_rev is not None:
        for path in TESTS + [t for extra in EXTRA_TESTS.values() for t in extra]:
            shown = subprocess.run(["git", "-C", str(REPO), "show", f"{tests_rev}:{path}"],
                                   capture_output=True, check=False)
            if shown.returncode == 0:
                (target / path).write_bytes(shown.stdout)
            else:
                (target / path).unlink(missing_ok=True)
    return target


_RUNNING: set[subprocess.Popen[bytes]] = set()  # the pytest sessions started and not yet ended
_STOP = threading.Event()  # set on SIGTERM/SIGINT: start no more mutants


def _stop(signum: int, _: object) -> None:
    """SIGTERM or SIGINT: end the pytest sessions this run started, start no more, clean up."""
    _STOP.set()
    for proc in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # each its own session (start_new_session)
    raise SystemExit(128 + signum)


def _env(root: Path) -> dict[str, str]:
    """The environment of every pytest run on ``root`` (the baseline's and each mutant's alike).
    Not named BASTION_*: the settings read that prefix and refuse a key they do not know."""
    return {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1",
            "MUTATION_SAMPLE_NO_SHRINK": "1"}  # a kill needs a failure, not its smallest example


def run_tests(root: Path, tests: list[str], extra: list[str], timeout: float) -> tuple[str, str]:
    """Run pytest on ``tests`` in ``root``: ("passed" | "failed" | "timeout", its output)."""
    env = _env(root)
    shutil.rmtree(root / ".hypothesis", ignore_errors=True)  # no example carried between mutants
    present = [t for t in tests if (root / t).exists()]
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *PYTEST_ARGS, *extra, *present], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    _RUNNING.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this call started, and only it
        out, _ = proc.communicate()
        return "timeout", out.decode(errors="replace")
    finally:
        _RUNNING.discard(proc)
    return ("passed" if proc.returncode == 0 else "failed"), out.decode(errors="replace")


def baseline(root: Path, tests: list[str], timeout: float) -> list[str]:
    """Run the unmutated copy; the ids of the tests that fail there (to deselect), or exit."""
    check = subprocess.run([sys.executable, "-c", "import shared.portfolio as m; print(m.__file__)"],
                           cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                           text=True, check=True)
    if not check.stdout.strip().startswith(str(root)):
        sys.exit(f"the copy does not import its own sources: {check.stdout.strip()}")
    env = _env(root)
    args = [a for a in PYTEST_ARGS if a != "-x"]
    done = subprocess.run([sys.executable, "-m", "pytest", *args, "-rf",
                           *[t for t in tests if (root / t).exists()]],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout * 3, check=False)
    failing = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.MULTILINE)
    if done.returncode not in (0, 1) or (done.returncode == 1 and not failing):
        sys.exit(f"the unmutated tests do not run:\n{done.stdout[-3000:]}")
    return failing


@dataclass
class Result:
    mutant: Mutant
    verdict: str  # killed | timeout | survived
    seconds: float


def run(mutants: list[Mutant], master: Path, jobs: int, timeout: float, budget: float) -> list[Result]:
    """Run every mutant, ``jobs`` at a time, each worker on its own copy of ``master``; the ones
    not started within ``budget`` seconds are skipped."""
    deadline = time.monotonic() + budget
    roots = [Path(tempfile.mkdtemp(prefix="bastion-mutants-")) / "repo" for _ in range(jobs)]
    for root in roots:
        shutil.copytree(master, root)
    try:
        all_tests = TESTS + [t for extra in EXTRA_TESTS.values() for t in extra]
        failing = baseline(roots[0], all_tests, timeout)
        for name in failing:
            print(f"deselected (fails unmutated): {name}")
        deselect = [f"--deselect={name}" for name in failing]
        free = list(roots)
        lock = threading.Lock()
        results: list[Result] = []

        def one(mutant: Mutant) -> Result:
            if time.monotonic() > deadline or _STOP.is_set():
                return Result(mutant, "skipped", 0.0)
            with lock:
                root = free.pop()
            path = root / mutant.module
            original = path.read_bytes()
            started = time.monotonic()
            try:
                path.write_bytes(mutant.apply(original))
                verdict, _ = run_tests(root, tests_for(mutant.module), deselect, timeout)
            finally:
                path.write_bytes(original)
                with lock:
                    free.append(root)
            result = Result(mutant, {"passed": "survived", "failed": "killed"}.get(verdict, verdict),
                            time.monotonic() - started)
            with lock:
                results.append(result)
                print(f"[{len(results):>3}/{len(mutants)}] {result.verdict:<8} {result.seconds:5.1f}s "
                      f"{mutant.ident}", flush=True)
            return result

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            ordered = list(pool.map(one, mutants))
        return ordered
    finally:
        for root in roots:
            shutil.rmtree(root.parent, ignore_errors=True)


def report(results: list[Result], sources: dict[str, bytes]) -> None:
    """Killed/survived per module, the kill rate, and every survivor's diff."""
    by_module: dict[str, list[Result]] = defaultdict(list)
    for result in results:
        by_module[result.mutant.module].append(result)
    survivors, equivalent = [], []
    print(f"\n{'module':<30} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'equiv':>5}")
    for module in MODULES:
        rows = [r for r in by_module.get(module, []) if r.verdict != "skipped"]
        alive = [r for r in rows if r.verdict == "survived"]
        same = [r for r in alive if _equivalence(r.mutant, sources[module]) is not None]
        survivors += [r for r in alive if r not in same]
        equivalent += same
        print(f"{module:<30} {len(rows):>7} {sum(r.verdict == 'killed' for r in rows):>7} "
              f"{sum(r.verdict == 'timeout' for r in rows):>7} {len(alive):>8} {len(same):>5}")
    skipped = sum(r.verdict == "skipped" for r in results)
    if skipped:
        print(f"\n{skipped} mutants skipped (the time budget ran out): left out of the rates")
    results = [r for r in results if r.verdict != "skipped"]
    total = len(results)
    killed = sum(r.verdict in ("killed", "timeout") for r in results)
    changing = total - len(equivalent)
    print(f"\nkilled {killed}/{total} = {killed / max(total, 1):.0%} of all sampled mutants; "
          f"{killed}/{changing} = {killed / max(changing, 1):.0%} of behaviour-changing ones "
          f"({len(equivalent)} reviewed as equivalent)")
    for result in equivalent:
        mutant = result.mutant
        print(f"\nEQUIVALENT {mutant.ident}: {_equivalence(mutant, sources[mutant.module])}")
        print(mutant.diff(sources[mutant.module]))
    for result in survivors:
        mutant = result.mutant
        print(f"\nSURVIVED {mutant.ident}\n{mutant.diff(sources[mutant.module])}")


def _equivalence(mutant: Mutant, source: bytes) -> str | None:
    return EQUIVALENT.get((mutant.module, mutant.line_text(source), mutant.kind))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=40, help="mutants to sample (default 40)")
    parser.add_argument("--seed", type=int, default=20260102, help="sampling seed")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per mutant (default 150)")
    parser.add_argument("--budget", type=float, default=840.0,
                        help="seconds after which no new mutant is started (default 840)")
    parser.add_argument("--tests-rev", help="run the test files as they are at this git revision")
    parser.add_argument("--list", action="store_true", help="print the sample and exit")
    parser.add_argument("--only", action="append", default=[], help="run only this mutant id (repeatable)")
    parser.add_argument("--all-of", action="append", default=[], metavar="MODULE",
                        help="run every candidate of this module instead of a sample (repeatable)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    master = copy_repo(args.tests_rev)  # one snapshot: sampled, mutated and reported alike
    try:
        found = candidates(master)
        sources = {module: (master / module).read_bytes() for module in MODULES}
        print("candidates: " + ", ".join(f"{m.removeprefix('shared/')} {len(v)}" for m, v in found.items()))
        if args.only or args.all_of:
            chosen = [m for mutants in found.values() for m in mutants
                      if m.ident in set(args.only) or m.module in set(args.all_of)]
        else:
            chosen = sample(found, args.count, args.seed)
        if args.list:
            for mutant in chosen:
                print(mutant.ident)
                print(mutant.diff(sources[mutant.module]))
            return 0
        started = time.monotonic()
        results = run(chosen, master, args.jobs, args.timeout, args.budget)
        report(results, sources)
        print(f"\n{len(results)} mutants in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        shutil.rmtree(master, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
