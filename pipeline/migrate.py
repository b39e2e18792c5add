"""Running the Alembic migrations from code: `switchyard db upgrade`, the demo, the tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(database_url: str, *, engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = database_url
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(database_url: str, *, revision: str = "head", engine: Engine | None = None) -> None:
    command.upgrade(alembic_config(database_url, engine=engine), revision)


def current(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from pipeline.db import make_engine

    with make_engine(database_url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
