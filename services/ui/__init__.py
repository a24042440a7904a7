"""The browser pages, served by the API role: the admin console (`/admin`)
and the customer portal (`/portal`), server-rendered with jinja2, with
their CSS and script shipped in the package (`/ui/static`, no CDN)."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from services.api import API
from services.http import HTTPError
from services.licensing import Licensing
from services.openapi import PageRoute
from services.outbound.mail import Mailer
from services.outbound_api import OutboundAPI
from services.ui import admin, portal
from services.ui.web import METHODS, pages


def routes(
    api: API,
    outbound: OutboundAPI,
    licensing: Licensing,
    secret: str,
    redrive: Callable[[list[UUID]], tuple[int, int]],
    kafka_bootstrap: str | None,
    head: Callable[[], int],
    mailer: Mailer | None = None,
    public_url: str | None = None,
) -> list[BaseRoute]:
    """Every page route; `secret` (ENTITLE_CODE_SECRET) signs the sessions;
    with a `mailer` and a `public_url`, the portal mails sign-in links."""
    console = admin.Console(api, outbound, secret, redrive, kafka_bootstrap, head)
    customers = portal.Portal(licensing, api.config, secret, mailer, public_url)
    return [
        *admin.routes(console),
        *portal.routes(customers),
        Mount("/ui/static", StaticFiles(packages=[("services.ui", "static")]), name="ui-static"),
        # Any other address under a page prefix is a page that says so.
        PageRoute("/admin/{rest:path}", pages(_missing), methods=list(METHODS)),
        PageRoute("/portal/{rest:path}", pages(_missing), methods=list(METHODS)),
    ]


async def _missing(request: Request) -> Response:
    if request.url.path in ("/admin/", "/portal/") and request.method == "GET":
        return RedirectResponse(request.url.path.rstrip("/"), status_code=308)
    raise HTTPError(404, "not_found", f"there is no page {request.url.path[:200]}")
