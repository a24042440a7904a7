"""The OpenAPI 3.1 document of the HTTP API, built from the routes themselves.

Every route the app serves is a `Documented` route: it carries its
`Operation` (summary, the `contracts/` models of its body and answers, its
query parameters, who may call it) beside its path and handler, so a route
and its description are written in one place. `document` walks the app's
routes; a route without an operation is a test failure
(tests/test_openapi.py), never a silent gap. `/docs` is Swagger UI, served
from the `swagger-ui-bundle` package (no CDN).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from contracts.api import Error
from services import version

Security = Literal["admin", "seat"] | None
Mode = Literal["validation", "serialization"]
# A success answer's body: a contracts model, None (no body), a media type
# (a body of that type, e.g. text/plain), or several of these.
Answer = type[BaseModel] | str | None | tuple[type[BaseModel] | str, ...]
_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")


@dataclass(frozen=True)
class Query:
    """One query parameter: its name, what it means, its JSON schema."""

    name: str
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


LIMIT = Query(
    "limit",
    "Items per page, 1 to 1000 (default 100)",
    {"type": "integer", "minimum": 1, "maximum": 1000},
)
CURSOR = Query("cursor", "The `next_cursor` of the previous page")


@dataclass(frozen=True)
class Operation:
    """What a route takes and answers. `answers` maps each success status to
    its body; every other status answers the `Error` body, and `errors`
    names the ones a client should expect (with why)."""

    summary: str
    tag: str
    answers: Mapping[int, Answer]
    body: type[BaseModel] | Mapping[str, Any] | None = None
    query: Sequence[Query] = ()
    path: Mapping[str, str] = field(default_factory=dict)
    security: Security = None
    errors: Mapping[int, str] = field(default_factory=dict)
    description: str = ""
    idempotency_key: bool = False


class Documented(Route):
    """A Starlette route with its `Operation`, for one method."""

    def __init__(
        self, path: str, endpoint: Callable[..., Any], method: str, operation: Operation
    ) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.method = method
        self.operation = operation


_SECURITY_ERRORS = {
    "admin": {401: "No admin key, or a wrong one", 429: "Too many wrong keys from this address"},
    "seat": {
        401: "No seat secret or activation code in `Authorization: Bearer …`",
        429: "Too many requests for seats from this address",
    },
}
_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    422: "Invalid input",
    429: "Too many requests",
    503: "Unavailable; retry (see Retry-After)",
}


def document(operations: Iterable[tuple[str, str, Operation]]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of (method, path, operation) triples.

    Component schemas come from the pydantic models (request bodies as
    validated, answers as serialised)."""
    listed = list(operations)
    models: dict[tuple[type[BaseModel], Mode], None] = {(Error, "serialization"): None}
    for _, _, op in listed:
        if isinstance(op.body, type):
            models[(op.body, "validation")] = None
        for answer in op.answers.values():
            for part in answer if isinstance(answer, tuple) else (answer,):
                if isinstance(part, type):
                    models[(part, "serialization")] = None
    refs, components = models_json_schema(list(models), ref_template="#/components/schemas/{model}")
    schemas = components.get("$defs", {})

    def ref(model: type[BaseModel], mode: Mode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    paths: dict[str, dict[str, Any]] = {}
    for method, path, op in sorted(listed, key=lambda t: (t[1], t[0])):
        parameters: list[dict[str, Any]] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": op.path.get(name, ""),
                "schema": {"type": "string"},
            }
            for name in _PATH_PARAM.findall(path)
        ]
        parameters += [
            {
                "name": q.name,
                "in": "query",
                "required": q.required,
                "description": q.description,
                "schema": dict(q.schema),
            }
            for q in op.query
        ]
        if op.idempotency_key:
            parameters.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "A retried request with the same key changes nothing again",
                    "schema": {"type": "string", "maxLength": 255},
                }
            )
        responses: dict[str, Any] = {}
        for status, answer in op.answers.items():
            content: dict[str, Any] = {}
            parts = answer if isinstance(answer, tuple) else (answer,)
            bodies = [ref(part, "serialization") for part in parts if isinstance(part, type)]
            if bodies:  # several: the one the query asked for (as_of, with_state)
                schema = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
                content["application/json"] = {"schema": schema}
            for part in parts:
                if isinstance(part, str):  # a media type: any JSON document, or text
                    kind = "object" if part.endswith("json") else "string"
                    content[part] = {"schema": {"type": kind}}
            response: dict[str, Any] = {"description": _STATUS_TEXT.get(status, str(status))}
            if content:
                response["content"] = content
            responses[str(status)] = response
        error = {"application/json": {"schema": ref(Error, "serialization")}}
        errors = {**_SECURITY_ERRORS.get(op.security or "", {}), **op.errors}
        for status, why in sorted(errors.items()):
            responses[str(status)] = {"description": why, "content": error}
        responses["default"] = {"description": "Any other error", "content": error}
        operation: dict[str, Any] = {
            "operationId": _operation_id(method, path),
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": parameters,
            "responses": responses,
        }
        if op.description:
            operation["description"] = op.description
        if op.body is not None:
            schema = ref(op.body, "validation") if isinstance(op.body, type) else dict(op.body)
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        operation["security"] = (
            [{"adminKey": []}]
            if op.security == "admin"
            else [{"seatSecret": []}]
            if op.security == "seat"
            else []
        )
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "entitle",
            "version": version(),
            "description": "The HTTP API of the entitle entitlement engine: webhooks in,"
            " licensing for applications, and the admin API. Every error answers"
            " `{error, detail, status}`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin key (ENTITLE_ADMIN_KEYS)",
                },
                "seatSecret": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The seat secret its activation answered, or the"
                    " activation code that opened the seat",
                },
            },
        },
    }


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", path.replace("{", "by_").replace("}", "")).strip("_")
    return f"{method.lower()}_{words}"


def operations(
    routes: Iterable[BaseRoute], extra: Iterable[tuple[str, str, Operation]] = ()
) -> list[tuple[str, str, Operation]]:
    """(method, path, operation) of every documented route; a plain route
    (one without an operation) raises `Undocumented`."""
    found = list(extra)
    missing = []
    for route in routes:
        if isinstance(route, Documented):
            found.append((route.method, route.path, route.operation))
        elif isinstance(route, Route) and not isinstance(route, PageRoute):
            missing.append(route.path)
    if missing:
        raise Undocumented(f"routes without an OpenAPI operation: {', '.join(missing)}")
    return found


class Undocumented(Exception):
    pass


class PageRoute(Route):
    """A browser page (HTML, services.ui): not an API operation, so not in
    the OpenAPI document."""


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>entitle API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui", validatorUrl: null});</script>
</body></html>
"""

DOCS = Operation(
    "Swagger UI for this document",
    "meta",
    {200: "text/html"},
    description="Its script and styles are served by this process (`/docs/static/`).",
)
OPENAPI = Operation("This OpenAPI document", "meta", {200: "application/json"})


def routes(
    served: Callable[[], Iterable[BaseRoute]], extra: Iterable[tuple[str, str, Operation]] = ()
) -> list[BaseRoute]:
    """`GET /openapi.json`, `GET /docs` and the page's assets. The document
    is made on first request from `served()`, the app's final routes."""
    made: list[bytes] = []

    async def as_json(_: Request) -> Response:
        if not made:
            made.append(json.dumps(document(operations(served(), extra))).encode())
        return Response(made[0], media_type="application/json")

    async def page(_: Request) -> Response:
        return HTMLResponse(_PAGE)

    return [
        Documented("/openapi.json", as_json, "GET", OPENAPI),
        Documented("/docs", page, "GET", DOCS),
        Mount("/docs/static", StaticFiles(directory=swagger_ui_path), name="docs-static"),
    ]
