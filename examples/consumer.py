"""A downstream consumer of entitle's topics: keeps a local SQLite table of
entitlements, and prints each change as it comes.

    ENTITLE_KAFKA_BOOTSTRAP=127.0.0.1:9092 \
        .venv/bin/python examples/consumer.py --db entitlements.db

1. The compacted state topic, read from the start, gives every entitlement
   as of its latest change, without replaying events.
2. Then the event topic brings each change. An event the table's state
   already includes (its `sequence` is not above the table's) is ignored,
   and delivery is at least once (`entitle publish` sends events again, with
   the same ids), so an event is applied once per `event_id`.

It imports the payload models from entitle's `contracts` package (installed
with entitle); elsewhere, generate them from `GET /asyncapi.json` or
`contracts/schemas/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3

from faststream.kafka import KafkaBroker

from contracts.events import EVENTS_TOPIC, EntitlementEventV1, EntitlementV1
from contracts.state import STATE_TOPIC, EntitlementStateV1

SCHEMA = """
CREATE TABLE IF NOT EXISTS entitlements (
    id TEXT PRIMARY KEY, sequence INTEGER NOT NULL, status TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, entitlement_id TEXT, type TEXT);
"""


class Table:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path)
        self.db.executescript(SCHEMA)

    def sequence(self, entitlement_id: object) -> int:
        row = self.db.execute(
            "SELECT sequence FROM entitlements WHERE id = ?", (str(entitlement_id),)
        ).fetchone()
        return row[0] if row else 0

    def keep(self, entitlement: EntitlementV1, sequence: int) -> None:
        """Store the entitlement as of `sequence`, unless the table has a later state."""
        self.db.execute(
            "INSERT INTO entitlements VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " sequence = excluded.sequence, status = excluded.status, body = excluded.body"
            " WHERE excluded.sequence > entitlements.sequence",
            (str(entitlement.id), sequence, entitlement.status, entitlement.model_dump_json()),
        )

    def on_state(self, state: EntitlementStateV1) -> None:
        with self.db:
            self.keep(state.entitlement, state.sequence)

    def on_event(self, event: EntitlementEventV1) -> None:
        with self.db:
            if event.sequence <= self.sequence(event.entitlement_id):
                return  # the state we have already includes it
            seen = self.db.execute(
                "INSERT OR IGNORE INTO events VALUES (?, ?, ?)",
                (str(event.event_id), str(event.entitlement_id), event.type),
            )
            if seen.rowcount == 0:
                return  # delivered again
            self.keep(event.entitlement, event.sequence)
        print(f"{event.type} {event.entitlement_id} #{event.sequence}", flush=True)


async def consume(bootstrap: str, path: str, group: str, stop: asyncio.Event) -> None:
    table = Table(path)
    broker = KafkaBroker(bootstrap)
    await broker.start()
    try:
        # 1. Every entitlement: the state topic from the start (no consumer
        #    group), until nothing more comes for a second.
        states = broker.subscriber(STATE_TOPIC, auto_offset_reset="earliest")
        await states.start()
        count = 0
        while not stop.is_set() and (message := await states.get_one(timeout=1.0)) is not None:
            table.on_state(EntitlementStateV1.model_validate_json(message.body))
            count += 1
        await states.stop()
        print(f"{count} states read from {STATE_TOPIC}", flush=True)

        # 2. Then every change, in a consumer group: a restart goes on where it was.
        events = broker.subscriber(EVENTS_TOPIC, group_id=group, auto_offset_reset="earliest")

        @events  # FastStream parses each message into the handler's argument
        async def on_event(event: EntitlementEventV1) -> None:
            table.on_event(event)  # a few rows of a local file: quick enough for the loop

        await events.start()
        await stop.wait()
    finally:
        # A broker that went away would keep the goodbye (leaving the group)
        # waiting for ever: give it a few seconds, then go.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(broker.stop(), timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("ENTITLE_KAFKA_BOOTSTRAP"))
    parser.add_argument("--db", default="entitlements.db", help="the SQLite file to keep")
    parser.add_argument("--group", default="entitle-example-consumer", help="consumer group")
    args = parser.parse_args()
    if not args.bootstrap:
        parser.error("set --bootstrap or ENTITLE_KAFKA_BOOTSTRAP (`entitle dev` prints it)")

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await consume(args.bootstrap, args.db, args.group, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
