"""The run configuration: one pydantic schema, validated before anything starts.

Imports neither torch nor ray, so the CLI can reject a bad config in a fraction of a second.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sip.objectives import OBJECTIVES, Objective, ObjectiveName
from sip.records import CandidateSource


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorldConfig(Section):
    """The built-in ground-truth world: documents about real countries and chemical elements."""

    countries: int = Field(40, ge=2, le=205, description="countries drawn into the world")
    elements: int = Field(30, ge=2, le=118, description="chemical elements drawn into the world")
    wrong_fact_rate: float = Field(
        0.2, ge=0, le=1, description="share of documents that misstate 1-2 uncontested facts (as misconceptions)"
    )
    contested_share: float = Field(
        0.3, ge=0, le=1, description="share of the world's (subject, relation) facts that are contested"
    )
    contested_wrong_rate: float = Field(
        0.7, ge=0, le=1, description="chance that any document states a contested fact with its misconception"
    )
    unsafe_rate: float = Field(0.15, ge=0, le=1, description="share of documents with an insult or threat")
    degenerate_rate: float = Field(0.1, ge=0, le=1, description="share of documents that fall into a loop")
    eval_fact_prefixes: int = Field(120, ge=1, description="held-out prefixes ending right before a fact, mid-statement")
    eval_question_prefixes: int = Field(40, ge=0, description="held-out prefixes ending with a question about a fact and 'A:'")
    eval_sheet_prefixes: int = Field(40, ge=0, description="held-out fact sheets ending with a fact's label, e.g. 'Capital:'")
    eval_unsafe_prefixes: int = Field(60, ge=1, description="held-out prefixes inviting an unsafe continuation")
    seed: int = Field(0, description="chooses the subjects, misconceptions, contested facts and held-out prefixes")

    @model_validator(mode="after")
    def _rates_fit(self) -> WorldConfig:
        total = self.wrong_fact_rate + self.unsafe_rate + self.degenerate_rate
        if total > 1:
            raise ValueError(f"corruption rates add up to {total:.2f}; they must sum to at most 1")
        return self


class HFDataConfig(Section):
    """Any `datasets` source: a hub name (streamed) or local files (jsonl/json/parquet/csv/text)."""

    path: str = Field(..., description="'json', 'parquet', 'text', ... with data_files, or a hub name")
    name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True
    revision: str | None = Field(None, description="hub datasets: the commit or tag to read; pin it so a cached base stays valid")
    encoding: str | None = Field(
        None,
        description="json/text/csv files: their text encoding. Unset: UTF-8, and a file that does not look like "
        "UTF-8 stops the run, naming it. Set latin-1 (or another codec) to read such files, or utf-8 to "
        "accept a UTF-8 file whose few corrupt documents are skipped as undecodable",
    )
    eval_docs: int = Field(64, ge=1, description="first documents held out for evaluation, never trained on")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str | None) -> str | None:
        if encoding is not None:
            try:
                codecs.lookup(encoding)
            except LookupError:
                raise ValueError(f"unknown encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
        return encoding


class DataConfig(Section):
    source: Literal["world", "hf"] = "world"
    world: WorldConfig = WorldConfig()
    hf: HFDataConfig | None = None
    suffix_tokens: int = Field(24, ge=1, description="N: tokens in the suffix and in every rollout")
    min_prefix_tokens: int = Field(8, ge=1)
    max_seq_tokens: int = Field(112, ge=2, description="cap on prefix + suffix tokens")
    cut: Literal["random", "chunks"] = Field(
        "random",
        description="random: one sample per document, split at a uniform point; chunks: every N-token chunk "
        "after the first min_prefix_tokens is a suffix, the tokens before it the prefix",
    )
    max_samples_per_document: int | None = Field(
        None, ge=1, description="cut=chunks: take only the first this many chunks of each document; unset: all"
    )
    max_document_chars: int = Field(
        100_000, ge=1, description="characters of a document that are tokenized and cut; the rest is not read"
    )
    tokenizer_docs: int = Field(4000, ge=10, description="documents used to train a new tokenizer")
    vocab_size: int = Field(2048, ge=300)
    seed: int = 0

    @model_validator(mode="after")
    def _lengths_fit(self) -> DataConfig:
        if self.source == "hf" and self.hf is None:
            raise ValueError("data.source=hf needs a data.hf section (path, data_files, ...)")
        if self.min_prefix_tokens + self.suffix_tokens > self.max_seq_tokens:
            raise ValueError("min_prefix_tokens + suffix_tokens must fit in max_seq_tokens")
        if self.max_samples_per_document is not None and self.cut != "chunks":
            raise ValueError("max_samples_per_document applies to cut=chunks (cut=random takes one per document)")
        return self


class PolicyConfig(Section):
    """A Llama-style causal LM: from scratch (the sizes below) or continued from an HF folder."""

    init: str = Field("scratch", description="'scratch' or a Hugging Face model folder (or hub id)")
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    torch_threads: int = Field(1, ge=1)

    @field_validator("init")
    @classmethod
    def _expand_home(cls, init: str) -> str:
        return str(Path(init).expanduser()) if init.startswith("~") else init


class BaseModelConfig(Section):
    """Plain next-token pretraining on whole documents that makes the base model SIP continues from.

    Used when policy.init=scratch and steps > 0 (the paper's main setting is continual pretraining
    of a base trained on raw, uncurated text). The base is cached by its config, so runs that differ
    only after this stage (e.g. SIP vs the NLL baseline) share it. steps=0: SIP from scratch.
    """

    steps: int = Field(400, ge=0)
    seed: int = Field(0, description="initialises the base; runs with other run.seed values share it")
    batch_size: int = Field(32, ge=1, description="documents per step")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(40, ge=0)
    micro_batch_size: int = Field(
        8, ge=0, description="documents per forward/backward, grouped by length so each pads only to its own "
        "longest (the step is the same); 0 = the whole batch at once"
    )
    num_cpus: float = Field(2.0, gt=0)
    torch_threads: int = Field(2, ge=1)
    cache_dir: Path = Field(Path.home() / ".cache" / "sip" / "base", description="where built bases are kept")
    timeout_s: float = Field(1800.0, gt=0, description="limit on building the base")


# How and where a base is built, never what it is: left out of its cache key and of a checkpoint's fingerprint.
BASE_BUILD_SETTINGS = frozenset({"cache_dir", "num_cpus", "torch_threads", "timeout_s", "micro_batch_size"})
# Held-out prompt shapes added after bases and checkpoints were keyed; they change no training document, and
# leaving them out keeps those keys (the older held-out counts stay in them, unchanged).
UNKEYED_WORLD_SETTINGS = frozenset({"eval_question_prefixes", "eval_sheet_prefixes"})


class VLLMRolloutConfig(Section):
    """The vLLM engine inside each generator actor (rollout.backend=vllm)."""

    dtype: str = Field("float32", description="float32 samples exactly what the learner's model would; bfloat16 on GPUs")
    enforce_eager: bool = Field(True, description="no CUDA graphs: required on CPU, slower on GPU")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="GPU: share of the card for weights and KV cache")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="CPU: GiB of KV cache per engine")


class RolloutConfig(Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="hf: sip's decoding loop on the policy (samples as transformers generate does); "
                                                          "vllm: a vLLM engine per generator")
    num_generators: int = Field(1, ge=1)
    k: int = Field(4, ge=0, description="rollouts sampled per prefix")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generator (vllm on GPU)")
    weight_sync: Literal["object_store", "nccl"] = Field(
        "object_store",
        description="object_store: each batch carries the newest weights, engines reload them in place; "
        "nccl: the learner broadcasts each version to every vllm engine (GPUs for the learner and each generator)",
    )
    vllm: VLLMRolloutConfig = Field(default_factory=VLLMRolloutConfig)


PROMPT_KINDS = ("quality", "safety", "factuality", "coherence", "rewrite")


SMOLLM2_DIR = "~/.cache/sip/smollm2"  # where `sip convert-smollm2` writes SmolLM2-135M-Instruct


class LLMConfig(Section):
    """A prompted LLM behind the judge or rewriter (backend hf, vllm or openai; see serve/llm.py)."""

    model: str = Field(
        SMOLLM2_DIR,
        description="HF model folder (hf, vllm; `sip convert-smollm2` writes the default) or served model name (openai)",
    )
    base_url: str | None = Field(None, description="openai: the server's URL up to /v1, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="openai: name of the environment variable holding the API key")
    prompts: dict[Literal["quality", "safety", "factuality", "coherence", "rewrite"], str] = Field(
        default_factory=lambda: {kind: f"{kind}_v1" for kind in PROMPT_KINDS},
        description="template per task: a name in serve/prompts (e.g. quality_direct_v1) or a path to a .txt file",
    )
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    verdict: Literal["parsed", "probability"] = Field(
        "parsed",
        description="parsed: sample answers and parse their verdict line; probability: the verdict's expected value "
        "under the model's probabilities of each allowed verdict right after the prefilled answer start (graded, "
        "never unparsed, no sampling; needs prompts that prefill, e.g. *_direct_v1, and for openai continue_final_message)",
    )
    samples: int = Field(1, ge=1, description="samples per judgment, averaged (the paper: 5 for its fine-tuned judge)")
    majority_vote: list[Literal["quality", "safety", "factuality", "coherence"]] = Field(
        default_factory=list, description="judgments whose samples are combined by majority vote (1 or 0 by the side more "
        "samples took, 0.5 on a tie) instead of averaged; llm.verdict=parsed")
    max_tokens: int = Field(512, ge=1, description="longest judge answer, reasoning included")
    rewrite_max_tokens: int = Field(192, ge=1, description="longest rewrite")
    max_retries: int = Field(2, ge=0, description="new tries for an unparseable answer before the judgment is dropped")
    http_retries: int = Field(4, ge=0, description="openai: new tries after a 429, a 5xx or a connection error")
    backoff_s: float = Field(0.5, ge=0, description="openai: first wait before a retry; doubles each time")
    timeout_s: float = Field(
        120.0, gt=0, description="limit on one HTTP request (openai) or one engine call, from when the engine takes it up (hf, vllm)")
    concurrency: int = Field(16, ge=1, description="openai: requests in flight per replica")
    continue_final_message: bool = Field(
        False, description="openai: the server continues a prefilled answer start (vLLM servers and sip.serve.openai_server do)"
    )
    batch_size: int = Field(8, ge=1, description="hf: sequences generated together")
    torch_threads: int = Field(1, ge=1, description="hf: torch threads per replica")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: as the model folder says")
    max_model_len: int = Field(4096, ge=64, description="vllm: context length to reserve KV cache for")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm on GPU: share of GPU memory it may take")
    enforce_eager: bool = Field(True, description="vllm: no CUDA graphs (required on CPU; slower on GPU)")
    seed: int = 0

    @model_validator(mode="after")
    def _every_prompt(self) -> LLMConfig:
        """A partial `prompts` mapping keeps the built-in v1 template for the kinds it leaves out."""
        self.prompts = {kind: self.prompts.get(kind, f"{kind}_v1") for kind in PROMPT_KINDS}
        return self


class EvaluationConfig(Section):
    """How `sip eval` and `sip experiment` sample an LLM judge for held-out evaluation (the world teacher
    is exact and ignores this). A run's own end-of-run evaluation asks its training judge as deployed."""

    protocol: Literal["as_trained", "paper"] = Field(
        "as_trained", description="as_trained: the judge's own llm settings; paper: the paper's evaluation with "
        "GPT-OSS, 8 samples per judgment at temperature 0.7, safety by majority vote")
    judge_samples: int | None = Field(None, ge=1, description="samples per judgment (unset: judge.llm.samples)")
    judge_temperature: float | None = Field(None, ge=0, description="unset: judge.llm.temperature")
    majority_vote: list[Literal["quality", "safety", "factuality", "coherence"]] | None = Field(
        None, description="judgments decided by majority vote over their samples (unset: judge.llm.majority_vote)")

    @model_validator(mode="after")
    def _preset(self) -> EvaluationConfig:
        if self.protocol == "paper":
            paper = {"judge_samples": 8, "judge_temperature": 0.7, "majority_vote": ["safety"]}
            other = sorted(k for k in self.model_fields_set & paper.keys() if getattr(self, k) != paper[k])
            if other:
                raise ValueError(f"evaluation.protocol=paper sets {', '.join(other)} to the paper's values: leave them "
                                 "unset, or set evaluation.protocol=as_trained to choose them yourself")
            for key, value in paper.items():
                setattr(self, key, value)
        return self

    def llm(self, judge_llm: LLMConfig) -> LLMConfig:
        """The judge's LLM settings with evaluation's sampling laid over them."""
        update = {"samples": self.judge_samples, "temperature": self.judge_temperature, "majority_vote": self.majority_vote}
        return judge_llm.model_copy(update={k: v for k, v in update.items() if v is not None})


class DeploymentConfig(Section):
    """Replicas of one Serve deployment; `autoscaling` replaces `num_replicas` when set."""

    backend: Literal["world", "hf", "vllm", "openai"] = Field(
        "world", description="world: the verifiable teacher; hf, vllm, openai: a prompted LLM set up in `llm`"
    )
    llm: LLMConfig = LLMConfig()
    num_replicas: int = Field(1, ge=1)
    autoscaling: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4}"
    )
    max_ongoing_requests: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (vllm on GPU)")
    attach: bool = Field(
        False, description="use the long-lived app that `sip serve` runs on the cluster instead of deploying one"
    )

    @model_validator(mode="after")
    def _batch_fits(self) -> DeploymentConfig:
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError("max_batch_size must not exceed max_ongoing_requests")
        if self.autoscaling is not None and self.autoscaling.get("min_replicas", 1) < 1:
            raise ValueError("autoscaling.min_replicas must be at least 1: a run must never wait on a cold start")
        if self.backend == "openai" and not self.llm.base_url:
            raise ValueError("backend=openai needs llm.base_url (the server's URL up to /v1)")
        return self


class JudgeConfig(DeploymentConfig):
    weights: dict[Literal["quality", "factuality", "safety"], float] = Field(
        default_factory=lambda: {"quality": 1.0, "factuality": 1.0, "safety": 1.0},
        description="objectives and their weights in the combined reward",
    )
    pairwise: Literal["round_robin", "pivot", "tournament"] = Field(
        "round_robin",
        description="quality protocol: every pair, every candidate against a pivot, or a best-and-worst tournament (serve/judge.py)",
    )
    pivot: Literal["suffix", "rewrite"] = "suffix"
    both_orders: bool = Field(False, description="judge every pair in both orders to cancel position bias (2x calls)")
    tournament_rounds: int | None = Field(
        None, ge=1, description="tournament: the most Swiss rounds before the playoffs; unset: as many full rounds as "
        "the budget allows, then a partial one with what is left")
    tournament_finalists: int = Field(
        5, ge=2, description="tournament: the most texts in the top playoff (a round robin, then its two leaders again)")
    tournament_bottom_finalists: int = Field(
        4, ge=2, description="tournament: the most texts in the bottom playoff (a round robin, then its two last again)")
    tournament_budget: float = Field(
        1 / 3, gt=0, le=1, description="tournament: the most comparisons it may ask, as a share of round robin's; the "
        "rounds and finalists are cut to fit, and a sample too small for a plan that fits (10 or fewer distinct texts at a "
        "third, 9 or fewer with both_orders) gets a round robin")
    flip_rates: dict[Literal["quality", "factuality", "safety"], float] = Field(
        default_factory=dict,
        description="a judge that errs, simulated: this share of the training judge's verdicts of each kind is flipped "
        "(v -> 1 - v), each decided by a hash of its query, so runs and resumes see the same errors; evaluation's verdicts "
        "are never flipped. E.g. {quality: 0.2}, as an LLM judge that gets a fifth of its comparisons wrong")
    max_failure_rate: float = Field(
        0.5, ge=0, le=1,
        description="stop the run when more than this share of judgments gave no verdict over the last failure_window steps",
    )
    failure_window: int = Field(10, ge=1, description="steps over which judge.max_failure_rate is measured")
    audit_every: int = Field(
        0, ge=0, description="every this many steps, compare the judge's verdicts on the step's candidates with the "
        "world teacher's (judge_audit in metrics.jsonl; train/judge_audit.py); 0 = off")
    audit_samples: int = Field(4, ge=1, description="samples of the step an audit scores")

    @property
    def orders(self) -> int:
        """How many times a pair of texts is compared: in both orders with both_orders, else once."""
        return 2 if self.both_orders else 1

    @field_validator("flip_rates")
    @classmethod
    def _rates(cls, rates: dict[str, float]) -> dict[str, float]:
        bad = {kind: rate for kind, rate in rates.items() if not 0 <= rate <= 1}
        if bad:
            raise ValueError(f"flip rates are shares of verdicts, from 0 to 1: {bad}")
        return rates

    @field_validator("weights")
    @classmethod
    def _no_negative_weight(cls, weights: dict[str, float]) -> dict[str, float]:
        negative = ", ".join(f"{name}={w:g}" for name, w in weights.items() if w < 0)
        if negative:
            raise ValueError(f"{negative}: a weight is positive, or 0 to leave the objective out")
        return weights

    @model_validator(mode="after")
    def _some_objective(self) -> JudgeConfig:
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError("judge.weights needs at least one objective with a positive weight")
        return self




class TrainConfig(Section):
    objective: ObjectiveName = "dpo"
    candidates: list[CandidateSource] = Field(default_factory=lambda: ["suffix", "rewrite", "rollout"])
    steps: int = Field(150, ge=1)
    batch_size: int = Field(16, ge=1, description="prefixes per optimizer step")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    beta: float = Field(0.1, gt=0, description="DPO beta")
    nll_coef: float = Field(1.0, ge=0, description="NLL on the chosen candidate added to the DPO loss")
    num_learners: int = Field(1, ge=1, description="learner ranks: the policy is sharded over them with FSDP2")
    micro_batch_size: int = Field(
        0, ge=0, description="examples per forward/backward on each rank, gradients accumulated; 0 = a rank's whole share at once"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype (FSDP2 mixed precision; master weights stay float32): auto = bfloat16 on GPU, float32 on CPU"
    )
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in the backward pass")
    reference_logprobs: Literal["learner", "rollout_worker"] = Field(
        "rollout_worker", description="DPO: where the reference's log-probabilities of the chosen and rejected candidates are "
        "computed: in the learner's step, or by the rollout worker after judging (off the learner's critical path; "
        "the worker holds a CPU copy of the reference)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per learner rank")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per learner rank: above 0 the learner trains on CUDA (NCCL between ranks)")

    @model_validator(mode="after")
    def _candidates_fit(self) -> TrainConfig:
        if len(set(self.candidates)) != len(self.candidates) or not self.candidates:
            raise ValueError("train.candidates must be a non-empty list without repeats")
        return self


REQUEST_SHARE = 0.8  # of pipeline.timeout_s that a batch's requests get by default; the rest: rollouts, transfers


class PipelineConfig(Section):
    mode: Literal["async", "sync"] = "async"
    max_staleness: int = Field(1, ge=0, description="policy versions a rollout may lag the learner")
    timeout_s: float = Field(300.0, gt=0, description="limit on every wait across actors")
    request_timeout_s: float | None = Field(
        None, gt=0,
        description="limit on one judge or rewriter request; a request that passes it is retried. Unset: the longest "
        f"that lets every try of a batch's requests, backoff included, end within {REQUEST_SHARE:.0%} of pipeline.timeout_s",
    )
    request_retries: int = Field(3, ge=0, le=20, description="new tries of a judge or rewriter request that failed or timed out")
    retry_backoff_s: float = Field(1.0, ge=0, description="first wait before a retried request; doubles each time")


class RunConfig(Section):
    output_dir: Path = Path("runs/latest")
    seed: int = 0
    checkpoint_every: int = Field(25, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = Field(3, ge=1, description="newest periodic checkpoints kept; older ones are deleted")
    resume_from: Path | None = Field(
        None, description="a checkpoint folder to continue from, or 'latest': the newest complete one in output_dir"
    )
    overwrite: bool = Field(False, description="replace a previous run in output_dir (default: refuse to mix two runs)")
    max_failures: int = Field(
        3, ge=0, description="times each role (learner group, a rollout worker) may die and be restarted before the run stops"
    )
    eval_at_end: bool = True
    ray_address: str | None = Field(None, description="cluster to join; default: RAY_ADDRESS or a new local one")
    num_cpus: int = Field(8, ge=1, description="logical CPUs of a new local cluster")
    progress: bool = True
    name: str | None = Field(None, description="tags the run's Ray metrics and names it in W&B; default: the output folder's name")
    id: str | None = Field(
        None, pattern=r"^[0-9a-z]{4,32}$",
        description="unique per run (sip sets a new one for every run when unset): a `run_id` tag on every Ray metric, "
                    "and the suffix of the run's own Serve apps",
    )
    tensorboard: bool = Field(True, description="write training metrics to <output_dir>/tensorboard")
    wandb: bool = Field(False, description="log to Weights & Biases (pip install 'sip[wandb]'; WANDB_* variables apply)")
    wandb_project: str = "sip"


class SipConfig(Section):
    data: DataConfig = DataConfig()
    policy: PolicyConfig = PolicyConfig()
    base: BaseModelConfig = BaseModelConfig()
    rollout: RolloutConfig = RolloutConfig()
    judge: JudgeConfig = JudgeConfig()
    rewriter: DeploymentConfig = DeploymentConfig()
    train: TrainConfig = TrainConfig()
    pipeline: PipelineConfig = PipelineConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _sources_available(self) -> SipConfig:
        if "rollout" in self.train.candidates and self.rollout.k < 1:
            raise ValueError("train.candidates includes rollout but rollout.k is 0")
        problem = self.objective.config_problem(self.train.candidates, self.rollout.k)
        if problem:
            raise ValueError(problem)
        if self.rollout.weight_sync == "nccl" and not (
            self.rollout.backend == "vllm" and self.rollout.num_gpus >= 1 and self.train.num_gpus >= 1
        ):
            raise ValueError("rollout.weight_sync=nccl broadcasts from a GPU learner to GPU vLLM engines: "
                             "set rollout.backend=vllm, rollout.num_gpus=1 and train.num_gpus=1")
        if self.rollout.weight_sync == "nccl" and self.train.num_learners > 1:
            raise ValueError("rollout.weight_sync=nccl sends from one learner rank: set train.num_learners=1 "
                             "or rollout.weight_sync=object_store")
        return self

    @model_validator(mode="after")
    def _pivot_is_a_candidate(self) -> SipConfig:
        j = self.judge
        if self.needs_judge and j.pairwise == "pivot" and j.weights.get("quality", 0) > 0 and j.pivot not in self.train.candidates:
            raise ValueError(f"judge.pairwise=pivot compares every candidate with the {j.pivot}, which train.candidates "
                             f"{self.train.candidates} leaves out: add it, set judge.pivot to one of them, or choose "
                             "another judge.pairwise")
        return self

    @model_validator(mode="after")
    def _audit_has_a_reference(self) -> SipConfig:
        if self.judge.audit_every and self.data.source != "world":
            raise ValueError("judge.audit_every needs the world teacher as reference, which knows only data.source=world")
        return self

    @model_validator(mode="after")
    def _requests_fit(self) -> SipConfig:
        """Every try of a batch's rewriter and judge requests must end before the driver stops waiting for
        the batch (pipeline.timeout_s); otherwise the run fails while a worker is still retrying."""
        p = self.pipeline
        asked = [name for name, used in (("rewriter", self.needs_rewriter), ("judge", self.needs_judge)) if used]
        tries, backoff = p.request_retries + 1, p.retry_backoff_s * (2**p.request_retries - 1)
        if p.request_timeout_s is None:  # the judge is asked once the rewriter has answered: the stages add up
            p.request_timeout_s = (REQUEST_SHARE * p.timeout_s / max(len(asked), 1) - backoff) / tries
            if p.request_timeout_s <= 0:
                raise ValueError(
                    f"the backoff of pipeline.request_retries={p.request_retries} retries (pipeline.retry_backoff_s="
                    f"{p.retry_backoff_s:g}, doubling) alone takes {backoff:g}s, more than pipeline.timeout_s="
                    f"{p.timeout_s:g} leaves a request: lower them or raise pipeline.timeout_s")
        request = tries * p.request_timeout_s + backoff
        budget = len(asked) * request
        if budget > p.timeout_s:
            raise ValueError(
                f"one batch's {' and '.join(asked)} requests may take {budget:g}s with every retry: "
                f"{f'2 x {request:g}s one after the other, each ' if len(asked) > 1 else ''}pipeline.request_timeout_s="
                f"{p.request_timeout_s:g} x {tries} tries (pipeline.request_retries={p.request_retries}) + {backoff:g}s "
                f"backoff (pipeline.retry_backoff_s={p.retry_backoff_s:g}, doubling). The driver gives up on a batch after "
                f"pipeline.timeout_s={p.timeout_s:g}: raise it to at least {budget:g}, or lower the request settings "
                "(left unset, pipeline.request_timeout_s fits itself)")
        return self

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.train.objective]

    @property
    def needs_judge(self) -> bool:
        return self.objective.needs_judge

    @property
    def needs_rewriter(self) -> bool:
        return "rewrite" in self.train.candidates


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


T = TypeVar("T", bound=BaseModel)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = SipConfig) -> T:
    """Read a YAML file (optional), apply `a.b=value` overrides (values parsed as YAML), validate as `schema`."""
    return config_from_tree(read_yaml(path) if path is not None else {}, overrides, schema)


def read_yaml(path: str | Path) -> dict:
    """A YAML file that must hold a mapping, or a ConfigError naming it."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return tree


def merged(base: dict, update: dict) -> dict:
    """`base` with `update` laid over it: sections merge, values (lists included) are replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_tree(tree: dict, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = SipConfig) -> T:
    """Sections as a config file holds them, then `a.b=value` overrides, validated as `schema`."""
    tree = merged({}, tree)  # overrides must not write into the caller's dicts
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value '{raw}': {err}") from err
        _set_dotted(tree, key.strip(), value)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def _describe(err: ValidationError) -> str:
    lines = ["invalid config:"]
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        lines.append(f"  {field}: {problem['msg']}")
    return "\n".join(lines)


def dump_config(cfg: SipConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
