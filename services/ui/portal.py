"""The customer portal (`/portal`): what a buyer (or their procurement)
sees of one entitlement, entered with one of its activation codes.

The session (a signed cookie: Secure, HttpOnly, SameSite=Strict, 12 hours)
holds the code's hash, never the code, and the entitlement is looked up by
it on every request: a revoked code ends the session. Every route acts on
that entitlement only; a seat of another entitlement is a 404, like a seat
that does not exist.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from datetime import datetime

import anyio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute

from contracts.api import EntitlementView
from domain.entitlement import Entitlement, code_hash
from services.config import Config
from services.http import client_address
from services.licensing import Licensing, _no_seat
from services.openapi import PageRoute
from services.ui.web import (
    Handler,
    Session,
    Sessions,
    SignInFirst,
    pages,
    plain_status,
    read_form,
    render,
    usage_charts,
)

log = logging.getLogger("entitle.ui.portal")

#: How long a portal session lasts, in seconds.
SESSION_SECONDS = 12 * 3600


class Portal:
    def __init__(self, licensing: Licensing, config: Config, secret: str) -> None:
        self.licensing = licensing
        self.config = config
        self.sessions = Sessions(secret, "entitle_portal", "/portal", SESSION_SECONDS)
        # The entry form's token, before there is a session.
        self.entry_sessions = Sessions(secret, "entitle_portal_entry", "/portal", 3600)

    # -- entry -------------------------------------------------------------------

    async def entry(self, request: Request) -> Response:
        if await self._current(request) is not None:
            return RedirectResponse("/portal/home", status_code=303)
        return self._entry_page(request, None)

    def _entry_page(self, request: Request, error: str | None, status: int = 200) -> Response:
        cookie = Response()
        session = self.entry_sessions.start(cookie, "entry", "")
        page = render(request, "portal/entry.html", status, csrf=session.csrf, error=error)
        page.raw_headers += [h for h in cookie.raw_headers if h[0] == b"set-cookie"]
        return page

    async def enter(self, request: Request) -> Response:
        form = await read_form(request, self.entry_sessions.read(request))
        code = form.get("code").strip()
        if not code or len(code) > 200:
            return self._entry_page(request, "Enter the activation code you received.", 422)
        hashed = code_hash(code)
        self.licensing.limits.check(client_address(request.scope), hashed, time.monotonic())
        view = await anyio.to_thread.run_sync(self._by_code, hashed)
        if view is None:
            return self._entry_page(request, "No license has this activation code.", 404)
        response = RedirectResponse("/portal/home", status_code=303)
        self.sessions.start(response, hashed, "code")
        self.entry_sessions.end(response)
        return response

    async def logout(self, request: Request) -> Response:
        found = await self._current(request)
        await read_form(request, found[0] if found else None)
        response = RedirectResponse("/portal", status_code=303)
        self.sessions.end(response)
        return response

    # -- the entitlement -----------------------------------------------------------

    def _by_code(self, hashed: str) -> EntitlementView | None:
        licensing = self.licensing
        return licensing._latest(licensing._by_code(hashed), hashed)

    async def _current(self, request: Request) -> tuple[Session, EntitlementView] | None:
        session = self.sessions.read(request)
        if session is None:
            return None
        view = await anyio.to_thread.run_sync(self._by_code, session.subject)
        return None if view is None else (session, view)

    async def _opened(self, request: Request) -> tuple[Session, EntitlementView]:
        found = await self._current(request)
        if found is None:
            raise SignInFirst("/portal", "Your session ended: enter your activation code again.")
        return found

    async def home(self, request: Request) -> Response:
        session, view = await self._opened(request)
        source = self.config.sources.get(view.source)
        return render(
            request,
            "portal/home.html",
            csrf=session.csrf,
            view=view,
            plain=plain_status(view),
            charts=usage_charts(view.limits, view.usage),
            billing_url=source.billing_portal_url if source is not None else None,
            license_files=self.licensing.signer is not None,
            done=request.query_params.get("done"),
        )

    async def release(self, request: Request) -> Response:
        session, view = await self._opened(request)
        await read_form(request, session)
        seat_id = request.path_params["seat"]
        request_id = f"portal-{secrets.token_hex(12)}"

        def change(entitlement: Entitlement, at: datetime) -> None:
            if seat_id not in entitlement.activations:
                raise _no_seat(seat_id)
            entitlement.release(seat_id, "released_in_portal", request_id, at)

        if not seat_id.startswith(f"{view.id}."):
            raise _no_seat(seat_id)  # another entitlement's seat, or none
        await anyio.to_thread.run_sync(
            self.licensing._change, uuid.UUID(str(view.id)), change, _no_seat(seat_id)
        )
        log.info("portal: a seat of %s was freed", view.id)
        return RedirectResponse("/portal/home?done=seat+freed", status_code=303)

    async def license_file(self, request: Request) -> Response:
        _, view = await self._opened(request)
        seat_id = request.path_params["seat"]
        signed = await self.licensing.issue_license_file(seat_id, None, owner=view.id)
        # The token is the file to ship (README: Offline license files).
        return Response(
            f"{signed.token}\n",
            media_type="application/jose",
            headers={
                "Content-Disposition": f'attachment; filename="license-{seat_id[-16:]}.jwt"',
                "Cache-Control": "no-store",
            },
        )


def routes(portal: Portal) -> list[BaseRoute]:
    def page(path: str, handler: Handler, method: str = "GET") -> PageRoute:
        return PageRoute(path, pages(handler), methods=[method])

    return [
        page("/portal", portal.entry),
        page("/portal", portal.enter, "POST"),
        page("/portal/logout", portal.logout, "POST"),
        page("/portal/home", portal.home),
        page("/portal/seats/{seat}/release", portal.release, "POST"),
        page("/portal/seats/{seat}/license-file", portal.license_file),
    ]
