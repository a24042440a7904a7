"""Why an entitlement is as it is: its history with the state after each
event, the fields each event changed, and the webhook (receipt and provider
event) or other cause behind it. For `GET …/history?with_state=true` and
`entitle history`."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from contracts.api import (
    AsOfV1,
    CausedBy,
    EntitlementAsOfView,
    EntitlementView,
    FieldChange,
    HistoryStateEntry,
    ReceiptLink,
    ReceiptView,
)
from domain.entitlement import Entitlement
from services.projections.views import entitlement_view, history_entry
from services.store import EntitlementStore

#: View fields every event moves: bookkeeping, not a change worth naming.
UNCHANGING = ("sequence", "updated_at")


class NotThen(LookupError):
    """No such entitlement at that time or version; the message says why."""


class NotYet(ValueError):
    """A time the engine has not reached: its state then is not known."""


def as_of(
    store: EntitlementStore,
    entitlement_id: UUID,
    at: datetime | None = None,
    version: int | None = None,
    now: datetime | None = None,
) -> EntitlementAsOfView:
    """The entitlement as its stored events up to recorded time `at`, or up
    to `version`, left it (`EntitlementStore.entitlement_as_of`), marked
    with that moment. Codes show as indices only. NotThen if there is no
    such entitlement, it did not exist yet at `at`, or has no `version`;
    NotYet if `at` is after `now` and after its last recorded event (what
    will be so then, no one knows yet; an event recorded by a clock ahead
    of `now` still answers up to its time)."""
    entitlement = store.entitlement_as_of(entitlement_id, at=at, version=version)
    latest = store.versions([entitlement_id]).get(entitlement_id)
    if (
        at is not None
        and now is not None
        and at > now
        and entitlement is not None
        and entitlement.version == latest
        and at > entitlement.modified_on
    ):
        raise NotYet("as_of is in the future")
    if entitlement is None:
        created = store.entitlement_as_of(entitlement_id, version=1)
        if created is None or latest is None:
            raise NotThen(f"no entitlement {entitlement_id}")
        if at is not None:
            raise NotThen(
                f"entitlement {entitlement_id} did not exist at {at.isoformat()};"
                f" it was created at {created.created_on.isoformat()}"
            )
        raise NotThen(
            f"entitlement {entitlement_id} has no version {version}; its versions are 1 to {latest}"
        )
    return EntitlementAsOfView(
        **dict(entitlement_view(entitlement)),
        as_of=AsOfV1(at=at, version=entitlement.version, latest_version=latest or 0),
    )


def states(events: Iterable[Any]) -> Iterator[tuple[Any, Entitlement]]:
    """Each event with the entitlement after it, folded in one pass. The
    entitlement is the same object throughout, changed by the next event:
    take what is needed of it before asking for the next."""
    aggregate: Any = None
    for event in events:
        aggregate = event.mutate(aggregate)
        yield event, aggregate


def changes(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, FieldChange]:
    """The fields of view `after` (JSON form) that differ from `before`;
    with no `before` (the first event), every field that is set."""
    if before is None:
        return {
            name: FieldChange(before=None, after=value)
            for name, value in after.items()
            if name not in UNCHANGING and value not in (None, [], {})
        }
    return {
        name: FieldChange(before=before.get(name), after=value)
        for name, value in after.items()
        if name not in UNCHANGING and before.get(name) != value
    }


Receipts = Callable[[str, Sequence[str]], list[ReceiptView]]


def with_state(
    events: Sequence[Any],
    receipts_of: Receipts,
    show: Callable[[EntitlementView], EntitlementView] = lambda view: view,
) -> list[HistoryStateEntry]:
    """The history entries of an entitlement's `events` (all of them, in
    order), each with the state after it (`show` may add to the view, e.g.
    the codes), what it changed and its cause. `receipts_of(source, event
    ids)` finds the receipts (the read model's `receipts_of`): one call per
    source."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for event in events:
        cause = getattr(event, "cause", None)
        if cause and cause["kind"] == "provider":
            wanted[cause["source"]] |= set(_candidates(cause["event_id"]))
    found: dict[tuple[str, str], list[ReceiptView]] = defaultdict(list)
    for source, ids in wanted.items():
        for receipt in receipts_of(source, sorted(ids)):
            found[source, receipt.provider_event_id].append(receipt)
    entries: list[HistoryStateEntry] = []
    before: dict[str, Any] | None = None
    for event, entitlement in states(events):
        state = show(entitlement_view(entitlement))
        after = state.model_dump(mode="json")
        entries.append(
            HistoryStateEntry(
                **dict(history_entry(event)),
                state=state,
                changes=changes(before, after),
                caused_by=caused_by(getattr(event, "cause", None), found),
            )
        )
        before = after
    return entries


def _candidates(event_id: str) -> list[str]:
    """The provider event ids a cause may stand for: its own, and the part
    before a `/` (one webhook causing two facts, e.g. `evt_1/order`)."""
    head = event_id.split("/", 1)[0]
    return [event_id] if head == event_id else [event_id, head]


#: The prefix of the request ids of changes made in the customer portal.
PORTAL_REQUEST = "portal-"


def caused_by(
    cause: dict[str, str] | None, found: dict[tuple[str, str], list[ReceiptView]]
) -> CausedBy | None:
    if not cause:
        return None
    kind, source, event_id = cause["kind"], cause["source"], cause["event_id"]
    if kind == "provider":
        receipts: list[ReceiptView] = []
        provider_event_id = event_id
        for candidate in _candidates(event_id):
            receipts = found.get((source, candidate), [])
            if receipts:
                provider_event_id = candidate
                break
        links = [
            ReceiptLink(
                id=r.id,
                event_type=r.event_type,
                outcome=r.outcome,
                received_at=r.received_at,
                via=r.via,
            )
            for r in receipts
        ]
        named = ", ".join(f"{r.id} ({r.event_type}, {r.outcome})" for r in receipts)
        summary = f"webhook {provider_event_id} from {source}: " + (
            f"receipt {named}" if receipts else "no receipt in the read model (yet)"
        )
        return CausedBy(
            kind="provider", summary=summary, provider_event_id=provider_event_id, receipts=links
        )
    if kind == "schedule":
        due = event_id.removeprefix("due@")
        return CausedBy(kind="schedule", summary=f"the schedule: due at {due}")
    if kind == "admin":
        return CausedBy(kind="admin", summary=f"admin key {source!r}, request {event_id}")
    if source == "usage":
        summary = f"usage recorded by the vendor's application (idempotency key {event_id})"
    elif event_id.startswith(PORTAL_REQUEST):
        summary = f"the customer, in the customer portal (request {event_id})"
    else:
        summary = f"the vendor's application with an activation code (request {event_id})"
    return CausedBy(kind="client", summary=summary)


def timeline(entries: Iterable[HistoryStateEntry]) -> Iterator[str]:
    """The entries as text for a person: per event, a line with the recorded
    time, version, type, status (or its change) and cause, and an indented
    line with the fields it changed."""
    for entry in entries:
        status_change = entry.changes.get("status")
        if status_change is not None and status_change.before is not None:
            status = f"{status_change.before} → {status_change.after}"
        else:
            status = entry.state.status
        when = entry.recorded_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        cause = entry.caused_by.summary if entry.caused_by else "no cause recorded"
        yield f"{when}  v{entry.version:<3} {entry.type:<32} {status:<20} {cause}"
        first = entry.version == 1
        shown = [
            f"{name}: {_compact(name, change.after)}"
            if first
            else f"{name}: {_compact(name, change.before)} → {_compact(name, change.after)}"
            for name, change in entry.changes.items()
            if not (name == "status" or (first and name in ("id", "created_at")))
        ]
        if shown:
            yield "    " + "; ".join(shown)


def _compact(name: str, value: Any, width: int = 60) -> str:
    if value is None:
        return "—"
    if name == "activation_codes":  # which exist; the codes themselves are not shown
        value = [code["index"] for code in value]
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"
