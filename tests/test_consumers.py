"""Downstream consumers: the compacted state topic, `entitle publish`, the
AsyncAPI document of every topic, and `examples/consumer.py`, against a real
broker and real stores."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from contracts.events import EVENTS_TOPIC, EntitlementEventV1, EntitlementV1
from contracts.state import STATE_TOPIC, EntitlementStateV1
from contracts.webhooks import DEAD_LETTER_TOPIC, RAW_TOPIC, DeadLetterV1, RawWebhookV1
from services.app import Roles, build_app
from services.cli import main
from services.config import Settings, admin_keys
from services.fold import DomainService
from services.kafka import ensure_topics, free_port, make_broker
from services.projections import (
    PUBLIC_EVENTS,
    Follower,
    PublicEventsProjection,
    ReadModelProjection,
    project_batch,
)
from services.readmodel import ReadModel
from services.store import EntitlementStore
from tests.harness import eventually
from tests.test_poison import CODES, CONFIG, envelope, paid, zoneless
from tests.test_store import NOW, YEAR

ROOT = Path(__file__).parent.parent
_PUBLIC = set(EntitlementV1.model_fields)


def fold(store: EntitlementStore, offset: int, *events: dict[str, Any], dead: bool = False) -> None:
    """Fold Stripe webhooks from raw offset `offset` on (and, if `dead`, a
    webhook that is dead-lettered)."""
    records = [envelope(offset + n, event) for n, event in enumerate(events)]
    if dead:
        records.append(envelope(offset + len(events), zoneless(), "billing"))
    DomainService(store, CONFIG, CODES).process(records)


def project(store: EntitlementStore, read_model: ReadModel, bootstrap: str, idem: bool) -> None:
    """What the projector does: the read model, then the public topics."""

    async def run() -> None:
        broker = make_broker(bootstrap, idem)
        await broker.start()
        try:
            for projection in (
                ReadModelProjection(read_model),
                PublicEventsProjection(read_model, broker),
            ):
                changes, last = Follower(store).read(projection.position(), 10_000)
                if last is not None:
                    await project_batch(projection, changes, last)
        finally:
            await broker.stop()

    asyncio.run(run())


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of `topic`, from its start to its end now."""

    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            records: list[Any] = []
            left = set(partitions)
            while left:
                for batch in (await consumer.getmany(*left, timeout_ms=1000)).values():
                    records += batch
                left = {p for p in left if await consumer.position(p) < ends[p]}
            return records
        finally:
            await consumer.stop()

    return asyncio.run(run())


def expected(read_model: ReadModel) -> dict[str, tuple[int, EntitlementV1]]:
    return {
        str(view.id): (
            view.sequence,
            EntitlementV1.model_validate(view.model_dump(include=_PUBLIC)),
        )
        for view in read_model.entitlements(1000)
    }


def table(path: Path) -> dict[str, tuple[int, EntitlementV1]]:
    import sqlite3

    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, sequence, body FROM entitlements").fetchall()
    return {i: (seq, EntitlementV1.model_validate_json(body)) for i, seq, body in rows}


def compaction(bootstrap: str, topic: str) -> str | None:
    async def run() -> str | None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)]
            )
            entries = response.to_object()["resources"][0]["config_entries"]
            return next(
                (e["config_value"] for e in entries if e["config_names"] == "cleanup.policy"), None
            )
        finally:
            await admin.close()

    return asyncio.run(run())


class Consumer:
    """`python examples/consumer.py`, its output collected."""

    def __init__(self, bootstrap: str, db: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ENTITLE_KAFKA_BOOTSTRAP": bootstrap}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "consumer.py"), "--db", str(db)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def changes(self) -> list[str]:
        return [line for line in self.lines if line.startswith("entitlement.")]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.mark.integration
def test_a_new_consumer_has_every_entitlement_and_republished_events_change_nothing(
    database_url: str,
    kafka_bootstrap: str,
    kafka_idempotence: bool,
    tmp_path: Path,
    capfd: Any,
    monkeypatch: Any,
) -> None:
    store, read_model = EntitlementStore(database_url), ReadModel(database_url)
    asyncio.run(ensure_topics(kafka_bootstrap, 1))
    # The state topic is compacted wherever the broker says what a topic is.
    assert compaction(kafka_bootstrap, STATE_TOPIC) == "compact"
    # sub_a ends with entitlement.noted (its invoice again, in a new provider
    # event: a fact that changed nothing, not on the event topic); one
    # webhook is dead-lettered.
    first = paid("sub_a", invoice_id="in_a")
    fold(store, 0, first, paid("sub_b"), paid("sub_a", invoice_id="in_a"), dead=True)
    project(store, read_model, kafka_bootstrap, kafka_idempotence)
    want = expected(read_model)
    first_head = store.process_recorder.max_notification_id()
    assert len(want) == 2
    events = [
        EntitlementEventV1.model_validate_json(r.value)
        for r in read_topic(kafka_bootstrap, EVENTS_TOPIC)
    ]
    states = [
        (r.key.decode(), EntitlementStateV1.model_validate_json(r.value))
        for r in read_topic(kafka_bootstrap, STATE_TOPIC)
    ]
    # Keyed by entitlement id; the last state of each is the read model's,
    # a sequence past the last published event where that was `noted`.
    last = {key: state for key, state in states}
    assert all(key == str(state.entitlement_id) for key, state in states)
    assert {k: (s.sequence, s.entitlement) for k, s in last.items()} == want
    assert any(s.event_type == "entitlement.noted" for s in last.values())
    assert max(e.sequence for e in events) < max(s.sequence for s in last.values())

    consumer = Consumer(kafka_bootstrap, tmp_path / "entitlements.db")
    try:
        # From the state topic alone: every entitlement, as the read model has it.
        eventually(lambda: any("states read" in line for line in consumer.lines), timeout=30)
        assert table(tmp_path / "entitlements.db") == want
        assert consumer.changes() == []  # history's events are all in those states

        # Changes after it started come through the event topic.
        fold(store, 10, paid("sub_b", end=NOW + 2 * YEAR), paid("sub_c"))
        project(store, read_model, kafka_bootstrap, kafka_idempotence)
        content = {k: entitlement for k, (_, entitlement) in expected(read_model).items()}
        try:
            eventually(
                lambda: (
                    {k: e for k, (_, e) in table(tmp_path / "entitlements.db").items()} == content
                ),
                timeout=20,
            )
        except AssertionError:
            consumer.stop()
            print("\n".join(consumer.lines))
            raise

        # Republish: every stored event again, with the same ids; the
        # projector's own position stays where it was.
        position = read_model.position(PUBLIC_EVENTS)
        before = read_topic(kafka_bootstrap, EVENTS_TOPIC)
        monkeypatch.setenv("ENTITLE_DATABASE_URL", database_url)
        monkeypatch.setenv("ENTITLE_KAFKA_BOOTSTRAP", kafka_bootstrap)
        monkeypatch.setenv("ENTITLE_KAFKA_IDEMPOTENCE", str(kafka_idempotence).lower())
        assert main(["publish", "--all"]) == 0
        out = capfd.readouterr().out
        assert f"published {len(before)} events, 3 entitlement states and 1 dead letters" in out
        after = read_topic(kafka_bootstrap, EVENTS_TOPIC)
        ids = [json.loads(r.value)["event_id"] for r in after]
        assert ids == [json.loads(r.value)["event_id"] for r in before] * 2
        assert read_model.position(PUBLIC_EVENTS) == position
        letters = read_topic(kafka_bootstrap, DEAD_LETTER_TOPIC)
        assert len({DeadLetterV1.model_validate_json(r.value).id for r in letters}) == 1
        assert len(letters) == 2

        # The consumer went past all of them (one partition: in order) and
        # applied none twice.
        fold(store, 20, paid("sub_d"))
        project(store, read_model, kafka_bootstrap, kafka_idempotence)
        newer = {e.event_id for e in _events(kafka_bootstrap)} - {e.event_id for e in events}
        eventually(lambda: len(consumer.changes()) >= len(newer))
        printed = consumer.changes()
        assert len(printed) == len(set(printed)) == len(newer)
        assert _orders(consumer, read_model).count("sub_d") == 2  # created, activated
        assert {k: e for k, (_, e) in table(tmp_path / "entitlements.db").items()} == {
            k: e for k, (_, e) in expected(read_model).items()
        }

        # From a position on: the changes since, each entitlement's state
        # folded from its earlier events (sub_b's renewal is its third).
        assert main(["publish", "--from-position", str(first_head + 1)]) == 0
        assert f"published {len(newer)} events, 3 entitlement states" in capfd.readouterr().out
        last_states = {
            r.key.decode(): EntitlementStateV1.model_validate_json(r.value)
            for r in read_topic(kafka_bootstrap, STATE_TOPIC)
        }
        assert {k: (s.sequence, s.entitlement) for k, s in last_states.items()} == expected(
            read_model
        )
    finally:
        consumer.stop()
        store.close()
        read_model.close()


def _events(bootstrap: str) -> list[EntitlementEventV1]:
    return [
        EntitlementEventV1.model_validate_json(r.value) for r in read_topic(bootstrap, EVENTS_TOPIC)
    ]


def _orders(consumer: Consumer, read_model: ReadModel) -> list[str]:
    """The order refs of the entitlements the consumer printed a change of."""
    refs = {str(v.id): v.order_ref for v in read_model.entitlements(1000)}
    return [refs.get(line.split()[1], "") for line in consumer.changes()]


@pytest.mark.integration
def test_publish_says_what_is_wrong(tmp_path: Path, monkeypatch: Any, capfd: Any) -> None:
    monkeypatch.chdir(tmp_path)  # no `entitle dev` here: no .entitle/broker
    monkeypatch.setenv("ENTITLE_DATABASE_URL", f"sqlite:///{tmp_path / 'e.db'}")
    monkeypatch.delenv("ENTITLE_KAFKA_BOOTSTRAP", raising=False)
    for bad in (["--from-position", "0"], ["--from-position", "x"], []):
        with pytest.raises(SystemExit) as exit:
            main(["publish", *bad])
        assert exit.value.code == 2
    assert "positions start at 1" in capfd.readouterr().err
    assert main(["publish", "--all"]) == 2
    assert "no event store at" in capfd.readouterr().err
    store = EntitlementStore(f"sqlite:///{tmp_path / 'e.db'}")
    assert main(["publish", "--all"]) == 2
    assert "no broker: set ENTITLE_KAFKA_BOOTSTRAP" in capfd.readouterr().err
    fold(store, 0, paid("sub_a"))
    head = store.process_recorder.max_notification_id()
    store.close()
    monkeypatch.setenv("ENTITLE_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    assert main(["publish", "--from-position", str(head + 1)]) == 2
    assert f"the event log ends at position {head}" in capfd.readouterr().err
    assert main(["publish", "--all"]) == 2
    assert "cannot reach the broker at 127.0.0.1:" in capfd.readouterr().err


def test_the_asyncapi_document_names_every_topic_with_its_contract(tmp_path: Path) -> None:
    from faststream.specification.asyncapi.v3_0_0.schema import ApplicationSchema

    settings = Settings(
        kafka_bootstrap=None,
        database_url=f"sqlite:///{tmp_path / 'api.db'}",
        kafka_idempotence=False,
        raw_partitions=1,
        code_secret="x" * 32,
    )
    app = build_app(
        _config(tmp_path), settings, Roles(api=True), admin_keys("ops:ek_test_admin_key")
    )

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://entitle") as client:
            return await client.get(path)

    response = asyncio.run(get("/asyncapi.json"))
    assert response.status_code == 200
    document = response.json()
    ApplicationSchema.model_validate(document)  # FastStream's AsyncAPI 3.0 model
    assert document["asyncapi"] == "3.0.0"
    _refs_resolve(document, document)
    contracts = {
        RAW_TOPIC: RawWebhookV1,
        EVENTS_TOPIC: EntitlementEventV1,
        STATE_TOPIC: EntitlementStateV1,
        DEAD_LETTER_TOPIC: DeadLetterV1,
    }
    channels = {c["address"]: c for c in document["channels"].values()}
    assert set(channels) == set(contracts)
    schemas = document["components"]["schemas"]
    for topic, model in contracts.items():
        [message] = channels[topic]["messages"].values()
        payload = _resolve(document, _resolve(document, message)["payload"])
        contract = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, schema in contract.pop("$defs", {}).items():
            assert schemas[name] == schema, (topic, name)
        assert payload == contract, topic
    page = asyncio.run(get("/asyncapi"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert STATE_TOPIC in page.text and "AsyncApiStandalone.render" in page.text


def _config(tmp_path: Path) -> Any:
    from services.config import load_config

    path = tmp_path / "entitle.yaml"
    path.write_text((ROOT / "examples" / "entitle.yaml").read_text())
    return load_config(path)


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> Any:
    while "$ref" in node:
        found: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        node = found
    return node


def _refs_resolve(document: dict[str, Any], node: Any) -> None:
    if isinstance(node, dict):
        if "$ref" in node:
            _resolve(document, node)
        for value in node.values():
            _refs_resolve(document, value)
    elif isinstance(node, list):
        for value in node:
            _refs_resolve(document, value)
