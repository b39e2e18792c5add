"""The demo and the workers check the Claude endpoint once at start: a refused key, an unknown model
or an unreachable host is one sentence at once, not an hour of patient retries that end in failed
jobs. The real SDK against the fake Claude over HTTP, and a closed port; the commands through the
CLI's entry point."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.flow.runtime import check_claude
from pipeline.settings import Settings
from tests.cli import invoke


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def keyed_fake() -> Iterator[FakeClaude]:
    with FakeClaude(port=0, options=FakeOptions(api_key="right-key")) as fake:
        yield fake


def settings(base_url: str, *, key: str | None = "right-key", config: Path | None = None) -> Settings:
    return Settings(ANTHROPIC_API_KEY=key, ANTHROPIC_BASE_URL=base_url, SWITCHYARD_CONFIG=config)


def unknown_model_config(tmp_path: Path) -> Path:
    bundled = Path(__file__).resolve().parents[2] / "pipeline" / "defaults.toml"
    path = tmp_path / "models.toml"
    text = bundled.read_text()
    assert 'model = "claude-sonnet-5-5"' in text
    path.write_text(text.replace('model = "claude-sonnet-5-5"', 'model = "claude-sonet-5-5"'))
    return path


def refused(s: Settings, tiers: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        check_claude(s, tiers=tiers)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_working_endpoint_passes(keyed_fake: FakeClaude) -> None:
    check_claude(settings(keyed_fake.base_url))
    check_claude(settings(keyed_fake.base_url), tiers=["sonnet"])


def test_a_refused_key_is_one_sentence(keyed_fake: FakeClaude) -> None:
    message = refused(settings(keyed_fake.base_url, key="wrong-key"))
    assert message == (f"the Claude API at {keyed_fake.base_url} refused ANTHROPIC_API_KEY "
                       f"(401 authentication_error: invalid x-api-key)")


def test_no_key_is_one_sentence(keyed_fake: FakeClaude) -> None:
    assert "ANTHROPIC_API_KEY is not set" in refused(settings(keyed_fake.base_url, key=None))


def test_an_unknown_model_is_one_sentence(keyed_fake: FakeClaude, tmp_path: Path) -> None:
    config = unknown_model_config(tmp_path)
    message = refused(settings(keyed_fake.base_url, config=config))
    assert message == (f"the Claude API at {keyed_fake.base_url} has no model 'claude-sonet-5-5' "
                       f"(404 not_found_error: model: claude-sonet-5-5), the model of tier sonnet in {config}")
    # A worker checks only the models it calls: the opus worker does not need sonnet's.
    check_claude(settings(keyed_fake.base_url, config=config), tiers=["opus"])


def test_an_unreachable_host_is_one_sentence_at_once(closed_port: int) -> None:
    t0 = time.monotonic()
    message = refused(settings(f"http://127.0.0.1:{closed_port}"))
    assert time.monotonic() - t0 < 5
    assert message == (f"cannot reach the Claude API at http://127.0.0.1:{closed_port} "
                       f"([Errno 111] Connection refused): check ANTHROPIC_BASE_URL and the network")


@pytest.fixture
def switchyard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`switchyard ARGS...` through the real entry point (cli.main), in this process (a refused start
    ends before any worker or broker is started), with ``env`` as the environment's Claude and
    switchyard settings; returns (exit code, stdout, stderr)."""

    def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
        for name in [k for k in os.environ if k.startswith(("ANTHROPIC_", "SWITCHYARD_"))]:
            monkeypatch.delenv(name)
        for name, value in {"DATABASE_URL": f"sqlite:///{tmp_path}/preflight.sqlite", "BROKER_URL": "memory://",
                            "COLUMNS": "200", **env}.items():
            monkeypatch.setenv(name, value)
        return invoke(monkeypatch, capsys, *args)

    return run


def test_a_worker_refuses_to_start_with_that_sentence(keyed_fake: FakeClaude, closed_port: int, tmp_path: Path,
                                                      switchyard: Callable[..., tuple[int, str, str]]) -> None:
    cases = {
        "wrong-key": ({"ANTHROPIC_API_KEY": "wrong-key", "ANTHROPIC_BASE_URL": keyed_fake.base_url},
                      "refused ANTHROPIC_API_KEY (401 authentication_error"),
        "unknown-model": ({"ANTHROPIC_API_KEY": "right-key", "ANTHROPIC_BASE_URL": keyed_fake.base_url,
                           "SWITCHYARD_CONFIG": str(unknown_model_config(tmp_path))},
                          "has no model 'claude-sonet-5-5'"),
        "unreachable": ({"ANTHROPIC_API_KEY": "right-key", "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{closed_port}"},
                        "cannot reach the Claude API"),
    }
    for name, (env, needle) in cases.items():
        code, out, err = switchyard("worker", "--tier", "sonnet", env=env)
        assert code == 2, (name, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err)


def test_the_demo_says_why_at_once_and_exits_non_zero(closed_port: int,
                                                      switchyard: Callable[..., tuple[int, str, str]]) -> None:
    base = f"http://127.0.0.1:{closed_port}"
    t0 = time.monotonic()
    code, out, err = switchyard("demo", env={"ANTHROPIC_API_KEY": "sk-ant-x", "ANTHROPIC_BASE_URL": base})
    assert code == 2, out + err
    assert time.monotonic() - t0 < 10
    assert f"Using the Claude API at {base}." in out
    assert err.strip() == (f"error: cannot reach the Claude API at {base} ([Errno 111] Connection refused): "
                           f"check ANTHROPIC_BASE_URL and the network")
    assert "Enqueued" not in out
