"""What a batch would have cost, and how well it would have agreed with the reference tier, under
another routing policy: estimated from what was recorded, with no model call.

What is read (the batch's rows only):

- each job's triage verdict (``routing_decisions``): its difficulty and confidence. A verdict
  below the threshold was recorded as ``ambiguous`` with its confidence, and its difficulty kept in
  the reason ("medium with low confidence 0.55: ..."); that is where a lower threshold finds it. A
  verdict that did not parse has no confidence and is ambiguous under any threshold.
- each job's calls (``model_calls``) and their costs: triage; and work and format checks, each
  format check counted at the work tier whose answer it checked (the work call before it).
- where each job's work ended at each tier it was worked at: succeeded there, or left it (it was
  escalated from it, or failed there), from the escalations and the job's final status.
- the shadow results (``shadow_evaluations``) and their reference calls (stage ``shadow``).

A job keeps its triage and its triage cost: triage runs before any policy applies. It is routed
again: its difficulty if its confidence reaches the new ``min_confidence``, else the ambiguous
tier, then to the tier the new policy maps that to. From that tier it walks the new escalation
chain:

- at a tier where the job itself was worked, its own calls there are its cost there, and its own
  outcome says whether it stopped there (succeeded) or went on (left);
- at the reference tier, a job whose shadow has a result was worked there too: the shadow call's
  cost is its cost, and it stops there (its reference answer passed the job's checks);
- anywhere else the cost is the mean over the batch's jobs of the same kind and difficulty that
  were worked at that tier (their work and format checks there, retries included, and the shadow
  calls at the reference tier, which are real costs of working a job there), and it goes on up the
  chain with the recorded share of such jobs that left the tier (failed validation after its
  retries) at that tier and difficulty, so the escalation cost is an expectation. A cell with no
  job of that kind and difficulty falls back to the tier's jobs of that kind, then to all its jobs,
  then to the job's own last work call's tokens at the tier's prices; each fallback is named in
  ``thin``.

With the policy the batch ran under, every job walks its own recorded path, and the estimate is the
recorded cost exactly. A pinned job, or one never triaged, keeps its recorded cost and outcome.

Agreement is estimated as ``switchyard quality`` does (pipeline.quality.estimate): stratified by
final tier and difficulty, each stratum's agreement the share of its shadowed jobs that agreed,
weighted by the (expected) number of jobs the policy ends there; the reference tier agrees by
definition. The strata are keyed by the verdict's difficulty, whatever its confidence, so a job
triaged "medium" with low confidence counts with the medium jobs at the tier that worked it: the
estimate assumes agreement at a tier depends on the difficulty triage saw, not on how sure it was.
A stratum with no shadow result borrows from a harder difficulty at the same tier, the one that
agreed least (named in ``thin``), never from an easier one: a weaker tier errs more on harder jobs.
With none, it cannot be estimated and its jobs are left out (``coverage`` says what share of the
succeeded jobs is covered, ``uncovered`` how many of those the policy routed; calibrate never
picks such a policy). A stratum relied on with fewer than ``THIN_BELOW`` shadow
results is named in ``thin``.

Limits: retries per tier are taken as recorded; the pooled cells treat a job like its neighbours of
the same kind and difficulty; the confidence sweep can only move jobs whose recorded verdict
parsed; a job's own outcome at a tier is one draw, so a policy close to the recorded one carries
its luck.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
import tomllib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from itertools import combinations_with_replacement

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import DIFFICULTIES, ModelConfig, RoutingPolicy, parse_config
from pipeline.errors import ConfigError, InvalidQuery
from pipeline.flow.routing import AMBIGUOUS
from pipeline.models import Job, JobStatus, ModelCall, RoutingDecision, ShadowEvaluation, ShadowStatus, Stage

# A stratum with fewer shadow results than this is named as thin where an estimate relies on it.
THIN_BELOW = 10
# The confidence thresholds swept: 0.50, 0.55, ... 0.95.
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# The order of hardness the sweep keeps monotone: an unsure verdict may be any of the three, so it
# never goes to a tier cheaper than the hard jobs' one.
ORDER = (*DIFFICULTIES, AMBIGUOUS)
PINNED = "pinned"
# The reason pipeline.flow.routing writes for a verdict under the threshold: its difficulty first.
_LOW_CONFIDENCE = re.compile(rf"^({'|'.join(DIFFICULTIES)}) with low confidence")


@dataclass(frozen=True)
class PolicyEstimate:
    policy: RoutingPolicy
    jobs: int  # every job of the batch
    cost_usd: Decimal  # the jobs' own cost (triage, work, format checks), evaluation left out
    agreement: float | None  # None: no succeeded job falls in a stratum with a shadow result
    low: float | None  # the 95% interval
    high: float | None
    thin: list[str]
    coverage: float | None = None  # the share of the succeeded jobs the agreement covers
    succeeded: float = 0.0  # expected succeeded jobs
    # Succeeded jobs whose tier the policy chose, in strata with no shadow result at all.
    uncovered: float = 0.0


@dataclass
class _Job:
    id: int
    kind: str
    difficulty: str | None  # the verdict's, whatever its confidence; None: pinned or never triaged
    confidence: float | None
    start: str | None  # the tier triage sent it to
    cost: Decimal
    succeeded: bool
    final_tier: str | None
    triage_cost: Decimal = Decimal(0)
    at: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    outcome: dict[str, str] = field(default_factory=dict)  # tier -> ok | left | open
    usage: Usage | None = None  # its last successful work call's tokens
    shadow_tier: str | None = None
    shadow_cost: Decimal | None = None  # set when the shadow has a result
    agreed: bool | None = None


@dataclass
class Records:
    """A batch's rows as the estimator reads them: load once, evaluate many policies."""

    jobs: list[_Job]
    shadowed: int  # shadows with a result


def raw_difficulty(verdict: str | None, confidence: float | None, reason: str | None,
                   triaged_as: str | None = None) -> str:
    """The difficulty triage saw, before the threshold: recorded as ``triaged_as``; on decisions
    from before that column, a low-confidence verdict (recorded as ambiguous) has it at the head of
    its reason. An unparsed verdict is ambiguous."""
    if verdict in DIFFICULTIES:
        return verdict
    if confidence is not None and triaged_as in DIFFICULTIES:
        return triaged_as
    if confidence is not None and reason and (m := _LOW_CONFIDENCE.match(reason)):
        return m.group(1)
    return AMBIGUOUS


def load(session: Session, *, batch_id: int) -> Records:
    rows = session.execute(select(Job.id, Job.kind, Job.status, Job.tier, Job.pinned_tier, Job.cost_usd)
                           .where(Job.batch_id == batch_id).order_by(Job.id)).all()
    jobs = {r.id: _Job(r.id, r.kind.value, None, None, None, Decimal(r.cost_usd), r.status is JobStatus.SUCCEEDED,
                       r.tier) for r in rows}
    failed = {r.id for r in rows if r.status is JobStatus.FAILED}
    in_batch = select(Job.id).where(Job.batch_id == batch_id)
    for d in session.execute(select(RoutingDecision).where(RoutingDecision.job_id.in_(in_batch))
                             .order_by(RoutingDecision.id)).scalars():
        job = jobs[d.job_id]
        if d.reason_kind == "triage":
            job.difficulty = raw_difficulty(d.verdict, d.confidence, d.reason, d.triaged_as)
            job.confidence = d.confidence if job.difficulty != AMBIGUOUS else None
            job.start = d.to_tier
        elif d.reason_kind == "escalation" and d.from_tier:
            job.outcome[d.from_tier] = "left"
    worked_at: dict[int, str] = {}
    m = ModelCall
    for c in session.execute(select(m.job_id, m.stage, m.tier, m.outcome, m.cost_usd, m.input_tokens, m.output_tokens,
                                    m.cache_creation_input_tokens, m.cache_read_input_tokens)
                             .where(m.job_id.in_(in_batch)).order_by(m.id)):
        job = jobs[c.job_id]
        cost = Decimal(c.cost_usd)
        if c.stage is Stage.TRIAGE:
            job.triage_cost += cost
        elif c.stage is Stage.WORK:
            worked_at[c.job_id] = c.tier
            job.at[c.tier] += cost
            if c.outcome == "ok":
                job.usage = Usage(c.input_tokens, c.output_tokens, c.cache_creation_input_tokens,
                                  c.cache_read_input_tokens)
        elif c.stage is Stage.FORMAT_CHECK and c.job_id in worked_at:
            # Checks the answer of the work call before it: a cost of working the job at that tier.
            job.at[worked_at[c.job_id]] += cost
        elif c.stage is Stage.SHADOW:
            job.shadow_cost = (job.shadow_cost or Decimal(0)) + cost
    for job in jobs.values():
        for tier in job.at:
            if job.succeeded and job.final_tier == tier:
                job.outcome[tier] = "ok"
            elif job.id in failed and job.final_tier == tier:
                job.outcome[tier] = "left"
            else:
                job.outcome.setdefault(tier, "open")
    shadowed = 0
    e = ShadowEvaluation
    for sh in session.execute(select(e.job_id, e.status, e.agreed, e.reference_tier).where(e.job_id.in_(in_batch))):
        job = jobs[sh.job_id]
        if sh.status is ShadowStatus.DONE and sh.agreed is not None:
            shadowed += 1
            job.shadow_tier, job.agreed = sh.reference_tier, sh.agreed
            job.shadow_cost = job.shadow_cost or Decimal(0)
        else:
            job.shadow_cost = None
    return Records(list(jobs.values()), shadowed)


class _Cells:
    """The batch's pooled figures per tier: cost of working a job there, the share that left it,
    and the shadow results of the jobs that ended there."""

    def __init__(self, records: Records) -> None:
        self.cost: dict[tuple[str, ...], list[Decimal]] = defaultdict(list)
        self.left: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0])
        self.agree: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0])
        self._means: dict[tuple[str, ...], Decimal | None] = {}
        for job in records.jobs:
            if job.start is None:
                continue
            d = job.difficulty or AMBIGUOUS
            for tier, how in job.outcome.items():
                if how == "open":
                    continue
                for key in ((tier, d, job.kind), (tier, job.kind), (tier,)):
                    self.cost[key].append(job.at[tier])
                for key in ((tier, d), (tier,)):
                    self.left[key][0] += how == "left"
                    self.left[key][1] += 1
            if job.shadow_tier is not None and job.shadow_cost is not None:
                for key in ((job.shadow_tier, d, job.kind), (job.shadow_tier, job.kind), (job.shadow_tier,)):
                    self.cost[key].append(job.shadow_cost)
        for job in records.jobs:
            if job.agreed is not None and job.final_tier is not None:
                d = job.difficulty or PINNED
                self.agree[(job.final_tier, d)][0] += job.agreed
                self.agree[(job.final_tier, d)][1] += 1


    def mean(self, key: tuple[str, ...]) -> Decimal | None:
        """The mean cost of a cell, worked out once: a sweep asks for it for every job and policy."""
        if key not in self._means:
            costs = self.cost.get(key)
            self._means[key] = sum(costs, Decimal(0)) / len(costs) if costs else None
        return self._means[key]


def _route(job: _Job, policy: RoutingPolicy) -> str:
    if job.difficulty in (None, AMBIGUOUS) or job.confidence is None or job.confidence < policy.min_confidence:
        return policy.ambiguous
    return policy.by_difficulty[job.difficulty or AMBIGUOUS]


def _next(tier: str, chain: tuple[str, ...]) -> str | None:
    if tier not in chain or chain.index(tier) + 1 == len(chain):
        return None
    return chain[chain.index(tier) + 1]


class _Estimator:
    def __init__(self, records: Records, models: ModelConfig) -> None:
        self.records, self.models, self.cells = records, models, _Cells(records)

    def cell_cost(self, job: _Job, tier: str, thin: set[str]) -> Decimal:
        d, kind = job.difficulty or AMBIGUOUS, job.kind
        for key, borrowed in (((tier, d, kind), None), ((tier, kind), f"its other {kind} jobs"),
                              ((tier,), "all its jobs")):
            mean = self.cells.mean(key)
            if mean is not None:
                if borrowed:
                    thin.add(f"cost at {tier} of {d} {kind} jobs: none was worked there, taken from {borrowed}")
                return mean
        if job.usage is not None and tier in self.models.tiers:
            thin.add(f"cost at {tier}: no job was worked there, priced from each job's own tokens at its prices")
            return call_cost(self.models.tier(tier), job.usage, config=self.models)
        thin.add(f"cost at {tier} of {d} {kind} jobs: nothing on record, counted as 0")
        return Decimal(0)

    def left_rate(self, job: _Job, tier: str, thin: set[str]) -> Decimal:
        d = job.difficulty or AMBIGUOUS
        for key in ((tier, d), (tier,)):
            left, n = self.cells.left.get(key, (0, 0))
            if n:
                if len(key) == 1:
                    thin.add(f"escalation from {tier} of {d} jobs: none was worked there, taken from all its jobs")
                return Decimal(left) / n
        thin.add(f"escalation from {tier}: no job was worked there, taken as none")
        return Decimal(0)

    def walk(self, job: _Job, tier: str | None, chain: tuple[str, ...], thin: set[str]) \
            -> tuple[Decimal, dict[str, Decimal], bool]:
        """The job's cost from ``tier`` up ``chain``, where it ends (tier -> probability), and
        whether only its own record was used."""
        cost, reach, own_only = Decimal(0), Decimal(1), True
        ends: dict[str, Decimal] = defaultdict(Decimal)
        while tier is not None and reach > 0:
            how = job.outcome.get(tier)
            if how is not None:
                cost += reach * job.at[tier]
                if how == "ok":
                    ends[tier] += reach
                if how != "left":
                    break
            elif tier == job.shadow_tier and job.shadow_cost is not None:
                cost += reach * job.shadow_cost
                ends[tier] += reach
                own_only = False
                break
            else:
                own_only = False
                cost += reach * self.cell_cost(job, tier, thin)
                left = self.left_rate(job, tier, thin)
                ends[tier] += reach * (1 - left)
                reach *= left
            tier = _next(tier, chain)
        return cost, ends, own_only

    def harder(self, tier: str, difficulty: str) -> str | None:
        """The difficulty to borrow a stratum's agreement from when it has no shadow result: of the
        harder ones at the same tier with a result (any, for an unparsed verdict), the one that
        agreed least. Never an easier one: the weaker tiers err more on harder jobs, so borrowing
        down would promise them what only easy jobs showed."""
        after = DIFFICULTIES if difficulty not in DIFFICULTIES else DIFFICULTIES[DIFFICULTIES.index(difficulty) + 1:]
        found = [(a / n, d) for d in after if (n := self.cells.agree.get((tier, d), (0, 0))[1])
                 for a in (self.cells.agree[(tier, d)][0],)]
        return min(found)[1] if found else None

    def estimate(self, policy: RoutingPolicy) -> PolicyEstimate:
        from pipeline.quality.estimate import Stratum, stratified

        reference = self.models.routing.reference
        thin: set[str] = set()
        cost = Decimal(0)
        weights: dict[tuple[str, str], float] = defaultdict(float)  # (tier, difficulty) -> succeeded jobs
        chosen: dict[tuple[str, str], float] = defaultdict(float)  # ...of those, routed by the policy
        for job in self.records.jobs:
            if job.start is None:  # pinned, or never triaged: as recorded
                cost += job.cost
                if job.succeeded and job.final_tier is not None:
                    weights[(job.final_tier, job.difficulty or PINNED)] += 1
                continue
            start = _route(job, policy)
            spent, ends, own_only = self.walk(job, start, policy.escalation, thin)
            # Its own recorded path, whole: the recorded cost, exactly.
            whole = own_only and spent == sum(job.at.values(), Decimal(0))
            cost += job.cost if whole else job.triage_cost + spent
            for tier, p in ends.items():
                weights[(tier, job.difficulty or AMBIGUOUS)] += float(p)
                chosen[(tier, job.difficulty or AMBIGUOUS)] += float(p)
        strata: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0])
        uncovered = 0.0
        for (tier, d), w in weights.items():
            if w <= 0:
                continue
            if tier == reference:
                key: tuple[str, ...] = (tier,)
            elif self.cells.agree.get((tier, d), (0, 0))[1]:
                key = (tier, d)
                n = self.cells.agree[key][1]
                if n < THIN_BELOW:
                    thin.add(f"agreement at {tier} of {d} jobs: {n} shadow result(s)")
            elif (harder := self.harder(tier, d)) is not None:
                key = (tier, harder)
                thin.add(f"agreement at {tier} of {d} jobs: no shadow result, taken from its {harder} jobs "
                         f"({self.cells.agree[key][1]})")
            else:
                key = ("-", tier, d)
                uncovered += chosen.get((tier, d), 0.0)
                thin.add(f"agreement at {tier} of {d} jobs: no shadow result at {tier}, left out")
            strata[key][0] += w
        parts = []
        for k, (w,) in strata.items():
            agreed, n = self.cells.agree.get(k, (0, 0)) if k[0] != "-" else (0, 0)
            parts.append(Stratum(w, n, agreed, exact=k == (reference,)))
        est = stratified(parts)
        total = sum(weights.values())
        if not self.records.shadowed:
            thin.add("no shadow result in the batch: agreement below the reference tier cannot be estimated")
        return PolicyEstimate(policy, len(self.records.jobs), cost,
                              est.agreement if est else None, est.interval.low if est else None,
                              est.interval.high if est else None, sorted(thin),
                              coverage=est.coverage if est else None, succeeded=total, uncovered=uncovered)


def estimate_policy(session: Session, *, batch_id: int, models: ModelConfig, policy: RoutingPolicy) -> PolicyEstimate:
    """What the batch would have cost, and its agreement with the reference tier, under ``policy``."""
    return _Estimator(load(session, batch_id=batch_id), models).estimate(policy)


def policies(models: ModelConfig) -> list[RoutingPolicy]:
    """Every policy of the sweep: each threshold in THRESHOLDS, with each mapping of easy, medium,
    hard and ambiguous onto the escalation chain (cheapest first) that never sends a harder
    difficulty to a cheaper tier. Retries, the chain and the shadow settings are the config's."""
    chain = models.routing.escalation
    out = []
    for threshold in THRESHOLDS:
        for tiers in combinations_with_replacement(chain, len(ORDER)):
            mapping = dict(zip(ORDER, tiers, strict=True))
            out.append(replace(models.routing, by_difficulty={d: mapping[d] for d in DIFFICULTIES},
                               ambiguous=mapping[AMBIGUOUS], min_confidence=threshold))
    return out


def sweep(session: Session, *, batch_id: int, models: ModelConfig) -> list[PolicyEstimate]:
    """Every policy of ``policies(models)``, estimated over the batch, cheapest first."""
    estimator = _Estimator(load(session, batch_id=batch_id), models)
    return sorted((estimator.estimate(p) for p in policies(models)), key=lambda e: e.cost_usd)


def estimator(session: Session, *, batch_id: int, models: ModelConfig) -> _Estimator:
    """The batch loaded once, for several estimates (the CLI's sweep and its marked policies)."""
    return _Estimator(load(session, batch_id=batch_id), models)


# -- the policy asked for, and calibrate's choice --------------------------------------------------


def custom_policy(models: ModelConfig, *, base: RoutingPolicy | None = None, base_source: str | None = None,
                  min_confidence: float | None = None, routes: Sequence[str] = (),
                  escalation: str | None = None) -> RoutingPolicy:
    """``base`` (the configuration's policy by default) with the flags of `switchyard whatif` over it:
    ``--min-confidence``, ``--route DIFFICULTY=TIER`` and ``--escalation A,B,C``. A tier must have a
    [tiers] table in ``models``: the batch's records are priced by its tiers. InvalidQuery otherwise."""
    policy = base or models.routing
    known = ", ".join(models.tiers)

    def tier(name: str, where: str) -> str:
        if name not in models.tiers:
            raise InvalidQuery(f"{where} names tier {name!r}, which has no [tiers.{name}] table in {models.source} "
                               f"(the tiers are {known})")
        return name

    for name in (*policy.by_difficulty.values(), policy.ambiguous, *policy.escalation):
        tier(name, f"{base_source or models.source} [routing]")
    by_difficulty, ambiguous = dict(policy.by_difficulty), policy.ambiguous
    for route in routes:
        difficulty, sep, name = route.partition("=")
        difficulty, name = difficulty.strip(), name.strip()
        if not sep or not difficulty or not name:
            raise InvalidQuery(f"--route {route!r}: expected DIFFICULTY=TIER, such as medium=opus")
        if difficulty not in ORDER:
            raise InvalidQuery(f"--route {route!r}: unknown difficulty {difficulty!r} "
                               f"(expected easy, medium, hard or ambiguous)")
        tier(name, f"--route {route!r}")
        if difficulty == AMBIGUOUS:
            ambiguous = name
        else:
            by_difficulty[difficulty] = name
    chain = policy.escalation
    if escalation is not None:
        chain = tuple(t.strip() for t in escalation.split(",") if t.strip())
        if not chain:
            raise InvalidQuery("--escalation must name at least one tier, cheapest first, such as haiku,sonnet,opus")
        for name in chain:
            tier(name, f"--escalation {escalation!r}")
        if len(set(chain)) != len(chain):
            raise InvalidQuery(f"--escalation {escalation!r} names a tier twice: each tier may appear once")
    threshold = policy.min_confidence if min_confidence is None else min_confidence
    if not 0 <= threshold <= 1:
        raise InvalidQuery(f"--min-confidence {threshold:g} must be between 0 and 1")
    return replace(policy, by_difficulty=by_difficulty, ambiguous=ambiguous, escalation=chain,
                   min_confidence=threshold)


def same_routing(a: RoutingPolicy, b: RoutingPolicy) -> bool:
    """Whether two policies route and escalate alike (what the estimate depends on)."""
    return (a.by_difficulty == b.by_difficulty and a.ambiguous == b.ambiguous and a.escalation == b.escalation
            and math.isclose(a.min_confidence, b.min_confidence))


@dataclass(frozen=True)
class Choice:
    chosen: PolicyEstimate
    runners_up: list[PolicyEstimate]


def check_target(target: float) -> float:
    if not 0 < target <= 1:
        raise InvalidQuery(f"--target {target:g} must be an agreement above 0 and at most 1, such as 0.97")
    return target


def changes(policy: RoutingPolicy, current: RoutingPolicy) -> int:
    """How many settings ``policy`` changes from ``current``: among policies of one estimate, the one
    changing least is the one to review."""
    return (sum(policy.by_difficulty[d] != current.by_difficulty[d] for d in DIFFICULTIES)
            + (policy.ambiguous != current.ambiguous) + (policy.escalation != current.escalation)
            + (not math.isclose(policy.min_confidence, current.min_confidence)))


def choose(estimates: list[PolicyEstimate], *, target: float, batch: str, current: RoutingPolicy | None = None,
           runners_up: int = 3) -> Choice:
    """The cheapest policy whose agreement's 95% lower bound reaches ``target``, and the next cheapest.

    The lower bound, not the point estimate: the cheapest of a hundred-odd policies, picked by its
    point estimate, is the one whose thin strata happened to agree most (the winner's curse), and
    a stratum of three shadowed jobs that all agreed has a point estimate of 1. The lower bound
    asks for the evidence: a cheaper tier is chosen once enough of its shadows agree. A policy
    that sends jobs to a stratum with no shadow result at all is never chosen."""
    check_target(target)
    if not any(e.agreement is not None for e in estimates) or all(_no_shadows(e) for e in estimates):
        raise InvalidQuery(f"batch {batch} has no shadowed job with a result, so agreement below the reference tier "
                           f"cannot be estimated: enqueue it with --shadow-rate (such as 0.1) and let the shadows "
                           f"finish")
    usable = [e for e in estimates if e.low is not None and e.uncovered == 0]
    reaching = sorted((e for e in usable if e.low is not None and e.low >= target),
                      key=lambda e: (e.cost_usd, -(e.low or 0), -(e.agreement or 0),
                                     changes(e.policy, current) if current is not None else 0))
    if not reaching:
        if not usable:
            raise InvalidQuery(f"no policy of the sweep can be estimated over batch {batch}: each sends jobs to a "
                               f"tier with no shadow result")
        best = max(usable, key=lambda e: (e.low or 0, -e.cost_usd))
        raise InvalidQuery(f"no policy of the sweep reaches {target:.1%} agreement (the lower bound of its 95% "
                           f"interval) over batch {batch}: the best reachable is {describe(best.policy)} at "
                           f"{best.low:.1%} (point estimate {best.agreement:.1%}), costing ${best.cost_usd:.4f}")
    # Runners-up that differ in their figures: thresholds no verdict lies between route alike.
    seen = {(reaching[0].cost_usd, reaching[0].low)}
    others: list[PolicyEstimate] = []
    for e in reaching[1:]:
        if (e.cost_usd, e.low) not in seen and len(others) < runners_up:
            seen.add((e.cost_usd, e.low))
            others.append(e)
    return Choice(reaching[0], others)


def _no_shadows(e: PolicyEstimate) -> bool:
    return any(t.startswith("no shadow result in the batch") for t in e.thin)


def describe(policy: RoutingPolicy) -> str:
    """A policy in one line: easy=haiku medium=sonnet hard=opus ambiguous=opus min_confidence=0.6."""
    return (" ".join(f"{d}={policy.by_difficulty[d]}" for d in DIFFICULTIES)
            + f" ambiguous={policy.ambiguous} min_confidence={policy.min_confidence:g}"
            + f" escalation={','.join(policy.escalation)}")


def routing_toml(policy: RoutingPolicy, *, comment: str) -> str:
    """A [routing] table that loads as ``policy``."""
    lines = ["[routing]", *(f"# {line}" for line in textwrap.wrap(comment, 100))]
    lines += [f"{d} = {json.dumps(policy.by_difficulty[d])}" for d in DIFFICULTIES]
    lines += [f"ambiguous = {json.dumps(policy.ambiguous)}", f"min_confidence = {policy.min_confidence!r}",
              f"retries_per_tier = {policy.retries_per_tier}",
              f"escalation = [{', '.join(json.dumps(t) for t in policy.escalation)}]",
              f"shadow_rate = {policy.shadow_rate!r}"]
    if policy.reference_tier is not None:
        lines.append(f"reference_tier = {json.dumps(policy.reference_tier)}")
    if policy.judge_tier is not None:
        lines.append(f"judge_tier = {json.dumps(policy.judge_tier)}")
    return "\n".join(lines) + "\n"


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def with_routing(config_text: str, policy: RoutingPolicy, *, comment: str, source: str) -> str:
    """The configuration ``config_text`` with its [routing] table replaced by ``policy``'s (added if
    it has none), everything else as it was, comments included. Checked by loading it."""
    lines = config_text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if (m := _HEADER.match(line)) and m.group(1) == "routing"), None)
    table = routing_toml(policy, comment=comment)
    if start is None:
        text = config_text.rstrip("\n") + "\n\n" + table
    else:
        end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
        # Comment lines just above the next table belong to it.
        while end > start + 1 and lines[end - 1].lstrip().startswith("#"):
            end -= 1
        text = "".join(lines[:start]) + table + "\n" + "".join(lines[end:]).lstrip("\n")
    loaded = parse_config(tomllib.loads(text), source=source)
    if not same_routing(loaded.routing, policy):
        raise ConfigError(f"{source}: the [routing] table written does not load as the policy chosen")
    return text
