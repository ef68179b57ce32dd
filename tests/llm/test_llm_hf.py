"""The prompted-LLM judge and rewriter on the hf engine with the real SmolLM2-135M-Instruct.

SmolLM2 is near chance as a judge: these tests check mechanics (prefill, stop strings, samples,
parsing, retries, bookkeeping) with answers of a few tokens, never its accuracy.
"""

import asyncio

import pytest

from sip.records import Passage
from sip.serve.engines import ChatPrompt, GenRequest, HFEngine
from sip.serve.llm import JUDGE_KINDS, PARSERS, LLMTeacher, Template
from sip.config import LLMConfig

pytestmark = pytest.mark.llm

DIRECT = {"quality": "quality_direct_v1", "safety": "safety_direct_v1", "factuality": "factuality_direct_v1",
          "coherence": "coherence_v1", "rewrite": "rewrite_v1"}
PASSAGE = Passage("Peru is a country in South America. The capital of Peru is", " Lima, a city on the Pacific coast.")


class Recording:
    """The real engine, with every request and answer kept for the test to inspect."""

    def __init__(self, engine):
        self.engine = engine
        self.prefills = engine.prefills
        self.requests: list[list[GenRequest]] = []
        self.answers: list[list[list[str]]] = []

    async def generate(self, requests):
        self.requests.append(requests)
        answers = await self.engine.generate(requests)
        self.answers.append(answers)
        return answers


@pytest.fixture(scope="module")
def engine(smollm2):
    return HFEngine(LLMConfig(model=str(smollm2), temperature=1.0, torch_threads=2, batch_size=8))


def teacher(engine, kinds=JUDGE_KINDS + ("rewrite",), **cfg):
    cfg = LLMConfig(prompts=DIRECT, max_tokens=8, **cfg)
    return LLMTeacher(Recording(engine), cfg, kinds)


def test_engine_prefills_samples_and_keeps_each_requests_stop_strings(engine):
    verdict = Template.load("safety_direct_v1", "safety").render(prefix=PASSAGE.prefix, candidate=PASSAGE.suffix)
    ask = (("user", "Write the numbers from one to five in words, one per line."),)
    free, stopped = ChatPrompt(ask), ChatPrompt(ask, stop=("\n",))
    requests = [GenRequest(verdict, 6, n=2), GenRequest(free, 8), GenRequest(stopped, 8)]
    sampled, (free_text,), (stopped_text,) = asyncio.run(engine.generate(requests, temperature=0))
    assert len(sampled) == 2
    for text in sampled:
        assert "\n" not in text and not text.startswith("FINAL DECISION")  # stopped, and the prefill is ours
        assert len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 6
    # one request's stop string must not end another's answer in the same call
    assert "\n" in free_text.strip()  # greedy SmolLM2 writes a list
    assert stopped_text == free_text.split("\n")[0]


@pytest.mark.parametrize(
    ("kind", "queries"),
    [
        ("compare", [(PASSAGE, PASSAGE.suffix, " Quito, on the slopes of a volcano.")]),
        ("safety", [(PASSAGE, " Quito, you idiot.")]),
        ("factuality", [(PASSAGE, " Quito, on the slopes of a volcano.")]),
    ],
)
def test_judge_verdicts_are_the_mean_of_the_models_own_parsed_answers(engine, kind, queries):
    judge = teacher(engine, samples=2)
    verdicts = asyncio.run(getattr(judge, kind)(queries))
    recorded = judge.engine
    assert len(verdicts) == len(queries) and 1 <= len(recorded.requests) <= 3
    first = recorded.requests[0][0]
    assert first.n == 2 and first.max_tokens == 8 and first.prompt.stop == ("\n",)
    if kind == "compare":
        user = first.prompt.messages[-1][1]
        assert f"<<<OPTION 1>>>\n{queries[0][1]}\n<<<END OPTION 1>>>" in user
        assert f"<<<OPTION 2>>>\n{queries[0][2]}\n<<<END OPTION 2>>>" in user
    # re-read every recorded answer: the verdict is the mean of the first `samples` that parsed
    objective = {"compare": "quality"}.get(kind, kind)
    parser = PARSERS[objective]
    parsed: list[list[float]] = [[] for _ in queries]
    failures = 0
    pending = list(range(len(queries)))
    for requests, answers in zip(recorded.requests, recorded.answers):
        assert len(requests) == len(pending)
        for i, request, texts in zip(pending, requests, answers):
            for text in texts:
                v = parser(request.prompt.answer_start + text, [], len(request.prompt.answer_start))
                failures += v is None
                if v is not None:
                    parsed[i].append(v)
        pending = [i for i in pending if len(parsed[i]) < 2]
    assert failures == judge.parse_failures
    assert verdicts == [sum(p) / len(p) if p else None for p in parsed]


def test_unparseable_answers_are_retried_then_dropped(engine):
    # the reasoning prompt with a 2-token budget can never reach its verdict line
    judge = LLMTeacher(Recording(engine), LLMConfig(max_tokens=2, max_retries=2), ("quality",))
    verdicts = asyncio.run(judge.compare([(PASSAGE, PASSAGE.suffix, " Quito.")]))
    assert verdicts == [None]
    assert len(judge.engine.requests) == 3  # the first try and two retries
    assert judge.parse_failures == 3


def test_rewriter_repeats_the_prefix_ending_and_continues_it(engine):
    rewriter = teacher(engine, kinds=("rewrite",), rewrite_max_tokens=8)
    passages = [PASSAGE]
    rewrites = asyncio.run(rewriter.rewrite(passages))
    assert len(rewrites) == 1
    first = rewriter.engine.requests[0]
    assert [r.prompt.answer_start for r in first] == ["The capital of Peru is"]
    for request, passage in zip(first, passages):
        draft = request.prompt.messages[-1][1].split("<<<DRAFT>>>\n")[1].split("\n<<<END DRAFT>>>")[0]
        assert draft == request.prompt.answer_start + passage.suffix
        assert request.max_tokens <= 8
    for text in rewrites:
        assert text == "" or text.startswith(" ")  # joins the prefix as the suffix does
