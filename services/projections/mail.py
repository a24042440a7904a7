"""The mail projection: one job in the outbox for each mail a buyer should
get, sent by `services.outbound.mail.Mailer`.

A mail describes its entitlement as it stands once the change that caused
the mail is complete: one provider event, admin request or scheduled
settlement (a cause) records several events of an entitlement in a row
(an invoice creates it PENDING and then activates it), and the job's
payload is the entitlement after the last of them in the batch, not
after the event that happened to trigger the mail.

Which change calls for which template (those configured):
- `entitlement.created`, the buyer's license mail (the code, the seats,
  how long it is paid for): when the entitlement is first ACTIVE with a
  customer address, i.e. a change that leaves it ACTIVE with an address
  and found it otherwise: new, PENDING (its first payment failed), ACTIVE
  with no address yet (Stripe's `customer.subscription.created`, which
  names no address, came before the invoice), or lapsed before it was
  ever ACTIVE here (an invoice for a period already over creates it
  EXPIRED; a later payment reinstates it). Its message id (below) makes
  it once per entitlement: a license that lapses and comes back is not
  mailed again. An entitlement that never gets paid for never gets it: a
  "your license" mail for a license that does not work would be wrong,
  and the code is of no use before it does. (One ACTIVE before mail was
  turned on gets it if it comes back to ACTIVE from a lapse.)
- `entitlement.overdue`, `.suspended`, `.canceled`: a change with that
  event, unless the entitlement was PENDING before it (a license that
  never started cannot lapse, and its buyer was never told of one).

A job's message id is "<entitlement id>/<template>": a mail is sent once
per entitlement and template, whatever restarts, replays or a second such
change (a second overdue spell) happen. Jobs are saved in one transaction
with the projection's position.

A new projection (no saved position) starts at the end of the log, not at
its beginning: turning mail on for an engine with a history must not mail
every buyer it ever had.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any
from uuid import UUID

import anyio

from domain.entitlement import Status, event_type
from services.config import EmailSettings
from services.outbound.mail import CHANNEL, KIND, payload
from services.outbound.outbox import Job, Outbox
from services.projections.follower import Change

MAIL = "mail"
#: The license mail's template; the others are named after their event.
CREATED = "entitlement.created"
ACTIVE, PENDING = Status.ACTIVE.value, Status.PENDING.value


def _runs(changes: list[Change]) -> list[list[Change]]:
    """The batch's entitlement changes as runs, in the order each run
    starts: one run per entitlement and cause, its consecutive events of
    that entitlement with the same cause (other aggregates' events may come
    between). A run split by a batch's end is two runs."""
    runs: list[list[Change]] = []
    open_runs: dict[UUID, tuple[Any, list[Change]]] = {}
    for change in changes:
        if change.entitlement is None or change.event is None:
            continue
        cause = getattr(change.event, "cause", None)
        key = tuple(sorted(cause.items())) if isinstance(cause, dict) else None
        current = open_runs.get(change.entitlement.id)
        if current is not None and key is not None and current[0] == key:
            current[1].append(change)
            continue
        run = [change]
        open_runs[change.entitlement.id] = (key, run)
        runs.append(run)
    return runs


def mail_projection(
    outbox: Outbox, email: EmailSettings | None, head: Callable[[], int], wake: Callable[[], None]
) -> list[MailProjection]:
    """The mail projection, if mail is configured."""
    return [] if email is None else [MailProjection(outbox, email.templates, head, wake)]


class MailProjection:
    name = MAIL

    def __init__(
        self,
        outbox: Outbox,
        templates: Collection[str],
        head: Callable[[], int],
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        """`templates`: the configured templates (event types); `head`: the
        log's last position (where a new projection starts); `wake`: tells
        the dispatcher there are new jobs. Saves the start position at once
        (blocking), so events stored while the projector starts are mailed."""
        self.outbox = outbox
        self.read_model = outbox.read_model
        self.templates = frozenset(templates)
        self._wake = wake
        if not self._saved():
            self.outbox.commit(self.name, [], head())

    def _saved(self) -> bool:
        with self.read_model.transaction(write=False) as cur:
            cur.execute(
                self.read_model.sql("SELECT 1 FROM entitle_read_positions WHERE name = ?"),
                (self.name,),
            )
            return cur.fetchone() is not None

    def position(self) -> int:
        return self.read_model.position(self.name)

    def jobs(self, changes: list[Change]) -> list[Job]:
        jobs: dict[str, Job] = {}
        for run in _runs(changes):
            described = run[-1]
            view = described.entitlement
            assert view is not None  # _runs takes entitlement changes only
            if not view.customer.email:
                continue
            for template in self._templates(run):
                message_id = f"{view.id}/{template}"
                jobs.setdefault(
                    message_id,
                    Job.of(
                        channel=CHANNEL,
                        kind=KIND,
                        message_id=message_id,
                        type=template,
                        ordering_key=str(view.id),
                        seq=described.position,
                        payload=payload(view.customer.email, template, view),
                        ordered=False,
                    ),
                )
        return list(jobs.values())

    def _templates(self, run: list[Change]) -> list[str]:
        """The configured templates a run of one cause's changes to an
        entitlement calls for (rules in the module docstring)."""
        first, after = run[0], run[-1].entitlement
        assert after is not None
        before = first.previous_status
        found = []
        if (
            after.status == ACTIVE
            and after.customer.email
            and not (before == ACTIVE and first.previous_email)
        ):
            found.append(CREATED)
        if before not in (None, PENDING):  # a license that started
            found += [event_type(change.event) for change in run]
        return [t for t in dict.fromkeys(found) if t in self.templates]

    async def project(self, changes: list[Change], position: int) -> None:
        jobs = self.jobs(changes)
        await anyio.to_thread.run_sync(self.outbox.commit, self.name, jobs, position)
        if jobs:
            self._wake()
