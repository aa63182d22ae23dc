"""A test client for the HTTP API that checks every reply against ``services/api/openapi.yaml``.

:class:`Api` serves :func:`services.api.build_app` with aiohttp's test server, one request per
event loop, so a synchronous test calls it like a function. Each reply is validated (jsonschema,
JSON Schema 2020-12, which OpenAPI 3.1 uses) against the spec's schema for its path, method and
status (or the operation's ``default``): a route answering something its spec does not describe
fails the test that made the request.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator

from services.api import Desk, Tokens, build_app

SPEC_PATH = Path(__file__).resolve().parents[3] / "services" / "api" / "openapi.yaml"
READ, OPERATOR = "read-token-for-tests", "operator-token-for-tests"
TOKENS = Tokens(read=READ, operator=OPERATOR)


@cache
def spec() -> dict[str, Any]:
    """The OpenAPI document."""
    loaded: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return loaded


def operation(method: str, path: str) -> dict[str, Any] | None:
    """The spec's operation for a concrete ``path`` (its template matched), None if none."""
    for template, item in spec()["paths"].items():
        pattern = "^" + re.sub(r"\{[^/]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            found: dict[str, Any] = item[method.lower()]
            return found
    return None


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node and len(node) == 1:
        target: Any = spec()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def check_reply(method: str, path: str, status: int, body: Any) -> None:
    """Fail unless the spec describes ``body`` as a reply of ``method path`` with ``status`` (a path
    or method the spec lacks can only be answered with an error)."""
    found = operation(method, path)
    if found is None:
        assert status >= 400, f"{method} {path} is not in the spec but answered {status}"
        schema: dict[str, Any] = {"$ref": "#/components/schemas/Error"}
    else:
        response = _resolve(found["responses"].get(str(status)) or found["responses"]["default"])
        schema = response["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": spec()["components"]},
                         format_checker=Draft202012Validator.FORMAT_CHECKER).validate(body)


@dataclass(frozen=True)
class Reply:
    """An answer: its status, JSON body and headers."""

    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Api:
    """Requests to the API of one desk, as a holder of ``token`` (``None``: no Authorization header)."""

    desk: Desk
    tokens: Tokens = TOKENS

    def request(self, method: str, path: str, *, token: str | None = OPERATOR, json: Any = None,
                data: str | bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        """One request, its reply checked against the spec."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"

        async def go() -> Reply:
            async with TestClient(TestServer(build_app(self.desk, self.tokens))) as client:
                response = await client.request(method, path, headers=sent, json=json, data=data)
                assert response.content_type == "application/json", await response.text()
                return Reply(response.status, await response.json(), dict(response.headers))

        reply = asyncio.run(go())
        check_reply(method, path.partition("?")[0], reply.status, reply.body)
        return reply

    def get(self, path: str, *, token: str | None = READ, **kwargs: Any) -> Reply:
        """GET ``path`` (with the read-only token unless told)."""
        return self.request("GET", path, token=token, **kwargs)

    def post(self, path: str, json: Any = None, *, token: str | None = OPERATOR, **kwargs: Any) -> Reply:
        """POST ``json`` to ``path`` (with the operator token unless told)."""
        return self.request("POST", path, token=token, json=json, **kwargs)
