import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict

import pytest

from sip.serve.llm import FIELDS, PARSERS, Template, parse_rewrite
from sip.serve.world_teacher import WorldTeacher, _preference, is_degenerate
from sip.config import WorldConfig
from sip.train.judge_tasks import (
    DIRECT_PROMPTS,
    KINDS,
    QUALITY_CORRUPTIONS,
    REWRITE_CORRUPTIONS,
    SPLITS,
    answer_target,
    make_rewrite_tasks,
    make_tasks,
    unseen_subjects,
)
from sip.world import _INTROS, LEAD_INS, World, _country_pool, _element_pool, fill, relations_for

CFG = WorldConfig()
FULL_CFG = WorldConfig(countries=len(_country_pool()), elements=len(_element_pool()))
SUBJECTS = {s.key: s for s in _country_pool() + _element_pool()}
N = 240  # a multiple of 2 labels x 3 kinds x 4 corruptions: every combination equally often


@pytest.fixture(scope="module")
def world():
    return World.from_config(CFG)


@pytest.fixture(scope="module")
def tasks():
    return {split: make_tasks(CFG, split, N, seed=1) for split in SPLITS}


@pytest.fixture(scope="module")
def teachers(world):
    """The world's teacher, and for unseen subjects the teacher of a world that holds every subject."""
    teacher = WorldTeacher(world)
    return {"train": teacher, "heldout_texts": teacher, "unseen_subjects": WorldTeacher(World.from_config(FULL_CFG))}


def texts(task):
    return list(task.fields.values())


def test_same_seed_same_tasks_other_seed_other_tasks():
    for split in SPLITS:
        assert make_tasks(CFG, split, 48, seed=5) == make_tasks(CFG, split, 48, seed=5)
        assert make_rewrite_tasks(CFG, split, 24, seed=5) == make_rewrite_tasks(CFG, split, 24, seed=5)
        one, other = make_tasks(CFG, split, 48, seed=5), make_tasks(CFG, split, 48, seed=6)
        assert len({t.fields["prefix"] for t in one} & {t.fields["prefix"] for t in other}) < 12
    assert make_tasks(CFG, "train", 48) != make_tasks(CFG.model_copy(update={"seed": 1}), "train", 48)


def test_tasks_are_the_same_in_another_process():
    code = "from sip.train.judge_tasks import *; from sip.config import WorldConfig as W; "
    code += "print(repr(make_tasks(W(), 'unseen_subjects', 24, 3) + make_rewrite_tasks(W(), 'train', 12, 3)))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert other.strip() == repr(make_tasks(CFG, "unseen_subjects", 24, 3) + make_rewrite_tasks(CFG, "train", 12, 3))


def test_labels_kinds_and_corruptions_are_balanced(tasks):
    for split, made in tasks.items():
        assert Counter((t.kind, t.label) for t in made) == {(k, l): N // 6 for k in KINDS for l in (0.0, 1.0)}
        quality = Counter((t.corruption, t.label) for t in made if t.kind == "quality")
        assert quality == {(c, l): N // 24 for c in QUALITY_CORRUPTIONS for l in (0.0, 1.0)}, split
        safe = [t for t in made if t.kind == "safety" and t.label == 1.0]
        lead_ins = [any(fill(l.text, SUBJECTS[t.subject]) in t.fields["candidate"] for l in LEAD_INS) for t in safe]
        assert sum(lead_ins) == len(safe) // 2  # half the safe candidates end a lead-in safely
        assert [t.kind for t in made[:12]] != list(KINDS) * 4  # shuffled, not in the order made


def test_tasks_are_well_formed(tasks):
    for made in tasks.values():
        for task in made:
            assert set(task.fields) == FIELDS[task.kind]
            assert all(text.strip() for text in texts(task))
            candidates = texts(task)[1:]
            assert len(set(candidates)) == len(candidates)  # the options, or reference and candidate, differ
            assert all(text.startswith(" ") for text in candidates)
            assert 1 <= len(re.findall(r"\.\s", task.fields["prefix"] + " ")) <= 3  # 1-3 sentences


@pytest.mark.parametrize("prompts", [DIRECT_PROMPTS, {kind: f"{kind}_v1" for kind in KINDS}])
def test_every_target_parses_to_the_label(prompts):
    for split in SPLITS:
        for task in make_tasks(CFG, split, 96, seed=2, prompts=prompts):
            template = Template.load(task.template, task.kind)
            assert task.template == prompts[task.kind]
            prompt = template.render(**task.fields)
            assert all(text.strip() in prompt.messages[-1][1] for text in texts(task))
            answer = prompt.answer_start + task.target
            parse = PARSERS[task.kind]
            assert parse(answer, texts(task), len(prompt.answer_start)) == task.label, (answer, task)
            assert parse(answer, texts(task), 0) == task.label  # an engine that cannot prefill


def test_a_target_the_template_cannot_give_is_refused():
    assert answer_target("quality", 0.0, "Conclusion: Option") == " 2"
    assert answer_target("factuality", 1.0, "") == '{"label": "No Hallucination"}'
    with pytest.raises(ValueError, match="cannot give"):
        answer_target("safety", 1.0, "Answer:")


def test_held_out_splits_never_repeat_a_training_text(tasks):
    train = make_tasks(CFG, "train", 3000, seed=1)
    train_prefixes = {t.fields["prefix"] for t in train}
    train_samples = {tuple(texts(t)) for t in train}
    for split in ("heldout_texts", "unseen_subjects"):
        assert not train_prefixes & {t.fields["prefix"] for t in tasks[split]}
        assert not train_samples & {tuple(texts(t)) for t in tasks[split]}
    rewrites = make_rewrite_tasks(CFG, "train", 1000, seed=1)
    held = {(r.prefix, r.suffix) for r in make_rewrite_tasks(CFG, "heldout_texts", N, seed=1)}
    assert not held & {(r.prefix, r.suffix) for r in rewrites}


def shapes(world, held_out):
    """Every sentence an intro or statement template of one split can give, and its lead-ins."""

    def share(items):
        held = items[::-3]  # every third, from the end
        return [item for item in items if (item in held) == held_out]

    subjects = world.subjects.values()
    found = {
        fill(t, s, v)
        for s in subjects
        for r in relations_for(s.kind)
        for t in share(r.statements + r.pronoun_statements)
        for v in (s.facts[r.name], world.misconceptions[(s.key, r.name)])
    }
    found |= {fill(t, s) for s in subjects for t in share(_INTROS[s.kind])}
    return found, {lead_in.text for lead_in in share(LEAD_INS)}


def used(world, made, lead_ins):
    """The sentences of the tasks' texts, and which of `lead_ins` they use."""
    found = set()
    for task in made:
        text = " ".join(texts(task))
        found |= set(re.split(r"(?<=[.!?])\s+", text.strip()))
        found |= {lead_in for lead_in in lead_ins if fill(lead_in, world.subjects[task.subject]) in text}
    return found


def test_each_split_uses_only_its_own_sentence_shapes(tasks, world):
    """Every third intro, statement template and lead-in, counted from the end, is the held-out split's alone."""
    held, held_lead_ins = shapes(world, held_out=True)
    kept, kept_lead_ins = shapes(world, held_out=False)
    in_train = used(world, make_tasks(CFG, "train", 1200, seed=1), held_lead_ins | kept_lead_ins)
    in_heldout = used(world, tasks["heldout_texts"], held_lead_ins | kept_lead_ins)
    assert not in_train & (held | held_lead_ins) and not in_heldout & (kept | kept_lead_ins)
    assert len(in_train & kept) > 300 and len(in_heldout & held) > 100
    assert in_train >= kept_lead_ins and in_heldout >= held_lead_ins


def test_unseen_subjects_are_outside_the_world(tasks, world, teachers):
    unseen = {s.key for s in unseen_subjects(world)}
    assert unseen and not unseen & set(world.subjects)
    assert len(unseen) == len(_country_pool()) + len(_element_pool()) - len(world.subjects)
    made = tasks["unseen_subjects"]
    assert {t.subject for t in made} <= unseen and len({t.subject for t in made}) > 50
    about = {c.subject for t in made for c in teachers["unseen_subjects"].claims(" ".join(texts(t)), t.subject)}
    assert unseen >= about and len(about) > 50  # the off-topic statements name unseen subjects too
    with pytest.raises(ValueError, match="fewer than 2 subjects"):
        make_tasks(FULL_CFG, "unseen_subjects", 3)
    with pytest.raises(ValueError, match="split="):
        make_tasks(CFG, "test", 3)


def oracle(teacher, task):
    """The world teacher's verdict on a task.

    Quality ties on the teacher's quality score (fluency x repetition x topic, blind to facts) are
    broken as the prompt asks: fewer false statements first, then safety.
    """
    f, subject = task.fields, task.subject
    if task.kind == "safety":
        return teacher.safety_score(f["candidate"])
    if task.kind == "factuality":
        return teacher.factuality_score(f["candidate"], subject, f["prefix"])
    for score in (
        lambda text: teacher.quality_score(f["prefix"], text, subject),
        lambda text: teacher.factuality_score(text, subject, f["prefix"]),
        teacher.safety_score,
    ):
        verdict = _preference(score(f["option_1"]) - score(f["option_2"]))
        if verdict != 0.5:
            return verdict
    return 0.5


def test_the_world_teacher_agrees_with_the_labels(tasks, teachers):
    for split, made in tasks.items():
        agree = defaultdict(list)
        for task in made:
            agree[(task.kind, task.corruption)].append(oracle(teachers[split], task) == task.label)
        shares = {group: sum(hits) / len(hits) for group, hits in agree.items()}
        overall = sum(map(sum, agree.values())) / len(made)
        assert overall >= 0.97 and min(shares.values()) >= 0.9, (split, overall, shares)


def test_rewrite_tasks_copy_clean_suffixes_and_fix_corrupted_ones(teachers):
    for split in SPLITS:
        made = make_rewrite_tasks(CFG, split, 60, seed=1)
        assert Counter(r.corruption for r in made) == {None: 30, **{c: 10 for c in REWRITE_CORRUPTIONS}}
        teacher = teachers[split]
        for task in made:
            assert task.corrupted == (task.corruption is not None)
            assert (task.rewrite == task.suffix) != task.corrupted
            rewritten = teacher.rewrite_suffix(task.prefix, task.suffix, task.subject)
            assert (rewritten == task.suffix) != task.corrupted, asdict(task)
            assert teacher.factuality_score(task.rewrite, task.subject, task.prefix) != 0.0  # no false claim
            assert teacher.safety_score(task.rewrite) == 1.0 and not is_degenerate(task.rewrite)
            prompt = Template.load("rewrite_v1", "rewrite").render(**task.fields)
            assert task.fields["words"] == str(len(task.suffix.split())) and task.suffix in prompt.messages[-1][1]
            ending = task.fields["prefix_ending"]
            assert prompt.answer_start == ending and task.prefix.endswith(ending)
            assert parse_rewrite(prompt.answer_start + task.rewrite, ending, task.suffix) == task.rewrite


def test_thousands_of_tasks_per_cpu_second():
    make_tasks(CFG, "unseen_subjects", 1)  # the generators are built once per config and split
    make_tasks(CFG, "heldout_texts", 1)
    start = time.process_time()
    for split in SPLITS:
        make_tasks(CFG, split, 1000, seed=9)
    assert 3000 / (time.process_time() - start) > 1000


def test_judge_accuracy_bench_scores_the_world_teacher():
    """bench/judge_accuracy.py runs end to end; the oracle is right on every safety and factuality task."""
    from pathlib import Path

    bench = Path(__file__).parents[2] / "bench" / "judge_accuracy.py"
    done = subprocess.run([sys.executable, str(bench), "--model", "world", "--tasks", "12"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| heldout") or line.startswith("| unseen")]
    assert len(rows) == 6, done.stdout
    for split, kind, greedy, probability in rows:
        if kind.strip() in ("safety", "factuality"):
            assert float(greedy) == float(probability) == 1.0, (split, kind, greedy, probability)
