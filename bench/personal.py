"""What sealing personal data costs, in events per CPU second (the machine
may be shared): eventsourcing's own mapper on plaintext events beside the
store's sealing mapper on the same events sealed (a cold key cache, then a
warm one), and the erasure's scan of the events table.

    PYTHONPATH=. python bench/personal.py [--events 100000] [--customers 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from eventsourcing.persistence import JSONTranscoder, Mapper
from eventsourcing.utils import get_topic

from domain.entitlement import Entitlement
from services.personal import owners
from services.store import EntitlementStore


def events(count: int, customers: int) -> list[Any]:
    """Entitlement events shaped as the fold's: most carry a provider fact
    naming the customer, a few an address of their own."""
    made: list[Any] = []
    at = datetime.now(UTC)
    for n in range(count):
        email = f"customer{n % customers}@example.com"
        fact = {
            "key": f"provider:stripe-main:evt_{n}",
            "at": at,
            "kind": "payment",
            "invoice": f"in_{n}",
            "customer": {"id": f"cus_{n % customers}", "email": email},
            "lines": {"si_1": {"sku": "better_annual", "quantity": 1}},
            "period_start": at,
            "period_end": at,
        }
        cls = Entitlement.CustomerChanged if n % 10 == 0 else Entitlement.Noted
        extra = {"customer_id": f"cus_{n}", "customer_email": email} if n % 10 == 0 else {}
        event = object.__new__(cls)
        event.__dict__.update(
            originator_id=uuid4(),
            originator_version=2,
            timestamp=at,
            cause={"kind": "provider", "source": "stripe-main", "event_id": f"evt_{n}"},
            occurred_at=at,
            fact=fact,
            **extra,
        )
        made.append(event)
    return made


def rate(label: str, count: int, seconds: float) -> None:
    print(f"{label:<44} {count / seconds:>10,.0f} events/CPU-s  ({seconds:.2f} s CPU)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=20_000)
    args = parser.parse_args()
    made = events(args.events, args.customers)
    with tempfile.TemporaryDirectory() as tmp:
        store = EntitlementStore(f"sqlite:///{tmp}/bench.db")
        plain_transcoder = JSONTranscoder()
        store.register_transcodings(plain_transcoder)
        plain = Mapper[Any](plain_transcoder)
        plain_stored = [plain.to_stored_event(e) for e in made]
        started = time.process_time()
        sealed_stored = []
        for start in range(0, len(made), 500):  # as the fold: a batch's new keys at once
            batch = made[start : start + 500]
            store.keyring.prepare(e for event in batch for e in owners(vars(event)))
            sealed_stored += [store.mapper.to_stored_event(e) for e in batch]
        rate(f"seal ({args.customers:,} new customers)", len(made), time.process_time() - started)
        started = time.process_time()
        again = [plain.to_stored_event(e) for e in made]
        rate(
            "encode, plaintext (eventsourcing's mapper)", len(again), time.process_time() - started
        )
        started = time.process_time()
        for stored in plain_stored:
            plain.to_domain_event(stored)
        rate("decode, plaintext (eventsourcing's mapper)", len(made), time.process_time() - started)
        for cold in (True, False):
            if cold:
                store.keyring._by_id.clear()
                store.keyring._loaded = False
            started = time.process_time()
            for stored in sealed_stored:
                store.mapper.to_domain_event(stored)
            rate(
                f"decode, sealed ({'cold' if cold else 'warm'} keys)",
                len(made),
                time.process_time() - started,
            )
        store.recorder.insert_events(sealed_stored)  # type: ignore[attr-defined]
        started = time.process_time()
        with store.recorder.datastore.transaction(commit=False) as cursor:  # type: ignore[attr-defined]
            cursor.execute(
                "SELECT count(*) FROM stored_events WHERE instr(state, ?) > 0", (b"customer7@",)
            )
            cursor.fetchall()
        rate("erasure's scan of the events (SQLite)", len(made), time.process_time() - started)
        print(f"topic of the events: {get_topic(type(made[0]))} …")
        store.close()


if __name__ == "__main__":
    main()
