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
