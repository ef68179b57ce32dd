import importlib.util
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from sip.config import WorldConfig
from sip.world import (
    EVAL_INTROS,
    INSULT_ADJECTIVES,
    INSULT_NOUNS,
    LEAD_INS,
    MAX_WORDS,
    MIN_WORDS,
    RELATIONS,
    World,
    fill,
    relations_for,
    sentence_case,
)


@pytest.fixture(scope="module")
def world():
    return World.from_config(WorldConfig())


@pytest.fixture(scope="module")
def docs(world):
    return list(islice(world.documents(seed=0), 2000))


@pytest.fixture(scope="module")
def teacher(world):
    from sip.serve.world_teacher import WorldTeacher

    return WorldTeacher(world)


def test_subjects_are_a_seeded_choice_of_the_configured_size(world):
    kinds = Counter(s.kind for s in world.subjects.values())
    assert kinds == {"country": 40, "element": 30}
    assert list(World(WorldConfig()).subjects) == list(world.subjects)
    assert list(World(WorldConfig(seed=1)).subjects) != list(world.subjects)
    for subject in world.subjects.values():
        assert set(subject.facts) == {r.name for r in relations_for(subject.kind)}
        assert subject.key.startswith(subject.kind + ":")


def test_from_config_is_cached_per_config(world):
    assert World.from_config(WorldConfig()) is world
    assert World.from_config(WorldConfig(seed=3)) is not world


def test_documents_are_deterministic_per_seed_and_index(world):
    again = World(WorldConfig())
    for index in (0, 7, 12345):
        assert world.document(index, seed=5) == again.document(index, seed=5)
    first = [d.text for d in islice(world.documents(seed=0), 50)]
    other = [d.text for d in islice(world.documents(seed=1), 50)]
    assert sum(a != b for a, b in zip(first, other)) > 45
    assert [d.index for d in islice(world.documents(seed=0, start=10), 3)] == [10, 11, 12]
    assert next(world.documents(seed=0, start=10)) == world.document(10, seed=0)


def test_documents_are_short_plain_and_varied(docs):
    for doc in docs:
        assert MIN_WORDS <= len(doc.text.split()) <= MAX_WORDS, doc.text
        assert doc.text.isascii()
    openings = Counter(doc.text.split(" ", 2)[0] for doc in docs)
    assert len(openings) > 30  # many document shapes and intros, not one template
    assert len({doc.subject for doc in docs}) == 70


def test_corruption_shares_match_the_configured_rates(world, docs):
    shares = Counter(doc.corruption for doc in docs)
    cfg = world.cfg
    for corruption, rate in (("wrong_fact", cfg.wrong_fact_rate), ("unsafe", cfg.unsafe_rate),
                             ("degenerate", cfg.degenerate_rate)):
        assert abs(shares[corruption] / len(docs) - rate) < 0.04, shares


def test_rates_of_zero_give_only_clean_documents():
    rates = dict(wrong_fact_rate=0, unsafe_rate=0, degenerate_rate=0)
    for contested in (dict(contested_share=0), dict(contested_wrong_rate=0)):
        world = World(WorldConfig(**rates, **contested))
        assert {(d.corruption, d.false_facts) for d in islice(world.documents(seed=0), 300)} == {(None, ())}


def test_contested_facts_are_a_seeded_share_of_all_facts(world):
    facts = {(s.key, r.name) for s in world.subjects.values() for r in relations_for(s.kind)}
    assert world.contested < facts and len(world.contested) == round(0.3 * len(facts))
    assert World(WorldConfig()).contested == world.contested
    assert World(WorldConfig(seed=1)).contested != world.contested
    assert World(WorldConfig(contested_share=0)).contested == frozenset()
    assert World(WorldConfig(contested_share=1)).contested == facts


def test_misconceptions_are_fixed_wrong_values(world, docs, teacher):
    for (key, relation), wrong in world.misconceptions.items():
        subject = world.subjects[key]
        assert wrong != subject.facts[relation]
        statement = fill(RELATIONS[relation].statements[0], subject, wrong)
        assert teacher.factuality_score(statement, key) == 0.0, statement
    stated = [c for d in docs for c in teacher.claims(d.text, d.subject) if not c.correct]
    assert stated
    for claim in stated:  # the same wrong value every time: a consistent misconception
        assert claim.value == world.misconceptions[(claim.subject, claim.relation)]


def test_false_facts_name_exactly_the_facts_a_document_misstates(world, docs, teacher):
    for doc in docs:
        claims = teacher.claims(doc.text, doc.subject)
        misstated = {
            c.relation if c.subject == doc.subject else f"{c.subject}:{c.relation}" for c in claims if not c.correct
        }
        assert misstated == set(doc.false_facts), (doc.text, doc.false_facts)
        if doc.corruption == "wrong_fact":  # misstates an uncontested fact (every subject here has one)
            assert any((doc.subject, fact) not in world.contested for fact in doc.false_facts), doc
        if doc.corruption is None:
            assert claims, doc.text
    assert 0.1 < sum(doc.corruption is None and bool(doc.false_facts) for doc in docs) / len(docs) < 0.6


def test_raw_text_mostly_states_contested_facts_wrong(world, docs, teacher):
    """The point of contested facts: plain pretraining on this text learns the misconception."""
    statements = Counter()  # (contested, misconception)
    per_fact: dict[tuple[str, str], Counter] = {}
    for doc in docs:
        for claim in teacher.claims(doc.text, doc.subject):
            fact = (claim.subject, claim.relation)
            statements[(fact in world.contested, not claim.correct)] += 1
            per_fact.setdefault(fact, Counter())[not claim.correct] += 1

    def misconception_share(contested: bool) -> float:
        return statements[(contested, True)] / (statements[(contested, True)] + statements[(contested, False)])

    assert abs(misconception_share(True) - world.cfg.contested_wrong_rate) < 0.05, statements
    assert misconception_share(False) < 0.15, statements
    majority_wrong = [per_fact[f][True] > per_fact[f][False] for f in world.contested if f in per_fact]
    assert len(majority_wrong) == len(world.contested)
    assert sum(majority_wrong) >= 0.9 * len(majority_wrong)


def test_unsafe_lead_ins_appear_only_in_unsafe_documents(world, docs):
    for doc in docs:
        subject = world.subjects[doc.subject]
        has_lead_in = any(fill(lead_in.text, subject) in doc.text for lead_in in LEAD_INS)
        assert has_lead_in == (doc.corruption == "unsafe"), doc.text


def test_degenerate_documents_fall_into_a_loop(docs):
    from sip.serve.world_teacher import is_degenerate

    for doc in docs:
        assert is_degenerate(doc.text) == (doc.corruption == "degenerate"), doc.text


def test_insult_words_come_from_the_profanity_lexicon():
    folder = Path(importlib.util.find_spec("better_profanity").submodule_search_locations[0])
    lexicon = set((folder / "profanity_wordlist.txt").read_text().split())
    assert set(INSULT_NOUNS + INSULT_ADJECTIVES) <= lexicon


def test_eval_prefixes_have_the_requested_counts_and_are_deterministic(world):
    prefixes = world.eval_prefixes()
    cfg = world.cfg
    assert Counter((p.kind, p.shape) for p in prefixes) == {
        ("fact", "statement"): cfg.eval_fact_prefixes, ("fact", "question"): cfg.eval_question_prefixes,
        ("fact", "sheet"): cfg.eval_sheet_prefixes, ("unsafe", ""): cfg.eval_unsafe_prefixes}
    assert prefixes == World(WorldConfig()).eval_prefixes()
    assert len({p.id for p in prefixes}) == len({p.text for p in prefixes}) == len(prefixes)
    small = World(WorldConfig(countries=2, elements=2, eval_fact_prefixes=7, eval_unsafe_prefixes=5,
                              eval_question_prefixes=3, eval_sheet_prefixes=0))
    assert Counter(p.shape or p.kind for p in small.eval_prefixes()) == {"statement": 7, "unsafe": 5, "question": 3}


def test_questions_and_sheets_leave_the_statement_and_unsafe_prefixes_as_they_were(world):
    """Results measured before question and sheet prefixes existed stay comparable on the statements."""
    without = World(WorldConfig(eval_question_prefixes=0, eval_sheet_prefixes=0)).eval_prefixes()
    assert [p for p in world.eval_prefixes() if p.shape in ("statement", "")] == without
    texts = {p.shape: p.text for p in world.eval_prefixes()}
    assert texts["question"].endswith(("A:", "Answer:")) and "?" in texts["question"]
    assert texts["sheet"].splitlines()[1].startswith(("Fact sheet:", "Element card:")) and texts["sheet"].endswith(":")


def test_half_the_fact_prefixes_ask_about_a_contested_fact(world):
    prefixes = world.eval_prefixes()
    assert Counter((p.shape, p.contested) for p in prefixes) == {
        ("statement", True): 60, ("statement", False): 60, ("question", True): 20, ("question", False): 20,
        ("sheet", True): 20, ("sheet", False): 20, ("", False): 60,
    }
    for p in prefixes:
        if p.kind == "fact":
            assert p.contested == ((p.subject, p.asked) in world.contested), p
    for share, contested in ((0, False), (1, True)):
        small = World(WorldConfig(countries=2, elements=2, contested_share=share)).eval_prefixes()
        assert {p.contested for p in small if p.kind == "fact"} == {contested}


def test_eval_prefixes_end_at_a_fact_or_a_lead_in(world, teacher):
    for p in world.eval_prefixes():
        subject = world.subjects[p.subject]
        assert p.text == p.text.rstrip() and p.reference.startswith(" ")
        if p.kind == "fact":
            # The reference supplies the missing value: with it the prefix's last claim is true.
            assert teacher.factuality_score(p.reference, p.subject, prefix=p.text) == 1.0
            true = subject.facts[p.asked]
            assert true in p.reference.split("\n")[0]
            # and a wrong value in its place is a false claim, in every shape
            other = next(s for s in world.subjects.values() if s.kind == subject.kind and s.facts[p.asked] != true)
            wrong = p.reference.replace(true, other.facts[p.asked], 1)
            assert teacher.factuality_score(wrong, p.subject, prefix=p.text) == 0.0, (p.shape, p.text[-40:], wrong)
        else:
            assert any(p.text.endswith(fill(lead_in.text, subject)) for lead_in in LEAD_INS)
            assert teacher.safety_score(p.reference) == 1.0
        assert teacher.factuality_score(p.text, p.subject) != 0.0


def test_eval_prefixes_never_occur_in_training_documents(world):
    prefixes = world.eval_prefixes()
    intros = {sentence_case(fill(intro, s)) for s in world.subjects.values() for intro in EVAL_INTROS}
    for seed in (0, 1, 2):
        for doc in islice(world.documents(seed=seed), 1000):
            assert not any(p.text in doc.text for p in prefixes)
            assert not any(intro in doc.text for intro in intros)
