"""whatif and calibrate on a real batch: worker processes for the cascade's queues (haiku among the
work tiers) and the dispatcher, on Postgres and Redis, calling a fake Claude whose quality model
makes the weaker tiers err, with every job below the reference shadowed. Then the two commands run
through the CLI over what was recorded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig, load_config
from pipeline.db import make_engine, session_factory
from pipeline.fake_claude import DEFAULT_ERROR_RATES, FakeClaude, FakeOptions
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobStatus, ShadowEvaluation, ShadowStatus
from pipeline.quality.whatif import THRESHOLDS
from tests.cli import invoke
from tests.cluster import Cluster, wait_for_batch
from tests.e2e.test_shadow import wait_for_shadows

pytestmark = pytest.mark.e2e

CASCADE = Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "cascade.toml"
LABELS = ["billing", "bug", "account", "other"]
SCHEMA = {"type": "object", "required": ["status", "amount"],
          "properties": {"status": {"enum": ["paid", "unpaid", "late"]}, "amount": {"type": "number"}}}


def jobs() -> list[dict]:
    out: list[dict] = []
    for i in range(36):
        difficulty = ("easy", "medium", "hard")[i % 3]
        # Every fifth triage is unsure: ambiguous at the cascade's 0.6, routed to opus.
        hint = f"[fake:difficulty={difficulty}]" + (" [fake:confidence=0.5]" if i % 5 == 0 else "")
        if i % 2:
            out.append({"key": f"w-{i}", "kind": "classify", "text": f"Ticket {i}: charged twice? {hint}",
                        "labels": LABELS})
        else:
            out.append({"key": f"w-{i}", "kind": "extract", "text": f"Invoice {i}, {i}0.50 due. {hint}",
                        "schema": SCHEMA})
    return out


@pytest.fixture(scope="module")
def cascade() -> ModelConfig:
    return load_config(CASCADE)


@pytest.fixture(scope="module")
def own_sessions(fresh_database: Callable[[str], str]) -> Iterator[tuple[str, sessionmaker[Session]]]:
    url = fresh_database("whatif")
    engine = make_engine(url)
    yield url, session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def erring_fake() -> Iterator[FakeClaude]:
    with FakeClaude(port=0, options=FakeOptions(error_rates=DEFAULT_ERROR_RATES)) as fake:
        yield fake


@pytest.fixture(scope="module")
def batch(own_sessions: tuple[str, sessionmaker[Session]], broker_url: str, erring_fake: FakeClaude,
          cascade: ModelConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    url, sessions = own_sessions
    workdir = tmp_path_factory.mktemp("whatif")
    c = Cluster(database_url=url, broker_url=broker_url, claude_url=erring_fake.base_url, workdir=workdir,
                env_extra={"SWITCHYARD_CONFIG": str(CASCADE)})
    try:
        procs = [c.worker(q, concurrency=4, wait=False) for q in cascade.queues]
        procs.append(c.dispatcher(wait=False))
        c.wait_ready(procs, timeout=90)
        path = workdir / "whatif.jsonl"
        path.write_text("".join(json.dumps(j) + "\n" for j in jobs()))
        report = enqueue_file(sessions, path, batch="e2e-whatif", config=cascade, shadow_rate=1.0)
        assert report.batch_id is not None
        wait_for_batch(sessions, report.batch_id, timeout=240, cluster=c)
        wait_for_shadows(sessions, report.batch_id, timeout=240, cluster=c)
        yield report.batch_id
    finally:
        c.stop()


@pytest.fixture
def cli_env(own_sessions: tuple[str, sessionmaker[Session]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", own_sessions[0])
    monkeypatch.setenv("SWITCHYARD_CONFIG", str(CASCADE))


def test_whatif_reproduces_the_recorded_cost_and_sweeps_every_monotone_policy(
        batch: int, own_sessions: tuple[str, sessionmaker[Session]], cli_env: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with own_sessions[1]() as s:
        rows = s.scalars(select(Job).where(Job.batch_id == batch)).all()
        shadows = s.scalars(select(ShadowEvaluation).where(ShadowEvaluation.job_id.in_([j.id for j in rows]))).all()
    assert all(j.status is JobStatus.SUCCEEDED for j in rows), [(j.key, j.status, j.error) for j in rows]
    done = [sh for sh in shadows if sh.status is ShadowStatus.DONE]
    assert done and any(not sh.agreed for sh in done)  # the quality model made some routed answers wrong
    recorded = sum((j.cost_usd for j in rows), Decimal(0))

    code, out, err = invoke(monkeypatch, capsys, "whatif", "--batch", "e2e-whatif", "--json")
    assert code == 0, err
    result = json.loads(out)
    current = result["current"]
    assert current["current"] and Decimal(current["cost_usd"]) == recorded
    assert current["jobs"] == len(rows) and result["shadowed"] == len(done)
    # Three tiers in the chain: 15 monotone maps of easy <= medium <= hard <= ambiguous per threshold.
    sweep = result["sweep"]
    assert len(sweep) == 15 * len(THRESHOLDS)
    assert [Decimal(r["cost_usd"]) for r in sweep] == sorted(Decimal(r["cost_usd"]) for r in sweep)
    order = {"haiku": 0, "sonnet": 1, "opus": 2}
    for r in sweep:
        tiers = [order[r[k]] for k in ("easy", "medium", "hard", "ambiguous")]
        assert tiers == sorted(tiers)
        if r["agreement"] is not None:
            assert r["agreement_low"] <= r["agreement"] <= r["agreement_high"]
    (again,) = [r for r in sweep if r["current"]]
    assert Decimal(again["cost_usd"]) == recorded and again["agreement"] == current["agreement"]
    # Everything at opus, the reference, agrees by definition and costs more than the cascade.
    top = [r for r in sweep if {r["easy"], r["medium"], r["hard"], r["ambiguous"]} == {"opus"}]
    assert top and all(r["agreement"] == 1.0 and Decimal(r["cost_usd"]) > recorded for r in top)

    code, out, err = invoke(monkeypatch, capsys, "whatif", "--batch", "e2e-whatif", "--min-confidence", "0.4",
                            "--route", "medium=haiku")
    assert code == 0, err
    assert "current" in out and "asked" in out and "cost against agreement" in out


def test_calibrate_writes_a_configuration_that_loads_as_the_cheapest_policy_reaching_the_target(
        batch: int, cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    code, out, err = invoke(monkeypatch, capsys, "whatif", "--batch", "e2e-whatif", "--json")
    assert code == 0, err
    result = json.loads(out)
    rows = [result["current"], *result["sweep"]]
    target = 0.6
    reaching = [r for r in rows if r["agreement_low"] is not None and r["agreement_low"] >= target
                and not any("left out" in t for t in r["thin"])]
    cheapest = min(Decimal(r["cost_usd"]) for r in reaching)

    path = tmp_path / "calibrated.toml"
    code, out, err = invoke(monkeypatch, capsys, "calibrate", "--batch", "e2e-whatif", "--target", str(target),
                            "--out", str(path))
    assert code == 0, err
    assert "chosen:" in out and "runner-up:" in out
    config = load_config(path)
    chosen = [r for r in reaching if Decimal(r["cost_usd"]) == cheapest
              and (r["easy"], r["medium"], r["hard"], r["ambiguous"]) == (
                  config.routing.by_difficulty["easy"], config.routing.by_difficulty["medium"],
                  config.routing.by_difficulty["hard"], config.routing.ambiguous)
              and r["min_confidence"] == pytest.approx(config.routing.min_confidence)]
    assert chosen, (config.routing, cheapest)
    assert config.tiers == load_config(CASCADE).tiers  # the rest of the configuration is as it was

    # Everything at opus always reaches any target; without opus in the chain swept, asking for
    # more than any policy can show names the best reachable instead.
    code, out, err = invoke(monkeypatch, capsys, "calibrate", "--batch", "e2e-whatif", "--target", "0.999",
                            "--escalation", "haiku,sonnet")
    assert code == 2 and "best reachable is" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (("calibrate", "--batch", "e2e-whatif", "--target", "1.5"), "--target 1.5 must be an agreement above 0"),
    (("whatif", "--batch", "e2e-whatif", "--route", "medium=fable"), "names tier 'fable', which has no"),
    (("whatif", "--batch", "e2e-whatif", "--escalation", "haiku,gpt"), "names tier 'gpt', which has no"),
])
def test_bad_input_is_one_sentence(batch: int, cli_env: None, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str) -> None:
    code, _, err = invoke(monkeypatch, capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one sentence, wrapped at most once
