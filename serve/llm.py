"""The prompted-LLM judge and rewriter: prompt templates, strict verdict parsers, retries.

Candidate text is data. Every input is placed between `<<<NAME>>>` / `<<<END NAME>>>` markers, and
runs of three or more `<` or `>` inside an input are shortened to two, so no input can close its
block or open a new one. A verdict is read only from the judge's own answer:

- only what follows the last `>>>` in the answer counts (an answer that replays the prompt's blocks
  is judged on what it wrote after them);
- the verdict must be the answer's final line (the final JSON object for factuality), in exactly
  the form the prompt asks for; anything else is a parse failure;
- a verdict that replays an input is a parse failure too: when the words right before it in the
  answer are the words right before the same verdict in an input, from the start of that input or
  of one of its lines (at least ECHO_MIN_CHARS letters), or for at least ECHO_LONG_CHARS letters
  from anywhere; or when it follows a replayed block opening (`<<<NAME>>>`) and an input begins
  with it. Words are compared without case, punctuation or markdown. A verdict the judge wrote
  after words of its own, a verdict with nothing before it, and one that completes our prefilled
  answer line are the judge's, whatever an input holds. So a candidate cannot make a verdict
  vanish by holding the same verdict: it would have to hold the very words the judge writes
  before it.

A failed parse is asked again (`llm.max_retries` times); then the judgment is None, which the judge
deployment scores at its worst and counts (`judge_failures` in metrics.jsonl), never a win.

With `llm.verdict=probability` nothing is sampled or parsed: the engine gives the probability of
each verdict in VERDICTS as the continuation of the prefilled answer start, and the judgment is the
expected value of the verdict, graded, with no answer left unparsed.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from sip.records import Passage, Verdict
from sip.serve.engines import ChatPrompt, GenRequest, TextEngine
from sip.config import LLMConfig

PROMPT_DIR = Path(__file__).parent / "prompts"
FIELDS = {
    "quality": {"prefix", "option_1", "option_2"},
    "coherence": {"prefix", "option_1", "option_2"},
    "safety": {"prefix", "candidate"},
    "factuality": {"prefix", "reference", "candidate"},
    "rewrite": {"prefix", "suffix", "prefix_ending", "words"},
}
PREFIX_ENDING_WORDS = 5
ECHO_MIN_CHARS = 4  # letters copied before a verdict, from the start of an input's line, that make it an echo
ECHO_LONG_CHARS = 24  # letters copied before a verdict, from anywhere, that make it an echo

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_WORD = re.compile(r"\w+")
_OPENING_MARKER = re.compile(r"<<<(?!\s*END\b)[^<>]*>>>\W*$", re.IGNORECASE)  # ends the text before a verdict
_SECTION = re.compile(r"^### (system|user|answer_start|stop)[ \t]*$", re.MULTILINE)
_MARKER_RUN = re.compile(r"<{3,}|>{3,}")


def neutralise(text: str) -> str:
    """Input text that cannot form a block marker: runs of 3+ '<' or '>' become two."""
    return _MARKER_RUN.sub(lambda m: m.group()[:2], text)


@dataclass(frozen=True)
class Template:
    """A prompt file with sections `### user` and, optionally, `### system`, `### answer_start` (what the
    answer must begin with: prefilled where the engine can) and `### stop` (one stop string a line,
    backslash escapes allowed: `\\n` stops at the end of the first line)."""

    name: str
    user: str
    system: str = ""
    answer_start: str = ""
    stop: tuple[str, ...] = ()

    @classmethod
    def load(cls, ref: str, kind: str) -> Template:
        path = Path(ref).expanduser() if ref.endswith(".txt") or "/" in ref else PROMPT_DIR / f"{ref}.txt"
        if not path.exists():
            known = sorted(p.stem for p in PROMPT_DIR.glob(f"{kind}*.txt"))
            raise ValueError(f"llm.prompts.{kind}={ref}: no template at {path} (built-in: {', '.join(known)})")
        parts = _SECTION.split(path.read_text())
        sections = {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2])}
        if "user" not in sections:
            raise ValueError(f"prompt template {path} has no '### user' section")
        stop = tuple(codecs.decode(line, "unicode_escape") for line in sections.get("stop", "").splitlines() if line)
        template = cls(ref, sections["user"], sections.get("system", ""), sections.get("answer_start", ""), stop)
        used = {m for text in (template.user, template.system, template.answer_start) for m in _PLACEHOLDER.findall(text)}
        if used - FIELDS[kind]:
            raise ValueError(f"prompt template {path} uses {sorted(used - FIELDS[kind])}; a {kind} prompt has {sorted(FIELDS[kind])}")
        return template

    def render(self, **fields: str) -> ChatPrompt:
        """Fill {{name}} placeholders in one pass: inserted text is never scanned for placeholders."""
        safe = {name: neutralise(value) for name, value in fields.items()}

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: safe[m.group(1)], text)

        messages = (("system", fill(self.system)),) if self.system else ()
        return ChatPrompt(messages + (("user", fill(self.user)),), fill(self.answer_start), self.stop)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _clean_line(line: str) -> str:
    """A line as a verdict is matched: markdown emphasis, quotes and end punctuation off, lower case."""
    return _norm(line.strip().strip("*_#`'\".!“”"))


def _own_part(answer: str) -> int:
    """Where the part of the answer that can hold a verdict starts: after the last block marker."""
    cut = answer.rfind(">>>")
    return 0 if cut < 0 else cut + 3


def _words(text: str) -> tuple[list[str], list[bool]]:
    """The text's words in lower case, and for each whether it begins the text or a line of it."""
    words, line_starts, gap_from = [], [], 0
    for m in _WORD.finditer(text):
        line_starts.append(not words or "\n" in text[gap_from : m.start()])
        words.append(m.group().lower())
        gap_from = m.end()
    return words, line_starts


def _echoed(answer: str, start: int, end: int, inputs: Sequence[str], written_from: int) -> bool:
    """Is the verdict answer[start:end] a replay of an input? Never when it began in our prefill.

    It is when the words before it in the answer equal the words before the same verdict in an
    input for at least ECHO_MIN_CHARS letters reaching back to the start of that input or of one of
    its lines, or for at least ECHO_LONG_CHARS letters; and when it directly follows a block
    opening marker the judge replayed, and an input begins with it.
    """
    if start < written_from:
        return False
    verdict = _words(answer[start:end])[0]
    before = _words(answer[:start])[0]
    if not verdict or not before:
        return False
    n = len(verdict)
    opened = _OPENING_MARKER.search(answer[:start]) is not None
    for text in inputs:
        words, line_starts = _words(text)
        if opened and words[:n] == verdict:
            return True
        for at in range(1, len(words) - n + 1):
            if words[at : at + n] != verdict:
                continue
            copied = 0
            while copied < min(at, len(before)) and before[-1 - copied] == words[at - 1 - copied]:
                copied += 1
            letters = sum(map(len, words[at - copied : at]))
            if letters >= ECHO_LONG_CHARS or (letters >= ECHO_MIN_CHARS and any(line_starts[at - copied : at])):
                return True
    return False


def _final_line(answer: str, pattern: re.Pattern, inputs: Sequence[str], written_from: int) -> str | None:
    """The label of the verdict on the answer's last non-empty line, or None."""
    own = _own_part(answer)
    body = answer[own:].rstrip()
    if not body.strip():
        return None
    line_start = own + body.rfind("\n") + 1
    line = answer[line_start : own + len(body)]
    cleaned = _clean_line(line)
    match = pattern.fullmatch(cleaned)
    if match is None or _echoed(answer, line_start, own + len(body), inputs, written_from):
        return None
    return match.group(1)


_QUALITY = re.compile(r"conclusion\s*:?\s*option\s*([12])")
_SAFETY = re.compile(r"final decision\s*:?\s*(yes|no)")
_COHERENCE = re.compile(r"(?:answer\s*:?\s*)?(a|b|tie)")
FACTUALITY_LABELS = {"no hallucination": 1.0, "possible hallucination": 0.5, "definite hallucination": 0.0}


def parse_quality(answer: str, inputs: Sequence[str] = (), written_from: int = 0) -> Verdict:
    """1.0 when the judge's final line says Option 1, 0.0 for Option 2, else None."""
    label = _final_line(answer, _QUALITY, inputs, written_from)
    return None if label is None else 1.0 if label == "1" else 0.0


def parse_safety(answer: str, inputs: Sequence[str] = (), written_from: int = 0) -> Verdict:
    label = _final_line(answer, _SAFETY, inputs, written_from)
    return None if label is None else 1.0 if label == "yes" else 0.0


def parse_coherence(answer: str, inputs: Sequence[str] = (), written_from: int = 0) -> Verdict:
    label = _final_line(answer, _COHERENCE, inputs, written_from)
    return None if label is None else {"a": 1.0, "b": 0.0, "tie": 0.5}[label]


def parse_factuality(answer: str, inputs: Sequence[str] = (), written_from: int = 0) -> Verdict:
    """The label of the JSON object that ends the answer (a closing code fence may follow it)."""
    own = _own_part(answer)
    body = answer[own:].rstrip()
    if body.endswith("```"):
        body = body[:-3].rstrip()
    if not body.endswith("}"):
        return None
    for start in (i for i in range(len(body) - 1, -1, -1) if body[i] == "{"):
        try:
            obj = json.loads(body[start:])
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
            return None
        value = FACTUALITY_LABELS.get(_norm(obj["label"].replace("_", " ")))
        if value is None or _echoed(answer, own + start, own + len(body), inputs, written_from):
            return None
        return value
    return None


PARSERS: dict[str, Callable[..., Verdict]] = {
    "quality": parse_quality,
    "safety": parse_safety,
    "factuality": parse_factuality,
    "coherence": parse_coherence,
}

# Each verdict as its parser reads it, with its value: the choices of `llm.verdict=probability` are
# these after a template's prefilled answer start (tests check that each one parses as its value).
VERDICTS: dict[str, dict[str, float]] = {
    "quality": {"Conclusion: Option 1": 1.0, "Conclusion: Option 2": 0.0},
    "safety": {"FINAL DECISION: YES": 1.0, "FINAL DECISION: NO": 0.0},
    "coherence": {"Answer: A": 1.0, "Answer: B": 0.0, "Answer: TIE": 0.5},
    "factuality": {json.dumps({"label": label.title()}): value for label, value in FACTUALITY_LABELS.items()},
}


def verdict_choices(kind: str, template: Template) -> dict[str, float]:
    """The kind's verdicts as continuations of the template's answer start, with their values.

    A template must prefill the start of its verdict line: without one, the model would be asked
    for reasoning first, and its first words are no verdict.
    """
    start = template.answer_start
    choices = {form[len(start) :]: value for form, value in VERDICTS[kind].items() if form.startswith(start)}
    if not start or len(choices) < len(VERDICTS[kind]):
        problem = "prefills no answer start" if not start else f"prefills {start!r}, which not every verdict begins with"
        raise ValueError(
            f"llm.verdict=probability reads the verdict right after a prefilled answer start, but the {kind} prompt "
            f"{template.name} {problem} (the verdicts: {list(VERDICTS[kind])}); use {kind}_direct_v1"
        )
    return choices


def prefix_ending(prefix: str, words: int = PREFIX_ENDING_WORDS) -> str:
    """The prefix's last words exactly as written (its tail from the start of the words-th last word)."""
    starts = [m.start() for m in re.finditer(r"\S+", prefix)][-words:]
    return prefix[starts[0] :] if starts else ""


def rewrite_fields(prefix: str, suffix: str) -> dict[str, str]:
    """A rewrite prompt's fields, as the rewriter serves them and as `sip train-rewriter` trains on them."""
    return {"prefix": prefix, "suffix": suffix, "prefix_ending": prefix_ending(prefix), "words": str(len(suffix.split()))}


def parse_rewrite(answer: str, ending: str, suffix: str) -> str | None:
    """The rewritten suffix: the answer without the repeated prefix ending, up to any block marker."""
    text = answer.split("<<<", 1)[0]
    words = ending.split()
    if words:
        repeated = re.match(r"\s*" + r"\s+".join(map(re.escape, words)), text)
        if repeated:
            text = text[repeated.end() :]
    text = text.rstrip()
    if not text.strip():
        return None
    if suffix[:1].isspace() and not text[:1].isspace():
        text = " " + text
    return text


def majority(verdicts: list[float]) -> float:
    """1 or 0 by the side (a verdict above or below ½) more samples took, ½ on a tie."""
    above, below = sum(v > 0.5 for v in verdicts), sum(v < 0.5 for v in verdicts)
    return 1.0 if above > below else 0.0 if below > above else 0.5


class LLMTeacher:
    """A prompted LLM as judge (compare / safety / factuality / coherence) and rewriter."""

    def __init__(self, engine: TextEngine, cfg: LLMConfig, kinds: Sequence[str]):
        self.engine = engine
        self.cfg = cfg
        self.templates = {kind: Template.load(cfg.prompts[kind], kind) for kind in kinds}
        self.choices = _choices(cfg, self.templates)
        if self.choices and not engine.prefills:
            raise ValueError("llm.verdict=probability needs the answer start prefilled: with backend=openai, "
                             "set llm.continue_final_message=true (for a server that supports it, as vLLM's does)")
        self.parse_failures = 0  # answers that did not parse, retried ones included
        self.last_unparsed: str | None = None  # the latest judge answer that held no verdict, as parsed

    def _prompt(self, kind: str, fields: dict[str, str]) -> tuple[ChatPrompt, int]:
        """The rendered prompt and where the model's own writing starts in a composed answer."""
        prompt = self.templates[kind].render(**fields)
        return prompt, len(prompt.answer_start) if self.engine.prefills else 0

    def _compose(self, prompt: ChatPrompt, text: str) -> str:
        return prompt.answer_start + text if self.engine.prefills else text

    async def _judge(self, kind: str, fields: list[dict[str, str]]) -> list[Verdict]:
        if self.cfg.verdict == "probability":
            return await self._expected(kind, fields)
        parse = PARSERS[kind]
        prompts = [self._prompt(kind, f) for f in fields]
        inputs = [list(f.values()) for f in fields]
        got: list[list[float]] = [[] for _ in fields]
        missing = [self.cfg.samples] * len(fields)
        for _ in range(self.cfg.max_retries + 1):
            todo = [i for i, m in enumerate(missing) if m]
            if not todo:
                break
            answers = await self.engine.generate([GenRequest(prompts[i][0], self.cfg.max_tokens, missing[i]) for i in todo])
            for i, texts in zip(todo, answers, strict=True):
                prompt, written_from = prompts[i]
                for text in texts:
                    answer = self._compose(prompt, text)
                    verdict = parse(answer, inputs[i], written_from)
                    if verdict is None:
                        self.parse_failures += 1
                        self.last_unparsed = answer
                    else:
                        got[i].append(verdict)
                        missing[i] -= 1
        combine = majority if kind in self.cfg.majority_vote else mean
        return [combine(g) if g else None for g in got]

    async def _expected(self, kind: str, fields: list[dict[str, str]]) -> list[Verdict]:
        """Each judgment's verdict value weighted by the model's probability of giving that verdict."""
        choices = self.choices[kind]
        prompts = [self.templates[kind].render(**f) for f in fields]
        verdicts = []
        for prompt, probs in zip(prompts, await self.engine.choice_probs(prompts, list(choices)), strict=True):
            if probs is None:  # an openai server whose top tokens held no verdict
                self.parse_failures += 1
                self.last_unparsed = f"{prompt.answer_start}[no verdict among the top tokens]"
                verdicts.append(None)
            else:
                verdicts.append(sum(p * value for p, value in zip(probs, choices.values(), strict=True)))
        return verdicts

    async def compare(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        return await self._judge("quality", [{"prefix": p.prefix, "option_1": a, "option_2": b} for p, a, b in queries])

    async def coherence(self, queries: list[tuple[Passage, str, str]]) -> list[Verdict]:
        return await self._judge("coherence", [{"prefix": p.prefix, "option_1": a, "option_2": b} for p, a, b in queries])

    async def safety(self, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        return await self._judge("safety", [{"prefix": p.prefix, "candidate": text} for p, text in queries])

    async def factuality(self, queries: list[tuple[Passage, str]]) -> list[Verdict]:
        return await self._judge(
            "factuality", [{"prefix": p.prefix, "reference": p.suffix, "candidate": text} for p, text in queries]
        )

    async def rewrite(self, passages: list[Passage]) -> list[str]:
        """A rewrite per passage; "" when every try failed (the generator counts it as rewrite_failed)."""
        fields = [rewrite_fields(p.prefix, p.suffix) for p in passages]
        endings = [f["prefix_ending"] for f in fields]
        prompts = [self._prompt("rewrite", f)[0] for f in fields]
        budget = [min(self.cfg.rewrite_max_tokens, (len(p.suffix) + (0 if self.engine.prefills else len(e))) // 3 + 8)
                  for p, e in zip(passages, endings)]
        rewrites: list[str | None] = [None] * len(passages)
        for _ in range(self.cfg.max_retries + 1):
            todo = [i for i, r in enumerate(rewrites) if r is None]
            if not todo:
                break
            answers = await self.engine.generate([GenRequest(prompts[i], budget[i]) for i in todo])
            for i, (text,) in zip(todo, answers, strict=True):
                rewrites[i] = parse_rewrite(self._compose(prompts[i], text), endings[i], passages[i].suffix)
                self.parse_failures += rewrites[i] is None
        return [r or "" for r in rewrites]


JUDGE_KINDS = ("quality", "safety", "factuality", "coherence")
REWRITER_KINDS = ("rewrite",)


def _choices(cfg: LLMConfig, templates: dict[str, Template]) -> dict[str, dict[str, float]]:
    """With probability verdicts, each judge kind's choices; else none."""
    if cfg.verdict != "probability":
        return {}
    return {kind: verdict_choices(kind, t) for kind, t in templates.items() if kind in VERDICTS}


def check_prompts(cfg: LLMConfig, kinds: Sequence[str]) -> None:
    """Load the prompts of `kinds` and check them against llm.verdict; a ValueError says which does not
    fit. It needs no model, so a driver runs it before deploying."""
    _choices(cfg, {kind: Template.load(cfg.prompts[kind], kind) for kind in kinds})


def make_llm_backend(engine_name: str, cfg: LLMConfig, kinds: Sequence[str]) -> LLMTeacher:
    """Templates are loaded (and checked) before the engine, so a bad prompt fails fast."""
    from sip.serve.engines import make_engine

    check_prompts(cfg, kinds)
    return LLMTeacher(make_engine(engine_name, cfg), cfg, kinds)
