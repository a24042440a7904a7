"""Erasing a customer (crypto-shredding): after `POST /v1/customers/erase`
the address and the name are nowhere in the database, the entitlement and
its history show no address (also after a replay), other customers are
untouched, and the erasure is recorded. Against real stores."""

from __future__ import annotations

import asyncio
import json
import threading
import unicodedata
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
        umlaut = Entitlement.create(
            source="stripe-main",
            order_ref="sub_umlaut",
            slot="si_umlaut",
            terms=Terms.of(CONFIG.catalog.get("better_annual"), 1, "cus_u", JURGEN),
            code_hash="1" * 64,
            inherited=[],
            cause=Cause.provider("stripe-main", "evt_umlaut"),
            occurred_at=NOW_TIME,
            at=NOW_TIME,
        )
        events = [*old.collect_events(), *umlaut.collect_events()]
        shop.store.recorder.insert_events([plain.to_stored_event(e) for e in events])
        shop.project()
        assert [v.id for v in shop.read_model.entitlements(customer_email=ADA)] == [old.id]
        done = erase_customer(shop.store, shop.read_model, ADA.lower(), "dpo")
        assert (done.keys, done.entitlements, done.plaintext_events) == (0, 1, 1)
        # Stored JSON-escaped (J\\u00fcrgen), asked for decomposed and in capitals.
        typed = unicodedata.normalize("NFD", JURGEN.upper())
        done = erase_customer(shop.store, shop.read_model, typed, "dpo")
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


def test_a_dead_letter_says_what_is_wrong_with_an_address_never_the_address(
    tmp_path: Path, caplog: Any
) -> None:
    """A reason is listed, logged, exported and published, and erasure
    cannot reach it: it names the field and the fault, not the value."""
    shop = Shop(f"sqlite:///{tmp_path}/entitle.db")
    try:
        shop.send(bought("sub_liz", "liz.newline@example.com\n", "Liz", ("better_annual",)), "r-1")
        bad_type = bought("sub_liz2", "x", "Liz", ("better_annual",))
        bad_type["data"]["object"]["customer_email"] = {"address": "liz.object@example.com"}
        shop.send(bad_type, "r-2")
        [letter_1] = [d for d in shop.read_model.dead_letters() if d.receipt_id == "r-1"]
        assert "customer e-mail address contains a control character" in letter_1.reason
        reasons = [d.reason for d in shop.read_model.dead_letters()]
        details = [r.detail or "" for r in shop.receipts().values()]
        assert len(reasons) == 2 and all("customer e-mail" in r for r in reasons)
        for text in [*reasons, *details, caplog.text]:
            assert "liz." not in text, text
    finally:
        shop.close()


JURGEN = "Jürgen.Müller@Bücher.example"
QUOTED = '"quoted"@example.com'


def spellings(address: str) -> list[str]:
    """How stored text may hold an address: as is, JSON-escaped (once, twice)."""
    once = json.dumps(address)[1:-1]
    return [address, address.lower(), once, json.dumps(once)[1:-1]]


def test_an_address_however_spelt_is_erased_from_the_outbox_and_everywhere(
    tmp_path: Path,
) -> None:
    """Non-ASCII and quoted addresses are escaped in JSON payloads; an
    address typed decomposed (NFD) is the one stored composed (NFC)."""
    shop = Shop(f"sqlite:///{tmp_path}/entitle.db")
    try:
        shop.send(bought("sub_j", JURGEN, "Jürgen", ("better_annual",)), "r-j")
        shop.send(bought("sub_q", QUOTED, "Quinn", ("better_annual",)), "r-q")
        shop.send(bought("sub_g", GRACE, GRACE_NAME, ("better_annual",)), "r-g")
        # Changes nothing, sealed under no key: found in the raw webhook (escaped twice).
        customer = {"id": "cus_sub_j", "object": "customer", "email": JURGEN.upper()}
        updated = {"id": "evt_cu_j", "type": "customer.updated", "created": NOW}
        shop.send({**updated, "data": {"object": customer}}, "r-j-updated")
        mails = {r.job.payload["to"] for r in shop.outbox.jobs(kind="mail")}
        assert mails == {JURGEN, QUOTED, GRACE}
        before = stored_text(shop)
        assert holds(before, json.dumps(JURGEN)[1:-1]) and holds(before, json.dumps(QUOTED)[1:-1])
        payloads = [json.dumps(r.job.payload) for r in shop.outbox.jobs()]
        jobs = {a: sum(json.dumps(a)[1:-1] in p for p in payloads) for a in (JURGEN, QUOTED)}
        assert jobs[JURGEN] >= 2 and jobs[QUOTED] >= 2  # mail and webhooks, escaped

        typed = unicodedata.normalize("NFD", JURGEN.upper())
        assert typed != JURGEN.upper()
        done = erase_customer(shop.store, shop.read_model, typed, "dpo")
        assert (done.keys, done.entitlements, done.webhooks) == (1, 1, 2)
        assert done.outbox_jobs == jobs[JURGEN]
        assert shop.store.webhook("r-j-updated") is None
        quoted = erase_customer(shop.store, shop.read_model, QUOTED, "dpo")
        assert (quoted.keys, quoted.entitlements, quoted.outbox_jobs) == (1, 1, jobs[QUOTED])
        shop.project()

        after = stored_text(shop)
        for gone in [*spellings(JURGEN), *spellings(QUOTED)]:
            assert not holds(after, gone), gone
        assert holds(after, GRACE)
        for record in shop.outbox.jobs():
            text = json.dumps(record.job.payload)
            assert "cher.example" not in text and "quoted" not in text
        assert {r.job.payload.get("to") for r in shop.outbox.jobs(kind="mail")} == {None, GRACE}
        assert shop.read_model.entitlements(customer_email=GRACE)
    finally:
        shop.close()


def test_erasing_a_customer_erases_the_addresses_they_had_before(tmp_path: Path) -> None:
    shop = Shop(f"sqlite:///{tmp_path}/entitle.db")
    try:
        old, new = "dave.old@example.net", "Dave.New@example.net"
        shop.send(bought("sub_dave", old, "Dave", ("better_annual",), created=NOW), "r-1")
        shop.send(bought("sub_dave", new, "Dave", ("better_annual",), created=NOW + 60), "r-2")
        [dave] = shop.read_model.entitlements(customer_email=new)
        assert old in {getattr(e, "customer_email", None) for e in shop.store.history(dave.id)}

        done = erase_customer(shop.store, shop.read_model, new.lower(), "dpo")
        assert (done.keys, done.entitlements, done.webhooks) == (2, 1, 2)
        shop.project()
        for at in (dave.created_at, None):
            then = shop.store.entitlement_as_of(dave.id, at=at)
            assert then is not None and then.customer_email is None
        for event in shop.store.history(dave.id):
            assert "dave." not in history_entry(event).model_dump_json().lower()
        assert {r.job.payload.get("to") for r in shop.outbox.jobs(kind="mail")} == {None}
        after = stored_text(shop)
        assert not holds(after, old) and not holds(after, new) and not holds(after, new.lower())
    finally:
        shop.close()


def test_two_erasures_of_one_address_at_once_do_it_once(shop: Shop) -> None:
    shop.send(bought("sub_a", ADA, ADA_NAME, ("better_annual",)), "r-a")
    shop.send(bought("sub_b", ADA, ADA_NAME, ("better_annual",)), "r-b")
    ada = shop.read_model.entitlements(customer_email=ADA)
    assert len(ada) == 2
    start = threading.Barrier(2)

    def erase() -> Any:
        start.wait()
        return erase_customer(shop.store, shop.read_model, ADA, "dpo")

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: erase(), range(2)))
    counts = sorted((d.keys, d.entitlements, d.events, d.webhooks) for d in done)
    assert counts[0] == (0, 0, 0, 0), counts
    assert counts[1][:2] == (1, 2) and counts[1][2] >= 4 and counts[1][3] == 2, counts
    assert sum(d.outbox_jobs for d in done) >= 2
    for view in ada:
        causes = [str(getattr(e, "cause", {}).get("event_id")) for e in shop.store.history(view.id)]
        assert len([c for c in causes if c.startswith("erasure:")]) == 1, causes


def test_whatever_was_stored_can_be_erased_and_bad_requests_say_what_is_wrong(
    tmp_path: Path, monkeypatch: Any, capfd: Any
) -> None:
    url = f"sqlite:///{tmp_path}/entitle.db"
    long = "l" * 400 + "@example.com"  # past RFC 5321's 320, as a provider may send
    shop = Shop(url)
    try:
        shop.send(bought("sub_long", long, "Lon", ("better_annual",)), "r-long")
        assert len(shop.read_model.entitlements(customer_email=long)) == 1
        settings = Settings(
            kafka_bootstrap=None,
            database_url=url,
            kafka_idempotence=False,
            raw_partitions=1,
            code_secret=SHARED_CODE_SECRET,
            dev=True,
        )
        app = build_app(CONFIG, settings, Roles(api=True), admin_keys("privacy:ek_erasure_admin"))
        with TestClient(app) as client:
            done = client.post("/v1/customers/erase", json={"email": long}, headers=AUTH)
            assert done.status_code == 200, done.text
            assert (done.json()["keys"], done.json()["entitlements"]) == (1, 1)
            for body, says in (({"email": " \t "}, "blank"), ({"email": "a\x01@b.c"}, "control")):
                bad = client.post("/v1/customers/erase", json=body, headers=AUTH)
                assert bad.status_code == 422 and says in bad.json()["detail"], bad.text
            client.post("/v1/customers/erase", json={"email": "nobody@example.net"}, headers=AUTH)
            odd = client.get("/v1/erasures?limt=1", headers=AUTH)
            assert odd.status_code == 422 and "limt" in odd.json()["detail"]
            first = client.get("/v1/erasures?limit=1", headers=AUTH).json()
            assert first["items"][0]["id"] != done.json()["id"] and first["next_cursor"]
            rest = client.get(
                "/v1/erasures", params={"limit": 5, "cursor": first["next_cursor"]}, headers=AUTH
            ).json()
            assert [e["id"] for e in rest["items"]] == [done.json()["id"]]
            assert rest["next_cursor"] is None
            assert client.get("/v1/erasures?cursor=x", headers=AUTH).status_code == 422
    finally:
        shop.close()

    monkeypatch.setenv("ENTITLE_DATABASE_URL", url)
    cases = [
        (["erase-customer", "l" * 1001], "at most 1000 characters"),
        (["erase-customer", "a\x01@example.com"], "control character"),
        (["erase-customer", "a@example.com", "--list"], "--list"),
    ]
    for argv, says in cases:
        assert main(argv) == 2
        assert says in capfd.readouterr().err
    for by in ("", "a\nb", "x" * 5000):
        with pytest.raises(SystemExit) as exited:
            main(["erase-customer", "a@example.com", "--by", by])
        assert exited.value.code == 2 and "a name is 1 to 100" in capfd.readouterr().err
    assert main(["erase-customer", "L" * 400 + "@Example.com", "--by", "dpo"]) == 0
    assert json.loads(capfd.readouterr().out)["keys"] == 0  # erased before, by the API
