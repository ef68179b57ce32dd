"""Labelled tasks from the built-in world, to train an LLM judge and rewriter (SFT, then GRPO).

A sample is a prefix of 1-3 sentences about a subject and continuations of it: a clean one (1-2
true statements about the subject) and corrupted ones: the same statements with one fact stated as
its misconception, an insult or threat after a lead-in, a loop, and true statements about another
subject. Judge tasks pit the clean continuation against a corrupted one (quality), ask whether a
clean or unsafe one is safe (safety), or check a rephrasing of the clean one, true or misstated,
against it (factuality). Rewrite tasks map a clean suffix to itself and a corrupted one to a clean one.

Splits: `train`; `heldout_texts`, the same subjects in intros, statement templates and lead-ins
that `train` never uses (every third of each list, counted from its end); `unseen_subjects`, the
training shapes about countries and elements the world does not contain, each fact with a
misconception drawn as the world draws its own.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sip.serve.llm import VERDICTS, Template, rewrite_fields
from sip.config import WorldConfig
from sip.world import (
    _INTROS,
    _LOOP_WORDS,
    LEAD_INS,
    RELATIONS,
    Relation,
    Subject,
    World,
    _country_pool,
    _element_pool,
    draw_misconceptions,
    fill,
    relations_for,
    sentence_case,
    unsafe_sentence,
    word_count,
)

KINDS = ("quality", "safety", "factuality")
SPLITS = ("train", "heldout_texts", "unseen_subjects")
QUALITY_CORRUPTIONS = ("wrong_fact", "unsafe", "degenerate", "off_topic")
REWRITE_CORRUPTIONS = ("wrong_fact", "unsafe", "degenerate")  # an off-topic true text is no rewriter's job
SAFE_VARIANTS = ("clean", "safe_lead_in")  # a lead-in that ends safely is safe: the judge must read on
DIRECT_PROMPTS = {kind: f"{kind}_direct_v1" for kind in KINDS}
SHORT_PROMPTS = {kind: f"{kind}_short_v1" for kind in KINDS}  # about 70% of the direct prompts' tokens: cheaper to train and serve
# The judge's whole verdict line per label (the clear verdicts of serve/llm.py's table, not "possible" ones).
LABEL_VERDICTS = {kind: {value: line for line, value in VERDICTS[kind].items() if value in (0.0, 1.0)} for kind in KINDS}
_LOOP_LENGTH = 16  # words


@dataclass(frozen=True)
class JudgeTask:
    kind: str  # quality | safety | factuality
    template: str  # the prompt that `fields` fill and `target` answers
    fields: dict[str, str]
    label: float  # quality: 1.0 option 1 is better; safety: 1.0 safe; factuality: 1.0 no hallucination
    target: str  # what the judge writes after the template's answer_start
    subject: str  # Subject.key
    corruption: str | None  # the corrupted candidate's kind; None when the only candidate is clean


@dataclass(frozen=True)
class RewriteTask:
    prefix: str
    suffix: str
    rewrite: str  # the ideal rewrite: the suffix itself when it is clean
    corruption: str | None
    subject: str

    @property
    def corrupted(self) -> bool:
        return self.corruption is not None

    @property
    def fields(self) -> dict[str, str]:
        """The fields of the rewrite prompt, as the rewriter fills them; the target is `rewrite`."""
        return rewrite_fields(self.prefix, self.suffix)


@dataclass(frozen=True)
class _Sample:
    subject: Subject
    prefix: str
    clean: str  # every continuation starts with a space, as a suffix does
    wrong_fact: str  # `clean` with one fact stated as its misconception
    paraphrase: str  # the facts of `clean` in other templates
    wrong_paraphrase: str
    unsafe: str
    safe_lead_in: str  # the lead-in of `unsafe`, ending safely
    degenerate: str
    off_topic: str


def _share(items: Sequence, held_out: bool) -> tuple:
    """The split's share of a list: every third item from the end is held out."""
    held = set(items[::-3])
    return tuple(item for item in items if (item in held) == held_out)


def answer_target(kind: str, label: float, answer_start: str) -> str:
    verdict = LABEL_VERDICTS[kind][label]
    if not verdict.startswith(answer_start):
        raise ValueError(f"a {kind} template whose answer starts with {answer_start!r} cannot give {verdict!r}")
    return verdict[len(answer_start) :]


def whole_pool(world_cfg: WorldConfig) -> WorldConfig:
    """The world config that holds every usable subject: its teacher knows the unseen subjects too."""
    return world_cfg.model_copy(update={"countries": len(_country_pool()), "elements": len(_element_pool())})


def unseen_subjects(world: World) -> list[Subject]:
    return [s for s in _country_pool() + _element_pool() if s.key not in world.subjects]


def _unseen_misconceptions(world: World, subjects: list[Subject]) -> dict[tuple[str, str], str]:
    """One wrong value per fact, drawn as `World` draws its own: another value, from the world if any."""
    rng = random.Random(f"sip-judge-tasks/{world.cfg.seed}/unseen-misconceptions")
    return draw_misconceptions(rng, subjects, world.subjects.values(), _country_pool() + _element_pool())


class _Generator:
    """Samples of one split: its subjects, their misconceptions, and the sentence shapes it may use."""

    def __init__(self, world: World, split: str):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; choose one of {', '.join(SPLITS)}")
        held_out = split == "heldout_texts"
        self.templates = {
            name: _share(r.statements + r.pronoun_statements, held_out) for name, r in RELATIONS.items()
        }
        self.intros = {kind: _share(intros, held_out) for kind, intros in _INTROS.items()}
        self.lead_ins = _share(LEAD_INS, held_out)
        if split == "unseen_subjects":
            self.subjects = unseen_subjects(world)
            self.misconceptions = _unseen_misconceptions(world, self.subjects)
        else:
            self.subjects = list(world.subjects.values())
            self.misconceptions = world.misconceptions
        if len(self.subjects) < 2:
            raise ValueError(f"split {split}: fewer than 2 subjects (the world holds the whole pool)")

    def _sentence(self, template: str, subject: Subject, relation: Relation, wrong: bool = False) -> str:
        value = self.misconceptions[(subject.key, relation.name)] if wrong else subject.facts[relation.name]
        return sentence_case(fill(template, subject, value))

    def sample(self, rng: random.Random) -> _Sample:
        subject = rng.choice(self.subjects)
        relations = relations_for(subject.kind)
        rng.shuffle(relations)
        said = relations[: rng.randint(1, 2)]  # what the continuations state
        context = relations[len(said) :][: rng.randint(0, 2)]
        intro = sentence_case(fill(rng.choice(self.intros[subject.kind]), subject))
        prefix = " ".join([intro, *(self._sentence(rng.choice(self.templates[r.name]), subject, r) for r in context)])
        shapes = [rng.sample(self.templates[r.name], 2) for r in said]  # two phrasings per fact
        misstated = rng.choice(said)

        def continuation(phrasing: int, wrong: bool) -> list[str]:
            return [
                self._sentence(pair[phrasing], subject, r, wrong and r is misstated) for r, pair in zip(said, shapes)
            ]

        clean = continuation(0, wrong=False)
        lead_in = rng.choice([l for l in self.lead_ins if l.kind in (None, subject.kind)])
        texts = (
            clean,
            continuation(0, wrong=True),
            continuation(1, wrong=False),
            continuation(1, wrong=True),
            [unsafe_sentence(rng, subject, lead_in)],
            [fill(lead_in.text, subject) + fill(lead_in.safe, subject)],
            [self._loop(rng, subject, clean[0])],
            self._off_topic(rng, subject, len(said)),
        )
        return _Sample(subject, prefix, *("".join(" " + sentence for sentence in text) for text in texts))

    def _loop(self, rng: random.Random, subject: Subject, sentence: str) -> str:
        """A sentence, the subject's name, a stock phrase or a statement cut before its value, repeated."""
        stubs = [t.split("{v}")[0] for r in relations_for(subject.kind) for t in self.templates[r.name]]
        stub = sentence_case(fill(rng.choice([s for s in stubs if s]), subject).strip())
        unit = rng.choice((sentence, f"{sentence_case(subject.name)} is", rng.choice(_LOOP_WORDS), stub))
        return " ".join([unit] * max(3, _LOOP_LENGTH // word_count(unit)))

    def _off_topic(self, rng: random.Random, subject: Subject, count: int) -> list[str]:
        """True statements that name another subject (a pronoun would refer to the prefix's subject)."""
        other = rng.choice([s for s in self.subjects if s is not subject])
        relations = rng.sample(relations_for(other.kind), count)
        named = {r.name: [t for t in self.templates[r.name] if "{s}" in t] for r in relations}
        return [self._sentence(rng.choice(named[r.name]), other, r) for r in relations]


@functools.lru_cache(maxsize=8)
def _generator(cfg_json: str, split: str) -> _Generator:
    return _Generator(World.from_config(WorldConfig.model_validate_json(cfg_json)), split)


def _task_rng(world_cfg: WorldConfig, split: str, seed: int, what: str) -> random.Random:
    return random.Random(f"sip-judge-tasks/{world_cfg.seed}/{split}/{seed}/{what}")


def _judge_task(kind: str, sample: _Sample, variant: int, label: float) -> tuple[dict[str, str], str | None]:
    """The template fields and the corruption of a task; `variant` picks among the kinds of candidates."""
    if kind == "quality":
        corruption = QUALITY_CORRUPTIONS[variant % len(QUALITY_CORRUPTIONS)]
        bad = getattr(sample, corruption)
        first, second = (sample.clean, bad) if label else (bad, sample.clean)
        return {"prefix": sample.prefix, "option_1": first, "option_2": second}, corruption
    if kind == "safety":
        safe = getattr(sample, SAFE_VARIANTS[variant % len(SAFE_VARIANTS)])
        return {"prefix": sample.prefix, "candidate": safe if label else sample.unsafe}, None if label else "unsafe"
    candidate = sample.paraphrase if label else sample.wrong_paraphrase
    return {"prefix": sample.prefix, "reference": sample.clean, "candidate": candidate}, None if label else "wrong_fact"


def make_tasks(
    world_cfg: WorldConfig,
    split: str,
    n: int,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    prompts: Mapping[str, str] = DIRECT_PROMPTS,
) -> list[JudgeTask]:
    """`n` judge tasks in a shuffled order, the kinds taking turns.

    Within a kind, labels alternate and the corrupted candidate's kind cycles, so every label and
    every (label, corruption) pair is equally common over a multiple of 2 x kinds x corruptions.
    """
    generator = _generator(world_cfg.model_dump_json(), split)
    answer_starts = {kind: Template.load(prompts[kind], kind).answer_start for kind in kinds}
    tasks = []
    for i in range(n):
        kind, place = kinds[i % len(kinds)], i // len(kinds)
        label = 1.0 if place % 2 == 0 else 0.0
        sample = generator.sample(_task_rng(world_cfg, split, seed, str(i)))
        fields, corruption = _judge_task(kind, sample, place // 2, label)
        target = answer_target(kind, label, answer_starts[kind])
        tasks.append(JudgeTask(kind, prompts[kind], fields, label, target, sample.subject.key, corruption))
    _task_rng(world_cfg, split, seed, "order").shuffle(tasks)
    return tasks


def make_rewrite_tasks(world_cfg: WorldConfig, split: str, n: int, seed: int = 0) -> list[RewriteTask]:
    """`n` rewrite tasks in a shuffled order: half clean (copied), half corrupted, the corruptions taking turns."""
    generator = _generator(world_cfg.model_dump_json(), split)
    tasks = []
    for i in range(n):
        sample = generator.sample(_task_rng(world_cfg, split, seed, f"rewrite/{i}"))
        if i % 2 == 0:
            suffix = getattr(sample, SAFE_VARIANTS[i // 2 % len(SAFE_VARIANTS)])
            tasks.append(RewriteTask(sample.prefix, suffix, suffix, None, sample.subject.key))
            continue
        corruption = REWRITE_CORRUPTIONS[i // 2 % len(REWRITE_CORRUPTIONS)]
        rewrite = sample.safe_lead_in if corruption == "unsafe" else sample.clean
        tasks.append(RewriteTask(sample.prefix, getattr(sample, corruption), rewrite, corruption, sample.subject.key))
    _task_rng(world_cfg, split, seed, "rewrite-order").shuffle(tasks)
    return tasks
