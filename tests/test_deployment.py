"""compose.yaml and the Dockerfile stay in step with the CLI.

(No Docker engine runs here, so `docker compose config` cannot; this checks
what would break a deployment: unknown subcommands, missing services, wiring.)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from services.cli import parser

ROOT = Path(__file__).resolve().parents[1]


def test_compose_runs_each_service_as_its_own_entitle_process() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    assert services["postgres"]["image"].startswith("postgres:")
    commands = {name: s["command"][0] for name, s in services.items() if "command" in s}
    assert sorted(commands.values()) == ["api", "domain", "ingress", "projector"]
    cli = parser()
    for name, service in services.items():
        if "command" not in service:
            continue
        args = cli.parse_args(service["command"])  # exits if the CLI would reject it
        assert args.config == "/etc/entitle/entitle.yaml"
        env = service["environment"]
        assert env["ENTITLE_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["ENTITLE_KAFKA_IDEMPOTENCE"] == "true"
        assert env["ENTITLE_DATABASE_URL"].startswith("postgresql://")
        assert service["build"] == "."
        assert set(service["depends_on"]) == {"kafka", "postgres"}, name


def test_the_dockerfile_installs_the_project_and_runs_entitle() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("contracts", "domain", "services"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'ENTRYPOINT ["entitle"]' in dockerfile
