"""docker-compose.yml and the Dockerfile, checked without Docker (it cannot run on these machines):
the file parses, names every service the README promises, starts them in the right order, and
each command is one the real `switchyard` CLI accepts."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from pipeline.cli.app import app
from pipeline.config import load_config
from pipeline.settings import Settings
from workers.config import queue_names

ROOT = Path(__file__).resolve().parents[2]
SWITCHYARD_SERVICES = ("migrate", "worker-triage", "worker-haiku", "worker-sonnet", "worker-opus", "worker-validate",
                       "dispatcher")
LONG_RUNNING = SWITCHYARD_SERVICES[1:]
CASCADE = ROOT / "pipeline" / "samples" / "cascade.toml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def test_every_service_the_readme_names_exists_and_every_service_is_documented(services: dict[str, Any]) -> None:
    readme = (ROOT / "README.md").read_text()
    # Not inside a heading's anchor (#hundreds-of-calls-in-one-worker-a-worker-group is no service).
    named = set(re.findall(r"(?<![-#])\b(worker-[a-z]+|dispatcher|migrate|postgres|redis)\b", readme))
    promised = {n for n in named if n.startswith("worker-")} | {"dispatcher", "migrate", "postgres", "redis"}
    assert promised <= set(services), promised - set(services)
    for scaled in re.findall(r"--scale ([\w-]+)=\d+", readme):
        assert scaled in services
    assert {f"worker-{q}" for q in queue_names(Settings())} <= set(services)
    for name in services:
        assert f"`{name}`" in readme, f"the README's operator section does not mention {name}"


def test_postgres_and_redis_have_healthchecks_and_redis_never_evicts(services: dict[str, Any]) -> None:
    for name in ("postgres", "redis"):
        check = services[name]["healthcheck"]
        assert check["test"]
        assert check["retries"] > 0
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_migrate_runs_once_before_everything_else(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate.get("restart") == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in LONG_RUNNING:
        deps = services[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}, name
        assert deps["postgres"] == {"condition": "service_healthy"}, name
        assert deps["redis"] == {"condition": "service_healthy"}, name


def test_each_worker_serves_the_tier_it_is_named_after(services: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        if name.startswith("worker-"):
            command = services[name]["command"]
            assert command[:1] == ["worker"]
            assert command[command.index("--tier") + 1] == name.removeprefix("worker-")
    assert services["dispatcher"]["command"] == ["dispatcher"]


def test_every_command_parses_with_the_real_cli(services: dict[str, Any]) -> None:
    for name in SWITCHYARD_SERVICES:
        args = list(services[name]["command"])
        command: Any = typer.main.get_command(app)
        ctx = command.context_class(command, info_name="switchyard")
        while hasattr(command, "commands"):  # a group: `db upgrade` is a command of a sub-group
            sub = command.get_command(ctx, args[0])
            assert sub is not None, (name, args)
            command, ctx, args = sub, sub.context_class(sub, info_name=args[0], parent=ctx), args[1:]
        command.make_context(ctx.info_name, args, parent=ctx.parent)  # raises on an unknown option


def test_every_switchyard_service_gets_its_settings_from_one_image(services: dict[str, Any]) -> None:
    for name in SWITCHYARD_SERVICES:
        svc = services[name]
        assert svc["build"] == "."
        env = svc["environment"]
        for key in ("DATABASE_URL", "BROKER_URL", "ANTHROPIC_API_KEY"):
            assert env.get(key), (name, key)
        assert "@postgres:5432/" in env["DATABASE_URL"]
        assert env["BROKER_URL"].startswith("redis://redis:6379/")
        assert "restart" in svc
        # Scaling a service means replicas: nothing may pin a container name or a host port.
        assert "container_name" not in svc
        assert "ports" not in svc


def test_the_dockerfile_installs_the_package_and_its_migrations(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)
    assert 'ENTRYPOINT ["switchyard"]' in dockerfile
    for copied in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied
    # `pip install .` in the image installs what a wheel holds: the migrations and the default
    # model configuration must be in it, or `switchyard db upgrade` fails in the migrate service.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("switchyard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pipeline/defaults.toml" in names
    assert "migrations/env.py" in names
    assert any(n.startswith("migrations/versions/") and n.endswith(".py") and "__init__" not in n for n in names)


def test_flower_is_optional_and_watches_the_workers_broker(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert flower["profiles"] == ["monitor"]  # `docker compose up` alone does not start it
    command = flower["command"]
    assert command[0] == "celery" and "flower" in command
    broker = next(a.split("=", 1)[1] for a in command if a.startswith("--broker="))
    assert broker == services["worker-sonnet"]["environment"]["BROKER_URL"]
    assert flower["depends_on"] == {"redis": {"condition": "service_healthy"}}
    # No login by default: reachable from this host only.
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])
    # The workers send task events, which Flower needs to show tasks, when the operator asks.
    for name in LONG_RUNNING:
        assert services[name]["environment"]["SWITCHYARD_TASK_EVENTS"] == "${SWITCHYARD_TASK_EVENTS:-0}"


def test_the_haiku_worker_runs_only_with_the_cascade_and_every_service_reads_one_policy(
        services: dict[str, Any]) -> None:
    """Under the defaults Haiku has no work queue and `worker --tier haiku` refuses to start, so its
    service is in the `cascade` profile; every other worker serves a queue of the defaults. With
    the profile, the workers cover every queue of the sample cascade. The policy must be the same
    in every process (triage routes, validate escalates), so SWITCHYARD_CONFIG is in the shared
    environment."""
    tier = {n: s["command"][s["command"].index("--tier") + 1] for n, s in services.items() if n.startswith("worker-")}
    always = {n for n in tier if "profiles" not in services[n]}
    assert services["worker-haiku"]["profiles"] == ["cascade"]
    assert {tier[n] for n in always} == set(queue_names(Settings(SWITCHYARD_CONFIG=None)))
    assert {tier[n] for n in tier if n in always or services[n].get("profiles") == ["cascade"]} == set(
        load_config(CASCADE).queues)
    for name in SWITCHYARD_SERVICES:
        assert services[name]["environment"]["SWITCHYARD_CONFIG"] == "${SWITCHYARD_CONFIG:-}", name


def test_the_image_holds_the_cascade_where_the_compose_file_and_readme_say(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (target,) = re.findall(r"^COPY pipeline/samples/cascade\.toml (\S+)$", dockerfile, re.M)
    command = f"SWITCHYARD_CONFIG={target} docker compose --profile cascade up -d"
    assert command in (ROOT / "docker-compose.yml").read_text()
    assert command in (ROOT / "README.md").read_text()
    load_config(CASCADE)  # the file copied there parses
