"""`entitle dev` runs its roles as processes under one supervisor: a role
that dies is started again, one that keeps dying stops the stack with a
line saying so, one Ctrl-C stops them all; `/readyz` and `/metrics` on the
public port speak for the whole stack."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.supervisor import merge_metrics
from tests.harness import Entitle, eventually
from tests.test_dev_accounting import active_refs, send, stack


def role_pids(entitle: Entitle) -> dict[str, int]:
    """The stack's processes by role (web, domain, projector) and broker."""
    assert entitle.process is not None
    pid = entitle.process.pid
    found: dict[str, int] = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with_args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"serve" in with_args:
            roles = with_args[with_args.index(b"serve") + 1]
            found["web" if roles == b"ingress" else roles.decode()] = int(child)
        elif b"broker" in with_args:
            found["broker"] = int(child)
    return found


def all_four(entitle: Entitle) -> dict[str, int] | None:
    pids = role_pids(entitle)
    return pids if len(pids) == 4 else None


@pytest.mark.e2e
def test_a_role_that_dies_is_started_again_and_nothing_is_lost(tmp_path: Path) -> None:
    entitle = stack(tmp_path).start()
    try:
        pids = eventually(lambda: all_four(entitle))
        before = send(entitle, "sub_before_", 5)
        eventually(lambda: active_refs(entitle) == before, timeout=20)

        os.kill(pids["domain"], signal.SIGKILL)
        during = send(entitle, "sub_during_", 5)  # accepted while it is down
        eventually(lambda: "the domain process exited (code -9); starting it again" in entitle.text)
        eventually(lambda: active_refs(entitle) == before | during, timeout=30)
        assert role_pids(entitle)["domain"] != pids["domain"]

        # The whole stack says it is ready again, from the public port.
        ready = eventually(
            lambda: (
                (r := httpx.get(f"{entitle.url}/readyz", timeout=10)).status_code == 200
                and r.json()
            ),
            timeout=30,
        )
        assert ready["roles"] == ["ingress", "domain", "projector", "api"]
        assert {"fold", "database", "index"} <= set(ready["parts"])
        assert any(part.startswith("projection:") for part in ready["parts"])
        now = role_pids(entitle)
    finally:
        # One Ctrl-C in the terminal (the whole group) stops every process.
        assert entitle.stop(signal.SIGINT, group=True) == 0, entitle.text[-3000:]
    for pid in now.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in stat(pid), f"{pid} still runs"


def stat(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.e2e
def test_a_role_that_keeps_dying_stops_the_stack_with_a_line(tmp_path: Path) -> None:
    entitle = stack(tmp_path).start()
    assert entitle.process is not None
    try:
        killed: list[int] = []
        for time in range(3):
            pid = eventually(lambda: role_pids(entitle).get("projector"))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            if time < 2:  # started again
                eventually(lambda: role_pids(entitle).get("projector") not in (*killed, None))
        assert entitle.process.wait(30) == 1
    finally:
        entitle.kill()
    assert "the projector process exited (code -9) 3 times within 60 s; stopping the stack" in (
        entitle.text
    )
    # The others were stopped too: nothing answers on the public port.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{entitle.url}/healthz", timeout=2)


@pytest.mark.e2e
def test_readyz_names_a_role_that_does_not_answer(tmp_path: Path) -> None:
    with stack(tmp_path) as entitle:
        pids = eventually(lambda: all_four(entitle))
        eventually(lambda: httpx.get(f"{entitle.url}/readyz", timeout=10).status_code == 200)
        os.kill(pids["projector"], signal.SIGSTOP)  # alive, but not answering
        try:
            answer = httpx.get(f"{entitle.url}/readyz", timeout=10)
            assert answer.status_code == 503
            assert answer.json()["parts"]["process:projector"] == "failing: not answering"
            metrics = httpx.get(f"{entitle.url}/metrics", timeout=10).text
            assert 'entitle_part_up{part="process:projector"} 0.0' in metrics
            assert 'entitle_part_up{part="process:domain"} 1.0' in metrics
        finally:
            os.kill(pids["projector"], signal.SIGCONT)
        eventually(lambda: httpx.get(f"{entitle.url}/readyz", timeout=10).status_code == 200)


def test_metrics_of_the_processes_add_up() -> None:
    web = """# HELP entitle_webhooks_accepted_total Webhooks stored
# TYPE entitle_webhooks_accepted_total counter
entitle_webhooks_accepted_total{source="stripe"} 3.0
entitle_webhooks_accepted_created{source="stripe"} 1.7e+09
# HELP entitle_validation_seconds Time to answer
# TYPE entitle_validation_seconds histogram
entitle_validation_seconds_bucket{le="0.001"} 2.0
entitle_validation_seconds_bucket{le="+Inf"} 3.0
entitle_validation_seconds_count 3.0
entitle_validation_seconds_sum 0.01
# HELP process_start_time_seconds Start time
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7e+09
"""
    domain = """# HELP entitle_webhooks_folded_total Webhooks folded
# TYPE entitle_webhooks_folded_total counter
entitle_webhooks_folded_total 5.0
# HELP entitle_part_up Parts
# TYPE entitle_part_up gauge
entitle_part_up{part="fold"} 1.0
# HELP process_start_time_seconds Start time
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.8e+09
"""
    projector = domain.replace(" 5.0", " 2.0").replace("1.8e+09", "1.9e+09")
    projector = projector.replace('part="fold"', 'part="projection:x"')
    merged = merge_metrics([("web", web), ("domain", domain), ("projector", projector)])
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged.decode())
        for s in family.samples
    }
    assert samples == {
        # The engine's counters count for the stack.
        ("entitle_webhooks_accepted_total", (("source", "stripe"),)): 3.0,
        ("entitle_webhooks_folded_total", ()): 7.0,
        ("entitle_validation_seconds_bucket", (("le", "0.001"),)): 2.0,
        ("entitle_validation_seconds_bucket", (("le", "+Inf"),)): 3.0,
        ("entitle_validation_seconds_count", ()): 3.0,
        ("entitle_validation_seconds_sum", ()): 0.01,
        ("entitle_part_up", (("part", "fold"),)): 1.0,
        ("entitle_part_up", (("part", "projection:x"),)): 1.0,
        # The client library's are each process's own.
        ("process_start_time_seconds", (("process", "web"),)): 1.7e09,
        ("process_start_time_seconds", (("process", "domain"),)): 1.8e09,
        ("process_start_time_seconds", (("process", "projector"),)): 1.9e09,
    }
    assert merged.decode().count("# TYPE process_start_time_seconds") == 1
    assert b"_created" not in merged  # no family left without samples either


@pytest.mark.e2e
def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    import socket
    import subprocess

    from tests.harness import ENTITLE
    from tests.test_dev import CONFIG

    (tmp_path / "entitle.yaml").write_text(CONFIG)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [ENTITLE, "dev", "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip() == f"entitle: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert done.stdout == ""  # no banner, no broker started


@pytest.mark.e2e
def test_ctrl_c_right_after_a_role_restart_folds_what_was_acknowledged(tmp_path: Path) -> None:
    """The domain service started again a moment ago is still importing
    when Ctrl-C comes: it is stopped once it serves, so it folds what the
    stack acknowledged meanwhile (the embedded broker keeps nothing)."""
    entitle = stack(tmp_path).start()
    try:
        pids = eventually(lambda: all_four(entitle))
        eventually(lambda: httpx.get(f"{entitle.url}/readyz", timeout=10).status_code == 200)
        os.kill(pids["domain"], signal.SIGKILL)
        eventually(lambda: "the domain process exited (code -9)" in entitle.text)
        sent = send(entitle, "sub_meanwhile_", 20)
    finally:
        assert entitle.stop(signal.SIGINT, group=True) == 0, entitle.text[-3000:]
    assert "Traceback" not in entitle.text
    with stack(tmp_path) as again:
        eventually(lambda: active_refs(again) >= sent, timeout=30)


@pytest.mark.e2e
def test_closing_the_terminal_stops_the_stack_in_order(tmp_path: Path) -> None:
    entitle = stack(tmp_path).start()
    try:
        eventually(lambda: httpx.get(f"{entitle.url}/readyz", timeout=10).status_code == 200)
        sent = send(entitle, "sub_hangup_", 10)
    finally:
        assert entitle.stop(signal.SIGHUP) == 0, entitle.text[-3000:]  # as for Ctrl-C
    with stack(tmp_path) as again:
        eventually(lambda: active_refs(again) >= sent, timeout=30)
