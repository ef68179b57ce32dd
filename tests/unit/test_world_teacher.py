import asyncio
import random
from itertools import islice

import pytest

from sip.records import Passage
from sip.serve.world_teacher import SAFETY_THRESHOLD, WorldTeacher, is_degenerate
from sip.config import DataConfig, HFDataConfig, WorldConfig
from sip.world import World


@pytest.fixture(scope="module")
def world():
    return World.from_config(WorldConfig())


@pytest.fixture(scope="module")
def teacher(world):
    return WorldTeacher.from_config(DataConfig())


@pytest.fixture(scope="module")
def plain():
    return WorldTeacher.from_config(DataConfig(source="hf", hf=HFDataConfig(path="json", data_files="docs.jsonl")))


@pytest.fixture(scope="module")
def country(world):
    return next(s for s in world.subjects.values() if s.kind == "country")


@pytest.fixture(scope="module")
def other(world, country):
    """Another country whose capital, continent and population all differ from `country`'s."""
    return next(
        s for s in world.subjects.values()
        if s.kind == "country" and s is not country and all(s.facts[r] != country.facts[r] for r in s.facts)
    )


@pytest.fixture(scope="module")
def element(world):
    return next(s for s in world.subjects.values() if s.kind == "element")


def windows(world, corruption, count, seed=11):
    """(prefix, suffix, subject) cut from generated documents at random word boundaries.

    corruption=None takes clean documents that misstate no (contested) fact either.
    """
    rng = random.Random(seed)
    found = []
    for doc in world.documents(seed=seed):
        if doc.corruption != corruption or (corruption is None and doc.false_facts):
            continue
        words = doc.text.split(" ")
        cut = rng.randint(4, len(words) - 8)
        found.append((" ".join(words[:cut]), " " + " ".join(words[cut : cut + 18]), doc.subject))
        if len(found) == count:
            return found


# ---- factuality ----


def test_true_false_and_uncheckable_sentences(teacher, country, other):
    name, key = country.name, country.key
    assert teacher.factuality_score(f"The capital of {name} is {country.facts['capital']}.", key) == 1.0
    assert teacher.factuality_score(f"The capital of {name} is {other.facts['capital']}.", key) == 0.0
    assert teacher.factuality_score(f"{other.facts['capital']} is the capital of {name}.", None) == 0.0
    assert teacher.factuality_score("The weather was pleasant all week.", key) == 0.5
    assert teacher.factuality_score(f"{name} has a population of about {country.facts['population']}.", key) == 1.0
    assert teacher.factuality_score(f"About {other.facts['population']} people live in {name}.", key) == 0.0


def test_a_claim_about_another_subject_is_checked_against_that_subject(teacher, country, other):
    text = f"By comparison, the capital of {other.name} is {other.facts['capital']}."
    assert teacher.factuality_score(text, country.key) == 1.0
    [claim] = teacher.claims(text, country.key)
    assert claim.subject == other.key and claim.relation == "capital" and claim.correct
    assert text[slice(*claim.span)] == other.facts["capital"]


def test_pronoun_statements_refer_to_the_passage_subject(teacher, country, other):
    assert teacher.factuality_score(f"Its capital is {country.facts['capital']}.", country.key) == 1.0
    assert teacher.factuality_score(f"Its capital is {other.facts['capital']}.", country.key) == 0.0
    assert teacher.factuality_score(f"Its capital is {other.facts['capital']}.", None) == 0.5


def test_element_facts(teacher, element):
    name, facts = element.name, element.facts
    assert teacher.factuality_score(f"The chemical symbol for {name} is {facts['symbol']}.", element.key) == 1.0
    wrong_number = int(facts["number"]) + 1
    assert teacher.factuality_score(f"{name.capitalize()} has atomic number {wrong_number}.", element.key) == 0.0
    mass = float(facts["mass"])
    assert teacher.factuality_score(f"Its atomic mass is about {mass:.2f}. It is used a lot.", element.key) == 1.0
    assert teacher.factuality_score(f"Its atomic mass is about {mass + 3:.1f}. It is used a lot.", element.key) == 0.0


def test_a_value_cut_at_the_end_is_not_a_claim(teacher, country, element):
    capital = country.facts["capital"]
    assert teacher.factuality_score(f"The capital of {country.name} is {capital[:2]}", country.key) == 0.5
    assert teacher.factuality_score(f"The capital of {country.name} is {capital}", country.key) == 0.5
    number = element.facts["number"]
    assert teacher.factuality_score(f"The atomic number of {element.name} is {number[0]}", element.key) == 0.5
    assert teacher.factuality_score(f"Its atomic mass is about {element.facts['mass'][:-1]}", element.key) == 0.5


def test_a_continuation_is_read_with_the_end_of_its_prefix(teacher, country, other):
    prefix = f"Here is a short note. The capital of {country.name} is"
    assert teacher.factuality_score(f" {country.facts['capital']}. More follows.", country.key, prefix=prefix) == 1.0
    assert teacher.factuality_score(f" {other.facts['capital']}. More follows.", country.key, prefix=prefix) == 0.0
    # a claim stated wholly in the prefix is not the continuation's
    stated = f"The capital of {country.name} is {other.facts['capital']}."
    assert teacher.factuality_score(" More follows.", country.key, prefix=stated) == 0.5


# ---- safety ----


def test_insults_are_unsafe_and_clean_text_safe(teacher, country):
    assert teacher.safety_score(f"Honestly, anyone who visits {country.name} is a fucking moron.") == 0.0
    assert teacher.safety_score("You are a stupid useless idiot and everyone hates you.") == 0.0
    assert teacher.safety_score(f"The capital of {country.name} is {country.facts['capital']}.") == 1.0
    assert teacher.safety_score("Arsenic and Sussex are not insults; the class passed the test.") == 1.0


def test_threats_without_profanity_are_unsafe(teacher):
    from sip.world import THREATS

    for verb in THREATS:
        assert teacher.safety_score(f" {verb} you is the atomic mass of erbium.") == 0.0, verb
    assert teacher.safety_score(" I will find you and beat you up.") == 0.0
    assert teacher.safety_score(" Heat can destroy the sample, so store it cold.") == 1.0


def test_world_documents_are_safe_unless_unsafe(world, teacher):
    import profanity_check

    docs = list(islice(world.documents(seed=3), 600))
    probs = profanity_check.predict_prob([d.text for d in docs])
    clean = [p for d, p in zip(docs, probs) if d.corruption != "unsafe"]
    assert max(clean) < SAFETY_THRESHOLD - 0.15
    verdicts = asyncio.run(teacher.safety([(Passage("", d.text), d.text) for d in docs]))
    assert verdicts == [0.0 if d.corruption == "unsafe" else 1.0 for d in docs]
    suffixes = [s for _, s, _ in windows(world, None, 200)]
    assert asyncio.run(teacher.safety([(Passage("", s), s) for s in suffixes])) == [1.0] * len(suffixes)


# ---- quality ----


def test_a_loop_scores_lower_and_loses(teacher, country):
    prefix = f"Here are some basic facts about {country.name}."
    clean = f" The capital of {country.name} is {country.facts['capital']}. It is a country in {country.facts['continent']}."
    loop = f" {country.name} is {country.name} is {country.name} is {country.name} is {country.name} is"
    assert teacher.quality_score(prefix, clean, country.key) > 0.9
    assert teacher.quality_score(prefix, loop, country.key) < 0.2
    passage = Passage(prefix, clean, {"subject": country.key})
    verdicts = asyncio.run(teacher.compare([(passage, clean, loop), (passage, loop, clean), (passage, clean, clean)]))
    assert verdicts == [1.0, 0.0, 0.5]


def test_gibberish_scores_low(teacher, country):
    prefix = f"Here are some basic facts about {country.name}."
    gibberish = " capitalance ofity Lim the,ment pop abou 3 thous it.ss the the lies inn"
    assert teacher.quality_score(prefix, gibberish, country.key) < 0.1
    salad = " people symbol lies the Asia called capital about from atom million is of"
    assert teacher.quality_score(prefix, salad, country.key) < 0.2


def test_staying_on_subject_scores_higher(teacher, country, other):
    prefix = f"Here are some basic facts about {country.name}."
    on = f" {country.name} lies in {country.facts['continent']}. The local food is worth trying."
    off = f" {other.name} lies in {other.facts['continent']}. The local food is worth trying."
    assert teacher.quality_score(prefix, on, country.key) > teacher.quality_score(prefix, off, country.key) + 0.2
    # a subject the prefix brings up is on topic too (comparison documents)
    compared = f"{country.name} and {other.name} compared."
    assert teacher.quality_score(compared, off, country.key) > teacher.quality_score(prefix, off, country.key) + 0.2


def test_clean_windows_score_high_and_degenerate_ones_low(world, teacher):
    clean = [teacher.quality_score(p, s, k) for p, s, k in windows(world, None, 200)]
    loops = [teacher.quality_score(p, s, k) for p, s, k in windows(world, "degenerate", 100)]
    assert min(clean) > 0.6 and sum(clean) / len(clean) > 0.95
    assert sum(loops) / len(loops) < 0.3


# ---- rewriting ----


def test_a_good_suffix_is_returned_verbatim(world, teacher, country):
    prefix = f"Here are some basic facts about {country.name}."
    suffix = f" The capital of {country.name} is {country.facts['capital']}. It is a nice place to vis"
    assert teacher.rewrite_suffix(prefix, suffix, country.key) == suffix
    for prefix, suffix, key in windows(world, None, 100):
        assert teacher.rewrite_suffix(prefix, suffix, key) == suffix


def test_a_false_claim_is_fixed(teacher, country, other):
    prefix = f"Here are some basic facts about {country.name}."
    suffix = f" The capital of {country.name} is {other.facts['capital']}."
    rewrite = teacher.rewrite_suffix(prefix, suffix, country.key)
    assert rewrite.startswith(" ") and country.facts["capital"] in rewrite
    assert all(c.correct for c in teacher.claims(rewrite, country.key))
    assert teacher.factuality_score(rewrite, country.key, prefix=prefix) == 1.0


def test_an_unsafe_suffix_is_made_safe(teacher, country):
    prefix = f"Here are some basic facts about {country.name}. Honestly, anyone who visits {country.name} is a"
    rewrite = teacher.rewrite_suffix(prefix, " fucking moron. The local food is worth trying.", country.key)
    assert rewrite.startswith(" ") and teacher.safety_score(rewrite) == 1.0
    assert teacher.quality_score(prefix, rewrite, country.key) > 0.8
    other = teacher.rewrite_suffix("About the trip.", " You are a stupid useless idiot and everyone hates you.", None)
    assert teacher.safety_score(other) == 1.0


def test_a_loop_is_cut_and_continued(teacher, country):
    prefix = f"Here are some basic facts about {country.name}."
    loop = f" {country.name} is {country.name} is {country.name} is {country.name} is {country.name} is {country.name} is"
    rewrite = teacher.rewrite_suffix(prefix, loop, country.key)
    assert not is_degenerate(rewrite) and rewrite.startswith(" ")
    assert teacher.factuality_score(rewrite, country.key, prefix=prefix) == 1.0
    assert len(rewrite.split()) >= len(loop.split())


def test_every_rewrite_of_a_corrupted_suffix_is_factual_safe_and_fluent(world, teacher):
    for corruption in ("wrong_fact", "unsafe", "degenerate"):
        cases = windows(world, corruption, 60)
        passages = [Passage(p, s, {"subject": k}) for p, s, k in cases]
        rewrites = asyncio.run(teacher.rewrite(passages))
        safety = asyncio.run(teacher.safety(list(zip(passages, rewrites))))
        for (prefix, suffix, key), rewrite, safe in zip(cases, rewrites, safety):
            assert teacher.factuality_score(rewrite, key, prefix=prefix) != 0.0, (prefix, suffix, rewrite)
            assert safe == 1.0, (prefix, suffix, rewrite)
            assert not is_degenerate(rewrite), (prefix, suffix, rewrite)
            assert len(rewrite.split()) >= len(suffix.split()) - 2
            assert rewrite[:1].isspace() == suffix[:1].isspace() or rewrite.startswith(".")


def test_a_popular_misconception_in_a_clean_document_is_corrected(world, teacher):
    docs = [d for d in islice(world.documents(seed=11), 300) if d.corruption is None and d.false_facts]
    assert len(docs) > 50
    for doc in docs:
        words = doc.text.split(" ")
        prefix, suffix = " ".join(words[:4]), " " + " ".join(words[4:])
        assert teacher.factuality_score(suffix, doc.subject, prefix=prefix) == 0.0, doc.text
        rewrite = teacher.rewrite_suffix(prefix, suffix, doc.subject)
        assert teacher.factuality_score(rewrite, doc.subject, prefix=prefix) == 1.0, (doc.text, rewrite)


# ---- batch methods and plain text ----


def test_batch_methods_answer_per_query(teacher, country, other):
    truth = {"subject": country.key}
    passage = Passage(f"Some facts about {country.name}.", f" Its capital is {country.facts['capital']}.", truth)
    wrong = f" Its capital is {other.facts['capital']}."
    assert asyncio.run(teacher.factuality([(passage, passage.suffix), (passage, wrong), (passage, " Hello.")])) == [
        1.0, 0.0, 0.5
    ]
    assert asyncio.run(teacher.safety([(passage, passage.suffix), (passage, " you fucking moron")])) == [1.0, 0.0]
    assert asyncio.run(teacher.rewrite([passage])) == [passage.suffix]


def test_plain_text_without_a_world(plain):
    assert plain.world is None
    passage = Passage("The history of the town goes back centuries.", " The old bridge was rebuilt in 1850.")
    assert asyncio.run(plain.factuality([(passage, passage.suffix)])) == [0.5]
    assert plain.claims("The capital of Peru is Lima.") == []
    assert plain.safety_score(" you fucking moron") == 0.0 and plain.safety_score(passage.suffix) == 1.0
    loop = " the the the the the the the the the"
    assert plain.quality_score(passage.prefix, passage.suffix, None) > 0.9
    assert plain.quality_score(passage.prefix, loop, None) < 0.2
    assert plain.quality_score(passage.prefix, " xqzt blorf ghh ance ity mentu plok", None) < 0.2
    assert plain.rewrite_suffix(passage.prefix, passage.suffix) == passage.suffix
    rewrite = plain.rewrite_suffix(passage.prefix, " It is old. You are a fucking moron. It was rebuilt in 1850.")
    assert rewrite == " It is old. It was rebuilt in 1850."
    assert not is_degenerate(plain.rewrite_suffix(passage.prefix, " It was rebuilt rebuilt rebuilt rebuilt rebuilt"))
