"""Published schemas change only deliberately: re-export with `python -m contracts`."""

from __future__ import annotations

import pytest

from contracts import PUBLISHED, SCHEMA_DIR, render_schema


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_committed_schema_matches_the_model(name: str) -> None:
    committed = (SCHEMA_DIR / name).read_text()
    assert committed == render_schema(PUBLISHED[name]), (
        f"contracts/schemas/{name} differs from its model: if the change is deliberate, "
        "bump the version where it breaks consumers and run `python -m contracts`"
    )


def test_every_schema_file_is_published() -> None:
    assert {p.name for p in SCHEMA_DIR.glob("*.json")} == set(PUBLISHED)
