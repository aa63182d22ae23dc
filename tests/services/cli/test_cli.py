"""Tests for services.cli: the ``bastion`` command's parser, subcommand discovery and exit statuses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import services.cli.commands
from services.cli._context import EXIT_UNAVAILABLE, EXIT_USAGE
from services.cli.service import build_parser, main
from shared.redis.connection import connect_url
from shared.redis.server import RedisServer
from tests.support.environment import clean_env
from tests.support.processes import REPO_ROOT, free_port

pytestmark = pytest.mark.usefixtures("clean_environment")

FAKE_COMMANDS = {
    "hello": """
        from services.cli._context import Context

        def register(subparsers):
            parser = subparsers.add_parser("hello", help="load settings and report the prefix")
            parser.add_argument("--status", type=int, default=0)
            parser.set_defaults(func=run)

        def run(args):
            context = Context.load()
            print(f"prefix={context.settings.key_prefix}")
            return args.status
        """,
    "down": """
        from shared.errors import RedisUnavailable

        def register(subparsers):
            subparsers.add_parser("down").set_defaults(func=run)

        def run(args):
            raise RedisUnavailable("Redis did not answer within 5s")
        """,
    "_private": "raise RuntimeError('a _private module must not be imported as a subcommand')\n",
}


@pytest.fixture
def fake_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """services.cli discovers its subcommands in a directory holding hello.py, down.py and _private.py."""
    for name, source in FAKE_COMMANDS.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.setattr(services.cli.commands, "__path__", [str(tmp_path)])
    yield tmp_path
    for name in FAKE_COMMANDS:
        sys.modules.pop(f"services.cli.commands.{name}", None)


class TestUsage:
    def test_no_arguments_exits_2_with_usage(self, capsys: pytest.CaptureFixture[str]) -> None:
        """main([]) exits with status 2 and prints the usage line naming the program."""
        with pytest.raises(SystemExit) as info:
            main([])
        assert info.value.code == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith("usage: bastion")
        assert "COMMAND" in err

    def test_console_script_without_arguments(self) -> None:
        """The installed `bastion` command with no arguments exits 2 with usage on stderr."""
        script = Path(sys.executable).parent / "bastion"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]
        result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 2
        assert "usage: bastion" in result.stderr

    def test_python_dash_m(self) -> None:
        """`python -m services.cli --help` prints the description and exits 0."""
        result = subprocess.run([sys.executable, "-m", "services.cli", "--help"], cwd=REPO_ROOT,
                                env=clean_env(), capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0
        assert "Watch and steer a Bastion deployment." in result.stdout

    @pytest.mark.parametrize("symbol", ["", "A A", "$$$"])
    def test_an_argument_the_message_refuses_exits_2_without_a_traceback(
            self, capsys: pytest.CaptureFixture[str], clean_environment: None, symbol: str) -> None:
        """``bastion order buy '' 1`` (or a symbol the Intent refuses) exits 2 with the field and
        why, before it connects to anything, and prints no traceback."""
        assert main(["order", "buy", symbol, "1"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith("bastion order: error: symbol: ") and "Traceback" not in err

    def test_unknown_subcommand_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An unknown subcommand is a usage error (status 2) naming it."""
        with pytest.raises(SystemExit) as info:
            main(["no-such-command"])
        assert info.value.code == EXIT_USAGE
        assert "no-such-command" in capsys.readouterr().err


class TestDiscovery:
    def test_public_modules_become_subcommands(self, fake_commands: Path) -> None:
        """Every public module of the package registers its subcommand; _private modules are skipped."""
        parser = build_parser()
        assert parser.prog == "bastion"
        args = parser.parse_args(["hello", "--status", "1"])
        assert args.command == "hello" and args.status == 1 and callable(args.func)
        assert parser.parse_args(["down"]).command == "down"

    def test_subcommand_status_returned(self, fake_commands: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
        """main returns the subcommand's status, and the subcommand sees valid settings."""
        assert main(["hello"]) == 0
        assert capsys.readouterr().out == "prefix=bastion\n"
        assert main(["hello", "--status", "1"]) == 1


class TestErrors:
    def test_bad_setting_returns_2_naming_it(self, fake_commands: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
        """A bad BASTION_ setting makes main return 2 with a ConfigError naming the field, no traceback."""
        monkeypatch.setenv("BASTION_BUS__BATCH", "-1")
        assert main(["hello"]) == EXIT_USAGE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "invalid configuration" in captured.err and "bus.batch" in captured.err
        assert "Traceback" not in captured.err

    def test_unknown_setting_returns_2(self, fake_commands: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
        """A misspelt BASTION_ variable makes main return 2 naming the variable."""
        monkeypatch.setenv("BASTION_KEYPREFIX", "x")
        assert main(["hello"]) == EXIT_USAGE
        assert "BASTION_KEYPREFIX" in capsys.readouterr().err

    def test_redis_unavailable_returns_3(self, fake_commands: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
        """RedisUnavailable from a subcommand makes main return 3 with the reason on stderr."""
        assert main(["down"]) == EXIT_UNAVAILABLE
        assert "Redis did not answer" in capsys.readouterr().err

    def test_redis_refusing_writes_exits_3_saying_nothing_was_written(self, tmp_path: Path) -> None:
        """`bastion kill-switch on` against a Redis whose memory is full exits 3 with a sentence, no
        traceback; a read (`bastion verify`) still works."""
        server = RedisServer(free_port(), tmp_path / "redis", appendonly=False)
        server.start()
        try:
            connect_url(server.url).config_set("maxmemory", 1)
            env = clean_env() | {"REDIS_URL": server.url}
            command = [sys.executable, "-m", "services.cli", "kill-switch", "on", "--reason", "drill"]
            engage = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                    timeout=60)
            verify = subprocess.run([sys.executable, "-m", "services.cli", "verify"], cwd=REPO_ROOT, env=env,
                                    capture_output=True, text=True, timeout=60)
        finally:
            server.stop()
        assert engage.returncode == EXIT_UNAVAILABLE, engage.stderr
        assert "Redis refuses writes now, so nothing was written" in engage.stderr
        assert "Traceback" not in engage.stderr
        assert verify.returncode == 0, verify.stderr

    def test_real_subcommand_with_bad_setting_exits_2(self) -> None:
        """`bastion verify` with a bad BASTION_ value exits 2 naming the field, before touching Redis."""
        script = Path(sys.executable).parent / "bastion"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]
        env = clean_env() | {"BASTION_BUS__BATCH": "-1", "REDIS_URL": "redis://127.0.0.1:1/0"}
        result = subprocess.run([*command, "verify"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == EXIT_USAGE, result.stderr
        assert "bus.batch" in result.stderr
        assert "Traceback" not in result.stderr
