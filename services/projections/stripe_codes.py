"""The Stripe codes projection: for sources with `write_back_codes`, a job
in the outbox each time a Stripe subscription's set of activation codes
changes (an entitlement created, a code issued or revoked), which the
`stripe` sender (`services.outbound.stripe_codes`) writes into the
subscription's metadata `activation_codes`.

It keeps its own table, `entitle_stripe_codes`: per (source, subscription
id, entitlement id) the active code indexes, and the log position where
the entitlement was first seen (so a subscription's codes keep the order
its entitlements were created in). Table, jobs and position are saved in
one transaction (`Outbox.commit`), and a job's id comes from the causing
event (`<entitlement id>/<version>`), so a replayed or rebuilt log (`reset`)
enqueues nothing twice, and a webhook replayed to us, which changes no
codes, enqueues nothing.

Only entitlements whose `order_ref` is a subscription id (`sub_…`) are
written: one-off payments have no subscription to write to. The projection
runs only while a source has `write_back_codes`: the first time, from the
start of the log (every existing subscription gets its codes); turned off
and on again, it catches up from where it stopped. A source that gets
`write_back_codes` while another already has it is written from then on
(its older subscriptions at their next change of codes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from domain.entitlement import event_type
from services.config import Config
from services.outbound.outbox import Job, Outbox
from services.outbound.stripe_codes import KIND, channel, payload
from services.projections.follower import Change
from services.readmodel import ReadModel
from services.store import CREATE_LOCK

STRIPE_CODES = "stripe-codes"
#: Stripe's subscription ids (https://docs.stripe.com/api/subscriptions/object).
SUBSCRIPTION_PREFIX = "sub_"

_TABLE = """CREATE TABLE IF NOT EXISTS entitle_stripe_codes (
    source TEXT NOT NULL,
    subscription TEXT NOT NULL,
    entitlement_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    code_indexes TEXT NOT NULL,
    PRIMARY KEY (source, subscription, entitlement_id)
)"""

#: (source, subscription id)
Subscription = tuple[str, str]


@dataclass
class _Member:
    """One entitlement of a subscription: where it was first seen, and its
    active code indexes."""

    seq: int
    indexes: tuple[int, ...]


def write_back_sources(config: Config) -> list[str]:
    """The sources whose codes go back into Stripe (`write_back_codes: true`)."""
    return [name for name, source in config.sources.items() if source.write_back_codes]


def stripe_codes_projection(
    read_model: ReadModel, outbox: Outbox, config: Config, wake: Callable[[], None]
) -> list[StripeCodesProjection]:
    """The projection, if a source has `write_back_codes` (else none: its
    position stays where it was, to catch up from when turned on again)."""
    sources = write_back_sources(config)
    return [StripeCodesProjection(read_model, outbox, sources, wake)] if sources else []


class StripeCodesProjection:
    """Follows the log for the Stripe sources named in `sources`; `wake`
    (the dispatcher's) is called after jobs were saved."""

    name = STRIPE_CODES

    def __init__(
        self,
        read_model: ReadModel,
        outbox: Outbox,
        sources: Iterable[str],
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.read_model = read_model
        self.outbox = outbox
        self.sources = frozenset(sources)
        self.wake = wake
        with read_model.transaction() as cur:
            if read_model.postgres:  # as the read model's tables: one process at a time
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (CREATE_LOCK,))
            cur.execute(_TABLE)

    def position(self) -> int:
        return self.read_model.position(self.name)

    def reset(self) -> None:
        """Forget the table and the position, so the log is projected again
        from the start; the jobs it makes again are already in the outbox
        (same ids) and are not sent again."""
        with self.read_model.transaction() as cur:
            cur.execute("DELETE FROM entitle_stripe_codes")
            cur.execute(
                self.read_model.sql("DELETE FROM entitle_read_positions WHERE name = ?"),
                (self.name,),
            )

    def _members(self, subscription: Subscription) -> dict[str, _Member]:
        with self.read_model.transaction(write=False) as cur:
            cur.execute(
                self.read_model.sql(
                    "SELECT entitlement_id, seq, code_indexes FROM entitle_stripe_codes"
                    " WHERE source = ? AND subscription = ?"
                ),
                subscription,
            )
            return {
                row[0]: _Member(int(row[1]), tuple(int(i) for i in row[2].split(",") if i))
                for row in cur.fetchall()
            }

    def apply(self, changes: list[Change], position: int) -> int:
        """Project a batch; returns how many jobs it made."""
        known: dict[Subscription, dict[str, _Member]] = {}
        dirty: dict[tuple[str, str, str], _Member] = {}
        jobs: list[Job] = []
        for change in changes:
            view = change.entitlement
            if view is None or view.source not in self.sources:
                continue
            if not view.order_ref.startswith(SUBSCRIPTION_PREFIX):
                continue
            subscription = (view.source, view.order_ref)
            members = known.get(subscription)
            if members is None:
                members = known[subscription] = self._members(subscription)
            entitlement = str(view.id)
            indexes = tuple(sorted(code.index for code in view.activation_codes))
            member = members.get(entitlement)
            if member is not None and member.indexes == indexes:
                continue  # a renewal, a status change: the same codes
            member = _Member(member.seq if member else change.position, indexes)
            members[entitlement] = dirty[(*subscription, entitlement)] = member
            in_order = sorted(members.items(), key=lambda item: (item[1].seq, item[0]))
            jobs.append(
                Job.of(
                    channel(view.source),
                    KIND,
                    f"{entitlement}/{change.event.originator_version}",
                    event_type(change.event),
                    view.order_ref,
                    change.position,
                    payload(view.source, view.order_ref, [(e, m.indexes) for e, m in in_order]),
                )
            )

        def save(cur: Any) -> None:
            cur.executemany(
                self.read_model.sql(
                    "INSERT INTO entitle_stripe_codes (source, subscription, entitlement_id,"
                    " seq, code_indexes) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (source, subscription, entitlement_id) DO UPDATE"
                    " SET code_indexes = excluded.code_indexes"
                ),
                [
                    (source, subscription, entitlement, m.seq, ",".join(map(str, m.indexes)))
                    for (source, subscription, entitlement), m in dirty.items()
                ],
            )

        self.outbox.commit(self.name, jobs, position, also=save if dirty else None)
        return len(jobs)

    async def project(self, changes: list[Change], position: int) -> None:
        if await anyio.to_thread.run_sync(self.apply, changes, position):
            self.wake()
