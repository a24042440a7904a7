"""The OpenAPI document: valid OpenAPI 3.1, every served route in it, its
bodies the contracts/ models, and a docs page that needs no network.
(schemathesis runs it against a live stack in test_every_route.)"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.openapi import Undocumented, operations
from tests.test_every_route import dev_app, route_table

with warnings.catch_warnings():
    # Starlette would rather have httpx2; httpx is what this project has.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    return TestClient(dev_app(tmp_path))  # no lifespan: no broker is needed to serve the document


def _document(client: TestClient) -> dict[str, Any]:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    document: dict[str, Any] = answer.json()
    return document


def test_the_document_is_valid_openapi_3_1_and_names_every_route(
    client: TestClient, tmp_path: Path
) -> None:
    document = _document(client)
    validate(document)
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path) for path, methods in document["paths"].items() for method in methods
    }
    (tmp_path / "table").mkdir()
    # Browser pages (/admin, /portal) are HTML, not API operations.
    served = {
        (method, path)
        for method, path in route_table(tmp_path / "table")
        if not path.startswith(("/admin", "/portal"))
    }
    assert documented == served
    assert ("POST", "/v1/validate") in documented  # served in front of the router


def test_bodies_and_answers_are_the_contracts_models(client: TestClient) -> None:
    document = _document(client)
    paths = document["paths"]

    def ref(schema: dict[str, Any]) -> str:
        return str(schema["$ref"]).rsplit("/", 1)[-1]

    activate = paths["/v1/activations"]["post"]
    assert ref(activate["requestBody"]["content"]["application/json"]["schema"]).startswith(
        "ActivationRequest"
    )
    assert ref(activate["responses"]["201"]["content"]["application/json"]["schema"]).startswith(
        "Activation"
    )
    validate_op = paths["/v1/validate"]["post"]
    assert ref(validate_op["responses"]["200"]["content"]["application/json"]["schema"]) == (
        "ValidationResult"
    )
    # Answers that depend on the query admit each shape (now, or as of a time).
    one = paths["/v1/entitlements/{id}"]["get"]["responses"]["200"]["content"]
    shapes = [ref(x) for x in one["application/json"]["schema"]["anyOf"]]
    assert sorted(shapes) == ["EntitlementAsOfView", "EntitlementView"]
    listing = paths["/v1/entitlements"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"status", "limit", "customer_email"}
    assert listing["security"] == [{"adminKey": []}]
    assert paths["/v1/validate"]["post"]["security"] == []  # the activation code is the credential
    # Every error is the Error body, and each component the document names is in it.
    for methods in paths.values():
        for op in methods.values():
            assert ref(op["responses"]["default"]["content"]["application/json"]["schema"]) == (
                "Error"
            )
    text = str(document)
    for name in set(re.findall(r"#/components/schemas/([^'\"]+)", text)):
        assert name in document["components"]["schemas"], name


def test_a_route_without_an_operation_is_refused() -> None:
    async def handler(_: Request) -> Response:
        return Response()

    with pytest.raises(Undocumented, match="/v1/new"):
        operations([Route("/v1/new", handler, methods=["GET"])])


def test_the_docs_page_loads_its_assets_from_this_process(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(asset.startswith("/docs/static/") for asset in assets), assets
    assert "/openapi.json" in page.text
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and len(answer.content) > 1000, asset
