"""Every accepted webhook is accounted for, through `entitle dev` and the
services as subprocesses: restarts, a recreated raw topic, a poison record,
a database outage and a dead broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import UnknownTopicOrPartitionError

from contracts.events import EVENTS_TOPIC
from contracts.webhooks import RAW_TOPIC
from services.fold import CONSUMER_GROUP
from services.kafka import ensure_topics
from services.store import EntitlementStore
from tests import standard_events as sw
from tests import stripe_events as se
from tests.harness import ENTITLE, Entitle, Proxy, eventually
from tests.test_dev import ADMIN, AUTH, CONFIG, YEAR, consume, entitlements, post

pytestmark = pytest.mark.e2e

CASES = Path(__file__).parent / "cases"
STANDARD_SECRET = "whsec_YnVnaHVudC1zdGFuZGFyZC13ZWJob29rcy1rZXk="
ACCOUNTING_CONFIG = (
    CONFIG.replace(
        "sources:\n", f"sources:\n  billing: {{provider: standard, secret: {STANDARD_SECRET}}}\n", 1
    )
    + "  - {sku: pro_annual, product: acme, period: P1Y, prices: {standard: [pro]}}\n"
)


def paid(subscription: str) -> dict[str, Any]:
    now = int(time.time())
    return se.invoice_paid(
        subscription=subscription,
        shape=se.LEGACY,
        lines=[{"price": "p", "sku": "better_annual", "start": now, "end": now + YEAR}],
    )


def send(entitle: Entitle, prefix: str, count: int) -> set[str]:
    refs = {f"{prefix}{n}" for n in range(count)}
    for ref in sorted(refs):
        response = post(entitle, paid(ref))
        assert response.status_code == 202, response.text
    return refs


def active_refs(entitle: Entitle) -> set[str]:
    return {e["order_ref"] for e in entitlements(entitle, status="ACTIVE", limit="1000")}


def lag(bootstrap: str) -> int:
    """Raw webhooks the domain service's consumer group has not committed."""

    async def measure() -> int:
        # Not a member: it only reads the group's committed offsets.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=CONSUMER_GROUP, enable_auto_commit=False
        )
        await consumer.start()
        try:
            await consumer.topics()
            partitions = [
                TopicPartition(RAW_TOPIC, p) for p in consumer.partitions_for_topic(RAW_TOPIC) or ()
            ]
            ends = await consumer.end_offsets(partitions)
            behind = 0
            for partition, end in ends.items():
                behind += end - (await consumer.committed(partition) or 0)
            return behind
        finally:
            await consumer.stop()

    return asyncio.run(measure())


def stack(tmp_path: Path, **env: str) -> Entitle:
    (tmp_path / "entitle.yaml").write_text(ACCOUNTING_CONFIG)
    return Entitle(["dev"], tmp_path, {"ENTITLE_ADMIN_KEYS": ADMIN, **env})


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_webhooks_sent_after_a_restart_are_all_applied(tmp_path: Path, how: int) -> None:
    entitle = stack(tmp_path).start()
    try:
        before = send(entitle, "sub_before_", 10)
        eventually(lambda: active_refs(entitle) == before, timeout=15)
    finally:
        if how == signal.SIGKILL:
            entitle.kill()
        else:
            # Ctrl-C: the terminal signals the whole process group.
            assert entitle.stop(how, group=True) == 0, entitle.text
            assert "CRITICAL" not in entitle.text
    with stack(tmp_path) as again:
        # The embedded broker starts a new, empty log: its offsets start at 0
        # again, below every position the store kept from the last one.
        after = send(again, "sub_after_", 20)
        eventually(lambda: active_refs(again) == before | after, timeout=20)
        assert "is a new log" in again.text


def test_ctrl_c_under_load_folds_every_webhook_it_acknowledged(tmp_path: Path) -> None:
    """Ctrl-C while webhooks keep arriving: every one answered 202 is folded
    before the stack stops (the embedded broker keeps nothing, so one still
    unfolded would be lost), and is there after a restart."""
    entitle = stack(tmp_path).start()
    acknowledged: list[str] = []
    stopping = threading.Event()

    def sender(n: int) -> None:
        with httpx.Client(timeout=10) as client:
            k = 0
            while not stopping.is_set():
                body = se.body(paid(f"sub_load_{n}_{k}"))
                k += 1
                try:
                    response = client.post(
                        f"{entitle.url}/webhooks/stripe-main",
                        content=body,
                        headers=se.signed_headers(body),
                    )
                except httpx.HTTPError:
                    return  # the server went away
                if response.status_code == 202:
                    acknowledged.append(response.json()["receipt_id"])

    senders = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for thread in senders:
        thread.start()
    eventually(lambda: len(acknowledged) > 100 or None, timeout=30)
    try:
        assert entitle.stop(signal.SIGINT, group=True) == 0, entitle.text
    finally:
        stopping.set()
        for thread in senders:
            thread.join()
    with stack(tmp_path) as again:
        missing = [
            receipt
            for receipt in acknowledged
            if httpx.get(f"{again.url}/v1/webhooks/{receipt}", headers=AUTH).status_code != 200
        ]
        assert missing == [], f"{len(missing)} of {len(acknowledged)} lost"


def test_case_08_a_poison_webhook_is_a_dead_letter_and_its_partition_goes_on(
    tmp_path: Path,
) -> None:
    with stack(tmp_path) as entitle:
        receipts = []
        for path in sorted((CASES / "08").glob("*.json")):
            body = path.read_bytes()
            response = httpx.post(
                f"{entitle.url}/webhooks/billing",
                content=body,
                headers=sw.signed_headers(body, secret=STANDARD_SECRET),
            )
            assert response.status_code == 202, response.text
            receipts.append(response.json()["receipt_id"])
        # A Stripe webhook after them, on whatever partition.
        assert post(entitle, paid("sub_after_poison")).status_code == 202

        [valid] = eventually(lambda: entitlements(entitle, order_ref="sub_case08_poison"))
        assert valid["status"] == "ACTIVE"
        assert valid["period_end"].startswith("2027-11-01T00:00:00")
        eventually(lambda: "sub_after_poison" in active_refs(entitle))
        letters = httpx.get(f"{entitle.url}/v1/dead-letters", headers=AUTH).json()["items"]
        [poison] = [d for d in letters if d["provider_event_id"] == "evt_case08_poison"]
        assert "timezone" in poison["reason"]
        # Both good ones reached the public topic too.
        bootstrap = entitle.printed(r"broker:\s+(\S+)")
        published = [json.loads(r.value) for r in consume(bootstrap, EVENTS_TOPIC, 4)]
        orders = {p["entitlement"]["order_ref"] for p in published}
        assert {"sub_case08_poison", "sub_after_poison"} <= orders
        assert "delivered again" not in entitle.text  # no batch was ever retried
        eventually(lambda: lag(bootstrap) == 0, timeout=10)  # nothing left behind

        # The receipt log says what became of each, by the ids the 202s gave.
        dead = httpx.get(
            f"{entitle.url}/v1/webhooks", params={"outcome": "dead_letter"}, headers=AUTH
        ).json()
        assert [r["id"] for r in dead["items"]] == [receipts[0]]
        assert "timezone" in dead["items"][0]["detail"]
        one = httpx.get(f"{entitle.url}/v1/webhooks/{receipts[1]}", headers=AUTH).json()
        assert one["outcome"] == "applied"
        assert one["event_types"] == ["entitlement.activated", "entitlement.created"]
        assert json.loads(one["webhook"]["body"])["id"] == "evt_case08_valid"
        listed = subprocess.run(
            [ENTITLE, "webhooks", "--source", "billing"],
            cwd=tmp_path,
            env=entitle.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        outcomes = {
            json.loads(line)["id"]: json.loads(line)["outcome"]
            for line in listed.stdout.splitlines()
        }
        assert outcomes == {receipts[0]: "dead_letter", receipts[1]: "applied"}
        bad = httpx.get(f"{entitle.url}/v1/webhooks", params={"outcome": "lost"}, headers=AUTH)
        assert bad.status_code == 422 and "outcome must be one of" in bad.json()["detail"]
        assert httpx.get(f"{entitle.url}/v1/webhooks/nope", headers=AUTH).status_code == 404
        made_up = base64.urlsafe_b64encode(json.dumps(["yesterday", "r"]).encode()).decode()
        bad = httpx.get(f"{entitle.url}/v1/webhooks", params={"cursor": made_up}, headers=AUTH)
        assert bad.status_code == 422 and "cursor" in bad.json()["detail"]
        for path, says in (
            ("/v1/dead-letters", "cursor is not one this API gave"),  # it pages
            ("/v1/projection-errors", "unknown query parameter"),
        ):
            bad = httpx.get(f"{entitle.url}{path}", params={"cursor": "zzz"}, headers=AUTH)
            assert bad.status_code == 422 and says in bad.json()["detail"]
        assert httpx.get(f"{entitle.url}/v1/webhooks").status_code == 401

        # A body nested deeper than any parser's stack is bad input, not a 500.
        deep = b'{"id": "evt_deep", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        response = httpx.post(
            f"{entitle.url}/webhooks/billing",
            content=deep,
            headers=sw.signed_headers(deep, secret=STANDARD_SECRET),
        )
        assert response.status_code == 400, response.text


def test_the_stack_stops_with_an_error_when_its_embedded_broker_dies(tmp_path: Path) -> None:
    entitle = stack(tmp_path).start()
    assert entitle.process is not None
    pid = entitle.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    # The broker, and the web, domain and projector processes.
    assert len(children) == 4
    [broker] = [c for c in children if b"broker" in Path(f"/proc/{c}/cmdline").read_bytes()]
    sending = threading.Event()
    sending.set()

    def keep_sending() -> None:  # webhooks in flight when the broker dies
        n = 0
        while sending.is_set():
            with contextlib.suppress(httpx.HTTPError):
                post(entitle, paid(f"sub_flowing_{n}"))
            n += 1

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    time.sleep(1.0)
    os.kill(int(broker), signal.SIGKILL)
    killed = time.monotonic()
    try:
        assert entitle.process.wait(20) == 1, entitle.text[-3000:]
    finally:
        sending.clear()
    assert time.monotonic() - killed < 10
    assert entitle.text.count("embedded broker exited") == 1
    after = entitle.text.split("embedded broker exited", 1)[1]
    assert after.count("\n") < 50, after[-3000:]  # no error loop meanwhile


def test_a_database_outage_is_reported_and_everything_catches_up(
    tmp_path: Path, postgres_url: str
) -> None:
    url = urlsplit(postgres_url)
    proxy = Proxy((url.hostname or "127.0.0.1", url.port or 5432))
    through_proxy = url._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
    try:
        with stack(tmp_path, ENTITLE_DATABASE_URL=through_proxy) as entitle:
            first = send(entitle, "sub_pre_", 5)
            eventually(lambda: active_refs(entitle) == first, timeout=15)
            assert httpx.get(f"{entitle.url}/readyz").status_code == 200

            proxy.cut()
            during = send(entitle, "sub_during_", 10)  # the broker still takes them
            outage = eventually(
                lambda: (
                    (r := httpx.get(f"{entitle.url}/readyz", timeout=10)).status_code == 503
                    and r.json()
                ),
                timeout=10,
            )
            assert outage["parts"]["database"].startswith("failing")
            listing = httpx.get(f"{entitle.url}/v1/entitlements", headers=AUTH, timeout=30)
            assert listing.status_code == 503, listing.text
            time.sleep(10)
            proxy.restore()

            eventually(
                lambda: httpx.get(f"{entitle.url}/readyz", timeout=10).status_code == 200,
                timeout=60,
            )
            eventually(lambda: active_refs(entitle) == first | during, timeout=60)
            bootstrap = entitle.printed(r"broker:\s+(\S+)")
            published = [json.loads(r.value) for r in consume(bootstrap, EVENTS_TOPIC, 60)]
            activated = {
                p["entitlement"]["order_ref"]
                for p in published
                if p["type"] == "entitlement.activated"
            }
            assert activated == first | during
    finally:
        proxy.close()


# How the domain service tells the new log: the broker's topic id; a marker
# record at the start of partition 0 (brokers without ids, here simulated by
# ENTITLE_KAFKA_TOPIC_IDS=false), written when the engine creates the topic;
# and a topic created again by hand, with no marker, whose end lies below
# the positions recorded for the old log.
RECREATIONS = ["topic id", "marker", "by hand, no marker"]


@pytest.mark.parametrize("how", RECREATIONS)
def test_a_recreated_raw_topic_is_folded_from_its_start(
    tmp_path: Path, kafka_bootstrap: str, kafka_idempotence: bool, how: str
) -> None:
    (tmp_path / "entitle.yaml").write_text(ACCOUNTING_CONFIG)
    env = {
        "ENTITLE_ADMIN_KEYS": ADMIN,
        "ENTITLE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "ENTITLE_KAFKA_IDEMPOTENCE": str(kafka_idempotence).lower(),
        "ENTITLE_KAFKA_TOPIC_IDS": str(how == "topic id").lower(),
        "ENTITLE_RAW_PARTITIONS": "2",
        "ENTITLE_DATABASE_URL": f"sqlite:///{tmp_path / 'entitle.db'}",
    }

    async def delete() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            with contextlib.suppress(UnknownTopicOrPartitionError):
                await admin.delete_topics([RAW_TOPIC])
            await asyncio.sleep(1.0)
            if how == "by hand, no marker":
                await admin.create_topics([NewTopic(RAW_TOPIC, 2, 1)])
        finally:
            await admin.close()
        if how != "by hand, no marker":
            await ensure_topics(kafka_bootstrap, 2, topic_ids=how == "topic id")

    asyncio.run(delete())  # a topic left by another test may hold a marker, or not
    with Entitle(["serve", "ingress", "domain", "projector", "api"], tmp_path, env) as entitle:
        first = send(entitle, "sub_old_log_", 10)
        eventually(lambda: active_refs(entitle) == first, timeout=15)
        asyncio.run(delete())
        # Fewer webhooks than the old log held: each offset of the new log is
        # at or below a position recorded for the old one.
        second = send(entitle, "sub_new_log_", 6)
        try:
            eventually(lambda: active_refs(entitle) == first | second, timeout=30)
        except AssertionError:
            print(entitle.text, active_refs(entitle))
            raise
        assert "was created again" in entitle.text
        if how == "marker":
            assert "created again: incarnation unmarked-" not in entitle.text
        # A marker is no webhook: nothing was dead-lettered.
        letters = httpx.get(f"{entitle.url}/v1/dead-letters", headers=AUTH).json()["items"]
        assert letters == []
        # Once switched, the old log's positions are gone from the store.
        names = EntitlementStore(env["ENTITLE_DATABASE_URL"]).positions(RAW_TOPIC)
        assert len({name.rpartition("/")[0] for name in names}) == 1, names


STRIPE_POISONS = {
    "year 9999 period end": ({"end": 253402300799}, "out of range"),
    "e-mail not a string": ({"email": {"address": "x@example.com"}}, "customer e-mail address"),
    "NUL in an e-mail": ({"email": "buyer\x00@example.com"}, "control character"),
}


@pytest.mark.parametrize("kind", sorted(STRIPE_POISONS))
def test_a_poison_stripe_webhook_between_two_good_ones_of_its_order(
    tmp_path: Path, postgres_url: str, kind: str
) -> None:
    """All three name one subscription, so they share a partition."""
    overrides, named = STRIPE_POISONS[kind]
    now = int(time.time())

    def invoice(years: int, **kw: Any) -> dict[str, Any]:
        end = kw.pop("end", now + years * YEAR)
        return se.invoice_paid(
            subscription="sub_poisoned",
            shape=se.LEGACY,
            lines=[{"price": "p", "sku": "better_annual", "start": now, "end": end}],
            **kw,
        )

    poison = invoice(1, **overrides)
    with stack(tmp_path, ENTITLE_DATABASE_URL=postgres_url) as entitle:
        for event in (invoice(1), poison, invoice(2)):
            assert post(entitle, event).status_code == 202
        [item] = eventually(
            lambda: [
                e
                for e in entitlements(entitle, order_ref="sub_poisoned")
                if e["period_end"].startswith(
                    time.strftime("%Y-%m-%d", time.gmtime(now + 2 * YEAR))
                )
            ]
        )
        assert item["status"] == "ACTIVE"
        assert item["customer"]["email"] == "buyer@example.com"
        letters = httpx.get(f"{entitle.url}/v1/dead-letters", headers=AUTH).json()["items"]
        [letter] = [d for d in letters if d["provider_event_id"] == poison["id"]]
        assert named in letter["reason"]
        bootstrap = entitle.printed(r"broker:\s+(\S+)")
        types = [json.loads(r.value)["type"] for r in consume(bootstrap, EVENTS_TOPIC, 3)]
        assert types == ["entitlement.created", "entitlement.activated", "entitlement.renewed"]
        receipts = httpx.get(
            f"{entitle.url}/v1/webhooks", params={"order_ref": "sub_poisoned"}, headers=AUTH
        ).json()["items"]
        assert sorted(r["outcome"] for r in receipts) == ["applied", "applied", "dead_letter"]
        assert "delivered again" not in entitle.text  # the partition never stalled
        # A NUL in a query is no e-mail or reference: 422, not the database's 500.
        for path, query in (
            ("/v1/webhooks", {"order_ref": "\x00"}),
            ("/v1/entitlements", {"customer_email": "a\x00b"}),
        ):
            answer = httpx.get(f"{entitle.url}{path}", params=query, headers=AUTH)
            assert answer.status_code == 422, answer.text
        assert httpx.get(f"{entitle.url}/v1/webhooks/%00", headers=AUTH).status_code == 422
