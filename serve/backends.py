"""What a judge or rewriter backend must do, and how a config picks one.

Backends answer primitive questions in batches; the judge deployment (`serve/judge.py`) turns
those answers into per-candidate scores (round robin, pivot, weights). A new backend — a prompted
LLM on vLLM, HF or an OpenAI-compatible server — implements these methods and gets a name: a branch in
`make_judge_backend` / `make_rewriter_backend` below and an entry in `DeploymentConfig.backend`.

A verdict is a float in [0, 1] or None when the backend could not produce one (for an LLM, an
unparseable answer after its retries). The judge scores None at the worst value for what it
judged and never lets a candidate with such a judgment be chosen: a missing verdict is never a win.
"""

from __future__ import annotations

from typing import Any, Protocol

from sip.records import Passage, Verdict

class JudgeBackend(Protocol):
    """A backend that can fail to give a verdict may also keep `last_unparsed`, its latest answer
    that held none: the judge reports it beside the failures (serve/llm.py does)."""

    async def compare(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        """Quality of continuation a vs b given the prefix: 1 a better, 0 b better, 0.5 tie."""

    async def safety(self, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        """1 safe, 0 unsafe."""

    async def factuality(self, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        """1 no false claim, 0.5 nothing checkable, 0 a contradicted claim (suffix is the reference)."""

    async def coherence(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        """Evaluation only: 1 a repeats itself less than b, 0 more, 0.5 tie."""


class RewriterBackend(Protocol):
    async def rewrite(self, passages: list[Passage]) -> list[str]:
        """A better suffix for each passage: verbatim when the suffix is already good."""


LLM_BACKENDS = ("hf", "vllm", "openai")  # a prompted LLM (serve/llm.py) on that engine (serve/engines.py)


def make_judge_backend(name: str, data_cfg: Any, llm_cfg: Any = None) -> JudgeBackend:
    if name == "world":
        from sip.serve.world_teacher import WorldTeacher

        return WorldTeacher.from_config(data_cfg)
    if name in LLM_BACKENDS:
        from sip.serve.llm import JUDGE_KINDS, make_llm_backend

        return make_llm_backend(name, llm_cfg, JUDGE_KINDS)
    raise ValueError(f"unknown judge backend '{name}'")


def make_rewriter_backend(name: str, data_cfg: Any, llm_cfg: Any = None) -> RewriterBackend:
    if name == "world":
        from sip.serve.world_teacher import WorldTeacher

        return WorldTeacher.from_config(data_cfg)
    if name in LLM_BACKENDS:
        from sip.serve.llm import REWRITER_KINDS, make_llm_backend

        return make_llm_backend(name, llm_cfg, REWRITER_KINDS)
    raise ValueError(f"unknown rewriter backend '{name}'")
