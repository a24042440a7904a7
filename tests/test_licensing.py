"""The licensing API: activations (seats) and validation, with a customer's
activation code and no admin key."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.license_file import InvalidLicense, verify_license
from domain.entitlement import NotActive, OverLimit, Refused, TooManySeats, UnknownMetric
from services.codes import CodeBook
from services.http import Buckets, MaskCodes
from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.lifecycle_world import DAY, T0, World
from tests.test_dev import ADMIN, AUTH, entitlements, post
from tests.test_lifecycle import paid, snapshot

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
offerings:
  - {{sku: team, product: acme, seats: 2, features: {{export: true, sso: false}},
      limits: {{projects: 5}}, stripe_price_ids: [price_team]}}
  - {{sku: float, product: acme, seats: 1, floating: true, lease_seconds: 60,
      stripe_price_ids: [price_float]}}
"""


# -- seats in the domain ----------------------------------------------------------


def test_seats_are_taken_once_per_device_and_limited() -> None:
    world = World()
    world.deliver(paid(0, "pro"))  # pro: 5 seats
    entitlement = world.only()
    [code] = entitlement.codes
    at = T0 + timedelta(minutes=5)
    seats = [
        entitlement.activate(code, f"dev-{n}", None, f"seat-{n}", f"r{n}", at) for n in range(5)
    ]
    assert all(new for _, new in seats)
    assert entitlement.activate(code, "dev-0", None, "seat-x", "r9", at) == ("seat-0", False)
    with pytest.raises(TooManySeats):
        entitlement.activate(code, "dev-5", None, "seat-5", "r5", at)
    entitlement.release("seat-4", "released", "r10", at)
    assert entitlement.activate(code, "dev-5", None, "seat-5", "r11", at) == ("seat-5", True)


def test_an_entitlement_that_is_not_active_takes_no_new_seat() -> None:
    world = World()
    world.deliver(paid(0, "pro"))
    entitlement = world.only()
    [code] = entitlement.codes
    world.at(60 * DAY).tick()  # unpaid: suspended, then expired
    with pytest.raises(NotActive) as info:
        entitlement.activate(code, "dev-1", None, "seat-1", "r1", world.now)
    assert info.value.status.value == "EXPIRED"


def test_a_downgrade_keeps_the_oldest_activations_that_still_fit() -> None:
    world = World()
    world.deliver(paid(0, "pro", quantity=2))  # 10 seats
    entitlement = world.only()
    [code] = entitlement.codes
    for n in range(4):
        entitlement.activate(
            code, f"dev-{n}", None, f"seat-{n}", f"r{n}", T0 + timedelta(minutes=n)
        )
    world.deliver(snapshot(0, plan="basic", at=DAY))  # basic: 1 seat
    assert list(entitlement.activations) == ["seat-0"]
    released = [e for e in entitlement.collect_events() if type(e).__name__ == "SeatReleased"]
    assert {e.reason for e in released} == {"seats_reduced"}  # type: ignore[attr-defined]


# -- the API end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("licensing")
    (workdir / "entitle.yaml").write_text(CONFIG)
    with Entitle(["dev"], Path(workdir), {"ENTITLE_ADMIN_KEYS": ADMIN}) as entitle:
        yield entitle


def new_entitlement(stack: Entitle, sub: str) -> dict[str, Any]:
    now = int(time.time())
    event = se.invoice_paid(
        subscription=sub, lines=[{"price": "price_team", "start": now - DAY, "end": now + 30 * DAY}]
    )
    assert post(stack, event).status_code == 202
    [item] = eventually(lambda: entitlements(stack, order_ref=sub), timeout=5)
    return item


def call(
    stack: Entitle, path: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, headers=headers)


def bearer(credential: str) -> dict[str, str]:
    """What a seat's routes take: its secret, or the code that opened it."""
    return {"Authorization": f"Bearer {credential}"}


def validated(stack: Entitle, code: str, expected: str) -> dict[str, Any]:
    """The validation answer for `code`, once it is `expected` (the index
    follows the read model a moment behind the webhook)."""
    answer: dict[str, Any] = eventually(
        lambda: (
            (r := call(stack, "/v1/validate", {"activation_code": code}).json())["code"] == expected
            and r
        ),
        timeout=5,
    )
    return answer


def unknown_code() -> str:
    """A well-formed activation code that opens nothing in the stack."""
    return CodeBook("not-the-stack-secret-0123456789").code(uuid.uuid4(), 0)


@pytest.mark.e2e
def test_activate_validate_and_release_with_the_code_alone(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_lic_1")
    code = item["activation_code"].lower().replace("-", "")  # however the customer types it
    first = call(
        stack,
        "/v1/activations",
        {"activation_code": code, "fingerprint": "laptop", "label": "Ada's laptop"},
    )
    assert first.status_code == 201, first.text
    seat = first.json()
    assert (seat["entitlement_id"], seat["fingerprint"], seat["label"]) == (
        item["id"],
        "laptop",
        "Ada's laptop",
    )
    again = call(stack, "/v1/activations", {"activation_code": code, "fingerprint": "laptop"})
    assert (again.status_code, again.json()["id"]) == (200, seat["id"])
    # Validation sees the seat at once (the store confirms what the read model lacks).
    result = call(
        stack,
        "/v1/validate",
        {"activation_code": code, "fingerprint": "laptop", "feature": "export"},
    ).json()
    assert (result["valid"], result["code"], result["status"]) == (True, "VALID", "ACTIVE")
    assert result["entitlement"]["seats_total"] == 2
    assert result["entitlement"]["limits"] == {"projects": 5}
    assert (
        call(
            stack, "/v1/activations", {"activation_code": code, "fingerprint": "desktop"}
        ).status_code
        == 201
    )
    full = call(stack, "/v1/activations", {"activation_code": code, "fingerprint": "tablet"})
    assert (full.status_code, full.json()["error"]) == (409, "TOO_MANY_SEATS")
    released = httpx.delete(f"{stack.url}/v1/activations/{seat['id']}", headers=bearer(code))
    assert released.status_code == 204
    eventually(
        lambda: (
            call(
                stack, "/v1/activations", {"activation_code": code, "fingerprint": "tablet"}
            ).status_code
            == 201
        ),
        timeout=5,
    )
    checks = {
        "NO_SEAT": {"activation_code": code, "fingerprint": "laptop"},
        "FEATURE_NOT_INCLUDED": {"activation_code": code, "feature": "sso"},
        "NOT_FOUND": {"activation_code": "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE"},
    }
    for expected, body in checks.items():
        result = eventually(
            lambda b=body, e=expected: (
                (r := call(stack, "/v1/validate", b).json())["code"] == e and r
            ),
            timeout=5,
        )
        assert result["valid"] is False
    assert call(stack, "/v1/validate", {"activation_code": code, "extra": 1}).status_code == 422
    assert call(stack, "/v1/validate", {}).json()["error"] == "invalid_body"
    wrong_method = httpx.get(f"{stack.url}/v1/validate")
    assert (wrong_method.status_code, wrong_method.json()["error"]) == (405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"
    assert httpx.delete(f"{stack.url}/v1/activations/nope", headers=bearer(code)).status_code == 404
    unknown = call(
        stack,
        "/v1/activations",
        {"activation_code": "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE", "fingerprint": "x"},
    )
    assert (unknown.status_code, unknown.json()["error"]) == (404, "NOT_FOUND")


@pytest.mark.e2e
def test_a_suspended_entitlement_validates_as_suspended_and_takes_no_seat(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_lic_2")
    code = item["activation_code"]
    suspend = httpx.post(
        f"{stack.url}/v1/entitlements/{item['id']}/suspend",
        json={"reason": "fraud check"},
        headers=AUTH,
    )
    assert suspend.status_code == 200
    refused = call(stack, "/v1/activations", {"activation_code": code, "fingerprint": "pc"})
    assert refused.status_code == 403
    assert (refused.json()["error"], refused.json()["entitlement_status"]) == (
        "NOT_ACTIVE",
        "SUSPENDED",
    )
    result = validated(stack, code, "SUSPENDED")
    assert (result["valid"], result["status"]) == (False, "SUSPENDED")


@pytest.mark.e2e
def test_pending_and_canceled_entitlements_validate_with_their_status(stack: Entitle) -> None:
    now = int(time.time())
    created = se.subscription_event(
        "customer.subscription.created",
        subscription="sub_lic_pending",
        items=[{"price": "price_team"}],
        status="incomplete",
        start=now,
        end=now + 30 * DAY,
    )
    assert post(stack, created).status_code == 202
    [pending] = eventually(lambda: entitlements(stack, order_ref="sub_lic_pending"), timeout=5)
    answer = validated(stack, pending["activation_code"], "PENDING")
    assert (answer["valid"], answer["status"]) == (False, "PENDING")
    assert answer["entitlement"]["offering"] == pending["offering"]

    item = new_entitlement(stack, "sub_lic_canceled")
    assert validated(stack, item["activation_code"], "VALID")["valid"] is True
    assert post(stack, se.subscription_deleted(subscription="sub_lic_canceled")).status_code == 202
    answer = validated(stack, item["activation_code"], "CANCELED")
    assert (answer["valid"], answer["status"]) == (False, "CANCELED")


@pytest.mark.e2e
def test_an_offline_license_file_verifies_and_tampering_is_detected(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_lic_3")
    seat = call(
        stack,
        "/v1/activations",
        {"activation_code": item["activation_code"], "fingerprint": "workstation-7"},
    ).json()
    response = call(
        stack, f"/v1/activations/{seat['id']}/license-file", None, bearer(seat["secret"])
    )
    assert response.status_code == 200, response.text
    document = response.json()
    [key] = httpx.get(f"{stack.url}/v1/keys").json()["keys"]
    assert (key["algorithm"], key["id"]) == ("Ed25519", document["license"]["key_id"])

    license = verify_license(document, key["public_key"], fingerprint="workstation-7")
    assert (license.offering, license.features, license.limits) == (
        "team",
        {"export": True, "sso": False},
        {"projects": 5},
    )
    assert license.expires_at - license.issued_at == timedelta(days=7)  # the default TTL

    tampered = json.loads(json.dumps(document))
    tampered["license"]["features"]["sso"] = True
    with pytest.raises(InvalidLicense, match="altered"):
        verify_license(tampered, key["public_key"])
    with pytest.raises(InvalidLicense, match="another device"):
        verify_license(document, key["public_key"], fingerprint="someone-else")
    with pytest.raises(InvalidLicense, match="expired"):
        verify_license(document, key["public_key"], now=license.expires_at)
    with pytest.raises(InvalidLicense):
        verify_license(document, base64.b64encode(b"\x01" * 32).decode())
    missing = call(stack, "/v1/activations/nope/license-file", None, bearer(seat["secret"]))
    assert missing.status_code == 404

    # The file to ship: a token whose exact bytes are signed, the same license.
    token = document["token"]
    assert verify_license(token, key["public_key"], fingerprint="workstation-7") == license
    assert key["jwk"]["x"] == base64.urlsafe_b64encode(
        base64.b64decode(key["public_key"])
    ).decode().rstrip("=")
    header, _, signature = token.split(".")
    forged = (
        base64.urlsafe_b64encode(
            json.dumps({**document["license"], "limits": {"projects": 500}}).encode()
        )
        .decode()
        .rstrip("=")
    )
    with pytest.raises(InvalidLicense, match="altered"):
        verify_license(f"{header}.{forged}.{signature}", key["public_key"])
    if shutil.which("node"):  # the JavaScript verifier takes the same file
        script = (
            "import { verifyLicense } from './clients/js/verify.mjs';"
            " const [t, k] = process.argv.slice(1);"
            " console.log(JSON.stringify(verifyLicense(t, k, {fingerprint: 'workstation-7'})));"
        )
        ran = subprocess.run(
            ["node", "--input-type=module", "-e", script, token, key["public_key"]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout)["activation_id"] == seat["id"]


@pytest.mark.e2e
def test_this_process_sees_its_own_changes_before_the_read_model_does(stack: Entitle) -> None:
    """Validation and code lookups prefer what the API process saved over a
    read model a moment behind: a release, an issued code, a revoked one."""
    item = new_entitlement(stack, "sub_lic_fresh")
    code = item["activation_code"]
    seat = call(stack, "/v1/activations", {"activation_code": code, "fingerprint": "pc"}).json()
    assert validated(stack, code, "VALID")
    body = {"activation_code": code, "fingerprint": "pc"}
    assert call(stack, "/v1/validate", body).json()["code"] == "VALID"
    released = httpx.delete(f"{stack.url}/v1/activations/{seat['id']}", headers=bearer(code))
    assert released.status_code == 204
    assert call(stack, "/v1/validate", body).json()["code"] == "NO_SEAT"
    issued = httpx.post(f"{stack.url}/v1/entitlements/{item['id']}/codes", headers=AUTH).json()
    second = {"activation_code": issued["code"], "fingerprint": "laptop"}
    assert call(stack, "/v1/activations", second).status_code == 201
    revoked = httpx.delete(f"{stack.url}/v1/entitlements/{item['id']}/codes/1", headers=AUTH)
    assert revoked.status_code == 200
    assert call(stack, "/v1/validate", second).json()["code"] == "NOT_FOUND"
    portal = httpx.get(f"{stack.url}/v1/portal", params={"activation_code": issued["code"]})
    assert portal.status_code == 404


# -- the customer's view, abuse limits, logs -----------------------------------------


@pytest.mark.e2e
def test_the_portal_shows_only_the_entitlement_the_code_opens(stack: Entitle) -> None:
    mine = new_entitlement(stack, "sub_lic_4")
    other = new_entitlement(stack, "sub_lic_5")
    call(
        stack,
        "/v1/activations",
        {"activation_code": mine["activation_code"], "fingerprint": "f1", "label": "Office PC"},
    )
    portal = eventually(
        lambda: (
            (
                p := httpx.get(
                    f"{stack.url}/v1/portal", params={"activation_code": mine["activation_code"]}
                )
            )
            .json()
            .get("seats")
            and p.json()
        ),
        timeout=5,
    )
    assert (portal["status"], portal["offering"], portal["seats_total"]) == ("ACTIVE", "team", 2)
    assert [s["label"] for s in portal["seats"]] == ["Office PC"]
    text = json.dumps(portal)
    for secret in (other["id"], mine["id"], "f1", mine["customer"]["email"] or "@"):
        assert secret not in text  # no ids, fingerprints or other customers' data
    assert httpx.get(f"{stack.url}/v1/portal").status_code == 422
    missing = httpx.get(
        f"{stack.url}/v1/portal", params={"activation_code": "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE"}
    )
    assert missing.status_code == 404


@pytest.mark.e2e
def test_a_code_asked_about_by_another_product_is_wrong_product(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_lic_product")
    code = item["activation_code"]
    ours = call(stack, "/v1/validate", {"activation_code": code, "product": "acme"})
    assert (ours.json()["valid"], ours.json()["code"]) == (True, "VALID")
    for body in (
        {"activation_code": code, "product": "other-app"},
        {"activation_code": code, "product": "other-app", "fingerprint": "dev-1"},
    ):
        theirs = call(stack, "/v1/validate", body)
        assert theirs.status_code == 200
        # Nothing of the entitlement is told to another product.
        assert theirs.json() == {
            "valid": False,
            "code": "WRONG_PRODUCT",
            "status": None,
            "entitlement": None,
        }
    refused = call(
        stack,
        "/v1/activations",
        {"activation_code": code, "fingerprint": "dev-1", "product": "other-app"},
    )
    assert (refused.status_code, refused.json()["error"]) == (403, "WRONG_PRODUCT")
    taken = call(
        stack,
        "/v1/activations",
        {"activation_code": code, "fingerprint": "dev-1", "product": "acme"},
    )
    assert taken.status_code == 201
    # Without a product the code is checked as before.
    plain = call(stack, "/v1/validate", {"activation_code": code})
    assert plain.json()["code"] == "VALID"


@pytest.mark.e2e
def test_validation_is_rate_limited_per_code_with_retry_after(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_lic_6")
    body = {"activation_code": item["activation_code"]}
    # One keep-alive connection, so the requests come faster than the refill.
    with httpx.Client(base_url=stack.url) as client:
        statuses = [client.post("/v1/validate", json=body) for _ in range(60)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, "the per-code burst of 20 was not enforced"
    assert limited[0].json()["error"] == "rate_limited"
    assert int(limited[0].headers["Retry-After"]) >= 1
    other = new_entitlement(stack, "sub_lic_7")  # another code is not held back
    assert (
        call(stack, "/v1/validate", {"activation_code": other["activation_code"]}).status_code
        == 200
    )


@pytest.mark.e2e
def test_activation_and_validation_are_rate_limited_per_client_address(stack: Entitle) -> None:
    # The tests connect from 127.0.0.1, a trusted proxy by default, so
    # X-Forwarded-For names the client. Unknown codes, each used once, fill
    # only the address's bucket (burst 200, then 100/s).
    # Until 100 are held back: how many requests that takes depends on how
    # fast this machine sends them (the bucket refills as they go), but
    # never more got through than the burst and the refill allow.
    unknown: list[str] = []
    answers: list[httpx.Response] = []
    started = time.monotonic()
    with httpx.Client(base_url=stack.url, headers={"X-Forwarded-For": "203.0.113.7"}) as client:
        while sum(a.status_code == 429 for a in answers) < 100 and len(answers) < 5000:
            unknown.append(unknown_code())
            answers.append(client.post("/v1/validate", json={"activation_code": unknown[-1]}))
        elapsed = time.monotonic() - started
        assert answers[0].status_code == 200 and answers[0].json()["code"] == "NOT_FOUND"
        limited = [a for a in answers if a.status_code == 429]
        admitted = len(answers) - len(limited)
        assert len(limited) == 100, "the per-address burst of 200 was not enforced"
        assert 200 <= admitted <= 200 + 100 * elapsed + 1, (admitted, elapsed)
        assert int(limited[0].headers["Retry-After"]) >= 1
        # Activation shares the address's bucket: codes used once so far (far
        # from their own limit) are still held back, though it refills 100/s.
        activations = [
            client.post("/v1/activations", json={"activation_code": c, "fingerprint": "f"})
            for c in unknown[-20:]
        ]
        assert 429 in [a.status_code for a in activations]
    # Another client, right after, has a whole burst of its own.
    with httpx.Client(base_url=stack.url, headers={"X-Forwarded-For": "203.0.113.8"}) as client:
        other = [client.post("/v1/validate", json={"activation_code": c}) for c in unknown[:50]]
    assert [a.status_code for a in other] == [200] * 50


@pytest.mark.e2e
def test_activation_is_rate_limited_per_code(stack: Entitle) -> None:
    code = unknown_code()
    with httpx.Client(base_url=stack.url, headers={"X-Forwarded-For": "203.0.113.9"}) as client:
        answers = [
            client.post("/v1/activations", json={"activation_code": code, "fingerprint": f"d{n}"})
            for n in range(60)
        ]
    assert answers[0].status_code == 404
    assert 429 in [a.status_code for a in answers], "the per-code burst of 20 was not enforced"


def test_a_bucket_refills_at_its_rate() -> None:
    bucket = Buckets(rate=2, burst=3)
    assert [bucket.take("k", 0.0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take("k", 0.0) == pytest.approx(0.5)
    assert bucket.take("k", 0.5) == 0
    assert bucket.take("other", 0.5) == 0


def test_access_logs_never_show_a_whole_code() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s"',
        ("1.2.3.4", "GET", "/v1/portal?activation_code=7K3QD-ABCDE-FGHJK"),
        None,
    )
    MaskCodes().filter(record)
    line = record.getMessage()
    assert "7K3QD" in line and "ABCDE" not in line and "FGHJK" not in line


# -- usage quotas -------------------------------------------------------------------


def test_usage_counts_against_the_limit_once_per_key_and_resets_each_period() -> None:
    world = World()
    world.deliver(paid(0, "pro"))  # pro: limits {projects: 50}
    entitlement = world.only()
    at = T0 + timedelta(days=1)
    assert entitlement.record_usage("projects", 30, "k1", at)
    assert not entitlement.record_usage("projects", 30, "k1", at)  # the same key: once
    with pytest.raises(OverLimit):
        entitlement.record_usage("projects", 21, "k2", at)
    assert entitlement.used("projects") == 30  # nothing was recorded
    with pytest.raises(UnknownMetric):
        entitlement.record_usage("seats", 1, "k3", at)
    world.deliver(paid(1, "pro"))  # a new paid period
    assert entitlement.used("projects") == 0
    assert entitlement.record_usage("projects", 50, "k4", at)


@pytest.mark.e2e
def test_usage_over_http_with_over_limit_and_history(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_lic_8")  # team: limits {projects: 5}
    code = item["activation_code"]

    def use(quantity: int, key: str) -> httpx.Response:
        return call(
            stack,
            "/v1/usage",
            {
                "activation_code": code,
                "metric": "projects",
                "quantity": quantity,
                "idempotency_key": key,
            },
        )

    first = use(3, "a")
    assert first.status_code == 201, first.text
    assert first.json()["current"]["projects"] == {"used": 3, "limit": 5}
    assert use(3, "a").status_code == 200  # a retry with the same key counts once
    over = use(3, "b")
    assert (over.status_code, over.json()["error"]) == (409, "OVER_LIMIT")
    assert use(2, "c").json()["current"]["projects"] == {"used": 5, "limit": 5}
    # Validation reads memory, yet sees this process's own save at once.
    result = call(stack, "/v1/validate", {"activation_code": code, "feature": "projects"}).json()
    assert (result["valid"], result["code"]) == (False, "OVER_LIMIT")
    unknown = call(
        stack,
        "/v1/usage",
        {"activation_code": code, "metric": "gpus", "quantity": 1, "idempotency_key": "d"},
    )
    assert (unknown.status_code, unknown.json()["error"]) == (422, "unknown_metric")
    history = eventually(
        lambda: (
            (h := httpx.get(f"{stack.url}/v1/usage", params={"activation_code": code}).json())[
                "current"
            ]["projects"]["used"]
            == 5
            and h
        ),
        timeout=5,
    )
    assert [p["metrics"] for p in history["periods"]] == [{"projects": 5}]
    portal = httpx.get(f"{stack.url}/v1/portal", params={"activation_code": code}).json()
    assert portal["usage"] == {"projects": {"used": 5, "limit": 5}}


# -- floating seats -------------------------------------------------------------------


def test_floating_seats_are_leases_kept_by_heartbeats_and_freed_when_they_lapse() -> None:
    world = World()
    world.deliver(paid(0, "basic"))  # 1 seat
    entitlement = world.only()
    [code] = entitlement.codes
    lease = timedelta(minutes=15)
    t = T0 + timedelta(hours=1)
    assert entitlement.activate(code, "a", None, "seat-a", "r1", t, lease) == ("seat-a", True)
    assert entitlement.activations["seat-a"]["lease_until"] == t + lease
    with pytest.raises(TooManySeats):
        entitlement.activate(code, "b", None, "seat-b", "r2", t, lease)
    entitlement.collect_events()
    # A heartbeat early in the lease records nothing; one past half renews it.
    assert entitlement.heartbeat("seat-a", lease, "h1", t + timedelta(minutes=5)) == t + lease
    assert entitlement.collect_events() == []
    later = t + timedelta(minutes=10)
    assert entitlement.heartbeat("seat-a", lease, "h2", later) == later + lease
    assert [type(e).__name__ for e in entitlement.collect_events()] == ["SeatRenewed"]
    # Without heartbeats the lease lapses: the device no longer holds a seat,
    # and another device can take it (the lapsed one is released first).
    lapsed = later + lease
    assert not entitlement.holds_seat("a", lapsed)
    with pytest.raises(Refused, match="lapsed"):
        entitlement.heartbeat("seat-a", lease, "h3", lapsed)
    assert entitlement.activate(code, "b", None, "seat-b", "r3", lapsed, lease) == ("seat-b", True)
    released = [e for e in entitlement.collect_events() if type(e).__name__ == "SeatReleased"]
    assert [e.reason for e in released] == ["lease_expired"]  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_a_floating_seat_reports_its_lease_and_takes_heartbeats(stack: Entitle) -> None:
    now = int(time.time())
    event = se.invoice_paid(
        subscription="sub_lic_float",
        lines=[{"price": "price_float", "start": now - DAY, "end": now + 30 * DAY}],
    )
    assert post(stack, event).status_code == 202
    [item] = eventually(lambda: entitlements(stack, order_ref="sub_lic_float"), timeout=5)
    seat = call(
        stack,
        "/v1/activations",
        {"activation_code": item["activation_code"], "fingerprint": "render-node-1"},
    ).json()
    assert seat["lease_until"] is not None
    beat = call(stack, f"/v1/activations/{seat['id']}/heartbeat", None, bearer(seat["secret"]))
    assert beat.status_code == 200, beat.text
    assert beat.json()["id"] == seat["id"] and beat.json()["lease_until"]
    taken = call(
        stack,
        "/v1/activations",
        {"activation_code": item["activation_code"], "fingerprint": "render-node-2"},
    )
    assert taken.status_code == 409  # the lease is alive
    assert (
        call(stack, "/v1/activations/nope/heartbeat", None, bearer(seat["secret"])).status_code
        == 404
    )
