"""Messages and API bodies that cross a process boundary.

Each model carries its schema version. Changing one is a deliberate act:
`python -m contracts` re-exports the JSON Schemas under `contracts/schemas/`,
and a test fails while the committed schemas differ from the models.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from contracts.api import (
    AdminAction,
    DeadLetterList,
    DeadLetterView,
    EntitlementAsOfView,
    EntitlementList,
    EntitlementView,
    Error,
    History,
    HistoryWithState,
    ProjectionErrorList,
    Readiness,
    ReceiptList,
    ReceiptView,
)
from contracts.billing import BillingEventV1
from contracts.events import EntitlementEventV1
from contracts.license_file import KeysV1, LicenseFileV1
from contracts.licensing import (
    Activation,
    ActivationRequest,
    Portal,
    ValidationRequest,
    ValidationResult,
)
from contracts.outbound import (
    DeliveryList,
    EndpointCreate,
    EndpointPatch,
    EndpointView,
    OrderCreatedV1,
    OutboundMessageV1,
    PingV1,
)
from contracts.state import EntitlementStateV1
from contracts.webhooks import DeadLetterV1, RawLogMarkerV1, RawWebhookV1

SCHEMA_DIR = Path(__file__).parent / "schemas"

#: file name -> model, for every published schema.
PUBLISHED: dict[str, type[BaseModel]] = {
    "webhook-raw.v1.json": RawWebhookV1,
    "webhook-raw-log-marker.v1.json": RawLogMarkerV1,
    "webhook-dead-letter.v1.json": DeadLetterV1,
    "entitlement-event.v1.json": EntitlementEventV1,
    "entitlement-state.v1.json": EntitlementStateV1,
    "api-entitlement.v1.json": EntitlementView,
    "api-entitlement-list.v1.json": EntitlementList,
    "api-history.v1.json": History,
    "api-entitlement-as-of.v1.json": EntitlementAsOfView,
    "api-history-with-state.v1.json": HistoryWithState,
    "api-dead-letter.v1.json": DeadLetterView,
    "api-dead-letter-list.v1.json": DeadLetterList,
    "api-error.v1.json": Error,
    "api-webhook-receipt.v1.json": ReceiptView,
    "api-webhook-receipt-list.v1.json": ReceiptList,
    "api-projection-error-list.v1.json": ProjectionErrorList,
    "api-readiness.v1.json": Readiness,
    "api-admin-action.v1.json": AdminAction,
    "billing-event.v1.json": BillingEventV1,
    "licensing-activation-request.v1.json": ActivationRequest,
    "licensing-activation.v1.json": Activation,
    "licensing-validation-request.v1.json": ValidationRequest,
    "licensing-validation-result.v1.json": ValidationResult,
    "license-file.v1.json": LicenseFileV1,
    "license-keys.v1.json": KeysV1,
    "licensing-portal.v1.json": Portal,
    "outbound-message.v1.json": OutboundMessageV1,
    "outbound-order-created.v1.json": OrderCreatedV1,
    "outbound-ping.v1.json": PingV1,
    "api-webhook-endpoint.v1.json": EndpointView,
    "api-webhook-endpoint-create.v1.json": EndpointCreate,
    "api-webhook-endpoint-patch.v1.json": EndpointPatch,
    "api-delivery-list.v1.json": DeliveryList,
}


def describe(exc: ValidationError) -> str:
    """What was wrong with a message or body, field by field."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )


def render_schema(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def export_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in PUBLISHED.items():
        path = directory / name
        path.write_text(render_schema(model))
        written.append(path)
    return written
