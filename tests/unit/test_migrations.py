"""The schema comes from the migrations only, and they agree with the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from pipeline import migrate
from pipeline.db import Base, make_engine


def test_upgrade_head_matches_the_models(engine: Engine) -> None:
    # The `database_url` fixture ran `alembic upgrade head` on an empty database.
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], diff


def test_included_columns_match_the_models(engine: Engine) -> None:
    # compare_metadata does not look at an index's INCLUDE columns.
    found = {ix["name"]: ix["dialect_options"].get("postgresql_include", [])
             for table in Base.metadata.tables for ix in inspect(engine).get_indexes(table)}
    for table in Base.metadata.tables.values():
        for index in table.indexes:
            assert found[index.name] == list(index.dialect_options["postgresql"]["include"] or []), index.name


def test_migrations_run_on_sqlite_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/demo.sqlite"
    migrate.upgrade(url)
    assert {"jobs", "model_calls", "routing_decisions", "validation_verdicts"} <= set(
        inspect(make_engine(url)).get_table_names())
