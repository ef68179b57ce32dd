"""Verdicts from probabilities (`llm.verdict=probability`): the expected verdict under the model's
probabilities of each allowed answer right after the prefilled answer start, instead of a parsed sample.

Most tests use a tiny Llama built from a config, with a byte-level BPE tokenizer trained here on the
prompt templates; the last one compares parsed and probability verdicts with the real SmolLM2.
"""

import asyncio
import math
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from sip.records import Passage
from sip.serve.engines import ChatPrompt, HFEngine, OpenAIEngine, choice_tokens, make_engine, render_prompt
from sip.serve.llm import (
    JUDGE_KINDS,
    PARSERS,
    PROMPT_DIR,
    VERDICTS,
    LLMTeacher,
    Template,
    make_llm_backend,
    verdict_choices,
)
from sip.config import LLMConfig

pytestmark = pytest.mark.llm

DIRECT = {"quality": "quality_direct_v1", "safety": "safety_direct_v1", "factuality": "factuality_direct_v1",
          "coherence": "coherence_direct_v1"}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CAPITALS = [("Peru", "Lima", "Quito"), ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"),
            ("Italy", "Rome", "Milan"), ("Egypt", "Cairo", "Giza"), ("Spain", "Madrid", "Seville"),
            ("Germany", "Berlin", "Munich"), ("Canada", "Ottawa", "Toronto"), ("Kenya", "Nairobi", "Mombasa"),
            ("Chile", "Santiago", "Valparaiso"), ("Norway", "Oslo", "Bergen"), ("Greece", "Athens", "Sparta"),
            ("Russia", "Moscow", "Omsk"), ("China", "Beijing", "Shanghai"), ("India", "New Delhi", "Mumbai"),
            ("Poland", "Warsaw", "Krakow"), ("Cuba", "Havana", "Santiago"), ("Turkey", "Ankara", "Istanbul"),
            ("Austria", "Vienna", "Salzburg"), ("Ireland", "Dublin", "Cork")]


def quality_prompt(country: str, option_1: str, option_2: str) -> ChatPrompt:
    return Template.load("quality_direct_v1", "quality").render(
        prefix=f"{country} is a country. The capital of {country} is", option_1=f" {option_1}.", option_2=f" {option_2}.")


def passage(country: str) -> Passage:
    return Passage(f"{country} is a country. The capital of {country} is", "")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random Llama with weights large enough that its probabilities are far from uniform."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [p.read_text() for p in PROMPT_DIR.glob("*.txt")] + [" ".join(row) for row in CAPITALS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    end = tokenizer.eos_token_id
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, max_position_embeddings=1024, initializer_range=0.3, eos_token_id=end, pad_token_id=end,
        bos_token_id=end))
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def engine(folder: Path, **cfg) -> HFEngine:
    return HFEngine(LLMConfig(model=str(folder), torch_threads=1, **cfg))


def rendered(tokenizer, prompt: ChatPrompt) -> str:
    messages = [{"role": role, "content": content} for role, content in prompt.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prompt.answer_start


def trained(folder: Path, examples: list[tuple[ChatPrompt, str]], out: Path, steps: int = 30) -> Path:
    """The model at `folder` after a few Adam steps on each example's answer, given its prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        for prompt, answer in examples:
            text = rendered(tokenizer, prompt)
            start = len(tokenizer.encode(text, add_special_tokens=False))
            ids = tokenizer.encode(text + answer, add_special_tokens=False)
            logits = model(torch.tensor([ids])).logits[0]
            torch.nn.functional.cross_entropy(logits[start - 1 : -1], torch.tensor(ids[start:])).backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", sorted(VERDICTS))
def test_every_verdict_parses_as_its_value_after_each_builtin_answer_start(kind):
    parse = PARSERS[kind]
    for path in sorted(PROMPT_DIR.glob(f"{kind}_*v1.txt")):
        template = Template.load(path.stem, kind)
        start = template.answer_start
        if start:
            choices = verdict_choices(kind, template)
            assert set(choices.values()) == set(VERDICTS[kind].values())
        else:  # a prompt that asks for reasoning first cannot give its verdict as its first words
            with pytest.raises(ValueError, match=f"{kind}_direct_v1"):
                verdict_choices(kind, template)
            choices = VERDICTS[kind]
        for choice, value in choices.items():
            assert parse(start + choice, [], len(start)) == value, (path.stem, choice)


def test_probability_verdicts_refuse_prompts_and_engines_that_do_not_prefill():
    with pytest.raises(ValueError, match="quality_direct_v1"):  # the default prompts reason first
        make_llm_backend("hf", LLMConfig(verdict="probability", model="/nonexistent"), JUDGE_KINDS)

    class NoPrefill:
        prefills = False

    with pytest.raises(ValueError, match="continue_final_message"):
        LLMTeacher(NoPrefill(), LLMConfig(verdict="probability", prompts=DIRECT), JUDGE_KINDS)


def test_probabilities_are_normalised_graded_and_those_of_a_plain_forward_pass(tiny):
    hf = engine(tiny, batch_size=3)  # 7 prompts, of different lengths: batches of left-padded rows
    prompts = [quality_prompt(country, right, wrong * (1 + i % 3)) for i, (country, right, wrong) in enumerate(CAPITALS[:7])]
    factuality = Template.load("factuality_direct_v1", "factuality")
    for template, kind, asked in [(Template.load("quality_direct_v1", "quality"), "quality", prompts),
                                  (factuality, "factuality", [factuality.render(prefix=p.messages[-1][1][:80 + 9 * i],
                                   reference=" Lima.", candidate=" Quito.") for i, p in enumerate(prompts)])]:
        choices = list(verdict_choices(kind, template))
        got = asyncio.run(hf.choice_probs(asked, choices))
        for prompt, probs in zip(asked, got, strict=True):
            assert math.isclose(sum(probs), 1.0, abs_tol=1e-9)
            assert all(0 < p < 1 for p in probs), probs  # graded, not a 0/1 verdict
            # each choice scored alone, unpadded: log p(choice tokens | prompt) by teacher forcing
            text = rendered(hf.tokenizer, prompt)
            base = hf.tokenizer.encode(text, add_special_tokens=False)
            scores = []
            for choice in choices:
                ids = hf.tokenizer.encode(text + choice, add_special_tokens=False)
                assert ids[: len(base)] == base
                with torch.inference_mode():
                    logprobs = hf.model(torch.tensor([ids])).logits[0].log_softmax(-1)
                scores.append(sum(logprobs[j - 1, ids[j]].item() for j in range(len(base), len(ids))))
            expected = torch.tensor(scores).softmax(0).tolist()
            assert probs == pytest.approx(expected, rel=1e-3, abs=1e-12)
        assert len({tuple(p) for p in got}) == len(got)  # each prompt its own


class NoSampling:
    """The engine, but sampling is an error: probability verdicts must not generate."""

    def __init__(self, engine):
        self.engine = engine
        self.prefills = engine.prefills

    async def generate(self, requests):
        raise AssertionError("probability verdicts sampled an answer")

    async def choice_probs(self, prompts, choices):
        return await self.engine.choice_probs(prompts, choices)


def test_the_teacher_gives_the_expected_verdict_for_every_judgment(tiny):
    hf = engine(tiny)
    judge = LLMTeacher(NoSampling(hf), LLMConfig(verdict="probability", prompts=DIRECT), JUDGE_KINDS)
    pairs = [(passage(c), f" {a}.", f" {b}.") for c, a, b in CAPITALS[:4]]
    singles = [(passage(c), f" {b}, you idiot.") for c, _, b in CAPITALS[:4]]
    verdicts = {
        "quality": asyncio.run(judge.compare(pairs)),
        "coherence": asyncio.run(judge.coherence(pairs)),
        "safety": asyncio.run(judge.safety(singles)),
        "factuality": asyncio.run(judge.factuality(singles)),
    }
    assert judge.parse_failures == 0
    for kind, got in verdicts.items():
        assert all(v is not None and 0 < v < 1 for v in got), (kind, got)
    choices = verdict_choices("quality", judge.templates["quality"])
    prompts = [judge.templates["quality"].render(prefix=p.prefix, option_1=a, option_2=b) for p, a, b in pairs]
    probs = asyncio.run(hf.choice_probs(prompts, list(choices)))
    assert verdicts["quality"] == pytest.approx([p[0] * 1.0 + p[1] * 0.0 for p in probs])


def test_training_toward_an_answer_moves_its_probability_and_the_verdict(tiny, tmp_path):
    held_out = [(passage(c), f" {a}.", f" {b}.") for c, a, b in CAPITALS[15:]]
    cfg = LLMConfig(verdict="probability", prompts=DIRECT)
    before = asyncio.run(LLMTeacher(engine(tiny), cfg, ("quality",)).compare(held_out))
    examples = [(quality_prompt(c, a, b), " 1") for c, a, b in CAPITALS[:6]]
    after = asyncio.run(LLMTeacher(engine(trained(tiny, examples, tmp_path / "prefers_1")), cfg, ("quality",)).compare(held_out))
    assert all(a > 0.9 and a > b for a, b in zip(after, before, strict=True)), (before, after)


@pytest.fixture
def served(tiny, tmp_path):
    """The tiny model, trained to answer Option 1 or 2 (so both are among its top tokens), served
    over the OpenAI protocol by sip.serve.openai_server on a free port."""
    import uvicorn

    from sip.serve.openai_server import make_app

    examples = [(quality_prompt(c, a, b), f" {1 + i % 2}") for i, (c, a, b) in enumerate(CAPITALS[:6])]
    folder = trained(tiny, examples, tmp_path / "answers", steps=10)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(str(folder), "tiny", None), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    yield folder, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_engine_reads_the_same_probabilities_from_top_logprobs(served):
    folder, base_url = served
    prompts = [quality_prompt(c, a, b) for c, a, b in CAPITALS[10:14]]
    choices = list(verdict_choices("quality", Template.load("quality_direct_v1", "quality")))
    expected = asyncio.run(engine(folder).choice_probs(prompts, choices))
    client = OpenAIEngine(LLMConfig(model="tiny", base_url=base_url, continue_final_message=True))

    async def ask():
        try:
            return await client.choice_probs(prompts, choices)
        finally:
            await client.close()

    got = asyncio.run(ask())
    for g, e in zip(got, expected, strict=True):
        assert g is not None and g == pytest.approx(e, abs=1e-4)


def accuracy(truth_scores: list[float | None]) -> float:
    """The share of judgments that favour the truth: a tie counts half, no verdict as wrong."""
    return sum(0.0 if s is None else 0.5 if s == 0.5 else float(s > 0.5) for s in truth_scores) / len(truth_scores)


# hf and vllm both score in float32; only their kernels differ (summation order, vLLM's own CPU attention):
# measured here, they differ by at most 1e-5 on a choice's probability and 4e-6 on a verdict. 1e-3 allows
# 100 times that, and is still 20 times smaller than what the scoring bugs this guards against do to
# these prompts: a choice scored by its first token only moves factuality's probabilities by 0.02-0.06,
# " 1" / " 2" scored by their shared lone space makes quality 0.5 (0.3 or more off), and each token read
# from its neighbour position's distribution moves every kind by 0.16-0.97.
VLLM_TOLERANCE = 1e-3
PROBABILITY_PROMPTS = {kind: sorted(p.stem for p in PROMPT_DIR.glob(f"{kind}_*_v1.txt") if p.stem.endswith(("_short_v1", "_direct_v1")))
                       for kind in VERDICTS}


class SmolLM2Engines:
    """SmolLM2 behind each in-process backend, both in float32, each built on first use and kept for the
    module (vLLM's takes about a minute to start here), with each backend's verdicts kept by key."""

    def __init__(self, folder: Path):
        self.cfg = LLMConfig(model=str(folder), dtype="float32", temperature=1.0, torch_threads=2, batch_size=8,
                             timeout_s=900, max_model_len=1024, enforce_eager=True)
        self.engines: dict = {}
        self.verdicts: dict = {}

    def __call__(self, backend: str):
        if backend not in self.engines:
            self.engines[backend] = make_engine(backend, self.cfg)
        return self.engines[backend]

    def probability_verdicts(self, backend: str, kind: str, template: str, queries: list) -> list:
        key = (backend, kind, template, repr(queries))
        if key not in self.verdicts:
            judge = LLMTeacher(NoSampling(self(backend)), LLMConfig(verdict="probability", prompts={kind: template}), (kind,))
            ask = {"quality": judge.compare, "coherence": judge.coherence, "safety": judge.safety, "factuality": judge.factuality}
            self.verdicts[key] = asyncio.run(ask[kind](queries))
            assert judge.parse_failures == 0
        return self.verdicts[key]


@pytest.fixture(scope="module")
def smollm2_engines(smollm2):
    engines = SmolLM2Engines(smollm2)
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it, for the whole process, with a no-op
    yield engines
    if "vllm" in engines.engines:
        from sip.vllm_adapter import shutdown

        shutdown(engines.engines["vllm"].llm)
    torch.set_num_threads = set_num_threads


def need(backend: str, request) -> None:
    if backend == "vllm":
        request.getfixturevalue("vllm_installed")


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_smollm2_parsed_and_probability_verdicts_on_capitals(backend, smollm2_engines, request):
    """Which continuation names the capital, asked in both orders: 40 judgments per mode. SmolLM2's
    accuracy is printed, never asserted (it is near chance); probability verdicts leave none unparsed,
    and vllm's are hf's (on the same prompts, within VLLM_TOLERANCE)."""
    need(backend, request)
    engine = smollm2_engines(backend)
    queries, truth = [], []
    for country, right, wrong in CAPITALS:
        queries += [(passage(country), f" {right}.", f" {wrong}."), (passage(country), f" {wrong}.", f" {right}.")]
        truth += [1.0, 0.0]
    for verdict in ("parsed", "probability"):
        start = time.perf_counter()
        if verdict == "parsed":
            judge = LLMTeacher(engine, LLMConfig(verdict=verdict, prompts=DIRECT, max_tokens=4, max_retries=0), ("quality",))
            got = asyncio.run(judge.compare(queries))
        else:
            got = smollm2_engines.probability_verdicts(backend, "quality", DIRECT["quality"], queries)
        seconds = (time.perf_counter() - start) / len(queries)
        unparsed = got.count(None) / len(got)
        truth_score = [None if v is None else v if t == 1.0 else 1 - v for v, t in zip(got, truth)]
        # over both orders of a pair, which cancels position bias
        pairs = [None if None in truth_score[i : i + 2] else sum(truth_score[i : i + 2]) / 2 for i in range(0, len(got), 2)]
        mean_verdict = sum(v for v in got if v is not None) / max(1, len(got) - got.count(None))
        print(f"\nSmolLM2 {backend} {verdict}: accuracy {accuracy(truth_score):.2f} per judgment, {accuracy(pairs):.2f} per pair "
              f"over both orders; unparsed {unparsed:.2f}; mean verdict {mean_verdict:.2f}; {seconds:.2f} s per judgment")
        if verdict == "probability":
            assert unparsed == 0
            assert all(v is not None and 0 < v < 1 for v in got), got
            if backend != "hf":
                expected = smollm2_engines.probability_verdicts("hf", "quality", DIRECT["quality"], queries)
                print(f"SmolLM2 {backend} - hf probability verdicts: at most {max(abs(g - e) for g, e in zip(got, expected)):.1e}")
                assert got == pytest.approx(expected, abs=VLLM_TOLERANCE)


def judge_queries(kind: str) -> list:
    """Three judgments of the kind on the capitals: pairs of a right and a wrong continuation, in both
    orders; single continuations wrong, right, wrong (the reference, for factuality, the right one)."""
    bad = {"safety": " {}, you idiot.", "coherence": " {0} {0} {0}."}.get(kind, " {}.")
    queries = []
    for i, (country, right, wrong) in enumerate(CAPITALS[:3]):
        good, worse = f" {right}.", bad.format(wrong)
        if kind in ("quality", "coherence"):
            queries.append((passage(country), *((good, worse) if i % 2 == 0 else (worse, good))))
        else:
            queries.append((Passage(passage(country).prefix, good), good if i % 2 else worse))
    return queries


def test_vllm_probability_verdicts_are_hfs_for_every_short_and_direct_prompt(smollm2_engines, vllm_installed):
    """vLLM's choice probabilities, and the verdicts from them, against hf's on every prompt that prefills
    its verdict line, for every judge kind. SmolLM2's tokenizer splits a choice such as " 1" into a lone
    space and "1", " YES" into " Y" and "ES", and the factuality labels into up to 6 tokens: every token
    of a choice must be scored, from where the choices' tokens part."""
    hf, vllm = smollm2_engines("hf"), smollm2_engines("vllm")
    assert set(PROBABILITY_PROMPTS) == set(JUDGE_KINDS) and all(PROBABILITY_PROMPTS.values())
    worst, longest = 0.0, 0
    for kind, names in PROBABILITY_PROMPTS.items():
        for name in names:
            template = Template.load(name, kind)
            choices = verdict_choices(kind, template)
            queries = judge_queries(kind)
            fields = [{"prefix": p.prefix, "option_1": a, "option_2": b} for p, a, b in queries] if kind in ("quality", "coherence") \
                else [{"prefix": p.prefix, "candidate": c} | ({"reference": p.suffix} if kind == "factuality" else {}) for p, c in queries]
            prompts = [template.render(**f) for f in fields]
            _, rests = choice_tokens(hf.tokenizer, render_prompt(hf.tokenizer, prompts[0]), list(choices))
            longest = max(longest, *map(len, rests))
            if kind == "quality":  # the lone space is shared, so scored by neither: each choice is its digit
                assert [len(hf.tokenizer.encode(c, add_special_tokens=False)) for c in choices] == [2, 2]
                assert [hf.tokenizer.decode(r) for r in rests] == ["1", "2"]
            expected = asyncio.run(hf.choice_probs(prompts, list(choices)))
            got = asyncio.run(vllm.choice_probs(prompts, list(choices)))
            for g, e in zip(got, expected, strict=True):
                assert g is not None and len(g) == len(choices) and math.isclose(sum(g), 1.0, abs_tol=1e-9)
                assert all(0 <= p <= 1 for p in g)
                assert g == pytest.approx(e, abs=VLLM_TOLERANCE), (name, g, e)
                worst = max(worst, *(abs(a - b) for a, b in zip(g, e)))
            verdicts = smollm2_engines.probability_verdicts("vllm", kind, name, queries)
            assert all(v is not None and 0 <= v <= 1 for v in verdicts), (name, verdicts)
            assert verdicts == pytest.approx([sum(p * v for p, v in zip(e, choices.values())) for e in expected], abs=VLLM_TOLERANCE)
            print(f"\n{name}: choices as tokens {[hf.tokenizer.convert_ids_to_tokens(r) for r in rests]}; "
                  f"vllm {[[round(p, 4) for p in g] for g in got]}")
    assert longest == 6  # "Definite Hallucination\"}" after '{"label": "'
    print(f"vllm - hf choice probabilities: at most {worst:.1e}")
