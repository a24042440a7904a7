"""The fault suite, shortened (`bench/soak.py --short`): about 1,000 webhooks
through the four services while the domain service is killed three times,
the projector once, and the database and the broker are cut off. Nothing
acknowledged is lost or applied twice, every stored event is published, and
the entitlements and outcomes are those of the same webhooks delivered in
order without faults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak

pytestmark = pytest.mark.integration


def test_kills_and_outages_lose_nothing_and_change_nothing(postgres_server: str) -> None:
    options = soak.Options.short(postgres=postgres_server)
    report = soak.run(options)
    soak.show(report, options)  # the figures, shown when it fails

    assert report.acknowledged == report.webhooks
    assert report.lost == []
    assert report.double_applied == []
    assert report.public_missing == []
    assert report.differing == []
    assert report.outcomes_differing == []
    assert [r for r in report.recoveries if r.seconds is None] == []
    assert len(report.recoveries) == 10  # each service each fault hit
