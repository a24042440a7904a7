"""The admin console and the customer portal, driven in Debian's Chromium by
Playwright, against `entitle dev` with entitlements made by signed Stripe
webhooks. Each page visited is saved as a screenshot under
`test-output/screenshots/` (or $ENTITLE_SCREENSHOTS)."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.license_file import verify_license
from services.http import HTTPError
from tests import stripe_events as se
from tests.harness import Entitle, eventually

pytestmark = pytest.mark.e2e

ADMIN_KEY = "ek_ui_test_admin_key_0001"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
BILLING = "https://billing.stripe.com/p/login/test_123"
CONFIG = f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}, billing_portal_url: "{BILLING}"}}
offerings:
  - {{sku: team_annual, product: Acme Studio, period: P1Y, seats: 3,
      stripe_price_ids: [price_team], features: {{export: true}}, limits: {{renders: 100}}}}
  - {{sku: solo_annual, product: Acme Studio, period: P1Y, seats: 1,
      stripe_price_ids: [price_solo]}}
"""
YEAR = 365 * 86400
SHOTS = Path(os.environ.get("ENTITLE_SCREENSHOTS", "test-output/screenshots"))


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("ENTITLE_TEST_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt install chromium)")
        pytest.skip("chromium is not installed: apt install chromium (.ci/run does)")
    return found


@dataclass
class Stack:
    entitle: Entitle
    #: order ref -> (entitlement id, activation code)
    bought: dict[str, tuple[str, str]]
    #: seat ids of the team entitlement
    seats: list[str]
    cwd: Path


def _pay(entitle: Entitle, subscription: str, email: str, price: str, sku: str) -> None:
    now = int(time.time())
    event = se.invoice_paid(
        subscription=subscription,
        email=email,
        shape=se.LEGACY,
        lines=[{"price": price, "sku": sku, "start": now, "end": now + YEAR}],
    )
    body = se.body(event)
    response = httpx.post(
        f"{entitle.url}/webhooks/stripe-main", content=body, headers=se.signed_headers(body)
    )
    assert response.status_code == 202, response.text


def _entitlement(entitle: Entitle, order_ref: str) -> dict[str, Any] | None:
    response = httpx.get(
        f"{entitle.url}/v1/entitlements", params={"order_ref": order_ref}, headers=AUTH
    )
    items: list[dict[str, Any]] = response.json()["items"]
    return items[0] if items and items[0]["status"] == "ACTIVE" else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cwd = tmp_path_factory.mktemp("ui")
    (cwd / "entitle.yaml").write_text(CONFIG)
    env = {"ENTITLE_ADMIN_KEYS": f"support:{ADMIN_KEY}"}
    with Entitle(["dev", "--config", "entitle.yaml"], cwd, env) as entitle:
        orders = {
            "sub_ui_team": ("ada@example.com", "price_team", "team_annual"),
            "sub_ui_solo": ("grace@example.com", "price_solo", "solo_annual"),
            "sub_ui_other": ("linus@example.com", "price_team", "team_annual"),
        }
        for ref, (email, price, sku) in orders.items():
            _pay(entitle, ref, email, price, sku)
        bought = {}
        for ref in orders:
            found = eventually(lambda ref=ref: _entitlement(entitle, ref), timeout=30)
            bought[ref] = (found["id"], found["activation_code"])
        seats = []
        for ref in ("sub_ui_team", "sub_ui_other"):
            code = bought[ref][1]
            for label in ("Ada's laptop", "Studio desktop"):
                answer = httpx.post(
                    f"{entitle.url}/v1/activations",
                    json={"activation_code": code, "fingerprint": f"{ref}-{label}", "label": label},
                )
                assert answer.status_code == 201, answer.text
                if ref == "sub_ui_team":
                    seats.append(answer.json()["id"])
        used = httpx.post(
            f"{entitle.url}/v1/usage",
            json={
                "activation_code": bought["sub_ui_team"][1],
                "metric": "renders",
                "quantity": 7,
                "idempotency_key": "render-1",
            },
        )
        assert used.status_code == 201, used.text
        yield Stack(entitle, bought, seats, cwd)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    try:
        yield context.new_page()
    finally:
        context.close()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def login(page: Any, url: str, next_path: str = "") -> None:
    page.goto(f"{url}/admin{next_path}")
    assert "/admin/login" in page.url
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()


# -- the admin console -------------------------------------------------------------


def test_support_logs_in_searches_opens_and_suspends_with_a_reason(stack: Stack, page: Any) -> None:
    url = stack.entitle.url
    page.goto(f"{url}/admin/login")
    shot(page, "admin-login")
    page.get_by_label("Admin key").fill("not-the-key-at-all-0000")
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").inner_text() == "That is not an admin key."
    login(page, url)
    assert page.get_by_role("heading", level=1).inner_text() == "Dashboard"
    assert "3 in all" in " ".join(page.locator(".tiles").inner_text().split())
    shot(page, "admin-dashboard")

    page.get_by_role("link", name="Entitlements", exact=True).click()
    page.get_by_label("Customer e-mail").fill("ADA@example.com")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("tbody tr")
    assert rows.count() == 1 and "team_annual" in rows.inner_text()
    shot(page, "admin-search")
    # By activation code, too.
    page.get_by_label("Customer e-mail").fill("")
    page.get_by_label("Activation code").fill(stack.bought["sub_ui_solo"][1])
    page.get_by_role("button", name="Search").click()
    assert page.locator("tbody tr").count() == 1
    assert "grace@example.com" in page.locator("tbody").inner_text()

    page.goto(f"{url}/admin/entitlements?customer_email=ada@example.com")
    page.get_by_role("link", name="ada@example.com").click()
    assert page.get_by_role("heading", name="Seats: 2 of 3 in use").is_visible()
    assert page.locator("svg.chart").count() >= 1  # renders, drawn on the server
    assert "invoice.paid" in page.locator(".timeline").inner_text()
    shot(page, "admin-entitlement")

    page.get_by_label("Action", exact=True).select_option("suspend")
    page.get_by_label("Reason", exact=True).fill("chargeback under review")
    page.get_by_role("button", name="Preview", exact=True).click()
    preview = page.locator("main").inner_text()
    assert "What will change" in preview and "SUSPENDED" in preview
    shot(page, "admin-preview-suspend")
    # Nothing changed yet.
    team_id = stack.bought["sub_ui_team"][0]
    now = httpx.get(f"{url}/v1/entitlements/{team_id}", headers=AUTH).json()
    assert now["status"] == "ACTIVE"
    confirm = page.eval_on_selector_all(
        "form[action$='/apply'] input[type=hidden]", "els => els.map(e => [e.name, e.value])"
    )
    action = page.locator("form[action$='/apply']").get_attribute("action")
    page.get_by_role("button", name="Confirm: suspend").click()
    assert page.get_by_role("status").first.inner_text() == "Suspended."
    assert "suspended" in page.locator(".status").first.inner_text()
    # The reason is on the page: in the status and in the history.
    assert page.locator("main").inner_text().count("“chargeback under review”") == 2
    # Each history entry opens its own moment.
    page.locator(".timeline > li").last.get_by_role("link", name="As of this event").click()
    assert "version 1 of" in page.get_by_role("status").first.inner_text()
    assert "pending" in page.locator(".status").first.inner_text()
    # A link cannot make a page say what it wants.
    page.goto(f"{url}/admin/entitlements/{team_id}?done=Your+license+was+canceled")
    assert "Your license was canceled" not in page.locator("main").inner_text()
    shot(page, "admin-suspended")
    after = httpx.get(f"{url}/v1/entitlements/{team_id}", headers=AUTH).json()
    assert after["status"] == "SUSPENDED"
    history = httpx.get(f"{url}/v1/entitlements/{team_id}/history", headers=AUTH).json()
    last = history["events"][-1]
    assert last["cause"]["kind"] == "admin" and "support" in str(last)
    assert "chargeback under review" in str(last)
    # Pressing confirm again (a resubmitted form) applies nothing twice.
    resent = page.request.post(url + str(action), form=dict(confirm), max_redirects=0)
    assert resent.status == 303
    again = httpx.get(f"{url}/v1/entitlements/{team_id}/history", headers=AUTH).json()
    assert len(again["events"]) == len(history["events"])

    page.get_by_label("Action", exact=True).select_option("reinstate")
    page.get_by_label("Reason", exact=True).fill("review done")
    page.get_by_role("button", name="Preview", exact=True).click()
    page.get_by_role("button", name="Confirm: reinstate").click()
    # Every action's reason is in the history, not only a suspension's.
    assert "“review done”" in page.locator(".timeline").inner_text()
    eventually(
        lambda: (
            httpx.get(f"{url}/v1/entitlements/{team_id}", headers=AUTH).json()["status"] == "ACTIVE"
        )
    )


def test_a_grant_then_codes_extend_and_a_change_each_previewed(stack: Stack, page: Any) -> None:
    url = stack.entitle.url
    login(page, url, "/grant")
    page.get_by_label("Offering", exact=True).select_option("solo_annual")
    page.get_by_label("Customer e-mail").fill("hedy@example.com")
    page.get_by_label("Order reference (optional)").fill("po-4711")
    page.get_by_label("Or paid through (date, UTC)").fill("2031-06-30")
    page.get_by_label("Reason", exact=True).fill("reseller order by phone")
    page.get_by_role("button", name="Preview the grant").click()
    assert (
        "Grant solo_annual to hedy@example.com?" in page.get_by_role("heading").first.inner_text()
    )
    assert "2031-06-30 23:59 UTC" in page.locator("main").inner_text()
    shot(page, "admin-grant-preview")
    page.get_by_role("button", name="Confirm: grant").click()
    assert page.get_by_role("status").first.inner_text() == "Granted."
    granted = page.url.split("/admin/entitlements/")[1].split("?")[0]
    found = eventually(  # the read model behind the API catches up
        lambda: (
            (r := httpx.get(f"{url}/v1/entitlements/{granted}", headers=AUTH)).status_code == 200
            and r
        )
    )
    view = found.json()
    assert (view["source"], view["order_ref"], view["status"]) == ("manual", "po-4711", "ACTIVE")
    assert view["period_end"].startswith("2031-06-30T23:59:59")

    page.get_by_role("button", name="Issue another code").click()
    assert "activation_codes" in page.locator("table").inner_text()
    page.get_by_role("button", name="Confirm: issue another code").click()
    codes = page.locator(".codes code")
    assert codes.count() == 2
    page.get_by_role("button", name="Revoke code 0").click()
    page.get_by_role("button", name="Confirm: revoke the code").click()
    assert page.locator(".codes code").count() == 1

    page.get_by_label("Action", exact=True).select_option("extend")
    page.get_by_label("Days (extend only)").fill("30")
    page.get_by_label("Reason", exact=True).fill("goodwill")
    page.get_by_role("button", name="Preview", exact=True).click()
    assert "period_end" in page.locator("table").inner_text()
    page.get_by_role("button", name="Confirm: extend").click()

    page.get_by_label("New offering").select_option("team_annual")
    page.get_by_label("Reason for the change").fill("upgrade agreed by phone")
    page.get_by_role("button", name="Preview the change").click()
    table = page.locator("table").inner_text()
    assert "team_annual" in table and "seats" in table
    page.get_by_role("button", name="Confirm: change offering or seats").click()
    after = eventually(
        lambda: (
            e
            if (e := httpx.get(f"{url}/v1/entitlements/{granted}", headers=AUTH).json())["offering"]
            == "team_annual"
            else None
        )
    )
    assert after["seats"] == 3
    assert after["period_end"] > view["period_end"]
    assert len(after["activation_codes"]) == 1 and after["activation_codes"][0]["index"] == 1
    # A refused change says why before anything is confirmed.
    page.get_by_label("Action", exact=True).select_option("reinstate")
    page.get_by_label("Reason", exact=True).fill("nothing to reinstate")
    page.get_by_role("button", name="Preview", exact=True).click()
    assert "This is refused" in page.get_by_role("alert").inner_text()
    assert page.get_by_role("button", name="Confirm: reinstate").count() == 0


def test_a_dead_letter_is_shown_and_re_driven(stack: Stack, page: Any) -> None:
    url = stack.entitle.url
    _pay(stack.entitle, "sub_ui_unknown", "eve@example.com", "price_nobody_sells", "mystery")
    login(page, url, "/dead-letters")
    eventually(lambda: page.reload() and page.locator("tbody tr").count() >= 1, timeout=20)
    assert "'mystery' maps to no offering" in page.locator("tbody").inner_text()
    shot(page, "admin-dead-letters-one")
    page.locator("tbody input[type=checkbox]").first.check()
    page.get_by_role("button", name="Re-drive the picked ones").click()
    assert "0 applied, 1 still unmappable" in page.get_by_role("status").inner_text()


def test_operations_pages_show_receipts_raw_bodies_and_lag(stack: Stack, page: Any) -> None:
    url = stack.entitle.url
    login(page, url, "/webhooks")
    assert page.url.endswith("/admin/webhooks")
    assert page.locator("tbody tr").count() >= 3
    shot(page, "admin-webhooks")
    page.locator("tbody tr a").first.click()
    raw = page.locator("pre.raw").inner_text()
    assert '"type": "invoice.paid"' in raw
    assert "stripe-signature" not in page.locator("main").inner_text().lower()
    shot(page, "admin-webhook")
    page.goto(f"{url}/admin/dead-letters")
    shot(page, "admin-dead-letters")
    page.goto(f"{url}/admin/endpoints")
    shot(page, "admin-endpoints")
    page.goto(f"{url}/admin")
    text = page.locator("main").inner_text()
    assert "Projector lag: read-model" in text
    lag = re.search(r"Consumer lag \(raw webhooks not folded\)\s+(\S+)", text)
    assert lag is not None and lag.group(1).isdigit(), text


def _cookie(response: httpx.Response, name: str) -> dict[str, str]:
    """A Cookie header with the cookie `response` set (httpx keeps Secure
    cookies from plain-http answers but never sends them; Chromium does on
    a loopback address)."""
    return {"Cookie": f"{name}={response.cookies[name]}"}


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def test_a_form_without_its_csrf_token_or_session_changes_nothing(stack: Stack) -> None:
    url = stack.entitle.url
    solo = stack.bought["sub_ui_solo"][0]
    with httpx.Client(base_url=url) as client:
        form = {"action": "cancel", "reason": "x", "request_id": "console-abc"}
        anonymous = client.post(f"/admin/entitlements/{solo}/apply", data=form)
        assert anonymous.status_code == 401 and "log in again" in anonymous.text
        login_page = client.get("/admin/login")
        login = {"csrf": _csrf(login_page.text), "key": ADMIN_KEY, "next": "//evil.example"}
        no_cookie = client.post("/admin/login", data=login)
        assert no_cookie.status_code == 403  # the token is the login cookie's
        answer = client.post(
            "/admin/login", data=login, headers=_cookie(login_page, "entitle_login")
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/admin"
        # The session cookie is Secure, HttpOnly and SameSite=Strict.
        cookie = answer.headers["set-cookie"].lower()
        assert all(part in cookie for part in ("secure", "httponly", "samesite=strict"))
        session = _cookie(answer, "entitle_admin")
        assert client.get("/admin", headers=session).status_code == 200
        forged = client.post(f"/admin/entitlements/{solo}/apply", data=form, headers=session)
        assert forged.status_code == 403
        wrong = {**form, "csrf": _csrf(login_page.text)}  # another session's token
        assert (
            client.post(
                f"/admin/entitlements/{solo}/apply", data=wrong, headers=session
            ).status_code
            == 403
        )
        view = httpx.get(f"{url}/v1/entitlements/{solo}", headers=AUTH).json()
        assert view["status"] == "ACTIVE"
        home = client.get("/admin", headers=session)
        both = client.get(
            f"/admin/entitlements/{solo}?as_of=2026-01-01T00:00:00&as_of_version=1",
            headers=session,
        )
        assert both.status_code == 422 and "not both" in both.text
        for seats in ("\u0666", "\uff16", "1e3"):  # digits are 0-9 (not Arabic-Indic, full-width)
            grant = client.post(
                "/admin/grant",
                data={
                    "csrf": _csrf(home.text),
                    "offering": "team_annual",
                    "email": "x@example.com",
                    "seats": seats,
                    "reason": "r",
                },
                headers=session,
            )
            assert grant.status_code == 422 and "digits 0-9" in grant.text, seats
        # Logging out ends the session for good: a copy of the cookie is refused.
        out = client.post("/admin/logout", data={"csrf": _csrf(home.text)}, headers=session)
        assert out.status_code == 303
        assert client.get("/admin", headers=session).status_code == 303  # to the login
        # A page answers a method it does not take with a page.
        wrong = client.post("/admin", headers=session)
        assert wrong.status_code == 405 and "text/html" in wrong.headers["content-type"]


# -- the customer portal -------------------------------------------------------------


def enter_portal(page: Any, url: str, code: str) -> None:
    page.goto(f"{url}/portal")
    page.get_by_label("Activation code").fill(code)
    page.get_by_role("button", name="Show my license").click()
    page.wait_for_url("**/portal/home")


def test_the_buyer_frees_a_seat_and_downloads_a_license_file_that_verifies(
    stack: Stack, page: Any
) -> None:
    url = stack.entitle.url
    page.goto(f"{url}/portal")
    shot(page, "portal-entry")
    page.get_by_label("Activation code").fill("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE")
    page.get_by_role("button", name="Show my license").click()
    assert "No license has this activation code." in page.get_by_role("alert").inner_text()

    code = stack.bought["sub_ui_other"][1]
    enter_portal(page, url, code)
    assert page.locator("#seats-in-use").inner_text() == "2 of 3"
    assert page.get_by_role("link", name="Manage billing and invoices").get_attribute("href") == (
        BILLING
    )
    assert "Active, paid through" in page.locator("main").inner_text()
    shot(page, "portal-home")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download an offline license file").first.click()
    download = download_info.value
    assert download.suggested_filename.endswith(".jwt")
    token = Path(download.path()).read_text().strip()
    keys = httpx.get(f"{url}/v1/keys").json()["keys"]
    ada = "sub_ui_other-Ada's laptop"
    license = verify_license(token, keys[0]["public_key"], fingerprint=ada)
    assert license.product == "Acme Studio" and license.offering == "team_annual"

    page.get_by_role("link", name="Free this seat (Ada's laptop)").click()
    shot(page, "portal-free-seat")
    page.get_by_role("button", name="Free this seat").click()
    assert page.locator("#seats-in-use").inner_text() == "1 of 3"
    assert "Ada's laptop" not in page.locator(".seats").inner_text()
    shot(page, "portal-seat-freed")
    other = stack.bought["sub_ui_other"][0]
    view = httpx.get(f"{url}/v1/entitlements/{other}", headers=AUTH).json()
    assert [s["label"] for s in view["activations"]] == ["Studio desktop"]


def _portal_session(url: str, code: str) -> tuple[dict[str, str], str]:
    """(the Cookie header of a portal session opened with `code`, its CSRF token)."""
    entry = httpx.get(f"{url}/portal")
    entered = httpx.post(
        f"{url}/portal",
        data={"csrf": _csrf(entry.text), "code": code},
        headers=_cookie(entry, "entitle_portal_entry"),
    )
    assert entered.status_code == 303, entered.text
    session = _cookie(entered, "entitle_portal")
    home = httpx.get(f"{url}/portal/home", headers=session)
    assert home.status_code == 200
    return session, _csrf(home.text)


def test_no_portal_route_reaches_another_entitlement(stack: Stack) -> None:
    url = stack.entitle.url
    solo_id, solo_code = stack.bought["sub_ui_solo"]
    session, csrf = _portal_session(url, solo_code)
    with httpx.Client(base_url=url, headers=session) as client:
        home = client.get("/portal/home").text
        for ref, (other_id, other_code) in stack.bought.items():
            if ref != "sub_ui_solo":
                assert other_id not in home and other_code not in home
        for seat in stack.seats:  # the team entitlement's seats
            assert client.get(f"/portal/seats/{seat}/license-file").status_code == 404
            assert client.get(f"/portal/seats/{seat}/release").status_code == 404
            released = client.post(f"/portal/seats/{seat}/release", data={"csrf": csrf})
            assert released.status_code == 404
        for crafted in (f"{solo_id}.0000000000000000", "not-a-seat", f"{solo_id}"):
            assert client.get(f"/portal/seats/{crafted}/license-file").status_code == 404
            assert (
                client.post(f"/portal/seats/{crafted}/release", data={"csrf": csrf}).status_code
                == 404
            )
    team = httpx.get(f"{url}/v1/entitlements/{stack.bought['sub_ui_team'][0]}", headers=AUTH)
    assert len(team.json()["activations"]) == 2
    # Leaving ends the portal session for good.
    left = httpx.post(f"{url}/portal/logout", data={"csrf": csrf}, headers=session)
    assert left.status_code == 303
    assert httpx.get(f"{url}/portal/home", headers=session).status_code == 303


def test_a_mailed_sign_in_link_opens_the_portal_once(stack: Stack, page: Any) -> None:
    url = stack.entitle.url
    outbox = stack.cwd / ".entitle" / "outbox"
    page.goto(f"{url}/portal")
    page.get_by_label("The e-mail address you bought with").fill("Grace@Example.com")
    page.get_by_role("button", name="Mail me a sign-in link").click()
    said = page.get_by_role("status").inner_text()
    assert "a sign-in link is on its way" in said
    shot(page, "portal-link-sent")
    [mail] = eventually(lambda: list(outbox.glob("portal-link-*.eml")), timeout=10)
    message = email.message_from_bytes(mail.read_bytes(), policy=email.policy.default)
    assert message["To"] == "grace@example.com"  # as bought with, not as typed
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    [link] = re.findall(r"http://\S+/portal/link/\S+", text)
    assert "solo_annual" in text
    # An address with no license gets the same answer, and no mail.
    page.goto(f"{url}/portal")
    page.get_by_label("The e-mail address you bought with").fill("nobody@example.com")
    page.get_by_role("button", name="Mail me a sign-in link").click()
    assert page.get_by_role("status").inner_text() == said
    assert len(list(outbox.glob("portal-link-*.eml"))) == 1

    page.goto(link)  # opening it signs nobody in: a button does
    shot(page, "portal-link")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/portal/home")
    assert "solo_annual" in page.get_by_role("heading", level=1).inner_text()
    used = page.goto(link)
    assert used is not None and used.status == 410
    assert "used already" in page.get_by_role("alert").inner_text()
    forged = page.goto(link[:-3] + "abc")
    assert forged is not None and forged.status == 404


def test_a_sign_in_link_goes_to_the_address_bought_with_or_nowhere(tmp_path: Path) -> None:
    """The link is mailed to the address stored with the license, never to
    the one typed (it matches ignoring case, and a Kelvin sign K is another
    mailbox); a stored address no mail can go to gets none; the page is the
    same either way, never a 500."""
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    env = {"ENTITLE_ADMIN_KEYS": f"support:{ADMIN_KEY}"}
    stored = {
        "sub_link_kate": "kate@example.com",
        "sub_link_two": "a@example.com, d@example.org",
        "sub_link_word": "=?utf-8?q?Evil=0D=0ABcc=3A_x=40y.z?= <q@example.com>",
    }
    typed = {
        "sub_link_kate": "\u212aate@example.com",
        "sub_link_two": "a@example.com, d@example.org",
        "sub_link_word": "=?utf-8?q?Evil=0D=0ABcc=3A_x=40y.z?= <q@example.com>",
    }
    with Entitle(["dev", "--config", "entitle.yaml"], tmp_path, env) as entitle:
        for ref, address in stored.items():
            _pay(entitle, ref, address, "price_solo", "solo_annual")
        for ref in stored:
            eventually(lambda ref=ref: _entitlement(entitle, ref), timeout=30)
        outbox = tmp_path / ".entitle" / "outbox"
        pages = set()
        for ref, address in typed.items():
            entry = httpx.get(f"{entitle.url}/portal")
            asked = httpx.post(
                f"{entitle.url}/portal/link",
                data={"csrf": _csrf(entry.text), "email": address},
                headers=_cookie(entry, "entitle_portal_entry"),
            )
            assert asked.status_code == 200, (ref, asked.status_code, asked.text[:200])
            pages.add(re.sub(r'name="csrf" value="[^"]+"', "", asked.text))
        assert len(pages) == 1  # the same answer for all three
        [mail] = eventually(lambda: list(outbox.glob("portal-link-*.eml")), timeout=10)
        time.sleep(1)  # the other two would be written by now
        assert len(list(outbox.glob("portal-link-*.eml"))) == 1
        message = email.message_from_bytes(mail.read_bytes(), policy=email.policy.default)
        assert message["To"] == "kate@example.com"
        assert "sub_link_kate" in message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert entitle.text.count("a sign-in link could not be sent") == 2, entitle.text[-3000:]
        assert httpx.get(f"{entitle.url}/readyz").status_code == 200


def test_a_sign_in_link_works_for_15_minutes(tmp_path: Path, monkeypatch: Any) -> None:
    import itsdangerous.timed

    from services.readmodel import ReadModel
    from services.ui.portal import LINK_SECONDS, Links

    read_model = ReadModel(f"sqlite:///{tmp_path}/links.db")
    try:
        links = Links("a-code-secret-of-the-test-0123", read_model)
        entitlement = uuid.uuid4()
        token = links.make(entitlement)
        start = time.time()
        signer = itsdangerous.timed.TimestampSigner
        monkeypatch.setattr(signer, "get_timestamp", lambda _: int(start + LINK_SECONDS - 5))
        assert links.check(token)[0] == entitlement
        monkeypatch.setattr(signer, "get_timestamp", lambda _: int(start + LINK_SECONDS + 5))
        with pytest.raises(HTTPError) as expired:
            links.use(token)
        assert expired.value.status == 410
    finally:
        read_model.close()


# -- every page: readable without JavaScript, labelled, headings in order, 375 px ------


class _Outline(HTMLParser):
    """Headings, form controls and labels of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[int] = []
        self.controls: list[dict[str, str | None]] = []
        self.labels: set[str] = set()
        self._in_label = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if re.fullmatch(r"h[1-6]", tag):
            self.headings.append(int(tag[1]))
        if tag == "label":
            self._in_label += 1
            if found.get("for"):
                self.labels.add(str(found["for"]))
        if tag in ("input", "select", "textarea") and found.get("type") != "hidden":
            self.controls.append({**found, "wrapped": "yes" if self._in_label else None})

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._in_label -= 1


def check_outline(html: str, where: str) -> None:
    outline = _Outline()
    outline.feed(html)
    assert outline.headings and outline.headings[0] == 1, f"{where}: starts with an h1"
    for before, after in zip(outline.headings, outline.headings[1:], strict=False):
        assert after <= before + 1, f"{where}: h{before} then h{after}"
    for control in outline.controls:
        named = (
            control.get("id") in outline.labels
            or control.get("aria-label")
            or control.get("wrapped")
        )
        assert named, f"{where}: a {control} without a label"


def test_every_page_reads_without_javascript_is_labelled_and_fits_375_px(
    stack: Stack, browser: Any
) -> None:
    url = stack.entitle.url
    team = stack.bought["sub_ui_team"][0]
    context = browser.new_context(viewport={"width": 375, "height": 800}, java_script_enabled=False)
    try:
        page = context.new_page()
        login(page, url)
        receipt = page.goto(f"{url}/admin/webhooks")
        assert receipt is not None
        first = page.locator("tbody tr a").first.get_attribute("href")
        admin_pages = [
            "/admin",
            "/admin/entitlements",
            "/admin/entitlements?status=ACTIVE",
            f"/admin/entitlements/{team}",
            "/admin/grant",
            "/admin/webhooks",
            str(first),
            "/admin/dead-letters",
            "/admin/endpoints",
        ]
        for path in admin_pages:
            named = re.sub(r"[0-9a-f-]{36}", "id", path)  # the same name every run
            check_page(page, url + path, "phone-admin" + re.sub(r"[^a-z0-9]+", "-", named))
        check_page(page, f"{url}/admin/login", "phone-admin-login")
        page.goto(f"{url}/portal")
        check_page(page, f"{url}/portal", "phone-portal-entry")
        page.get_by_label("Activation code").fill(stack.bought["sub_ui_team"][1])
        page.get_by_role("button", name="Show my license").click()
        check_page(page, f"{url}/portal/home", "phone-portal-home")
        assert "Devices" in page.locator("main").inner_text()
    finally:
        context.close()


def check_page(page: Any, address: str, name: str) -> None:
    response = page.goto(address)
    assert response is not None and response.status == 200, (address, response and response.status)
    html = page.content()
    check_outline(html, address)
    # Nothing wider than the screen: the page does not scroll sideways.
    width = page.evaluate("document.documentElement.scrollWidth")
    wide = page.evaluate(
        "Array.from(document.querySelectorAll('body *')).filter(e =>"
        " e.getBoundingClientRect().right > 376 && !e.parentElement.closest('.scroll, pre'))"
        ".slice(0, 3).map(e => e.outerHTML.slice(0, 160))"
    )
    if width > 375:
        shot(page, name + "-too-wide")

    assert width <= 375, f"{address} is {width} px wide: {wide}"
    assert page.locator("main").inner_text().strip()
    shot(page, name)


def test_the_api_role_alone_serves_the_console_and_the_portal(tmp_path: Path) -> None:
    """`entitle api` (no broker, no other role) serves the pages and their
    assets; the dashboard says the consumer lag is unknown rather than failing."""
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    env = {
        "ENTITLE_ADMIN_KEYS": f"support:{ADMIN_KEY}",
        "ENTITLE_DATABASE_URL": f"sqlite:///{tmp_path / 'alone.db'}",
    }
    with Entitle(["api", "--config", "entitle.yaml"], tmp_path, env) as api:
        login_page = httpx.get(f"{api.url}/admin/login")
        assert login_page.status_code == 200 and "Admin key" in login_page.text
        assert httpx.get(f"{api.url}/ui/static/entitle.css").status_code == 200
        entered = httpx.post(
            f"{api.url}/admin/login",
            data={"csrf": _csrf(login_page.text), "key": ADMIN_KEY},
            headers=_cookie(login_page, "entitle_login"),
        )
        dashboard = httpx.get(f"{api.url}/admin", headers=_cookie(entered, "entitle_admin"))
        assert dashboard.status_code == 200 and "0</span> in all" in dashboard.text
        assert "unknown" in dashboard.text
        portal = httpx.get(f"{api.url}/portal")
        assert portal.status_code == 200 and "Activation code" in portal.text
        assert "sign-in link" not in portal.text  # no e-mail, no public address here
