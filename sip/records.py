"""The records one sample travels as, from the stream to the gradient. Plain data: no torch, no ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

CandidateSource = Literal["suffix", "rewrite", "rollout"]
SOURCES: tuple[CandidateSource, ...] = ("suffix", "rewrite", "rollout")


@dataclass(frozen=True)
class Sample:
    """A prefix and the next N tokens of one document, with a stable id."""

    id: str
    prefix_ids: list[int]
    suffix_ids: list[int]
    prefix: str
    suffix: str
    truth: dict[str, Any] | None = None


@dataclass(frozen=True)
class Rollout:
    """N tokens sampled from the policy, with each token's log-probability under it."""

    ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class Candidate:
    source: CandidateSource
    ids: list[int]
    text: str
    version: int | None = None  # the policy version that wrote it; None for suffix and rewrite
    logprobs: list[float] | None = None  # rollouts: per-token log-probabilities under that policy
    reference_logprob: float | None = None  # summed under the DPO reference, when a rollout worker computed it


@dataclass(frozen=True)
class WeightUpdate:
    """What a batch carries so its rollouts come from policy `version` or newer (actors/weight_sync/)."""

    version: int
    # object_store: (ObjectRef of the full state dict,). Inside a tuple, so Ray does not resolve it on the way.
    refs: tuple[Any, ...] = ()


@dataclass
class Batch:
    """One optimizer step's worth of samples, numbered in feeding order; `attempt` counts its feeds."""

    index: int
    samples: list[Sample]
    weight_update: WeightUpdate | None = None  # the policy version its rollouts need, and where it is
    attempt: int = 1
    reference: Any = None  # train.reference_logprobs=rollout_worker: (ObjectRef of the reference's weights,)


@dataclass
class JudgedSample:
    """A sample's candidates with the judge's reward for each.

    A judgment that gave no verdict counts at its worst in `reward` and clears the candidate's
    `complete` flag: selection never chooses an incomplete candidate (serve/judge.py, sip/objectives.py).
    """

    sample: Sample
    candidates: list[Candidate]
    reward: list[float]  # combined judge score per candidate, in [0, 1]
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # per objective, as it entered the reward
    complete: list[bool] | None = None  # per candidate: every judgment of it gave a verdict; None: no judge ran


@dataclass
class JudgedBatch:
    index: int
    judged: list[JudgedSample]
    attempt: int = 1
    judge_calls: int = 0
    judge_comparisons: int = 0
    judge_round_robin_comparisons: int = 0
    judge_failures: int = 0
    judge_failure_example: str | None = None  # the last answer the judge gave that held no verdict
    rewrite_failures: int = 0
    request_retries: dict[str, int] = field(default_factory=dict)  # per deployment: requests tried again
    stage_seconds: dict[str, float] = field(default_factory=dict)  # weights, generate, rewrite, judge, episode
    error: str | None = None  # set when the episode failed; the driver feeds the batch again


@dataclass(frozen=True)
class TrainExample:
    """What the learner trains on: the prefix and the chosen (and, for DPO, rejected) continuation."""

    sample_id: str
    prefix_ids: list[int]
    chosen_ids: list[int]
    chosen_source: CandidateSource
    rejected_ids: list[int] | None = None
    rejected_source: CandidateSource | None = None
    # summed log-probabilities under the DPO reference, when a rollout worker computed them (else the learner does)
    chosen_reference_logprob: float | None = None
    rejected_reference_logprob: float | None = None


# ---- what the judge and rewriter deployments take and give (text only, never ids or weights) ----

Verdict = float | None


@dataclass(frozen=True)
class Passage:
    """One sample as the judge and rewriter see it: text only, never token ids or weights."""

    prefix: str
    suffix: str  # the original continuation: factuality reference, rewriter input
    truth: dict[str, Any] | None = None  # what a verifiable teacher knows, e.g. {"subject": "country:peru"}


@dataclass
class JudgeTask:
    passage: Passage
    candidates: list[str]
    pivot: int | None = None  # index of the pivot candidate in pivot mode
    needs_worst: bool = True  # the objective rejects the worst candidate (dpo); False: only the best is needed


@dataclass
class JudgeResult:
    """One task's judgment, per candidate in the task's order."""

    reward: list[float]  # the weighted mean of `scores`, in [0, 1]
    complete: list[bool]  # every judgment of this candidate gave a verdict (else it must not be chosen)
    # per objective, as it entered the reward (a failed judgment at its worst value); quality is None
    # for a lone candidate, which has nothing to be compared with
    scores: dict[str, list[float | None]]
    calls: int = 0  # judgments asked for
    comparisons: int = 0  # of them, pairwise quality comparisons (the protocol's cost; the rest are pointwise)
    round_robin_comparisons: int = 0  # what round robin would ask for the same distinct texts: the protocols' yardstick
    failures: int = 0  # judgments that gave no verdict
    failure_example: str | None = None  # with failures: the backend's latest answer that held no verdict
