"""Erasing a customer (crypto-shredding): after `POST /v1/customers/erase`
the address and the name are nowhere in the database, the entitlement and
its history show no address (also after a replay), other customers are
untouched, and the erasure is recorded. Against real stores."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from eventsourcing.persistence import JSONTranscoder, Mapper

from domain.dead_letter import DeadLetter
from domain.entitlement import Cause, Entitlement
from domain.lifecycle import Terms
from services import audit
from services.app import Roles, build_app, declared_endpoints
from services.cli import main
from services.config import Settings, admin_keys, parse_config
from services.erasure import erase_customer, erasures
from services.outbound.outbox import Outbox
from services.projections import Follower, history_entry, replay
from services.projections.follower import project_batch
from services.projections.mail import MailProjection
from services.projections.public_events import dead_letter_message
from services.projections.webhooks import WebhooksProjection
from tests import stripe_events as se
from tests.harness import SHARED_CODE_SECRET
from tests.test_receipts import World
from tests.test_store import NOW, YEAR

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.integration

ADA, ADA_NAME = "Ada.Lovelace@example.com", "Augusta Ada Byron-King"
GRACE, GRACE_NAME = "grace.hopper@example.org", "Grace Brewster Murray"
NOW_TIME = datetime.fromtimestamp(NOW, UTC)
AUTH = {"Authorization": "Bearer ek_erasure_admin"}
CONFIG = parse_config(
    f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
outbound:
  allow_private_networks: true
  endpoints:
    crm: {{url: "http://127.0.0.1:9/crm", secret_env: CRM_SECRET}}
notifications:
  email: {{outbox_dir: ./mails}}
""",
    {"CRM_SECRET": "whsec_" + "a" * 32},
)


def bought(
    subscription: str, email: str, name: str, skus: tuple[str, ...], **kw: Any
) -> dict[str, Any]:
    lines = [{"price": f"p_{s}", "sku": s, "start": NOW, "end": NOW + YEAR} for s in skus]
    event = se.invoice_paid(
        subscription=subscription,
        shape=se.LEGACY,
        lines=lines,
        email=email,
        customer=f"cus_{subscription}",
        **kw,
    )
    event["data"]["object"]["customer_name"] = name
    return event


class Shop(World):
    """The fold and every projection that copies the address: read model,
    outbound webhooks, mail."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url, CONFIG)
        self.outbox = Outbox(self.read_model)
        self.others = [
            WebhooksProjection(self.outbox, declared_endpoints(CONFIG, True, True)),
            MailProjection(self.outbox, ["entitlement.created"], lambda: 0),
        ]

    def project(self) -> None:
        super().project()
        for projection in self.others:
            changes, last = Follower(self.store).read(projection.position(), 10_000)
            if last is not None:
                asyncio.run(project_batch(projection, changes, last))


@pytest.fixture
def shop(database_url: str) -> Iterator[Shop]:
    world = Shop(database_url)
    yield world
    world.close()


def stored_text(shop: Shop) -> str:
    """Everything the database holds, as text: SQLite's files (database and
    WAL, bytes as they lie on disk), or every PostgreSQL table's rows cast to
    text (bytea columns show as hex there: `holds` looks for that too)."""
    if not shop.read_model.postgres:
        path = Path(shop.read_model.sqlite_path)
        files = [path, path.with_name(path.name + "-wal")]
        return b"".join(f.read_bytes() for f in files if f.exists()).decode("latin-1")
    with psycopg.connect(shop.read_model.url) as conn:
        tables = conn.execute(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name)"
            " FROM information_schema.tables WHERE table_schema NOT IN"
            " ('pg_catalog', 'information_schema')"
        ).fetchall()
        assert len(tables) > 10
        return "\n".join(
            row for (table,) in tables for (row,) in conn.execute(f"SELECT t::text FROM {table} t")
        )


def holds(text: str, needle: str) -> bool:
    return needle in text or needle.encode().hex() in text


def test_an_erased_customer_leaves_no_personal_data(shop: Shop, tmp_path: Path) -> None:
    shop.send(bought("sub_ada", ADA, ADA_NAME, ("better_annual",)), "r-ada")
    # Partly unmappable: applied in part, and a dead letter holding the name.
    shop.send(bought("sub_ada2", ADA, ADA_NAME, ("better_annual", "no_such_sku")), "r-ada2")
    shop.send(bought("sub_grace", GRACE, GRACE_NAME, ("better_annual",)), "r-grace")
    # Nothing mapped: a dead letter, and a webhook that changes nothing; both
    # kept under the key of the address they hold.
    shop.send(bought("sub_ada3", ADA, ADA_NAME, ("no_such_sku",)), "r-ada3")
    customer = {"id": "cus_sub_ada", "object": "customer", "email": ADA, "name": ADA_NAME}
    updated = {"id": "evt_cu_ada", "type": "customer.updated", "created": NOW}
    shop.send({**updated, "data": {"object": customer}}, "r-ada-updated")
    assert shop.receipts()["r-ada-updated"].outcome == "ignored"
    ada = shop.read_model.entitlements(customer_email=ADA)
    assert len(ada) == 2
    grace = shop.read_model.entitlements(customer_email=GRACE)
    assert len(grace) == 1
    before = stored_text(shop)
    assert holds(before, ADA) and holds(before, GRACE)  # the read model's, the outbox's
    assert holds(before, "entitle-sealed:1:")  # the search sees binary columns too
    assert not holds(before, ADA_NAME)  # only sealed
    # The name is only in what the provider sent: kept sealed, readable until erased.
    for receipt in ("r-ada", "r-ada-updated"):
        kept = shop.store.webhook(receipt)
        assert kept is not None and ADA_NAME in kept.decode()
    letters = [shop.store.find(letter.id, DeadLetter) for letter in shop.read_model.dead_letters()]
    assert len(letters) == 2 and all(ADA_NAME in d.webhook["body"] for d in letters if d)
    mails = [r.job for r in shop.outbox.jobs(kind="mail")]
    assert {m.payload["to"] for m in mails} == {ADA, GRACE}

    settings = Settings(
        kafka_bootstrap=None,
        database_url=shop.read_model.url,
        kafka_idempotence=False,
        raw_partitions=1,
        code_secret=SHARED_CODE_SECRET,
        dev=True,
    )
    app = build_app(CONFIG, settings, Roles(api=True), admin_keys("privacy:ek_erasure_admin"))
    with TestClient(app) as client:
        assert client.post("/v1/customers/erase", json={"email": ADA}).status_code == 401
        bad = client.post("/v1/customers/erase", json={"mail": ADA}, headers=AUTH)
        assert bad.status_code == 422 and "email" in bad.json()["detail"]
        answer = client.post("/v1/customers/erase", json={"email": ADA.upper()}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        done = answer.json()
        assert done["requested_by"] == "privacy"
        assert (done["keys"], done["entitlements"], done["plaintext_events"]) == (1, 2, 0)
        assert done["events"] >= 4 and done["webhooks"] == 4 and done["outbox_jobs"] >= 3
        shop.project()

        for view in ada:
            shown = client.get(f"/v1/entitlements/{view.id}", headers=AUTH).json()
            assert shown["customer"]["email"] is None and shown["status"] == "ACTIVE"
            history = client.get(f"/v1/entitlements/{view.id}/history", headers=AUTH).text
            assert "example.com" not in history
            assert f"erasure:{done['id']}" in history
        again = client.post("/v1/customers/erase", json={"email": ADA}, headers=AUTH).json()
        assert (again["keys"], again["entitlements"], again["events"]) == (0, 0, 0)
        listed = client.get("/v1/erasures", headers=AUTH).json()["items"]
        assert {e["id"] for e in listed} == {done["id"], again["id"]}

    receipts = ("r-ada", "r-ada2", "r-ada3", "r-ada-updated")
    assert [shop.store.webhook(r) for r in receipts] == [None] * 4
    for letter in shop.read_model.dead_letters():
        erased = shop.store.find(letter.id, DeadLetter)
        assert erased is not None and erased.webhook["body"] is None
        assert dead_letter_message(erased).webhook.body == ""  # still published (a republish)
    # The read model cleaned at once and the erasure's events folded agree.
    checked = audit.verify(shop.store, shop.read_model)
    assert checked.ok and checked.entitlements == 3, checked.lines()
    assert replay(shop.store, shop.read_model) > 0
    assert shop.read_model.entitlements(customer_email=ADA) == []
    rebuilt = [shop.read_model.entitlement(str(v.id)) for v in ada]
    assert all(v is not None and v.customer.email is None for v in rebuilt)
    for view in ada:
        for event in shop.store.history(view.id):
            assert "example.com" not in history_entry(event).model_dump_json()
    assert all(
        m.job.payload.get("to") is None
        for m in shop.outbox.jobs(kind="mail")
        if m.job.ordering_key in {str(v.id) for v in ada}
    )

    after = stored_text(shop)
    for gone in (ADA, ADA.lower(), ADA_NAME):
        assert not holds(after, gone), gone
    assert holds(after, GRACE)
    # Another customer's data are untouched and readable.
    assert [v.id for v in shop.read_model.entitlements(customer_email=GRACE)] == [grace[0].id]
    kept = shop.store.webhook("r-grace")
    assert kept is not None and GRACE_NAME in kept.decode()
    assert any(
        e.customer_email == GRACE
        for e in shop.store.history(grace[0].id)
        if hasattr(e, "customer_email")
    )
    recorded = erasures(shop.store)
    assert [r.id for r in recorded][-1] == done["id"] and recorded[-1].entitlements == 2


def test_the_command_line_erases_and_lists(tmp_path: Path, monkeypatch: Any, capfd: Any) -> None:
    monkeypatch.setenv("ENTITLE_DATABASE_URL", f"sqlite:///{tmp_path}/entitle.db")
    from services.store import EntitlementStore

    EntitlementStore(f"sqlite:///{tmp_path}/entitle.db").close()  # an empty store, not none
    assert main(["erase-customer", " "]) == 2
    assert "e-mail address" in capfd.readouterr().err
    assert main(["erase-customer", "nobody@example.net", "--by", "dpo"]) == 0
    out, err = capfd.readouterr()
    done = json.loads(out)
    assert done["requested_by"] == "dpo" and (done["keys"], done["entitlements"]) == (0, 0)
    assert "nothing was stored" in err and "nobody" not in out
    assert main(["erase-customer", "--list"]) == 0
    assert json.loads(capfd.readouterr().out)["id"] == done["id"]


def test_events_stored_in_plaintext_before_sealing_are_counted(tmp_path: Path) -> None:
    """A store written before personal data were sealed: the erasure still
    drops the address from the read model, and says how many stored events
    keep it in plaintext (they are not rewritten)."""
    shop = Shop(f"sqlite:///{tmp_path}/entitle.db")
    try:
        old = Entitlement.create(
            source="stripe-main",
            order_ref="sub_old",
            slot="si_old",
            terms=Terms.of(CONFIG.catalog.get("better_annual"), 1, "cus_old", ADA),
            code_hash="0" * 64,
            inherited=[],
            cause=Cause.provider("stripe-main", "evt_old"),
            occurred_at=NOW_TIME,
            at=NOW_TIME,
        )
        transcoder = JSONTranscoder()
        shop.store.register_transcodings(transcoder)
        plain = Mapper[UUID](transcoder)  # eventsourcing's own: no sealing
        shop.store.recorder.insert_events([plain.to_stored_event(e) for e in old.collect_events()])
        shop.project()
        assert [v.id for v in shop.read_model.entitlements(customer_email=ADA)] == [old.id]
        done = erase_customer(shop.store, shop.read_model, ADA.lower(), "dpo")
        assert (done.keys, done.entitlements, done.plaintext_events) == (0, 1, 1)
        shop.project()
        view = shop.read_model.entitlement(str(old.id))
        assert view is not None and view.customer.email is None
        assert shop.read_model.entitlements(customer_email=ADA) == []
    finally:
        shop.close()


def test_erasing_an_address_the_customer_has_left_keeps_the_new_one(tmp_path: Path) -> None:
    shop = Shop(f"sqlite:///{tmp_path}/entitle.db")
    try:
        shop.send(bought("sub_moved", ADA, ADA_NAME, ("better_annual",), created=NOW), "r-1")
        shop.send(bought("sub_moved", GRACE, ADA_NAME, ("better_annual",), created=NOW + 60), "r-2")
        [moved] = shop.read_model.entitlements(customer_email=GRACE)
        done = erase_customer(shop.store, shop.read_model, ADA, "dpo")
        assert (done.keys, done.entitlements, done.webhooks) == (1, 0, 1)  # r-1 only
        shop.project()
        view = shop.read_model.entitlement(str(moved.id))
        assert view is not None and view.customer.email == GRACE
        emails = {getattr(e, "customer_email", "-") for e in shop.store.history(moved.id)}
        assert ADA not in emails and GRACE in emails and None in emails  # the old one unreadable
        assert shop.store.webhook("r-1") is None and shop.store.webhook("r-2") is not None
    finally:
        shop.close()
