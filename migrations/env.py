"""Alembic environment. Migrations are production code: on Postgres they run with a lock timeout,
so a migration that would queue behind a long transaction fails fast instead of blocking every
worker behind its lock."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

import pipeline.models  # noqa: F401  (registers the tables on the metadata)
from pipeline.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from pipeline.settings import Settings

        url = Settings().database_url
    return str(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=_url().startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or make_engine(_url())
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text("SET statement_timeout = '15min'"))
            # Session settings, so they outlive this transaction. Ending it here lets Alembic own
            # the migrations' transaction, which a migration needs to step out of it
            # (autocommit_block, for CREATE INDEX CONCURRENTLY).
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things in place; batch mode copies the table instead.
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
