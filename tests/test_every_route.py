"""Every route `entitle dev` serves, given every kind of bad input (ids
that name the wrong aggregate or none, malformed queries, bodies that are
no JSON text, odd credentials): a 4xx with a JSON error body, never a 5xx."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount

from domain.entitlement import order_id
from services.app import Roles, build_app
from services.config import Settings, admin_keys, load_config
from services.http import Shortcut, encode_cursor
from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.test_dev import ADMIN, AUTH
from tests.test_dev_providers import CONFIG
from tests.test_edges import BAD_BODIES, post, stack

pytestmark = pytest.mark.e2e
__all__ = ["stack"]  # the fixture, shared with test_edges


def dev_app(tmp_path: Path) -> Shortcut:
    """The app the composition root builds for `entitle dev` (not started)."""
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    settings = Settings(
        kafka_bootstrap="127.0.0.1:9",
        database_url=f"sqlite:///{tmp_path / 'routes.db'}",
        kafka_idempotence=False,
        raw_partitions=1,
        code_secret="x" * 32,
    )
    app = build_app(
        load_config(tmp_path / "entitle.yaml"), settings, Roles.all(), admin_keys(ADMIN)
    )
    assert isinstance(app, Shortcut)
    return app


def route_table(tmp_path: Path) -> list[tuple[str, str]]:
    """(method, path template) of every route `entitle dev` serves, read
    from the app the composition root builds (so a new route is covered);
    mounted static files (the docs page's assets) are not routes."""
    app = dev_app(tmp_path)
    table = []
    while isinstance(app, Shortcut):  # routes served in front of the router
        if not app.prefix:  # (a prefix's route is the router's too)
            table.append((app.method, app.path))
        app = app.app
    for route in app.routes:
        if isinstance(route, Mount):
            continue
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                table.append((method, route.path))  # type: ignore[attr-defined]
    return table


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(stack: Entitle) -> None:
    """schemathesis, from the served OpenAPI document, against the running
    stack with an admin key: a bounded number of examples per operation
    (and its stateful phase); no 5xx, and every answer's status, media type,
    headers and body as the document says."""
    # Every process of the stack serving: /readyz answers 503 while one starts.
    eventually(lambda: httpx.get(f"{stack.url}/readyz", timeout=10).status_code == 200, 60)
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,response_headers_conformance"
    )
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{stack.url}/openapi.json",
            "--checks",
            checks,
            "--max-examples",
            "6",
            "--seed",
            "17",
            "--header",
            f"Authorization: {AUTH['Authorization']}",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    docs = httpx.get(stack.printed(r"docs:\s+(\S+)"))  # the URL `entitle dev` prints
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    paths = httpx.get(f"{stack.url}/openapi.json").json()["paths"]
    operations = sum(len(methods) for methods in paths.values())
    # All but GET /openapi.json, which schemathesis leaves out as the document itself.
    assert operations > 30 and f"Tested: {operations - 1}" in run.stdout, run.stdout[-3000:]


def test_no_bad_input_to_any_route_is_a_server_error(stack: Entitle, tmp_path: Path) -> None:
    table = route_table(tmp_path)
    assert len(table) > 15, table
    # An Order's id: an aggregate in the same store that is no entitlement.
    sub = f"sub_edges_{uuid.uuid4().hex[:8]}"
    event = se.invoice_paid(
        subscription=sub,
        invoice_id=f"in_{sub}",
        lines=[
            {"price": "price_basic", "start": int(time.time()), "end": int(time.time()) + 86400}
        ],
    )
    assert post(stack, "stripe", se.body(event)).status_code == 202
    order = str(order_id("stripe", sub))
    eventually(
        lambda: (
            httpx.get(f"{stack.url}/v1/entitlements", params={"order_ref": sub}, headers=AUTH)
            .json()
            .get("items")
            or None
        ),
        timeout=20,
    )
    values = [
        order,
        f"{order}.0123456789abcdef",
        str(uuid.uuid4()),
        "not-a-uuid",
        "%00",
        "%ED%A0%80",
        "%C3%A9.%C3%A9",
        "a" * 3000,
        "..%2F..%2Fetc",
        "0",
        "-1",
        "99999999999999999999999",
    ]
    queries = [
        "",
        "?cursor=%FF%FE",
        "?limit=-1",
        "?limit=1e309",
        "?limit=99999999999999999999",
        "?unknown=1",
        "?activation_code=%00",
        "?as_of=9999-99-99",
        "?as_of=0001-01-01T00:00:00Z&as_of_version=1",
        "?as_of_version=99999999999999999999",
        "?with_state=true",
        "?since=0001-01-01T00:00:00%2B14:00",
        "?since=9999-12-31T23:59:59-14:00",
        "?limit=9223372036854775808",
        # Cursors no list gave: a position past 64 bits, a bool, half a surrogate pair.
        "?cursor=" + encode_cursor(9223372036854775808, "x"),
        "?cursor=" + encode_cursor(True, "\ud800"),
    ]
    auths: list[dict[str, Any]] = [{}, {"Authorization": b"Bearer \xe9\xff"}]
    failures = []
    with httpx.Client(base_url=stack.url, timeout=30) as client:

        def attempt(method: str, url: str, body: bytes | None, auth: dict[str, Any]) -> None:
            headers = {**auth, "Content-Type": "application/json"}
            try:
                response = client.request(method, url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                failures.append((method, url[:120], 0, repr(exc)))
                return
            if response.status_code >= 500:
                failures.append((method, url[:120], response.status_code, response.text[:200]))
            elif response.status_code >= 400 and url.startswith(("/admin", "/portal")):
                # A page's error is a page, saying what was wrong.
                assert "text/html" in response.headers["content-type"], (method, url)
                assert '<p class="error" role="alert">' in response.text, (method, url)
            elif response.status_code >= 400:
                assert response.json()["error"], (method, url, response.text)

        for method, template in table:
            if "{source}" in template:
                continue  # the sources are posted to above, signed
            paths = {template}
            for value in values:
                path = template
                while "{" in path:
                    start = path.index("{")
                    path = path[:start] + value + path[path.index("}", start) + 1 :]
                paths.add(path)
            bodies: list[bytes | None] = [None, b"{}"]
            if method not in ("GET", "DELETE"):
                bodies += BAD_BODIES.values()
            for path in sorted(paths):
                for query in queries:
                    attempt(method, path + query, bodies[0], AUTH)
                for auth in auths:
                    attempt(method, path, bodies[1], auth)
                for body in bodies:
                    attempt(method, path, body, AUTH)
    assert not failures, "\n".join(map(str, failures[:40]))
    assert "unhandled error" not in stack.text
