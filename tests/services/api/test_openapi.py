"""services/api/openapi.yaml: it describes exactly the app's routes, its schemas are valid JSON
Schema, and the test client's check of every reply against it is not vacuous."""

from __future__ import annotations

import pytest
import redis
from jsonschema import Draft202012Validator, ValidationError

from services.api import Desk, build_app
from shared.clock import LiveClock
from shared.config import Settings
from shared.keys import Keys
from tests.services.api.client import TOKENS, check_reply, spec

pytestmark = pytest.mark.usefixtures("clean_environment")


def test_the_spec_lists_every_route_and_nothing_else() -> None:
    """Each route of the app (method and path) is a path operation of the spec, and the reverse."""
    desk = Desk(Settings(), redis.Redis(), Keys(), LiveClock(), lambda: pytest.fail("no broker"))
    app = build_app(desk, TOKENS)
    routes = {(route.method.lower(), route.resource.canonical) for route in app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    documented = {(method, path) for path, item in spec()["paths"].items() for method in item
                  if method in ("get", "post", "put", "patch", "delete")}
    assert routes == documented


def test_every_schema_is_valid_json_schema() -> None:
    """Every component schema passes the 2020-12 metaschema (what OpenAPI 3.1 uses)."""
    assert spec()["openapi"].startswith("3.1")
    for schema in spec()["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_every_operation_needs_the_token_but_health() -> None:
    """Security: the bearer scheme applies everywhere; only /health opts out."""
    assert spec()["security"] == [{"bearer": []}]
    open_routes = [path for path, item in spec()["paths"].items() for op in item.values()
                   if op.get("security") == []]
    assert open_routes == ["/health"]


@pytest.mark.parametrize(("method", "path", "status", "body"), [
    ("GET", "/health", 200, {"status": "ok"}),
    ("GET", "/api/v1/portfolio", 200, {"cash": 1}),
    ("GET", "/api/v1/fills", 200, {"fills": [{"entry_id": "1-0"}]}),
    ("POST", "/api/v1/orders", 202, {"intent_id": "i", "decision": "maybe"}),
    ("GET", "/api/v1/status", 401, {"message": "no"}),
    ("GET", "/api/v1/nothing", 200, {"error": "x"}),
])
def test_the_reply_check_refuses_what_the_spec_does_not_describe(method: str, path: str, status: int,
                                                                 body: object) -> None:
    """A reply of the wrong shape (or a success on a path the spec lacks) fails the check."""
    with pytest.raises((ValidationError, AssertionError)):
        check_reply(method, path, status, body)
