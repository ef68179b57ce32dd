"""The judge deployment: turns a backend's primitive verdicts into one reward per candidate.

Quality is pairwise (round robin over all candidate pairs → win rate, or every candidate against
one pivot), safety and factuality are pointwise; the reward is the weighted mean of the objectives.
Identical texts are judged once, and identical pairs tie without a call.

A judgment that gives no verdict (the backend's retries included) is never a free win: it scores
the worst value for what it judged (0 for a pointwise verdict, a loss for both sides of a failed
comparison), and the candidates it concerned are marked incomplete, so selection never chooses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from statistics import mean

from ray import serve

from sip.serve.backends import JudgeBackend, Passage, Verdict, make_judge_backend
from sip.train.config import DataConfig, JudgeConfig

JUDGE_APP = "sip-judge"
POINTWISE = ("safety", "factuality")


@dataclass
class JudgeTask:
    passage: Passage
    candidates: list[str]
    pivot: int | None = None  # index of the pivot candidate in pivot mode


@dataclass
class JudgeResult:
    """One task's judgment, per candidate in the task's order."""

    reward: list[float]  # the weighted mean of `scores`, in [0, 1]
    complete: list[bool]  # every judgment of this candidate gave a verdict (else it must not be chosen)
    # per objective, as it entered the reward (a failed judgment at its worst value); quality is None
    # for a lone candidate, which has nothing to be compared with
    scores: dict[str, list[float | None]]
    calls: int = 0  # judgments asked for
    failures: int = 0  # judgments that gave no verdict
    failure_example: str | None = None  # with failures: the backend's latest answer that held no verdict


def quality_pairs(n: int, pivot: int | None) -> list[tuple[int, int]]:
    if pivot is None:
        return list(combinations(range(n), 2))
    return [(pivot, j) for j in range(n) if j != pivot]


async def score_tasks(backend: JudgeBackend, tasks: list[JudgeTask], cfg: JudgeConfig) -> list[JudgeResult]:
    weights = {name: w for name, w in cfg.weights.items() if w > 0}
    calls = [0] * len(tasks)
    failures = [0] * len(tasks)
    complete = [[True] * len(task.candidates) for task in tasks]
    scores: list[dict[str, list[float | None]]] = [{} for _ in tasks]

    if "quality" in weights:
        outcomes: list[list[list[float]]] = [[[] for _ in t.candidates] for t in tasks]
        queries, slots = [], []
        for t, task in enumerate(tasks):
            pivot = task.pivot if cfg.pairwise == "pivot" else None
            for i, j in quality_pairs(len(task.candidates), pivot):
                a, b = task.candidates[i], task.candidates[j]
                if a == b:
                    outcomes[t][i].append(0.5)
                    outcomes[t][j].append(0.5)
                else:
                    queries.append((task.passage, a, b))
                    slots.append((t, i, j))
                    if cfg.both_orders:  # the same pair with the options swapped: cancels position bias
                        queries.append((task.passage, b, a))
                        slots.append((t, j, i))
        verdicts = await backend.compare(queries) if queries else []
        for (t, i, j), v in zip(slots, verdicts, strict=True):
            calls[t] += 1
            if v is None:  # a loss for both sides: dodging a comparison never pays
                failures[t] += 1
                complete[t][i] = complete[t][j] = False
                outcomes[t][i].append(0.0)
                outcomes[t][j].append(0.0)
            else:
                outcomes[t][i].append(v)
                outcomes[t][j].append(1 - v)
        for t, task_outcomes in enumerate(outcomes):
            scores[t]["quality"] = [mean(o) if o else None for o in task_outcomes]

    for objective in POINTWISE:
        if objective not in weights:
            continue
        unique: dict[tuple[int, str], int] = {}
        queries = []
        for t, task in enumerate(tasks):
            for text in task.candidates:
                if (t, text) not in unique:
                    unique[(t, text)] = len(queries)
                    queries.append((task.passage, text))
        verdicts: list[Verdict] = await getattr(backend, objective)(queries) if queries else []
        for (t, _), v in zip(unique, verdicts, strict=True):
            calls[t] += 1
            failures[t] += v is None
        for t, task in enumerate(tasks):
            values = [verdicts[unique[(t, text)]] for text in task.candidates]
            for c, v in enumerate(values):
                complete[t][c] = complete[t][c] and v is not None
            scores[t][objective] = [0.0 if v is None else v for v in values]  # no verdict: the worst one

    return [
        JudgeResult(
            reward=[combine({name: s[c] for name, s in scores[t].items()}, weights) for c in range(len(task.candidates))],
            complete=complete[t],
            scores=scores[t],
            calls=calls[t],
            failures=failures[t],
            failure_example=getattr(backend, "last_unparsed", None) if failures[t] else None,
        )
        for t, task in enumerate(tasks)
    ]


def combine(scores: dict[str, float | None], weights: dict[str, float]) -> float:
    """Weighted mean over the objectives that apply to the candidate (None: nothing to judge, e.g.
    quality for a lone candidate); 0 when none applies. Failed judgments arrive here as 0, not None."""
    judged = {name: s for name, s in scores.items() if s is not None}
    total = sum(weights[name] for name in judged)
    return sum(weights[name] * s for name, s in judged.items()) / total if total else 0.0


@serve.deployment
class Judge:
    def __init__(self, cfg: JudgeConfig, data_cfg: DataConfig):
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.backend = make_judge_backend(cfg.backend, data_cfg, cfg.llm)
        self.score.set_max_batch_size(cfg.max_batch_size)
        self.score.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def score(self, tasks: list[JudgeTask]) -> list[JudgeResult]:
        return await score_tasks(self.backend, tasks, self.cfg)

    async def pointwise(self, objective: str, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        """One objective's verdicts on given texts: evaluation uses this."""
        if objective not in POINTWISE:
            raise ValueError(f"pointwise objective must be one of {POINTWISE}, not {objective!r}")
        return await getattr(self.backend, objective)(queries)

    async def compare(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        return await self.backend.compare(queries)

    def settings(self) -> dict:
        """What this replica judges with: a run that attaches to it checks these against its own."""
        return teacher_settings(self.cfg, self.data_cfg)

    async def coherence(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        return await self.backend.coherence(queries)


def judge_app(cfg: JudgeConfig, data_cfg: DataConfig):
    return deployment_options(Judge, cfg).bind(cfg, data_cfg)


def teacher_settings(cfg, data_cfg: DataConfig) -> dict:
    """A judge's or rewriter's deployment section and data section, as JSON: what `attach` compares."""
    return {"deployment": cfg.model_dump(mode="json"), "data": data_cfg.model_dump(mode="json")}


def deployment_options(deployment, cfg):
    """Replica count or autoscaling, request limit and CPUs of one deployment, from its config."""
    scaling = {"autoscaling_config": cfg.autoscaling} if cfg.autoscaling else {"num_replicas": cfg.num_replicas}
    return deployment.options(
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        **scaling,
    )
