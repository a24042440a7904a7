"""The neutral billing event: what any billing system can send to a source of
provider `standard` (signed as Standard Webhooks), so it integrates without
an adapter of its own.

    POST /webhooks/<source>
    webhook-id: msg_…            webhook-timestamp: 1767225600
    webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">

    {"id": "evt_1", "type": "payment.succeeded", "timestamp": "2026-01-01T00:00:00Z",
     "data": {"payment": {"id": "pay_1", "subscription_id": "sub_1",
                          "period_start": "…", "period_end": "…",
                          "items": [{"sku": "pro", "quantity": 1}]}}}
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

BillingEventType = Literal[
    "subscription.updated",
    "subscription.canceled",
    "payment.succeeded",
    "payment.failed",
    "payment.refunded",
    "payment.disputed",
]


class BillingItemV1(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(
        default=None,
        description="The item's stable id within the subscription (kept across plan changes); "
        "defaults to the sku",
    )
    sku: str | None = Field(default=None, description="Our offering sku")
    price: str | None = Field(
        default=None, description="Your price id, mapped by the offering's prices.standard"
    )
    quantity: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _sku_or_price(self) -> BillingItemV1:
        if not self.sku and not self.price:
            raise ValueError("an item needs a sku or a price")
        return self


class BillingCustomerV1(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    email: str | None = None


class BillingSubscriptionV1(BaseModel):
    """The subscription as the billing system sees it now (the newest
    `timestamp` wins over older ones, whatever order they arrive in)."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    status: Literal[
        "pending", "trialing", "active", "past_due", "paused", "suspended", "canceled", "expired"
    ]
    items: list[BillingItemV1] = Field(default_factory=list)
    customer: BillingCustomerV1 | None = None
    current_period_start: AwareDatetime | None = None
    current_period_end: AwareDatetime | None = Field(
        default=None, description="Paid through this time when status is active"
    )
    trial_end: AwareDatetime | None = None
    cancel_at: AwareDatetime | None = Field(default=None, description="A scheduled cancellation")


class BillingDisputeV1(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    status: Literal["open", "won", "lost"]


class BillingPaymentV1(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, description="The payment (or invoice) id")
    subscription_id: str | None = Field(
        default=None,
        description="The subscription it pays; required for payment.failed. A "
        "payment.succeeded without one is a one-off sale: each item grants one period of "
        "its offering from period_start (or the event's timestamp), or until period_end",
    )
    items: list[BillingItemV1] = Field(default_factory=list)
    period_start: AwareDatetime | None = None
    period_end: AwareDatetime | None = None
    customer: BillingCustomerV1 | None = None
    refund: Literal["full", "partial"] | None = Field(
        default=None, description="payment.refunded: how much of the payment was refunded"
    )
    dispute: BillingDisputeV1 | None = Field(default=None, description="payment.disputed")


class BillingDataV1(BaseModel):
    model_config = ConfigDict(extra="ignore")

    subscription: BillingSubscriptionV1 | None = None
    payment: BillingPaymentV1 | None = None


class BillingEventV1(BaseModel):
    """One thing that happened in the billing system."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, description="Unique per event; the same on every retry")
    type: BillingEventType
    timestamp: AwareDatetime = Field(description="When it happened in the billing system")
    data: BillingDataV1

    @model_validator(mode="after")
    def _data_fits_type(self) -> BillingEventV1:
        subscription, payment = self.data.subscription, self.data.payment
        if self.type.startswith("subscription.") and subscription is None:
            raise ValueError(f"{self.type} needs data.subscription")
        if self.type.startswith("payment.") and payment is None:
            raise ValueError(f"{self.type} needs data.payment")
        if self.type in ("payment.succeeded", "payment.failed"):
            assert payment is not None
            if not payment.items:
                raise ValueError(f"{self.type} needs payment.items")
            if self.type == "payment.failed" and not payment.subscription_id:
                raise ValueError("payment.failed needs payment.subscription_id")
            if (
                self.type == "payment.succeeded"
                and payment.subscription_id
                and payment.period_end is None
            ):
                raise ValueError("payment.succeeded of a subscription needs payment.period_end")
        if self.type == "payment.refunded" and (payment is None or payment.refund is None):
            raise ValueError("payment.refunded needs payment.refund ('full' or 'partial')")
        if self.type == "payment.disputed" and (payment is None or payment.dispute is None):
            raise ValueError("payment.disputed needs payment.dispute")
        return self
