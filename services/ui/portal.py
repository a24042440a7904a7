"""The customer portal (`/portal`): what a buyer (or their procurement)
sees of one entitlement, entered with one of its activation codes.

The session (a signed cookie: Secure, HttpOnly, SameSite=Strict, 12 hours)
holds the code's hash, never the code, and the entitlement is looked up by
it on every request: a revoked code ends the session. Every route acts on
that entitlement only; a seat of another entitlement is a 404, like a seat
that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta

import anyio
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from markupsafe import escape
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute

from contracts.api import EntitlementView
from domain.entitlement import Cause, Entitlement, code_hash
from services.config import Config
from services.health import describe
from services.http import HTTPError, client_address
from services.licensing import Licensing, _no_seat
from services.outbound.mail import Mailer
from services.outbound.outbox import without_addresses
from services.projections import entitlement_view
from services.readmodel import ReadModel
from services.timeline import PORTAL_REQUEST
from services.ui.web import (
    EndedSessions,
    Session,
    Sessions,
    SignInFirst,
    done,
    page_routes,
    plain_status,
    read_form,
    render,
    usage_charts,
)

log = logging.getLogger("entitle.ui.portal")

#: How long a portal session lasts, in seconds.
SESSION_SECONDS = 12 * 3600


class Portal:
    def __init__(
        self,
        licensing: Licensing,
        config: Config,
        secret: str,
        mailer: Mailer | None = None,
        public_url: str | None = None,
    ) -> None:
        """With a `mailer` and the `public_url` browsers reach this process
        at, a buyer can also sign in with a link mailed to their address."""
        self.licensing = licensing
        self.config = config
        self.sessions = Sessions(
            secret,
            "entitle_portal",
            "/portal",
            SESSION_SECONDS,
            EndedSessions(licensing.read_model),
        )
        # The entry form's token, before there is a session.
        self.entry_sessions = Sessions(secret, "entitle_portal_entry", "/portal", 3600)
        self.links = Links(secret, licensing.read_model) if mailer and public_url else None
        self.mailer = mailer
        self.public_url = public_url
        self._sending: set[asyncio.Task[None]] = set()

    # -- entry -------------------------------------------------------------------

    async def entry(self, request: Request) -> Response:
        if await self._current(request) is not None:
            return RedirectResponse("/portal/home", status_code=303)
        return self._entry_page(request, None)

    def _entry_page(
        self, request: Request, error: str | None, status: int = 200, sent: bool = False
    ) -> Response:
        session = self.entry_sessions.new("entry", "")
        page = render(
            request,
            "portal/entry.html",
            status,
            csrf=session.csrf,
            error=error,
            by_mail=self.links is not None,
            sent=sent,
        )
        self.entry_sessions.put(page, session)
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
        session = found[0] if found else None
        await read_form(request, session)
        response = RedirectResponse("/portal", status_code=303)
        await anyio.to_thread.run_sync(self.sessions.log_out, response, session)
        return response

    # -- the entitlement -----------------------------------------------------------

    def _by_code(self, hashed: str) -> EntitlementView | None:
        licensing = self.licensing
        return licensing._latest(licensing._by_code(hashed), hashed)

    def _of(self, session: Session) -> EntitlementView | None:
        """The entitlement a session opens: by its code's hash (none once the
        code is revoked), or, signed in by a mailed link, by its id."""
        if session.check == "code":
            return self._by_code(session.subject)
        if session.check == "link":
            with contextlib.suppress(ValueError):
                found = self.licensing.store.entitlement(uuid.UUID(session.subject))
                return entitlement_view(found) if found is not None else None
        return None

    async def _current(self, request: Request) -> tuple[Session, EntitlementView] | None:
        session = self.sessions.read(request)
        if session is None:
            return None
        view = await anyio.to_thread.run_sync(self._of, session)
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
            plain=plain_status(view, customer=True),
            charts=usage_charts(view.limits, view.usage),
            billing_url=source.billing_portal_url if source is not None else None,
            license_files=self.licensing.signer is not None,
            done=done(request),
        )

    async def confirm_release(self, request: Request) -> Response:
        """Free this seat? (the device stops working): a page with the button."""
        session, view = await self._opened(request)
        seat_id = request.path_params["seat"]
        seat = next((s for s in view.activations if s.id == seat_id), None)
        if seat is None:
            raise _no_seat(seat_id)
        return render(
            request,
            "portal/release.html",
            csrf=session.csrf,
            view=view,
            seat=seat,
            request_id=f"{PORTAL_REQUEST}{secrets.token_hex(12)}",
        )

    async def release(self, request: Request) -> Response:
        session, view = await self._opened(request)
        form = await read_form(request, session)
        seat_id = request.path_params["seat"]
        request_id = form.get("request_id")
        if not request_id.startswith(PORTAL_REQUEST) or len(request_id) > 64:
            request_id = f"{PORTAL_REQUEST}{secrets.token_hex(12)}"

        def change(entitlement: Entitlement, at: datetime) -> None:
            if seat_id not in entitlement.activations:
                if entitlement.has_applied(Cause.client(request_id)):
                    return  # the same confirmation sent twice: done already
                raise _no_seat(seat_id)
            entitlement.release(seat_id, "released_in_portal", request_id, at)

        if not seat_id.startswith(f"{view.id}."):
            raise _no_seat(seat_id)  # another entitlement's seat, or none
        await anyio.to_thread.run_sync(
            self.licensing._change, uuid.UUID(str(view.id)), change, _no_seat(seat_id)
        )
        log.info("portal: a seat of %s was freed", view.id)
        return RedirectResponse("/portal/home?done=seat-freed", status_code=303)

    # -- sign-in links by mail -------------------------------------------------------

    async def ask_link(self, request: Request) -> Response:
        """Mail a sign-in link for each license of the address (at most
        ten); the page says the same whether there are any or not."""
        if self.links is None or self.mailer is None:
            raise HTTPError(404, "not_found", "sign-in links by mail are not set up here")
        form = await read_form(request, self.entry_sessions.read(request))
        address = form.get("email").strip()
        if not address or len(address) > 320 or "@" not in address:
            return self._entry_page(request, "Enter the e-mail address you bought with.", 422)
        key = "mail:" + hashlib.sha256(address.lower().encode()).hexdigest()
        self.licensing.limits.check(client_address(request.scope), key, time.monotonic())
        views, _ = await anyio.to_thread.run_sync(
            lambda: self.licensing.read_model.entitlement_page(
                10, filters={"customer_email": address}
            )
        )
        if views:
            # Made and sent after the answer: how long the mail server takes,
            # or whether the stored address can take a mail, must not tell
            # whether the address has a license.
            task = asyncio.create_task(self._send_links(views))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return self._entry_page(request, None, sent=True)

    async def _send_links(self, views: list[EntitlementView]) -> None:
        """Mail each license's sign-in link to the address stored with it,
        one mail per address. Never to the address typed: it matched
        ignoring case, and another spelling can be another mailbox (a
        Kelvin sign for a K); an address the mail cannot go to (two of
        them, a broken header) gets none, with a warning."""
        assert self.mailer is not None and self.links is not None
        by_address: dict[str, list[EntitlementView]] = {}
        for view in views:
            if view.customer.email:
                by_address.setdefault(view.customer.email, []).append(view)
        for address, group in by_address.items():
            try:
                links = [(view, self.links.make(view.id)) for view in group]
                message = self.mailer.new_message(
                    address,
                    "Your sign-in link" + ("s" if len(links) > 1 else ""),
                    *_link_mail(links, f"{self.public_url}/portal/link/"),
                )
                outcome = await self.mailer.send_now(message, f"portal-link-{secrets.token_hex(8)}")
            except Exception as exc:
                why = without_addresses(describe(exc))
                log.warning("portal: a sign-in link could not be sent: %s", why)
                continue
            if outcome.ok:
                log.info("portal: sign-in link(s) sent for %d license(s)", len(group))
            else:
                why = without_addresses(outcome.error or "")
                log.warning("portal: a sign-in link could not be sent: %s", why)

    async def link(self, request: Request) -> Response:
        """The page a mailed link opens: a button that signs in (a GET
        alone does not, so a mail scanner fetching the link does not use it up)."""
        if self.links is None:
            raise HTTPError(404, "not_found", "sign-in links by mail are not set up here")
        token = request.path_params["token"]
        await anyio.to_thread.run_sync(self.links.check, token)
        session = self.entry_sessions.new("link", "")
        page = render(request, "portal/link.html", csrf=session.csrf, token=token)
        self.entry_sessions.put(page, session)
        return page

    async def use_link(self, request: Request) -> Response:
        if self.links is None:
            raise HTTPError(404, "not_found", "sign-in links by mail are not set up here")
        await read_form(request, self.entry_sessions.read(request))
        token = request.path_params["token"]
        entitlement_id = await anyio.to_thread.run_sync(self.links.use, token)
        response = RedirectResponse("/portal/home", status_code=303)
        self.sessions.start(response, str(entitlement_id), "link")
        self.entry_sessions.end(response)
        return response

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
    return page_routes(
        [
            ("/portal", "GET", portal.entry),
            ("/portal", "POST", portal.enter),
            ("/portal/logout", "POST", portal.logout),
            ("/portal/home", "GET", portal.home),
            ("/portal/seats/{seat}/release", "GET", portal.confirm_release),
            ("/portal/seats/{seat}/release", "POST", portal.release),
            ("/portal/seats/{seat}/license-file", "GET", portal.license_file),
            ("/portal/link", "POST", portal.ask_link),
            ("/portal/link/{token}", "GET", portal.link),
            ("/portal/link/{token}", "POST", portal.use_link),
        ]
    )


#: How long a mailed sign-in link works, in seconds.
LINK_SECONDS = 15 * 60


class Links:
    """Sign-in links: a token signed with a key derived from
    ENTITLE_CODE_SECRET, naming an entitlement and a nonce, valid
    LINK_SECONDS and once (the nonce is recorded when used, in the read
    model's database, so every API process knows)."""

    def __init__(self, secret: str, read_model: ReadModel) -> None:
        key = hmac.new(secret.encode(), b"entitle portal sign-in link", "sha256").digest()
        self._serializer = URLSafeTimedSerializer(key, salt="portal-link")
        self._read_model = read_model
        with read_model.transaction() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS entitle_portal_links"
                " (nonce TEXT PRIMARY KEY, used_at TEXT NOT NULL)"
            )

    def make(self, entitlement_id: uuid.UUID) -> str:
        return str(self._serializer.dumps([str(entitlement_id), secrets.token_urlsafe(12)]))

    def check(self, token: str) -> tuple[uuid.UUID, str]:
        """(entitlement id, nonce) of a link that still works; HTTPError 410 otherwise."""
        try:
            entitlement_id, nonce = self._serializer.loads(token[:500], max_age=LINK_SECONDS)
            found = uuid.UUID(entitlement_id), str(nonce)
        except SignatureExpired:
            raise HTTPError(410, "expired", _USED_OR_OLD) from None
        except (BadSignature, ValueError, TypeError):
            raise HTTPError(404, "not_found", "this is not a sign-in link of ours") from None
        with self._read_model.transaction(write=False) as cur:
            cur.execute(
                self._read_model.sql("SELECT 1 FROM entitle_portal_links WHERE nonce = ?"),
                (found[1],),
            )
            used = cur.fetchone() is not None
        if used:
            raise HTTPError(410, "used", _USED_OR_OLD)
        return found

    def use(self, token: str) -> uuid.UUID:
        """The entitlement a working link opens, after marking it used."""
        entitlement_id, nonce = self.check(token)
        now = datetime.now(UTC)
        with self._read_model.transaction() as cur:
            sql = self._read_model.sql
            cur.execute(
                sql("DELETE FROM entitle_portal_links WHERE used_at < ?"),
                ((now - timedelta(days=1)).isoformat(),),
            )
            cur.execute(
                sql(
                    "INSERT INTO entitle_portal_links (nonce, used_at) VALUES (?, ?)"
                    " ON CONFLICT (nonce) DO NOTHING"
                ),
                (nonce, now.isoformat()),
            )
            if cur.rowcount != 1:
                raise HTTPError(410, "used", _USED_OR_OLD)
        return entitlement_id


_USED_OR_OLD = "this sign-in link was used already or is older than 15 minutes: ask for another"


def _link_mail(links: list[tuple[EntitlementView, str]], base: str) -> tuple[str, str]:
    """(text, html) of the mail with a sign-in link per license."""
    lines = [
        "Sign in to see your license: its status, its devices and its usage.",
        "Each link works once, within 15 minutes.",
        "",
    ]
    items = []
    for view, token in links:
        label = f"{view.product} ({view.offering}, {view.order_ref})"
        lines += [label, f"  {base}{token}", ""]
        items.append(f'<li><a href="{escape(base + token)}">{escape(label)}</a></li>')
    lines.append("If you did not ask for this, ignore this mail.")
    html = (
        "<p>Sign in to see your license: its status, its devices and its usage."
        " Each link works once, within 15 minutes.</p>"
        f"<ul>{''.join(items)}</ul><p>If you did not ask for this, ignore this mail.</p>"
    )
    return "\n".join(lines), html
