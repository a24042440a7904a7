"""License-file test vectors: the committed file is what the code makes,
the Python verifier gives each expected answer, and so does the JavaScript
verifier (clients/js/verify.mjs) under the machine's Node."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from contracts.license_file import InvalidLicense, license_vectors, verify_license

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "contracts" / "license_file_vectors.json"


def test_the_committed_vectors_are_what_the_code_makes() -> None:
    assert json.loads(VECTORS.read_text()) == json.loads(json.dumps(license_vectors())), (
        "contracts/license_file_vectors.json is stale: run `python -m contracts`"
    )


def test_the_python_verifier_gives_every_expected_answer() -> None:
    vectors = json.loads(VECTORS.read_text())
    assert len(vectors["cases"]) >= 8
    for case in vectors["cases"]:
        got: dict[str, Any]
        try:
            license = verify_license(
                case["token"],
                vectors["public_key"],
                fingerprint=case["fingerprint"],
                now=datetime.fromisoformat(case["now"]),
            )
            got = {"valid": True, "license": license.model_dump(mode="json")}
        except InvalidLicense as exc:
            got = {"valid": False, "error": exc.kind}
        assert got == case["expect"], case["name"]


@pytest.mark.skipif(shutil.which("node") is None, reason="no Node.js on this machine")
def test_the_javascript_verifier_gives_every_expected_answer(tmp_path: Path) -> None:
    script = ROOT / "clients" / "js" / "verify.mjs"
    ran = subprocess.run(
        ["node", str(script), str(VECTORS)], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    cases = json.loads(VECTORS.read_text())["cases"]
    assert f"{len(cases)} of {len(cases)} cases as expected" in ran.stdout
    # It can fail: a vector whose expectation is wrong is reported.
    wrong = json.loads(VECTORS.read_text())
    wrong["cases"][0]["expect"] = {"valid": False, "error": "expired"}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    failed = subprocess.run(
        ["node", str(script), str(tmp_path / "wrong.json")], capture_output=True, text=True
    )
    assert failed.returncode == 1 and "FAIL valid" in failed.stdout


def test_an_edited_file_is_always_invalid_license_never_another_error() -> None:
    vectors = json.loads(VECTORS.read_text())
    header = base64.urlsafe_b64encode(b"[" * 100_000).decode().rstrip("=")
    for token in (f"{header}.e30.AAAA", "", ".", "a.b.c", "\u00e9.\u00e9.\u00e9", "{}", "[]"):
        with pytest.raises(InvalidLicense) as raised:
            verify_license(token, vectors["public_key"])
        assert raised.value.kind == "malformed", token[:20]
