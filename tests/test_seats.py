"""A seat's own routes (release, heartbeat, license file) need its credential;
revoking a code takes its seats; ids of other aggregates are no seat or
entitlement; seat routes and wrong admin keys are rate-limited per client;
access logs never show a code or a seat secret."""

from __future__ import annotations

import json
import logging
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

from domain.entitlement import (
    Cause,
    Entitlement,
    Refused,
    code_hash,
    order_id,
    seat_secret_hash,
)
from services.codes import SEAT_SECRET, new_seat_secret
from services.http import MaskCodes
from services.projections import entitlement_view
from services.store import EntitlementStore
from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.lifecycle_world import T0, World
from tests.test_dev import ADMIN, AUTH
from tests.test_licensing import CONFIG as LICENSING_CONFIG
from tests.test_licensing import bearer, new_entitlement
from tests.test_lifecycle import paid
from tests.test_store import CODES, record, service

# Small bursts, so that a test reaches them quickly, and slow refills, so
# that a slow machine does not refill them between two requests; each test
# sends from addresses of its own (X-Forwarded-For: the stack trusts 127.0.0.1).
CONFIG = (
    LICENSING_CONFIG
    + """
licensing: {seat_per_address_per_second: 0.05, seat_per_address_burst: 30}
admin: {failed_auth_per_second: 0.25, failed_auth_burst: 3}
"""
)


# -- the domain -------------------------------------------------------------------


def two_codes() -> tuple[Entitlement, str, str]:
    world = World()
    world.deliver(paid(0, "pro"))  # 5 seats
    entitlement = world.only()
    [first] = entitlement.codes
    entitlement.issue_code(lambda e, n: f"second-{e}-{n}", "ops", "issue", T0)
    [second] = [h for h in entitlement.codes if h != first]
    return entitlement, first, second


def test_a_seat_opens_with_its_own_secret_or_the_code_that_opened_it_only() -> None:
    entitlement, first, second = two_codes()
    secret = new_seat_secret()
    at = T0 + timedelta(minutes=1)
    entitlement.activate(first, "dev-a", None, "seat-a", "r1", at, None, seat_secret_hash(secret))
    other = seat_secret_hash(new_seat_secret())
    assert entitlement.opens_seat("seat-a", code_hash(secret), seat_secret_hash(secret))
    assert entitlement.opens_seat("seat-a", first, other)
    assert not entitlement.opens_seat("seat-a", second, other)  # the entitlement's other code
    assert not entitlement.opens_seat("seat-b", first, seat_secret_hash(secret))
    # The same device again keeps its seat and its secret.
    again = entitlement.activate(first, "dev-a", None, "seat-x", "r2", at, None, other)
    assert again == ("seat-a", False)
    assert entitlement.opens_seat("seat-a", first, seat_secret_hash(secret))
    assert not entitlement.opens_seat("seat-a", second, other)


def test_revoking_a_code_releases_the_seats_it_opened_and_says_why() -> None:
    entitlement, first, second = two_codes()
    at = T0 + timedelta(minutes=1)
    entitlement.activate(first, "dev-a", None, "seat-a", "r1", at)
    entitlement.activate(second, "dev-b", None, "seat-b", "r2", at)
    entitlement.collect_events()
    entitlement.revoke_code(0, "ops", "revoke", at)
    events = entitlement.collect_events()
    assert [type(e).__name__ for e in events] == ["CodeRevoked", "SeatReleased"]
    released = events[1]
    assert (released.seat_id, released.reason) == ("seat-a", "code_revoked")  # type: ignore[attr-defined]
    assert released.cause == {"kind": "admin", "source": "ops", "event_id": "revoke"}  # type: ignore[attr-defined]
    assert list(entitlement.activations) == ["seat-b"]
    assert not entitlement.holds_seat("dev-a", at) and entitlement.holds_seat("dev-b", at)


def test_a_seat_kept_when_its_code_was_revoked_before_no_longer_counts() -> None:
    """A store written before revoking released seats: the seat is still
    there, its code is not. It validates nowhere and frees itself when a
    device needs a seat."""
    entitlement, first, second = two_codes()
    at = T0 + timedelta(minutes=1)
    entitlement.activate(first, "dev-a", None, "seat-a", "r1", at)
    # What revoke_code recorded before it released seats: the revocation alone.
    entitlement._record(
        Entitlement.CodeRevoked, Cause.admin("ops", "old"), at, code_hash=first, index=0
    )
    assert "seat-a" in entitlement.activations
    assert entitlement.seat_in_force("seat-a", at) is None
    assert not entitlement.holds_seat("dev-a", at)
    assert entitlement_view(entitlement).activations == []
    with pytest.raises(Refused):
        entitlement.heartbeat("seat-a", None, "h1", at)
    entitlement.collect_events()
    assert entitlement.activate(second, "dev-b", None, "seat-b", "r2", at) == ("seat-b", True)
    released = [e for e in entitlement.collect_events() if type(e).__name__ == "SeatReleased"]
    assert [(e.seat_id, e.reason) for e in released] == [("seat-a", "code_revoked")]  # type: ignore[attr-defined]
    assert list(entitlement.activations) == ["seat-b"]


def test_a_seat_stored_before_seats_had_secrets_loads_and_opens_with_its_code(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = EntitlementStore(url)
    event = se.invoice_paid(
        subscription="sub_old_seat",
        shape=se.LEGACY,
        lines=[
            {"price": "p", "sku": "better_annual", "start": 1_800_000_000, "end": 1_830_000_000}
        ],
    )
    service(store).process([record(0, event)])
    [entitlement_id] = [
        n.originator_id
        for n in store.process_recorder.select_notifications(1, 100)
        if n.topic.endswith("Entitlement.Created")
    ]
    code = CODES.hash(entitlement_id, 0)
    store.change(
        entitlement_id,
        lambda e: e.activate(code, "dev", None, "seat-old", "r1", e.modified_on, None, "x" * 64),
    )
    store.close()
    with sqlite3.connect(tmp_path / "old.db") as db:
        [(rowid, state)] = db.execute(
            "SELECT rowid, state FROM stored_events WHERE topic LIKE '%Entitlement.SeatActivated'"
        ).fetchall()
        data = json.loads(state)
        del data["secret_hash"]  # as version 1 stored it
        data.pop("class_version")
        db.execute(
            "UPDATE stored_events SET state = ? WHERE rowid = ?", (json.dumps(data).encode(), rowid)
        )
    entitlement = EntitlementStore(url).find(entitlement_id, Entitlement)
    assert entitlement is not None
    assert entitlement.activations["seat-old"]["secret_hash"] is None
    assert entitlement.opens_seat("seat-old", code, seat_secret_hash("anything"))
    assert not entitlement.opens_seat("seat-old", "other", seat_secret_hash("x" * 64))


# -- the HTTP API on a real store ---------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Entitle]:
    workdir = tmp_path_factory.mktemp("seats")
    (workdir / "entitle.yaml").write_text(CONFIG)
    env = {"ENTITLE_ADMIN_KEYS": ADMIN}
    with Database(request) as url:
        if url is not None:
            env["ENTITLE_DATABASE_URL"] = url
        # Debug: the access log is on, and the tests read it.
        with Entitle(["dev", "--log-level", "debug"], workdir, env) as entitle:
            yield entitle


class Database:
    """A fresh PostgreSQL database for the module's stack (none for SQLite)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.name = f"entitle_test_{uuid.uuid4().hex[:12]}"
        self.server: str | None = None

    def __enter__(self) -> str | None:
        if self.request.param != "postgres":
            return None
        self.server = self.request.getfixturevalue("postgres_server")
        with psycopg.connect(self.server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return f"{self.server.rpartition('/')[0]}/{self.name}"

    def __exit__(self, *_: object) -> None:
        if self.server is not None:
            with psycopg.connect(self.server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def client(stack: Entitle) -> httpx.Client:
    """A client at an address of its own (so its rate limits are its own)."""
    address = f"2001:db8:{secrets.token_hex(2)}:{secrets.token_hex(2)}::1"  # a /64 of its own
    return httpx.Client(base_url=stack.url, headers={"X-Forwarded-For": address})


def activate(http: httpx.Client, code: str, fingerprint: str) -> dict[str, Any]:
    answer = http.post(
        "/v1/activations", json={"activation_code": code, "fingerprint": fingerprint}
    )
    assert answer.status_code == 201, answer.text
    seat: dict[str, Any] = answer.json()
    return seat


def assert_no_seat(response: httpx.Response, seat_id: str) -> None:
    """The one 404 for a seat that is not there or not opened by the credential."""
    assert response.status_code == 404, response.text
    assert response.json() == {
        "error": "NOT_FOUND",
        "detail": f"no seat {seat_id} is in use",
        "status": 404,
    }


@pytest.mark.e2e
def test_a_seats_routes_need_its_secret_or_the_code_that_opened_it(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_seat_cred")
    code = item["activation_code"]
    other = new_entitlement(stack, "sub_seat_cred_other")["activation_code"]
    with client(stack) as http:
        seat = activate(http, code, "laptop")
        secret = seat["secret"]
        assert SEAT_SECRET.fullmatch(secret), secret
        # The secret is answered once: the same device again gets its seat without it.
        again = http.post(
            "/v1/activations", json={"activation_code": code, "fingerprint": "laptop"}
        )
        assert (again.status_code, again.json()["id"], again.json()["secret"]) == (
            200,
            seat["id"],
            None,
        )
        second = http.post(f"/v1/entitlements/{item['id']}/codes", headers=AUTH).json()["code"]
        seat_routes = [
            ("POST", f"/v1/activations/{seat['id']}/license-file"),
            ("POST", f"/v1/activations/{seat['id']}/heartbeat"),
            ("DELETE", f"/v1/activations/{seat['id']}"),
        ]
        for method, path in seat_routes:
            missing = http.request(method, path)
            assert missing.status_code == 401, (path, missing.text)
            assert missing.json()["error"] == "unauthorized"
            assert "Bearer" in missing.json()["detail"]
            assert missing.headers["WWW-Authenticate"] == "Bearer"
            for wrong in (new_seat_secret(), other, second, "Bearer", secret[:-1]):
                assert_no_seat(http.request(method, path, headers=bearer(wrong)), seat["id"])
        # A wrong credential answers as a seat that does not exist.
        unknown = f"{item['id']}.{secrets.token_hex(8)}"
        assert_no_seat(
            http.post(f"/v1/activations/{unknown}/heartbeat", headers=bearer(code)), unknown
        )
        assert (
            http.delete(f"/v1/activations/{seat['id']}", headers=bearer(other)).status_code == 404
        )
        # Still held: the wrong credentials changed nothing.
        assert stack_holds(http, code, "laptop")
        typed = code.lower().replace("-", " ")  # the code however it is typed
        for credential in (secret, typed):
            issued = http.post(
                f"/v1/activations/{seat['id']}/license-file", headers=bearer(credential)
            )
            assert issued.status_code == 200, issued.text
            assert issued.json()["license"]["activation_id"] == seat["id"]
            beat = http.post(f"/v1/activations/{seat['id']}/heartbeat", headers=bearer(credential))
            assert beat.json() == {"id": seat["id"], "lease_until": None}
        released = http.delete(f"/v1/activations/{seat['id']}", headers=bearer(secret))
        assert released.status_code == 204
        assert_no_seat(
            http.delete(f"/v1/activations/{seat['id']}", headers=bearer(secret)), seat["id"]
        )
        assert not stack_holds(http, code, "laptop")
    assert secret not in stack.text  # not in any log line


def stack_holds(http: httpx.Client, code: str, fingerprint: str) -> bool:
    answer = http.post("/v1/validate", json={"activation_code": code, "fingerprint": fingerprint})
    return bool(answer.json()["code"] == "VALID")


@pytest.mark.e2e
def test_revoking_a_code_releases_its_seats_everywhere(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_seat_revoke")  # team: 2 seats
    first = item["activation_code"]
    with client(stack) as http:
        issued = http.post(f"/v1/entitlements/{item['id']}/codes", headers=AUTH)
        second = issued.json()["code"]
        a = activate(http, first, "dept-a-pc")
        b = activate(http, second, "dept-b-pc")
        revoked = http.delete(f"/v1/entitlements/{item['id']}/codes/0", headers=AUTH)
        assert revoked.status_code == 200, revoked.text
        assert [s["id"] for s in revoked.json()["activations"]] == [b["id"]]
        # The revoked code's seat is gone, whichever credential is used.
        for credential in (a["secret"], first):
            for path in ("license-file", "heartbeat"):
                response = http.post(
                    f"/v1/activations/{a['id']}/{path}", headers=bearer(credential)
                )
                assert_no_seat(response, a["id"])
            response = http.delete(f"/v1/activations/{a['id']}", headers=bearer(credential))
            assert_no_seat(response, a["id"])

        def validated(code: str, fingerprint: str) -> str:
            body = {"activation_code": code, "fingerprint": fingerprint}
            return str(http.post("/v1/validate", json=body).json()["code"])

        assert validated(first, "dept-a-pc") == "NOT_FOUND"
        assert validated(second, "dept-a-pc") == "NO_SEAT"
        assert validated(second, "dept-b-pc") == "VALID"
        ok = http.post(f"/v1/activations/{b['id']}/license-file", headers=bearer(b["secret"]))
        assert ok.status_code == 200
        # The seat is free for another device of the code that remains.
        activate(http, second, "dept-b-laptop")
        # The read model (what a restarted API process would load) agrees.
        view = eventually(
            lambda: (
                (v := http.get(f"/v1/entitlements/{item['id']}", headers=AUTH).json())
                and {s["fingerprint"] for s in v["activations"]} == {"dept-b-pc", "dept-b-laptop"}
                and v
            ),
            timeout=10,
        )
        assert [c["index"] for c in view["activation_codes"]] == [1]
        portal = http.get("/v1/portal", params={"activation_code": second}).json()
        assert len(portal["seats"]) == 2
        history = http.get(f"/v1/entitlements/{item['id']}/history", headers=AUTH).json()
        releases = [e for e in history["events"] if e["type"] == "entitlement.seat_released"]
        assert [
            (e["data"]["seat_id"], e["data"]["reason"], e["cause"]["kind"]) for e in releases
        ] == [(a["id"], "code_revoked", "admin")]


ADMIN_ROUTES = [
    ("GET", "/v1/entitlements/{id}", None),
    ("GET", "/v1/entitlements/{id}/history", None),
    ("POST", "/v1/entitlements/{id}/codes", None),
    ("DELETE", "/v1/entitlements/{id}/codes/0", None),
    ("POST", "/v1/entitlements/{id}/suspend", {"reason": "check"}),
    ("POST", "/v1/entitlements/{id}/reinstate", {"reason": "check"}),
    ("POST", "/v1/entitlements/{id}/cancel", {"reason": "check"}),
    ("POST", "/v1/entitlements/{id}/extend", {"reason": "check", "days": 3}),
]


@pytest.mark.e2e
def test_an_orders_id_is_no_entitlement_and_no_seat(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_seat_order")
    order = order_id("stripe-main", "sub_seat_order")  # the order holding the entitlement
    with client(stack) as http:
        for method, path, body in ADMIN_ROUTES:
            response = http.request(method, path.format(id=order), json=body, headers=AUTH)
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"] == "not_found", path
            assert str(order) in response.json()["detail"]
        seat = f"{order}.{secrets.token_hex(8)}"
        code = bearer(item["activation_code"])
        for method, path in [
            ("POST", f"/v1/activations/{seat}/license-file"),
            ("POST", f"/v1/activations/{seat}/heartbeat"),
            ("DELETE", f"/v1/activations/{seat}"),
        ]:
            assert_no_seat(http.request(method, path, headers=code), seat)


@pytest.mark.e2e
def test_seat_routes_are_rate_limited_per_client_address(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_seat_limit")
    with client(stack) as http:
        seat = activate(http, item["activation_code"], "busy-device")
        path = f"/v1/activations/{seat['id']}/license-file"
        answers = [http.post(path, headers=bearer(seat["secret"])) for _ in range(45)]
        statuses = [a.status_code for a in answers]
        assert statuses[:25] == [200] * 25  # the burst of 30
        limited = [a for a in answers if a.status_code == 429]
        assert limited, statuses
        assert limited[0].json()["error"] == "rate_limited"
        assert int(limited[0].headers["Retry-After"]) >= 1
        # Heartbeats and releases share the bucket, credentials or not.
        assert http.post(f"/v1/activations/{seat['id']}/heartbeat").status_code == 429
        assert http.delete(f"/v1/activations/{seat['id']}").status_code == 429
        # Validation has a bucket of its own.
        body = {"activation_code": item["activation_code"], "fingerprint": "busy-device"}
        assert http.post("/v1/validate", json=body).json()["code"] == "VALID"
    with client(stack) as other:  # another client is not held back
        assert other.post(path, headers=bearer(seat["secret"])).status_code == 200


@pytest.mark.e2e
def test_wrong_admin_keys_lock_the_address_out_for_a_while(stack: Entitle) -> None:
    wrong = {"Authorization": "Bearer ek_guess"}
    with client(stack) as http:
        answers = []
        for _ in range(20):  # a burst of 3, then one more every 4 s
            answers.append(http.get("/v1/entitlements", headers=wrong))
            if answers[-1].status_code == 429:
                break
        assert [a.status_code for a in answers[:3]] == [401] * 3
        locked = answers[-1]
        assert locked.status_code == 429, [a.status_code for a in answers]
        assert locked.json()["error"] == "rate_limited"
        # Locked out: the right key too, so that a guess cannot be confirmed.
        right = http.get("/v1/entitlements", headers=AUTH)
        assert right.status_code == 429
        time.sleep(int(right.headers["Retry-After"]))
        assert http.get("/v1/entitlements", headers=AUTH).status_code == 200
    with client(stack) as other:
        # Requests without a key are not guesses: they are not counted.
        assert [other.get("/v1/entitlements").status_code for _ in range(6)] == [401] * 6
        assert other.get("/v1/entitlements", headers=AUTH).status_code == 200


@pytest.mark.e2e
def test_the_access_log_shows_neither_codes_nor_seat_secrets(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_seat_log")
    code = item["activation_code"]
    with client(stack) as http:
        seat = activate(http, code, "logged-device")
        secret = seat["secret"]
        names = [
            "activation_code",
            "activation%5Fcode",
            "%61ctivation_code",
            "ACTIVATION_CODE",
            "Activation%5fCode",
            "activation%255Fcode",  # encoded twice
            "activation+code",
        ]
        for name in names:
            http.get(f"/v1/portal?{name}={quote(code)}")
            http.get(f"/v1/usage?x=1&{name}={code.lower().replace('-', '+')}")
        http.get(f"/v1/portal?token={secret}")
        http.get(f"/v1/portal?token={quote(secret, safe='')}&a=%65s%5F{secret[3:]}")
        http.post(f"/v1/activations/{secret}/heartbeat")
        http.get(f"/v1/portal/%65s_{secret[3:]}")
        http.get("/v1/portal?marker=done", headers={"X-Request-Id": "marker-done"})
    eventually(lambda: "id=marker-done" in stack.text, timeout=5)
    # One line a request, naming its route (the template), never its query
    # or the ids in its path; a path no route matched is masked.
    lines = [line for line in stack.output if "entitle.access" in line]
    assert any(" GET /v1/portal 4" in line for line in lines), lines
    assert any(" POST /v1/activations/{id}/heartbeat " in line for line in lines), lines
    assert any(" GET /v1/portal/es_… 404 " in line for line in lines), lines
    text = stack.text
    plain = code.replace("-", "")
    for whole in (code, plain, plain.lower(), code.lower(), quote(code)):
        assert whole not in text
    assert not re.search("-".join([re.escape(g) for g in code.split("-")[1:3]]), text)
    for leaked in (secret, secret[3:], secret[3:30]):
        assert leaked not in text


def test_masking_uses_the_real_access_logger() -> None:
    """uvicorn's access logger, with the filter `entitle` installs on it."""
    logger = logging.getLogger("uvicorn.access")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler, masking = Collect(), MaskCodes()
    logger.addFilter(masking)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    code, secret = "7K3QD-ABCDE-FGHJK-MNPQR-STVWX", new_seat_secret()
    paths = [
        f"/v1/portal?activation%5Fcode={code}",
        f"/v1/portal?%61ctivation_code={code}",
        f"/v1/portal?AcTiVaTiOn_CoDe={code.lower()}",
        "/v1/portal?activation_code=7K3QD+ABCDE+FGHJK&x=1",
        f"/v1/activations/{secret}/heartbeat",
        f"/v1/activations/x/heartbeat?secret={quote(secret, safe='')}",
        f"/v1/x?s=%65%73%5F{secret[3:]}",
        # Codes and secrets under any name, in a path, after other separators.
        f"/webhooks/{code}",
        f"/v1/portal?code={code.replace('-', '').lower()}",
        f"/v1/portal?x=1;activation_code={code}",
        f"/v1/portal?activation_code%3D{code}",
        f"/v1/activations/ES_{secret[3:]}/heartbeat",
    ]
    try:
        for path in paths:
            logger.info('%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "GET", path, "1.1", 200)
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(masking)
        logger.setLevel(level)
    assert len(lines) == len(paths)
    for line in lines:
        assert "ABCDE" not in line and "abcde" not in line and secret[3:12] not in line, line
    assert lines[0] == '1.2.3.4:5 - "GET /v1/portal?activation%5Fcode=7K3QD… HTTP/1.1" 200'
    assert lines[4] == '1.2.3.4:5 - "GET /v1/activations/es_…/heartbeat HTTP/1.1" 200'


@pytest.mark.parametrize(
    ("spellings", "same"),
    [
        (["2001:db8::7", "2001:DB8::7", "2001:db8:0:0:0:0:0:7"], True),
        (["2001:db8::7", "2001:db8::ffff:1"], True),  # one /64: one client
        (["6.6.6.9", "::ffff:6.6.6.9"], True),
        (["2001:db8::7", "2001:db8:0:1::7"], False),
        (["6.6.6.9", "6.6.6.10"], False),
    ],
)
def test_rate_limits_count_a_client_however_its_address_is_written(
    spellings: list[str], same: bool
) -> None:
    from services.http import client_address

    keys = {client_address({"client": (address, 1)}) for address in spellings}
    assert (len(keys) == 1) is same, keys


@pytest.mark.e2e
def test_an_admin_frees_a_seat_and_the_history_says_who(stack: Entitle) -> None:
    item = new_entitlement(stack, "sub_seat_admin")
    with client(stack) as http:
        lost = activate(http, item["activation_code"], "lost-laptop")
        kept = activate(http, item["activation_code"], "desk")
        url = f"/v1/entitlements/{item['id']}/seats/{lost['id']}"
        assert http.delete(url).status_code == 401  # an admin's route
        once = {**AUTH, "Idempotency-Key": "ticket-81"}
        freed = http.delete(url, headers=once)
        assert freed.status_code == 200, freed.text
        assert [s["id"] for s in freed.json()["activations"]] == [kept["id"]]
        assert http.delete(url, headers=once).status_code == 200  # a retry: no second event
        assert http.delete(url, headers=AUTH).status_code == 404  # not in use any more
        # The device's own credential no longer opens it; the other seat still works.
        assert (
            http.post(
                f"/v1/activations/{lost['id']}/heartbeat", headers=bearer(lost["secret"])
            ).status_code
            == 404
        )
        assert (
            http.post(
                f"/v1/activations/{kept['id']}/heartbeat", headers=bearer(kept["secret"])
            ).status_code
            == 200
        )
        history = http.get(f"/v1/entitlements/{item['id']}/history", headers=AUTH).json()
    released = [e for e in history["events"] if e["type"] == "entitlement.seat_released"]
    assert len(released) == 1
    assert released[0]["data"]["reason"] == "released_by_admin"
    assert released[0]["cause"] == {"kind": "admin", "source": "ops", "event_id": "ticket-81"}
