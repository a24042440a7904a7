"""Published schemas change only deliberately: re-export with `python -m contracts`."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from contracts import PUBLISHED, SCHEMA_DIR, render_schema
from contracts.licensing import ActivationRequest, ValidationRequest


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_committed_schema_matches_the_model(name: str) -> None:
    committed = (SCHEMA_DIR / name).read_text()
    assert committed == render_schema(PUBLISHED[name]), (
        f"contracts/schemas/{name} differs from its model: if the change is deliberate, "
        "bump the version where it breaks consumers and run `python -m contracts`"
    )


def test_every_schema_file_is_published() -> None:
    assert {p.name for p in SCHEMA_DIR.glob("*.json")} == set(PUBLISHED)


def test_every_entitlement_event_has_a_published_type() -> None:
    """A new domain event must be added to `EventType` (or be `noted`, which
    stays in the history), or the public topic would silently lack it."""
    from domain.entitlement import Entitlement, event_type
    from services.projections import PUBLIC_TYPES

    abstract = {Entitlement.Event, Entitlement.TermsChanged, Entitlement.StandingChanged}
    concrete = [
        value
        for value in vars(Entitlement).values()
        if isinstance(value, type)
        and issubclass(value, Entitlement.Event)
        and value not in abstract
    ]
    assert len(concrete) > 10
    types = {event_type(cls.__new__(cls)) for cls in concrete}
    assert types - PUBLIC_TYPES == {"entitlement.noted"}
    assert PUBLIC_TYPES - types == set()


def test_an_activation_without_a_seat_secret_is_still_a_v1_activation() -> None:
    """`secret` was added to the v1 activation body: clients that never read
    it, and bodies answered before it existed, stay valid."""
    from contracts.licensing import Activation

    before = {
        "id": "5f0c6a3e-3a41-4b55-9a3c-8f7a9a9d3c11.0123456789abcdef",
        "entitlement_id": "5f0c6a3e-3a41-4b55-9a3c-8f7a9a9d3c11",
        "fingerprint": "laptop",
        "label": None,
        "activated_at": "2026-11-30T00:00:00Z",
        "lease_until": None,
    }
    assert Activation.model_validate(before).secret is None
    schema = Activation.model_json_schema()
    assert "secret" in schema["properties"] and "secret" not in schema["required"]


def test_historical_answers_extend_the_current_ones_so_clients_reuse_their_code() -> None:
    """`?as_of` answers an EntitlementView with one more field, and
    `?with_state=true` history entries are HistoryEntries with three more:
    every field a client reads of the plain answers is there, the same."""
    from contracts.api import (
        EntitlementAsOfView,
        EntitlementView,
        HistoryEntry,
        HistoryStateEntry,
    )

    def fields(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema()
        return {name: schema["properties"][name] for name in model.model_fields}

    plain, as_of = fields(EntitlementView), fields(EntitlementAsOfView)
    assert {k: as_of[k] for k in plain} == plain and set(as_of) - set(plain) == {"as_of"}
    assert set(EntitlementAsOfView.model_json_schema()["required"]) >= {"as_of", "id"}
    entry, stateful = fields(HistoryEntry), fields(HistoryStateEntry)
    assert {k: stateful[k] for k in entry} == entry
    assert set(stateful) - set(entry) == {"state", "changes", "caused_by"}


def test_an_entitlement_state_names_any_stored_entitlement_event_and_no_activation_code() -> None:
    """`EntitlementStateV1` (the state topic) follows every entitlement event,
    `entitlement.noted` too, and carries the entitlement as the event topic
    does: without its activation codes."""
    from typing import get_args

    from pydantic import ValidationError

    from contracts.events import EventType
    from contracts.state import EntitlementStateV1

    schema = EntitlementStateV1.model_json_schema()
    assert set(schema["properties"]["event_type"]["enum"]) == set(get_args(EventType)) | {
        "entitlement.noted"
    }
    entitlement = schema["$defs"]["EntitlementV1"]["properties"]
    assert not {"activation_code", "activation_codes", "activations"} & set(entitlement)
    state = {
        "entitlement_id": "5f0c6a3e-3a41-4b55-9a3c-8f7a9a9d3c11",
        "sequence": 3,
        "event_id": "1f94419f-a1c2-5b3a-8c14-9af0c0d5cb59",
        "event_type": "entitlement.noted",
        "updated_at": "2026-11-30T00:00:00Z",
        "entitlement": {
            "id": "5f0c6a3e-3a41-4b55-9a3c-8f7a9a9d3c11",
            "source": "stripe-main",
            "order_ref": "sub_1",
            "offering": "basic",
            "product": "acme",
            "status": "ACTIVE",
            "features": {},
            "limits": {},
            "seats": 1,
            "period_start": None,
            "period_end": None,
            "customer": {},
        },
    }
    parsed = EntitlementStateV1.model_validate(state)
    assert parsed.version == 1 and EntitlementStateV1.model_validate_json(parsed.model_dump_json())
    with pytest.raises(ValidationError):
        EntitlementStateV1.model_validate({**state, "event_type": "entitlement.deleted"})


def test_product_scope_is_an_optional_addition_to_the_v1_licensing_requests() -> None:
    """Requests written before `product` existed are still v1 requests; a
    product's answer for another product's code is a code of its own."""
    old = {"activation_code": "7K3QD-ABCDE", "fingerprint": "dev-1"}
    assert ValidationRequest.model_validate(old).product is None
    assert ActivationRequest.model_validate(old).product is None
    schema = json.loads((SCHEMA_DIR / "licensing-validation-result.v1.json").read_text())
    assert "WRONG_PRODUCT" in json.dumps(schema)
