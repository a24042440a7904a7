"""The outbound admin API in-process (the `api` role on SQLite, no broker),
with the webhooks projection run by hand: endpoints, deliveries, resend,
recover, and what each refuses."""

from __future__ import annotations

import asyncio
import base64
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from contracts.outbound import EndpointView
from services.app import Roles, build_app, declared_endpoints, declared_id
from services.cli import main
from services.config import Settings, admin_keys, parse_config
from services.outbound.outbox import Job, Lease, Outbox, Outcome
from services.projections.follower import Follower
from services.projections.webhooks import WEBHOOKS, WebhooksProjection
from services.readmodel import ReadModel
from services.store import EntitlementStore

with warnings.catch_warnings():
    # Starlette would rather have httpx2; httpx is what this project has.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ADMIN = "ops:ek_test_admin_key"
AUTH = {"Authorization": "Bearer ek_test_admin_key"}
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
CONFIG = """
outbound:
  allow_private_networks: true
  endpoints:
    crm: {url: "http://127.0.0.1:9/crm", secret_env: CRM_SECRET}
"""
BASE = "/v1/webhook-endpoints"


@dataclass
class World:
    client: TestClient
    outbox: Outbox
    store: EntitlementStore
    projection: WebhooksProjection

    def project(self) -> None:
        """Run the webhooks projection over what the log has now."""
        position = self.projection.position()
        changes, last = Follower(self.store).read(position, 1000)
        if last is not None:
            asyncio.run(self.projection.project(changes, last))

    def create(self, **body: Any) -> dict[str, Any]:
        response = self.client.post(
            BASE, json={"url": "http://127.0.0.1:9/x", **body}, headers=AUTH
        )
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def jobs(self, endpoint: str, *seqs: int) -> list[Job]:
        added = [
            Job.of(endpoint, "webhook", f"m{seq}-{uuid4()}", "entitlement.created", "k", seq, {})
            for seq in seqs
        ]
        self.outbox.add(added)
        return added

    def fail(self, job: Job, status_code: int = 500, at: datetime | None = None) -> None:
        """Record one failed attempt of `job` (retried later)."""
        [record] = [r for r in self.outbox.jobs(channel=job.channel) if r.job.id == job.id]
        outcome = Outcome(ok=False, status_code=status_code, error=f"answered {status_code}")
        self.outbox.record([(record.job, outcome, at or datetime.now(UTC), 1.0)])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    url = f"sqlite:///{tmp_path}/entitle.db"
    config = parse_config(CONFIG, {"CRM_SECRET": SECRET})
    settings = Settings(
        kafka_bootstrap=None,
        database_url=url,
        kafka_idempotence=False,
        raw_partitions=1,
        code_secret="x" * 32,
        dev=True,
    )
    app = build_app(config, settings, Roles(api=True), admin_keys(ADMIN))
    read_model = ReadModel(url)
    store = EntitlementStore(url)
    outbox = Outbox(read_model)
    projection = WebhooksProjection(
        outbox, declared_endpoints(config, True, bool(config.outbound.allow_private_networks))
    )
    try:
        with TestClient(app) as client:
            yield World(client, outbox, store, projection)
    finally:
        store.close()
        read_model.close()


def cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode()


# -- 4: cursors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "crafted",
    [
        cursor(9223372036854775808, "x"),  # past 64 bits: OverflowError on SQLite
        cursor(-9223372036854775809, "x"),
        cursor(1, "\u0000"),  # a NUL: PostgreSQL refuses it
        cursor(1, "\ud800"),  # half a surrogate pair: no database encodes it
        cursor(True, "x"),  # a bool is no position
        cursor(1.5, "x"),
        cursor(1, "not-a-job-id"),
        cursor(1, "6d0ac261-d933-4c74-9c3d-eb3a6b570161", "more"),
        cursor("1", "a5d29296-46c6-48ba-9624-09f0e3e7a282"),
        base64.urlsafe_b64encode(b"[" * 20_000).decode(),
        "%%%",
    ],
)
def test_a_cursor_this_api_did_not_give_is_a_422_on_every_list(world: World, crafted: str) -> None:
    endpoint = world.create()
    for path in (
        f"{BASE}/{endpoint['id']}/deliveries",
        "/v1/mails",
        "/v1/outbox?kind=webhook",
        "/v1/webhooks",
    ):
        joined = "&" if "?" in path else "?"
        response = world.client.get(path + joined + "cursor=" + crafted, headers=AUTH)
        assert response.status_code == 422, (path, crafted, response.text)
        assert "cursor" in response.json()["detail"]


def test_the_cursors_the_api_gives_page_through_every_delivery(world: World) -> None:
    endpoint = world.create()
    world.jobs(endpoint["id"], *range(6))
    seen: list[str] = []
    pages = 0
    after = ""
    while True:
        page = world.client.get(
            f"{BASE}/{endpoint['id']}/deliveries?limit=2{after}", headers=AUTH
        ).json()
        pages += 1
        seen += [d["id"] for d in page["items"]]
        if not page["next_cursor"]:
            break
        after = "&cursor=" + page["next_cursor"]
    assert len(seen) == len(set(seen)) == 6
    assert pages == 3  # the last full page says there is no next one


# -- 6: a test ping to a disabled endpoint ---------------------------------------------


def test_a_disabled_endpoint_refuses_a_test_a_resend_and_a_recover(world: World) -> None:
    endpoint = world.create()
    [job] = world.jobs(endpoint["id"], 1)
    world.fail(job)
    patched = world.client.patch(f"{BASE}/{endpoint['id']}", json={"disabled": True}, headers=AUTH)
    assert patched.status_code == 200 and patched.json()["disabled"] is True
    since = {"since": "2000-01-01T00:00:00Z"}
    for path, body in (
        (f"{BASE}/{endpoint['id']}/test", None),
        (f"/v1/deliveries/{job.id}/resend", None),
        (f"{BASE}/{endpoint['id']}/recover", since),
    ):
        response = world.client.post(path, json=body, headers=AUTH)
        assert response.status_code == 409, (path, response.text)
        assert response.json()["error"] == "endpoint_disabled"
        assert '"disabled": false' in response.json()["detail"]
    assert world.outbox.counts(endpoint["id"]) == {"pending": 1}
    world.client.patch(f"{BASE}/{endpoint['id']}", json={"disabled": False}, headers=AUTH)
    assert world.client.post(f"{BASE}/{endpoint['id']}/test", headers=AUTH).status_code == 202
    assert world.client.post(f"/v1/deliveries/{job.id}/resend", headers=AUTH).status_code == 202


def test_a_resend_to_a_paused_mail_channel_says_how_to_resume(world: World) -> None:
    mail = Job.of("mail", "mail", "m1", "entitlement.created", "k", 1, {})
    world.outbox.add([mail])
    world.fail(mail, 550)
    with world.outbox.read_model.transaction() as cur:  # days of failures
        world.outbox.pause(cur, "mail", True)
    response = world.client.post(f"/v1/deliveries/{mail.id}/resend", headers=AUTH)
    assert response.status_code == 409 and response.json()["error"] == "channel_paused"
    assert "restart" in response.json()["detail"]


# -- 3: an endpoint declared in the file ----------------------------------------------


def test_a_declared_endpoint_paused_by_the_dispatcher_shows_disabled_and_how_to_resume(
    world: World,
) -> None:
    world.project()  # the projector's start writes declared endpoints to the table
    crm = str(declared_id("crm"))
    shown = world.client.get(f"{BASE}/{crm}", headers=AUTH).json()
    assert shown["declared_in_config"] is True and shown["disabled"] is False
    [job] = world.jobs(crm, 1)
    world.fail(job, 410)
    with world.outbox.read_model.transaction() as cur:  # what the dispatcher does on a 410
        world.outbox.pause(cur, crm, True)
    shown = world.client.get(f"{BASE}/{crm}", headers=AUTH).json()
    assert shown["disabled"] is True
    assert "410" in shown["disabled_reason"] and "restart" in shown["disabled_reason"]
    [listed] = [e for e in world.client.get(BASE, headers=AUTH).json()["items"] if e["id"] == crm]
    assert listed == shown
    test = world.client.post(f"{BASE}/{crm}/test", headers=AUTH)
    assert test.status_code == 409 and "restart" in test.json()["detail"]
    # A restart (the projection starting again) resumes it.
    world.project()
    assert world.client.get(f"{BASE}/{crm}", headers=AUTH).json()["disabled"] is False


# -- 7: a deleted endpoint -----------------------------------------------------------


def test_a_deleted_endpoints_deliveries_stay_listed_and_what_waited_fails(world: World) -> None:
    endpoint = world.create()
    world.project()
    sent, waiting = world.jobs(endpoint["id"], 1, 2)
    world.outbox.record([(sent, Outcome(ok=True, status_code=200), datetime.now(UTC), 1.0)])
    assert world.client.delete(f"{BASE}/{endpoint['id']}", headers=AUTH).status_code == 204
    world.project()
    assert world.client.get(f"{BASE}/{endpoint['id']}", headers=AUTH).status_code == 404
    listed = world.client.get(f"{BASE}/{endpoint['id']}/deliveries", headers=AUTH)
    assert listed.status_code == 200
    statuses = {d["id"]: d["status"] for d in listed.json()["items"]}
    assert statuses == {sent.id: "succeeded", waiting.id: "failed"}
    # The listing says why.
    reasons = {d["id"]: d["last_error"] for d in listed.json()["items"]}
    assert reasons == {sent.id: None, waiting.id: "the endpoint was deleted"}
    [record] = [r for r in world.outbox.jobs(channel=endpoint["id"]) if r.job.id == waiting.id]
    assert record.last_error == "the endpoint was deleted"
    resend = world.client.post(f"/v1/deliveries/{waiting.id}/resend", headers=AUTH)
    assert resend.status_code == 409 and resend.json()["error"] == "endpoint_deleted"
    # A rebuild of the projection does the same.
    world.outbox.resend([waiting.id])
    with world.outbox.read_model.transaction() as cur:
        world.outbox.read_model.save_position(cur, WEBHOOKS, 0)
    world.project()
    assert world.outbox.counts(endpoint["id"]) == {"succeeded": 1, "failed": 1}
    unknown = world.client.get(f"{BASE}/{uuid4()}/deliveries", headers=AUTH)
    assert unknown.status_code == 404


# -- 8: where a test ping is listed -------------------------------------------------------


def test_a_ping_is_listed_after_what_was_queued_before_it(world: World) -> None:
    endpoint = world.create()
    world.jobs(endpoint["id"], 3)
    with world.outbox.read_model.transaction() as cur:
        world.outbox.read_model.save_position(cur, WEBHOOKS, 5)
    ping = world.client.post(f"{BASE}/{endpoint['id']}/test", headers=AUTH).json()
    world.jobs(endpoint["id"], 7)
    items = world.client.get(f"{BASE}/{endpoint['id']}/deliveries", headers=AUTH).json()["items"]
    assert [d["type"] for d in items] == ["entitlement.created", "ping", "entitlement.created"]
    assert items[1]["id"] == ping["delivery_id"]


# -- 9 and 10: what a body may hold ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"include_codes": "yes"}, "boolean"),
        ({"include_codes": 1}, "boolean"),
        ({"ordered": "false"}, "boolean"),
        ({"description": "crm\u0000"}, "control"),
        ({"description": "crm\r\nX: y"}, "control"),
        ({"url": "http://127.0.0.1:9/x\r\nX-Injected: 1"}, "control"),
        ({"url": "http://127.0.0.1:9/a b"}, "whitespace"),
        ({"url": "https://" + "a" * 300 + ".example/x"}, "labels"),
        ({"url": "https://ex\u202eample.com/x"}, "formatting"),
        ({"events": ["entitlement.nope"]}, "nope"),
    ],
)
def test_a_body_with_loose_values_is_refused(world: World, body: dict[str, Any], says: str) -> None:
    response = world.client.post(BASE, json={"url": "http://127.0.0.1:9/x", **body}, headers=AUTH)
    assert response.status_code == 422, response.text
    assert says in response.json()["detail"]
    endpoint = world.create()
    patched = world.client.patch(f"{BASE}/{endpoint['id']}", json=body, headers=AUTH)
    assert patched.status_code == 422, patched.text


def test_a_patch_takes_only_a_boolean_to_disable() -> None:
    from contracts.outbound import EndpointPatch

    with pytest.raises(ValueError, match="boolean"):
        EndpointPatch.model_validate_json('{"disabled": "true"}')


@pytest.mark.parametrize(
    "since",
    [12345, "12345", "2026-11-30T00:00:00", "2026-11-30", True, "0001-01-01T00:00:00+14:00"],
)
def test_recover_takes_since_only_as_an_rfc3339_time_with_an_offset(
    world: World, since: Any
) -> None:
    endpoint = world.create()
    response = world.client.post(
        f"{BASE}/{endpoint['id']}/recover", json={"since": since}, headers=AUTH
    )
    assert response.status_code == 422, response.text
    assert "RFC 3339" in response.json()["detail"]


@pytest.mark.parametrize(
    "url", ["https://[64:ff9b::7f00:1]/x", "https://[2002:7f00:1::]/x", "https://[::1]/x"]
)
def test_an_address_that_reaches_loopback_is_refused_without_allow_private(
    tmp_path: Path, url: str
) -> None:
    settings = Settings(
        kafka_bootstrap=None,
        database_url=f"sqlite:///{tmp_path}/p.db",
        kafka_idempotence=False,
        raw_partitions=1,
        code_secret="x" * 32,
    )
    app = build_app(parse_config(""), settings, Roles(api=True), admin_keys(ADMIN))
    with TestClient(app) as client:
        response = client.post(BASE, json={"url": url}, headers=AUTH)
    assert response.status_code == 422 and "non-public" in response.json()["detail"]


# -- 12b: recover ---------------------------------------------------------------------


def test_recover_sends_now_what_failed_and_what_is_still_retrying(world: World) -> None:
    endpoint = world.create()
    world.project()
    exhausted, retrying, fine, untried = world.jobs(endpoint["id"], 1, 2, 3, 4)
    failed_at = datetime.now(UTC)
    world.outbox.record(
        [
            (exhausted, Outcome(ok=False, permanent=True, status_code=400), failed_at, 1.0),
            (fine, Outcome(ok=True, status_code=200), failed_at, 1.0),
        ]
    )
    world.fail(retrying, at=failed_at)
    later = [r for r in world.outbox.jobs(channel=endpoint["id"]) if r.job.id == retrying.id]
    assert later[0].next_at is not None and later[0].next_at > datetime.now(UTC)
    since = (failed_at - timedelta(minutes=5)).isoformat()
    response = world.client.post(
        f"{BASE}/{endpoint['id']}/recover", json={"since": since}, headers=AUTH
    )
    assert response.status_code == 202 and response.json() == {"resent": 2}
    now = datetime.now(UTC)
    by_id = {r.job.id: r for r in world.outbox.jobs(channel=endpoint["id"])}
    assert by_id[exhausted.id].status == "pending"
    assert by_id[retrying.id].status == "pending"
    assert [a.status_code for a in by_id[retrying.id].attempts] == [500]
    for job in (exhausted, retrying, untried):
        next_at = by_id[job.id].next_at
        assert next_at is not None and next_at <= now
    assert by_id[fine.id].status == "succeeded"
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    ahead = world.client.post(
        f"{BASE}/{endpoint['id']}/recover", json={"since": future}, headers=AUTH
    )
    assert ahead.status_code == 422 and "future" in ahead.json()["detail"]


def test_the_view_has_the_contracts_shape(world: World) -> None:
    endpoint = world.create()
    shown = world.client.get(f"{BASE}/{endpoint['id']}", headers=AUTH).json()
    assert set(shown) == set(EndpointView.model_fields)
    assert UUID(shown["id"]) and shown["secret"] is None


@pytest.mark.parametrize(
    ("model", "body"),
    [
        ("AdminAction", {"reason": "fraud\u0000"}),
        ("ActivationRequest", {"activation_code": "A", "fingerprint": "f", "label": "pc\r\n"}),
        ("ActivationRequest", {"activation_code": "A", "fingerprint": "f\u0000"}),
        (
            "UsageRequest",
            {"activation_code": "A", "metric": "m", "quantity": 1, "idempotency_key": "k\x1b"},
        ),
    ],
)
def test_every_text_a_body_stores_is_free_of_control_characters(
    model: str, body: dict[str, Any]
) -> None:
    import contracts.api
    import contracts.licensing

    found = getattr(contracts.api, model, None) or getattr(contracts.licensing, model)
    with pytest.raises(ValueError, match="control characters"):
        found.model_validate_json(json.dumps(body))


# -- the follower the projections share ------------------------------------------


def test_a_batch_read_for_one_projection_is_handed_to_the_next_as_it_was(world: World) -> None:
    """The projections of a process share one follower: a batch one read is
    given to the next without reading the log again, and shows each
    endpoint as it was at that event, even after the follower has read the
    endpoint's later change."""
    created = world.create()
    path = f"{BASE}/{created['id']}"
    patched = world.client.patch(path, json={"url": "http://127.0.0.1:9/y"}, headers=AUTH)
    assert patched.status_code == 200, patched.text
    shared = Follower(world.store)
    batches: list[tuple[int, list[Any]]] = []
    position: int | None = 0
    while position is not None:  # the first projection, one event at a time
        changes, last = shared.read(position, 1)
        if last is not None:
            batches.append((position, changes))
        position = last
    urls = [c.endpoint.url for _, changes in batches for c in changes if c.endpoint is not None]
    assert urls == ["http://127.0.0.1:9/x", "http://127.0.0.1:9/y"]
    for after, changes in batches:  # the second projection, behind it
        again, _ = shared.read(after, 1)
        assert again is changes
    # What a follower of its own reads is the same.
    alone, _ = Follower(world.store).read(0, 1000)
    assert [c.endpoint.url for c in alone if c.endpoint is not None] == urls


# -- a rebuild of the webhooks projection ------------------------------------------


def test_a_rebuild_queues_nothing_new_and_keeps_a_disabled_endpoint_paused(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`entitle replay --webhooks` replays the log for the endpoints as they
    were at each event: nothing already queued is queued again, no endpoint
    gets events from before it was made, and one disabled before the
    rebuild is never sent to meanwhile."""
    from tests.test_mail import paid_invoice
    from tests.test_receipts import World as Domain

    url = f"sqlite:///{tmp_path}/entitle.db"
    domain = Domain(url)
    try:
        old = world.create(url="http://127.0.0.1:9/old")
        domain.send(paid_invoice("sub_before"), "r1")
        world.project()
        world.client.patch(f"{BASE}/{old['id']}", json={"disabled": True}, headers=AUTH)
        new = world.create(url="http://127.0.0.1:9/new")
        domain.send(paid_invoice("sub_after"), "r2")
        world.project()
    finally:
        domain.store.close()
        domain.read_model.close()

    def queued() -> dict[str, set[str]]:
        return {
            e["id"]: {r.job.id for r in world.outbox.jobs(channel=e["id"], limit=1000)}
            for e in (old, new)
        }

    def paused() -> set[str]:
        with world.outbox.read_model.transaction(write=False) as cur:
            return set(world.outbox.paused_channels(cur))

    before = queued()
    assert before[old["id"]] and before[new["id"]]
    assert len(before[new["id"]]) < len(before[old["id"]])  # only what came after it
    monkeypatch.setenv("ENTITLE_DATABASE_URL", url)
    running = Lease(world.outbox.read_model)  # a projector's dispatcher
    assert running.hold()
    assert main(["replay", "--webhooks"]) == 1  # refused: stop it first
    running.release()
    assert main(["replay", "--webhooks"]) == 0
    # The projector starts again: the log replays one event at a time.
    world.projection = WebhooksProjection(
        world.outbox,
        world.projection.configured,
        head=lambda: world.store.process_recorder.max_notification_id() or 0,
    )
    position = world.projection.position()
    assert position == 0
    follower = Follower(world.store)
    while True:
        changes, last = follower.read(position, 1)
        if last is None:
            break
        asyncio.run(world.projection.project(changes, last))
        position = last
        assert old["id"] in paused()
    assert queued() == before
    assert old["id"] in paused() and new["id"] not in paused()


def test_events_are_never_null_and_each_is_kept_once(world: World) -> None:
    created = world.create(events=["entitlement.*", "entitlement.*", "order.created"])
    assert created["events"] == ["entitlement.*", "order.created"]
    path = f"{BASE}/{created['id']}"
    refused = world.client.patch(path, json={"events": None}, headers=AUTH)
    assert refused.status_code == 422 and "events cannot be null" in refused.json()["detail"]
    every = world.client.patch(path, json={"events": []}, headers=AUTH)
    assert every.status_code == 200 and every.json()["events"] == []
    unknown = world.client.get(BASE, params={"x": "1"}, headers=AUTH)
    assert unknown.status_code == 422
    assert unknown.json()["detail"] == "unknown query parameter(s): x; it takes none"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"description": "invoice\u202egnp.exe"}, "bidirectional override"),
        ({"url": "https://-bad.example.com/hook"}, "each label starting and ending"),
        ({"url": "https://bad-.example.com/hook"}, "each label starting and ending"),
    ],
)
def test_a_description_that_reorders_itself_or_a_host_label_with_an_edge_hyphen_is_refused(
    world: World, body: dict[str, Any], says: str
) -> None:
    response = world.client.post(BASE, json={"url": "http://127.0.0.1:9/x", **body}, headers=AUTH)
    assert response.status_code == 422 and says in response.text
