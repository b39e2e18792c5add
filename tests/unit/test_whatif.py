"""The whatif estimator on hand-made records: jobs, triage and escalation decisions, calls and shadow
results written straight into the database, where each figure can be worked out by hand."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from decimal import Decimal
from importlib import resources
from itertools import pairwise

import pytest
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig, RoutingPolicy, load_config, parse_config
from pipeline.errors import InvalidQuery
from pipeline.flow.routing import parse_triage
from pipeline.models import (
    Batch,
    Job,
    JobKind,
    JobStatus,
    ModelCall,
    RoutingDecision,
    ShadowEvaluation,
    ShadowStatus,
    Stage,
)
from pipeline.quality import whatif as w

D = Decimal


@pytest.fixture
def models() -> ModelConfig:
    return load_config()  # easy, medium -> sonnet; hard, ambiguous -> opus; sonnet -> opus; min 0.6


def policy(models: ModelConfig, **kw: object) -> RoutingPolicy:
    by = dict(models.routing.by_difficulty)
    for d in ("easy", "medium", "hard"):
        if d in kw:
            by[d] = str(kw.pop(d))
    return replace(models.routing, by_difficulty=by, **kw)  # type: ignore[arg-type]


def add_job(db: Session, batch: Batch, key: str, *, verdict: str, confidence: float | None, reason: str,
            start: str, path: list[tuple[str, list[str]]], status: JobStatus = JobStatus.SUCCEEDED,
            shadow: tuple[bool, str] | None = None) -> Job:
    """A classify job triaged to ``start`` (triage costs $0.01) and worked along ``path``: each tier
    with the costs of its work calls; escalated between them; ending at the last with ``status``."""
    calls = [("triage", "haiku", D("0.01"))]
    calls += [("work", tier, D(c)) for tier, costs in path for c in costs]
    job = Job(batch_id=batch.id, key=key, kind=JobKind.CLASSIFY, payload={"text": key}, status=status,
              difficulty=verdict, tier=path[-1][0], cost_usd=sum((c for _, _, c in calls), D(0)))
    db.add(job)
    db.flush()
    db.add(RoutingDecision(job_id=job.id, reason_kind="triage", verdict=verdict, confidence=confidence,
                           reason=reason, to_tier=start))
    for (a, _), (b, _) in pairwise(path):
        db.add(RoutingDecision(job_id=job.id, reason_kind="escalation", from_tier=a, to_tier=b))
    for stage, tier, cost in calls:
        db.add(ModelCall(job_id=job.id, stage=Stage(stage), tier=tier, model=tier, outcome="ok", input_tokens=100,
                         output_tokens=10, cost_usd=cost))
    if shadow is not None:
        agreed, cost = shadow
        db.add(ModelCall(job_id=job.id, stage=Stage.SHADOW, tier="opus", model="opus", outcome="ok", cost_usd=D(cost)))
        db.add(ShadowEvaluation(job_id=job.id, status=ShadowStatus.DONE, rate=1.0, draw=0.5, routed_tier=path[-1][0],
                                difficulty=verdict, reference_tier="opus", agreement=float(agreed), agreed=agreed,
                                cost_usd=D(cost)))
    db.flush()
    return job


@pytest.fixture
def batch(db: Session) -> Batch:
    """Five classify jobs, recorded under the default policy (min_confidence 0.6):

    j1, j2  easy 0.9 -> sonnet $0.10, succeeded; shadowed at opus for $0.20, j1 agreed, j2 not
    j3      easy 0.55 -> ambiguous -> opus $0.30, succeeded
    j4      hard 0.9 -> opus $0.30, succeeded
    j5      easy 0.9 -> sonnet $0.05 + $0.05 (a retry), escalated -> opus $0.30, succeeded
    Each with a $0.01 triage: $1.25 in all."""
    b = Batch(name="whatif-unit")
    db.add(b)
    db.flush()
    add_job(db, b, "j1", verdict="easy", confidence=0.9, reason="short", start="sonnet",
            path=[("sonnet", ["0.10"])], shadow=(True, "0.20"))
    add_job(db, b, "j2", verdict="easy", confidence=0.9, reason="short", start="sonnet",
            path=[("sonnet", ["0.10"])], shadow=(False, "0.20"))
    add_job(db, b, "j3", verdict="ambiguous", confidence=0.55, reason="easy with low confidence 0.55: short",
            start="opus", path=[("opus", ["0.30"])])
    add_job(db, b, "j4", verdict="hard", confidence=0.9, reason="long", start="opus", path=[("opus", ["0.30"])])
    add_job(db, b, "j5", verdict="easy", confidence=0.9, reason="short", start="sonnet",
            path=[("sonnet", ["0.05", "0.05"]), ("opus", ["0.30"])])
    return b


def test_the_policy_the_batch_ran_under_costs_what_was_recorded(db: Session, batch: Batch,
                                                                models: ModelConfig) -> None:
    e = w.estimate_policy(db, batch_id=batch.id, models=models, policy=models.routing)
    assert e.jobs == 5
    assert e.cost_usd == D("1.25")
    # sonnet/easy: 2 jobs, 1 of 2 shadows agreed; opus (the reference): 3 jobs, agreement 1.
    assert e.agreement == pytest.approx((2 * 0.5 + 3 * 1) / 5)
    assert e.low is not None and e.high is not None and e.low < e.agreement < e.high
    assert any("sonnet of easy jobs: 2 shadow result(s)" in t for t in e.thin)


def test_a_lower_threshold_reroutes_a_low_confidence_job_with_expected_escalation(
        db: Session, batch: Batch, models: ModelConfig) -> None:
    e = w.estimate_policy(db, batch_id=batch.id, models=models, policy=policy(models, min_confidence=0.5))
    # j3 is now easy -> sonnet, where it was never worked: the mean of sonnet's easy classify jobs
    # ($0.10: j1, j2, and j5's two calls), and one of those three left sonnet, so a third of the
    # time it also pays its own opus call ($0.30): 0.01 + 0.10 + 0.30 / 3.
    j3 = D("0.01") + D("0.10") + D("0.30") / 3
    assert e.cost_usd == pytest.approx(D("1.25") - D("0.31") + j3, abs=D("1e-12"))
    # j3 ends at sonnet with weight 2/3 and at opus with 1/3.
    sonnet, opus = 2 + 2 / 3, 2 + 1 / 3
    assert e.agreement == pytest.approx((sonnet * 0.5 + opus) / 5)
    assert e.succeeded == pytest.approx(5)


def test_everything_at_the_reference_tier_agrees_and_pays_the_shadow_calls(db: Session, batch: Batch,
                                                                           models: ModelConfig) -> None:
    e = w.estimate_policy(db, batch_id=batch.id, models=models, policy=policy(models, easy="opus", medium="opus"))
    # j1, j2: their shadow calls at opus ($0.20) are what opus cost them; j5: its own opus call.
    assert e.cost_usd == D("0.01") * 5 + D("0.20") * 2 + D("0.30") * 3
    assert (e.agreement, e.low, e.high) == (1.0, 1.0, 1.0)


def test_a_tier_never_worked_nor_shadowed_is_priced_from_tokens_and_left_out_of_agreement(
        db: Session, batch: Batch, models: ModelConfig) -> None:
    e = w.estimate_policy(db, batch_id=batch.id, models=models, policy=policy(models, easy="haiku"))
    haiku = models.tier("haiku")
    per_job = (100 * haiku.input_per_mtok + 10 * haiku.output_per_mtok) / 1_000_000
    # The four easy jobs (j3 stays ambiguous at 0.6) at haiku, outside the chain: no escalation.
    # j5's tokens are its last work call's (opus), the same 100 in and 10 out.
    assert e.cost_usd == pytest.approx(D("0.01") * 3 + per_job * 3 + D("0.31") * 2, abs=D("1e-12"))
    assert e.uncovered == pytest.approx(3)
    assert any("no shadow result at haiku" in t for t in e.thin)
    assert any("priced from each job's own tokens" in t for t in e.thin)


def test_the_sweep_holds_every_monotone_mapping_at_every_threshold(db: Session, batch: Batch,
                                                                   models: ModelConfig) -> None:
    swept = w.sweep(db, batch_id=batch.id, models=models)
    # Two tiers in the chain: 5 monotone maps of easy <= medium <= hard <= ambiguous, at 10 thresholds.
    assert len(swept) == 50
    assert [e.cost_usd for e in swept] == sorted(e.cost_usd for e in swept)
    order = {t: i for i, t in enumerate(models.routing.escalation)}
    for e in swept:
        p = e.policy
        tiers = [p.by_difficulty["easy"], p.by_difficulty["medium"], p.by_difficulty["hard"], p.ambiguous]
        assert [order[t] for t in tiers] == sorted(order[t] for t in tiers)
    current = [e for e in swept if w.same_routing(e.policy, models.routing)]
    assert len(current) == 1 and current[0].cost_usd == D("1.25")


def test_calibrate_picks_the_cheapest_policy_whose_lower_bound_reaches_the_target(
        db: Session, batch: Batch, models: ModelConfig) -> None:
    swept = w.sweep(db, batch_id=batch.id, models=models)
    # Only policies ending every job at opus are sure of agreement 1: $1.35 (see above).
    choice = w.choose(swept, target=1.0, batch="b")
    assert choice.chosen.cost_usd == D("1.35") and choice.chosen.low == 1.0
    assert choice.chosen.policy.by_difficulty["easy"] == "opus"
    usable = [e for e in swept if e.low is not None and e.uncovered == 0]
    low = min(e.low for e in usable if e.low is not None)
    assert w.choose(swept, target=low, batch="b").chosen.cost_usd == min(e.cost_usd for e in usable)
    # Cheaper policies send hard jobs to sonnet, where no hard job was shadowed: never chosen.
    assert min(e.cost_usd for e in swept) < min(e.cost_usd for e in usable)


def test_agreement_is_never_borrowed_from_an_easier_difficulty(db: Session, batch: Batch,
                                                               models: ModelConfig) -> None:
    e = w.estimate_policy(db, batch_id=batch.id, models=models, policy=policy(models, hard="sonnet"))
    # j4 (hard) at sonnet: sonnet's shadows are all of easy jobs, which say nothing of hard ones.
    # It ends there 2/3 of the time: the share of sonnet's jobs that left it (no hard one was
    # worked there) is 1/3.
    assert e.uncovered == pytest.approx(2 / 3)
    assert e.coverage == pytest.approx((5 - 2 / 3) / 5)
    assert any("escalation from sonnet of hard jobs: none was worked there" in t for t in e.thin)
    assert any("agreement at sonnet of hard jobs: no shadow result at sonnet, left out" in t for t in e.thin)


def test_calibrate_says_no_policy_reaches_the_target_and_the_best_reachable(
        db: Session, batch: Batch, models: ModelConfig) -> None:
    # A chain of sonnet alone: nothing ends at opus, so nothing is sure of agreement 1.
    m = replace(models, routing=replace(models.routing, escalation=("sonnet",), ambiguous="sonnet",
                                        reference_tier="opus",
                                        by_difficulty={"easy": "sonnet", "medium": "sonnet", "hard": "sonnet"}))
    # Hard jobs at sonnet: none was shadowed there, so no policy of this sweep can be estimated...
    with pytest.raises(InvalidQuery, match=r"no policy of the sweep can be estimated over batch b"):
        w.choose(w.sweep(db, batch_id=batch.id, models=m), target=0.99, batch="b")
    # ...until one is.
    add_job(db, batch, "j6", verdict="hard", confidence=0.9, reason="long", start="sonnet",
            path=[("sonnet", ["0.10"])], shadow=(False, "0.20"))
    swept = w.sweep(db, batch_id=batch.id, models=m)
    with pytest.raises(InvalidQuery, match=r"no policy of the sweep reaches 99\.0% .* best reachable is easy=sonnet"):
        w.choose(swept, target=0.99, batch="b")


def test_a_batch_without_shadows_says_so(db: Session, models: ModelConfig) -> None:
    b = Batch(name="whatif-unit-no-shadow")
    db.add(b)
    db.flush()
    add_job(db, b, "x", verdict="easy", confidence=0.9, reason="short", start="sonnet", path=[("sonnet", ["0.10"])])
    e = w.estimate_policy(db, batch_id=b.id, models=models, policy=models.routing)
    assert e.cost_usd == D("0.11") and e.agreement is None
    assert any("no shadow result in the batch" in t for t in e.thin)
    with pytest.raises(InvalidQuery, match="has no shadowed job with a result"):
        w.choose(w.sweep(db, batch_id=b.id, models=models), target=0.9, batch="b")


@pytest.mark.parametrize("target", [0, -0.5, 1.01, 97])
def test_a_target_outside_0_1_is_refused(target: float) -> None:
    with pytest.raises(InvalidQuery, match=r"--target .* must be an agreement above 0 and at most 1"):
        w.check_target(target)


@pytest.mark.parametrize(("kw", "message"), [
    ({"routes": ["medium=fable"]}, r"--route 'medium=fable' names tier 'fable', which has no \[tiers.fable\] table"),
    ({"routes": ["tricky=opus"]}, r"unknown difficulty 'tricky'"),
    ({"routes": ["medium"]}, r"expected DIFFICULTY=TIER"),
    ({"escalation": "haiku,sonnet,gpt"}, r"--escalation 'haiku,sonnet,gpt' names tier 'gpt', which has no \[tiers"),
    ({"escalation": "sonnet,sonnet"}, r"names a tier twice"),
    ({"min_confidence": 1.5}, r"--min-confidence 1.5 must be between 0 and 1"),
])
def test_a_bad_policy_is_one_sentence(models: ModelConfig, kw: dict, message: str) -> None:
    with pytest.raises(InvalidQuery, match=message):
        w.custom_policy(models, **kw)


def test_a_config_whose_routing_names_a_tier_the_records_lack_is_refused(models: ModelConfig) -> None:
    other = replace(models.routing, escalation=("sonnet", "mythos"))
    with pytest.raises(InvalidQuery,
                       match=r"^other.toml \[routing\] names tier 'mythos', which has no \[tiers.mythos\]"):
        w.custom_policy(models, base=other, base_source="other.toml")


def test_flags_build_the_policy_asked_for(models: ModelConfig) -> None:
    p = w.custom_policy(models, min_confidence=0.8, routes=["medium=opus", "easy=haiku"],
                        escalation="haiku,sonnet,opus")
    assert p.by_difficulty == {"easy": "haiku", "medium": "opus", "hard": "opus"}
    assert p.escalation == ("haiku", "sonnet", "opus") and p.min_confidence == 0.8


def test_the_written_configuration_loads_as_the_policy_and_keeps_the_rest(models: ModelConfig) -> None:
    text = resources.files("pipeline").joinpath("defaults.toml").read_text()
    chosen = w.custom_policy(models, min_confidence=0.85, routes=["easy=haiku"], escalation="haiku,sonnet,opus")
    out = w.with_routing(text, chosen, comment="chosen by a test", source="test.toml")
    loaded = parse_config(tomllib.loads(out), source="test.toml")
    assert w.same_routing(loaded.routing, chosen)
    assert loaded.tiers == models.tiers and loaded.limits == models.limits
    assert "# chosen by a test" in out and out.count("[routing]") == 1


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_the_difficulty_under_a_low_confidence_verdict_is_read_back(difficulty: str) -> None:
    v = parse_triage(f'{{"difficulty": "{difficulty}", "confidence": 0.4, "reason": "r"}}', min_confidence=0.6)
    assert v.difficulty == "ambiguous" and v.triaged_as == difficulty
    # As recorded now (routing_decisions.triaged_as), and as before that column (the reason's text).
    assert w.raw_difficulty(v.difficulty, v.confidence, "something else", v.triaged_as) == difficulty
    assert w.raw_difficulty(v.difficulty, v.confidence, v.reason) == difficulty
    assert w.raw_difficulty("ambiguous", None, "triage answer is not JSON") == "ambiguous"
