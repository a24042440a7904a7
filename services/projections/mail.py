"""The mail projection: one job in the outbox for each mail a buyer should
get, sent by `services.outbound.mail.Mailer`.

A change whose event type has a configured template (`entitlement.created`
by default) and whose entitlement has a customer e-mail becomes one job on
channel "mail", whose message id is "<entitlement id>/<event type>": a mail
is sent once per entitlement and template, whatever restarts, replays or a
second such event (a second overdue spell) happen. Jobs are saved in one
transaction with the projection's position.

A new projection (no saved position) starts at the end of the log, not at
its beginning: turning mail on for an engine with a history must not mail
every buyer it ever had.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import anyio

from domain.entitlement import event_type
from services.config import EmailSettings
from services.outbound.mail import CHANNEL, KIND, payload
from services.outbound.outbox import Job, Outbox
from services.projections.follower import Change

MAIL = "mail"


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
        """`templates`: the event types that send mail; `head`: the log's
        last position (where a new projection starts); `wake`: tells the
        dispatcher there are new jobs. Saves the start position at once
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
        jobs = []
        for change in changes:
            view = change.entitlement
            if view is None or change.event is None:
                continue
            template = event_type(change.event)
            if template not in self.templates or not view.customer.email:
                continue
            jobs.append(
                Job.of(
                    channel=CHANNEL,
                    kind=KIND,
                    message_id=f"{view.id}/{template}",
                    type=template,
                    ordering_key=str(view.id),
                    seq=change.position,
                    payload=payload(view.customer.email, template, view),
                    ordered=False,
                )
            )
        return jobs

    async def project(self, changes: list[Change], position: int) -> None:
        jobs = self.jobs(changes)
        await anyio.to_thread.run_sync(self.outbox.commit, self.name, jobs, position)
        if jobs:
            self._wake()
