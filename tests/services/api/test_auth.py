"""The API's tokens (services/api/_auth.py): generated once into 0600 files, compared by role."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from services.api import Role, Tokens
from shared.config import Settings
from shared.redis.server import PASSWORD_FILE, secret_file

pytestmark = pytest.mark.usefixtures("clean_environment")


class TestTokenFiles:
    def test_generated_once_mode_0600_beside_the_redis_password(self, tmp_path: Path) -> None:
        """At first load both tokens are generated into 0600 files in the embedded Redis's data
        directory, distinct from each other and from its password; a later load reads them back."""
        settings = Settings(embedded_redis={"data_dir": tmp_path})
        password = secret_file(tmp_path, PASSWORD_FILE)
        first = Tokens.load(settings)
        assert Tokens.files(settings) == [tmp_path / "api-read-token", tmp_path / "api-operator-token"]
        for path in Tokens.files(settings):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len({first.read, first.operator, password}) == 3 and len(first.read) >= 32
        assert Tokens.load(settings) == first
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["api-operator-token", "api-read-token", "password"]  # no draft left behind

    def test_file_names_from_the_settings(self, tmp_path: Path) -> None:
        """``api.read_token_file`` / ``api.operator_token_file`` name the files (absolute paths as given)."""
        elsewhere = tmp_path / "other" / "op"
        settings = Settings(embedded_redis={"data_dir": tmp_path / "redis"},
                            api={"read_token_file": "r", "operator_token_file": str(elsewhere)})
        tokens = Tokens.load(settings)
        assert (tmp_path / "redis" / "r").read_text() == tokens.read
        assert elsewhere.read_text() == tokens.operator


class TestRole:
    tokens = Tokens(read="read-secret", operator="operator-secret")

    @pytest.mark.parametrize(("header", "role"), [
        ("Bearer read-secret", Role.READ), ("Bearer operator-secret", Role.OPERATOR),
        ("bearer  operator-secret ", Role.OPERATOR), ("Bearer read-secretx", None), ("Bearer ", None),
        ("Basic read-secret", None), ("read-secret", None), ("", None), (None, None),
    ])
    def test_role_of_a_header(self, header: str | None, role: Role | None) -> None:
        """Only ``Bearer <token>`` with one of the two tokens has a role."""
        assert self.tokens.role(header) is role
