"""mask_url: the one helper every command and log line passes a URL through."""

from __future__ import annotations

import pytest

from pipeline.settings import mask_url


@pytest.mark.parametrize(("raw", "shown"), [
    ("postgresql+psycopg://postgres:s3cret@127.0.0.1:5432/switchyard",
     "postgresql+psycopg://postgres:***@127.0.0.1:5432/switchyard"),
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://default:s3cret@cache.example:6380/1", "rediss://default:***@cache.example:6380/1"),
    ("https://proxy-user:s3cret@proxy.example/anthropic", "https://proxy-user:***@proxy.example/anthropic"),
    # A password with characters it should have percent-encoded still goes whole.
    ("amqp://guest:s3:c/r@t@rabbit.example//", "amqp://guest:***@rabbit.example//"),
    # libpq takes the password as a parameter too.
    ("postgresql://app@db.example/prod?sslmode=require&password=s3cret",
     "postgresql://app@db.example/prod?sslmode=require&password=***"),
])
def test_a_password_is_masked(raw: str, shown: str) -> None:
    assert mask_url(raw) == shown


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "postgresql://postgres@127.0.0.1:5432/switchyard", "memory://",
    "sqlite:///.switchyard/switchyard.sqlite", "http://127.0.0.1:8765", "",
])
def test_a_url_without_a_password_is_unchanged(url: str) -> None:
    assert mask_url(url) == url


def test_urls_inside_a_message_are_masked_and_the_rest_kept() -> None:
    message = ("switchyard status reads the queues in Redis, but BROKER_URL is 'amqp://u:s3cret@mq.example//': "
               "point it at redis://:other-s3cret@127.0.0.1:6379/0 (mail ops@example.com)")
    assert mask_url(message) == (
        "switchyard status reads the queues in Redis, but BROKER_URL is 'amqp://u:***@mq.example//': "
        "point it at redis://:***@127.0.0.1:6379/0 (mail ops@example.com)")
