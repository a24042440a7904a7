"""Audit: an entitlement as of any recorded time or version, folded from
its stored events (`GET /v1/entitlements/{id}?as_of=…`, `entitle show
--as-of`), and its history with the state after each event, what each
changed and the webhook receipt behind it (`?with_state=true`, `entitle
history`). Webhooks folded by the real domain service into a real store,
the admin API in-process on the same database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from domain.entitlement import entitlement_id, order_id
from services.app import Roles, build_app
from services.cli import main
from services.config import Settings, admin_keys, parse_config
from tests import stripe_events as se
from tests.test_receipts import World
from tests.test_store import NOW, YEAR

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette would rather have httpx2
    from starlette.testclient import TestClient

pytestmark = pytest.mark.integration

CONFIG = parse_config(f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3,
     suspend_after_days: 3, expire_after_days: 30}}
""")
AUTH = {"Authorization": "Bearer ek_audit_admin_key"}
SUB = "sub_audit"
ID = str(entitlement_id("stripe-main", SUB, se.item_id(SUB, "p")))


def invoice(start: int, end: int) -> dict[str, Any]:
    return se.invoice_paid(
        subscription=SUB,
        shape=se.LEGACY,
        lines=[{"price": "p", "sku": "better_annual", "start": start, "end": end}],
    )


def at(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Story:
    """Paid, a second code issued and revoked by an admin, renewed by a
    second invoice, then suspended by the schedule, unpaid 4 days after
    the renewed period: what an auditor looks back on."""

    url: str
    world: World
    client: TestClient
    first: dict[str, Any]
    renewal: dict[str, Any]
    second_code: str

    def get(self, path: str = "", **params: Any) -> Any:
        return self.client.get(f"/v1/entitlements/{ID}{path}", params=params, headers=AUTH)


@pytest.fixture
def story(database_url: str) -> Iterator[Story]:
    world = World(database_url, CONFIG)
    settings = Settings(
        kafka_bootstrap=None,
        database_url=database_url,
        kafka_idempotence=False,
        raw_partitions=1,
        code_secret="test-code-secret-0123456789",  # the world's
    )
    app = build_app(CONFIG, settings, Roles(api=True), admin_keys("ops:ek_audit_admin_key"))
    try:
        with TestClient(app) as client:
            first = invoice(NOW, NOW + YEAR)
            world.send(first, "r-paid")
            issued = client.post(f"/v1/entitlements/{ID}/codes", headers=AUTH)
            assert issued.status_code == 201, issued.text
            revoked = client.delete(f"/v1/entitlements/{ID}/codes/1", headers=AUTH)
            assert revoked.status_code == 200, revoked.text
            world.now = datetime.now(UTC) + timedelta(seconds=1)  # after the admin's clock
            renewal = invoice(NOW + YEAR, NOW + 2 * YEAR)
            world.send(renewal, "r-renew")
            world.settle(datetime.fromtimestamp(NOW + 2 * YEAR, UTC) + timedelta(days=4))
            yield Story(database_url, world, client, first, renewal, issued.json()["code"])
    finally:
        world.close()


def by_type(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [event] = [e for e in events if e["type"] == kind]
    return event


def test_an_entitlement_reads_as_the_engine_saw_it_at_any_time_or_version(story: Story) -> None:
    now = story.get().json()
    assert now["status"] == "SUSPENDED" and now["period_end"] == at(NOW + 2 * YEAR)
    history = story.get("/history").json()["events"]
    renewed = by_type(history, "entitlement.renewed")
    issued = by_type(history, "entitlement.code_issued")
    revoked = by_type(history, "entitlement.code_revoked")
    last = history[-1]["version"]

    # Between the renewal and the suspension: ACTIVE, renewed.
    then = story.get(as_of=renewed["recorded_at"]).json()
    assert then["status"] == "ACTIVE" and then["period_end"] == at(NOW + 2 * YEAR)
    assert then["as_of"]["version"] == renewed["version"] == then["sequence"]
    assert then["as_of"]["latest_version"] == last
    # Before the renewal (just after the revocation): ACTIVE, the old period.
    before = story.get(as_of=revoked["recorded_at"]).json()
    assert before["status"] == "ACTIVE" and before["period_end"] == at(NOW + YEAR)
    # The second code existed from its issue to its revocation, and shows.
    codes = story.get(as_of=issued["recorded_at"]).json()["activation_codes"]
    assert [c["index"] for c in codes] == [0, 1] and codes[1]["code"] == story.second_code
    assert [c["index"] for c in before["activation_codes"]] == [0]

    created = story.get(as_of_version=1).json()
    assert created["sequence"] == 1 and created["as_of"] == {
        "at": None,
        "version": 1,
        "latest_version": last,
    }
    assert created["status"] == "PENDING"
    assert created["period_end"] is None and created["activation_code"] == now["activation_code"]
    # The last version folded from the events is what the read model says.
    latest = story.get(as_of_version=last).json()
    assert {k: v for k, v in latest.items() if k != "as_of"} == now

    early = datetime.fromisoformat(history[0]["recorded_at"]) - timedelta(seconds=1)
    missing = story.get(as_of=early.isoformat())
    assert missing.status_code == 404
    detail = missing.json()["detail"]
    assert f"entitlement {ID} did not exist at {early.isoformat()}" in detail
    assert "created at" in detail
    beyond = story.get(as_of_version=last + 1)
    assert beyond.status_code == 404 and f"versions are 1 to {last}" in beyond.json()["detail"]
    an_order = f"/v1/entitlements/{order_id('stripe-main', SUB)}"
    order = story.client.get(an_order, params={"as_of_version": 1}, headers=AUTH)
    assert order.status_code == 404 and "no entitlement" in order.json()["detail"]
    for params in (
        {"as_of_version": "0"},
        {"as_of_version": "x"},
        {"as_of_version": "\uff11"},  # a fullwidth 1: a digit to Python, not to RFC 3339
        {"as_of": "yesterday"},
        {"as_of": "2026-11-30T00:00:00"},  # no offset
        {"as_of": "2026-W48-1T17:45:37Z"},  # an ISO week date
        {"as_of": "2026-11-30T17:45:37.Z"},
        {"as_of": "2026-11-30T17:45:37,5Z"},
        {"as_of": "2026-11-30T17:45:37\uff15Z"},
        {"as_of": renewed["recorded_at"], "as_of_version": "1"},
        {"asof": "2026-11-30T00:00:00Z"},
        [("as_of", renewed["recorded_at"]), ("as_of", revoked["recorded_at"])],
        [("as_of_version", "1"), ("as_of_version", "2")],
    ):
        refused = story.client.get(f"/v1/entitlements/{ID}", params=params, headers=AUTH)
        assert refused.status_code == 422, (params, refused.text)
        assert refused.json()["error"] == "invalid_query"
    # RFC 3339 allows a lower-case t and z.
    lower = story.get(as_of=renewed["recorded_at"].replace("T", "t").replace("Z", "z"))
    assert lower.status_code == 200 and lower.json() == then
    # What the engine has not seen yet it cannot say.
    # (The story's clock runs years ahead: after its last event, and now.)
    future = story.get(as_of=at(NOW + 3 * YEAR))
    assert future.status_code == 422 and future.json()["detail"] == "as_of is in the future"
    # The same parsers on the other routes.
    for path, params in (
        ("/v1/webhooks", {"since": "2026-W48-1T17:45:37Z"}),
        ("/v1/webhooks", [("since", "2026-11-30T00:00:00Z"), ("since", "2026-11-29T00:00:00Z")]),
        ("/v1/webhooks", {"limit": "\uff15"}),
        ("/v1/entitlements", {"limit": "\uff15"}),
        ("/v1/entitlements", [("status", "ACTIVE"), ("status", "CANCELED")]),
    ):
        refused = story.client.get(path, params=params, headers=AUTH)
        assert refused.status_code == 422, (path, params, refused.text)
    since = story.client.get("/v1/webhooks", params={"since": "2000-01-01t00:00:00z"}, headers=AUTH)
    assert since.status_code == 200 and since.json()["items"]


def test_the_history_with_state_says_what_each_event_changed_and_which_webhook_caused_it(
    story: Story,
) -> None:
    plain = story.get("/history").json()
    assert all(
        set(e) == {"version", "type", "recorded_at", "occurred_at", "cause", "data"}
        for e in plain["events"]
    )
    assert story.get("/history", with_state="no").status_code == 422
    full = story.get("/history", with_state="true").json()
    events = full["events"]
    assert [e["version"] for e in events] == [e["version"] for e in plain["events"]]
    assert [{k: e[k] for k in plain["events"][0]} for e in events] == plain["events"]

    created = events[0]
    assert created["state"]["status"] == "PENDING" and created["changes"]["offering"] == {
        "before": None,
        "after": "better_annual",
    }
    assert [r["id"] for r in created["caused_by"]["receipts"]] == ["r-paid"]
    assert created["caused_by"]["provider_event_id"] == story.first["id"]

    renewed = by_type(events, "entitlement.renewed")
    assert set(renewed["changes"]) == {"period_start", "period_end", "due_at"}
    assert renewed["changes"]["period_end"] == {
        "before": at(NOW + YEAR),
        "after": at(NOW + 2 * YEAR),
    }
    cause = renewed["caused_by"]
    assert cause["kind"] == "provider" and cause["provider_event_id"] == story.renewal["id"]
    assert [(r["id"], r["event_type"], r["outcome"]) for r in cause["receipts"]] == [
        ("r-renew", "invoice.paid", "applied")
    ]
    assert "r-renew" in cause["summary"]

    revoked = by_type(events, "entitlement.code_revoked")
    assert set(revoked["changes"]) == {"activation_codes"}
    assert [c["index"] for c in revoked["changes"]["activation_codes"]["before"]] == [0, 1]
    assert revoked["caused_by"]["kind"] == "admin" and revoked["caused_by"]["receipts"] == []
    assert "'ops'" in revoked["caused_by"]["summary"]

    suspended = events[-1]
    assert suspended["type"] == "entitlement.suspended"
    assert suspended["changes"]["status"] == {"before": "ACTIVE", "after": "SUSPENDED"}
    assert suspended["caused_by"]["kind"] == "schedule"
    # Each state is the as-of answer for its version.
    for event in (created, renewed, revoked, suspended):
        as_of = story.get(as_of_version=event["version"]).json()
        assert {k: v for k, v in as_of.items() if k != "as_of"} == event["state"]


def test_entitle_history_prints_a_timeline_and_show_answers_as_of(
    story: Story, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ENTITLE_DATABASE_URL", story.url)
    assert main(["history", ID]) == 0
    timeline = capfd.readouterr().out.splitlines()
    assert len(timeline) >= 2 * 5 and not timeline[0].startswith("{")
    renewal = next(i for i, line in enumerate(timeline) if "entitlement.renewed" in line)
    assert "receipt r-renew (invoice.paid, applied)" in timeline[renewal]
    assert f"period_end: {at(NOW + YEAR)} → {at(NOW + 2 * YEAR)}" in timeline[renewal + 1]
    assert any("ACTIVE → SUSPENDED" in line and "the schedule" in line for line in timeline)
    revoked = next(i for i, line in enumerate(timeline) if "code_revoked" in line)
    assert timeline[revoked + 1].strip() == "activation_codes: [0,1] → [0]"
    assert story.second_code not in "\n".join(timeline)  # codes are never printed

    assert main(["history", ID, "--json"]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0].startswith("{") and '"entitlement.created"' in lines[0]

    renewed = by_type(story.get("/history").json()["events"], "entitlement.renewed")
    assert main(["show", ID, "--as-of", renewed["recorded_at"]]) == 0
    out = capfd.readouterr().out
    assert '"status":"ACTIVE"' in out and f'"version":{renewed["version"]}' in out
    assert main(["show", ID]) == 0 and '"status":"SUSPENDED"' in capfd.readouterr().out
    assert main(["show", ID, "--as-of", "2000-01-01T00:00:00Z"]) == 1
    assert "did not exist at 2000-01-01T00:00:00+00:00" in capfd.readouterr().err
    assert main(["show", ID, "--as-of", "soon"]) == 2
    assert "--as-of 'soon'" in capfd.readouterr().err
    assert main(["show", ID, "--as-of", "2026-W48-1T17:45:37Z"]) == 2
    assert main(["show", ID, "--as-of", "9999-01-01T00:00:00Z"]) == 2
    assert "is in the future" in capfd.readouterr().err

    # A receipt whose webhook was erased with its customer: shown, webhook null.
    assert main(["erase-customer", "buyer@example.com"]) == 0
    capfd.readouterr()
    assert main(["webhooks", "r-paid"]) == 0
    shown = capfd.readouterr()
    receipt = json.loads(shown.out)
    assert receipt["id"] == "r-paid" and receipt["webhook"] is None
    assert shown.err == "the webhook of receipt r-paid was erased\n"
