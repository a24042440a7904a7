"""Outbound webhooks end to end: a real `entitle dev`, endpoints created
through the admin API, a local receiver, and every delivery verified with
the official `standardwebhooks` package."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.receiver import Receiver, receiver

pytestmark = pytest.mark.e2e

ADMIN = "ops:ek_test_admin_key"
AUTH = {"Authorization": "Bearer ek_test_admin_key"}
YEAR = 365 * 86400


def config(private: bool = True) -> str:
    return f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
offerings:
  - sku: better_annual
    product: acme-studio
    period: P1Y
    seats: 3
    stripe_price_ids: [price_annual]
outbound:
  allow_private_networks: {"true" if private else "false"}
  retry_schedule: [0.3, 0.3, 0.5, 0.5, 1, 1, 2]
"""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Entitle]:
    (tmp_path / "entitle.yaml").write_text(config())
    with Entitle(["dev"], tmp_path, {"ENTITLE_ADMIN_KEYS": ADMIN}) as entitle:
        yield entitle


@pytest.fixture
def local() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


def create(entitle: Entitle, url: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{entitle.url}/v1/webhook-endpoints", json={"url": url, **body}, headers=AUTH
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def paid(subscription: str, price: str = "price_annual", **more: Any) -> dict[str, Any]:
    now = int(time.time())
    return se.invoice_paid(
        subscription=subscription,
        customer=f"cus_{subscription}",
        email=f"{subscription}@example.com",
        lines=[{"price": price, "start": now, "end": now + YEAR}],
        **more,
    )


def post(entitle: Entitle, event: dict[str, Any]) -> None:
    body = se.body(event)
    response = httpx.post(
        f"{entitle.url}/webhooks/stripe-main", content=body, headers=se.signed_headers(body)
    )
    assert response.status_code == 202, response.text


def verified(secret: str, request: Any) -> dict[str, Any]:
    """The message, verified as a Standard Webhooks consumer would."""
    headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
    message: dict[str, Any] = Webhook(secret).verify(request.body, headers)
    return message


def test_a_paid_invoice_reaches_the_endpoint_signed_with_codes_that_validate(
    stack: Entitle, local: Receiver
) -> None:
    endpoint = create(stack, local.url + "/hooks", include_codes=True, description="crm")
    assert endpoint["secret"].startswith("whsec_")
    plain = create(stack, local.url + "/plain", events=["entitlement.*"])
    # The secret is shown once.
    again = httpx.get(f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}", headers=AUTH).json()
    assert again["secret"] is None and again["url"] == local.url + "/hooks"

    post(stack, paid("sub_out1"))
    got = eventually(lambda: len(r := local.at("/hooks")) >= 3 and r, timeout=10)
    messages = {m["type"]: m for m in (verified(endpoint["secret"], r) for r in got)}
    assert set(messages) == {"entitlement.created", "entitlement.activated", "order.created"}
    created = messages["entitlement.created"]["data"]
    assert created["entitlement"]["order_ref"] == "sub_out1"
    assert messages["entitlement.activated"]["data"]["status"] == "ACTIVE"
    [code] = created["activation_codes"]
    order = messages["order.created"]["data"]
    assert order["order_ref"] == "sub_out1"
    assert order["customer"]["email"] == "sub_out1@example.com"
    assert order["entitlement_ids"] == [created["entitlement_id"]]
    assert order["activation_codes"] == {created["entitlement_id"]: [code]}
    # webhook-id is the event's id, the one the Kafka topic carries.
    hook = next(r for r in got if r.json["type"] == "entitlement.created")
    assert hook.headers["webhook-id"] == created["event_id"]

    valid = httpx.post(f"{stack.url}/v1/validate", json={"activation_code": code}).json()
    assert valid["valid"] is True

    # Without include_codes: no code; without order.created in its events: none.
    plain_got = eventually(lambda: local.at("/plain") or None, timeout=10)
    plain_got = eventually(lambda: len(r := local.at("/plain")) >= 2 and r, timeout=10)
    assert {verified(plain["secret"], r)["type"] for r in plain_got} == {
        "entitlement.created",
        "entitlement.activated",
    }
    assert "activation_codes" not in plain_got[0].json["data"]
    assert code not in plain_got[0].body.decode()

    deliveries = httpx.get(
        f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}/deliveries", headers=AUTH
    ).json()["items"]
    assert {d["type"] for d in deliveries} == set(messages)
    assert all(d["status"] == "succeeded" for d in deliveries)
    attempt = deliveries[0]["attempts"][0]
    assert attempt["status_code"] == 200 and attempt["latency_ms"] > 0
    assert '"received": true' in attempt["answer"]
    assert "whsec_" not in stack.text


def test_a_receiver_down_for_a_while_gets_everything_in_order_and_others_are_not_delayed(
    stack: Entitle, local: Receiver
) -> None:
    failing = create(stack, local.url + "/down")
    healthy = create(stack, local.url + "/up")
    local.status["/down"] = 503
    local.retry_after["/down"] = "1"
    post(stack, paid("sub_order"))
    entitlement = eventually(
        lambda: (
            (
                items := httpx.get(
                    f"{stack.url}/v1/entitlements", params={"order_ref": "sub_order"}, headers=AUTH
                ).json()["items"]
            )
            and items[0]
        ),
        timeout=10,
    )
    for action in ("suspend", "reinstate", "extend"):
        body = {"reason": "test", **({"days": 3} if action == "extend" else {})}
        response = httpx.post(
            f"{stack.url}/v1/entitlements/{entitlement['id']}/{action}", json=body, headers=AUTH
        )
        assert response.status_code == 200, response.text
    # The healthy endpoint has all four at once, whatever the other does.
    up = eventually(lambda: len(r := local.ok_at("/up")) >= 6 and r, timeout=5)
    sequence = [r.json["data"]["sequence"] for r in up if r.json["type"] != "order.created"]
    assert sequence == [1, 2, 3, 4, 5]
    # Ordered: while the first fails, the entitlement's next is not sent.
    time.sleep(1.5)
    tried = {r.json["data"].get("sequence") for r in local.at("/down")}
    assert tried <= {1, None}, tried
    local.status["/down"] = 200
    down = eventually(lambda: len(r := local.ok_at("/down")) >= 6 and r, timeout=15)
    sequence = [r.json["data"]["sequence"] for r in down if r.json["type"] != "order.created"]
    assert sequence == [1, 2, 3, 4, 5]
    for request in down:
        verified(failing["secret"], request)
    listed = httpx.get(
        f"{stack.url}/v1/webhook-endpoints/{failing['id']}/deliveries",
        params={"status": "succeeded"},
        headers=AUTH,
    ).json()["items"]
    first = next(d for d in listed if d["type"] == "entitlement.created")
    assert first["attempts"][0]["status_code"] == 503
    assert first["attempts"][-1]["status_code"] == 200
    assert healthy["id"] != failing["id"]


def test_secret_rotation_signs_with_both_secrets_for_a_day(stack: Entitle, local: Receiver) -> None:
    endpoint = create(stack, local.url + "/rot")
    rotated = httpx.post(
        f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}/rotate-secret", headers=AUTH
    ).json()
    assert rotated["secret"] != endpoint["secret"]
    # What is sent right after the answer is signed with the secret it gave.
    httpx.post(f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}/test", headers=AUTH)
    ping = eventually(lambda: local.at("/rot") or None, timeout=10)[0]
    assert verified(rotated["secret"], ping)["type"] == "ping"
    post(stack, paid("sub_rot"))
    request = eventually(lambda: local.at("/rot")[1:] or None, timeout=10)[0]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert verified(endpoint["secret"], request) == verified(rotated["secret"], request)


def test_a_ping_410_disables_and_the_history_shows_who(stack: Entitle, local: Receiver) -> None:
    endpoint = create(stack, local.url + "/gone")
    local.status["/gone"] = 410
    response = httpx.post(f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}/test", headers=AUTH)
    assert response.status_code == 202
    shown = eventually(
        lambda: (
            (
                e := httpx.get(
                    f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}", headers=AUTH
                ).json()
            )["disabled"]
            and e
        ),
        timeout=10,
    )
    assert "410" in shown["disabled_reason"]
    trail = httpx.get(
        f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}/history", headers=AUTH
    ).json()["events"]
    assert [(e["type"], e["data"]["by"]) for e in trail] == [
        ("endpoint.registered", "ops"),
        ("endpoint.disabled", "dispatcher"),
    ]
    # While disabled nothing is sent, but what happens is kept for it.
    post(stack, paid("sub_gone"))
    time.sleep(1)
    assert len(local.at("/gone")) == 1
    local.status["/gone"] = 200
    patched = httpx.patch(
        f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}",
        json={"disabled": False},
        headers=AUTH,
    )
    assert patched.status_code == 200 and patched.json()["disabled"] is False
    # Re-enabled, what waited is sent: the ping and the purchase's events.
    sent = eventually(lambda: len(r := local.ok_at("/gone")) >= 4 and r, timeout=10)
    assert {verified(endpoint["secret"], r)["type"] for r in sent} == {
        "ping",
        "entitlement.created",
        "entitlement.activated",
        "order.created",
    }
    listed = httpx.get(
        f"{stack.url}/v1/webhook-endpoints/{endpoint['id']}/deliveries", headers=AUTH
    ).json()["items"]
    [ping] = [d for d in listed if d["type"] == "ping"]
    assert ping["status"] == "succeeded"
    # (An attempt the network failed, on a loaded machine, is retried: it has
    # no status, and says why.)
    answered = [a["status_code"] for a in ping["attempts"] if a["status_code"] is not None]
    assert answered == [410, 200], ping["attempts"]
    assert all(a["error"] for a in ping["attempts"] if a["status_code"] is None), ping["attempts"]
    # A resend sends it again, with the same webhook-id, and lists the attempt.
    resent = httpx.post(f"{stack.url}/v1/deliveries/{ping['id']}/resend", headers=AUTH)
    assert resent.status_code == 202 and resent.json() == {"resent": 1}
    pings = eventually(
        lambda: len(r := [x for x in local.ok_at("/gone") if x.json["type"] == "ping"]) == 2 and r,
        timeout=10,
    )
    assert pings[0].headers["webhook-id"] == pings[1].headers["webhook-id"]
    unknown = httpx.post(f"{stack.url}/v1/deliveries/nope/resend", headers=AUTH)
    assert unknown.status_code == 404


def test_private_addresses_and_plain_http_are_refused_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(config(private=False))
    with Entitle(["dev"], tmp_path, {"ENTITLE_ADMIN_KEYS": ADMIN}) as entitle:
        for url, says in [
            ("http://127.0.0.1:9/hook", "non-public"),
            ("https://10.1.2.3/hook", "non-public"),
            ("https://[::1]/hook", "non-public"),
            ("http://example.com/hook", "loopback"),
            ("ftp://example.com/hook", "https://"),
            ("https://user:pw@example.com/hook", "credentials"),
        ]:
            response = httpx.post(
                f"{entitle.url}/v1/webhook-endpoints", json={"url": url}, headers=AUTH
            )
            assert response.status_code == 422, (url, response.text)
            assert says in response.json()["detail"], (url, response.text)
        bad = httpx.post(
            f"{entitle.url}/v1/webhook-endpoints",
            json={"url": "https://example.com/h", "events": ["entitlement.made_up"]},
            headers=AUTH,
        )
        assert bad.status_code == 422 and "made_up" in bad.json()["detail"]
