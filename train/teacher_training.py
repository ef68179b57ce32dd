"""`sip train-judge` and `sip train-rewriter`: teach an HF causal LM to be sip's judge or rewriter on
tasks the world labels (train/judge_tasks.py).

The tasks are rendered exactly as the LLM backends render them (serve/llm.py templates, the model's
chat template, the prefilled answer start), so the model learns the very prompts a run sends it.
Two stages, both TRL trainers:

1. SFT warm start: prompt → the right answer after the answer start (loss on the answer only).
2. GRPO, the paper's recipe: the model samples answers and is rewarded for them. Judge: 1 for a
   verdict that parses and is right, else 0. Rewriter: a clean suffix must come back as an exact
   copy (1, else 0); a corrupted one scores its rewrite's safety × no false claim × quality under
   the world teacher.

Before, during (every `eval_every` steps) and after training, greedy answers on two held-out sets
are scored as a run would read them: `heldout_texts` (new documents, sentence shapes and
candidates about the training world's subjects: how a teacher meets text in SIP) and
`unseen_subjects` (subjects it never saw). Outputs in `output_dir`: `model/` (an HF folder for
`judge.llm.model` / `rewriter.llm.model`), `sft/` and `grpo/` (resumable TRL checkpoints),
`report.json`, `curve.jsonl` and `curves.png`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from functools import cached_property
from pathlib import Path
from statistics import mean
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sip.config import SMOLLM2_DIR, WorldConfig
from sip.train.judge_tasks import KINDS, SHORT_PROMPTS, JudgeTask, RewriteTask, make_rewrite_tasks, make_tasks, whole_pool

HELDOUT = ("heldout_texts", "unseen_subjects")


class TeacherTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(SMOLLM2_DIR, description="HF causal LM folder to start from (`sip convert-smollm2` writes the default)")
    output_dir: Path
    world: WorldConfig = WorldConfig()
    # The defaults are the measured SmolLM2 judge run of docs/results.md (about an hour on 2 cores).
    train_tasks: int = Field(3000, ge=1)
    eval_tasks: int = Field(60, ge=3, description="tasks per held-out set")
    eval_every: int = Field(25, ge=1, description="steps between held-out evaluations and checkpoints")
    sft_steps: int = Field(75, ge=0)
    sft_lr: float = Field(2e-4, gt=0)
    grpo_steps: int = Field(10, ge=0)
    grpo_lr: float = Field(1e-5, gt=0)
    num_generations: int = Field(4, ge=2, description="GRPO: answers sampled per prompt")
    temperature: float = Field(1.0, gt=0, description="GRPO: sampling temperature")
    batch_size: int = Field(8, ge=1, description="prompts per step (SFT), sampled answers per step (GRPO)")
    max_tokens: int = Field(12, ge=1, description="longest answer")
    train_layers: int | None = Field(
        None, ge=1, description="train only the top N transformer blocks and the final norm, the embeddings and lower "
        "blocks frozen (None: all). SmolLM2 on 2 CPU cores, 10 of its 30 blocks: a step takes 0.55x the time")
    torch_threads: int = Field(2, ge=1)
    seed: int = 0
    resume: bool = Field(True, description="continue from the newest checkpoint in output_dir")


class JudgeTrainConfig(TeacherTrainConfig):
    output_dir: Path = Path("runs/judge")
    kinds: list[Literal["quality", "safety", "factuality"]] = list(KINDS)
    prompts: dict[Literal["quality", "safety", "factuality"], str] = Field(
        default_factory=lambda: dict(SHORT_PROMPTS),
        description="the judge.llm.prompts the model learns; a run must use the same ones")


class RewriterTrainConfig(TeacherTrainConfig):
    # The measured SmolLM2 rewriter run of docs/results.md (about 32 minutes of training on 2 shared cores).
    output_dir: Path = Path("runs/rewriter")
    train_tasks: int = Field(2000, ge=1)
    eval_tasks: int = Field(30, ge=3, description="tasks per held-out set")
    eval_every: int = Field(20, ge=1, description="steps between held-out evaluations and checkpoints")
    sft_steps: int = Field(20, ge=0)
    sft_lr: float = Field(1e-4, gt=0)
    grpo_steps: int = Field(3, ge=0)
    max_tokens: int = Field(40, ge=1, description="longest rewrite")
    prompt: str = Field("rewrite_short_v1", description="the rewriter.llm.prompts.rewrite the model learns; a run must use the same")
    reward_judge: str = Field(
        "world", description="who scores a rewrite of a corrupted suffix during GRPO: `world` (the world teacher, which "
        "knows the truth) or the HF folder of a judge `sip train-judge` wrote (its safety verdict x its preference for "
        "the rewrite over the corrupted suffix, both orders); held-out scores always come from the world teacher")
    reward_judge_prompts: dict[Literal["quality", "safety", "factuality"], str] = Field(
        default_factory=lambda: dict(SHORT_PROMPTS), description="the prompts that judge was trained on")


def generate(model, tokenizer, prompts: list[str], max_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers, as the hf engine writes them at temperature 0."""
    import torch

    tokenizer.padding_side = "left"
    answers = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return answers


class TeacherTraining:
    """SFT then GRPO of one teacher role; the role says what its tasks, answers, rewards and scores are."""

    def __init__(self, cfg: TeacherTrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.curve_path = self.out / "curve.jsonl"
        self.heldout = {split: self.tasks(split, cfg.eval_tasks) for split in HELDOUT}

    # ---- what a role defines --------------------------------------------------------------------

    def tasks(self, split: str, n: int) -> list: ...

    def prompt(self, task) -> str:
        """The prompt a backend sends for this task, up to and including the answer start."""

    def target(self, task) -> str:
        """What the model should write after the answer start."""

    def reward(self, task, completion: str) -> float: ...

    def score(self, tasks: list, completions: list[str]) -> dict:
        """Held-out metrics; its "headline" value is the curve's."""

    # ---- the shared run -------------------------------------------------------------------------

    def run(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(self.cfg.torch_threads)
        torch.manual_seed(self.cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        start = Path(self.cfg.model).expanduser()
        self.tokenizer = AutoTokenizer.from_pretrained(start)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        report_path = self.out / "report.json"
        report = json.loads(report_path.read_text()) if self.cfg.resume and report_path.exists() else {}
        rows = [json.loads(line) for line in self.curve_path.read_text().splitlines()] if self.curve_path.exists() else []
        self.train_seconds = max((r.get("train_seconds", 0.0) for r in rows), default=0.0)
        self._clock = time.monotonic()
        if "before" not in report:
            report["before"] = self._evaluate(AutoModelForCausalLM.from_pretrained(start))
            report_path.write_text(json.dumps(report, indent=2))
            self._append({"stage": "before", "step": 0, **_flat(report["before"])})
        train = self.tasks("train", self.cfg.train_tasks)
        model_dir = self._grpo(self._sft(start, train), train)
        final = self.out / "model"
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.save_pretrained(final)
        self.tokenizer.save_pretrained(final)
        report.update(after=self._evaluate(model), model=str(final), config=self.cfg.model_dump(mode="json"))
        self._append({"stage": "after", "step": self.cfg.sft_steps + self.cfg.grpo_steps, **_flat(report["after"])})
        report_path.write_text(json.dumps(report, indent=2))
        self._plot()
        return report

    def _evaluate(self, model) -> dict:
        results = {}
        for split, tasks in self.heldout.items():
            answers = generate(model, self.tokenizer, [self.prompt(t) for t in tasks], self.cfg.max_tokens)
            results[split] = self.score(tasks, answers)
        return results

    def _callback(self, stage: str, offset: int):
        """Held-out scores every `eval_every` steps, and the trainer's reward and loss, into curve.jsonl."""
        from transformers import TrainerCallback

        training = self

        class Curve(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % training.cfg.eval_every == 0:
                    scores = training._evaluate(model)
                    training._append({"stage": stage, "step": offset + state.global_step, **_flat(scores)})

            def on_log(self, args, state, control, logs=None, **kwargs):
                kept = {k: v for k, v in (logs or {}).items() if k in ("loss", "reward", "mean_token_accuracy")}
                if kept:
                    training._append({"stage": stage, "step": offset + state.global_step, **kept})

        return Curve()

    def _append(self, row: dict) -> None:
        """A curve row, stamped with the seconds spent training so far (evaluations included; resumes add up)."""
        now = time.monotonic()
        self.train_seconds += now - self._clock
        self._clock = now
        with open(self.curve_path, "a") as f:
            f.write(json.dumps({**row, "train_seconds": round(self.train_seconds, 1)}) + "\n")

    def _args(self, stage: str, steps: int, lr: float) -> dict:
        return dict(output_dir=str(self.out / stage), max_steps=steps, learning_rate=lr, use_cpu=True, report_to="none",
                    logging_steps=max(1, min(10, self.cfg.eval_every)), save_steps=self.cfg.eval_every, save_total_limit=2,
                    seed=self.cfg.seed, bf16=False, dataloader_num_workers=0,
                    per_device_train_batch_size=self.cfg.batch_size,
                    gradient_checkpointing=False)  # TRL's default recomputes activations: a third more time, and memory is ample

    def _model(self, start: Path):
        """The model a stage trains, with everything below the top `train_layers` blocks frozen."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(start)
        if self.cfg.train_layers is not None:
            blocks = model.model.layers
            if self.cfg.train_layers > len(blocks):
                raise ValueError(f"train_layers={self.cfg.train_layers}, but {start} has {len(blocks)} blocks")
            model.requires_grad_(False)
            for module in (*blocks[len(blocks) - self.cfg.train_layers :], model.model.norm):
                module.requires_grad_(True)
        return model

    def _stage(self, stage: str, make_trainer) -> Path:
        """Run one TRL stage (resuming its newest checkpoint) unless it finished before; returns its model folder."""
        done = self.out / stage / "final"
        if (done / "config.json").exists():
            return done
        trainer = make_trainer()
        resume = self.cfg.resume and any((self.out / stage).glob("checkpoint-*"))
        trainer.train(resume_from_checkpoint=resume or None)
        trainer.save_model(str(done))
        self.tokenizer.save_pretrained(done)
        return done

    def _sft(self, start: Path, train: list) -> Path:
        if self.cfg.sft_steps == 0:
            return start
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        def trainer():
            data = Dataset.from_list([{"prompt": self.prompt(t), "completion": self.target(t)} for t in train])
            args = SFTConfig(**self._args("sft", self.cfg.sft_steps, self.cfg.sft_lr), completion_only_loss=True,
                             max_length=None, packing=False)
            return SFTTrainer(model=self._model(start), args=args, train_dataset=data, processing_class=self.tokenizer,
                              callbacks=[self._callback("sft", 0)])

        return self._stage("sft", trainer)

    def _grpo(self, start: Path, train: list) -> Path:
        if self.cfg.grpo_steps == 0:
            return start
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        by_prompt = {self.prompt(t): t for t in train}

        def reward(prompts: list[str], completions: list[str], **_) -> list[float]:
            return [self.reward(by_prompt[p], c) for p, c in zip(prompts, completions)]

        def trainer():
            args = GRPOConfig(**self._args("grpo", self.cfg.grpo_steps, self.cfg.grpo_lr), num_generations=self.cfg.num_generations,
                              max_completion_length=self.cfg.max_tokens, temperature=self.cfg.temperature, beta=0.0)
            return GRPOTrainer(model=self._model(start), reward_funcs=reward, args=args, processing_class=self.tokenizer,
                               train_dataset=Dataset.from_list([{"prompt": p} for p in by_prompt]),
                               callbacks=[self._callback("grpo", self.cfg.sft_steps)])

        return self._stage("grpo", trainer)

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.curve_path.read_text().splitlines()] if self.curve_path.exists() else []
        fig, (held, by_time, train) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
        for split in HELDOUT:
            points = [(r["step"], r[split]) for r in rows if split in r]
            if points:
                held.plot(*zip(*points), marker="o", label=split)
        held.axvline(self.cfg.sft_steps, color="grey", linestyle=":", label="SFT → GRPO")
        held.set(title=f"held-out {self.headline_name} (greedy)", xlabel="step", ylim=(0, 1))
        held.legend()
        parts = sorted({k for r in rows for k in r if k.startswith("heldout_texts/") and k.split("/")[1] in self.parts})
        for key in parts:
            points = [(r["train_seconds"] / 60, r[key]) for r in rows if key in r and "train_seconds" in r]
            by_time.plot(*zip(*points), marker=".", label=key.split("/")[1])
        by_time.set(title="held-out texts, by part, against training time", xlabel="minutes of training, evaluations included", ylim=(0, 1))
        if parts:
            by_time.legend()
        for key in ("reward", "mean_token_accuracy"):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                train.plot(*zip(*points), marker=".", label=key)
        train.set(title="training: GRPO reward, SFT token accuracy", xlabel="step", ylim=(0, 1))
        train.legend()
        fig.savefig(self.out / "curves.png", dpi=110)
        plt.close(fig)


class JudgeTraining(TeacherTraining):
    headline_name = "verdict accuracy (unparsed = wrong)"
    parts = KINDS

    def tasks(self, split: str, n: int) -> list[JudgeTask]:
        return make_tasks(self.cfg.world, split, n, self.cfg.seed, self.cfg.kinds, self.cfg.prompts)

    def prompt(self, task: JudgeTask) -> str:
        from sip.serve.engines import render_prompt
        from sip.serve.llm import Template

        return render_prompt(self.tokenizer, Template.load(task.template, task.kind).render(**task.fields))

    def target(self, task: JudgeTask) -> str:
        return task.target

    def verdict(self, task: JudgeTask, completion: str) -> float | None:
        """The verdict a backend reads from the completion (cut at the template's stop strings)."""
        from sip.serve.engines import cut_at_stop
        from sip.serve.llm import PARSERS, Template

        template = Template.load(task.template, task.kind)
        return PARSERS[task.kind](template.answer_start + cut_at_stop(completion, template.stop),
                                  list(task.fields.values()), len(template.answer_start))

    def reward(self, task: JudgeTask, completion: str) -> float:
        return float(self.verdict(task, completion) == task.label)

    def score(self, tasks: list[JudgeTask], completions: list[str]) -> dict:
        right, unparsed = defaultdict(list), defaultdict(list)
        for task, completion in zip(tasks, completions):
            got = self.verdict(task, completion)
            for key in (task.kind, "all"):
                right[key].append(got == task.label)
                unparsed[key].append(got is None)
        scores = {key: {"accuracy": mean(v), "unparsed": mean(unparsed[key]), "n": len(v)} for key, v in right.items()}
        return {**scores, "headline": scores["all"]["accuracy"]}


class RewriterTraining(TeacherTraining):
    headline_name = "rewrite score (copy rate and safe, true rewrites)"
    parts = ("copy_rate", "safety_of_rewrites", "no_false_claim_in_rewrites")

    def tasks(self, split: str, n: int) -> list[RewriteTask]:
        return make_rewrite_tasks(self.cfg.world, split, n, self.cfg.seed)

    @cached_property
    def teacher(self):
        """The world teacher of a world holding every subject of the pools: it knows the unseen ones too."""
        from sip.serve.world_teacher import WorldTeacher
        from sip.world import World

        return WorldTeacher(World.from_config(whole_pool(self.cfg.world)))

    @cached_property
    def template(self):
        from sip.serve.llm import Template

        return Template.load(self.cfg.prompt, "rewrite")

    def prompt(self, task: RewriteTask) -> str:
        from sip.serve.engines import render_prompt

        return render_prompt(self.tokenizer, self.template.render(**task.fields))

    def target(self, task: RewriteTask) -> str:
        return task.rewrite

    def rewrite(self, task: RewriteTask, completion: str) -> str | None:
        from sip.serve.llm import parse_rewrite

        ending = task.fields["prefix_ending"]
        return parse_rewrite(ending + completion, ending, task.suffix)

    def _clean(self, task: RewriteTask, text: str) -> float:
        """Safety × no false claim × quality of a rewrite, under the world teacher."""
        t = self.teacher
        return (t.safety_score(text) * float(t.factuality_score(text, task.subject, task.prefix) > 0)
                * t.quality_score(task.prefix, text, task.subject))

    @cached_property
    def judge(self):
        """The trained judge that scores corrupted-suffix rewrites in GRPO (reward_judge), with probability verdicts."""
        from sip.serve.llm import make_llm_backend
        from sip.config import LLMConfig

        cfg = LLMConfig(model=self.cfg.reward_judge, prompts=self.cfg.reward_judge_prompts, verdict="probability",
                        batch_size=16, torch_threads=self.cfg.torch_threads)
        return make_llm_backend("hf", cfg, ("quality", "safety"))

    def _judged(self, task: RewriteTask, text: str) -> float:
        """Safety x preference over the corrupted suffix (both orders), under the trained judge."""
        import asyncio

        from sip.records import Passage

        passage = Passage(task.prefix, task.suffix)

        async def ask():
            safe, = await self.judge.safety([(passage, text)])
            first, second = await self.judge.compare([(passage, text, task.suffix), (passage, task.suffix, text)])
            return safe * (first + 1 - second) / 2

        return asyncio.run(ask())

    def reward(self, task: RewriteTask, completion: str, scorer: str | None = None) -> float:
        text = self.rewrite(task, completion)
        if text is None:
            return 0.0
        if not task.corrupted:
            return float(text == task.suffix)
        return self._clean(task, text) if (scorer or self.cfg.reward_judge) == "world" else self._judged(task, text)

    def score(self, tasks: list[RewriteTask], completions: list[str]) -> dict:
        copies, safety, truth, rewards, unparsed, overlap = [], [], [], [], [], []
        for task, completion in zip(tasks, completions):
            text = self.rewrite(task, completion)
            unparsed.append(text is None)
            rewards.append(self.reward(task, completion, scorer="world"))
            overlap.append(_word_f1(text or "", task.rewrite))
            if not task.corrupted:
                copies.append(text == task.suffix)
            elif text is not None:
                safety.append(self.teacher.safety_score(text))
                truth.append(float(self.teacher.factuality_score(text, task.subject, task.prefix) > 0))
            else:
                safety.append(0.0)
                truth.append(0.0)
        return {"copy_rate": mean(copies), "safety_of_rewrites": mean(safety), "no_false_claim_in_rewrites": mean(truth),
                "word_f1_to_ideal": mean(overlap), "unparsed": mean(unparsed), "n": len(tasks), "headline": mean(rewards)}


def _flat(scores: dict) -> dict:
    """Held-out scores as one curve row: `split` is the headline, `split/metric` each number beside it."""
    row = {}
    for split, metrics in scores.items():
        row[split] = metrics["headline"]
        for name, value in metrics.items():
            if isinstance(value, dict):  # the judge's per-objective {accuracy, unparsed, n}
                row[f"{split}/{name}"] = value["accuracy"]
            elif name not in ("headline", "n"):
                row[f"{split}/{name}"] = value
    return row


def _word_f1(text: str, ideal: str) -> float:
    """Word overlap (F1 over the multisets of lower-case words) of a rewrite with the ideal one."""
    from collections import Counter

    got, want = Counter(text.lower().split()), Counter(ideal.lower().split())
    common = sum((got & want).values())
    return 0.0 if not common else 2 * common / (sum(got.values()) + sum(want.values()))


def train_judge(cfg: JudgeTrainConfig) -> dict:
    return JudgeTraining(cfg).run()


def train_rewriter(cfg: RewriterTrainConfig) -> dict:
    return RewriterTraining(cfg).run()
