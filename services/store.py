"""The event store: eventsourcing on PostgreSQL or SQLite, chosen by URL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import ProcessRecorder, Tracking

from domain.dead_letter import DeadLetter
from domain.entitlement import Entitlement, Order, Payment

A = TypeVar("A", Entitlement, Order, Payment, DeadLetter)


class DatabaseURLError(ValueError):
    pass


def store_env(database_url: str) -> dict[str, str]:
    """eventsourcing's environment for a `sqlite:///path` or `postgresql://` URL."""
    url = urlsplit(database_url)
    if url.scheme == "sqlite":
        path = unquote(url.path[1:] if url.path.startswith("/") else url.path)
        if not path:
            raise DatabaseURLError("sqlite URL needs a path: sqlite:///relative or sqlite:////abs")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": path,
            "SQLITE_LOCK_TIMEOUT": "10",
        }
    if url.scheme in ("postgresql", "postgres"):
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": unquote(url.path.lstrip("/")) or "postgres",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": unquote(url.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(url.password or ""),
            # Not POSTGRES_ENABLE_DB_FUNCTIONS: in eventsourcing 9.5 that path
            # drops the tracking record and skips the table lock that keeps
            # notification ids committing in order.
            "POSTGRES_POOL_SIZE": "4",
        }
    raise DatabaseURLError(
        f"unsupported database URL scheme {url.scheme!r}: use sqlite:///… or postgresql://…"
    )


class EntitlementStore(Application[UUID]):
    """Entitlements, orders and dead letters, with tracking of the Kafka
    positions they came from."""

    name = "entitle"

    def __init__(self, database_url: str) -> None:
        super().__init__(env=store_env(database_url))

    def construct_recorder(self) -> ProcessRecorder:
        return self.factory.process_recorder()

    @property
    def process_recorder(self) -> ProcessRecorder:
        recorder = self.recorder
        assert isinstance(recorder, ProcessRecorder)
        return recorder

    def record(self, aggregates: Iterable[Aggregate], tracking: Tracking | None) -> int:
        """Save the aggregates' new events and the tracking position in one
        transaction; returns the number of events saved."""
        processing_event: ProcessingEvent[UUID] = ProcessingEvent(tracking=tracking)
        processing_event.collect_events(*aggregates)
        if not processing_event.events and tracking is None:
            return 0
        self._record(processing_event)
        return len(processing_event.events)

    def position(self, name: str) -> int | None:
        return self.process_recorder.max_tracking_id(name)

    def find(self, aggregate_id: UUID, kind: type[A]) -> A | None:
        try:
            aggregate: Any = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        if not isinstance(aggregate, kind):
            raise TypeError(f"{aggregate_id} is a {type(aggregate).__name__}, not {kind.__name__}")
        return aggregate

    def history(self, aggregate_id: UUID) -> list[DomainEventProtocol[UUID]]:
        return list(self.events.get(aggregate_id))

    def aggregate_at(self, aggregate_id: UUID, version: int) -> Any:
        return self.repository.get(aggregate_id, version=version)


class Batch:
    """The aggregates one transaction touches: each is loaded once, changed
    by any number of commands, and saved together with one tracking record."""

    def __init__(self, store: EntitlementStore) -> None:
        self._store = store
        self._aggregates: dict[UUID, Aggregate] = {}

    def find(self, aggregate_id: UUID, kind: type[A]) -> A | None:
        found = self._aggregates.get(aggregate_id)
        if found is None:
            found = self._store.find(aggregate_id, kind)
            if found is not None:
                self._aggregates[aggregate_id] = found
        if found is not None and not isinstance(found, kind):
            raise TypeError(f"{aggregate_id} is a {type(found).__name__}, not {kind.__name__}")
        return found

    def add(self, aggregate: Aggregate) -> None:
        self._aggregates[aggregate.id] = aggregate

    def __iter__(self) -> Iterator[Aggregate]:
        return iter(self._aggregates.values())
